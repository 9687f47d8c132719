"""Serving a process's metrics over HTTP, whatever Celery pool runs the jobs, and the worker heartbeat.

Threads pool (ratequeue's default): one process, so ``/metrics`` serves prometheus-client's default
registry. Prefork pool: the jobs run in child processes. Start the worker with
``PROMETHEUS_MULTIPROC_DIR`` set to an empty directory; prometheus-client then keeps every
process's values in files there, :func:`registry` returns a registry that merges them
(``MultiProcessCollector``), and :func:`mark_process_dead` must be called when a child exits so that
its live gauges (in-flight requests) stop counting. Which mode is active is what prometheus-client
decided at import (it reads the variable itself), so it is read back from the library rather than
from the environment.

A prefork child killed by a signal runs no exit hook, so its live gauges (in-flight requests,
busy slots) would count for ever: each scrape first forgets the live-gauge files of processes
that are gone (:func:`forget_dead_processes`). The directory is emptied when the worker starts
(``worker.multiproc.wipe_multiprocess_dir``): a restarted worker (often the same pid in a
container) must not carry the old counts. The serving process's own CPU and memory
(``process_*``) are exported in both modes.

The heartbeat is how the exporter counts live workers without scraping them, and how the reaper
(``worker.reaper``) tells dead workers: every `interval` seconds each worker writes its name and
Redis's time into one sorted set (:func:`workers_key`).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
import uuid
from typing import Any

import redis
from prometheus_client import REGISTRY, CollectorRegistry, ProcessCollector, multiprocess, start_http_server, values

from ratequeue.jobstore.heartbeats import (
    HEARTBEAT_FORGET_SECONDS,
    HEARTBEAT_STALE_SECONDS,
    worker_addresses_key,
    workers_key,
)
from ratequeue.jobstore.scripts import lua_source

log = logging.getLogger(__name__)

__all__ = [
    "HEARTBEAT_STALE_SECONDS",
    "Heartbeat",
    "forget_dead_processes",
    "mark_process_dead",
    "multiprocess_mode",
    "registry",
    "start_metrics_server",
    "stop_metrics_server",
    "worker_name",
    "workers_key",
]


_servers: list[Any] = []


def worker_name() -> str:
    """A name for this worker process, unique even across restarts: a restarted container often
    has the same host name and pid, and the reaper must never take a live worker for the dead one
    whose name it reused (``worker.reaper``)."""
    return f"ratequeue-{os.getpid()}-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"


def multiprocess_mode() -> bool:
    """True when prometheus-client keeps values in ``PROMETHEUS_MULTIPROC_DIR`` files (prefork)."""
    return values.ValueClass is not values.MutexValue


def registry() -> CollectorRegistry:
    """The registry to expose: the default one, or one merging every process's files (prefork).

    An HTTP API can mount it too: ``prometheus_client.make_asgi_app(registry=registry())``.
    """
    if not multiprocess_mode():
        return REGISTRY
    merged = CollectorRegistry()
    _LiveProcessesCollector(merged)
    ProcessCollector(registry=merged)
    return merged


class _LiveProcessesCollector(multiprocess.MultiProcessCollector):
    """The merge of every process's files, after forgetting the live gauges of dead processes."""

    def collect(self) -> Any:
        forget_dead_processes(self._path)
        return super().collect()


_PID_OF_FILE = re.compile(r"^gauge_live\w*_(\d+)\.db$")


def forget_dead_processes(path: str) -> list[int]:
    """Mark dead every process with live-gauge files in `path` that no longer runs (a prefork
    child killed by a signal never says so itself); returns their pids."""
    dead: list[int] = []
    try:
        names = os.listdir(path)
    except OSError:
        return dead
    for pid in {int(m.group(1)) for name in names if (m := _PID_OF_FILE.match(name))}:
        if pid != os.getpid() and not _running(pid):
            multiprocess.mark_process_dead(pid, path)
            dead.append(pid)
    return dead


def _running(pid: int) -> bool:
    """Does `pid` run (a zombie, killed and not yet reaped, does not)?"""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # no /proc (not Linux): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def start_metrics_server(port: int | None, addr: str = "127.0.0.1") -> int | None:
    """Serve ``/metrics`` on `addr`:`port` from a daemon thread; returns the port bound.

    None or a port that cannot be bound (in use, no permission) logs and returns None: a worker
    without metrics still runs its jobs. Port 0 binds a free port.
    """
    if port is None:
        return None
    try:
        server, _thread = start_http_server(port, addr=addr, registry=registry())
    except OSError as exc:
        log.warning("metrics: cannot serve on %s:%s (%s); this process exports no metrics", addr, port, exc)
        return None
    _servers.append(server)
    bound = int(server.server_port)
    log.info("metrics: serving http://%s:%d/metrics", addr, bound)
    return bound


def stop_metrics_server() -> None:
    """Stop every server :func:`start_metrics_server` started in this process."""
    while _servers:
        server = _servers.pop()
        server.shutdown()
        server.server_close()


def mark_process_dead(pid: int) -> None:
    """Forget an exited child's live gauges (prefork); does nothing in single-process mode."""
    if multiprocess_mode():
        multiprocess.mark_process_dead(pid)


class Heartbeat:
    """A daemon thread that writes ``name -> now`` into :func:`workers_key` every `interval` seconds.

    ``stop()`` removes the entry, so a worker shut down cleanly stops counting at once; a killed one
    stops counting after ``HEARTBEAT_STALE_SECONDS``. Redis errors are logged and retried.
    ``address`` (``heartbeats.advertised_address``) is where Prometheus scrapes this worker: each
    beat writes it too, and the exporter lists it (``/sd/workers``) for an hour after the last beat.
    :meth:`steady_for` tells the reaper how long this worker's own beats have gone through.
    """

    def __init__(
        self, client: redis.Redis, name: str | None = None, interval: float = 5.0, address: str | None = None
    ) -> None:
        self._redis = client
        self.address = address
        self._beat = client.register_script(lua_source("heartbeat", "ratequeue.worker"))
        self.name = name or worker_name()
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ratequeue-heartbeat", daemon=True)
        self._steady_since: float | None = None  # monotonic: since when every beat went through on time
        self._last_ok = 0.0

    def start(self) -> Heartbeat:
        self.beat()
        self._thread.start()
        return self

    def beat(self) -> None:
        """Write one heartbeat now, at Redis's clock (and drop entries older than an hour)."""
        try:
            self._beat(keys=[workers_key(), worker_addresses_key()],
                       args=[self.name, HEARTBEAT_FORGET_SECONDS, self.address or ""])
        except redis.RedisError as exc:
            self._steady_since = None
            log.warning("heartbeat: %s", exc)
            return
        ok = time.monotonic()
        if self._steady_since is None or ok - self._last_ok > 2 * self._interval:
            self._steady_since = ok
        self._last_ok = ok

    def steady_for(self) -> float:
        """Seconds for which every beat of this worker reached Redis on time; 0 after a failed or a
        late one. Another worker's silence means it is dead only to a worker that was itself heard
        all along: a Redis outage, or a pause of the whole host, silences every worker at once."""
        now = time.monotonic()
        if self._steady_since is None or now - self._last_ok > 2 * self._interval:
            return 0.0
        return now - self._steady_since

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        try:
            self._redis.zrem(workers_key(), self.name)
            self._redis.hdel(worker_addresses_key(), self.name)  # stopped, not down: no longer scraped
        except redis.RedisError as exc:
            log.warning("heartbeat: cannot remove %s: %s", self.name, exc)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.beat()
