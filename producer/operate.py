"""What operators do to batches and (account, model) pairs once they are queued: cancel, pause,
resume, delete, unpark, and the overview of the queue. A part of ``Client`` (its base class)."""

from __future__ import annotations

from typing import Any

import orjson
import redis

from ratequeue.config.accounts import AccountTable
from ratequeue.config.models import ModelTable
from ratequeue.config.settings import Settings
from ratequeue.errors import BatchNotFoundError
from ratequeue.jobstore import deferrals, keys
from ratequeue.jobstore.batches import BatchStore
from ratequeue.jobstore.codec import text
from ratequeue.jobstore.heartbeats import live_holders
from ratequeue.producer.retention import delete_batch
from ratequeue.producer.routes_status import route_use
from ratequeue.producer.submit import Submitter
from ratequeue.queue import worker_queues
from ratequeue.redact import configured_secrets, redact_json


class BatchOperations:
    """The operations; ``Client`` provides the connection, settings and stores they use."""

    redis: redis.Redis
    settings: Settings
    table: ModelTable
    accounts: AccountTable
    _batches: BatchStore
    _submitter: Submitter

    def status(self, batch_id: str) -> dict[str, Any]:
        raise NotImplementedError  # Client's

    def cancel(self, batch_id: str) -> dict[str, Any]:
        """Stop the batch: within about a second no worker starts a new call for it (calls in
        flight finish and are stored); its remaining jobs are reported as cancelled."""
        was_paused = self.redis.hget(keys.batch_meta(batch_id), "paused") == b"1"  # cancel unpauses
        if self._batches.cancel(batch_id) is None:  # one Lua call: an ended batch keeps its status
            raise BatchNotFoundError(f"no batch {batch_id!r} in this Redis")
        # Jobs waiting in the deferred set are failed now, not at their turn; a paused batch's
        # jobs are queued nowhere: they are enqueued again, and workers fail them at once.
        deferrals.wake_batch(self.redis, batch_id)
        if was_paused:
            self._submitter.requeue_pending(batch_id)
        return self.status(batch_id)

    def pause(self, batch_id: str) -> dict[str, Any]:
        """Stop the batch's new upstream calls on every worker within about a second, failing
        nothing: its jobs stay pending (calls in flight finish and are stored). ``resume``
        restarts it, ``cancel`` ends it. An ended batch is left as it is. Returns the Batch object."""
        if self._batches.pause(batch_id)[0] is None:
            raise BatchNotFoundError(f"no batch {batch_id!r} in this Redis")
        return self.status(batch_id)

    def delete(self, batch_id: str, force: bool = False) -> dict[str, Any]:
        """Remove the batch and all its keys from Redis now; returns ``{"id", "status"}`` (the
        status it had). Raises ``BatchNotFoundError``; ``BatchRunningError`` for a batch that has
        not ended, unless ``force`` (see ``producer.retention.delete_batch``)."""
        return {"id": batch_id, "status": delete_batch(self.redis, batch_id, force)}

    def resume(self, batch_id: str) -> int:
        """Unpause the batch and re-enqueue every job of it that has no outcome (e.g. it was
        paused, its producer died between storing and enqueueing, or its messages were lost);
        returns how many. Safe to repeat: a job already running or done is skipped by the
        workers. Seals the batch."""
        self.status(batch_id)
        self._batches.pause(batch_id, False)  # first: a job enqueued while paused would be dropped
        return self._submitter.requeue_pending(batch_id)

    def parked(self) -> dict[str, dict[str, Any]]:
        """Paused (account, model) pairs: "<account>:<model>" -> {reason, message, since, cooldown}."""
        raw = self.redis.hgetall(keys.parked_pairs())
        # Redacted as read: a record of an older worker may hold the upstream's message verbatim.
        return {text(k): redact_json(orjson.loads(v), configured_secrets(self.settings)) for k, v in raw.items()}

    def unpark(self, model: str | None = None) -> list[str]:
        """Restart parked pairs (all, or those of ``model``); returns the pairs restarted."""
        restarted = []
        for pair in self.parked():
            account, _, pair_model = pair.partition(":")
            if model is None or self.table.resolve(model) == pair_model:
                self.redis.hdel(keys.parked_pairs(), pair)
                self.redis.delete(keys.probe_lock(account, pair_model))
                deferrals.wake_pair(self.redis, account, pair_model)  # its jobs run now, not after the cooldown
                restarted.append(pair)
        return restarted

    def overview(self) -> dict[str, Any]:
        """Queue depth, deferred jobs, parked pairs, dead-lettered chunks and the most recent batches."""
        recent = []
        for batch_id in (text(b) for b in self.redis.zrevrange(keys.batches_index(), 0, 9)):
            try:
                recent.append(self.status(batch_id))
            except BatchNotFoundError:  # expired after its retention: its index entry goes too
                self.redis.zrem(keys.batches_index(), batch_id)
        return {
            # Chunk messages waiting in the shared queue and in each account's own (queue.queue_for).
            "queue_depth": sum(self.redis.llen(q) for q in worker_queues(
                [] if self.accounts.implicit else self.accounts.names())),
            "deferred_jobs": self.redis.zcard(keys.deferred_jobs()),
            "parked": (parked := self.parked()),
            # Chunks that failed RATEQUEUE_MAX_CHUNK_FAILURES times (newest first; their jobs failed).
            "dead_lettered_chunks": [orjson.loads(r) for r in self.redis.lrange(keys.dead_letters(), 0, 9)],
            "recent_batches": [{k: b[k] for k in ("id", "status", "request_counts", "cost_usd")} for b in recent],
            **({} if self.accounts.implicit else {"accounts": self.account_workers()}),
            # Per route of a model with several: runs that chose it, its share, parked or not.
            **({"routes": routes} if (routes := route_use(self.redis, self.accounts, parked)) else {}),
        }

    def account_workers(self) -> dict[str, dict[str, Any]]:
        """Each configured account: its dialect, the bucket id its pairs are shown under (the metrics'
        ``account`` label; the same with or without its key here) and how many live workers hold its
        key (0: its jobs wait for one)."""
        held = live_holders(self.redis)
        return {a.name: {"dialect": a.dialect, "bucket": a.bucket_id, "workers_with_key": held[a.name]}
                for a in self.accounts}

