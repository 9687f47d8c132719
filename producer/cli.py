"""The `ratequeue` command line."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from ratequeue.producer.cli_errors import ExitCode, check_writable, run_main, state
from ratequeue.producer.cli_parts import (
    ACCOUNT_HELP,
    DATA_DIR_HELP,
    WINDOW,
    LazyCommand,
    LevelFormatter,
    batch_exit_code,
    check_outputs,
    client_for,
    console,
    data_dir_redis_for,
)


@click.group()
@click.version_option(package_name="ratequeue")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors (or RATEQUEUE_DEBUG=1).")
def main(debug: bool) -> None:
    """Rate-limit-aware batch queue for OpenAI-style APIs.

    Exit codes: 0 every line succeeded; 1 some lines failed or were rejected (or the batch ended
    cancelled, expired or failed); 2 usage or configuration error; 130 interrupted.
    """
    state.debug = debug
    # Warnings of ratequeue's modules (an unknown RATEQUEUE_* variable, no live worker) as
    # "warning: ..." lines on stderr.
    handler = logging.StreamHandler()
    handler.setFormatter(LevelFormatter())
    logger = logging.getLogger("ratequeue")
    if not logger.handlers:
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
        logger.propagate = False


@main.command()
@click.argument("input_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Results file (Batch output format, input order).")
@click.option("--errors", "errors", type=click.Path(dir_okay=False, path_type=Path),
              help="Errors file (default: OUTPUT with .errors before the suffix).")
@click.option("-w", "--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Local worker processes to start.")
@click.option("--window", default="24h", show_default=True, type=WINDOW, help="Completion window; later jobs expire.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Redis, AOF and logs here (default: RATEQUEUE_DATA_DIR, else one directory per input).")
@click.option("--fresh", is_flag=True, help="A new batch, even if this input has an unfinished one.")
@click.option("--no-check", is_flag=True, help="Skip the upstream key check (GET /v1/models) before starting.")
@click.option("--account", help=ACCOUNT_HELP)
@click.option("--budget-usd", type=click.FloatRange(min=0), help="The batch's budget in USD: no call is sent whose "
              "worst-case cost would take its spend past it (raise it with `ratequeue budget BATCH --usd`).")
@click.pass_context
def run(ctx: click.Context, input_file: Path, output: Path, errors: Path | None, workers: int, window: str,
        data_dir: Path | None, fresh: bool, no_check: bool, account: str | None, budget_usd: float | None) -> None:
    """Run INPUT_FILE to completion here: Redis, workers, progress, results. Run again, the same
    command continues the input's unfinished batch."""
    from ratequeue.producer.runner import print_summary, run_file

    check_outputs(output, errors)
    summary = run_file(input_file, output, errors, workers, window, console=console, data_dir=data_dir,
                       fresh=fresh, check=not no_check, account=account, budget_usd=budget_usd)
    print_summary(summary, console)
    ctx.exit(batch_exit_code(summary.batch, str(input_file), str(summary.errors_path)))


@main.command()
@click.argument("input_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--account", help=ACCOUNT_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as one JSON object.")
@click.pass_context
def estimate(ctx: click.Context, input_file: Path, account: str | None, as_json: bool) -> None:
    """Tokens, list-price cost and the minimum wall time the limits allow for INPUT_FILE, before
    anything is sent (no Redis, no upstream). Exits 1 when lines would be rejected."""
    from ratequeue.config.accounts_load import load_account_table
    from ratequeue.config.models import load_model_table
    from ratequeue.config.settings import load_settings
    from ratequeue.errors import InvalidRequestError, UsageError
    from ratequeue.producer.estimate import estimate_file, render

    settings = load_settings()
    accounts = load_account_table(settings, load_model_table(settings), require_credentials=False)
    if account is not None:
        try:
            accounts.account(account)
        except InvalidRequestError as exc:
            raise UsageError(str(exc)) from None
    found = estimate_file(input_file, accounts, settings, account)
    if as_json:
        click.echo(json.dumps(found.as_dict()))
    else:
        for line in render(found, str(input_file)):
            click.echo(line)
    ctx.exit(ExitCode.FAILED if found.rejected else ExitCode.OK)


@main.command()
@click.argument("input_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--window", default="24h", show_default=True, type=WINDOW)
@click.option("--batch-id", help="Use this id (1-64 of A-Z a-z 0-9 _ -); submitting the same file again under it "
              "returns the batch already queued.")
@click.option("--no-check", is_flag=True, help="Skip the upstream key check (GET /v1/models) before submitting.")
@click.option("--account", help=ACCOUNT_HELP)
@click.option("--budget-usd", type=click.FloatRange(min=0), help="The batch's budget in USD: no call is sent whose "
              "worst-case cost would take its spend past it (raise it with `ratequeue budget BATCH --usd`).")
@click.pass_context
def submit(ctx: click.Context, input_file: Path, window: str, batch_id: str | None, no_check: bool,
           account: str | None, budget_usd: float | None) -> None:
    """Submit INPUT_FILE to the configured Redis for workers elsewhere; prints the batch id.
    Exits 1 when input lines were rejected (they are in the batch's errors file)."""
    client = client_for()
    if not no_check:
        from ratequeue.producer.preflight import check_batch_upstream

        client.redis.ping()  # an unreachable Redis is said first: nothing can be submitted without it
        check_batch_upstream(client.settings, client.accounts, account)
    report = client.submit_batch(input_file, window, batch_id=batch_id, account=account, budget_usd=budget_usd)
    if report.existing:
        console.print(f"batch {report.batch_id} was submitted before from this input: nothing queued again",
                      markup=False, highlight=False)
        click.echo(report.batch_id)
        return
    console.print(f"{report.jobs} jobs queued, {report.errors} input lines rejected")
    click.echo(report.batch_id)
    if report.errors and not report.jobs:
        click.echo(f"error: every line of {input_file} was rejected; see ratequeue results {report.batch_id} -o FILE",
                   err=True)
    ctx.exit(ExitCode.FAILED if report.errors else ExitCode.OK)


@main.command()
@click.argument("batch_id", required=False)
@click.option("--wait", "wait", is_flag=True,
              help="Poll until BATCH_ID ends; exit 0 if it completed with no failed line, else 1.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True),
              help="With --wait: give up after this many seconds (exit 1).")
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), help=DATA_DIR_HELP)
@click.pass_context
def status(ctx: click.Context, batch_id: str | None, wait: bool, timeout: float | None,
           data_dir: Path | None) -> None:
    """Print the Batch object of BATCH_ID as JSON; with no id, the queue, parked pairs and
    recent batches."""
    if (wait or timeout is not None) and not batch_id:
        raise click.UsageError("--wait and --timeout need a BATCH_ID")
    if timeout is not None and not wait:
        raise click.UsageError("--timeout goes with --wait")
    with data_dir_redis_for(data_dir) as url:
        _status(ctx, client_for(url), batch_id, wait, timeout)


def _status(ctx: click.Context, client: Any, batch_id: str | None, wait: bool, timeout: float | None) -> None:
    if not batch_id:
        click.echo(json.dumps(client.overview(), indent=2))
        return
    if not wait:
        click.echo(json.dumps(client.status(batch_id), indent=2))
        return
    try:
        batch = client.wait(batch_id, timeout)
    except TimeoutError as exc:
        click.echo(json.dumps(client.status(batch_id), indent=2))
        click.echo(f"error: {exc}", err=True)
        ctx.exit(ExitCode.FAILED)
    click.echo(json.dumps(batch, indent=2))
    counts = batch["request_counts"]
    ctx.exit(ExitCode.OK if batch["status"] == "completed" and counts["failed"] == 0 else ExitCode.FAILED)


@main.command()
@click.argument("batch_id", required=False)
@click.option("--model", help="Only restart parked pairs of this model.")
def resume(batch_id: str | None, model: str | None) -> None:
    """Restart parked (account, model) pairs; with BATCH_ID, unpause that batch and re-enqueue
    its unfinished jobs instead (e.g. after a pause, or after its producer died)."""
    client = client_for()
    if batch_id:
        click.echo(f"{client.resume(batch_id)} jobs re-enqueued")
        return
    restarted = client.unpark(model)
    click.echo(f"restarted: {', '.join(restarted)}" if restarted else "nothing was parked")


@main.command()
@click.argument("batch_id")
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--errors", "errors", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), help=DATA_DIR_HELP)
def results(batch_id: str, output: Path, errors: Path | None, data_dir: Path | None) -> None:
    """Write the results and errors files of BATCH_ID (what is done so far)."""
    from ratequeue.producer.collect import errors_path_for, write_outputs

    check_writable(output, "-o")
    check_writable(errors or errors_path_for(output), "--errors" if errors else "-o's errors file")
    from ratequeue.redact import configured_secrets

    errors = errors or errors_path_for(output)
    with data_dir_redis_for(data_dir) as url:
        client = client_for(url)
        client.status(batch_id)
        n_results, n_errors = write_outputs(client.redis, batch_id, output, errors,
                                            configured_secrets(client.settings))
    console.print(f"{output}: {n_results} lines; {errors}: {n_errors} lines")


@main.command()
@click.argument("batch_id")
def cancel(batch_id: str) -> None:
    """Stop dispatching BATCH_ID's remaining jobs; they are reported as cancelled."""
    batch = client_for().cancel(batch_id)
    click.echo(batch["status"])


@main.command()
@click.argument("batch_id", required=False)
@click.option("--usd", type=click.FloatRange(min=0), help="BATCH_ID's budget in USD.")
@click.option("--daily", type=click.FloatRange(min=0), help="The budget of every batch together per UTC day, in USD "
              "(instead of RATEQUEUE_DAILY_BUDGET_USD).")
def budget(batch_id: str | None, usd: float | None, daily: float | None) -> None:
    """Set budgets (raising one resumes what it stopped within about a second); print them as JSON."""
    from ratequeue.jobstore import budgets

    if usd is not None and not batch_id:
        raise click.UsageError("--usd needs a BATCH_ID")
    client = client_for()
    if batch_id:
        budgets.require_batch(client.redis, batch_id)
    if usd is not None and batch_id:
        budgets.set_batch_budget(client.redis, batch_id, usd)
    if daily is not None:
        budgets.set_daily_budget(client.redis, daily)
    shown: dict[str, Any] = {"daily": budgets.daily_budget(client.redis, client.settings.daily_budget_usd)}
    if batch_id:
        shown["batch"] = budgets.batch_budget(client.redis, batch_id)
    click.echo(json.dumps(shown, indent=2))


@main.command()
@click.argument("batch_id")
def pause(batch_id: str) -> None:
    """Stop BATCH_ID's new upstream calls on every worker, failing nothing; `resume BATCH_ID`
    restarts it."""
    batch = client_for().pause(batch_id)
    click.echo(f"paused {batch_id}" if batch["paused"] else f"not paused: {batch_id} is {batch['status']}")


@main.command()
@click.argument("batch_id")
@click.option("--force", is_flag=True, help="Delete even a batch that is still running (its results so far go too).")
def delete(batch_id: str, force: bool) -> None:
    """Remove BATCH_ID and all it holds from Redis now (ended batches also expire on their own,
    RATEQUEUE_RETENTION_SECONDS after they end). A running batch needs --force."""
    deleted = client_for().delete(batch_id, force=force)
    click.echo(f"deleted {batch_id} ({deleted['status']})")


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def worker(ctx: click.Context) -> None:
    """Start a worker (a Celery worker of ratequeue's queue); extra args go to Celery."""
    # The worker replaces this process: the producer's side never loads the worker runtime.
    os.execv(sys.executable, [sys.executable, "-m", "ratequeue.worker", *ctx.args])


@main.command()
@click.option("-n", "--jobs", default=300, show_default=True, type=click.IntRange(min=1),
              help="Sample documents to process.")
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("demo-results.jsonl"), show_default=True)
@click.option("-w", "--workers", default=2, show_default=True, type=click.IntRange(min=1))
def demo(jobs: int, output: Path, workers: int) -> None:
    """Process built-in sample documents; with no API key, against the local simulator."""
    from ratequeue.producer.demo import run_demo

    check_outputs(output, None)
    run_demo(jobs, output, workers, console)


main.add_command(LazyCommand("sim", "ratequeue.sim.cli:sim_command",
                              "Run the OpenAI-compatible simulator (for dry runs and benchmarks)."))
main.add_command(LazyCommand("api", "ratequeue.producer.httpapi.command:api_command",
                              "Serve OpenAI's Files and Batches API over HTTP (for the official SDK's base_url)."))
main.add_command(LazyCommand("exporter", "ratequeue.producer.exporter:exporter_command",
                              "Publish queue depth, batches, parked pairs, bucket levels, live workers and "
                              "memory from Redis."))


def entry() -> None:
    """The ``ratequeue`` console script: one-line errors and the documented exit codes."""
    run_main(main)


if __name__ == "__main__":
    entry()
