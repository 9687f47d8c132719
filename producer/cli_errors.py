"""How the ``ratequeue`` command line ends: the one place that turns an exception into a one-line
message and an exit code, and the checks of paths made before any work.

Exit codes, the same for every command::

    0    every line succeeded (or the command had nothing to report)
    1    some lines failed or were rejected, or the batch ended cancelled, expired or failed
    2    usage or configuration error: bad option, unusable path, unreachable or refusing Redis,
         unknown batch (click's own usage errors exit 2 too)
    130  interrupted (Ctrl-C)

``--debug`` (or ``RATEQUEUE_DEBUG=1``) lets the exception through, traceback and all.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import click

from ratequeue.config.settings import debug_requested, load_settings, shown_redis_url
from ratequeue.errors import BatchError, ConfigError, RatequeueError, UpstreamUnusableError, UsageError
from ratequeue.redact import redact

if TYPE_CHECKING:
    import redis

__all__ = ["ExitCode", "check_writable", "describe", "run_main", "state"]


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    INTERRUPTED = 130


@dataclass
class CliState:
    """What the group's options set for the handler: ``--debug``, and the Redis URL in use."""

    debug: bool = False
    redis_url: str | None = None  # as shown (password redacted); None: the configured one


state = CliState()


def check_writable(path: Path, option: str) -> None:
    """Raise ``UsageError`` unless ``path`` can be written (its parent is an existing, writable
    directory; the file, if present, a writable file). Checked before any work is paid for."""
    parent = path.parent if str(path.parent) else Path(".")
    reason = None
    if path.is_dir():
        reason = f"{path} is a directory"
    elif not parent.exists():
        reason = f"{parent} does not exist"
    elif not parent.is_dir():
        reason = f"{parent} is not a directory"
    elif path.exists() and not os.access(path, os.W_OK):
        reason = "permission denied"
    elif not path.exists() and not os.access(parent, os.W_OK | os.X_OK):
        reason = f"{parent} is not writable"
    if reason is not None:
        raise UsageError(f"cannot write {option} {path}: {reason}")


def _redis_url() -> str:
    if state.redis_url is not None:
        return state.redis_url
    try:
        return shown_redis_url(load_settings().redis_url)
    except ConfigError:
        return "RATEQUEUE_REDIS_URL"


def _connection_reason(exc: redis.RedisError) -> str:
    message = str(exc).lower()
    if "timed out" in message or "timeout" in message:
        return "timed out"
    for marker, reason in (("refused", "connection refused"), ("name or service not known", "host not found"),
                           ("nodename nor servname", "host not found"), ("name resolution", "host not found"),
                           ("no route", "no route to host"), ("unreachable", "network unreachable")):
        if marker in message:
            return reason
    return redact(str(exc)).rstrip(".")


def _redis_message(exc: redis.RedisError) -> str | None:
    """The message of a Redis error that is the deployment's, not a bug (None for the others:
    a script error keeps its traceback)."""
    import redis  # loaded already, since a Redis error was raised; not at import: --help stays fast

    url = _redis_url()
    if isinstance(exc, redis.AuthenticationError) or "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
        if ":***@" in url or "WRONGPASS" in str(exc) or "invalid username-password" in str(exc):
            return f"Redis at {url} refused the password (WRONGPASS); check RATEQUEUE_REDIS_URL"
        return (f"Redis at {url} wants a password (NOAUTH); "
                "put it in RATEQUEUE_REDIS_URL (redis://:PASSWORD@host:port/db)")
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        return f"cannot reach Redis at {url} ({_connection_reason(exc)}); set RATEQUEUE_REDIS_URL"
    if isinstance(exc, redis.ReadOnlyError | redis.exceptions.NoPermissionError | redis.OutOfMemoryError):
        return f"Redis at {url}: {redact(str(exc))}"
    return None


def _os_message(exc: OSError) -> str:
    reason = (exc.strerror or str(exc)).lower() if exc.errno != errno.ENOENT else "no such file or directory"
    return f"{exc.filename}: {reason}" if exc.filename else reason


def describe(exc: BaseException) -> tuple[str, ExitCode] | None:
    """The one-line message and exit code of an expected failure; None for a bug (shown as is)."""
    if isinstance(exc, KeyboardInterrupt | click.exceptions.Abort):
        return "interrupted", ExitCode.INTERRUPTED
    redis_module = sys.modules.get("redis")  # no Redis error without redis loaded
    if redis_module is not None and isinstance(exc, redis_module.RedisError):
        message = _redis_message(exc)
        return None if message is None else (f"error: {message}", ExitCode.USAGE)
    exit_code = getattr(exc, "exit_code", None)
    if isinstance(exc, RatequeueError) and isinstance(exit_code, int):
        return str(exc), ExitCode(exit_code)  # a run that stopped says what it did (RunStopped)
    if isinstance(exc, RatequeueError):
        # A RatequeueError's text is ours (never a secret); a BatchError is an unusable id or file.
        usage = ConfigError | UsageError | BatchError | UpstreamUnusableError
        code = ExitCode.USAGE if isinstance(exc, usage) else ExitCode.FAILED
        return f"error: {exc}", code
    if isinstance(exc, OSError):
        return f"error: {_os_message(exc)}", ExitCode.USAGE
    return None


def run_main(main: Callable[..., object]) -> NoReturn:
    """Run the click group ``main`` and exit with the documented code."""
    try:
        code = main(standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (Exception, KeyboardInterrupt) as exc:
        described = describe(exc)
        if described is None or state.debug or debug_requested():
            raise
        message, exit_code = described
        click.echo(message, err=True)
        sys.exit(int(exit_code))
    sys.exit(code if isinstance(code, int) else 0)
