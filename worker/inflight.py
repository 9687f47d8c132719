"""The worker's upstream calls in flight (``max_in_flight``), divided among the pairs with calls
waiting to be sent (issue 11: a fair share of in-flight calls).

Why: a job granted by its bucket waits here only when ``max_in_flight`` calls are out already.
First come, first served (an ``asyncio.Semaphore``), one pair whose grants come in bursts (a
full bucket, a backlog) can take every place that frees while another pair's granted calls wait
behind them, past the send time their bucket gave them.

How: while calls wait, each place that frees goes to the waiting pair with the fewest calls in
flight per unit of its rate (deficit-weighted by limit). Weighted, not round robin: a pair needs
about its rate x latency calls in flight (Little's law), so equal turns would cap a 600 RPM
model at the pace of a 120 RPM one whenever places are short; by rate, each runs at the same
fraction of its own limit. A pair's rate is the calls per second its limits allow at the
price of the call that asks (its request rate, or fewer when tokens bind).

A pair may also have a cap of its own (``set_cap``): the adaptive concurrency window of a
self-hosted server (issue 13, ``worker.concurrency``). A pair at its cap waits even while places
are free, and the places it cannot take go to the other pairs waiting.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

__all__ = ["FairInFlight"]


class FairInFlight:
    """At most ``limit`` calls in flight on one event loop, shared among pairs by rate."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self._total = 0
        self._held: dict[str, int] = {}  # pair -> calls in flight
        self._rates: dict[str, float] = {}  # pair -> calls per second its limits allow
        self._waiting: dict[str, collections.deque[asyncio.Future[None]]] = {}
        self._caps: dict[str, int] = {}  # pair -> most calls it may have in flight (its window)

    def in_flight(self, pair: str) -> int:
        """Calls of ``pair`` in flight now."""
        return self._held.get(pair, 0)

    def set_cap(self, pair: str, cap: int | None) -> None:
        """Let ``pair`` hold at most ``cap`` (>= 1) calls in flight; None: no cap of its own.
        Calls over a lowered cap finish; a raised cap lets the pair's waiting calls in at once."""
        if cap is None:
            self._caps.pop(pair, None)
        else:
            self._caps[pair] = max(1, cap)
        self._grant_next()

    def _open(self, pair: str) -> bool:
        """May ``pair`` take one more place besides the total?"""
        cap = self._caps.get(pair)
        return cap is None or self._held.get(pair, 0) < cap

    @asynccontextmanager
    async def slot(self, pair: str, rate: float) -> AsyncIterator[None]:
        """Hold one place for a call of ``pair`` (``rate``: calls per second its limits allow)
        while the block runs; waits while every place is taken."""
        await self._acquire(pair, max(rate, 1e-9))
        try:
            yield
        finally:
            self._release(pair)

    async def _acquire(self, pair: str, rate: float) -> None:
        self._rates[pair] = rate
        if self._total < self.limit and not self._waiting and self._open(pair):
            self._take(pair)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(pair, collections.deque()).append(future)
        self._grant_next()  # places left free by capped pairs' waiting calls may be this one's
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():  # granted as it was cancelled: give it back
                self._release(pair)
            raise

    def _take(self, pair: str) -> None:
        self._total += 1
        self._held[pair] = self._held.get(pair, 0) + 1

    def _release(self, pair: str) -> None:
        self._total -= 1
        self._held[pair] -= 1
        if not self._held[pair]:
            del self._held[pair]
        self._grant_next()

    def _grant_next(self) -> None:
        while self._total < self.limit and self._waiting:
            open_pairs = [p for p in self._waiting if self._open(p)]
            if not open_pairs:  # every waiting pair is at its cap
                return
            pair = min(open_pairs, key=lambda p: self._held.get(p, 0) / self._rates[p])
            queue = self._waiting[pair]
            future = queue.popleft()
            if not queue:
                del self._waiting[pair]
            if future.done():  # its caller was cancelled while waiting
                continue
            self._take(pair)
            future.set_result(None)
