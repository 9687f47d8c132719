"""rediss:// is verified everywhere: a real TLS Redis with a certificate of our own test CA.

Without the CA, the worker's broker connection (Celery/kombu), the producer and the exporter all
refuse the server; with ``RATEQUEUE_REDIS_CA_FILE`` they work, and with the documented opt-out
(``RATEQUEUE_REDIS_TLS_INSECURE=1``) they work with a warning.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from ratequeue.config.settings import Settings, load_settings
from ratequeue.producer.api import Client
from ratequeue.producer.exporter import serve
from ratequeue.queue import create_app
from ratequeue.sim.process import start_sim
from tests.conftest import base_env
from tests.test_failure_kinds import StartWorker

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A redis-server speaking only TLS, its certificate signed by a CA made here: (url, CA file)."""
    d = tmp_path_factory.mktemp("tls")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "2", "-subj", "/CN=ratequeue test CA", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=localhost", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "2", "-extfile", "san.ext", cwd=d)
    port = _free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--tls-cert-file", "server.pem", "--tls-key-file", "server.key",
         "--tls-ca-cert-file", "ca.pem", "--tls-auth-clients", "no"],
        cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    url = f"rediss://127.0.0.1:{port}/0"
    probe = redis.Redis.from_url(url, ssl_ca_certs=str(d / "ca.pem"))
    deadline = time.monotonic() + 10
    while True:
        try:
            probe.ping()
            break
        except redis.ConnectionError:
            assert server.poll() is None and time.monotonic() < deadline, "redis-server with TLS did not start"
            time.sleep(0.1)
    probe.close()
    yield url, d / "ca.pem"
    server.terminate()
    server.wait(10)


def _settings(url: str, **env: str) -> Settings:
    return load_settings({"RATEQUEUE_REDIS_URL": url, **env})


def _broker_connects(settings: Settings) -> bool:
    app = create_app(settings, set_as_current=False)
    with app.connection_for_write() as conn:
        try:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=5)
            conn.default_channel.client.ping()
        except Exception:
            return False
    return True


def _producer_connects(settings: Settings) -> bool:
    client = Client(settings)
    try:
        client.redis.ping()
        return True
    except redis.ConnectionError as exc:
        assert "certificate verify failed" in str(exc)
        return False
    finally:
        client.close()


def _exporter_up(settings: Settings) -> bool:
    port = serve(settings, 0, "127.0.0.1")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=20) as resp:
        body = resp.read().decode()
    return "ratequeue_redis_up 1.0" in body


def test_an_untrusted_certificate_is_refused_by_default(tls_redis: tuple[str, Path]) -> None:
    url, _ = tls_redis
    settings = _settings(url)
    assert not _broker_connects(settings)  # kombu alone would connect without checking
    assert not _producer_connects(settings)
    assert not _exporter_up(settings)


def test_the_configured_ca_is_trusted(tls_redis: tuple[str, Path]) -> None:
    url, ca = tls_redis
    settings = _settings(url, RATEQUEUE_REDIS_CA_FILE=str(ca))
    assert _broker_connects(settings)
    assert _producer_connects(settings)
    assert _exporter_up(settings)


def test_the_opt_out_connects_with_a_warning(tls_redis: tuple[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    url, _ = tls_redis
    for settings in (_settings(url, RATEQUEUE_REDIS_TLS_INSECURE="1"), _settings(url + "?ssl_cert_reqs=none")):
        with caplog.at_level(logging.WARNING, logger="ratequeue.redis_tls"):
            assert _broker_connects(settings)
            assert _producer_connects(settings)
    assert "certificate checks are off" in caplog.text


def test_a_worker_refuses_the_untrusted_broker_and_runs_with_the_ca(
    tls_redis: tuple[str, Path], tmp_path: Path, start_worker: StartWorker
) -> None:
    url, ca = tls_redis
    redis.Redis.from_url(url, ssl_ca_certs=str(ca)).flushdb()
    with start_sim() as sim:
        refused = start_worker(base_env(url, sim.url, tmp_path))
        client = Client(_settings(url, RATEQUEUE_REDIS_CA_FILE=str(ca)))
        report = client.submit_batch([
            {"custom_id": f"t-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}}
            for i in range(3)
        ])
        log = tmp_path / "worker-0.log"
        deadline = time.monotonic() + 30
        while "certificate verify failed" not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline and refused.poll() is None, log.read_text(errors="replace")
            time.sleep(0.2)
        assert client.status(report.batch_id)["request_counts"]["completed"] == 0
        refused.terminate()
        refused.wait(20)

        start_worker(base_env(url, sim.url, tmp_path, RATEQUEUE_REDIS_CA_FILE=str(ca)))
        batch = client.wait(report.batch_id, timeout=60)
        assert batch["status"] == "completed" and batch["request_counts"]["completed"] == 3
        client.close()
