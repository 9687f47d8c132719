"""The contract between ratequeue.broker and the kombu / Celery internals it relies on, checked
against a real Redis broker: an upgrade of either that moves them fails here first.

Celery's consumer, on a lost connection, calls ``Connection.collect()`` and then
``Connection.close()``; with celery/kombu 5.7 the close crashed the worker with an AttributeError.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery.worker import state as worker_state
from kombu import Connection, Exchange, Queue
from kombu.transport import redis as kombu_redis

from ratequeue import broker

QUEUE = Queue("contract", Exchange("contract"), "contract")


def test_the_internals_overridden_or_read_exist() -> None:
    assert callable(kombu_redis.QoS.append) and callable(kombu_redis.QoS.restore_unacked)
    assert callable(kombu_redis.QoS.restore_visible) and callable(kombu_redis.Channel._connparams)
    assert isinstance(worker_state.active_requests, type(worker_state.reserved_requests))
    assert broker.Transport.Channel is broker.Channel and broker.Channel.QoS is broker.QoS
    # The holder record (issue 10): kombu's append copied, its removal extended, its restore reused.
    assert callable(kombu_redis.QoS._remove_from_indices) and callable(kombu_redis.QoS.pipe_or_acquire)
    assert callable(kombu_redis.Channel._do_restore_message)
    assert "unacked_key" in kombu_redis.Channel.from_transport_options  # options copied onto channels


class _RunningTask:
    """What ratequeue.broker reads of a Celery request: its task id."""

    def __init__(self, task_id: str) -> None:
        self.id = task_id


@pytest.fixture
def taken(redis_url: str) -> Iterator[tuple[Connection, Any, redis.Redis]]:
    """A connection through ratequeue's transport holding one unacked message (task id ``t-1``)."""
    conn = Connection(redis_url, transport=broker.TRANSPORT)
    conn.Producer().publish({"n": 1}, exchange=QUEUE.exchange, routing_key="contract", declare=[QUEUE],
                             headers={"id": "t-1"})
    message = QUEUE(conn.default_channel).get(no_ack=False)
    assert message is not None
    client = redis.Redis.from_url(redis_url)
    assert client.llen("contract") == 0 and client.hlen("unacked") == 1
    yield conn, message, client
    client.close()


def _lose_connection(conn: Connection) -> None:
    """What Celery 5.7's consumer does when the broker connection breaks."""
    conn.collect()
    conn.close()


def test_a_running_tasks_message_is_left_to_it_and_its_ack_still_works(
    taken: tuple[Connection, Any, redis.Redis]
) -> None:
    conn, message, client = taken
    running = _RunningTask("t-1")
    worker_state.active_requests.add(running)  # type: ignore[arg-type]
    try:
        _lose_connection(conn)  # the stock transport gives it back here: run twice at once
    finally:
        worker_state.active_requests.discard(running)  # type: ignore[arg-type]
    assert client.llen("contract") == 0 and client.hlen("unacked") == 1  # not requeued while it runs
    message.ack()  # through the detached channel, as the task does when it ends
    assert client.hlen("unacked") == 0 and client.llen("contract") == 0


def test_a_message_no_task_runs_is_given_back_at_once(taken: tuple[Connection, Any, redis.Redis]) -> None:
    conn, _, client = taken
    _lose_connection(conn)
    assert client.llen("contract") == 1 and client.hlen("unacked") == 0


def test_restore_visible_sweeps_through_an_apps_connection(redis_url: str) -> None:
    from ratequeue.config.settings import load_settings
    from ratequeue.queue import create_app

    app = create_app(load_settings({"RATEQUEUE_REDIS_URL": redis_url}), set_as_current=False)
    broker.restore_visible(app)  # an empty sweep: the internals it reaches exist and answer
