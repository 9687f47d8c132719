"""An alert reaches the webhook: a real Prometheus with the project's prometheus.yml (its `alerting:` block)
and alerts.yml, a real Alertmanager (Debian's prometheus-alertmanager) with ops/alertmanager/alertmanager.yml,
whose placeholder URL is replaced by a webhook served here, as README tells the user to do. Nothing runs
but Prometheus, so no worker is up: RatequeueNoWorkerUp must arrive, firing and critical."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT, wait_until
from tests.prometheus_server import PROM, Prometheus, free_ports, rules_without_waits

ALERTMANAGER = ROOT / "ops" / "alertmanager" / "alertmanager.yml"


class Webhook:
    """An HTTP server that keeps every JSON body POSTed to it."""

    def __init__(self) -> None:
        received: list[dict[str, Any]] = []
        self.received = received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # the name http.server calls
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/ratequeue"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def alerts(self) -> list[dict[str, Any]]:
        return [alert for body in self.received for alert in body["alerts"]]


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.server.shutdown()
    hook.server.server_close()


def _alertmanager(workdir: Path, port: int, webhook_url: str) -> subprocess.Popen[bytes]:
    binary = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if binary is None:
        pytest.fail("alertmanager missing: scripts/setup installs the Debian package prometheus-alertmanager")
    config = yaml.safe_load(ALERTMANAGER.read_text())
    (receiver,) = config["receivers"]
    receiver["webhook_configs"][0]["url"] = webhook_url  # what the user does with the placeholder
    config["route"].update(group_wait="1s", group_interval="1s")  # seconds here, not the production 30 s / 5 min
    (workdir / "alertmanager.yml").write_text(yaml.safe_dump(config))
    log = (workdir / "alertmanager.log").open("wb")
    return subprocess.Popen(
        [binary, f"--config.file={workdir / 'alertmanager.yml'}", f"--storage.path={workdir / 'am-data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
        stdout=log, stderr=subprocess.STDOUT,
    )


@pytest.mark.timeout(90)
def test_an_alert_reaches_the_webhook_through_alertmanager(tmp_path: Path, webhook: Webhook) -> None:
    prom_port, am_port, nobody = free_ports(3)
    alertmanager = _alertmanager(tmp_path, am_port, webhook.url)
    config: dict[str, Any] = yaml.safe_load((PROM / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{am_port}"]
    targets = {"ratequeue-worker": nobody, "ratequeue-exporter": nobody, "prometheus": prom_port}
    for job in config["scrape_configs"]:
        job.pop("http_sd_configs", None)
        job["static_configs"] = [{"targets": [f"127.0.0.1:{targets[job['job_name']]}"]}]
    rules = rules_without_waits()  # the project's rules, firing at once
    # Alerts that fire before Prometheus has found its Alertmanager are sent again after the resend delay
    # (1 min by default): 1 s here.
    prom = Prometheus(config, tmp_path, prom_port, rules=rules, args=("--rules.alert.resend-delay=1s",))
    try:
        def arrived() -> bool:
            return any(a["labels"]["alertname"] == "RatequeueNoWorkerUp" for a in webhook.alerts())

        def explain() -> object:
            with urllib.request.urlopen(f"http://127.0.0.1:{am_port}/metrics", timeout=5) as resp:
                am_metrics = [line for line in resp.read().decode().splitlines()
                              if line.startswith(("alertmanager_notifications", "alertmanager_alerts"))]
            return {"received": webhook.received, "prometheus alerts": prom.api("alerts"),
                    "sent": prom.value("prometheus_notifications_sent_total"),
                    "errors": prom.value("prometheus_notifications_errors_total"), "alertmanager": am_metrics,
                    "prometheus log": (tmp_path / "prometheus.log").read_text()[-1500:],
                    "alertmanager log": (tmp_path / "alertmanager.log").read_text()[-1500:]}

        wait_until(arrived, 60, "RatequeueNoWorkerUp to reach the webhook", poll=0.5, explain=explain)
        alert = next(a for a in webhook.alerts() if a["labels"]["alertname"] == "RatequeueNoWorkerUp")
        assert alert["status"] == "firing" and alert["labels"]["severity"] == "critical"
        assert alert["annotations"]["summary"] == "No ratequeue worker is up"
        body = next(b for b in webhook.received if alert in b["alerts"])
        assert body["receiver"] == "ratequeue-webhook"
        assert body["commonLabels"]["system"] == "ratequeue"  # Prometheus' external label went along
    finally:
        prom.stop()
        alertmanager.terminate()
        alertmanager.wait(10)
