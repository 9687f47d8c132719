"""docker-compose.yml and the Dockerfile, checked without Docker: the compose specification's schema,
every command a project service runs parsed by the project's real CLI, every mounted path present,
ports that agree with the Prometheus config, and a README that starts the same processes without Docker."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from ratequeue.producer.cli import main
from tests.conftest import ROOT

COMPOSE = ROOT / "docker-compose.yml"


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def services() -> dict[str, dict[str, Any]]:
    return dict(compose()["services"])


def project_services() -> dict[str, dict[str, Any]]:
    """The services that run the project's own image (built from the Dockerfile)."""
    return {name: svc for name, svc in services().items() if "build" in svc}


@pytest.mark.e2e
def test_compose_file_matches_the_compose_specification() -> None:
    checker = Path(sys.executable).parent / "check-jsonschema"
    assert checker.exists(), "check-jsonschema missing: it is a dev dependency (pip install -e '.[dev]')"
    done = subprocess.run(
        [str(checker), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_stack_has_what_the_issue_asks_for() -> None:
    svc = services()
    assert {"redis", "worker", "exporter", "prometheus", "alertmanager", "grafana", "sim"} <= set(svc)
    # The worker's /metrics must be reachable from Prometheus' container (it binds 127.0.0.1 by default).
    assert svc["worker"]["environment"]["RATEQUEUE_METRICS_HOST"] == "0.0.0.0"
    assert "--appendonly" in svc["redis"]["command"] and any(v.endswith(":/data") for v in svc["redis"]["volumes"])
    assert "dryrun" in svc["sim"]["profiles"]
    env = svc["grafana"]["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


@pytest.mark.parametrize("name", sorted(project_services()))
def test_each_project_command_is_a_real_cli_command(name: str) -> None:
    command = project_services()[name]["command"]
    assert isinstance(command, list) and command[0] == "ratequeue", command
    parent = click.Context(main, info_name="ratequeue")
    sub = main.get_command(parent, command[1])
    assert sub is not None, f"`ratequeue {command[1]}` is not a command of ratequeue.producer.cli.main"
    sub.make_context(command[1], list(command[2:]), parent=parent)  # raises on an unknown option or bad value


def test_the_worker_scales() -> None:
    worker = services()["worker"]
    assert "container_name" not in worker, "--scale needs generated container names"
    assert "ports" not in worker, "replicas cannot share a host port; Prometheus finds them by /sd/workers"


def _bind_mounts() -> list[tuple[str, str, str]]:
    mounts = []
    for name, svc in services().items():
        for volume in svc.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith((".", "/")):
                mounts.append((name, source, target))
    return mounts


def test_every_mounted_path_exists_and_named_volumes_are_declared() -> None:
    mounts = _bind_mounts()
    assert mounts
    for service, source, _target in mounts:
        assert (ROOT / source).exists(), f"{service} mounts {source}, which does not exist"
    declared = set(compose()["volumes"])
    for svc in services().values():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in declared, source


def _mounted(service: str, container_path: str) -> Path:
    """The repository path that appears at `container_path` inside `service`."""
    for name, source, target in _bind_mounts():
        if name == service and (container_path + "/").startswith(target.rstrip("/") + "/"):
            return ROOT / source / container_path[len(target):].lstrip("/")
    raise AssertionError(f"{container_path} is not mounted into {service}")


def test_paths_the_services_read_are_mounted() -> None:
    svc = services()
    config = next(a.split("=", 1)[1] for a in svc["prometheus"]["command"] if a.startswith("--config.file="))
    prometheus_yml = _mounted("prometheus", config)
    assert prometheus_yml.is_file()
    for rule_file in yaml.safe_load(prometheus_yml.read_text())["rule_files"]:
        assert (prometheus_yml.parent / rule_file).is_file()
    env = svc["grafana"]["environment"]
    assert (_mounted("grafana", env["RATEQUEUE_DASHBOARDS_DIR"]) / "ratequeue.json").is_file()
    assert _mounted("grafana", env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]).is_file()
    assert (_mounted("grafana", "/etc/grafana/provisioning") / "datasources/prometheus.yml").is_file()
    assert env["RATEQUEUE_PROMETHEUS_URL"] == "http://prometheus:9090"
    alertmanager = svc["alertmanager"]["command"]
    config = next(a.split("=", 1)[1] for a in alertmanager if a.startswith("--config.file="))
    assert _mounted("alertmanager", config).is_file()


def test_ports_agree_with_the_prometheus_config() -> None:
    svc = services()
    config = yaml.safe_load((ROOT / "ops/prometheus/prometheus.yml").read_text())
    scrape = {job["job_name"]: job for job in config["scrape_configs"]}
    exporter_cmd = svc["exporter"]["command"]
    port = exporter_cmd[exporter_cmd.index("--port") + 1]
    assert scrape["ratequeue-exporter"]["static_configs"][0]["targets"] == [f"exporter:{port}"]
    # Workers are listed by the exporter from their heartbeats (a removed replica reads up == 0, not gone).
    assert "dns_sd_configs" not in scrape["ratequeue-worker"]
    assert scrape["ratequeue-worker"]["http_sd_configs"][0]["url"] == f"http://exporter:{port}/sd/workers"
    assert svc["worker"]["environment"]["RATEQUEUE_METRICS_PORT"] in svc["worker"]["expose"]
    # Prometheus sends its alerts to the Alertmanager service, on the port that service listens on.
    target = config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert target == ["alertmanager:9093"]
    assert any(p.endswith(":9093") for p in svc["alertmanager"]["ports"])
    sim_cmd = svc["sim"]["command"]
    assert f"OPENAI_BASE_URL=http://sim:{sim_cmd[sim_cmd.index('--port') + 1]}" in COMPOSE.read_text()


def test_the_dockerfile_copies_what_it_installs() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = []
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            copied += line.split()[1:-1]
    for source in copied:
        assert (ROOT / source).exists(), source
    packages = re.search(r'include = \[(.*?)\]', (ROOT / "pyproject.toml").read_text())
    assert packages is not None
    for pattern in re.findall(r'"(\w+)\*"', packages.group(1)):
        assert pattern in copied, f"package {pattern} is installed from pyproject but not copied"
        for link in (ROOT / pattern).iterdir():  # the folders the package's symlinks point to
            if link.is_symlink():
                assert link.resolve().relative_to(ROOT).as_posix() in copied, link
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    for source in copied:
        assert f"!{source.rstrip('/')}" in ignore or f"!{source.rstrip('/')}/" in ignore, source


def test_the_readme_starts_every_compose_process_without_docker() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "## Monitoring" in readme
    section = readme.split("## Monitoring", 1)[1].split("\n## ", 1)[0]
    for name, svc in project_services().items():
        command = " ".join(svc["command"][:2])
        assert command in section, f"README's Monitoring section does not say how to run {name}: {command}"
    for needed in ("redis-server --appendonly yes", "prometheus --config.file=ops/prometheus/prometheus-local.yml",
                   "RATEQUEUE_METRICS_PORT", "ops/grafana/provisioning", "apt-get install prometheus-alertmanager",
                   "prometheus-alertmanager --config.file=ops/alertmanager/alertmanager.yml"):
        assert needed in section, needed


@pytest.mark.e2e
def test_alertmanager_config_is_valid_and_its_webhook_is_a_placeholder_to_replace() -> None:
    """amtool (Debian package prometheus-alertmanager, installed by scripts/setup) accepts the config; its
    one receiver is a webhook whose URL README tells the user to replace."""
    amtool = shutil.which("amtool")
    if amtool is None:
        pytest.fail("amtool missing: scripts/setup installs the Debian package prometheus-alertmanager")
    path = ROOT / "ops/alertmanager/alertmanager.yml"
    done = subprocess.run([amtool, "check-config", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    config = yaml.safe_load(path.read_text())
    (receiver,) = config["receivers"]
    assert config["route"]["receiver"] == receiver["name"]
    url = receiver["webhook_configs"][0]["url"]
    assert ".invalid" in url and "REPLACE" in path.read_text()
    section = (ROOT / "README.md").read_text().split("## Monitoring", 1)[1].split("\n## ", 1)[0]
    assert url in section, "README's Monitoring section must say which URL to replace"
