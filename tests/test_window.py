"""Issue 11: the server's window learned both ways, and slow start until the server announces
its limits. Real Redis, the real simulator, real worker processes."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from ratequeue.config.models import load_model_table_from
from ratequeue.config.settings import load_settings
from ratequeue.jobstore.keys import bucket_key
from ratequeue.producer.api import Client
from ratequeue.sim.process import start_sim
from ratequeue.worker.feedback import RateLimitHeaders
from ratequeue.worker.gate import BucketGate
from ratequeue.worker.learned import Learned
from ratequeue.worker.limiter import BucketLimits, Limiter, SyncLimiter, slow_start_key
from ratequeue.worker.window import WindowLearner, server_window
from tests.conftest import base_env

StartWorker = Callable[[dict[str, str]], subprocess.Popen[bytes]]
MODEL = "gpt-4o-mini"


def _jobs(n: int, max_tokens: int = 20) -> list[dict[str, object]]:
    return [{"custom_id": f"w-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": MODEL, "messages": [{"role": "user", "content": f"summarise {i}"}],
                      "max_tokens": max_tokens}} for i in range(n)]


def _stored_window(client: Client) -> float | None:
    """The window learned for the one pair of the test, as every worker's bucket scripts read it."""
    found = list(client.redis.scan_iter(match="rq:bucket:*:window"))
    return float(client.redis.get(found[0]) or 0) if found else None


@pytest.fixture
def bucket(rclient: redis.Redis) -> Iterator[str]:
    key = bucket_key(uuid.uuid4().hex[:12], MODEL)
    yield key
    rclient.delete(key, slow_start_key(key))


def test_slow_start_grants_one_then_two_per_answer_until_the_server_announces(
    rclient: redis.Redis, bucket: str
) -> None:
    limiter = SyncLimiter(rclient)
    guess = BucketLimits(1_000_000, 1_000_000_000, 5.0, slow_start=True)  # limits far too high
    first = limiter.reserve(bucket, guess, [10] * 50)
    assert (first.granted, first.retry_in) == (1, 0.05)
    assert limiter.reserve(bucket, guess, [10] * 50).granted == 0  # the round trip is not over
    limiter.slow_start_answered(bucket, 2)
    assert limiter.reserve(bucket, guess, [10] * 50).granted == 2
    for _ in range(2):
        limiter.slow_start_answered(bucket, 2)
    assert limiter.reserve(bucket, guess, [10] * 50).granted == 4
    announced = BucketLimits(3000, 400_000, 5.0)  # the server announced its limits: no slow start
    assert limiter.reserve(bucket, announced, [10] * 50).granted == 50


def test_slow_start_against_a_server_that_never_announces_limits(
    redis_url: str, tmp_path: Path, start_worker: StartWorker
) -> None:
    # No x-ratelimit-* headers, 1 s per answer, limits configured at 1M RPM / 1G TPM: without
    # slow start the whole batch (a 5 s burst of a guess) went at once.
    with start_sim(["--no-ratelimit-headers", "--latency-ms", "1000", "--rpm", "100000", "--tpm", "10000000"]) as sim:
        env = base_env(redis_url, sim.url, tmp_path, RATEQUEUE_MODEL_GPT_4O_MINI_RPM="1000000",
                       RATEQUEUE_MODEL_GPT_4O_MINI_TPM="1000000000")
        start_worker(env)
        client = Client(load_settings(env))
        time.sleep(1.0)
        sim.reset()
        batch = client.wait(client.submit_batch(_jobs(40)).batch_id, timeout=60, poll=0.2)
        timeline = [row["requests_ok"] for row in sim.stats()["timeline"]]
    assert batch["request_counts"]["completed"] == 40
    opened = next(i for i, n in enumerate(timeline) if n)
    # Each round trip takes at least a second, so by the end of second k after the first request
    # at most rounds 0..k went: 1, then 2, 4, 8 (at most 2^(k+1) - 1 requests in all).
    sent = 0
    for k, n in enumerate(timeline[opened:opened + 4]):
        sent += n
        assert sent <= 2 ** (k + 1) - 1, f"second {k} of the run: {sent} requests sent ({timeline})"


def test_a_one_second_window_shrinks_the_bucket_and_the_429s_stop(
    redis_url: str, tmp_path: Path, start_worker: StartWorker
) -> None:
    # The server forgives 1 s of limit (10 requests at 600 RPM); our default burst is 5 s (50).
    with start_sim(["--rpm", "600", "--tpm", "10000000", "--burst-seconds", "1", "--latency-ms", "100"]) as sim:
        env = base_env(redis_url, sim.url, tmp_path, RATEQUEUE_MODEL_GPT_4O_MINI_RPM="600",
                       RATEQUEUE_MODEL_GPT_4O_MINI_TPM="10000000")
        start_worker(env)
        client = Client(load_settings(env))
        time.sleep(1.0)
        sim.reset()
        batch = client.wait(client.submit_batch(_jobs(60)).batch_id, timeout=60, poll=0.2)
        stats = sim.stats()
        window = _stored_window(client)
    assert batch["request_counts"]["completed"] == 60
    assert window == pytest.approx(1.0, abs=0.05)
    # The window is read off the first answer's headers; at most a race of the opening burst
    # with the server's refill draws a 429 (a 5 s burst drew 40), none after the opening second.
    per_second = [row["r429"] for row in stats["timeline"]]
    opened = next(i for i, row in enumerate(stats["timeline"]) if row["requests_ok"] or row["r429"])
    assert sum(per_second) <= 2, per_second
    assert sum(per_second[opened + 2:]) == 0, per_second


def test_a_server_forgiving_a_minute_widens_the_bucket(
    redis_url: str, tmp_path: Path, start_worker: StartWorker
) -> None:
    # The server forgives a whole minute (600 requests at 600 RPM): 100 jobs can go at once, where
    # our default 5 s burst (50 requests) would make the second half wait for refill.
    with start_sim(["--rpm", "600", "--tpm", "10000000", "--burst-seconds", "60", "--latency-ms", "100"]) as sim:
        env = base_env(redis_url, sim.url, tmp_path, RATEQUEUE_MODEL_GPT_4O_MINI_RPM="600",
                       RATEQUEUE_MODEL_GPT_4O_MINI_TPM="10000000")
        start_worker(env)
        client = Client(load_settings(env))
        time.sleep(1.0)
        sim.reset()
        started = time.monotonic()
        batch = client.wait(client.submit_batch(_jobs(100)).batch_id, timeout=60, poll=0.2)
        wall = time.monotonic() - started
        stats = sim.stats()
        window = _stored_window(client)
    assert batch["request_counts"]["completed"] == 100
    assert window is not None and window >= 55
    assert sum(stats["r429"].values()) == 0, stats["r429"]
    print(f"100 jobs at 600 RPM with a 60 s server window: {wall:.1f} s (a 5 s burst needs >= 5 s)")


def test_the_server_window_is_read_off_remaining_and_reset() -> None:
    # A 1 s window at 3,000 RPM / 400k TPM: 49 requests and 6,000 tokens left, full again in 20 ms / 100 ms.
    one_second = RateLimitHeaders(3000, 400_000, 49, 6000, 0.02, 0.1)
    assert server_window(one_second) == (pytest.approx(1.0), pytest.approx(0.9))  # lower: 6,000 tokens of 6,667
    # Another client spent half: less remaining, a longer reset, the same window.
    shared = RateLimitHeaders(3000, 400_000, 24, 3000, 0.52, 0.55)
    assert server_window(shared)[0] == pytest.approx(1.0)
    assert server_window(RateLimitHeaders(3000, 400_000, 2999, 399_000)) == (None, pytest.approx(59.85))


def test_the_window_follows_the_server_both_ways_and_halves_on_blind_429s() -> None:
    learner = WindowLearner(5.0)
    pair = "acct:gpt-4o-mini"
    assert learner.observe(pair, RateLimitHeaders(3000, 400_000, 49, 6000, 0.02, 0.1), False) == pytest.approx(0.97)
    assert learner.observe(pair, RateLimitHeaders(3000, 400_000, 30, 4000, 0.4, 0.4), False) is None  # same window
    assert learner.observe(pair, RateLimitHeaders(3000, 400_000, 2999, 399_000), False) == pytest.approx(
        59.85 * 0.97)  # remaining alone: more than our bucket holds
    blind = WindowLearner(5.0)
    assert blind.observe(pair, RateLimitHeaders(), refused=True) == 2.5
    assert blind.observe(pair, RateLimitHeaders(), refused=True) is None  # one overrun, many 429s: once


def test_a_shrink_keeps_what_the_last_seconds_spent(rclient: redis.Redis, bucket: str) -> None:
    # A 5 s bucket at 600 RPM / 60k TPM (50 requests, 5,000 tokens) spends 2 requests of 200
    # tokens, then learns that the server forgives 1 s (10 requests, 1,000 tokens). The server still
    # counts those 2 requests: our bucket must hold 8 requests and 600 tokens, not a full 10 / 1,000
    # (which drew a 429 on the next burst at 3,000 RPM / 400k TPM).
    limiter = SyncLimiter(rclient)
    configured = BucketLimits(600, 60_000, 5.0)
    assert limiter.reserve(bucket, configured, [200, 200]).granted == 2
    assert limiter.set_window(bucket, configured, 1.0) == 1.0
    levels = limiter.peek(bucket, configured)
    assert (levels.request_capacity, levels.token_capacity) == (10, 1000)
    # Refill since the reservation (10 requests and 1,000 tokens a second) is a few ms' worth.
    assert levels.requests == pytest.approx(8, abs=0.2)
    assert levels.tokens == pytest.approx(600, abs=20)


def test_a_shrink_keeps_a_debt_and_never_owes_below_empty(rclient: redis.Redis, bucket: str) -> None:
    limiter = SyncLimiter(rclient)
    configured = BucketLimits(600, 60_000, 5.0)
    # 4,800 of the 5,000 tokens spent: the 1 s bucket is empty (not 200 - 4,000 tokens in debt).
    limiter.reserve(bucket, configured, [4800])
    limiter.set_window(bucket, configured, 1.0)
    assert limiter.peek(bucket, configured).tokens == pytest.approx(0, abs=20)
    # A debt (reservations granted ahead) is kept as it is: those requests are still to be sent.
    other = bucket + "x"
    try:
        limiter.reserve(other, configured, [5000, 1000])  # 1,000 tokens owed: sent 1 s from now
        limiter.set_window(other, configured, 1.0)
        assert limiter.peek(other, configured).tokens == pytest.approx(-1000, abs=20)
    finally:
        rclient.delete(other)


def test_a_widening_banks_what_the_larger_bucket_would_have_held(rclient: redis.Redis, bucket: str) -> None:
    limiter = SyncLimiter(rclient)
    configured = BucketLimits(600, 60_000, 5.0)
    limiter.reserve(bucket, configured, [1000])
    limiter.set_window(bucket, configured, 60.0)  # a minute: 60,000 tokens, of which 1,000 spent
    assert limiter.peek(bucket, configured).tokens == pytest.approx(59_000, abs=20)


def test_the_first_answer_shrinks_the_bucket_without_forgetting_the_request_it_answers(
    redis_url: str, tmp_path: Path, start_worker: StartWorker
) -> None:
    # The server forgives 1 s of 60k TPM (1,000 tokens); every job is charged about 400. Slow start
    # sends one, whose answer (100 ms later) says the window is 1 s: the server then holds ~700
    # tokens. A bucket shrunk to its capacity (970) sent two at once and the second drew a 429; one
    # that keeps what was spent (~670) sends one, then follows the refill.
    with start_sim(["--rpm", "6000", "--tpm", "60000", "--burst-seconds", "1", "--latency-ms", "100"]) as sim:
        env = base_env(redis_url, sim.url, tmp_path, RATEQUEUE_MODEL_GPT_4O_MINI_RPM="6000",
                       RATEQUEUE_MODEL_GPT_4O_MINI_TPM="60000")
        start_worker(env)
        client = Client(load_settings(env))
        time.sleep(1.0)
        sim.reset()
        batch = client.wait(client.submit_batch(_jobs(12, max_tokens=388)).batch_id, timeout=60, poll=0.2)
        stats = sim.stats()
        window = _stored_window(client)
    assert batch["request_counts"]["completed"] == 12
    assert window == pytest.approx(0.97, abs=0.02)
    # 0 in 3 of 4 runs; 1 seen once in a full suite run on a loaded machine (an answer reconciled
    # late). The resize itself is checked exactly by the Lua-level tests below.
    assert sum(stats["r429"].values()) <= 1, [row["r429"] for row in stats["timeline"]]


def test_a_reservation_with_a_shrunk_window_not_yet_stored_keeps_what_was_spent(
    rclient: redis.Redis, bucket: str
) -> None:
    # A worker reserves with the 1 s window it has just read before set_window.lua stored it: the
    # 400 tokens the 5 s bucket granted a moment ago still count (600 of 1,000 left, 1,000 a second).
    limiter = SyncLimiter(rclient)
    limiter.reserve(bucket, BucketLimits(600, 60_000, 5.0), [200, 200])
    shrunk = limiter.reserve(bucket, BucketLimits(600, 60_000, 1.0), [700])
    assert shrunk.waits[0] == pytest.approx(0.1, abs=0.03)
    assert limiter.set_window(bucket, BucketLimits(600, 60_000, 5.0), 1.0) == 1.0  # then stored: no second cut
    assert limiter.peek(bucket, BucketLimits(600, 60_000, 1.0)).tokens == pytest.approx(-100, abs=30)


def test_a_worker_in_slow_start_does_not_refill_the_bucket_at_its_guessed_limits(
    rclient: redis.Redis, bucket: str
) -> None:
    # One worker knows the server's 600 RPM / 60k TPM and is 2,000 tokens in debt; another still
    # guesses 100x that (slow start). Its grant must not refill the shared levels at 100x the rate.
    limiter = SyncLimiter(rclient)
    known = BucketLimits(600, 60_000, 1.0)
    limiter.reserve(bucket, known, [1000, 1000, 1000])  # 2,000 tokens owed (2 s of refill)
    time.sleep(0.05)
    assert limiter.reserve(bucket, BucketLimits(60_000, 6_000_000, 1.0, slow_start=True), [10]).granted == 1
    # 50 ms at the real 1,000 tokens/s: about -1,960 now (at the guessed rate it was full again).
    assert limiter.peek(bucket, known).tokens == pytest.approx(-1960, abs=40)


def test_a_worker_in_slow_start_takes_the_limits_another_worker_heard_announced(redis_url: str) -> None:
    """Slow start ends in each worker when the server announces the limits to it. A second worker
    whose first request had not gone yet waited for credits that only answers to slow-start
    requests bring, while the first worker, out of slow start, sent on without them: its jobs
    waited 10 s (the stale-credit timeout) while the first spent the server's opening allowance
    (issue 11, 60 s window, 2 workers). Now it takes the limits the other heard within a fraction
    of a second, with the shared bucket's share, and its gate follows while its jobs wait."""
    async def scenario() -> BucketLimits:
        client = aioredis.Redis.from_url(redis_url)
        settings = load_settings({"RATEQUEUE_REDIS_URL": redis_url})
        spec = load_model_table_from().get(MODEL)
        account = uuid.uuid4().hex[:12]
        pair, key = f"{account}:{MODEL}", bucket_key(account, MODEL)
        first, second = Learned(settings, client), Learned(settings, client)
        await first.load(pair)
        await second.load(pair)  # both start before anything is known: slow start
        gate = BucketGate(Limiter(client), key, second.limits(pair, spec))
        # The first worker's first answer: the server announces the configured limits; the shared
        # bucket takes its remaining (the opening: share 0.5).
        announced = RateLimitHeaders(limit_requests=spec.rpm, limit_tokens=spec.tpm,
                                     remaining_requests=spec.rpm - 1, remaining_tokens=spec.tpm - 100)
        first_gate = BucketGate(Limiter(client), key, first.limits(pair, spec))
        first.learn_limits(pair, spec, announced, first_gate)
        await asyncio.sleep(0.3)
        await second.load(pair)  # before the shared bucket took that answer: still slow start
        assert second.limits(pair, spec).slow_start
        # The first worker's flush: the bucket takes the answer, and the first worker follows it.
        levels = await Limiter(client).reconcile(key, first.limits(pair, spec), remaining_tokens=spec.tpm - 100)
        first.follow_share(pair, spec, first_gate, levels.share)
        await asyncio.sleep(0.3)
        await second.load(pair)  # the second worker's next pass
        loaded = second.limits(pair, spec)
        assert not loaded.slow_start and loaded.share == pytest.approx(0.5)
        # Its jobs already waiting on the gate (no pass to come): the gate follows too.
        watching = asyncio.ensure_future(second.await_announcement(pair, spec, gate))
        await asyncio.sleep(0.3)
        watching.cancel()
        await client.aclose()
        return gate.limits

    assert not asyncio.run(scenario()).slow_start
