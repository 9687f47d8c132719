"""Per-process gates in front of the shared limiter: many coroutines wait on one bucket without
polling storms.

A `BucketGate` queues its waiters first come, first served and runs one pump coroutine: the pump
reserves up to `max_batch` queued costs in one Lua call, releases each granted waiter exactly at its
send time, and after a refusal sleeps `retry_in` (at least ~`min_interval`, randomised so that the
gates of several processes share the refill fairly) before asking again. So a process makes at most
one Redis call per bucket per `retry_in`, whatever the number of waiters; the pump exits when idle.

A waiter given up before its grant (timeout or cancellation) is charged nothing; one given up after
its grant but before its send time is refunded. Redis failures are logged and retried with backoff
(tenacity: exponential, jittered, capped); waiters keep waiting until their own timeout.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

from tenacity import AsyncRetrying, RetryCallState, wait_exponential, wait_random_exponential

from ratequeue.errors import RatequeueError
from ratequeue.worker.limiter import BucketLimits, Limiter, LimiterError, ReserveResult, check_cost
from ratequeue.worker.refunds import Refunds

__all__ = ["BucketGate", "CapacityTimeout", "GateRegistry", "Grant"]

log = logging.getLogger(__name__)

_BACKOFF_MIN = 0.05  # seconds; first retry after a Redis error
_BACKOFF_MAX = 2.0
# Reservations: 0.05 s doubling up to 2 s, each drawn from [half, all] of that: half fixed (Redis
# is not asked again at once), half random (the gates of many processes do not retry in step).
_RESERVE_WAIT = wait_exponential(multiplier=_BACKOFF_MIN / 2, max=_BACKOFF_MAX / 2) + wait_random_exponential(
    multiplier=_BACKOFF_MIN / 2, max=_BACKOFF_MAX / 2
)


class CapacityTimeout(RatequeueError):
    """No capacity was granted within the caller's timeout; nothing was charged.

    `retry_in` is an estimate, in seconds, of when asking again may succeed.
    """

    def __init__(self, timeout: float | None, retry_in: float) -> None:
        super().__init__(f"no rate-limit capacity within {timeout}s; retry in about {retry_in:.3f}s")
        self.timeout = timeout
        self.retry_in = retry_in


@dataclass(frozen=True)
class Grant:
    """A granted acquire: seconds waited, and the tokens it was charged (its price when reserved)."""

    waited: float
    cost: int


@dataclass(eq=False)
class _Waiter:
    cost: int
    future: asyncio.Future[float]  # result: loop time of release
    timeout: float | None  # seconds, as asked
    deadline: float | None  # loop time
    price: Callable[[], int] | None = None  # re-read the cost when reserving
    granted: bool = False  # charged in Redis; a waiter that gives up now must be refunded
    send_at: float = 0.0  # loop time


class BucketGate:
    """FIFO access to one (account, model) bucket for the coroutines of one event loop.

    `min_interval` (seconds) is the shortest pause between two refused reservations: calling a
    little later loses nothing while the refusal is still `horizon` away from its send time.
    """

    def __init__(
        self,
        limiter: Limiter,
        key: str,
        limits: BucketLimits,
        max_batch: int = 64,
        min_interval: float = 0.05,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.limiter = limiter
        self.key = key
        self.max_batch = max_batch
        # Asking later than retry_in loses nothing while the head's send time is still ahead:
        # at most 1.5 x min_interval <= horizon after a refusal.
        self.min_interval = min(min_interval, limiter.horizon_seconds / 3)
        self._limits = limits
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: collections.deque[_Waiter] = collections.deque()  # not yet granted, FIFO
        self._releases: collections.deque[_Waiter] = collections.deque()  # granted, by send time
        self._release_timer: asyncio.TimerHandle | None = None
        self._pump_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._next_attempt = 0.0  # loop time of the pump's next reservation
        self._refunds = Refunds(limiter, key, lambda: self._limits)

    @property
    def limits(self) -> BucketLimits:
        """The limits used for the next reservation."""
        return self._limits

    @property
    def pending(self) -> int:
        """Waiters not yet granted (queued or in flight)."""
        return sum(1 for w in self._queue if not w.future.done())

    def update_limits(self, limits: BucketLimits) -> None:
        """Use `limits` from the next reservation on (configuration change or learned limits)."""
        self._limits = limits
        self._wake.set()

    async def acquire(
        self, cost: int, timeout: float | None = None, price: Callable[[], int] | None = None
    ) -> Grant:
        """Wait until a request charging `cost` tokens may be sent.

        `price`, if given, is called when the reservation is made and its result charged instead
        of `cost`: a waiter queued before the price changed (a charge rule learned from the
        server) then pays the new price, not the one it was queued with.

        Raises `CapacityTimeout` if that is not within `timeout` seconds (nothing is charged),
        `RequestTooLargeError` if the cost exceeds the TPM limit, `ValueError` if negative.
        """
        check_cost(self.key, self._limits, cost)
        loop = self._bind_loop()
        start = loop.time()
        deadline = None if timeout is None else start + timeout
        waiter = _Waiter(cost, loop.create_future(), timeout, deadline, price)
        self._queue.append(waiter)
        if self._pump_task is None:
            self._pump_task = loop.create_task(self._pump())
        try:
            async with asyncio.timeout_at(deadline):
                released = await waiter.future
        except TimeoutError:
            retry_in = self._estimate_retry_in(waiter)  # before _abandon takes it off the queue
            self._abandon(waiter)
            raise CapacityTimeout(timeout, retry_in) from None
        except asyncio.CancelledError:
            self._abandon(waiter)
            raise
        return Grant(released - start, waiter.cost)

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("a BucketGate serves one event loop; use one GateRegistry per loop")
        return loop

    def _abandon(self, waiter: _Waiter) -> None:
        """The waiter gave up: refund its charge if it had one, let the pump skip it otherwise."""
        if waiter.future.done() and not waiter.future.cancelled():
            waiter.future.exception()  # mark retrieved: released or refused in the same instant
        if waiter.granted:
            self._refunds.add(waiter.cost)
            return
        was_head = False
        while self._queue and self._queue[0].future.done():
            was_head |= self._queue.popleft() is waiter
        if was_head:
            # The pump may be sleeping on this waiter's retry_in; the next one may fit sooner.
            self._wake.set()

    def _estimate_retry_in(self, waiter: _Waiter) -> float:
        """Seconds until the pump's next try, or until the queue up to `waiter` could drain."""
        tokens, requests = 0, 0
        for w in self._queue:
            if w is waiter or not w.future.done():
                tokens += w.cost
                requests += 1
            if w is waiter:
                break
        else:
            tokens, requests = waiter.cost, 1
        limits = self._limits
        pump_in = self._next_attempt - asyncio.get_running_loop().time()
        return max(pump_in, tokens / limits.token_rate, requests / limits.request_rate, 0.0)

    # -- the pump ---------------------------------------------------------------------------

    async def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while reserved := await self._reserve_next():
                batch, result = reserved
                received = loop.time()  # after Redis's now: releasing from here is never early
                for waiter, wait in zip(batch, result.waits, strict=False):
                    self._grant(waiter, received + wait)
                self._requeue(batch[result.granted :])
                if result.retry_in is not None:
                    # Random pacing: gates of other processes that wake in a fixed order would
                    # otherwise always find the refill taken by the same one.
                    await self._sleep(max(result.retry_in, self.min_interval * random.uniform(0.5, 1.5)))
        finally:
            self._pump_task = None

    async def _reserve_next(self) -> tuple[list[_Waiter], ReserveResult] | None:
        """Reserve for the next batch of waiters; None once none is left.

        Redis down or restarting: the batch goes back to the queue and the reservation is retried
        with backoff for as long as waiters are left (each gives up at its own timeout). Each
        attempt takes a fresh batch: waiters that gave up meanwhile are skipped, new ones joined.
        The backoff sleep is the pump's own, so new limits or a head giving up cut it short.
        """
        retrying = AsyncRetrying(wait=_RESERVE_WAIT, sleep=self._sleep, before_sleep=self._log_reserve_failure,
                                 reraise=True)  # stop_never: the waiters' timeouts bound the wait
        async for attempt in retrying:
            with attempt:
                batch = self._take_batch()
                if not batch:
                    return None
                self._next_attempt = asyncio.get_running_loop().time()
                try:
                    return batch, await self.limiter.reserve(self.key, self._limits, [w.cost for w in batch])
                except BaseException:  # Redis failed, or the pump is cancelled: keep the waiters
                    self._requeue(batch)
                    raise
        raise AssertionError("unreachable: AsyncRetrying retries for ever or raises")

    def _log_reserve_failure(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        delay = state.next_action.sleep if state.next_action is not None else 0.0
        log.warning(
            "reserve on %s failed (%s); retrying in %.2fs", self.key, exc, delay,
            exc_info=exc if not isinstance(exc, LimiterError) else None,  # anything else is a bug: show it
        )

    def _take_batch(self) -> list[_Waiter]:
        batch: list[_Waiter] = []
        while self._queue and len(batch) < self.max_batch:
            waiter = self._queue.popleft()
            if waiter.future.done():
                continue
            try:
                if waiter.price is not None:
                    waiter.cost = waiter.price()
                check_cost(self.key, self._limits, waiter.cost)  # limits may have been lowered since
            except RatequeueError as exc:
                waiter.future.set_exception(exc)
                continue
            batch.append(waiter)
        return batch

    def _requeue(self, waiters: list[_Waiter]) -> None:
        self._queue.extendleft(reversed([w for w in waiters if not w.future.done()]))

    async def _sleep(self, delay: float) -> None:
        """Sleep `delay` seconds; a wake-up (head gave up, new limits) cuts it to `min_interval`."""
        self._next_attempt = asyncio.get_running_loop().time() + delay
        self._wake.clear()
        await asyncio.sleep(min(delay, self.min_interval))
        if delay > self.min_interval and not self._wake.is_set():
            try:
                async with asyncio.timeout(delay - self.min_interval):
                    await self._wake.wait()
            except TimeoutError:
                pass

    # -- releasing granted waiters ------------------------------------------------------------

    def _grant(self, waiter: _Waiter, send_at: float) -> None:
        if waiter.future.done():  # gave up while its reservation was in flight
            self._refunds.add(waiter.cost)
            return
        now = asyncio.get_running_loop().time()
        if waiter.deadline is not None and send_at > waiter.deadline:
            # Would be sent after its deadline: give the capacity back and tell the caller now.
            self._refunds.add(waiter.cost)
            waiter.future.set_exception(CapacityTimeout(waiter.timeout, send_at - now))
            return
        if self._releases:  # FIFO even if limits changed between two reservations
            send_at = max(send_at, self._releases[-1].send_at)
        waiter.granted = True
        waiter.send_at = send_at
        self._releases.append(waiter)
        if self._release_timer is None:
            self._release_timer = asyncio.get_running_loop().call_at(send_at, self._release_due)

    def _release_due(self) -> None:
        # One timer for all granted waiters, released in grant order (timer heaps do not keep ties).
        loop = asyncio.get_running_loop()
        self._release_timer = None
        now = loop.time()
        while self._releases and self._releases[0].send_at <= now:
            waiter = self._releases.popleft()
            if not waiter.future.done():
                waiter.future.set_result(now)
        if self._releases:
            self._release_timer = loop.call_at(self._releases[0].send_at, self._release_due)


class GateRegistry:
    """The gates of one process and event loop, one per bucket key."""

    def __init__(self, limiter: Limiter, max_batch: int = 64, min_interval: float = 0.05) -> None:
        self.limiter = limiter
        self.max_batch = max_batch
        self.min_interval = min_interval
        self._gates: dict[str, BucketGate] = {}

    def get(self, key: str, limits: BucketLimits) -> BucketGate:
        """The gate of `key`, created on first use; `limits` replace the gate's if they differ."""
        gate = self._gates.get(key)
        if gate is None:
            gate = BucketGate(self.limiter, key, limits, self.max_batch, self.min_interval)
            self._gates[key] = gate
        elif gate.limits != limits:
            gate.update_limits(limits)
        return gate
