"""The exporter's (account, model) gauges: parked pairs and bucket levels.

- ``rq:parked`` (field ``<account>:<model>`` -> JSON ``{reason, since, ...}``): ``since`` is the
  first park (worker/parking.py keeps it across failed probes);
- every bucket ``rq:bucket:{<account>:<model>}``, peeked with the limits its workers use: the
  learned ones (``rq:learned``) when ``RATEQUEUE_LEARN_LIMITS`` is on and the server announced
  some, else the configured ones: the pair's account's own (``configured_pair_limits``: an
  account's tier limits), else this process's model table (the same environment as the workers');
  models it does not know are skipped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import orjson
import redis
from prometheus_client.core import GaugeMetricFamily

from ratequeue.config.accounts import AccountTable
from ratequeue.config.models import ModelTable
from ratequeue.errors import RatequeueError
from ratequeue.jobstore import keys
from ratequeue.jobstore.codec import text
from ratequeue.worker.limiter import BucketLimits, SyncLimiter

__all__ = ["BucketReader", "Parked", "configured_pair_limits", "read_parked"]

_BUCKET = re.compile(r"^rq:bucket:\{([^:}]*):(.+)\}$")
_MAX_BUCKETS = 1000  # (account, model) buckets remembered after their hash expired

Parked = dict[tuple[str, str], str]  # (account, model) -> reason


def read_parked(client: redis.Redis) -> tuple[list[GaugeMetricFamily], Parked]:
    """The parked-pair gauges, and each parked pair's reason."""
    entries = client.hgetall(keys.parked_pairs())
    since = GaugeMetricFamily(
        "ratequeue_pair_parked_since_timestamp_seconds",
        "When an (account, model) pair was parked (s since epoch); present only while it is.",
        labels=["account", "model", "reason"],
    )
    parked: Parked = {}
    for field, raw in entries.items():
        account, _, model = text(field).partition(":")
        try:
            info: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            info = {}
        info = info if isinstance(info, dict) else {}
        reason = re.sub(r"[^a-z0-9_]", "_", str(info.get("reason") or "unknown").lower())[:48]
        since.add_metric([account, model, reason], _timestamp(info.get("since")))
        parked[(account, model)] = reason
    count = GaugeMetricFamily("ratequeue_parked_pairs", "(account, model) pairs parked.", value=len(entries))
    return [count, since], parked


def configured_pair_limits(accounts: AccountTable) -> dict[str, tuple[int, int]]:
    """``<account>:<model>`` -> (rpm, tpm) of each pair whose account sets its own limits for the
    model ([accounts.X.models]); the table's figures serve the others. Azure deployments are left
    out (their buckets are named after deployments the table lacks, skipped as before)."""
    return {keys.pair_field(*route.pair): (route.spec.rpm, route.spec.tpm) for route in accounts.all_routes()
            if route.account.dialect != "azure" and route.spec.name in route.account.limits}


class BucketReader:
    """Peeks every bucket at each scrape, remembering buckets whose idle hash expired (missing = full)."""

    def __init__(self, client: redis.Redis, table: ModelTable, burst_seconds: float, learn_limits: bool,
                 pair_limits: Mapping[str, tuple[int, int]] | None = None) -> None:
        self._limiter = SyncLimiter(client)
        self._table = table
        self._pair_limits = dict(pair_limits or {})
        self._burst = burst_seconds
        self._learn = learn_limits
        self._seen: dict[str, None] = {}

    def read(self, client: redis.Redis) -> list[GaugeMetricFamily]:
        docs = {
            "level_requests": "Request bucket level now.", "level_tokens": "Token bucket level now.",
            "capacity_requests": "Request bucket capacity.", "capacity_tokens": "Token bucket capacity.",
            "pause_seconds": "Time left of a pause set after a 429 (0: none).",
        }
        families = {
            k: GaugeMetricFamily(f"ratequeue_bucket_{k}", doc, labels=["model", "account"]) for k, doc in docs.items()
        }
        learned = {text(k): v for k, v in client.hgetall(keys.learned_limits()).items()} if self._learn else {}
        for raw_key in client.scan_iter(match="rq:bucket:*", count=1000):
            self._seen[text(raw_key)] = None
        while len(self._seen) > _MAX_BUCKETS:
            del self._seen[next(iter(self._seen))]
        for key in self._seen:
            match = _BUCKET.match(key)
            if not match:
                continue
            account, model = match.groups()
            configured = self._pair_limits.get(f"{account}:{model}")
            if configured is None:
                try:
                    spec = self._table.get(model)
                except RatequeueError:
                    continue
                configured = spec.rpm, spec.tpm
            rpm, tpm = _learned(learned.get(f"{account}:{model}"), *configured)
            levels = self._limiter.peek(key, BucketLimits(rpm, tpm, self._burst))
            pause = max(0.0, levels.not_before_ms / 1000 - levels.now_us / 1e6)
            values = (levels.requests, levels.tokens, levels.request_capacity, levels.token_capacity, pause)
            for family, value in zip(families.values(), values, strict=True):
                family.add_metric([model, account], value)
        return list(families.values())


def _learned(raw: bytes | str | None, rpm: int, tpm: int) -> tuple[int, int]:
    """The (rpm, tpm) of a ``rq:learned`` entry (JSON ``{rpm, tpm, at}``), else the configured ones."""
    try:
        known = orjson.loads(raw) if raw else {}
        return int(known.get("rpm") or rpm), int(known.get("tpm") or tpm)
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        return rpm, tpm


def _timestamp(value: object) -> float:
    """Seconds since epoch from a number (s or ms) or an ISO 8601 text; 0 when unreadable."""
    if isinstance(value, int | float):
        return float(value) / 1000 if value > 1e11 else float(value)
    if isinstance(value, str):
        try:
            return _timestamp(float(value))
        except ValueError:
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                return 0.0
    return 0.0
