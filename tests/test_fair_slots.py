"""Fair slots (issue 11): one model's backlog must not hold every chunk slot of a worker while
another model's jobs wait behind it in the queue. Real worker process, real Redis, the simulator;
each model's pace is read from the simulator's per-model counts."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from ratequeue.config.settings import load_settings
from ratequeue.producer.api import Client
from ratequeue.sim.process import SimHandle, start_sim
from tests.conftest import base_env

SLOW, FAST = "gpt-4o", "gpt-4o-mini"
SLOW_RPM, FAST_RPM = 60, 600  # 1 and 10 requests a second


@pytest.fixture
def sim() -> Iterator[SimHandle]:
    args = ["--latency-ms", "200", "--seed", "5", "--burst-seconds", "5",  # a 5 s server window, as ours
            "--model", f"{SLOW}:rpm={SLOW_RPM}:tpm=1000000", "--model", f"{FAST}:rpm={FAST_RPM}:tpm=1000000"]
    with start_sim(args) as handle:
        yield handle


def _jobs(path: Path, model: str, n: int) -> Path:
    rows = ({"custom_id": f"{model}-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": model, "messages": [{"role": "user", "content": f"Summarise item {i}."}],
                      "max_tokens": 20}} for i in range(n))
    path.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in rows))
    return path


def _answered(sim: SimHandle) -> dict[str, int]:
    by_model = sim.stats(timeline=False)["by_model"]
    return {model: by_model.get(model, {}).get("requests_ok", 0) for model in (SLOW, FAST)}


def test_a_backlogged_slow_model_does_not_starve_a_fast_one_of_slots(
    redis_url: str, sim: SimHandle, tmp_path: Path, start_worker: Callable[[dict[str, str]], subprocess.Popen[bytes]],
) -> None:
    # 4 slots of 5 jobs: the slow model's 80 jobs (16 chunks, 80 s of its limit) are queued first.
    # Held by chunks waiting on the slow model's bucket, the slots went to the fast model only once
    # the slow chunks had cycled through them (~40 slow answers first); now a slow model's chunk
    # beyond what its bucket grants within defer_after is deferred at once and its slot freed.
    env = base_env(redis_url, sim.url, tmp_path, RATEQUEUE_WORKER_SLOTS="4", RATEQUEUE_CHUNK_SIZE="5",
                   RATEQUEUE_MODEL_GPT_4O_RPM=str(SLOW_RPM), RATEQUEUE_MODEL_GPT_4O_TPM="1000000",
                   RATEQUEUE_MODEL_GPT_4O_MINI_RPM=str(FAST_RPM), RATEQUEUE_MODEL_GPT_4O_MINI_TPM="1000000")
    start_worker(env)
    client = Client(load_settings(env), publish=None)
    slow = client.submit_batch(_jobs(tmp_path / "slow.jsonl", SLOW, 80))
    fast = client.submit_batch(_jobs(tmp_path / "fast.jsonl", FAST, 50))
    deadline = time.monotonic() + 120
    answered = _answered(sim)
    while answered[FAST] < 50 and time.monotonic() < deadline:
        time.sleep(0.2)
        answered = _answered(sim)
    client.cancel(slow.batch_id)
    # The fast model's 50 jobs take 5 s at its limit, during which the slow one answers ~5 (plus
    # its 5 s burst and the start-up): well under 25, where sharing slots by arrival gave ~40.
    assert answered[FAST] == 50, answered
    assert answered[SLOW] < 25, answered
    assert client.wait(fast.batch_id, timeout=30)["request_counts"] == {"total": 50, "completed": 50, "failed": 0}


# -- worker.backlog: the queue each pair has waiting in a worker, and when deferred work comes back


def test_backlog_defers_only_past_patience_and_schedules_returns_one_after_another() -> None:
    from ratequeue.worker.backlog import MAX_DEFER_SECONDS, Backlog, admit_seconds
    from ratequeue.worker.limiter import BucketLimits

    limits = BucketLimits(rpm=60, tpm=1_000_000, burst_seconds=5)  # 1 request a second
    backlog = Backlog()
    assert backlog.ahead("k") == (0.0, None)
    assert admit_seconds(limits) == 5.0
    assert admit_seconds(BucketLimits(rpm=60, tpm=1_000_000, burst_seconds=1)) == 2.0  # never below 2 s
    with contextlib.ExitStack() as queued:
        for _ in range(10):
            assert backlog.defer_for("k", limits, 10, patience=10.0) is None
            queued.enter_context(backlog.waiting("k", limits, 10))
        assert backlog.ahead("k") == (10.0, limits)
        # The 11th would wait 10 s: it is deferred until half of admit_seconds (2.5 s) before its
        # turn, and each job deferred after it comes back one second (its share of the limit) later.
        first = backlog.defer_for("k", limits, 10, patience=9.0)
        second = backlog.defer_for("k", limits, 10, patience=9.0)
        assert first is not None and second is not None
        assert first == pytest.approx(10.0 - 2.5, abs=0.1)
        assert second == pytest.approx(first + 1.0, abs=0.1)
        # A chunk of 5 comes back after them, and the one after it 5 s later.
        chunk = backlog.schedule("k", 5, 50)
        assert chunk == pytest.approx(second + 1.0, abs=0.1)
        assert backlog.schedule("k", 5, 50) == pytest.approx(chunk + 5.0, abs=0.1)
        # Never more than MAX_DEFER_SECONDS ahead; work past it asks again then, keeping the schedule.
        assert backlog.schedule("k", 100, 1000) < MAX_DEFER_SECONDS
        assert backlog.schedule("k", 5, 50) == MAX_DEFER_SECONDS
    assert backlog.ahead("k") == (0.0, limits)  # the block left: nothing waits


def test_no_schedule_is_priced_by_limits_still_a_guess() -> None:
    # Before the server announces a pair's limits they are the model table's guess; a schedule
    # priced by a guess lower than the account's deferred most of a batch for tens of seconds.
    from ratequeue.worker.backlog import Backlog
    from ratequeue.worker.limiter import BucketLimits

    backlog = Backlog()
    guess = BucketLimits(rpm=60, tpm=1_000_000, burst_seconds=5, slow_start=True)
    with contextlib.ExitStack() as waiting:
        for _ in range(20):  # 20 jobs waiting here: 20 s of a 60 RPM limit
            waiting.enter_context(backlog.waiting("k", guess, 10))
        assert backlog.defer_for("k", guess, 10, patience=1.0) is None
        known = BucketLimits(rpm=60, tpm=1_000_000, burst_seconds=5)
        assert backlog.defer_for("k", known, 10, patience=1.0) is not None
