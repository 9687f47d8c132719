"""Refunds of granted reservations that will never be sent, coalesced into one Redis call.

A waiter that gives up after its grant (timeout, cancellation, a send time past its deadline) was
charged in the shared bucket; the charge goes back here. Refunds due while one is in flight are
summed and sent together. A refund that keeps failing (Redis down) is dropped after ~3 s: that only
makes us slower for a window, never over the limit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from tenacity import AsyncRetrying, RetryError, stop_after_attempt, wait_exponential

from ratequeue.worker.limiter import BucketLimits, Limiter

__all__ = ["Refunds"]

log = logging.getLogger(__name__)

# 0.1 s doubling (capped at 2 s), 6 tries in all (~3 s), then dropped.
_REFUND_WAIT = wait_exponential(multiplier=0.1, max=2.0)
_REFUND_ATTEMPTS = 6


class Refunds:
    """The refunds of one bucket of one event loop; `limits` gives the bucket's limits in force."""

    def __init__(self, limiter: Limiter, key: str, limits: Callable[[], BucketLimits]) -> None:
        self.limiter = limiter
        self.key = key
        self._limits = limits
        self._tokens = 0
        self._requests = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def idle(self) -> bool:
        """No refund is due or in flight."""
        return self._task is None and self._requests == 0

    def add(self, cost: int) -> None:
        """Give back one granted request of `cost` tokens (sent soon, with any others due)."""
        self._tokens += cost
        self._requests += 1
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        try:
            while self._requests:
                try:
                    async for attempt in AsyncRetrying(wait=_REFUND_WAIT, stop=stop_after_attempt(_REFUND_ATTEMPTS)):
                        with attempt:
                            await self._send()
                except RetryError as exc:
                    log.warning("dropping refund of %d tokens on %s: %s", self._tokens, self.key,
                                exc.last_attempt.exception())
                    self._tokens = self._requests = 0
        finally:
            self._task = None

    async def _send(self) -> None:
        """Send the refunds due so far in one call; on failure they stay due (with any new ones)."""
        tokens, requests = self._tokens, self._requests
        self._tokens = self._requests = 0
        try:
            await self.limiter.reconcile(self.key, self._limits(), tokens, requests)
        except BaseException:
            self._tokens += tokens
            self._requests += requests
            raise
