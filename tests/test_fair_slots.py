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


def test_both_models_progress_at_a_good_fraction_of_their_limits_while_both_have_work(
    redis_url: str, tmp_path: Path, start_worker: Callable[[dict[str, str]], subprocess.Popen[bytes]],
) -> None:
    # One worker, the 120 RPM model's backlog (100 s of its limit) queued first, in chunks of 10
    # (5 s of its limit, past defer_after's 4 s: a chunk that comes back at its turn must run
    # whole), then 20 s of the 600 RPM model's work. While both have work each must run at a
    # good fraction of its own limit: bounds are generous (50%), the pace is measured in bench/.
    slow_rpm, fast_rpm = 120, 600
    args = ["--latency-ms", "200", "--seed", "5", "--burst-seconds", "5",
            "--model", f"{SLOW}:rpm={slow_rpm}:tpm=1000000", "--model", f"{FAST}:rpm={fast_rpm}:tpm=1000000"]
    with start_sim(args) as sim:
        env = base_env(redis_url, sim.url, tmp_path, RATEQUEUE_WORKER_SLOTS="4", RATEQUEUE_CHUNK_SIZE="10",
                       RATEQUEUE_DEFER_AFTER="4",
                       RATEQUEUE_MODEL_GPT_4O_RPM=str(slow_rpm), RATEQUEUE_MODEL_GPT_4O_TPM="1000000",
                       RATEQUEUE_MODEL_GPT_4O_MINI_RPM=str(fast_rpm), RATEQUEUE_MODEL_GPT_4O_MINI_TPM="1000000")
        start_worker(env)
        client = Client(load_settings(env), publish=None)
        slow = client.submit_batch(_jobs(tmp_path / "slow.jsonl", SLOW, 200))
        client.submit_batch(_jobs(tmp_path / "fast.jsonl", FAST, 200))
        samples: list[tuple[float, dict[str, int]]] = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            samples.append((time.monotonic(), _answered(sim)))
            if samples[-1][1][FAST] >= 190:
                break
            time.sleep(0.5)
        client.cancel(slow.batch_id)
    # From 3 s after the fast model's first answer (start-up and its burst left out) to its 190th.
    first = next(t for t, counts in samples if counts[FAST] > 0)
    begin = next(i for i, (t, _) in enumerate(samples) if t >= first + 3.0)
    (t0, a), (t1, b) = samples[begin], samples[-1]
    assert b[FAST] >= 190, samples[-1]
    minutes = (t1 - t0) / 60
    paces = {model: (b[model] - a[model]) / minutes for model in (SLOW, FAST)}
    assert paces[FAST] >= 0.5 * fast_rpm, paces
    assert paces[SLOW] >= 0.5 * slow_rpm, paces


# -- worker.backlog: the queue each pair has waiting in a worker, and when deferred work comes back


def test_backlog_defers_only_past_patience_and_schedules_returns_one_after_another() -> None:
    from ratequeue.worker.backlog import LEAD_SECONDS, MAX_DEFER_SECONDS, Backlog
    from ratequeue.worker.limiter import BucketLimits

    limits = BucketLimits(rpm=60, tpm=1_000_000, burst_seconds=5)  # 1 request a second
    backlog = Backlog()
    assert backlog.ahead("k") == (0.0, None)
    with contextlib.ExitStack() as queued:
        for _ in range(10):
            assert backlog.defer_for("k", limits, 10, patience=10.0) is None
            queued.enter_context(backlog.waiting("k", limits, 10))
        assert backlog.ahead("k") == (10.0, limits)
        # The 11th would wait 10 s: it is deferred until LEAD_SECONDS (at most half of its
        # patience) before its turn, and each job deferred after it comes back one second (its
        # share of the limit) later.
        first = backlog.defer_for("k", limits, 10, patience=9.0)
        second = backlog.defer_for("k", limits, 10, patience=9.0)
        assert first is not None and second is not None
        assert first == pytest.approx(10.0 - LEAD_SECONDS, abs=0.1)
        assert second == pytest.approx(first + 1.0, abs=0.1)
        # A chunk of 5 comes back after them, and the one after it 5 s later.
        chunk = backlog.schedule("k", limits, [10] * 5, 9.0)
        assert chunk == pytest.approx(second + 1.0, abs=0.1)
        assert backlog.schedule("k", limits, [10] * 5, 9.0) == pytest.approx(chunk + 5.0, abs=0.1)
        # Never more than MAX_DEFER_SECONDS ahead; work past it asks again then, keeping the schedule.
        assert backlog.schedule("k", limits, [10] * 100, 9.0) < MAX_DEFER_SECONDS
        assert backlog.schedule("k", limits, [10] * 5, 9.0) == MAX_DEFER_SECONDS
    assert backlog.ahead("k") == (0.0, limits)  # the block left: nothing waits


def test_a_chunk_admitted_behind_the_queue_keeps_its_place() -> None:
    # Profiled with bench/fair_slots_bench.py: a deferred chunk of 25 jobs of a 120 RPM model
    # (12.5 s of its limit) came back to a queue of 5 s; its jobs past defer_after (10 s) were
    # deferred again, to the end of the schedule, and the work booked after the chunk came back
    # late: the model waited 3-6 s between answers. An admitted job now keeps its place.
    from ratequeue.worker.backlog import Backlog, job_ref
    from ratequeue.worker.limiter import BucketLimits

    limits = BucketLimits(rpm=120, tpm=1_000_000, burst_seconds=10)  # 2 requests a second
    backlog = Backlog()
    with contextlib.ExitStack() as queued:
        for _ in range(10):  # 5 s of work waiting here
            queued.enter_context(backlog.waiting("k", limits, 10))
        chunk = [job_ref("b", f"doc-{i}") for i in range(25)]
        backlog.admit("k", limits, dict.fromkeys(chunk, 10))
        assert backlog.ahead("k") == (pytest.approx(17.5), limits)  # seen by the next chunk at once
        for i, job in enumerate(chunk):
            patience = backlog.patience(job, 10.0)
            assert patience >= 5.0 + i * 0.5 + 10.0 - 1e-9  # its wait ahead when admitted, plus 10 s
            assert backlog.defer_for("k", limits, 10, patience=patience, job=job) is None
            queued.enter_context(backlog.waiting("k", limits, 10, job=job))
            assert backlog.ahead("k")[0] == pytest.approx(17.5)  # counted once, from admission on
        assert backlog.patience("other", 10.0) == 10.0
    assert backlog.ahead("k") == (0.0, limits)


def test_chunks_arriving_together_see_each_other_and_ended_runs_stop_counting() -> None:
    # 10 chunks of one model arriving within milliseconds all found the queue short (their jobs
    # had not reached the bucket yet), were all admitted and held every slot of the worker.
    from ratequeue.worker.backlog import Backlog, job_ref
    from ratequeue.worker.limiter import BucketLimits

    limits = BucketLimits(rpm=600, tpm=1_000_000, burst_seconds=10)  # 10 requests a second
    backlog = Backlog()
    with backlog.waiting("k", limits, 10):  # the pair has waited here once: its limits are known
        pass
    first = {job_ref("b", f"doc-{i}"): 10 for i in range(25)}
    backlog.admit("k", limits, first)
    assert backlog.ahead("k")[0] == pytest.approx(2.5)
    backlog.admit("k", limits, first)  # the same jobs again (a redelivered chunk): counted once
    assert backlog.ahead("k")[0] == pytest.approx(2.5)
    backlog.release(first)  # their runs ended (stored, deferred) without waiting on the bucket
    assert backlog.ahead("k") == (0.0, limits)


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


def test_a_pair_holds_at_most_an_equal_share_of_the_slots_while_another_has_work() -> None:
    # 4 slots, chunks of 10: each chunk of the 600 RPM model was admitted (its queue stayed under
    # defer_after) and held a slot, so it held all 4 while the 120 RPM model's chunks, back from
    # the deferred set, waited behind the fast model's fresh ones in the broker's queue.
    from ratequeue.worker.backlog import Backlog
    from ratequeue.worker.limiter import BucketLimits

    limits = BucketLimits(rpm=600, tpm=1_000_000, burst_seconds=5)
    backlog = Backlog()
    for _ in range(3):
        assert backlog.within_share("fast", 4)  # alone: every slot
        backlog.hold("fast")
    with backlog.waiting("slow", limits, 10):  # another pair has work here: 2 slots each
        assert not backlog.within_share("fast", 4)
        assert backlog.within_share("slow", 4)
    backlog.schedule("slow", limits, [10] * 10, 4.0)  # its work booked to come back counts too
    assert not backlog.within_share("fast", 4)
    backlog.let_go(["fast", "fast"])
    assert backlog.within_share("fast", 4)  # 1 held, under its share of 2
