"""The `ratequeue` command line, run as a user would: a real process, embedded Redis, simulator."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from ratequeue.sim.process import start_sim
from ratequeue.worker.__main__ import pool_option
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e  # subprocesses

RATEQUEUE = [sys.executable, "-c", "from ratequeue.producer.cli import entry; entry()"]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RATEQUEUE_", "OPENAI_"))}
    env.update(RATEQUEUE_DATA_DIR=str(tmp_path / "data"), PYTHONPATH=str(ROOT), COLUMNS="200", **extra)
    return env


def test_demo_without_a_key_runs_against_the_simulator_with_embedded_redis(tmp_path: Path) -> None:
    out = tmp_path / "demo.jsonl"
    proc = subprocess.run([*RATEQUEUE, "demo", "-n", "40", "-o", str(out)], env=_env(tmp_path), cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "embedded redis-server" in proc.stderr
    assert "40 completed, 0 failed of 40" in proc.stderr
    assert "429 answers: 0" in proc.stderr
    [use] = [line for line in proc.stderr.splitlines() if line.startswith("limit use over the steady state")]
    assert all(int(share) <= 100 for share in re.findall(r"(\d+)%", use)), use  # never reads as over a limit
    assert len(out.read_bytes().splitlines()) == 40
    # the embedded Redis kept an append-only file in a data directory of this demo's own
    [demo_dir] = (tmp_path / "data" / "demos").iterdir()
    assert f"data directory: {demo_dir}" in proc.stderr
    assert list((demo_dir / "redis").rglob("*.aof*"))


def test_run_writes_results_and_errors_and_a_summary(tmp_path: Path) -> None:
    lines = [
        {"custom_id": f"r{n}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"doc {n}"}], "max_tokens": 8}}
        for n in range(25)
    ]
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\n".join(orjson.dumps(line) for line in lines) + b"\n{\"custom_id\": \"bad\"}\n")
    with start_sim(["--rpm", "6000", "--tpm", "1000000"]) as sim:
        env = _env(tmp_path, OPENAI_BASE_URL=sim.url, OPENAI_API_KEY="sk-cli-test-00000000")
        proc = subprocess.run([*RATEQUEUE, "run", str(src), "-o", str(tmp_path / "out.jsonl")], env=env,
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr  # a line was rejected
    assert "25 completed, 1 failed of 26" in proc.stderr
    results = [orjson.loads(x) for x in (tmp_path / "out.jsonl").read_bytes().splitlines()]
    assert [r["custom_id"] for r in results] == [f"r{n}" for n in range(25)]
    [err] = [orjson.loads(x) for x in (tmp_path / "out.errors.jsonl").read_bytes().splitlines()]
    assert (err["custom_id"], err["error"]["line"], err["error"]["param"]) == ("bad", 26, "url")
    assert "sk-cli-test" not in proc.stderr + proc.stdout  # the key never reaches output


def test_status_results_and_cancel_on_a_configured_redis(tmp_path: Path, redis_url: str) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(orjson.dumps({"custom_id": "only", "method": "POST", "url": "/v1/embeddings",
                                  "body": {"model": "text-embedding-3-small", "input": "x"}}) + b"\n")
    env = _env(tmp_path, RATEQUEUE_REDIS_URL=redis_url)
    submitted = subprocess.run([*RATEQUEUE, "submit", "--no-check", str(src)], env=env,  # no upstream here
                               capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    batch_id = submitted.stdout.strip()
    status = subprocess.run([*RATEQUEUE, "status", batch_id], env=env, capture_output=True, text=True, timeout=60)
    assert orjson.loads(status.stdout)["request_counts"]["total"] == 1
    cancel = subprocess.run([*RATEQUEUE, "cancel", batch_id], env=env, capture_output=True, text=True, timeout=60)
    assert cancel.stdout.strip() == "cancelling"
    out = tmp_path / "so-far.jsonl"
    results = subprocess.run([*RATEQUEUE, "results", batch_id, "-o", str(out)], env=env, capture_output=True,
                             text=True, timeout=60)
    assert results.returncode == 0 and out.exists() and (tmp_path / "so-far.errors.jsonl").exists()
    overview = subprocess.run([*RATEQUEUE, "status"], env=env, capture_output=True, text=True, timeout=60)
    assert orjson.loads(overview.stdout)["recent_batches"][0]["id"] == batch_id
    missing = subprocess.run([*RATEQUEUE, "status", "batch_nope"], env=env, capture_output=True, text=True,
                             timeout=60)
    assert missing.returncode == 2 and "no batch" in missing.stderr


@pytest.mark.parametrize(
    ("args", "pool"),
    [
        ([], None),
        (["--pool=prefork"], "prefork"),
        (["--pool", "solo", "-l", "INFO"], "solo"),
        (["-P", "gevent"], "gevent"),
        (["-Pprefork", "--concurrency=2"], "prefork"),
        (["--pool=solo", "--pool=prefork"], "prefork"),
    ],
)
def test_the_pool_asked_for_on_the_command_line_is_found(args: list[str], pool: str | None) -> None:
    # `ratequeue worker --pool=...` must reach Celery's config (see worker/__main__.py); the
    # prefork case runs end to end in tests/test_metrics_prefork.py.
    assert pool_option(args) == pool


def test_the_cli_loads_neither_the_simulator_nor_the_exporter_until_their_command_runs() -> None:
    """They pull in aiohttp and prometheus-client: ~0.3 s on every invocation, --help included."""
    slow = ("ratequeue.sim", "ratequeue.producer.exporter", "aiohttp")
    code = f"import sys; import ratequeue.producer.cli; print(sorted(m for m in sys.modules if m.startswith({slow})))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
    shown = subprocess.run([*RATEQUEUE, "sim", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--rpm" in shown and "sim [OPTIONS]" in shown  # the real command, loaded on use
