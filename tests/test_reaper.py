"""Dead workers noticed in seconds, not at the broker's visibility timeout (issue 10, finding 7).

The Redis operation itself (``ratequeue.broker.reclaim``, through ``worker.reaper.Reaper``) on a
real broker: a dead holder's messages go back to their queue exactly once, however many reapers
run at once; a live worker's messages are never touched. Then the issue's own test: ``kill -9``
of every worker mid-batch, new workers with default settings, every job done within 2 minutes
and none answered twice.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Queue

from ratequeue import broker
from ratequeue.config.settings import load_settings
from ratequeue.producer.api import Client
from ratequeue.queue import create_app
from ratequeue.sim.process import start_sim
from ratequeue.worker import metrics
from ratequeue.worker.metrics_server import Heartbeat, workers_key
from ratequeue.worker.reaper import LOCK_KEY, Reaper
from tests.conftest import base_env, wait_until

QUEUE = Queue("reap", Exchange("reap"), "reap")
RATEQUEUE = [sys.executable, "-c", "from ratequeue.producer.cli import entry; entry()"]  # the console script
StartWorker = Callable[[dict[str, str]], subprocess.Popen[bytes]]


class _Holder:
    """A consumer channel of ratequeue's transport, named like a worker, holding messages unacked."""

    def __init__(self, redis_url: str, name: str) -> None:
        self.conn = Connection(redis_url, transport=broker.TRANSPORT, transport_options={broker.HOLDER_OPTION: name})
        self.messages: list[Any] = []

    def take(self, n: int) -> list[Any]:
        for _ in range(n):
            message = QUEUE(self.conn.default_channel).get(no_ack=False)
            assert message is not None
            self.messages.append(message)
        return self.messages[-n:]

    def close(self) -> None:
        self.conn.release()


@pytest.fixture
def publish(redis_url: str) -> Iterator[Callable[[int, str], None]]:
    conn = Connection(redis_url, transport=broker.TRANSPORT)
    producer = conn.Producer()

    def send(n: int, prefix: str) -> None:
        for i in range(n):
            producer.publish({"n": f"{prefix}-{i}"}, exchange=QUEUE.exchange, routing_key="reap", declare=[QUEUE])

    yield send
    conn.release()


@pytest.fixture
def app(redis_url: str) -> Any:
    return create_app(load_settings({"RATEQUEUE_REDIS_URL": redis_url}), set_as_current=False)


def _queued(rclient: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in rclient.lrange("reap", 0, -1)]


def _bodies(rclient: redis.Redis) -> Counter[str]:
    return Counter(json.loads(base64.b64decode(m["body"]))["n"] for m in _queued(rclient))


def test_a_dead_holders_messages_go_back_exactly_once_under_concurrent_reapers(
    redis_url: str, rclient: redis.Redis, app: Any, publish: Callable[[int, str], None]
) -> None:
    publish(40, "dead")
    dead = _Holder(redis_url, "dead-worker")
    dead.take(40)
    publish(3, "live")
    live = _Holder(redis_url, "live-worker")
    live.take(3)
    try:
        held = broker.holders(rclient)
        assert {h: len(tags) for h, tags in held.items()} == {"dead-worker": 40, "live-worker": 3}
        counts: list[int] = []
        start = threading.Barrier(4)

        def reap() -> None:
            start.wait()
            counts.append(broker.reclaim(app, "dead-worker", held["dead-worker"]))

        threads = [threading.Thread(target=reap) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(counts) == 40  # four reapers, each message moved by one of them
        assert _bodies(rclient) == Counter({f"dead-{i}": 1 for i in range(40)})
        assert all(m["headers"]["redelivered"] for m in _queued(rclient))  # as kombu's restore marks them
        # The live worker's messages are untouched: still unacked, still its own.
        assert broker.holders(rclient) == {"live-worker": held["live-worker"]}
        assert set(rclient.hkeys("unacked")) == {t.encode() for t in held["live-worker"]}
        assert rclient.zcard("unacked_index") == 3
        for message in live.messages:  # its acks still work and clear its records
            message.ack()
        assert rclient.hlen(broker.HOLDERS_KEY) == 0 and rclient.hlen("unacked") == 0
    finally:
        dead.close()
        live.close()


def test_a_reclaimed_message_taken_by_another_worker_is_not_reclaimed_again(
    redis_url: str, rclient: redis.Redis, app: Any, publish: Callable[[int, str], None]
) -> None:
    publish(1, "m")
    dead, live = _Holder(redis_url, "dead-worker"), _Holder(redis_url, "live-worker")
    try:
        [first] = dead.take(1)
        stale_view = broker.holders(rclient)  # a reaper read this before another moved the message
        assert broker.reclaim(app, "dead-worker", stale_view["dead-worker"]) == 1
        [again] = live.take(1)  # redelivered under the same delivery tag
        assert again.delivery_tag == first.delivery_tag
        assert broker.reclaim(app, "dead-worker", stale_view["dead-worker"]) == 0
        assert rclient.llen("reap") == 0 and broker.holders(rclient) == {"live-worker": [first.delivery_tag]}
        again.reject(requeue=True)  # a chunk given back (Reject): kombu's restore clears the record too
        assert rclient.llen("reap") == 1 and broker.holders(rclient) == {} and rclient.hlen("unacked") == 0
    finally:
        dead.close()
        live.close()


def test_the_reaper_takes_back_only_stale_or_silent_holders_and_never_its_own(
    redis_url: str, rclient: redis.Redis, app: Any, publish: Callable[[int, str], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = time.time()
    rclient.zadd(workers_key(), {"stale": now - 31, "fresh": now})
    holders = {name: _Holder(redis_url, name) for name in ("stale", "fresh", "me", "silent")}
    try:
        for name, holder in holders.items():
            publish(2, name)
            holder.take(2)
        heartbeat = Heartbeat(rclient, "me")
        heartbeat.beat()
        reaper = Reaper(rclient, app, heartbeat, stale_after=1.0)
        # Its own beats went through for less than the stale bound: a worker just back from a
        # Redis outage judges nobody (everyone was silent).
        assert reaper.reap() == {}
        wait_until(lambda: heartbeat.steady_for() >= 1.0, 10, "a steady second of heartbeats")
        rclient.zadd(workers_key(), {"fresh": time.time(), "me": now - 120})  # never reaps itself
        before = metrics.CHUNKS_RECLAIMED._value.get()
        with caplog.at_level(logging.WARNING, logger="ratequeue.worker.reaper"):
            assert reaper.reap() == {"stale": 2, "silent": 2}
        assert sorted(_bodies(rclient)) == ["silent-0", "silent-1", "stale-0", "stale-1"]
        assert sorted(broker.holders(rclient)) == ["fresh", "me"]
        assert metrics.CHUNKS_RECLAIMED._value.get() == before + 4
        warnings = sorted(r.getMessage() for r in caplog.records)
        assert warnings[0] == "worker silent has no heartbeat: 2 chunk(s) it held given back to the queue"
        assert re.fullmatch(r"worker stale missed its heartbeats for 3\d s: 2 chunk\(s\) it held given back to "
                            r"the queue", warnings[1]) and len(warnings) == 2
        rclient.zadd(workers_key(), {"fresh": now - 60})
        assert reaper.reap() == {}  # one pass per interval (5 s) across the fleet: not its turn yet
        rclient.delete(LOCK_KEY)
        assert reaper.reap() == {"fresh": 2}
        rclient.delete(LOCK_KEY)
        assert reaper.reap() == {}  # nothing left: the dead are forgotten with their last message
    finally:
        for holder in holders.values():
            holder.close()


def test_a_heartbeat_is_steady_only_while_its_beats_go_through_on_time(rclient: redis.Redis) -> None:
    heartbeat = Heartbeat(rclient, "me", interval=0.1)
    assert heartbeat.steady_for() == 0.0  # never beat
    heartbeat.beat()
    wait_until(lambda: heartbeat.steady_for() > 0.05, 5, "a steady spell")
    wait_until(lambda: heartbeat.steady_for() == 0.0, 5, "a beat overdue (a paused process) to end it")
    with socket.socket() as s:  # a port nothing listens on: Redis away
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    away = Heartbeat(redis.Redis(port=port, socket_connect_timeout=0.5), "me", interval=0.1)
    away.beat()
    assert away.steady_for() == 0.0


def _jobs(n: int) -> list[dict[str, Any]]:
    return [{"custom_id": f"k-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"item {i}"}],
                      "max_tokens": 20}} for i in range(n)]


@pytest.mark.e2e
@pytest.mark.timeout(300)
@pytest.mark.parametrize("resume", [False, True], ids=["new-workers", "new-workers-and-cli-resume"])
def test_every_worker_killed_mid_batch_new_workers_with_defaults_finish_it_within_two_minutes(
    redis_url: str, tmp_path: Path, start_worker: StartWorker, resume: bool
) -> None:
    """Without ``resume`` the reaper alone brings the batch back; with it, ``ratequeue resume``
    (a silent no-op before: its chunks found the jobs leased by the dead run, and their re-checks
    were lost in a race with the deferred mover) must not get in the way nor run a job twice."""
    jobs = 400
    # 1,200 RPM: the batch takes ~20 s, so the kill lands with chunks held and calls in flight.
    with start_sim(["--rpm", "1200", "--tpm", "10000000", "--latency-ms", "500"]) as sim:
        env = base_env(redis_url, sim.url, tmp_path)  # default settings: visibility timeout 30 min
        first = [start_worker(env), start_worker(env)]
        client = Client(load_settings(env))
        batch_id = client.submit_batch(_jobs(jobs)).batch_id
        wait_until(lambda: client.status(batch_id)["request_counts"]["completed"] >= 60, 60, "60 jobs done")
        for worker in first:
            worker.send_signal(signal.SIGKILL)
        for worker in first:
            worker.wait()
        killed_at = time.monotonic()
        time.sleep(1.0)  # answers to calls in flight at the kill reach the simulator's counts
        stored = {line["custom_id"] for line in client.iter_results(batch_id)}
        called = set(sim.stats(timeline=False)["calls_by_client_id"])
        assert 0 < len(stored) < jobs and client.redis.hlen("unacked") > 0  # chunks held by the dead

        if resume:
            cli = subprocess.run([*RATEQUEUE, "resume", batch_id],
                                 env=env, capture_output=True, text=True, timeout=60)
            assert (cli.returncode, cli.stdout) == (0, f"{jobs - len(stored)} jobs re-enqueued\n")
            assert cli.stderr == f"redis: {redis_url}\n"  # the one line naming the Redis used
        start_worker(env), start_worker(env)
        wait_until(lambda: client.status(batch_id)["status"] == "completed", 120 - (time.monotonic() - killed_at),
                   "the batch to complete within 2 minutes of the kill",
                   explain=lambda: (client.status(batch_id)["request_counts"], client.overview()["deferred_jobs"]))
        results = list(client.iter_results(batch_id))
        errors = list(client.iter_results(batch_id, errors=True))
        answers = sim.stats(timeline=False)["answers_by_client_id"]
    assert errors == []
    assert Counter(line["custom_id"] for line in results) == Counter({f"k-{i}": 1 for i in range(jobs)})
    per_job = Counter({cid.split("/", 1)[1]: n for cid, n in answers.items()})
    assert set(per_job) == {f"k-{i}" for i in range(jobs)}
    # Paid twice only for a call already made, not yet stored, when its worker was killed.
    paid_twice = {cid for cid, n in per_job.items() if n > 1}
    in_flight_at_kill = {cid.split("/", 1)[1] for cid in called} - stored
    assert max(per_job.values()) <= 2 and paid_twice <= in_flight_at_kill
    assert client.redis.hlen("unacked") == 0 and client.redis.hlen(broker.HOLDERS_KEY) == 0
    logs = "".join((tmp_path / f"worker-{i}.log").read_text() for i in (2, 3))
    assert "missed its heartbeats" in logs and "chunk(s) it held given back to the queue" in logs
