"""The values the shared limiter works with: a bucket's limits, a reservation's outcome, the
levels read back, and the check that refuses a cost no bucket can ever admit."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from ratequeue.errors import ConfigError, RequestTooLargeError

# bucket_key() is ``rq:bucket:{<12 hex account>:<model>}``; the model is only wanted for messages.
_MODEL_IN_KEY = re.compile(r"\{[^:}]*:([^}]*)\}")


def window_key(bucket_key: str) -> str:
    """The window learned for a pair (set_window.lua), read by every bucket script in place of
    the configured burst; beside its bucket (same hash tag, same slot)."""
    return f"{bucket_key}:window"


def slow_start_key(bucket_key: str) -> str:
    """The hash of a pair's slow-start credits, beside its bucket (same hash tag, same slot)."""
    return f"{bucket_key}:slowstart"


@dataclass(frozen=True)
class BucketLimits:
    """Limits of one (account, model): requests and tokens per minute, and the burst size.

    `burst_seconds` is how many seconds of refill each bucket holds: OpenAI enforces its
    per-minute limits in short slices, so a full minute's budget at once would draw 429s.
    `share` (0 < share <= 1) is the part of the limits this bucket may spend: less than 1 when
    other clients of the account spend too (``worker.reconciler``) or a headroom is configured.
    `rpm` and `tpm` stay the server's limits, so a request is judged too large against the real
    TPM, not against the share. Raises `ConfigError` if any value is not positive.
    """

    rpm: float
    tpm: float
    burst_seconds: float
    # The server has not announced this pair's limits yet: grant one request, then two per
    # answer (reserve.lua's slow start), instead of spending a burst sized by a guess.
    slow_start: bool = False
    share: float = 1.0
    # The configured headroom (``max_share``) within ``share``: the rest is the shared bucket's share
    # these limits follow, which reconcile.lua needs to read the server's room in full limits.
    max_share: float = 1.0
    # The share schedules of deferred work are priced at, when not `share`: while `share` is the
    # opening's guess (worker.learned), the configured max_share.
    priced_share: float | None = None

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm", "burst_seconds", "share", "max_share"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"BucketLimits.{name} must be a positive number, got {value!r}")
        if self.share > 1:
            raise ConfigError(f"BucketLimits.share must be at most 1, got {self.share!r}")

    def priced(self) -> BucketLimits:
        """These limits at the share deferred work is priced at (``priced_share``)."""
        return self if self.priced_share is None else replace(self, share=self.priced_share, priced_share=None)

    @property
    def request_rate(self) -> float:
        """Request-bucket refill, requests per second."""
        return self.rpm * self.share / 60

    @property
    def token_rate(self) -> float:
        """Token-bucket refill, tokens per second."""
        return self.tpm * self.share / 60

    @property
    def request_capacity(self) -> float:
        """Request-bucket capacity, requests."""
        return self.request_rate * self.burst_seconds

    @property
    def token_capacity(self) -> float:
        """Token-bucket capacity, tokens."""
        return self.token_rate * self.burst_seconds


@dataclass(frozen=True)
class ReserveResult:
    """Outcome of one batch reservation.

    `now_us`: Redis's clock when the reservation was made (µs since epoch).
    `waits`: seconds each granted request must wait before it is sent, in the order asked; the
    granted requests are a prefix of the costs asked for, and are already charged.
    `retry_in`: seconds until asking again for the first refused cost can succeed; None if all
    were granted.
    """

    now_us: int
    waits: list[float]
    retry_in: float | None

    @property
    def granted(self) -> int:
        """How many of the costs asked for were granted (a prefix)."""
        return len(self.waits)

    def send_at_us(self, index: int) -> int:
        """Redis time (µs since epoch) at which granted request `index` may be sent."""
        return self.now_us + math.ceil(self.waits[index] * 1e6)


@dataclass(frozen=True)
class BucketLevels:
    """Levels of both buckets at `now_us` (Redis clock, µs since epoch).

    Levels may be negative (debt of reservations already granted). `not_before_ms` is the time
    (ms since epoch) before which nothing may be sent, 0 if none.
    """

    now_us: int
    requests: float
    tokens: float
    not_before_ms: int
    request_capacity: float
    token_capacity: float
    # The part of the limits the server's answers leave us (reconcile only; 1.0 from peek).
    share: float = 1.0
    # That share is still the opening's guess: no window has shown another client yet.
    guessed: bool = False


@dataclass(frozen=True)
class SendTimes:
    """When the requests behind a correction went out, in seconds before it is flushed (None:
    unknown): the one whose answer brought its remaining readings, and those it counts as
    charged, on average. reconcile.lua places the server's readings and our spending in time with
    them (the refill between two readings, and the refill a full room lost while we were idle)."""

    reading_age: float | None = None
    spent_age: float | None = None


NO_SEND_TIMES = SendTimes()


def check_cost(key: str, limits: BucketLimits, cost: float) -> None:
    """Refuse a cost that can never be admitted on bucket `key`.

    Raises `RequestTooLargeError` if `cost` (tokens) exceeds the TPM limit: OpenAI refuses such a
    request for ever, so it must fail now instead of waiting. Raises `ValueError` if negative.
    """
    if cost < 0:
        raise ValueError(f"cost must be >= 0 tokens, got {cost}")
    if cost > limits.tpm:
        match = _MODEL_IN_KEY.search(key)
        raise RequestTooLargeError(math.ceil(cost), limits.tpm, match.group(1) if match else key)
