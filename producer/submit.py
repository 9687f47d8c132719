"""Writing batches into Redis and putting their chunks on the queue.

Order of writes: a job is stored before any message names it, so a job accepted by ``submit`` is
in Redis before ``submit`` returns, and a producer that dies halfway leaves a batch that
``resume`` can finish (it re-enqueues every job without an outcome).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from ratequeue.jobstore import keys, records
from ratequeue.jobstore.batches import BatchStore
from ratequeue.jobstore.codec import text
from ratequeue.jobstore.jobs import StoredJob
from ratequeue.producer import capacity
from ratequeue.producer.batchfile import LineError
from ratequeue.queue import QUEUE, Publish, publish_on, queue_for

# Chunks hold the jobs of one (account, model) each, so a throttled model, or an account a worker
# holds no key for, never holds up another's jobs; each goes to its account's queue (queue.queue_for).
Chunking = tuple[str | None, str]
INPUT_ERROR_MARK = "\x00"  # order-list entries "\x00<n>" point at input_errors[n]
_WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass
class SubmitReport:
    batch_id: str
    jobs: int = 0
    errors: int = 0
    chunks: int = 0
    by_model: dict[str, int] = field(default_factory=dict)
    existing: bool = False  # submitted before under this batch id: this call queued nothing


def chunk_of(job: StoredJob) -> Chunking:
    """The chunk a job goes out in: its (account, model)."""
    return job.account, job.model


def parse_window(window: str) -> float:
    """Seconds in a completion window like "24h", "30m", "7d"; raises ValueError."""
    given, window = window, window.strip()
    if len(window) < 2 or window[-1] not in _WINDOW_UNITS or not window[:-1].isdigit() or not int(window[:-1]):
        raise ValueError(
            f"{given!r}: a completion window is a whole number (1 or more) and a unit, s, m, h or d (24h, 30m, 7d)"
        )
    return int(window[:-1]) * _WINDOW_UNITS[window[-1]]


class Submitter:
    """Stores batches and jobs; ``publish`` puts a chunk message on the queue."""

    def __init__(
        self, client: redis.Redis, publish: Publish, chunk_size: int = 50, block: int = 500,
        retention: float | None = None,
    ) -> None:
        """``retention``: seconds a batch is kept once ended (None: the Lua scripts' 7 days)."""
        self._redis = client
        self._retention = repr(float(retention)) if retention else ""  # "": the scripts' default
        self._publish = publish
        self._chunk_size = chunk_size
        self._block = block
        self._batches = BatchStore(client)

    def create_batch(
        self,
        account: str,
        endpoint: str = "",
        input_file: str = "",
        completion_window: str = "24h",
        metadata: Mapping[str, Any] | None = None,
        batch_id: str | None = None,
        input_sha256: str = "",
        account_name: str = "",
    ) -> str:
        """Create an empty, unsealed batch (status validating); returns its id. ``input_sha256``:
        hex digest of the raw input bytes, kept in the meta; ``account``: the bucket id its pairs are
        shown under, ``account_name`` the alias it is sent with ("": each line names its own). Raises
        ``BatchExistsError`` for a ``batch_id`` in use."""
        fields = {
            "account": account,
            "account_name": account_name,
            "endpoint": endpoint,
            "input_file": input_file,
            "completion_window": completion_window,
            "metadata": dict(metadata or {}),
            "retention": self._retention,  # read by the scripts that end it (_batch_end.lua)
            "input_sha256": input_sha256,
        }
        return self._batches.create(parse_window(completion_window), fields, batch_id)

    def add(self, batch_id: str, items: Iterable[StoredJob | LineError]) -> SubmitReport:
        """Store every job and error of ``items`` and enqueue the jobs in chunks of one model."""
        report = SubmitReport(batch_id)
        pending: dict[Chunking, list[str]] = defaultdict(list)
        input_errors = int(self._redis.hget(keys.batch_meta(batch_id), "input_errors") or 0)
        # Under a maxmemory, chunks are enqueued only once every job is stored: a batch Redis
        # refuses halfway can then be removed whole before any of it has run (RedisFullError).
        # Without one, chunks go out as blocks are stored and workers start at once.
        bounded = capacity.memory(self._redis).bounded
        held: list[tuple[list[str], str]] | None = [] if bounded else None

        def hold(batch_id: str, custom_ids: Sequence[str], queue: str = QUEUE) -> None:
            assert held is not None
            held.append((list(custom_ids), queue))

        publish: Publish = self._publish
        if held is not None:
            publish = hold
        block: list[StoredJob | LineError] = []
        for item in items:
            block.append(item)
            # Until a chunk is out, blocks of a chunk: the workers start before 500 lines are read
            # and counted (0.2-0.45 s of 1,500 jobs; issue 11: a 60 s server window's opening).
            if len(block) >= (self._block if report.chunks else self._chunk_size):
                input_errors = self._write_block(batch_id, block, input_errors, report, bounded)
                self._publish_full(batch_id, block, pending, report, publish)
                block = []
        if block:
            input_errors = self._write_block(batch_id, block, input_errors, report, bounded)
            self._publish_full(batch_id, block, pending, report, publish)
        for (account, _), custom_ids in pending.items():
            if custom_ids:
                publish_on(publish, queue_for(account), batch_id, custom_ids)
                report.chunks += 1
        for custom_ids, queue in held or ():
            publish_on(self._publish, queue, batch_id, custom_ids)
        return report

    def requeue_pending(self, batch_id: str) -> int:
        """Enqueue again every stored job without an outcome, in chunks of one model; seal."""
        order_key, start, count = keys.batch_order(batch_id), 0, 0
        pending: dict[Chunking, list[str]] = defaultdict(list)
        while True:
            page = [text(e) for e in self._redis.lrange(order_key, start, start + 999)]
            if not page:
                break
            start += len(page)
            ids = [e for e in page if not e.startswith(INPUT_ERROR_MARK)]
            if not ids:
                continue
            pipe = self._redis.pipeline(transaction=False)
            pipe.hmget(keys.batch_jobs(batch_id), ids)
            pipe.hmget(keys.batch_results(batch_id), ids)
            pipe.hmget(keys.batch_errors(batch_id), ids)
            jobs, results, errors = pipe.execute()
            for cid, job, res, err in zip(ids, jobs, results, errors, strict=True):
                if job is None or res is not None or err is not None:
                    continue
                kind = chunk_of(StoredJob.loads(cid, job))
                pending[kind].append(cid)
                count += 1
                if len(pending[kind]) >= self._chunk_size:
                    publish_on(self._publish, queue_for(kind[0]), batch_id, pending.pop(kind))
        for (account, _), custom_ids in pending.items():
            publish_on(self._publish, queue_for(account), batch_id, custom_ids)
        self.seal(batch_id)
        return count

    def seal(self, batch_id: str) -> str:
        """Declare the batch's input complete; returns its status (ended already if every job has
        its outcome)."""
        return self._batches.seal(batch_id).value

    def _write_block(
        self,
        batch_id: str,
        block: Sequence[StoredJob | LineError],
        input_errors: int,
        report: SubmitReport,
        bounded: bool = False,
    ) -> int:
        """Store one block in one transaction: a Redis that is full refuses all of it, not part."""
        meta = keys.batch_meta(batch_id)
        jobs = {item.custom_id: item.dumps() for item in block if isinstance(item, StoredJob)}
        if bounded:
            size = sum(len(raw) + capacity.RESULT_ALLOWANCE for raw in jobs.values())
            capacity.ensure_room(self._redis, size, f"storing jobs {report.jobs + 1}-{report.jobs + len(jobs)}")
        pipe = self._redis.pipeline(transaction=True)
        pipe.hincrby(meta, "total", len(block))
        order: list[str] = []
        for item in block:
            if isinstance(item, StoredJob):
                order.append(item.custom_id)
                report.jobs += 1
                report.by_model[item.model] = report.by_model.get(item.model, 0) + 1
                continue
            report.errors += 1
            line = records.error_line(item.custom_id, item.code, item.message, item.line, item.param)
            if item.keyed and item.custom_id is not None:
                order.append(item.custom_id)
                self._batches.store_outcomes(batch_id, [item.custom_id, "error", line, 0, 0, 0, "0"], pipe)
            else:
                pipe.rpush(keys.batch_input_errors(batch_id), line)
                pipe.hincrby(meta, "failed", 1)
                order.append(f"{INPUT_ERROR_MARK}{input_errors}")
                input_errors += 1
        if jobs:
            pipe.hset(keys.batch_jobs(batch_id), mapping=jobs)  # type: ignore[arg-type]
            self._count_by_model(batch_id, [item for item in block if isinstance(item, StoredJob)], pipe)
        if order:
            pipe.rpush(keys.batch_order(batch_id), *order)
        pipe.hset(meta, "input_errors", input_errors)
        pipe.execute()
        return input_errors

    @staticmethod
    def _count_by_model(batch_id: str, jobs: Sequence[StoredJob], pipe: redis.client.Pipeline) -> None:
        """Add the block's jobs and their charges to the per-model counters (keys.batch_models),
        in the block's transaction: progress and ETA then read counters, never the jobs. Jobs of an
        account's own queue are counted per queue too (``queue:<name>``): the deferred mover sends
        a batch's jobs back to their queue without reading them when all went to one."""
        by_model: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        by_queue: dict[str, int] = defaultdict(int)
        for job in jobs:
            by_model[job.model][0] += 1
            by_model[job.model][1] += job.charge
            if job.account is not None:
                by_queue[queue_for(job.account)] += 1
        for model, (count, charge) in by_model.items():
            pipe.hincrby(keys.batch_models(batch_id), f"jobs:{model}", count)
            pipe.hincrby(keys.batch_models(batch_id), f"charge:{model}", charge)
        for queue, count in by_queue.items():
            pipe.hincrby(keys.batch_models(batch_id), f"queue:{queue}", count)

    def _publish_full(
        self,
        batch_id: str,
        block: Sequence[StoredJob | LineError],
        pending: dict[Chunking, list[str]],
        report: SubmitReport,
        publish: Publish,
    ) -> None:
        for item in block:
            if isinstance(item, StoredJob):
                chunk = pending[chunk_of(item)]
                chunk.append(item.custom_id)
                if len(chunk) >= self._chunk_size:
                    publish_on(publish, queue_for(item.account), batch_id, chunk)
                    report.chunks += 1
                    pending[chunk_of(item)] = []
