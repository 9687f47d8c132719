"""The child processes of `ratequeue run` (workers, the embedded redis-server): started so that
only `run` decides when they stop.

A terminal's Ctrl-C sends SIGINT to its whole foreground process group. Children in that group
would each start their own shutdown at once (Celery's warm shutdown, redis-server's exit), under
`run`'s feet, and a second Ctrl-C would start Celery's cold shutdown. So each child gets a session
of its own (the terminal's signals reach `run` only, which stops them in order), and on Linux a
parent-death signal, so that none outlives `run` even when `run` is SIGKILLed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with(parent: int) -> Callable[[], None]:
    def prepare() -> None:  # runs in the child between fork and exec
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return prepare


def detached() -> dict[str, Any]:
    """``subprocess.Popen`` options: a session of its own; killed when this process dies (Linux)."""
    options: dict[str, Any] = {"start_new_session": True}
    if sys.platform.startswith("linux"):
        options["preexec_fn"] = _die_with(os.getpid())
    return options


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the child's process group (its session: the child and anything it started)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


class LocalWorkers:
    """``count`` worker processes (``python -m ratequeue.worker``) with their logs in ``log_dir``."""

    def __init__(self, count: int, env: Mapping[str, str], log_dir: Path) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen[bytes]] = []
        for n in range(count):
            with (log_dir / f"worker-{n}.log").open("ab") as log:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "ratequeue.worker"], env=dict(env), stdout=log,
                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **detached(),
                ))

    def stop(self, timeout: float) -> bool:
        """SIGTERM (Celery's warm shutdown: calls in flight get the workers' grace period, then
        their chunks are given back); SIGKILL whoever is still there after ``timeout`` seconds.
        Returns True when every worker stopped by itself."""
        for proc in self.alive():
            proc.send_signal(signal.SIGTERM)
        clean = True
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                clean = False
                kill_group(proc)
        return clean

    def kill(self) -> None:
        for proc in self.procs:
            kill_group(proc)

    def alive(self) -> Sequence[subprocess.Popen[bytes]]:
        return [proc for proc in self.procs if proc.poll() is None]
