"""kombu's Redis transport, made to survive a lost connection while tasks hold messages; the one
module of ratequeue that reaches into kombu's and Celery's internals (``tests/test_broker_contract.py``
checks them against a real broker, so an upgrade that moves them fails there first).

The fault (celery 5.7.0 / kombu 5.7.0, not in celery 5.5.3 / kombu 5.5.4): when the broker
connection breaks, Celery's ``Consumer.on_connection_error_after_connected`` first calls
``Connection.collect()``, which detaches the transport (``transport.client = None``), then
``Connection.close()``, which closes the default channel. Closing restores the channel's unacked
messages, which needs a fresh Redis pool, which reads its parameters from the detached
transport: ``AttributeError: 'NoneType' object has no attribute 'hostname'``. That error is not a
connection error, so Celery calls it unrecoverable and the worker exits with status 0. A related
upstream report is celery/celery#10205.

Three changes, on the channel and its QoS:

- A channel keeps the connection parameters it was opened with, so a detached channel can still
  reach Redis: the messages its running tasks hold are acked or given back through it once Redis
  answers again.
- Closing after a lost connection does not push back messages that tasks are still running.
  Celery 5.7 would requeue them at once, and when Redis is back by then another worker would run
  the same jobs while this one is still calling upstream for them (paid twice). Their tasks ack
  or reject them when they end; a worker killed meanwhile leaves them to the visibility timeout.
  Messages received but not started are still given back at once.
- A message taken off the queue is recorded as unacked before it is handed to Celery; when Redis
  is full (``maxmemory``, noeviction) that write is refused. kombu then raised, the message
  (already popped) was lost and the worker exited ("Unrecoverable error: OutOfMemoryError"). Here
  the write is retried until Redis has room again, with the message held in memory meanwhile.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker import state as worker_state
from kombu.transport import redis as kombu_redis
from redis.exceptions import OutOfMemoryError
from tenacity import Retrying, retry_if_exception_type, wait_exponential

from ratequeue.retrying import warn_every

log = logging.getLogger(__name__)

#: The value of Celery's ``broker_transport`` setting that selects this transport.
TRANSPORT = "ratequeue.broker:Transport"


def worker_stopping() -> bool:
    """True once Celery's worker was told to stop (warm or cold): waits should end."""
    return bool(worker_state.should_stop or worker_state.should_terminate)


def _running_task_ids() -> set[str]:
    """Ids of the tasks this worker process is running now (Celery's own bookkeeping)."""
    return {request.id for request in tuple(worker_state.active_requests)}


class QoS(kombu_redis.QoS):
    def append(self, message: Any, delivery_tag: Any) -> None:
        """Record a delivered message as unacked; while Redis is full, wait for room (see module doc)."""
        try:  # every delivery passes here: the retry loop is built only when Redis is full
            super().append(message, delivery_tag)
            return
        except OutOfMemoryError:
            pass
        held = warn_every(log, 30.0, "Redis is full; holding a received message until it has room: %s")
        Retrying(retry=retry_if_exception_type(OutOfMemoryError), wait=wait_exponential(multiplier=0.1, max=2.0),
                 before_sleep=held, reraise=True)(super().append, message, delivery_tag)

    def restore_unacked(self, client: Any = None) -> list[Any]:
        """Give back unacked messages, except those whose task is still running (see module doc)."""
        running = _running_task_ids()
        delivered: dict[Any, Any] = getattr(self, "_delivered")  # noqa: B009 (kombu annotates it as None)
        kept = {tag: message for tag, message in delivered.items() if (message.headers or {}).get("id") in running}
        for tag in kept:
            del delivered[tag]
        if kept:
            log.warning(
                "broker connection closed with %d message(s) still running: left to their tasks to ack", len(kept)
            )
        try:
            return list(super().restore_unacked(client) or [])
        finally:
            delivered.update(kept)


class Channel(kombu_redis.Channel):
    QoS = QoS
    _opened_with: dict[bool, dict[str, Any]]

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        """The Redis connection parameters, remembered for when the transport is detached."""
        saved = self.__dict__.setdefault("_opened_with", {})
        if self.connection.client is None and asynchronous in saved:
            return dict(saved[asynchronous])
        params: dict[str, Any] = super()._connparams(asynchronous=asynchronous)
        saved[asynchronous] = dict(params)
        return params


class Transport(kombu_redis.Transport):
    Channel = Channel


def restore_visible(app: Any, num: int = 100) -> None:
    """Put messages of killed workers (unacked past the visibility timeout) back on the queue.

    kombu sweeps only when a consumer's poll comes back empty, so a busy fleet could leave a dead
    worker's chunks invisible for long; every worker also sweeps on a timer (a Redis mutex in
    kombu keeps the sweeps from overlapping).
    """
    with app.connection_for_write() as conn:
        conn.default_channel.qos.restore_visible(num=num, interval=1)
