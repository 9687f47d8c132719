"""`ratequeue run`: everything in one process tree — Redis (embedded unless configured), local
workers, submit (or continue the input's batch), live progress, the results files and a summary.

Ctrl-C: the first stops the workers (calls in flight get a short grace), writes what is done and
prints the command that continues; the second kills the children at once. Both exit 130.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from ratequeue.config.accounts_load import load_account_table
from ratequeue.config.settings import Settings, load_settings
from ratequeue.errors import UsageError
from ratequeue.jobstore import keys
from ratequeue.jobstore.budgets import set_batch_budget
from ratequeue.producer.batch_ids import file_sha256
from ratequeue.producer.batchfile import has_content
from ratequeue.producer.children import LocalWorkers
from ratequeue.producer.collect import FINAL_STATUSES, errors_path_for, write_outputs
from ratequeue.producer.continuation import RunStopped
from ratequeue.producer.embedded import EmbeddedRedis
from ratequeue.producer.preflight import check_batch_upstream
from ratequeue.producer.rundir import hold_data_dir, run_data_dir

if TYPE_CHECKING:
    from ratequeue.producer.api import Client

INTERRUPT_GRACE = 5.0  # seconds calls in flight get after a Ctrl-C (at most RATEQUEUE_SHUTDOWN_GRACE)
_EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a Ctrl-C


@dataclass(frozen=True)
class RunSummary:
    batch: dict[str, Any]
    results_path: Path
    errors_path: Path
    results: int
    errors: int
    wall_seconds: float


def resume_command() -> str:
    """The command line that continues this run: this one, without ``--fresh``."""
    return shlex.join(["ratequeue", *(arg for arg in sys.argv[1:] if arg != "--fresh")])


def run_file(
    input_path: Path,
    results_path: Path,
    errors_path: Path | None = None,
    workers: int = 1,
    completion_window: str = "24h",
    extra_env: Mapping[str, str] | None = None,
    console: Console | None = None,
    data_dir: Path | None = None,
    fresh: bool = False,
    check: bool = True,
    resume_hint: str | None = None,
    account: str | None = None,
    budget_usd: float | None = None,
) -> RunSummary:
    """Run a Batch-format JSONL file to completion and write its results and errors files.

    ``data_dir``: where Redis, its AOF and the logs go; default the configured RATEQUEUE_DATA_DIR,
    else one directory per input under the default root. ``fresh``: a new batch even if the input
    has one. ``check``: ask the upstream whether it takes the key first. ``account``: the alias of
    the models file's [accounts] its lines are sent with (default: the default one). Raises ``RunStopped``
    (exit 130 on Ctrl-C, 1 when the upstream refuses the key midway; the batch can be continued),
    ``UpstreamUnusableError``, ``DataDirBusyError``.
    """
    console = console or Console(stderr=True)
    env = {**os.environ, **(extra_env or {})}
    settings = load_settings(env)
    if not has_content(input_path):  # said before the upstream is asked or anything is started
        raise UsageError(f"{input_path} has no requests")
    try:
        if check:
            check_batch_upstream(settings, load_account_table(settings, require_credentials=False), account)
        digest = file_sha256(input_path)
    except KeyboardInterrupt:
        raise RunStopped("interrupted before anything was sent", _EXIT_INTERRUPTED) from None
    if data_dir is None and not env.get("RATEQUEUE_DATA_DIR"):
        data_dir = run_data_dir(settings.data_dir, digest)
    data_dir = data_dir or settings.data_dir
    grace = min(INTERRUPT_GRACE, settings.shutdown_grace_seconds)
    env.update(RATEQUEUE_DATA_DIR=str(data_dir), RATEQUEUE_SHUTDOWN_GRACE=repr(grace))
    errors_path = errors_path or errors_path_for(results_path)
    started = time.monotonic()
    with hold_data_dir(data_dir):
        console.print(f"data directory: {data_dir}")
        run = _Run(load_settings(env), env, console, workers, grace, account, budget_usd)
        batch, counts = run.execute(input_path, digest, completion_window, fresh, results_path, errors_path,
                                    resume_hint or resume_command())
    return RunSummary(batch, results_path, errors_path, counts[0], counts[1], time.monotonic() - started)


class _Run:
    """One run's children and batch; ``execute`` is the whole life of them."""

    def __init__(self, settings: Settings, env: dict[str, str], console: Console, workers: int,
                 grace: float, account: str | None = None, budget_usd: float | None = None) -> None:
        self.settings, self.env, self.console, self.account = settings, env, console, account
        self.budget_usd = budget_usd
        self.worker_count, self.grace = workers, grace
        self.redis: EmbeddedRedis | None = None
        self.workers: LocalWorkers | None = None
        self.batch_id: str | None = None
        self.client: Client | None = None

    def execute(self, input_path: Path, digest: str, window: str, fresh: bool, results_path: Path,
                errors_path: Path, resume: str) -> tuple[dict[str, Any], tuple[int, int]]:
        try:
            try:
                return self._run(input_path, digest, window, fresh, results_path, errors_path)
            except KeyboardInterrupt:
                raise self._interrupted(results_path, errors_path, resume) from None
            except RunStopped as stop:  # the upstream refused the key midway: keep what is done
                if self.workers is not None:
                    self.workers.stop(self.grace + 5)
                counts = self._write(results_path, errors_path)
                raise RunStopped(f"error: {stop}\n{self._written(counts, results_path, errors_path)}",
                                 stop.exit_code) from None
        except KeyboardInterrupt:  # a second Ctrl-C: stop at once
            self._kill()
            raise RunStopped(f"interrupt: stopped at once; to continue, run: {resume}", _EXIT_INTERRUPTED) from None
        finally:
            try:
                self._stop()
            except KeyboardInterrupt:  # Ctrl-C while the children stop: the files are written already
                self._kill()

    def _run(self, input_path: Path, digest: str, window: str, fresh: bool, results_path: Path,
             errors_path: Path) -> tuple[dict[str, Any], tuple[int, int]]:
        from ratequeue.producer.continuation import watched_status
        from ratequeue.producer.progress import follow

        url = self.settings.redis_url
        if url is None:
            self.redis = EmbeddedRedis(Path(self.env["RATEQUEUE_DATA_DIR"]) / "redis").start()
            url = self.redis.url
            self.console.print(f"[dim]embedded redis-server on {url} (data in {self.redis.data_dir})[/dim]")
        self.env["RATEQUEUE_REDIS_URL"] = url  # the workers' environment; this process gets settings
        self.settings = load_settings(self.env)
        from ratequeue.producer.api import Client

        self.client = client = Client(self.settings)  # publishes through an app of its own
        self.batch_id, done = self._batch(client, input_path, digest, window, fresh)
        if not done:
            self.workers = LocalWorkers(self.worker_count, self.env, Path(self.env["RATEQUEUE_DATA_DIR"]) / "logs")
            from ratequeue.producer.continuation import batch_models

            follow(watched_status(client, self.batch_id, batch_models(client, self.batch_id)), self.console,
                   limits_of=lambda model: client.model_limits(model, self.account))
        batch = client.status(self.batch_id)
        return batch, self._write(results_path, errors_path)

    def _batch(self, client: Client, input_path: Path, digest: str, window: str, fresh: bool) -> tuple[str, bool]:
        """The batch to follow, and whether it has ended already."""
        from ratequeue.producer.continuation import batch_models, batch_of_input, unpark_lasting

        found = None if fresh else batch_of_input(client, digest, client.account_name(self.account))
        if found is not None:
            batch_id, status = found
            if status in FINAL_STATUSES:
                self.console.print(f"batch [bold]{batch_id}[/bold] of this input is already {status}: "
                                   "nothing is run again, its results are written again (--fresh runs it anew)")
                return batch_id, True
            if status != "validating":  # sealed: every line of the input is in it
                restarted = unpark_lasting(client, batch_id, batch_models(client, batch_id))
                if restarted:
                    self.console.print(f"[dim]restarted paused pairs: {', '.join(restarted)}[/dim]")
                if self.redis is not None:
                    # This run's own Redis, its workers not started yet: leases left in it belong to
                    # workers of a run that is gone (killed at a second Ctrl-C); waiting them out
                    # (60 s) would only delay their jobs. First-run times go too: a job's deadline
                    # (RATEQUEUE_JOB_DEADLINE) counts from this run, not from the interrupted one.
                    client.redis.delete(keys.batch_claims(batch_id), keys.batch_started(batch_id))
                if self.budget_usd is not None:  # the continued batch takes this run's budget
                    set_batch_budget(client.redis, batch_id, self.budget_usd)
                requeued = client.resume(batch_id)
                self.console.print(f"continuing batch [bold]{batch_id}[/bold] of this input: {requeued} "
                                   f"unfinished jobs queued again, {self.worker_count} worker process(es)")
                return batch_id, False
            elif self.redis is not None:  # on a shared Redis someone may be submitting it right now
                # Interrupted while being submitted: it may lack lines, so it goes and the input is sent again.
                client.delete(batch_id, force=True)
                self.console.print(f"batch {batch_id} was interrupted while being submitted: submitting again")
        report = client.submit_batch(input_path, window, account=self.account, budget_usd=self.budget_usd)
        self.console.print(
            f"batch [bold]{report.batch_id}[/bold]: {report.jobs} jobs queued, "
            f"{report.errors} input lines rejected, {self.worker_count} worker process(es)"
        )
        return report.batch_id, False

    def _interrupted(self, results_path: Path, errors_path: Path, resume: str) -> RunStopped:
        self.console.print(f"interrupt: stopping; waiting up to {self.grace:g} s for calls in flight — "
                           "Ctrl-C again to stop at once")
        if self.batch_id is not None and self.client is not None:
            # Paused, every worker (on any host sharing this Redis) stops sending its calls within a
            # second and drops its chunks; nothing fails. The next run of this input (or `ratequeue
            # resume BATCH`) unpauses it: without the pause, workers of an unrelated run on a shared
            # Redis would run, and pay for, what is left.
            self.client.redis.connection_pool.disconnect()  # the interrupt may have cut a reply in half
            self.client.pause(self.batch_id)
        if self.workers is not None:
            self.workers.stop(self.grace + 5)  # they give their unfinished chunks back, then exit
        if self.batch_id is None:
            return RunStopped(f"interrupted while submitting; to continue, run: {resume}", _EXIT_INTERRUPTED)
        counts = self._write(results_path, errors_path)
        return RunStopped(f"interrupted: {self._written(counts, results_path, errors_path)}\n"
                          f"to continue, run: {resume}", _EXIT_INTERRUPTED)

    def _write(self, results_path: Path, errors_path: Path) -> tuple[int, int]:
        from ratequeue.redact import configured_secrets

        assert self.batch_id is not None and self.client is not None
        self.client.redis.connection_pool.disconnect()  # an interrupt may have cut a reply in half
        return write_outputs(self.client.redis, self.batch_id, results_path, errors_path,
                             configured_secrets(self.settings))

    def _written(self, counts: tuple[int, int], results_path: Path, errors_path: Path) -> str:
        return (f"batch {self.batch_id}: {results_path} ({counts[0]} lines), "
                f"{errors_path} ({counts[1]} lines) hold what is done so far")

    def _kill(self) -> None:
        if self.workers is not None:
            self.workers.kill()
        if self.redis is not None:
            # SHUTDOWN, not SIGKILL: it takes milliseconds and flushes the append-only file, so the
            # answers stored in the last second (appendfsync everysec), paid for, are kept.
            self.redis.stop()

    def _stop(self) -> None:
        if self.workers is not None:
            self.workers.stop(self.grace + 15)
        if self.client is not None:
            self.client.close()
        if self.redis is not None:
            self.redis.stop()


def print_summary(summary: RunSummary, console: Console) -> None:
    b = summary.batch
    counts, usage = b["request_counts"], b["usage"]
    minutes = max(summary.wall_seconds, 1e-6) / 60
    console.print(
        f"[bold]{b['status']}[/bold] {b['id']}: {counts['completed']} completed, {counts['failed']} failed "
        f"of {counts['total']} in {summary.wall_seconds:.1f} s ({counts['total'] / minutes:,.0f} req/min)\n"
        f"tokens: {usage['prompt_tokens']:,} prompt ({usage['cached_tokens']:,} cached), "
        f"{usage['completion_tokens']:,} completion; cost ${b['cost_usd']:.4f}\n"
        f"results: {summary.results_path} ({summary.results} lines)\n"
        f"errors:  {summary.errors_path} ({summary.errors} lines)"
    )
