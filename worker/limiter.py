"""The shared rate limiter: one Redis hash per (account, model) holding a request bucket and a
token bucket, driven by the Lua scripts in ``worker/lua``.

Reservations work like golang.org/x/time/rate's ``Reserve``: a caller is told the exact time its
request may be sent and is debited at once, so many workers on many hosts are served in order
without polling. A reservation never runs further than ``horizon_seconds`` ahead of now (except a
request bigger than the burst capacity, which is granted when the bucket can schedule it); past
that the caller is told ``retry_in``, the earliest time asking again can succeed.

`Limiter` (asyncio) and `SyncLimiter` (threads, scripts, tests) share the argument building and
result parsing below; each only runs the Redis call. Redis failures are raised as `LimiterError`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import redis
import redis.asyncio

from ratequeue.errors import ConfigError, RatequeueError
from ratequeue.jobstore.scripts import lua_source
from ratequeue.worker.bucket_values import (
    NO_SEND_TIMES,
    BucketLevels,
    BucketLimits,
    ReserveResult,
    SendTimes,
    check_cost,
    slow_start_key,
    window_key,
)

__all__ = [
    "BucketLevels",
    "BucketLimits",
    "Limiter",
    "LimiterError",
    "ReserveResult",
    "SendTimes",
    "SyncLimiter",
    "check_cost",
    "slow_start_key",
    "window_key",
]

T = TypeVar("T")

# The scripts ship as package data of `worker` (worker/lua/*.lua), read through importlib.resources.
_LUA: dict[str, str] = {
    name: lua_source(name, "ratequeue.worker")
    for name in ("reserve", "reconcile", "set_not_before", "peek", "slow_start", "set_window")
}


class LimiterError(RatequeueError):
    """Redis could not be reached or refused a limiter script; the original error is the cause."""


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One script invocation: which script, its KEYS and ARGV, and how to read its reply."""

    script: str
    keys: list[str]
    args: list[int | float | str]
    parse: Callable[[Any], T]


def _limit_args(limits: BucketLimits, largest_cost: float = 0) -> list[int | float | str]:
    # The scripts see the limits times the share. A cost above the shared TPM (but within the
    # real one, see check_cost) raises the TPM argument to itself: it is still scheduled, a little
    # sooner than the share alone would allow, rather than refused by reserve.lua.
    tpm = max(limits.tpm * limits.share, largest_cost)
    # repr() keeps every digit of a float; Lua's tonumber reads it back exactly.
    return [repr(float(limits.rpm * limits.share)), repr(float(tpm)), repr(float(limits.burst_seconds))]


def _parse_reserve(raw: Sequence[Any]) -> ReserveResult:
    retry_us = int(raw[1])
    return ReserveResult(
        now_us=int(raw[0]),
        waits=[int(w) / 1e6 for w in raw[2:]],
        retry_in=None if retry_us < 0 else retry_us / 1e6,
    )


def _parse_levels(raw: Sequence[Any]) -> BucketLevels:
    # {now_us, request level, token level, nb_ms, request capacity, token capacity[, share, guessed]}
    share = float(raw[6]) if len(raw) > 6 else 1.0
    guessed = len(raw) > 7 and int(raw[7]) == 1
    return BucketLevels(int(raw[0]), float(raw[1]), float(raw[2]), int(raw[3]), float(raw[4]), float(raw[5]), share,
                        guessed)


class _LimiterBase:
    """Argument checking, ARGV building and reply parsing shared by both limiters."""

    def __init__(self, horizon_seconds: float) -> None:
        if not (math.isfinite(horizon_seconds) and horizon_seconds >= 0):
            raise ConfigError(f"horizon_seconds must be >= 0, got {horizon_seconds!r}")
        self.horizon_seconds = horizon_seconds

    def _reserve_call(self, key: str, limits: BucketLimits, costs: Sequence[int]) -> _Call[ReserveResult]:
        if not costs:
            raise ValueError("reserve needs at least one cost")
        for cost in costs:
            check_cost(key, limits, cost)
        # Tokens are whole; round a fractional estimate up rather than under-charge.
        args: list[int | float | str] = [*_limit_args(limits, max(math.ceil(c) for c in costs)),
                                         round(self.horizon_seconds * 1e6)]
        keys = [key, window_key(key)]
        if limits.slow_start:
            args.append("slowstart")
            keys.append(slow_start_key(key))
        args.extend(math.ceil(c) for c in costs)
        return _Call("reserve", keys, args, _parse_reserve)

    @staticmethod
    def _reconcile_call(
        key: str,
        limits: BucketLimits,
        token_delta: float,
        request_delta: float,
        remaining_tokens: float | None,
        remaining_requests: float | None,
        refused: int = 0,
        answered: int = 0,
        charged: tuple[int, int] = (0, 0),
        sent: SendTimes = NO_SEND_TIMES,
    ) -> _Call[BucketLevels]:
        for value in (remaining_tokens, remaining_requests):
            if value is not None and value < 0:
                raise ValueError(f"a remaining count must be >= 0 or None, got {value}")
        args = [
            *_limit_args(limits),
            repr(float(token_delta)),
            repr(float(request_delta)),
            -1 if remaining_tokens is None else repr(float(remaining_tokens)),
            -1 if remaining_requests is None else repr(float(remaining_requests)),
            int(refused),
            int(answered),
            int(charged[0]),
            int(charged[1]),
            repr(limits.share / limits.max_share),  # the bucket share these limits follow
            -1 if sent.reading_age is None else repr(float(sent.reading_age)),
            -1 if sent.spent_age is None else repr(float(sent.spent_age)),
        ]
        return _Call("reconcile", [key, window_key(key)], args, _parse_levels)

    @staticmethod
    def _not_before_call(key: str, delay_seconds: float) -> _Call[int]:
        if not (math.isfinite(delay_seconds) and delay_seconds >= 0):
            raise ValueError(f"delay_seconds must be >= 0, got {delay_seconds}")
        return _Call("set_not_before", [key], [math.ceil(delay_seconds * 1000)], int)

    @staticmethod
    def _slow_start_call(key: str, credits: int) -> _Call[float]:
        if credits < 0:
            raise ValueError(f"credits must be >= 0, got {credits}")
        return _Call("slow_start", [slow_start_key(key)], [credits], float)

    @staticmethod
    def _peek_call(key: str, limits: BucketLimits) -> _Call[BucketLevels]:
        return _Call("peek", [key, window_key(key)], _limit_args(limits), _parse_levels)

    @staticmethod
    def _set_window_call(
        key: str, limits: BucketLimits, window: float, tolerance: tuple[float, float]
    ) -> _Call[float]:
        if not (math.isfinite(window) and window > 0):
            raise ValueError(f"window must be a positive number of seconds, got {window}")
        args = [*_limit_args(limits), repr(float(window)), *(repr(float(t)) for t in tolerance)]
        return _Call("set_window", [key, window_key(key)], args, float)


class Limiter(_LimiterBase):
    """The limiter for asyncio code. One instance per event loop (its Redis client is bound to it).

    Size the client's connection pool for the concurrency: redis-py 8 caps a pool at 100
    connections and raises rather than waits (use a ``BlockingConnectionPool``).
    """

    def __init__(self, redis_client: redis.asyncio.Redis, horizon_seconds: float = 2.0) -> None:
        super().__init__(horizon_seconds)
        self.redis = redis_client
        # register_script re-loads a script on NOSCRIPT (e.g. after a Redis restart emptied its cache).
        self._scripts = {name: redis_client.register_script(src) for name, src in _LUA.items()}

    async def _run(self, call: _Call[T]) -> T:
        try:
            raw = await self._scripts[call.script](keys=call.keys, args=call.args)
        except redis.RedisError as exc:
            raise LimiterError(f"{call.script} on {call.keys[0]}: {exc}") from exc
        return call.parse(raw)

    async def reserve(self, key: str, limits: BucketLimits, costs: Sequence[int]) -> ReserveResult:
        """Reserve a FIFO batch of requests costing `costs` tokens each; grants the longest prefix
        that fits the horizon and charges it at once.

        Raises `RequestTooLargeError` (without calling Redis) if a cost exceeds the TPM limit,
        `ValueError` on an empty list or a negative cost, `LimiterError` if Redis fails.
        """
        return await self._run(self._reserve_call(key, limits, costs))

    async def reconcile(
        self,
        key: str,
        limits: BucketLimits,
        token_delta: float = 0,
        request_delta: float = 0,
        remaining_tokens: float | None = None,
        remaining_requests: float | None = None,
        refused: int = 0,
        answered: int = 0,
        charged: tuple[int, int] = (0, 0),
        sent: SendTimes = NO_SEND_TIMES,
    ) -> BucketLevels:
        """Correct the levels after a response: deltas are added (positive = refund, negative =
        extra charge); a server-reported remaining count (x-ratelimit-remaining-*, None = unknown
        or unreliable) only ever lowers a level. `refused` rate-limit 429s among `answered`
        responses cut the bucket's shared share (reconcile.lua); `charged`: the requests and tokens
        the server charged for all answers corrected here (stale or not); `sent`: when their
        requests went out. Returns the new levels. Raises `LimiterError`.
        """
        call = self._reconcile_call(
            key, limits, token_delta, request_delta, remaining_tokens, remaining_requests, refused, answered, charged,
            sent,
        )
        return await self._run(call)

    async def set_not_before(self, key: str, delay_seconds: float) -> None:
        """Forbid sending on this bucket for `delay_seconds` from now (never shortens an earlier
        ban). Raises `ValueError` on a negative delay, `LimiterError` if Redis fails.
        """
        await self._run(self._not_before_call(key, delay_seconds))

    async def slow_start_answered(self, key: str, credits: int) -> float:
        """An answer came back during slow start: add `credits` (2 doubles the window per round
        trip). Returns the credits now held. Raises `LimiterError`."""
        return await self._run(self._slow_start_call(key, credits))

    async def set_window(
        self, key: str, limits: BucketLimits, window: float, tolerance: tuple[float, float] = (0.1, 0.01)
    ) -> float:
        """Size the bucket for every worker to `window` seconds of limit (the server's), unless
        the window in force is already within `tolerance` of it (a share above, a share below);
        returns the window in force.
        Raises `ValueError` on a window that is not positive, `LimiterError` if Redis fails."""
        return await self._run(self._set_window_call(key, limits, window, tolerance))

    async def peek(self, key: str, limits: BucketLimits) -> BucketLevels:
        """Current levels refilled to now, without writing. Raises `LimiterError`."""
        return await self._run(self._peek_call(key, limits))


class SyncLimiter(_LimiterBase):
    """The limiter for blocking code (threads, scripts, tests); same methods as `Limiter`.

    A ``redis.Redis`` client is thread-safe: share one per process, with a pool sized for the threads.
    """

    def __init__(self, redis_client: redis.Redis, horizon_seconds: float = 2.0) -> None:
        super().__init__(horizon_seconds)
        self.redis = redis_client
        self._scripts = {name: redis_client.register_script(src) for name, src in _LUA.items()}

    def _run(self, call: _Call[T]) -> T:
        try:
            raw = self._scripts[call.script](keys=call.keys, args=call.args)
        except redis.RedisError as exc:
            raise LimiterError(f"{call.script} on {call.keys[0]}: {exc}") from exc
        return call.parse(raw)

    def reserve(self, key: str, limits: BucketLimits, costs: Sequence[int]) -> ReserveResult:
        """Blocking `Limiter.reserve`."""
        return self._run(self._reserve_call(key, limits, costs))

    def reconcile(
        self,
        key: str,
        limits: BucketLimits,
        token_delta: float = 0,
        request_delta: float = 0,
        remaining_tokens: float | None = None,
        remaining_requests: float | None = None,
        refused: int = 0,
        answered: int = 0,
        charged: tuple[int, int] = (0, 0),
        sent: SendTimes = NO_SEND_TIMES,
    ) -> BucketLevels:
        """Blocking `Limiter.reconcile`."""
        call = self._reconcile_call(
            key, limits, token_delta, request_delta, remaining_tokens, remaining_requests, refused, answered, charged,
            sent,
        )
        return self._run(call)

    def set_not_before(self, key: str, delay_seconds: float) -> None:
        """Blocking `Limiter.set_not_before`."""
        self._run(self._not_before_call(key, delay_seconds))

    def slow_start_answered(self, key: str, credits: int) -> float:
        """Blocking `Limiter.slow_start_answered`."""
        return self._run(self._slow_start_call(key, credits))

    def set_window(
        self, key: str, limits: BucketLimits, window: float, tolerance: tuple[float, float] = (0.1, 0.01)
    ) -> float:
        """Blocking `Limiter.set_window`."""
        return self._run(self._set_window_call(key, limits, window, tolerance))

    def peek(self, key: str, limits: BucketLimits) -> BucketLevels:
        """Blocking `Limiter.peek`."""
        return self._run(self._peek_call(key, limits))
