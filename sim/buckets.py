"""Continuously refilling buckets, charged at arrival, as OpenAI enforces RPM and TPM."""

from __future__ import annotations

import math

from ratequeue.sim.config import ModelLimits


class Bucket:
    """A bucket of ``capacity = limit * burst_seconds / 60`` refilling at ``limit / 60`` per second.

    Times are ``time.monotonic()`` seconds passed in by the caller, so one request sees one instant.
    """

    __slots__ = ("capacity", "level", "limit", "rate", "stamp")

    def __init__(self, limit: int, burst_seconds: float, now: float) -> None:
        self.limit = limit
        self.rate = limit / 60.0
        self.capacity = limit * burst_seconds / 60.0
        self.level = self.capacity
        self.stamp = now

    def refill(self, now: float) -> None:
        """Add what flowed in since the last call."""
        if now > self.stamp:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, amount: float, borrow: bool = False) -> bool:
        """Debit ``amount`` if the bucket holds it; True when debited.

        With ``borrow``, an amount larger than the whole bucket passes once the bucket is full and leaves
        it in debt (a short enforcement window, as Azure's 1 s / 10 s, would otherwise refuse it forever).
        """
        if self.level < amount and not (borrow and amount > self.capacity and self.level >= self.capacity):
            return False
        self.level -= amount
        return True

    def wait_for(self, amount: float, borrow: bool = False) -> float:
        """Seconds until ``take(amount, borrow)`` can pass (0 when it already can)."""
        if borrow:
            amount = min(amount, self.capacity)
        return max(0.0, (amount - self.level) / self.rate)

    @property
    def remaining(self) -> int:
        """Whole units left, never below 0 (the ``x-ratelimit-remaining-*`` value)."""
        return max(0, math.floor(self.level))

    @property
    def used(self) -> int:
        """Units missing from a full bucket (the "Used N" of a 429 message)."""
        return max(0, math.ceil(self.capacity - self.level - 1e-9))

    @property
    def reset_seconds(self) -> float:
        """Seconds until the bucket is full again (the ``x-ratelimit-reset-*`` value)."""
        return max(0.0, (self.capacity - self.level) / self.rate)

    def fill(self, now: float) -> None:
        """Refill completely (used by ``/sim/reset``)."""
        self.level = self.capacity
        self.stamp = now

    def reconfigure(self, limit: int, burst_seconds: float, now: float) -> None:
        """Change the limit keeping what was used: 29,000 used of 30,000 leaves 31,000 of 60,000."""
        self.refill(now)
        used = self.capacity - self.level
        self.limit = limit
        self.rate = limit / 60.0
        self.capacity = limit * burst_seconds / 60.0
        self.level = max(0.0, self.capacity - used)


class ModelBuckets:
    """The request and token buckets of one model."""

    __slots__ = ("limits", "requests", "tokens")

    def __init__(self, limits: ModelLimits, now: float) -> None:
        self.limits = limits
        self.requests = Bucket(limits.rpm, limits.burst_seconds, now)
        self.tokens = Bucket(limits.tpm, _token_burst(limits), now)

    def refill(self, now: float) -> None:
        """Refill both buckets up to ``now``."""
        self.requests.refill(now)
        self.tokens.refill(now)

    def fill(self, now: float) -> None:
        """Refill both buckets completely."""
        self.requests.fill(now)
        self.tokens.fill(now)

    def reconfigure(self, limits: ModelLimits, now: float) -> None:
        """Adopt new limits, keeping the amounts used."""
        self.limits = limits
        self.requests.reconfigure(limits.rpm, limits.burst_seconds, now)
        self.tokens.reconfigure(limits.tpm, _token_burst(limits), now)


def _token_burst(limits: ModelLimits) -> float:
    """The token bucket's window: its own when set (an Azure option), else the model's."""
    return limits.token_burst_seconds if limits.token_burst_seconds is not None else limits.burst_seconds
