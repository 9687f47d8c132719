"""The batch record and its state machine: the one owner of a batch's status.

Every status change is one Lua script in ``ratequeue/jobstore/lua`` (Redis runs it atomically,
so no read-then-write race between a cancel, an expiry and the last outcome); Python never
writes ``status``. When a batch ends, and as what, is decided in one file, ``_batch_end.lua``,
pasted into the scripts that may end a batch (see ``scripts.py``)::

    create  -> validating --seal--> in_progress --last outcome--> completed
               validating | in_progress --cancel--> cancelling --last outcome / seal--> cancelled
               validating | in_progress --expire--> finalizing --last outcome / seal--> expired
    paused (a flag, not a status): set on validating / in_progress by pause, cleared by resume
    and by cancel; workers make no new call for a paused batch (its jobs stay pending).
    failed: final, for a batch refused whole (OpenAI's); nothing in ratequeue sets it yet.

A final status (``FINAL``) is never written again; ``delete`` refuses a batch that has not ended
unless forced. The meta hash ``keys.batch_meta`` holds, besides the status: ``id``, ``account``,
``endpoint``, ``input_file``, ``completion_window``, ``metadata`` (JSON), ``retention`` (s, ""
for the default), ``models``, ``input_sha256`` (hex sha256 of the raw input bytes, "" when
unknown), ``paused`` ("1" while paused); counters ``total``, ``completed``, ``failed``, ``input_errors``,
token and cost totals; ``sealed``; times ``created_at``, ``expires_at``, ``<status>_at``,
``retained_until`` (s since epoch, from Redis's clock).

``BatchStore`` serves a sync client (producer), ``AsyncBatchStore`` the worker's asyncio client;
both build their calls with the same ``_calls`` functions.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any

import orjson
import redis
import redis.asyncio as aioredis

from ratequeue.errors import BatchError
from ratequeue.jobstore import keys
from ratequeue.jobstore.codec import text
from ratequeue.jobstore.scripts import lua_source

OutcomeArgs = Sequence[str | bytes | int | float]


class BatchStatus(StrEnum):
    """OpenAI's Batch statuses. ``finalizing`` is, in ratequeue, a batch past its completion
    window whose remaining jobs are being failed as expired (it ends as ``expired``)."""

    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in FINAL


FINAL = frozenset({BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLED})
_DESCRIPTIVE = frozenset({"endpoint", "input_file", "models", "input_sha256"})
# The scripts, loaded once per store; each is one transition (store_outcome: the job outcome one).
_SCRIPTS = ("create_batch", "seal_batch", "store_outcome", "cancel_batch", "expire_batch", "delete_batch",
            "pause_batch")


class BatchExistsError(BatchError):
    """``create`` was given the id of a batch that exists (the script refuses it atomically)."""


def status_of(raw: Any) -> BatchStatus | None:
    """A script's or HGET's reply as a status (None: no such batch)."""
    return None if raw is None else BatchStatus(text(raw))


def new_batch_id() -> str:
    return f"batch_{secrets.token_hex(12)}"


def _create(batch_id: str, window_s: float, fields: Mapping[str, Any]) -> tuple[list[str], list[Any]]:
    flat: list[Any] = [int(window_s)]
    for name, value in fields.items():
        flat += [name, orjson.dumps(value) if isinstance(value, dict) else value]
    return [keys.batch_meta(batch_id)], flat


def _meta(batch_id: str) -> list[str]:
    return [keys.batch_meta(batch_id)]


class BatchStore:
    """The batch transitions over a sync Redis client (or, for ``store_outcomes``, a pipeline)."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._scripts = {name: client.register_script(lua_source(name)) for name in _SCRIPTS}

    def create(self, window_s: float, fields: Mapping[str, Any], batch_id: str | None = None) -> str:
        """A new batch in ``validating`` with ``fields`` (dict values stored as JSON); returns its
        id (``batch_id``, else a new one). Also listed in the batch index, a shared set in another
        Cluster slot: a second call. Raises ``BatchExistsError`` for an id already in use."""
        batch_id = batch_id or new_batch_id()
        try:
            created_ms = self._scripts["create_batch"](*_create(batch_id, window_s, {"id": batch_id, **fields}))
        except redis.ResponseError as exc:
            if "batch exists" not in str(exc):
                raise
            raise BatchExistsError(f"batch {batch_id} exists") from exc
        self._redis.zadd(keys.batches_index(), {batch_id: int(created_ms) / 1000})
        return batch_id

    def status(self, batch_id: str) -> BatchStatus | None:
        return status_of(self._redis.hget(keys.batch_meta(batch_id), "status"))

    def describe(self, batch_id: str, **fields: str) -> None:
        """Set descriptive fields (``_DESCRIPTIVE``) of a batch just created; never its status,
        counters or times, which only the scripts write."""
        if not fields or not set(fields) <= _DESCRIPTIVE:
            raise ValueError(f"not descriptive batch fields: {sorted(set(fields) - _DESCRIPTIVE)}")
        mapping: dict[Any, Any] = dict(fields)  # redis-py's stubs want a key union dict[str, str] is not
        self._redis.hset(keys.batch_meta(batch_id), mapping=mapping)

    def seal(self, batch_id: str) -> BatchStatus:
        """No more jobs join; ends the batch now if every job has its outcome. Raises
        ``redis.ResponseError`` for a batch that does not exist."""
        return BatchStatus(text(self._scripts["seal_batch"](keys=keys.batch_keys(batch_id))))

    def cancel(self, batch_id: str) -> BatchStatus | None:
        """validating / in_progress -> cancelling; returns the status after (None: no batch)."""
        return status_of(self._scripts["cancel_batch"](keys=_meta(batch_id)))

    def expire(self, batch_id: str) -> BatchStatus | None:
        """validating / in_progress -> finalizing (ends as expired); returns the status after."""
        return status_of(self._scripts["expire_batch"](keys=_meta(batch_id)))

    def pause(self, batch_id: str, paused: bool = True) -> tuple[BatchStatus | None, bool]:
        """Pause a validating / in_progress batch (``paused=False``: unpause any); its status is
        kept. Returns (status, paused) after the call; status None: no such batch."""
        status, now_paused = self._scripts["pause_batch"](keys=_meta(batch_id), args=[int(paused)])
        return status_of(status), bool(now_paused)

    def delete(self, batch_id: str, force: bool = False) -> tuple[bool, BatchStatus | None]:
        """Remove every key of an ended batch (any batch with ``force``): (deleted, status it had).
        Its members in the shared sets are the caller's to remove (other Cluster slots)."""
        deleted, *status = self._scripts["delete_batch"](keys=keys.batch_keys(batch_id), args=[int(force)])
        return bool(deleted), status_of(status[0]) if status else None

    def store_outcomes(self, batch_id: str, args: OutcomeArgs, pipe: redis.client.Pipeline | None = None) -> Any:
        """store_outcome.lua (groups of 7 args, see its header); with ``pipe``, queued in it."""
        return self._scripts["store_outcome"](keys=keys.outcome_keys(batch_id), args=list(args), client=pipe)


class AsyncBatchStore:
    """The transitions a worker makes, over its asyncio Redis client."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._scripts = {name: client.register_script(lua_source(name)) for name in ("store_outcome", "expire_batch")}

    async def expire(self, batch_id: str) -> BatchStatus | None:
        """validating / in_progress -> finalizing (ends as expired); returns the status after."""
        return status_of(await self._scripts["expire_batch"](keys=_meta(batch_id)))

    async def store_outcomes(self, batch_id: str, args: OutcomeArgs) -> list[int]:
        """store_outcome.lua: 1 per job stored, 0 per job that had an outcome (or batch gone)."""
        return [int(x) for x in await self._scripts["store_outcome"](keys=keys.outcome_keys(batch_id), args=list(args))]
