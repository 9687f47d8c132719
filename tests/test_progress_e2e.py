"""Progress through the real thing (issue 10): workers, the simulator, the `ratequeue` CLI.

- half-way through a run paced by its TPM, the ETA is close to the time that really remained;
- a key the server refuses shows as "paused, upstream refused the key (401)" in `run`'s
  progress and in `status`, instead of a run that sits at "0 req/min ETA ?" and never says why.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from ratequeue.config.settings import load_settings
from ratequeue.producer.api import Client
from ratequeue.producer.progress import ProgressView, RateMeter
from ratequeue.sim.process import start_sim
from tests.conftest import base_env

pytestmark = pytest.mark.e2e  # worker and simulator processes

StartWorker = Callable[[dict[str, str]], subprocess.Popen[bytes]]
RATEQUEUE = [sys.executable, "-c", "from ratequeue.producer.cli import entry; entry()"]
TPM = 24_000  # 150 jobs of ~75 charged tokens: 5 s of bucket at once, then ~22 s at the limit


def _jobs(n: int) -> list[dict[str, object]]:
    return [{"custom_id": f"p-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"summarise report {i}"}],
                      "max_tokens": 60}} for i in range(n)]


@dataclass(frozen=True)
class HalfWay:
    """The ETA shown when half the jobs were done, and what really followed."""

    eta: float  # the ETA the progress display showed (s)
    paced_by: str  # what set it: "TPM", "RPM", "measured"
    rate_so_far_eta: float  # what the ETA from the rate so far (before issue 10) said (s)
    remained: float  # seconds from then to the batch's end
    batch: dict[str, Any]  # the final Batch object

    def report(self, scenario: str) -> str:
        return (f"{scenario}: half-way ETA {self.eta:.1f} s ({self.paced_by}), {self.remained:.1f} s remained "
                f"(ratio {self.eta / self.remained:.2f}); the rate so far said {self.rate_so_far_eta:.1f} s "
                f"(ratio {self.rate_so_far_eta / self.remained:.2f})")


def _half_way(client: Client, jobs: int) -> HalfWay:
    """Submit ``jobs`` jobs and follow them as `ratequeue run` does (ProgressView with the client's
    limits), noting the ETA shown when half were done and the time the batch then took."""
    view, rate_so_far = ProgressView(client.model_limits), RateMeter()
    report = client.submit_batch(_jobs(jobs))
    half: tuple[float, float, str, float] | None = None
    deadline = time.monotonic() + 180
    while True:
        batch = client.status(report.batch_id)
        now = time.monotonic()
        view.update(batch, now)
        done = batch["request_counts"]["completed"] + batch["request_counts"]["failed"]
        rate_so_far.add(now, done, 0)
        if half is None and done >= jobs // 2:
            old_rpm = rate_so_far.per_minute()[0]
            half = (now, view.eta or 0.0, view.paced_by["gpt-4o-mini"], (jobs - done) / old_rpm * 60 if old_rpm else 0)
        if batch["status"] == "completed":
            break
        assert now < deadline, f"batch not done in 3 minutes: {batch['request_counts']}"
        time.sleep(0.2)
    assert half is not None
    return HalfWay(half[1], half[2], half[3], now - half[0], batch)


def test_half_way_the_eta_is_within_a_third_of_the_time_that_remained(
    redis_url: str, tmp_path: Path, start_worker: StartWorker
) -> None:
    args = ["--rpm", "100000", "--tpm", str(TPM), "--burst-seconds", "5", "--charge-rule", "sum",
            "--latency-ms", "200"]
    with start_sim(args) as sim:
        env = base_env(redis_url, sim.url, tmp_path, RATEQUEUE_MODEL_GPT_4O_MINI_RPM="100000",
                       RATEQUEUE_MODEL_GPT_4O_MINI_TPM=str(TPM))
        start_worker(env)
        half = _half_way(Client(load_settings(env)), 150)
    print("\n" + half.report("paced by TPM"))
    assert half.paced_by in ("TPM", "measured")
    assert 0.65 <= half.eta / half.remained <= 1.35, half
    per_model, counts = half.batch["models"]["gpt-4o-mini"], half.batch["request_counts"]
    assert (per_model["total"], per_model["completed"], per_model["failed"]) == (
        counts["total"], counts["completed"], counts["failed"]) == (150, 150, 0)
    assert (per_model["in_flight"], per_model["remaining_tokens"]) == (0, 0)


def test_when_the_limits_do_not_bind_the_measured_rate_sets_the_eta(
    redis_url: str, tmp_path: Path, start_worker: StartWorker
) -> None:
    # Limits far away; 4 calls at once of 500 ms each: ~8 jobs a second, whatever the limits say.
    with start_sim(["--rpm", "100000", "--tpm", "10000000", "--latency-ms", "500"]) as sim:
        env = base_env(redis_url, sim.url, tmp_path, RATEQUEUE_MODEL_GPT_4O_MINI_RPM="100000",
                       RATEQUEUE_MODEL_GPT_4O_MINI_TPM="10000000", RATEQUEUE_MAX_IN_FLIGHT="4")
        start_worker(env)
        half = _half_way(Client(load_settings(env)), 120)
    print("\n" + half.report("paced by latency"))
    assert half.paced_by == "measured"  # the limits alone would say well under a second
    assert 0.65 <= half.eta / half.remained <= 1.35, half


def test_a_refused_key_shows_as_paused_with_the_reason_in_run_and_status(redis_url: str, tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(orjson.dumps(job) + b"\n" for job in _jobs(20)))
    with start_sim(["--api-key", "sk-the-right-key-0000000000"]) as sim:
        env = base_env(redis_url, sim.url, tmp_path, OPENAI_API_KEY="sk-a-wrong-key-1111111111")
        # Past the key check (it would refuse the key up front): the workers meet the 401, the
        # display says why the model is paused, and the run stops, since nothing can proceed.
        run = subprocess.run([*RATEQUEUE, "run", "--no-check", str(src), "-o", str(tmp_path / "out.jsonl")],
                             env=env, capture_output=True, text=True, timeout=120)
        shown = run.stderr
        assert run.returncode == 1, shown
        assert ("error: gpt-4o-mini: paused, upstream refused the key (401); fix OPENAI_API_KEY and run the "
                "same command again to continue") in shown.splitlines()
        batch_id = shown.split("batch ", 1)[1].split(":", 1)[0]
        status = subprocess.run([*RATEQUEUE, "status", batch_id], env=env, capture_output=True, text=True,
                                timeout=60)
    assert status.returncode == 0, status.stderr
    model = orjson.loads(status.stdout)["models"]["gpt-4o-mini"]
    assert model["paused"] == {"reason": "invalid_api_key", "message": "upstream refused the key (401)"}
    assert (model["total"], model["completed"], model["failed"]) == (20, 0, 0)
    for secret in ("sk-a-wrong-key-1111111111", "sk-the-right-key-0000000000"):
        assert secret not in shown + status.stdout + status.stderr
