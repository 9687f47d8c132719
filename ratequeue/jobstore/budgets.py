"""Budgets in USD that dispatch never exceeds (issue 14): per batch, and per UTC day for everything.

Before a job is sent, a worker reserves its worst-case cost (the prompt at list price plus its
reserved maximum output) against its batch's budget and the day's, in one Lua call
(``budget_reserve.lua``: spent + reserved + this <= budget, else refused), so any number of
workers together stay under both. When the answer comes the reservation is replaced by the
actual cost from its usage (``budget_settle.lua``); a failed call releases it (actual cost 0).

A crashed worker never settles: each reservation expires (``HOLD_SECONDS``, longer than any call
may take: the read timeout plus a margin) and the next reserve, by any worker, gives expired ones
back before it checks. A settle that comes after its reservation expired adds only the actual cost.

A job refused for budget is not failed: it is deferred (``worker.budget``) and its batch is
marked blocked ("batch" or "daily"), which ``status`` shows as ``paused: budget``. Raising a
budget here clears the marks and makes the deferred jobs due at once. The daily budget is the
Redis value set at run time (``ratequeue budget --daily``), else ``RATEQUEUE_DAILY_BUDGET_USD``.

This module is the producer's side (sync client): setting budgets and reading them back.
"""

from __future__ import annotations

import math
from typing import Any

import redis

from ratequeue.errors import BatchNotFoundError, UsageError
from ratequeue.jobstore import deferrals, keys
from ratequeue.jobstore.codec import text

NANO = 1_000_000_000  # amounts are kept as integer nano-USD: exact sums in Lua and HINCRBY


def to_nano(usd: float) -> int:
    return math.ceil(usd * NANO - 1e-6)  # up, so a reservation is never below the price


def check_usd(usd: float, what: str) -> float:
    """A budget must be a finite amount of USD, 0 or more (0 stops dispatch)."""
    if not math.isfinite(usd) or usd < 0:
        raise UsageError(f"{what}: {usd!r} is not an amount of USD (0 or more)")
    return usd


def today(client: redis.Redis) -> int:
    """Whole UTC days since the epoch by Redis's clock: the day key every worker uses."""
    return int(client.time()[0]) // 86400


def set_batch_budget(client: redis.Redis, batch_id: str, usd: float | None) -> None:
    """Set (None: remove) the batch's budget; jobs refused for it are retried at once."""
    field = f"{batch_id}:limit"
    if usd is None:
        client.hdel(keys.budget_batches(), field)
    else:
        amount = to_nano(check_usd(usd, "budget"))
        # Workers hold and settle nothing for a batch while no budget applies to it (worker.budget):
        # what it spent before counts from its stored results' cost.
        spent = math.ceil(float(client.hget(keys.batch_meta(batch_id), "cost_usd") or 0) * NANO)
        with client.pipeline() as pipe:
            pipe.hsetnx(keys.budget_batches(), f"{batch_id}:spent", spent)
            pipe.hset(keys.budget_batches(), field, amount)
            pipe.execute()
    _wake(client, [batch_id])


def set_daily_budget(client: redis.Redis, usd: float | None) -> None:
    """Set (None: remove, back to RATEQUEUE_DAILY_BUDGET_USD) the daily budget; every batch
    blocked by it is retried at once."""
    if usd is None:
        client.hdel(keys.budget_days(), "limit")
    else:
        amount = to_nano(check_usd(usd, "daily budget"))
        day = today(client)  # nothing was settled while no daily budget applied: the day's results' cost
        spent = int(client.hget(keys.totals(), f"cost_nusd_day:{day}") or 0)
        with client.pipeline() as pipe:
            pipe.hsetnx(keys.budget_days(), f"{day}:spent", spent)
            pipe.hset(keys.budget_days(), "limit", amount)
            pipe.execute()
    blocked = {text(b): text(why) for b, why in client.hgetall(keys.budget_blocked()).items()}
    _wake(client, [b for b, why in blocked.items() if why == "daily"])


def _wake(client: redis.Redis, batch_ids: list[str]) -> None:
    """Clear the blocked marks first, then make the batches' deferred jobs due: a worker that is
    refused meanwhile marks again and, seeing room, defers for no time (worker.budget)."""
    if batch_ids:
        client.hdel(keys.budget_blocked(), *batch_ids)
    for batch_id in batch_ids:
        deferrals.wake_batch(client, batch_id)


def forget_batch(client: redis.Redis, batch_id: str) -> None:
    """Drop a deleted batch's budget fields (a call still in flight may add its spend back: harmless)."""
    client.hdel(keys.budget_batches(), *(f"{batch_id}:{f}" for f in ("limit", "spent", "reserved")))
    client.hdel(keys.budget_blocked(), batch_id)


def batch_budget(client: redis.Redis, batch_id: str) -> dict[str, Any] | None:
    """The batch's budget for its Batch object: limit, spent, reserved (USD) and ``paused`` ("budget",
    "daily budget" or None); None when the batch has no budget and no daily budget stopped it."""
    pipe = client.pipeline(transaction=False)
    pipe.hmget(keys.budget_batches(), [f"{batch_id}:{f}" for f in ("limit", "spent", "reserved")])
    pipe.hget(keys.budget_blocked(), batch_id)
    (limit, spent, reserved), blocked = pipe.execute()
    if limit is None and blocked is None:
        return None
    why = {"batch": "budget", "daily": "daily budget"}.get(text(blocked)) if blocked is not None else None
    shown: dict[str, Any] = {
        "limit_usd": None if limit is None else int(limit) / NANO, "spent_usd": int(spent or 0) / NANO,
        "reserved_usd": int(reserved or 0) / NANO, "paused": why}
    if why == "daily budget":  # the day's figures (its limit None here when it is the environment's)
        shown["daily"] = daily_budget(client, None)
    return shown


def daily_budget(client: redis.Redis, default_usd: float | None) -> dict[str, Any]:
    """Today's (UTC) budget, spent and reserved in USD; limit None: no daily budget."""
    day = today(client)
    limit, spent, reserved = client.hmget(keys.budget_days(), ["limit", f"{day}:spent", f"{day}:reserved"])
    return {"limit_usd": int(limit) / NANO if limit is not None else default_usd,
            "spent_usd": int(spent or 0) / NANO, "reserved_usd": int(reserved or 0) / NANO}


def require_batch(client: redis.Redis, batch_id: str) -> None:
    if not client.exists(keys.batch_meta(batch_id)):
        raise BatchNotFoundError(f"no batch {batch_id!r} in this Redis")
