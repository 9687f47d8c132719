"""How long the worker's Redis calls take and how often they fail, measured in one place: the
clients themselves.

``TimedRedis`` (the sync client: heartbeat, deferred mover, reaper) and ``TimedAsyncRedis`` (the
engine's asyncio client: every job's calls) time each command and each pipeline, so no call site
carries a timer. A call's ``operation`` label is a small closed vocabulary: a Lua script is named
by what it does (its SHA1 is looked up; see ``_SCRIPTS``), anything else is ``other``.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Sequence
from typing import Any

import redis
import redis.asyncio as aioredis
from prometheus_client import Counter, Histogram
from redis.asyncio.client import Pipeline as AsyncPipeline
from redis.client import Pipeline
from redis.exceptions import NoScriptError, RedisError

from ratequeue.jobstore.scripts import JOBSTORE, lua_source
from ratequeue.worker.metrics_core import labels, log

_WORKER = "ratequeue.worker"
# script (name, package) -> operation
_SCRIPTS = {
    ("reserve", _WORKER): "reserve",
    ("peek", _WORKER): "reserve",
    ("slow_start", _WORKER): "reserve",
    ("set_window", _WORKER): "reserve",
    ("reconcile", _WORKER): "reconcile",
    ("set_not_before", _WORKER): "reconcile",
    ("set_rule", _WORKER): "reconcile",
    ("charge_ledger", _WORKER): "reconcile",
    ("heartbeat", _WORKER): "heartbeat",
    ("store_outcome", JOBSTORE): "store_outcome",
    ("record_attempt", JOBSTORE): "store_outcome",
    ("expire_batch", JOBSTORE): "store_outcome",
    ("claim_jobs", JOBSTORE): "fetch",
    ("renew_leases", JOBSTORE): "lease",
    ("defer", JOBSTORE): "defer",
    ("claim_due", JOBSTORE): "defer",
    ("release_due", JOBSTORE): "defer",
    ("recheck_later", JOBSTORE): "defer",
}
OPERATIONS = (*sorted(set(_SCRIPTS.values())), "other")

REDIS_SECONDS = Histogram(
    "ratequeue_redis_command_seconds",
    "Time a worker's Redis command or pipeline took, by operation (a Lua script by what it does; else other).",
    ["operation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
REDIS_ERRORS = Counter(
    "ratequeue_redis_errors_total",
    "Worker Redis commands or pipelines that failed (connection lost, timeout, out of memory...), by operation.",
    ["operation"],
)


@functools.cache
def _by_sha() -> dict[str, str]:
    return {
        hashlib.sha1(lua_source(name, package).encode()).hexdigest(): op for (name, package), op in _SCRIPTS.items()
    }


def operation_of(args: Sequence[Any]) -> str:
    """The operation label of one command's arguments (``EVALSHA <sha> ...``: the script's)."""
    if len(args) > 1 and str(args[0]).upper() in ("EVALSHA", "EVAL_RO", "EVALSHA_RO"):
        sha = args[1].decode() if isinstance(args[1], bytes) else str(args[1])
        return _by_sha().get(sha, "other")
    return "other"


def _pipeline_operation(stack: Sequence[tuple[Any, Any]]) -> str:
    for args, _options in stack:
        op = operation_of(args)
        if op != "other":
            return op
    return "other"


def zero_series() -> None:
    """Create every operation's series at zero (at worker start)."""
    for op in OPERATIONS:
        labels(REDIS_SECONDS, op)
        labels(REDIS_ERRORS, op)


def _record(op: str, started: float, failed: BaseException | None) -> None:
    try:
        labels(REDIS_SECONDS, op).observe(time.perf_counter() - started)
        # A NOSCRIPT is answered by loading the script (redis-py's Script): not a failure.
        if isinstance(failed, RedisError) and not isinstance(failed, NoScriptError):
            labels(REDIS_ERRORS, op).inc()
    except Exception:  # pragma: no cover - a metric must never fail a call
        log.exception("metrics: redis timing failed")


class TimedRedis(redis.Redis):
    """A sync Redis client whose commands and pipelines are timed (``ratequeue_redis_*``)."""

    def execute_command(self, *args: Any, **options: Any) -> Any:
        started, failed = time.perf_counter(), None
        try:
            return super().execute_command(*args, **options)
        except BaseException as exc:
            failed = exc
            raise
        finally:
            _record(operation_of(args), started, failed)

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Pipeline:
        return _TimedPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)


class _TimedPipeline(Pipeline):
    def execute(self, raise_on_error: bool = True) -> list[Any]:
        op, started, failed = _pipeline_operation(self.command_stack), time.perf_counter(), None
        try:
            return super().execute(raise_on_error)
        except BaseException as exc:
            failed = exc
            raise
        finally:
            _record(op, started, failed)


class TimedAsyncRedis(aioredis.Redis):
    """An asyncio Redis client whose commands and pipelines are timed (``ratequeue_redis_*``)."""

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        started, failed = time.perf_counter(), None
        try:
            return await super().execute_command(*args, **options)
        except BaseException as exc:
            failed = exc
            raise
        finally:
            _record(operation_of(args), started, failed)

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> AsyncPipeline:
        return _TimedAsyncPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)


class _TimedAsyncPipeline(AsyncPipeline):
    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        op, started, failed = _pipeline_operation(self.command_stack), time.perf_counter(), None
        try:
            return await super().execute(raise_on_error)
        except BaseException as exc:
            failed = exc
            raise
        finally:
            _record(op, started, failed)
