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

Who holds what (issue 10): kombu knows which messages are unacked, not who holds them, so a
killed worker's chunks waited out the visibility timeout (30 min). A worker's channels name it
(transport option ``ratequeue_holder``, the worker's heartbeat name): a message it takes is
recorded in :data:`HOLDERS_KEY` (delivery tag -> holder) in the same MULTI as kombu's ``unacked``
hash and ``unacked_index``, and the record goes with them on ack, reject or restore.
:func:`reclaim` gives a dead holder's messages back (``worker.reaper`` decides who is dead).
"""

from __future__ import annotations

import logging
from time import time
from typing import Any

import redis
from celery.worker import state as worker_state
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads
from redis.exceptions import OutOfMemoryError
from tenacity import Retrying, retry_if_exception_type, wait_exponential

from ratequeue.retrying import warn_every

log = logging.getLogger(__name__)

#: The value of Celery's ``broker_transport`` setting that selects this transport.
TRANSPORT = "ratequeue.broker:Transport"
#: The transport option naming the worker whose channels hold the messages they take.
HOLDER_OPTION = "ratequeue_holder"
#: Hash: delivery tag -> the holder of that unacked message (beside kombu's ``unacked`` hash).
HOLDERS_KEY = "rq:unacked:holders"


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
            self._record_unacked(message, delivery_tag)
            return
        except OutOfMemoryError:
            pass
        held = warn_every(log, 30.0, "Redis is full; holding a received message until it has room: %s")
        Retrying(retry=retry_if_exception_type(OutOfMemoryError), wait=wait_exponential(multiplier=0.1, max=2.0),
                 before_sleep=held, reraise=True)(self._record_unacked, message, delivery_tag)

    def _record_unacked(self, message: Any, delivery_tag: Any) -> None:
        """kombu's ``QoS.append`` (same keys, same values), plus the holder, in one MULTI."""
        holder = getattr(self.channel, HOLDER_OPTION)
        if holder is None:  # not a worker's channel (a producer's, a test's): kombu's own
            super().append(message, delivery_tag)
            return
        delivery = message.delivery_info
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(self.unacked_index_key, {delivery_tag: time()})
            pipe.hset(self.unacked_key, delivery_tag, dumps([message._raw, delivery["exchange"],
                                                              delivery["routing_key"]]))
            pipe.hset(HOLDERS_KEY, delivery_tag, holder)
            pipe.execute()
        virtual.QoS.append(self, message, delivery_tag)

    def _remove_from_indices(self, delivery_tag: Any, pipe: Any = None) -> Any:
        """kombu's removal (on ack, reject and restore), which drops the holder's record too."""
        return super()._remove_from_indices(delivery_tag, pipe).hdel(HOLDERS_KEY, delivery_tag)

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
    ratequeue_holder: str | None = None  # set from the transport option of the same name
    # kombu copies these transport options onto the channel (its stub types the exact tuple)
    from_transport_options = (*kombu_redis.Channel.from_transport_options, HOLDER_OPTION)  # type: ignore[assignment]

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


def holders(client: redis.Redis) -> dict[str, list[str]]:
    """Who holds which unacked messages: holder -> delivery tags (read from :data:`HOLDERS_KEY`)."""
    held: dict[str, list[str]] = {}
    for tag, holder in client.hgetall(HOLDERS_KEY).items():
        held.setdefault(bytes_to_str(holder), []).append(bytes_to_str(tag))
    return held


def reclaim(app: Any, holder: str, tags: list[str]) -> int:
    """Put back on their queue the messages among ``tags`` that ``holder`` still holds, exactly as
    kombu's ``restore_by_tag`` would (same queue, priority step and ``redelivered`` flag); returns
    how many were put back.

    Each message moves in one WATCH/MULTI transaction that re-reads its holder: a message another
    reaper put back first, or acked meanwhile, or taken since by another worker (the same delivery
    tag comes back with a redelivered message), is left alone. Safe to run from any number of
    processes at once.
    """
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        with channel.conn_or_acquire() as client:
            return sum(_restore_if_held(channel, client, holder, tag) for tag in tags)


def _restore_if_held(channel: Any, client: redis.Redis, holder: str, tag: str) -> bool:
    def move(pipe: Any) -> bool:
        held_by = pipe.hget(HOLDERS_KEY, tag)
        raw = pipe.hget(channel.unacked_key, tag)
        pipe.multi()
        if held_by is None or bytes_to_str(held_by) != holder:
            return False
        channel.qos._remove_from_indices(tag, pipe)
        if raw is None:  # kombu's Channel._restore drops the unacked entry alone: only the record was left
            return False
        payload, exchange, routing_key = loads(bytes_to_str(raw))
        channel._do_restore_message(payload, exchange, routing_key, pipe)
        return True

    # value_from_callable: the transaction returns move's answer (redis-py types the callable as -> None)
    return bool(client.transaction(move, HOLDERS_KEY, channel.unacked_key,  # type: ignore[arg-type]
                                   value_from_callable=True))
