"""The Python limiter wrappers (`Limiter`, `SyncLimiter`) against the real Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio

from ratequeue.errors import ConfigError, RequestTooLargeError
from ratequeue.jobstore.keys import bucket_key
from ratequeue.worker.limiter import BucketLevels, BucketLimits, Limiter, LimiterError, ReserveResult, SyncLimiter
from tests.conftest import REDIS_URL

LIMITS = BucketLimits(rpm=6000, tpm=60000, burst_seconds=1.0)  # 100 requests, 1000 tokens; per second

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    """A client of the fixtures' clean database (REDIS_URL is the same, for the async client)."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def key(r: redis.Redis) -> Iterator[str]:
    k = bucket_key(uuid.uuid4().hex[:12], "gpt-test")
    yield k
    r.delete(k)


def test_bucket_limits_derived_values() -> None:
    limits = BucketLimits(rpm=3000, tpm=90000, burst_seconds=2)
    assert (limits.request_rate, limits.token_rate) == (50, 1500)
    assert (limits.request_capacity, limits.token_capacity) == (100, 3000)
    for bad in ({"rpm": 0}, {"tpm": -1}, {"burst_seconds": float("nan")}):
        with pytest.raises(ConfigError):
            BucketLimits(**{"rpm": 1, "tpm": 1, "burst_seconds": 1, **bad})


def test_reserve_result_in_seconds(r: redis.Redis, key: str) -> None:
    limiter = SyncLimiter(r, horizon_seconds=0.3)
    res = limiter.reserve(key, LIMITS, [600, 300, 500, 100])
    assert isinstance(res, ReserveResult)
    assert res.waits == [0.0, 0.0]
    assert res.granted == 2
    assert res.retry_in == pytest.approx(0.1, abs=1e-5)
    res2 = limiter.reserve(key, LIMITS, [50])
    assert res2.retry_in is None
    assert res2.send_at_us(0) == res2.now_us


def test_too_large_raises_without_calling_redis() -> None:
    # Nothing listens on port 1: any Redis call would raise LimiterError instead.
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    limiter = SyncLimiter(dead)
    key = bucket_key("acct00000000", "gpt-4o-mini")
    with pytest.raises(RequestTooLargeError) as info:
        limiter.reserve(key, LIMITS, [10, 60001])
    assert info.value.charge == 60001
    assert info.value.tpm == 60000
    assert "gpt-4o-mini" in str(info.value)
    with pytest.raises(ValueError):
        limiter.reserve(key, LIMITS, [])
    with pytest.raises(ValueError):
        limiter.reserve(key, LIMITS, [-5])


def test_redis_unreachable_is_limiter_error() -> None:
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=None)
    with pytest.raises(LimiterError) as info:
        SyncLimiter(dead).peek(bucket_key("a", "m"), LIMITS)
    assert isinstance(info.value.__cause__, redis.ConnectionError)


def test_fractional_cost_is_rounded_up(r: redis.Redis, key: str) -> None:
    limiter = SyncLimiter(r)
    limiter.reserve(key, LIMITS, [0.2])  # type: ignore[list-item]
    assert float(r.hget(key, "tl")) == 999


def test_reconcile_and_peek_return_levels(r: redis.Redis, key: str) -> None:
    limiter = SyncLimiter(r)
    reserved = limiter.reserve(key, LIMITS, [800])
    levels = limiter.reconcile(key, LIMITS, token_delta=-100, request_delta=0, remaining_requests=42)
    assert isinstance(levels, BucketLevels)
    refill = 1000 * (levels.now_us - reserved.now_us) / 1e6  # on Redis's clock: however slow the machine
    assert levels.tokens == pytest.approx(min(1000, 1000 - 800 - 100 + refill), abs=1e-3)
    assert levels.requests == pytest.approx(0.4 * 42)  # 40% of the server's remaining (reconcile.lua's claim)
    assert (levels.request_capacity, levels.token_capacity) == (100, 1000)
    peeked = limiter.peek(key, LIMITS)
    assert peeked.tokens == pytest.approx(levels.tokens + 1000 * (peeked.now_us - levels.now_us) / 1e6)
    with pytest.raises(ValueError):
        limiter.reconcile(key, LIMITS, remaining_tokens=-1)


def test_set_not_before(r: redis.Redis, key: str) -> None:
    limiter = SyncLimiter(r, horizon_seconds=0.1)
    seconds, micros = r.time()
    before_us = seconds * 1_000_000 + micros
    limiter.set_not_before(key, 0.5)
    levels = limiter.peek(key, LIMITS)
    # 0.5 s after Redis's clock when it was set (ms resolution): between our two readings of it.
    not_before_us = levels.not_before_ms * 1000
    assert before_us + 500_000 - 1000 <= not_before_us <= levels.now_us + 500_000
    res = limiter.reserve(key, LIMITS, [1])
    assert res.granted == 0
    assert res.retry_in == pytest.approx((not_before_us - res.now_us) / 1e6 - 0.1, abs=1e-3)
    with pytest.raises(ValueError):
        limiter.set_not_before(key, -1)


def test_script_cache_loss_and_dropped_connection_recover(r: redis.Redis, key: str) -> None:
    """What a Redis restart does to a client: its connections drop and its script cache is empty."""
    limiter = SyncLimiter(r)
    limiter.reserve(key, LIMITS, [1])
    for script in limiter._scripts.values():
        # A SHA this server has never seen answers NOSCRIPT exactly like a flushed cache would
        # (SCRIPT FLUSH itself would disturb other users of this shared Redis).
        script.sha = "0" * 40
    r.client_kill_filter(_id=r.client_id())
    res = limiter.reserve(key, LIMITS, [1])
    assert res.granted == 1
    assert float(r.hget(key, "tl")) == pytest.approx(998, abs=5)


def test_async_limiter_matches_sync(r: redis.Redis, key: str) -> None:
    sync_key = key + ":sync"

    async def run() -> list[ReserveResult]:
        client = redis.asyncio.Redis.from_url(REDIS_URL)
        try:
            limiter = Limiter(client, horizon_seconds=0.3)
            out = [await limiter.reserve(key, LIMITS, [600, 300, 500])]
            await limiter.reconcile(key, LIMITS, token_delta=50)
            await limiter.set_not_before(key, 0)
            out.append(await limiter.reserve(key, LIMITS, [1]))
            levels = await limiter.peek(key, LIMITS)
            assert levels.tokens < 200
            return out
        finally:
            await client.aclose()

    try:
        async_results = asyncio.run(run())
        limiter = SyncLimiter(r, horizon_seconds=0.3)
        sync_results = [limiter.reserve(sync_key, LIMITS, [600, 300, 500])]
        limiter.reconcile(sync_key, LIMITS, token_delta=50)
        sync_results.append(limiter.reserve(sync_key, LIMITS, [1]))
        for a, s in zip(async_results, sync_results, strict=True):
            assert a.waits == pytest.approx(s.waits, abs=0.01)
            assert (a.retry_in is None) == (s.retry_in is None)
    finally:
        r.delete(sync_key)
