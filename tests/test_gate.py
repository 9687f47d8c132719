"""`BucketGate` and `GateRegistry` against the real Redis: FIFO at the configured rate with few
Redis calls, timeouts and cancellations that charge nothing, fairness between processes, and a
pump that survives Redis being unreachable.

Rates are checked on the schedule Redis granted (its clock, `ReserveResult.send_at_us`), and each
release against that schedule (never early): a loaded machine releases late and in bunches, which
says nothing about the limiter. Waiting for background work polls (`async_wait_until`)."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import pytest
import redis
import redis.asyncio

from ratequeue.errors import RequestTooLargeError
from ratequeue.jobstore.keys import bucket_key
from ratequeue.worker.gate import BucketGate, CapacityTimeout, GateRegistry
from ratequeue.worker.limiter import BucketLimits, Limiter, ReserveResult
from tests.conftest import REDIS_URL, TEST_DB, TEST_REDIS_PORT, async_wait_until

FAST = BucketLimits(rpm=12000, tpm=10_000_000, burst_seconds=0.5)  # 200 req/s, capacity 100
TOKENS = BucketLimits(rpm=60000, tpm=60000, burst_seconds=1.0)  # 1000 tokens/s, capacity 1000

pytestmark = pytest.mark.timeout(30)
T = TypeVar("T")


class CountingLimiter(Limiter):
    """A real limiter that counts its reserve calls (what the gate must keep small) and records
    what it granted: send times on Redis's clock, and on the loop's clock no later than the gate's
    own (taken when the answer arrives, before the gate takes its)."""

    calls = 0

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.sends_us: list[int] = []  # Redis clock, in grant order
        self.earliest_release: list[float] = []  # loop clock, in grant order
        self.results: list[ReserveResult] = []

    async def reserve(self, key: str, limits: BucketLimits, costs: Sequence[int]) -> ReserveResult:
        self.calls += 1
        result = await super().reserve(key, limits, costs)
        received = asyncio.get_running_loop().time()
        self.results.append(result)
        self.sends_us.extend(result.send_at_us(i) for i in range(result.granted))
        self.earliest_release.extend(received + wait for wait in result.waits[: result.granted])
        return result


@pytest.fixture
def key(redis_url: str) -> str:
    """A bucket key in the fixtures' clean database."""
    return bucket_key(uuid.uuid4().hex[:12], "gpt-gate")


def refund_flushed(gate: BucketGate) -> bool:
    """The gate's background refund has been sent (or there was none)."""
    return gate._refunds.idle


def run(main: Callable[[CountingLimiter], Awaitable[T]], horizon: float = 2.0, url: str = REDIS_URL) -> T:
    """Run `main(limiter)` in a fresh event loop with its own Redis client."""

    async def wrapper() -> T:
        client = redis.asyncio.Redis.from_url(url, socket_connect_timeout=0.5)
        try:
            return await main(CountingLimiter(client, horizon_seconds=horizon))
        finally:
            await client.aclose()

    return asyncio.run(wrapper())


def worst_window(times: list[float], window: float) -> int:
    return max(bisect.bisect_right(times, t + window) - i for i, t in enumerate(times))


def test_500_waiters_fifo_at_rate_with_few_redis_calls(key: str) -> None:
    async def main(limiter: CountingLimiter) -> tuple[list[int], list[float], float]:
        gate = GateRegistry(limiter).get(key, FAST)
        order: list[int] = []
        released: list[float] = []

        async def one(i: int) -> None:
            await gate.acquire(10)
            order.append(i)
            released.append(time.monotonic())

        start = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(500)))
        assert gate._pump_task is None  # the pump exits when idle
        return order, released, start

    limiters: list[CountingLimiter] = []

    async def counted(limiter: CountingLimiter) -> tuple[list[int], list[float], float]:
        limiters.append(limiter)
        return await main(limiter)

    order, released, start = run(counted, horizon=0.5)
    [limiter] = limiters
    assert order == list(range(500))  # first come, first served
    # 100 at once, then 200/s on Redis's schedule: the last goes 2 s after the first.
    sends = [t / 1e6 for t in limiter.sends_us]
    assert len(sends) == 500
    assert sends[-1] - sends[0] >= 1.995
    for w in (0.05, 0.1, 0.25, 0.5, 1.0):
        assert worst_window(sends, w) <= FAST.request_capacity + FAST.request_rate * w + 1
    # Each waiter is released at its send time, never before (FIFO: the i-th grant is waiter i),
    # and not much later: a generous bound that a machine busy with other tests still meets.
    assert all(r >= e for r, e in zip(released, limiter.earliest_release, strict=True))
    assert released[-1] - start <= 5.0
    assert limiter.calls <= 60, limiter.calls  # vs 500 waiters: batched, and paced by retry_in


def test_timeout_before_grant_raises_and_charges_nothing(key: str) -> None:
    async def main(limiter: CountingLimiter) -> None:
        await limiter.set_not_before(key, 5.0)  # a 429 said: nothing for 5 s
        gate = BucketGate(limiter, key, TOKENS)
        start = time.monotonic()
        tries = [gate.acquire(100, timeout=0.3) for _ in range(20)]
        results = await asyncio.gather(*tries, return_exceptions=True)
        elapsed = time.monotonic() - start
        assert all(isinstance(r, CapacityTimeout) for r in results), results
        assert 0.3 <= elapsed < 3.0  # at their own timeout, long before the 5 s of the 429
        first = results[0]
        assert isinstance(first, CapacityTimeout)
        assert 3.0 < first.retry_in < 5.0  # the pump's next try is ~4.5 s away (nb - horizon)
        levels = await limiter.peek(key, TOKENS)
        assert (levels.tokens, levels.requests) == (TOKENS.token_capacity, TOKENS.request_capacity)
        assert gate.pending == 0
        assert limiter.calls <= 2  # one refusal (+ one retry if the head's timeout woke the pump)

    run(main, horizon=0.5)


def test_cancel_after_grant_refunds(key: str) -> None:
    async def main(limiter: CountingLimiter) -> None:
        # 3000 tokens of debt: the next 500 are granted for +3.5 s, time enough to cancel before.
        drained = await limiter.reserve(key, TOKENS, [1000, 1000, 1000, 1000])
        gate = BucketGate(limiter, key, TOKENS)
        task = asyncio.create_task(gate.acquire(500))
        await async_wait_until(lambda: limiter.sends_us[4:], 3, "the grant")
        assert gate.pending == 0 and not task.done()  # granted, waiting for its send time
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await async_wait_until(lambda: refund_flushed(gate), 5, "the refund")  # sent in the background
        levels = await limiter.peek(key, TOKENS)
        refill = TOKENS.token_rate * (levels.now_us - drained.now_us) / 1e6
        assert levels.tokens == pytest.approx(refill - 3000, abs=5)  # as if the 500 had never been reserved

    run(main, horizon=5.0)


def test_grant_past_deadline_fails_at_once_and_refunds(key: str) -> None:
    async def main(limiter: CountingLimiter) -> None:
        drained = await limiter.reserve(key, TOKENS, [1000] * 5)  # 4000 tokens of debt
        gate = BucketGate(limiter, key, TOKENS)
        start = time.monotonic()
        with pytest.raises(CapacityTimeout) as info:
            await gate.acquire(500, timeout=3.0)  # granted for +4.5 s: beyond the deadline
        assert time.monotonic() - start < 2.0  # told at the grant, not when the timeout runs out
        [grant] = limiter.results[1:]
        assert info.value.retry_in == pytest.approx(grant.waits[0], abs=0.05)  # the send time
        assert 4.0 < info.value.retry_in <= 4.5
        await async_wait_until(lambda: refund_flushed(gate), 5, "the refund")
        levels = await limiter.peek(key, TOKENS)
        refill = TOKENS.token_rate * (levels.now_us - drained.now_us) / 1e6
        assert levels.tokens == pytest.approx(refill - 4000, abs=5)

    run(main, horizon=10.0)


def test_too_large_and_lowered_limits(key: str) -> None:
    async def main(limiter: CountingLimiter) -> None:
        gate = GateRegistry(limiter).get(key, TOKENS)
        with pytest.raises(RequestTooLargeError):
            await gate.acquire(60001)
        await limiter.set_not_before(key, 3.0)
        task = asyncio.create_task(gate.acquire(500))
        small = asyncio.create_task(gate.acquire(10))
        # refused: nb is 3 s away, the horizon 0.1 s
        await async_wait_until(lambda: limiter.calls >= 1 and gate.pending == 2, 2, "the refusal")
        gate.update_limits(BucketLimits(rpm=60000, tpm=300, burst_seconds=1))  # learned: 300 TPM
        with pytest.raises(RequestTooLargeError):
            await asyncio.wait_for(task, 2.0)  # the pump is woken; no need to wait for nb
        assert (await small).waited >= 2.9

    run(main, horizon=0.1)


def test_a_waiter_pays_the_price_current_when_its_reservation_is_made(key: str) -> None:
    # A charge rule learned while jobs queue must reach the jobs already queued: each is charged
    # what `price` says when the pump reserves for it, not what it cost when it joined the queue.
    async def main(limiter: CountingLimiter) -> None:
        gate = GateRegistry(limiter).get(key, TOKENS)
        await limiter.set_not_before(key, 1.0)
        price = {"now": 100}
        waiters = [asyncio.create_task(gate.acquire(100, price=lambda: price["now"])) for _ in range(3)]
        await async_wait_until(lambda: limiter.calls >= 1 and gate.pending == 3, 0.8, "the refusal")
        price["now"] = 180  # learned while they wait
        grants = await asyncio.wait_for(asyncio.gather(*waiters), 10)
        assert [g.cost for g in grants] == [180, 180, 180]
        levels = await limiter.peek(key, TOKENS)
        # full (1000) less 3 x 180, plus the refill since their send time (the bucket is charged
        # from then on: nothing may be sent before the 429's not-before); the old price gives 700
        refill = TOKENS.token_rate * max(0, levels.now_us - limiter.sends_us[0]) / 1e6
        assert levels.tokens == pytest.approx(min(1000, 1000 - 3 * 180 + refill), abs=1)

    run(main, horizon=0.1)


def test_registry_returns_one_gate_per_key_and_updates_limits(key: str) -> None:
    async def main(limiter: CountingLimiter) -> None:
        registry = GateRegistry(limiter)
        gate = registry.get(key, TOKENS)
        assert registry.get(key, TOKENS) is gate
        assert registry.get(key, FAST) is gate
        assert gate.limits == FAST
        assert registry.get(key + "x", FAST) is not gate

    run(main)


def test_two_processes_share_the_bucket_fairly(key: str) -> None:
    limits = BucketLimits(rpm=12000, tpm=10_000_000, burst_seconds=0.1)  # 200/s, capacity 20
    barrier = threading.Barrier(2)
    released: dict[str, list[float]] = {"a": [], "b": []}
    scheduled: dict[str, list[float]] = {}  # send times on Redis's clock, seconds
    earliest: dict[str, list[float]] = {}  # the same on each loop's clock (= time.monotonic)

    def process(name: str) -> None:
        async def main(limiter: CountingLimiter) -> None:
            # Fairness is statistical (pumps wake at random intervals and find whatever refilled
            # since the last call); a shorter interval gives more draws in a short test.
            gate = GateRegistry(limiter, min_interval=0.02).get(key, limits)

            async def one() -> None:
                await gate.acquire(10)
                released[name].append(time.monotonic())

            await asyncio.gather(*(one() for _ in range(300)))
            scheduled[name] = [t / 1e6 for t in limiter.sends_us]
            earliest[name] = limiter.earliest_release

        barrier.wait()
        run(main, horizon=0.25)

    threads = [threading.Thread(target=process, args=(n,)) for n in released]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert len(released["a"]) == len(released["b"]) == 300
    for name, times in released.items():
        assert all(r >= e for r, e in zip(times, earliest[name], strict=True))  # never early
    # On Redis's schedule (the threads' releases lag it by whatever the GIL and the machine add):
    # the first to ask is first served up to capacity + one horizon (20 + 50 grants, sent within
    # ~0.3 s); from then on, while both still have waiters, the refill must be shared about evenly.
    a, b = scheduled["a"], scheduled["b"]
    settled, both_busy_until = min(a[0], b[0]) + 0.5, min(a[-1], b[-1])
    share_a = sum(settled <= t <= both_busy_until for t in a)
    share_b = sum(settled <= t <= both_busy_until for t in b)
    assert min(share_a, share_b) / max(share_a, share_b) > 0.7, (share_a, share_b)
    merged = sorted(a + b)
    for w in (0.1, 0.5, 1.0):
        assert worst_window(merged, w) <= limits.request_capacity + limits.request_rate * w + 1
    assert 2.895 <= merged[-1] - merged[0] <= 5.0  # 600 at 200/s after a burst of 20; late pumps add


def test_pump_survives_redis_outage(key: str, caplog: pytest.LogCaptureFixture) -> None:
    """Redis is unreachable when the waiters arrive and comes back 0.6 s later (through a proxy)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def relay(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", TEST_REDIS_PORT)
        # Swallow the loop teardown's cancellation: Python 3.11's start_server logs it as an error.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(pipe(client_r, server_w), pipe(server_r, client_w), return_exceptions=True)

    slow = BucketLimits(rpm=600, tpm=10_000_000, burst_seconds=10)  # 100 requests, refill 10/s

    async def main(limiter: CountingLimiter) -> None:
        gate = BucketGate(limiter, key, slow)
        start = time.monotonic()
        waiters = [asyncio.create_task(gate.acquire(10, timeout=10)) for _ in range(50)]
        impatient = asyncio.create_task(gate.acquire(10, timeout=0.2))
        await asyncio.sleep(0.6)
        assert not any(w.done() for w in waiters)
        server = await asyncio.start_server(relay, "127.0.0.1", port)
        try:
            waited = await asyncio.gather(*waiters)
            assert all(g.waited >= 0.6 for g in waited)
            # Retries 0.05 s apart, doubling: the one after Redis is back comes within ~1.6 s.
            assert time.monotonic() - start < 5.0
            with pytest.raises(CapacityTimeout):
                await impatient
            levels = await limiter.peek(key, slow)
            assert levels.requests == pytest.approx(slow.request_capacity - 50, abs=0.5)  # not 51
        finally:
            server.close()

    with caplog.at_level(logging.WARNING, logger="ratequeue.worker.gate"):
        run(main, url=f"redis://127.0.0.1:{port}/{TEST_DB}")
    assert any("reserve on" in rec.message for rec in caplog.records)


def test_gate_refuses_a_second_event_loop(key: str) -> None:
    gates: list[BucketGate] = []

    async def first(limiter: CountingLimiter) -> None:
        gates.append(BucketGate(limiter, key, FAST))
        await gates[0].acquire(1)

    async def second(limiter: CountingLimiter) -> None:
        with pytest.raises(RuntimeError, match="one event loop"):
            await gates[0].acquire(1)

    run(first)
    run(second)
