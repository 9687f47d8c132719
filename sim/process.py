"""Run the simulator as a subprocess: the handle tests, benchmarks and dry runs use.

    with start_sim(["--model", "gpt-4o:rpm=60:tpm=30000"]) as sim:
        client = httpx.Client(base_url=sim.url)
        ...
        assert sim.stats()["r429"]["tokens"] == 0
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

_READY = re.compile(r"ratequeue-sim listening on (http://\S+)")


class SimError(RuntimeError):
    """The simulator did not start, died, or refused a control request."""


class SimHandle:
    """A running simulator process; ``url`` is its base URL (no trailing slash)."""

    def __init__(self, process: subprocess.Popen[str], url: str, output: deque[str]) -> None:
        self.process = process
        self.url = url
        self._output = output

    @property
    def output(self) -> str:
        """The last lines the process printed (stdout and stderr), for diagnostics."""
        return "".join(self._output)

    def _call(
        self, method: str, path: str, payload: dict[str, Any] | None = None, timeout: float = 10
    ) -> Any:
        data = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise SimError(f"{method} {path}: {exc.code} {exc.read().decode(errors='replace')}") from exc
        except OSError as exc:
            raise SimError(f"{method} {path}: {exc}\n{self.output}") from exc

    def stats(self, timeline: bool = True) -> dict[str, Any]:
        """``GET /sim/stats``: counts by status, 429s by type, spend, timeline, calls_by_client_id."""
        return dict(self._call("GET", "/sim/stats" + ("" if timeline else "?timeline=0")))

    def configure(self, **options: Any) -> dict[str, Any]:
        """``POST /sim/config`` (e.g. ``fail_rate=0.1``, ``models={"gpt-4o": {"tpm": 1000}}``); returns
        the new configuration. Raises SimError when an option is refused."""
        return dict(self._call("POST", "/sim/config", options))

    def config(self) -> dict[str, Any]:
        """``GET /sim/config``: the current configuration."""
        return dict(self._call("GET", "/sim/config"))

    def reset(self) -> None:
        """``POST /sim/reset``: clear statistics and spend, refill every bucket."""
        self._call("POST", "/sim/reset", {})

    def daily_reset(self) -> None:
        """``POST /sim/daily-reset``: a new day for Azure's daily quotas (nothing else changes)."""
        self._call("POST", "/sim/daily-reset", {})

    def healthy(self) -> bool:
        """True when ``/health`` answers."""
        try:
            return bool(self._call("GET", "/health", timeout=2)["status"] == "ok")
        except SimError:
            return False

    def stop(self, timeout: float = 5) -> int:
        """Terminate the process (SIGTERM, then SIGKILL after ``timeout`` s); returns its exit code."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        return self.process.returncode

    def __enter__(self) -> SimHandle:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _drain(
    process: subprocess.Popen[str], output: deque[str], found: list[str], ready: threading.Event
) -> None:
    """Read the child's output for its whole life, so a full pipe never blocks it."""
    assert process.stdout is not None
    for line in process.stdout:
        output.append(line)
        if not found:
            match = _READY.search(line)
            if match:
                found.append(match.group(1))
                ready.set()
    ready.set()  # EOF: the process ended


def start_sim(args: Sequence[str] = (), timeout: float = 15, python: str | None = None) -> SimHandle:
    """Start ``python -m ratequeue.sim --port 0 *args`` and wait until ``/health`` answers.

    ``timeout`` is in seconds. Raises SimError (with the process output) if it exits or is not ready in time.
    """
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    process = subprocess.Popen(
        [python or sys.executable, "-m", "ratequeue.sim", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,  # a terminal's Ctrl-C reaches its parent only, which stops it in order
    )
    output: deque[str] = deque(maxlen=200)
    found: list[str] = []
    ready = threading.Event()
    reader = threading.Thread(
        target=_drain, args=(process, output, found, ready), daemon=True, name="sim-output"
    )
    reader.start()
    deadline = time.monotonic() + timeout
    ready.wait(timeout)
    if not found:
        try:
            code = process.wait(1)
            problem = f"simulator exited with code {code}"
        except subprocess.TimeoutExpired:
            _kill(process)
            problem = f"simulator not ready after {timeout}s"
        raise SimError(f"{problem}:\n{''.join(output)}")
    handle = SimHandle(process, found[0], output)
    while not handle.healthy():
        if process.poll() is not None or time.monotonic() > deadline:
            _kill(process)
            raise SimError(f"simulator at {handle.url} never became healthy:\n{handle.output}")
        time.sleep(0.05)
    return handle


def _kill(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(5)
