"""The pieces the `ratequeue` commands share: the Client they talk through (and the line naming
its Redis), option types, the checks before a run, the exit code of a finished batch, and the
command that loads its module only when it runs."""

from __future__ import annotations

import contextlib
import importlib
import logging
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from ratequeue.producer.cli_errors import ExitCode, check_writable, state

console = Console(stderr=True)


def client_for(redis_url: str | None = None):  # type: ignore[no-untyped-def]
    """A Client of the configured Redis (or of ``redis_url``: a run's embedded one, --data-dir),
    named on stderr first."""
    import dataclasses

    from ratequeue.config.settings import load_settings, shown_redis_url
    from ratequeue.producer.api import Client

    settings = load_settings()
    if redis_url is not None:
        settings = dataclasses.replace(settings, redis_url=redis_url)
    state.redis_url = shown_redis_url(settings.redis_url)
    say_redis(settings.redis_url)
    return Client(settings)


def say_redis(configured: str | None) -> None:
    """One dim line naming the Redis a command talks to (the default is easy to hit by mistake)."""
    from ratequeue.config.settings import shown_redis_url

    note = "" if configured else " (default; set RATEQUEUE_REDIS_URL to change)"
    console.print(f"redis: {shown_redis_url(configured)}{note}", style="dim", markup=False, highlight=False)


class WindowType(click.ParamType):
    """A completion window ("24h", "30m", "7d"), checked by the parser submit uses."""

    name = "window"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from ratequeue.producer.submit import parse_window

        try:
            parse_window(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return str(value).strip()


WINDOW = WindowType()


class LevelFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def data_dir_redis_for(data_dir: Path | None) -> contextlib.AbstractContextManager[str | None]:
    """With --data-dir, the embedded Redis of that run's directory (started for the command)."""
    if data_dir is None:
        return contextlib.nullcontext()
    from ratequeue.producer.embedded import data_dir_redis

    return data_dir_redis(data_dir)


ACCOUNT_HELP = ("Send the batch with this account of RATEQUEUE_MODELS_FILE's [accounts] (default: its "
                "default_account); a line's own top-level \"account\" wins.")
DATA_DIR_HELP = "The data directory of a `ratequeue run` (printed by it): read its embedded Redis."


def check_outputs(output: Path, errors: Path | None) -> None:
    """What ``run`` and ``demo`` check and say before any work: the output paths can be written
    (else it would be found only after the whole batch was paid for), and the Redis used when one
    is configured (else an embedded one is started, and named)."""
    from ratequeue.config.settings import load_settings
    from ratequeue.producer.collect import errors_path_for

    check_writable(output, "-o")
    check_writable(errors or errors_path_for(output), "--errors" if errors else "-o's errors file")
    if (configured := load_settings().redis_url) is not None:
        say_redis(configured)


def batch_exit_code(batch: dict[str, Any], source: str, see: str) -> int:
    """0 when the batch completed with no failed line, else 1 (said on stderr when every line failed)."""
    counts = batch["request_counts"]
    if counts["total"] and counts["failed"] == counts["total"]:
        click.echo(f"error: every line of {source} failed; see {see}", err=True)
    if batch["status"] == "completed" and counts["failed"] == 0:
        return ExitCode.OK
    return ExitCode.FAILED


class LazyCommand(click.Command):
    """A command whose module loads only when the command runs (or shows its own help).

    The simulator and the exporter pull in aiohttp and prometheus-client: imported up front they
    cost every ``ratequeue`` invocation ~0.3 s, ``--help`` included. The listing uses ``help``.
    """

    def __init__(self, name: str, target: str, help: str) -> None:
        super().__init__(name, help=help, add_help_option=False, context_settings={"ignore_unknown_options": True})
        self._target = target

    def _real(self) -> click.Command:
        module, _, attr = self._target.partition(":")
        command = getattr(importlib.import_module(module), attr)
        assert isinstance(command, click.Command)
        return command

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        return self._real().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        return ctx.command.invoke(ctx)  # the context was made by the real command
