"""``python -m worker``: start a ratequeue Celery worker (what ``ratequeue worker`` runs)."""

from __future__ import annotations

import os
import socket
import sys

from config.settings import load_settings


def worker_argv(extra: list[str] | None = None) -> list[str]:
    """Celery worker arguments: threads pool of ``worker_slots``, ratequeue's queue, no chatter."""
    settings = load_settings()
    return [
        "worker",
        "--pool=threads",
        f"--concurrency={settings.worker_slots}",
        "--queues=ratequeue",
        "--without-gossip",
        "--without-mingle",
        f"--loglevel={settings.log_level}",
        f"--hostname=ratequeue-{os.getpid()}@{socket.gethostname()}",
        *(extra or []),
    ]


def main(extra: list[str] | None = None) -> None:
    from worker.app import app

    app.worker_main(worker_argv(extra if extra is not None else sys.argv[1:]))


if __name__ == "__main__":
    main()
