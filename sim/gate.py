"""A self-hosted server's capacity: so many requests in service at once, a bounded FIFO queue behind them,
and a refusal beyond (Ollama's ``OLLAMA_NUM_PARALLEL`` / ``OLLAMA_MAX_QUEUE``; vLLM's ``--max-num-seqs``)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from ratequeue.sim.stats import Stats


class Gate:
    """Admits requests up to ``capacity()`` at once; the next ``depth()`` wait in order; more are refused.

    Both limits are read at each call, so ``POST /sim/config`` changes them for the next request.
    """

    def __init__(self, capacity: Callable[[], int], depth: Callable[[], int], stats: Stats) -> None:
        self._capacity = capacity
        self._depth = depth
        self._stats = stats
        self._waiting: deque[asyncio.Future[None]] = deque()
        self.in_service = 0

    async def enter(self) -> bool:
        """Wait for a place in service; False at once when the queue is full (the caller refuses it)."""
        self._admit()  # a capacity raised since the last departure lets waiting requests in first
        if self.in_service < self._capacity() and not self._waiting:
            self.in_service += 1
            self._stats.record_load(self.in_service, 0)
            return True
        if len(self._waiting) >= self._depth():
            return False
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        self._stats.record_load(self.in_service, len(self._waiting))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.leave()  # admitted as the client went away: pass the place on
            elif future in self._waiting:
                self._waiting.remove(future)
            raise
        return True

    def leave(self) -> None:
        """A request left service: the place goes to the longest waiting one."""
        self.in_service -= 1
        self._admit()

    def _admit(self) -> None:
        while self._waiting and self.in_service < self._capacity():
            future = self._waiting.popleft()
            if future.done():  # cancelled while waiting
                continue
            self.in_service += 1
            self._stats.record_load(self.in_service, len(self._waiting))
            future.set_result(None)
