"""Shared fixtures: the real Redis on 6379 (a database of its own), the simulator, workers; the
one way tests wait for background work (`wait_until`); and the test kinds (markers).

Test kinds, registered in pyproject.toml and selected with ``pytest -m unit`` (or ``integration``,
``e2e``, ``"not e2e"``):

    unit         no I/O beyond temporary files: pure functions, in-memory objects
    integration  the real Redis (the fixtures' database or a private redis-server) or an HTTP
                 server run inside the test process
    e2e          real worker processes or other subprocesses (simulator, CLI, Prometheus, ...)

A test marked explicitly (per test or with a module's ``pytestmark``) keeps its mark; any other
is marked by the fixtures it uses (`start_worker`: e2e; `redis_url`, `rclient`, `mredis`:
integration), else unit. Exactly one kind per test, so the groups partition the suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import redis

from ratequeue.producer.embedded import find_redis_server

# Databases of the shared Redis (127.0.0.1:6379 unless RATEQUEUE_TEST_REDIS_PORT says otherwise);
# overridable so that several suites can run at once. Under pytest-xdist each worker process (gwN)
# takes the pair 2N below, so parallel tests never flush each other's data.
TEST_REDIS_PORT = int(os.environ.get("RATEQUEUE_TEST_REDIS_PORT", "6379"))
_XDIST_OFFSET = 2 * int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
TEST_DB = int(os.environ.get("RATEQUEUE_TEST_DB", "15")) - _XDIST_OFFSET
REDIS_URL = f"redis://127.0.0.1:{TEST_REDIS_PORT}/{TEST_DB}"
METRICS_DB = int(os.environ.get("RATEQUEUE_TEST_METRICS_DB", "12")) - _XDIST_OFFSET
METRICS_REDIS_URL = f"redis://127.0.0.1:{TEST_REDIS_PORT}/{METRICS_DB}"  # the monitoring tests' own database
ROOT = Path(__file__).resolve().parent.parent

KINDS = ("unit", "integration", "e2e")
# The fixtures that make a test of a kind; the first kind found in this order wins.
_KIND_FIXTURES = {"e2e": {"start_worker"}, "integration": {"redis_url", "rclient", "mredis"}}


# Modules whose tests measure rates, shares or reaction times of real workers: they assert figures
# that other tests' processes on the same cores would skew. Marked `serial`: scripts/test runs them
# after the parallel part, one at a time, on an otherwise idle machine.
SERIAL_MODULES = frozenset({
    "test_azure_batch", "test_batch_control", "test_charge_rule_families", "test_charge_rule_learning",
    "test_fair_slots", "test_gate", "test_learning", "test_limiter_concurrency", "test_ops_prometheus",
    "test_progress_e2e", "test_routes_e2e", "test_selfhosted_e2e", "test_shared_account", "test_shared_opening",
    "test_shared_reprice", "test_shared_share", "test_window", "test_lone_deployment",
})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give each test without an explicit kind marker the kind of the fixtures it uses; mark the
    tests of SERIAL_MODULES `serial`."""
    for item in items:
        if item.path.stem in SERIAL_MODULES:
            item.add_marker("serial")
        if any(item.get_closest_marker(kind) for kind in KINDS):
            continue
        used = set(getattr(item, "fixturenames", ()))
        kind = next((k for k, fixtures in _KIND_FIXTURES.items() if used & fixtures), "unit")
        item.add_marker(kind)


def _explain(what: str, timeout: float, explain: Callable[[], object] | None) -> str:
    detail = f": {explain()}" if explain is not None else ""
    return f"timed out after {timeout} s waiting for {what}{detail}"


def wait_until(
    predicate: Callable[[], object],
    timeout: float,
    what: str = "the condition",
    poll: float = 0.05,
    explain: Callable[[], object] | None = None,
) -> None:
    """Poll `predicate` until it is true; fail the test after `timeout` seconds.

    The way to wait for background work (a worker, a server, a task): a fixed sleep is either too
    short on a loaded machine or wastes time on a fast one. `timeout` is the bound past which the
    behaviour counts as broken, so make it generous; `explain` adds context to the failure.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(_explain(what, timeout, explain))
        time.sleep(poll)


async def async_wait_until(
    predicate: Callable[[], object] | Callable[[], Awaitable[object]],
    timeout: float,
    what: str = "the condition",
    poll: float = 0.01,
    explain: Callable[[], object] | None = None,
) -> None:
    """`wait_until` for a test's own event loop: `predicate` may be a coroutine function, and the
    loop keeps running (the background task being waited for needs it) between polls."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(_explain(what, timeout, explain))
        await asyncio.sleep(poll)


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
