"""Coalesces the bucket corrections of one process: one Lua call per bucket per interval.

Every response brings a correction (a refund for a 429, the server's prompt count, its
x-ratelimit-remaining-*). Sending each as its own Redis call cost ~13% of a worker's CPU at
1,000 calls/s; summed over 50 ms they lose nothing that matters: deltas add up, and of several
"remaining" snapshots the lowest is kept (the conservative one), and rate-limit 429s are counted.

Each flush answers with the bucket's levels and shared share of the limits (reconcile.lua: cut by
429s, given back when the server shows room); they are handed to the ``on_levels`` callback of the
bucket, so every worker follows what another client of the account leaves, within one flush of any
worker's 429, and prices its waiting work against what the bucket holds (``worker.backlog``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from ratequeue.worker.limiter import BucketLevels, BucketLimits, Limiter, SendTimes

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    limits: BucketLimits
    token_delta: int = 0
    request_delta: int = 0
    remaining_tokens: int | None = None
    remaining_requests: int | None = None
    refused: int = 0
    answered: int = 0
    charged: tuple[int, int] = (0, 0)  # requests and tokens the server charged for the answers
    on_levels: Callable[[BucketLevels], None] | None = None
    # Monotonic send times (SendTimes): of the request whose answer brought the kept (lowest)
    # remaining reading, and the sum over the requests counted in `charged` (their count: its [0]).
    reading_sent_at: float | None = None
    sent_at_sum: float = 0.0


def _lower(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def _send_times(p: _Pending, now: float) -> SendTimes:
    """``p``'s send times as ages at ``now``; the charged requests' on average (None without any)."""
    return SendTimes(None if p.reading_sent_at is None else now - p.reading_sent_at,
                     now - p.sent_at_sum / p.charged[0] if p.charged[0] else None)


class Reconciler:
    """Collects corrections with ``add`` and flushes them every ``interval`` seconds."""

    def __init__(self, limiter: Limiter, interval: float = 0.05) -> None:
        self._limiter = limiter
        self._interval = interval
        self._pending: dict[str, _Pending] = {}
        self._flusher: asyncio.Task[None] | None = None

    def add(
        self,
        key: str,
        limits: BucketLimits,
        token_delta: int = 0,
        request_delta: int = 0,
        remaining_tokens: int | None = None,
        remaining_requests: int | None = None,
        refused: int = 0,
        answered: int = 0,
        charged: tuple[int, int] = (0, 0),
        on_levels: Callable[[BucketLevels], None] | None = None,
        sent_at: float | None = None,
    ) -> None:
        """``sent_at``: monotonic time the answered request went out (None: unknown)."""
        p = self._pending.setdefault(key, _Pending(limits))
        if sent_at is not None:
            lower = (_lower(p.remaining_requests, remaining_requests) != p.remaining_requests
                     or _lower(p.remaining_tokens, remaining_tokens) != p.remaining_tokens)
            if lower:
                p.reading_sent_at = sent_at
            p.sent_at_sum += sent_at * charged[0]
        p.limits = limits
        p.refused += refused
        p.answered += answered
        p.charged = (p.charged[0] + charged[0], p.charged[1] + charged[1])
        p.on_levels = on_levels or p.on_levels
        p.token_delta += token_delta
        p.request_delta += request_delta
        p.remaining_tokens = _lower(p.remaining_tokens, remaining_tokens)
        p.remaining_requests = _lower(p.remaining_requests, remaining_requests)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(self._interval)
        await self.flush()

    async def flush(self) -> None:
        """Send every pending correction now."""
        pending, self._pending = self._pending, {}
        now = time.monotonic()
        for key, p in pending.items():
            try:
                levels = await self._limiter.reconcile(
                    key, p.limits, token_delta=p.token_delta, request_delta=p.request_delta,
                    remaining_tokens=p.remaining_tokens, remaining_requests=p.remaining_requests,
                    refused=p.refused, answered=p.answered, charged=p.charged, sent=_send_times(p, now),
                )
            except Exception as exc:  # a correction is advice: losing one to a Redis blip is fine
                log.warning("bucket correction of %s dropped: %s", key, exc)
                continue
            if p.on_levels is not None:
                p.on_levels(levels)
