"""A batch's progress per model, read from counters (no scan of its jobs), and its ETA from the
binding limit of each model.

Counters (``keys.batch_models``): jobs and their charge (the tokens the limiter charges: prompt
tokens counted at submit plus the output reserved, ``StoredJob.charge``) are added at submit,
completed / failed / charge done as outcomes are stored (store_outcome.lua). Jobs in flight are
the live leases of the claims hash, which holds only jobs still running (store_outcome.lua drops
a job's lease with its outcome), so reading it costs what the workers' concurrency is, not what
the batch size is. A counter of jobs in flight was the other choice; a worker killed mid-call
would leave it wrong for good, while its leases expire. "In flight" so means taken by a worker:
sent, or waiting in that worker for its share of the limit.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import orjson
import redis

from ratequeue.config.accounts import AccountTable
from ratequeue.config.models import ModelTable
from ratequeue.errors import InvalidRequestError, UnknownModelError
from ratequeue.jobstore import keys
from ratequeue.jobstore.codec import text

# What a parked pair's reason (worker/policy.py Reason values) means, in words.
_PAUSE_WORDS = {
    "invalid_api_key": "upstream refused the key (401)",
    "insufficient_quota": "quota exhausted (429 insufficient_quota)",
}
# settle.py writes a long Retry-After's park message as "the server asked to wait N s: ...".
_ASKED_WAIT = re.compile(r"asked to wait (\d+) s")
_COUNTERS = ("jobs", "charge", "completed", "failed", "charge_done")
MEASURED_AFTER = 5.0  # seconds of measured rate before the ETA takes it into account


@dataclass(frozen=True)
class Pause:
    """Why a model's (account, model) pair is parked: the reason code and what it means."""

    reason: str
    message: str


@dataclass(frozen=True)
class ModelCounts:
    """One model's share of a batch: jobs by state and the charge (tokens) not yet done."""

    total: int = 0
    completed: int = 0
    failed: int = 0
    in_flight: int = 0
    charge: int = 0
    charge_done: int = 0
    paused: Pause | None = None

    @property
    def done(self) -> int:
        return self.completed + self.failed

    @property
    def remaining(self) -> int:
        """Jobs without an outcome (in flight or waiting)."""
        return max(self.total - self.done, 0)

    @property
    def waiting(self) -> int:
        return max(self.remaining - self.in_flight, 0)

    @property
    def remaining_tokens(self) -> int:
        """The charge of the jobs without an outcome."""
        return max(self.charge - self.charge_done, 0)

    def as_json(self) -> dict[str, Any]:
        """The ``models`` entry of the status JSON (``tokens``: the charge of all its jobs)."""
        return {
            "total": self.total, "completed": self.completed, "failed": self.failed, "in_flight": self.in_flight,
            "tokens": self.charge, "remaining_tokens": self.remaining_tokens,
            "paused": asdict(self.paused) if self.paused else None,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ModelCounts:
        """The inverse of ``as_json``."""
        paused = raw.get("paused")
        charge = int(raw["tokens"])
        pause = Pause(paused["reason"], paused["message"]) if paused else None
        return cls(int(raw["total"]), int(raw["completed"]), int(raw["failed"]), int(raw["in_flight"]), charge,
                   charge - int(raw["remaining_tokens"]), pause)


@dataclass(frozen=True)
class ModelLimits:
    """The limits a model's jobs run at, per minute; ``source`` is "learned" or "configured"."""

    rpm: float
    tpm: float
    source: str


def pause_words(reason: str, message: str, cooldown: float) -> str:
    """A parked pair's reason as a user reads it."""
    if reason == "long_retry_after":
        asked = _ASKED_WAIT.search(message)
        return f"server asked to wait {asked.group(1) if asked else f'{cooldown:.0f}'} s"
    return _PAUSE_WORDS.get(reason, reason)


def read_pauses(client: redis.Redis, account: str, models: Iterable[str]) -> dict[str, Pause]:
    """The parked pairs (worker/parking.py) of ``account`` among ``models``, in words (never the
    upstream's own message, which may quote the key)."""
    fields = {model: keys.pair_field(account, model) for model in models}
    if not fields:
        return {}
    found = {}
    for model, raw in zip(fields, client.hmget(keys.parked_pairs(), list(fields.values())), strict=True):
        if raw is not None:
            record = orjson.loads(raw)
            reason = str(record.get("reason", ""))
            found[model] = Pause(reason, pause_words(reason, str(record.get("message", "")),
                                                     float(record.get("cooldown", 0))))
    return found


def model_counters(raw: Mapping[Any, Any]) -> dict[str, dict[str, int]]:
    """A batch's per-model counters hash (``keys.batch_models``) as model -> counter -> value."""
    counters: dict[str, dict[str, int]] = {}
    for field, value in raw.items():
        counter, _, model = text(field).partition(":")
        if counter in _COUNTERS:
            counters.setdefault(model, {})[counter] = int(value)
    # A model with outcomes but no jobs counted was submitted before these counters existed
    # (outcomes stored since an upgrade): its counts would mislead, so it is left out.
    return {model: c for model, c in counters.items() if "jobs" in c}


def counts_of(counters: Mapping[str, int], in_flight: int = 0, paused: Pause | None = None) -> ModelCounts:
    """One model's ``model_counters`` entry as ``ModelCounts``."""
    return ModelCounts(counters.get("jobs", 0), counters.get("completed", 0), counters.get("failed", 0), in_flight,
                       counters.get("charge", 0), counters.get("charge_done", 0), paused)


def read_model_counts(client: redis.Redis, batch_id: str, account: str, running: bool = True) -> dict[str, ModelCounts]:
    """Per-model counts of a batch; ``running=False`` (an ended batch) skips leases and pauses."""
    counters = model_counters(client.hgetall(keys.batch_models(batch_id)))
    if not counters:
        return {}
    in_flight = _in_flight(client, batch_id, list(counters)) if running else {}
    pauses = read_pauses(client, account, counters) if running else {}
    return {model: counts_of(c, in_flight.get(model, 0), pauses.get(model)) for model, c in sorted(counters.items())}


def _in_flight(client: redis.Redis, batch_id: str, models: list[str]) -> dict[str, int]:
    """Live leases per model. One model: a count. Several: the leased jobs are read for their
    model (as many as the workers run at once)."""
    seconds, micros = client.time()
    now_ms = seconds * 1000 + micros // 1000
    live = [text(cid) for cid, lease in client.hgetall(keys.batch_claims(batch_id)).items()
            if int(text(lease).rpartition(" ")[2] or 0) > now_ms]
    if len(models) == 1 or not live:
        return {models[0]: len(live)} if live else {}
    counts: dict[str, int] = {}
    for raw in client.hmget(keys.batch_jobs(batch_id), live):
        if raw is not None:
            model = orjson.loads(raw)["m"]
            counts[model] = counts.get(model, 0) + 1
    return counts


def model_limits(client: redis.Redis, table: ModelTable, account: str, model: str) -> ModelLimits | None:
    """The limits in force for ``model``: the ones the workers learned from the server's headers
    (worker/learned.py keeps them in ``keys.learned_limits``), else the configured table's. None
    for a model the table does not know. A worker's own slowdown after 429s without headers
    (in its memory only) is not seen here."""
    raw = client.hget(keys.learned_limits(), keys.pair_field(account, model))
    if raw is not None:
        learned = orjson.loads(raw)
        return ModelLimits(float(learned["rpm"]), float(learned["tpm"]), "learned")
    try:
        spec = table.get(model)
    except UnknownModelError:
        return None
    return ModelLimits(float(spec.rpm), float(spec.tpm), "configured")


def configured_limits(accounts: AccountTable, model: str, account: str) -> ModelLimits | None:
    """The limits `account` (an alias; "": none named) gives ``model`` on its first route: its own
    (a usage tier's, an Azure deployment's) or the table's; None without [accounts] or where nothing
    describes them."""
    if accounts.implicit or not account:
        return None
    try:
        spec = accounts.routes_for(model, account)[0].spec
    except (InvalidRequestError, UnknownModelError):
        return None
    return ModelLimits(float(spec.rpm), float(spec.tpm), "configured") if spec.limits_known else None


def share_in_force(client: redis.Redis, account: str, model: str, max_share: float) -> float:
    """The part of the limits the workers spend on a pair now: ``RATEQUEUE_MAX_SHARE`` times the
    share other clients of the account leave (field ``fs`` of the pair's bucket, reconcile.lua;
    missing: all of it), as ``worker.learned`` applies it."""
    raw = client.hget(keys.bucket_key(account, model), "fs")
    return max_share * (float(text(raw)) if raw is not None else 1.0)


def at_share(limits: ModelLimits, share: float) -> ModelLimits:
    """``limits`` times ``share``: the rate the workers actually run at."""
    return ModelLimits(limits.rpm * share, limits.tpm * share, limits.source)


def limit_eta(counts: ModelCounts, limits: ModelLimits) -> tuple[float, str]:
    """Seconds the model's jobs without an outcome take at its limits, and the limit that binds
    ("RPM" or "TPM"): the larger of remaining requests / RPM and remaining charged tokens / TPM.

    Ignored: other batches (and other clients of the account) drawing on the same limits, which
    make it later; the bucket's saved capacity (a few seconds of the limit), which a fresh start
    spends at once and makes it earlier; the latency of the last calls. Jobs in flight count as
    remaining: some of them wait for capacity in a worker, and those already sent take about the
    latency that is otherwise left out."""
    by_requests = counts.remaining / limits.rpm * 60 if limits.rpm > 0 else 0.0
    by_tokens = counts.remaining_tokens / limits.tpm * 60 if limits.tpm > 0 else 0.0
    return (by_tokens, "TPM") if by_tokens > by_requests else (by_requests, "RPM")


def batch_eta(etas: Mapping[str, float | None]) -> float | None:
    """The batch's ETA: its slowest model's (models have separate limits and run side by side).
    None when some model's is unknown (paused, or a model without limits)."""
    if any(eta is None for eta in etas.values()):
        return None
    return max((eta for eta in etas.values() if eta is not None), default=0.0)


def capped_share(share: float) -> tuple[str, bool]:
    """A measured share of a limit as shown, capped at 100%, and whether it was above: more than
    the limit's rate over a span can only be capacity the bucket saved before it (at the start,
    a full bucket of ``RATEQUEUE_BURST_SECONDS`` of the limit, spent at once)."""
    return f"{min(share, 1.0):.0%}", share > 1.0


def model_eta(
    counts: ModelCounts, limits: ModelLimits | None, measured_rpm: float = 0.0, measured_seconds: float = 0.0
) -> tuple[float | None, str]:
    """The model's ETA in seconds (None: unknown) and what decides it: "RPM" or "TPM" (its binding
    limit), "measured" (the rate of the last ``measured_seconds``), or "paused".

    The limits bound how fast the rest can go; the measured rate, once it spans ``MEASURED_AFTER``
    seconds, wins when it is slower (something else binds: latency, too few workers, 429s). It is
    not taken alone because at the start it includes the bucket's saved capacity, spent at once:
    that is what made the old ETA, from the rate so far, 2-2.8 times too early (issue 10).
    """
    if counts.paused is not None:
        return None, "paused"
    if counts.remaining == 0:
        return 0.0, "done"
    eta, why = limit_eta(counts, limits) if limits is not None else (None, "measured")
    if measured_seconds >= MEASURED_AFTER and measured_rpm > 0:
        measured = counts.remaining / measured_rpm * 60
        if eta is None or measured > eta:
            return measured, "measured"
    return eta, why
