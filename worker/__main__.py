"""``python -m ratequeue.worker``: start a ratequeue Celery worker (what ``ratequeue worker`` runs)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any

from celery import signals

from ratequeue.config.accounts import AccountTable
from ratequeue.config.accounts_load import load_account_table
from ratequeue.config.settings import Settings, load_settings, shown_redis_url
from ratequeue.errors import ConfigError
from ratequeue.queue import QUEUE, worker_queues
from ratequeue.worker.multiproc import wipe_multiprocess_dir

log = logging.getLogger("ratequeue.worker")


def worker_argv(settings: Settings, extra: list[str] | None = None, queues: Sequence[str] = (QUEUE,)) -> list[str]:
    """Celery worker arguments: threads pool of ``worker_slots``, ratequeue's `queues` (the shared
    one, and those of the accounts this worker holds keys for: queue.worker_queues), no chatter."""
    return [
        "worker",
        "--pool=threads",
        f"--concurrency={settings.worker_slots}",
        f"--queues={','.join(queues)}",
        "--without-gossip",
        "--without-mingle",
        f"--loglevel={settings.log_level}",
        f"--hostname=ratequeue-{os.getpid()}@{socket.gethostname()}",
        *(extra or []),
    ]


def pool_option(args: list[str]) -> str | None:
    """The pool asked for with ``--pool=X``, ``--pool X``, ``-P X`` or ``-PX``, if any (the last wins)."""
    pool = None
    for i, arg in enumerate(args):
        if arg.startswith("--pool="):
            pool = arg.split("=", 1)[1]
        elif arg in ("--pool", "-P") and i + 1 < len(args):
            pool = args[i + 1]
        elif arg.startswith("-P") and len(arg) > 2:
            pool = arg[2:]
    return pool


def exit_on_second_stop_signal(sender: Any = None, **_: Any) -> None:
    """After Celery installs its handlers: the first SIGINT/SIGTERM is Celery's warm shutdown, any
    later one ends the process at once.

    Celery's answer to a second Ctrl-C, the cold shutdown, raises with the threads pool
    (``TaskPool does not implement kill_job``), and a warm shutdown waiting on a Redis that went
    away never ends: such a worker outlived its parent and ignored SIGTERM. Ending at once loses
    nothing stored: unacked chunk messages come back (visibility timeout), job leases expire.
    """
    received: list[int] = []

    def wrap(sig: signal.Signals, celery_handler: Any) -> Any:
        def handler(signum: int, frame: FrameType | None) -> None:
            received.append(signum)
            if len(received) > 1:
                os.write(2, f"worker: {signal.Signals(signum).name} again: exiting at once\n".encode())
                os._exit(128 + signum)
            celery_handler(signum, frame)
            signal.signal(sig, handler)  # Celery swaps its SIGINT handler for the cold one: ours stays

        return handler

    for sig in (signal.SIGINT, signal.SIGTERM):
        current = signal.getsignal(sig)
        if callable(current):
            try:
                signal.signal(sig, wrap(sig, current))
            except ValueError:  # not the main thread: leave Celery's handlers as they are
                return


def load_configuration() -> tuple[Settings, AccountTable]:
    """The settings and the account table, read once; a configuration error ends the process with
    its message (the models file's name the file, line and field), exit code 2 as the CLI's."""
    try:
        settings = load_settings()
        accounts = load_account_table(settings, require_credentials=False)
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(2)
    return settings, accounts


def log_accounts(accounts: AccountTable) -> None:
    """Each configured account once: which bucket id (the metrics' account label) is which alias
    (an Account's repr never shows its key), and those this worker cannot send for."""
    if accounts.implicit:
        return
    for account in accounts:
        log.info("account %s: %r", account.name, account)
        if account.unusable:
            log.warning("account %s: no credentials here (%s): its jobs are left to workers that hold them",
                        account.name, account.unusable)


def main(extra: list[str] | None = None) -> None:
    """Load the settings (once), build the worker from them, run it; exits with its exit code."""
    settings, accounts = load_configuration()
    wipe_multiprocess_dir()  # before any metric exists: a restarted worker starts from zero
    from ratequeue.worker.app import build_worker  # creates the metrics: after the wipe
    from ratequeue.worker.routing import held_accounts

    app, _ = build_worker(settings, accounts)
    args = extra if extra is not None else sys.argv[1:]
    pool = pool_option(args)
    if pool:
        # The app configures the threads pool, and Celery then reads a --pool option as "the
        # default" and keeps threads: a pool asked for on the command line must go in the config.
        app.conf.worker_pool = pool
    # Celery's worker_main drops the worker's exit code: a worker stopped by an unrecoverable
    # error exited 0, and a Restart=on-failure unit never brought it back. The code is read
    # off the worker when it shuts down instead.
    exit_codes: list[int] = []

    def _record(sender: Any = None, **_: Any) -> None:
        exit_codes.append(int(getattr(sender, "exitcode", 0) or 0))

    signals.worker_shutdown.connect(_record, weak=False)
    # Where the worker connects, said once logging is set up: Celery's own retry lines name its
    # transport class, not the URL, and a worker left on the default Redis waits there for ever.
    where = shown_redis_url(settings.redis_url) + ("" if settings.redis_url else " (default; set RATEQUEUE_REDIS_URL)")
    signals.after_setup_logger.connect(lambda **_: log.info("connecting to Redis at %s", where), weak=False)
    signals.after_setup_logger.connect(lambda **_: log_accounts(accounts), weak=False)
    signals.worker_ready.connect(exit_on_second_stop_signal, weak=False)
    app.worker_main(worker_argv(settings, args, worker_queues(held_accounts(accounts))))
    sys.exit(max(exit_codes, default=0))


if __name__ == "__main__":
    main()
