"""The `ratequeue` command line."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from ratequeue.errors import RatequeueError

console = Console(stderr=True)


def _client(redis_url: str | None = None):  # type: ignore[no-untyped-def]
    from ratequeue.producer.api import Client

    if redis_url is None:
        return Client()
    import dataclasses

    from ratequeue.config.settings import load_settings

    return Client(dataclasses.replace(load_settings(), redis_url=redis_url))


def _data_dir_redis(data_dir: Path | None) -> contextlib.AbstractContextManager[str | None]:
    """With --data-dir, the embedded Redis of that run's directory (started for the command)."""
    if data_dir is None:
        return contextlib.nullcontext()
    from ratequeue.producer.embedded import data_dir_redis

    return data_dir_redis(data_dir)


_DATA_DIR_HELP = "The data directory of a `ratequeue run` (printed by it): read its embedded Redis."


@click.group()
@click.version_option(package_name="ratequeue")
def main() -> None:
    """Rate-limit-aware batch queue for OpenAI-style APIs."""


@main.command()
@click.argument("input_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Results file (Batch output format, input order).")
@click.option("--errors", "errors", type=click.Path(dir_okay=False, path_type=Path),
              help="Errors file (default: OUTPUT with .errors before the suffix).")
@click.option("-w", "--workers", default=1, show_default=True, help="Local worker processes to start.")
@click.option("--window", default="24h", show_default=True, help="Completion window; later jobs expire.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Redis, AOF and logs here (default: RATEQUEUE_DATA_DIR, else one directory per input).")
@click.option("--fresh", is_flag=True, help="A new batch, even if this input has an unfinished one.")
@click.option("--no-check", is_flag=True, help="Skip the upstream key check (GET /v1/models) before starting.")
def run(input_file: Path, output: Path, errors: Path | None, workers: int, window: str, data_dir: Path | None,
        fresh: bool, no_check: bool) -> None:
    """Run INPUT_FILE to completion here: Redis, workers, progress, results. Run again, the same
    command continues the input's unfinished batch."""
    from ratequeue.producer.continuation import RunStopped
    from ratequeue.producer.runner import print_summary, run_file

    try:
        summary = run_file(input_file, output, errors, workers, window, console=console, data_dir=data_dir,
                           fresh=fresh, check=not no_check)
    except RunStopped as stop:
        console.print(str(stop), markup=False, highlight=False)
        sys.exit(stop.exit_code)
    print_summary(summary, console)


@main.command()
@click.argument("input_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--window", default="24h", show_default=True)
@click.option("--no-check", is_flag=True, help="Skip the upstream key check (GET /v1/models) before submitting.")
def submit(input_file: Path, window: str, no_check: bool) -> None:
    """Submit INPUT_FILE to the configured Redis for workers elsewhere; prints the batch id."""
    client = _client()
    if not no_check:
        from ratequeue.producer.preflight import check_upstream

        check_upstream(client.settings)
    report = client.submit_batch(input_file, window)
    console.print(f"{report.jobs} jobs queued, {report.errors} input lines rejected")
    click.echo(report.batch_id)


@main.command()
@click.argument("batch_id", required=False)
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), help=_DATA_DIR_HELP)
def status(batch_id: str | None, data_dir: Path | None) -> None:
    """Print the Batch object of BATCH_ID as JSON; with no id, the queue, parked pairs and
    recent batches."""
    with _data_dir_redis(data_dir) as url:
        client = _client(url)
        click.echo(json.dumps(client.status(batch_id) if batch_id else client.overview(), indent=2))


@main.command()
@click.argument("batch_id", required=False)
@click.option("--model", help="Only restart parked pairs of this model.")
def resume(batch_id: str | None, model: str | None) -> None:
    """Restart parked (account, model) pairs; with BATCH_ID, re-enqueue that batch's unfinished
    jobs instead (e.g. after its producer died)."""
    client = _client()
    if batch_id:
        click.echo(f"{client.resume(batch_id)} jobs re-enqueued")
        return
    restarted = client.unpark(model)
    click.echo(f"restarted: {', '.join(restarted)}" if restarted else "nothing was parked")


@main.command()
@click.argument("batch_id")
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--errors", "errors", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), help=_DATA_DIR_HELP)
def results(batch_id: str, output: Path, errors: Path | None, data_dir: Path | None) -> None:
    """Write the results and errors files of BATCH_ID (what is done so far)."""
    from ratequeue.producer.collect import errors_path_for, write_outputs
    from ratequeue.redact import configured_secrets

    errors = errors or errors_path_for(output)
    with _data_dir_redis(data_dir) as url:
        client = _client(url)
        client.status(batch_id)
        n_results, n_errors = write_outputs(client.redis, batch_id, output, errors,
                                            configured_secrets(client.settings))
    console.print(f"{output}: {n_results} lines; {errors}: {n_errors} lines")


@main.command()
@click.argument("batch_id")
def cancel(batch_id: str) -> None:
    """Stop dispatching BATCH_ID's remaining jobs; they are reported as cancelled."""
    batch = _client().cancel(batch_id)
    click.echo(batch["status"])


@main.command()
@click.argument("batch_id")
@click.option("--force", is_flag=True, help="Delete even a batch that is still running (its results so far go too).")
def delete(batch_id: str, force: bool) -> None:
    """Remove BATCH_ID and all it holds from Redis now (ended batches also expire on their own,
    RATEQUEUE_RETENTION_SECONDS after they end). A running batch needs --force."""
    deleted = _client().delete(batch_id, force=force)
    click.echo(f"deleted {batch_id} ({deleted['status']})")


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def worker(ctx: click.Context) -> None:
    """Start a worker (a Celery worker of ratequeue's queue); extra args go to Celery."""
    # The worker replaces this process: the producer's side never loads the worker runtime.
    os.execv(sys.executable, [sys.executable, "-m", "ratequeue.worker", *ctx.args])


@main.command()
@click.option("-n", "--jobs", default=300, show_default=True, help="Sample documents to process.")
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("demo-results.jsonl"), show_default=True)
@click.option("-w", "--workers", default=2, show_default=True)
def demo(jobs: int, output: Path, workers: int) -> None:
    """Process built-in sample documents; with no API key, against the local simulator."""
    from ratequeue.producer.continuation import RunStopped
    from ratequeue.producer.demo import run_demo

    try:
        run_demo(jobs, output, workers, console)
    except RunStopped as stop:
        console.print(str(stop), markup=False, highlight=False)
        sys.exit(stop.exit_code)


class _LazyCommand(click.Command):
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


main.add_command(_LazyCommand("sim", "ratequeue.sim.cli:sim_command",
                              "Run the OpenAI-compatible simulator (for dry runs and benchmarks)."))
main.add_command(_LazyCommand("exporter", "ratequeue.producer.exporter:exporter_command",
                              "Publish queue depth, batches, parked pairs, bucket levels, live workers and "
                              "memory from Redis."))


def entry() -> None:
    try:
        main(standalone_mode=True)
    except RatequeueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        sys.exit(2)
