"""Where `ratequeue run` keeps its Redis, AOF and worker logs, and who may use it.

Unless the user names a data directory, each input gets its own:
``<data root>/runs/<first 16 hex of sha256(input bytes)>``. The same input finds the same
directory again (its batch can be continued), different inputs never share Redis, AOF or logs.
A lock file (``fcntl.flock``, released by the kernel when its process ends, however it ends)
keeps two runs out of one directory at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from ratequeue.errors import ConfigError

LOCK_NAME = "run.lock"


def run_data_dir(root: Path, input_digest: str) -> Path:
    """The data directory of one input under the data root."""
    return root / "runs" / input_digest[:16]


class DataDirBusyError(ConfigError):
    """Another process holds the data directory's lock."""


@contextlib.contextmanager
def hold_data_dir(data_dir: Path) -> Iterator[Path]:
    """Hold ``data_dir``'s lock for the block; raises ``DataDirBusyError`` naming the holder's pid.

    The lock file's descriptor is close-on-exec, so no child inherits it: the lock dies with this
    process, not with its workers."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise DataDirBusyError(
                f"data directory {data_dir} is in use by another ratequeue process (pid {holder}); "
                "wait for it to end, or pass --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield data_dir
    finally:
        os.close(fd)  # releases the lock
