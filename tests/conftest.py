"""Shared fixtures: the real Redis on 6379 (a database of its own), the simulator, workers."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from ratequeue.producer.embedded import find_redis_server

# Databases of the shared Redis on 6379; overridable so that several suites can run at once.
TEST_DB = int(os.environ.get("RATEQUEUE_TEST_DB", "15"))
REDIS_URL = f"redis://127.0.0.1:6379/{TEST_DB}"
METRICS_DB = int(os.environ.get("RATEQUEUE_TEST_METRICS_DB", "12"))
METRICS_REDIS_URL = f"redis://127.0.0.1:6379/{METRICS_DB}"  # the monitoring tests' own database
ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def private_redis(*args: str) -> Iterator[str]:
    """A redis-server of the test's own on a free port (no persistence); yields its URL.

    For tests that change the server's configuration (maxmemory) or stop it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    client.close()
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A clean Redis database on the real server (flushed before and after the test)."""
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield REDIS_URL
    client.flushdb()
    client.close()


@pytest.fixture
def mredis() -> Iterator[redis.Redis]:
    """A clean client of the monitoring tests' database (flushed before and after)."""
    client = redis.Redis.from_url(METRICS_REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def rclient(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def base_env(redis_url: str, sim_url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RATEQUEUE_", "OPENAI_"))}
    env.update(
        RATEQUEUE_REDIS_URL=redis_url,
        OPENAI_BASE_URL=sim_url,
        OPENAI_API_KEY="sk-test-0123456789abcdef",
        RATEQUEUE_DATA_DIR=str(tmp_path / "data"),
        RATEQUEUE_LOG_LEVEL="WARNING",
        PYTHONPATH=str(ROOT),
    )
    env.update(extra)
    return env


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], subprocess.Popen[bytes]]]:
    """Start `python -m ratequeue.worker` processes with an environment; all are stopped after the test."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"worker-{len(procs)}.log").open("ab")
        proc = subprocess.Popen([sys.executable, "-m", "ratequeue.worker"], env=env, stdout=log,
                                stderr=subprocess.STDOUT, cwd=ROOT)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + 20
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
