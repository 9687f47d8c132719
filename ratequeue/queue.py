"""The Celery application of workers and producers alike: broker settings chosen for a job queue
that must not lose or repeat jobs.

- acks_late + reject_on_worker_lost: a message is acked only after its jobs are stored or
  deferred; a killed worker's messages come back.
- prefetch multiplier 1 with a threads pool of ``worker_slots``: a worker holds no more chunks
  than it is running (no hoarding while other workers idle).
- no result backend: it halves throughput, and outcomes live in ratequeue's own store.
- the visibility timeout bounds how long a killed worker's chunk stays invisible; a live worker
  never holds a chunk that long, because a job that must wait more than ``defer_after_seconds``
  is moved to Redis's deferred set and its chunk acked (Celery countdown/ETA is never used).
- kombu's Redis pool sized to the slots (its default of 10 loses acks under concurrency).
- kombu's Redis transport with fixes (``ratequeue.broker``): with celery/kombu 5.7 a worker
  holding messages exited when Redis went away.
- a queue per account (``queue_for``): a chunk of an account's jobs goes to that account's own
  queue, which only workers holding its key consume (``worker_queues``), so a worker without the
  key never takes them (before: it took them from the shared queue, deferred them and noted them
  for a worker with the key, each chunk a round trip). Jobs of no account (no ``[accounts]``, or
  a model with several routes) stay on the shared queue, ``ratequeue``, as before accounts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from celery import Celery

from ratequeue.broker import TRANSPORT
from ratequeue.config.settings import Settings
from ratequeue.redis_tls import broker_use_ssl

QUEUE = "ratequeue"
ACCOUNT_QUEUE_PREFIX = f"{QUEUE}.account."  # + an account alias (letters, digits, '.', '-', '_')
RUN_CHUNK = "ratequeue.run_chunk"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def create_app(settings: Settings, set_as_current: bool = True, tasks: Sequence[str] = ()) -> Celery:
    """A Celery app wired to ``settings.redis_url`` (the local default when unset).

    ``tasks`` names the modules that define tasks (the worker's); a producer needs none: it sends
    tasks by name.
    """
    url = settings.redis_url or DEFAULT_REDIS_URL
    app = Celery("ratequeue", broker=url, include=list(tasks), set_as_current=set_as_current)
    app.conf.update(
        broker_transport=TRANSPORT if url.startswith(("redis://", "rediss://")) else None,
        broker_use_ssl=broker_use_ssl(settings),  # rediss:// verified (kombu alone checks nothing)
        task_default_queue=QUEUE,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        result_backend=None,
        worker_prefetch_multiplier=1,
        worker_concurrency=settings.worker_slots,
        worker_pool="threads",
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            "max_connections": settings.worker_slots * 2 + 10,
            "socket_keepalive": True,
            "health_check_interval": 10,
            # A consumer sweeps for messages of killed workers on every idle poll, not every 10th,
            # and a sweeper killed while holding kombu's mutex blocks others for 60 s, not 300.
            "unacked_restore_throttle": 1,
            "unacked_mutex_expire": 60,
        },
        broker_pool_limit=settings.worker_slots + 4,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
    )
    return app


def queue_for(account: str | None) -> str:
    """The Celery queue of a chunk of `account`'s jobs (an alias): its own; None (no [accounts], or
    a job any of its model's routes may serve): the shared one."""
    return QUEUE if account is None else ACCOUNT_QUEUE_PREFIX + account


def worker_queues(held: Sequence[str]) -> list[str]:
    """The queues a worker holding the keys of the accounts `held` consumes: the shared one and theirs."""
    return [QUEUE, *(queue_for(account) for account in held)]


class Publish(Protocol):
    """Puts one chunk message (a batch id and up to ``chunk_size`` custom_ids) on `queue`."""

    def __call__(self, batch_id: str, custom_ids: Sequence[str], queue: str = QUEUE) -> None: ...


def publish_on(publish: Publish, queue: str, batch_id: str, custom_ids: Sequence[str]) -> None:
    """``publish`` a chunk on `queue`, named only when it is not the shared one: the shared queue's
    calls stay as they were before queues per account."""
    if queue == QUEUE:
        publish(batch_id, custom_ids)
    else:
        publish(batch_id, custom_ids, queue)


def publisher(settings: Settings) -> Publish:
    """A ``Publish`` on the broker of ``settings``; its app holds one connection pool."""
    app = create_app(settings, set_as_current=False)

    def publish(batch_id: str, custom_ids: Sequence[str], queue: str = QUEUE) -> None:
        send_chunk(app, batch_id, custom_ids, queue)

    return publish


def send_chunk(app: Celery, batch_id: str, custom_ids: Sequence[str], queue: str = QUEUE) -> None:
    """Put one chunk message (a batch id and up to ``chunk_size`` custom_ids) on ``app``'s `queue`
    (declared by the send: it holds the chunk even if no worker has consumed it yet)."""
    app.send_task(RUN_CHUNK, args=[batch_id, list(custom_ids)], queue=queue)
