"""Moves deferred jobs whose time has come back onto the Celery queue.

Why not Celery's countdown/ETA: on the Redis broker a delayed message is held in a worker's
memory and, once past the visibility timeout, delivered again (measured: 5 tasks ran 20 times).
A job waiting for capacity must never become a duplicate, so waits longer than a few seconds
live in one Redis sorted set instead, and every worker process runs this mover. Claims are leased
(``claim_due.lua``, ``release_due.lua``): a mover killed between claiming and publishing leaves entries that come due
again, and a duplicate message that results is harmless (jobs are leased and stored once).

Each job goes back to its account's queue (queue.queue_for): a batch whose jobs all went to one
queue (``queue:<name>`` counters in its models hash, written at submit) sends them there unread;
one whose jobs are spread over several has the due jobs read for their account.

Retention: a batch's own keys expire when it ends (store_outcome.lua), but its members in the
shared sorted sets cannot. The mover so drops due entries of a batch that has ended or is gone
(deleted, or expired after its retention) instead of enqueueing them, and walks the batch index
a page at a time (``prune_index``, every ``prune_interval`` s) removing batches that are gone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable

import redis

from ratequeue.jobstore import keys
from ratequeue.jobstore.codec import text
from ratequeue.jobstore.jobs import StoredJob
from ratequeue.jobstore.keys import DEFERRED_SEP
from ratequeue.jobstore.scripts import lua_source
from ratequeue.queue import QUEUE, Publish, publish_on, queue_for

log = logging.getLogger(__name__)

_QUEUE_FIELD = "queue:"  # keys.batch_models: jobs per account queue (producer.submit)


class DeferredMover:
    """A daemon thread: every ``interval`` seconds, re-enqueue due deferred jobs via ``publish``;
    every ``restore_interval`` seconds, call ``restore`` (the broker's sweep of lost messages)."""

    def __init__(
        self,
        client: redis.Redis,
        publish: Publish,
        interval: float = 0.5,
        batch: int = 500,
        lease: float = 60.0,
        chunk_size: int = 50,
        restore: Callable[[], None] | None = None,
        restore_interval: float = 10.0,
        prune_interval: float = 30.0,
    ) -> None:
        self._redis = client
        self._claim = client.register_script(lua_source("claim_due"))
        self._release = client.register_script(lua_source("release_due"))
        self._publish = publish
        self._interval = interval
        self._batch = batch
        self._lease_ms = int(lease * 1000)
        self._chunk_size = chunk_size
        self._restore = restore
        self._restore_interval = restore_interval
        self._next_restore = time.monotonic() + restore_interval
        self._prune_interval = prune_interval
        self._next_prune = time.monotonic() + prune_interval
        self._prune_cursor = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ratequeue-deferred", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def move_due(self) -> int:
        """Re-enqueue every due entry once; returns how many were moved."""
        lease_score, *members = self._claim(keys=[keys.deferred_jobs()], args=[self._batch, self._lease_ms])
        if not members:
            return 0
        by_batch: dict[str, list[str]] = defaultdict(list)
        texts = [m.decode() if isinstance(m, bytes) else m for m in members]
        for member in texts:
            batch_id, _, custom_id = member.partition(DEFERRED_SEP)
            by_batch[batch_id].append(custom_id)
        for batch_id in self._not_running(list(by_batch)):
            log.debug("deferred jobs of ended or deleted batch %s dropped", batch_id)
            del by_batch[batch_id]
        for batch_id, by_queue in self._by_queue(by_batch).items():
            for queue, custom_ids in by_queue.items():
                for i in range(0, len(custom_ids), self._chunk_size):
                    publish_on(self._publish, queue, batch_id, custom_ids[i : i + self._chunk_size])
        self._release(keys=[keys.deferred_jobs()], args=[lease_score, *texts])
        return len(texts)

    def _by_queue(self, by_batch: dict[str, list[str]]) -> dict[str, dict[str, list[str]]]:
        """batch -> queue -> its due custom_ids: read off the batch's queue counters when all its jobs
        went to one queue (the shared one when it has none: no [accounts]), else off the jobs."""
        batch_ids = list(by_batch)
        pipe = self._redis.pipeline(transaction=False)
        for batch_id in batch_ids:
            pipe.hgetall(keys.batch_models(batch_id))
        spread: list[str] = []
        found: dict[str, dict[str, list[str]]] = {}
        for batch_id, raw in zip(batch_ids, pipe.execute(), strict=True):
            counters = {text(k): int(v) for k, v in raw.items()}
            queues = [k.removeprefix(_QUEUE_FIELD) for k in counters if k.startswith(_QUEUE_FIELD)]
            jobs = sum(n for k, n in counters.items() if k.startswith("jobs:"))
            if not queues:
                found[batch_id] = {QUEUE: by_batch[batch_id]}
            elif len(queues) == 1 and counters[_QUEUE_FIELD + queues[0]] >= jobs:
                found[batch_id] = {queues[0]: by_batch[batch_id]}
            else:
                spread.append(batch_id)
        if spread:
            pipe = self._redis.pipeline(transaction=False)
            for batch_id in spread:
                pipe.hmget(keys.batch_jobs(batch_id), by_batch[batch_id])
            for batch_id, raws in zip(spread, pipe.execute(), strict=True):
                found[batch_id] = defaultdict(list)
                for custom_id, raw in zip(by_batch[batch_id], raws, strict=True):
                    account = None if raw is None else StoredJob.loads(custom_id, raw).account
                    found[batch_id][queue_for(account)].append(custom_id)
        return found

    def _not_running(self, batch_ids: list[str]) -> list[str]:
        """The batches among ``batch_ids`` that are gone or have ended (their jobs need no run)."""
        pipe = self._redis.pipeline(transaction=False)
        for batch_id in batch_ids:
            pipe.hmget(keys.batch_meta(batch_id), ["status", "retained_until"])
        return [b for b, (status, ended) in zip(batch_ids, pipe.execute(), strict=True) if status is None or ended]

    def prune_index(self, count: int = 500) -> int:
        """Remove from the batch index, one ZSCAN page per call, the batches whose keys are gone
        (expired after their retention); returns how many. Repeated calls cover the whole index."""
        self._prune_cursor, page = self._redis.zscan(keys.batches_index(), self._prune_cursor, count=count)
        ids = [batch_id for batch_id, _ in page]
        if not ids:
            return 0
        pipe = self._redis.pipeline(transaction=False)
        for batch_id in ids:
            pipe.exists(keys.batch_meta(text(batch_id)))
        gone = [batch_id for batch_id, alive in zip(ids, pipe.execute(), strict=True) if not alive]
        return int(self._redis.zrem(keys.batches_index(), *gone)) if gone else 0

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                while self.move_due() >= self._batch:
                    pass
                if self._restore is not None and time.monotonic() >= self._next_restore:
                    self._next_restore = time.monotonic() + self._restore_interval
                    self._restore()
                if time.monotonic() >= self._next_prune:
                    self._next_prune = time.monotonic() + self._prune_interval
                    self.prune_index()
            except Exception as exc:  # the thread must outlive Redis restarts and broker hiccups
                log.warning("deferred mover: %s; retrying", exc)
