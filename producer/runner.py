"""`ratequeue run`: everything in one process tree — Redis (embedded unless configured), local
workers, submit, live progress, the results files and a summary."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from ratequeue.config.settings import Settings, load_settings
from ratequeue.producer.collect import errors_path_for, write_outputs
from ratequeue.producer.embedded import EmbeddedRedis
from ratequeue.producer.progress import follow


@dataclass(frozen=True)
class RunSummary:
    batch: dict[str, Any]
    results_path: Path
    errors_path: Path
    results: int
    errors: int
    wall_seconds: float


@contextlib.contextmanager
def redis_for(settings: Settings, console: Console) -> Iterator[str]:
    """The Redis URL to use: the configured one, else a private server in the data directory."""
    if settings.redis_url:
        yield settings.redis_url
        return
    server = EmbeddedRedis(settings.data_dir / "redis").start()
    console.print(f"[dim]embedded redis-server on {server.url} (data in {server.data_dir})[/dim]")
    try:
        yield server.url
    finally:
        server.stop()


@contextlib.contextmanager
def local_workers(count: int, env: Mapping[str, str], log_dir: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Start ``count`` worker processes (``python -m ratequeue.worker``); stop them on exit."""
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for n in range(count):
        log = (log_dir / f"worker-{n}.log").open("ab")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "ratequeue.worker"], env=dict(env), stdout=log, stderr=subprocess.STDOUT
            )
        )
        log.close()
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_file(
    input_path: Path,
    results_path: Path,
    errors_path: Path | None = None,
    workers: int = 1,
    completion_window: str = "24h",
    extra_env: Mapping[str, str] | None = None,
    console: Console | None = None,
) -> RunSummary:
    """Run a Batch-format JSONL file to completion and write its results and errors files."""
    console = console or Console(stderr=True)
    env = {**os.environ, **(extra_env or {})}
    settings = load_settings(env)
    errors_path = errors_path or errors_path_for(results_path)
    started = time.monotonic()
    with redis_for(settings, console) as url:
        env["RATEQUEUE_REDIS_URL"] = url  # the workers' environment; this process gets settings
        settings = load_settings(env)
        from ratequeue.producer.api import Client

        client = Client(settings)  # publishes through an app of its own, built from these settings
        with local_workers(workers, env, settings.data_dir / "logs"):
            report = client.submit_batch(input_path, completion_window)
            console.print(
                f"batch [bold]{report.batch_id}[/bold]: {report.jobs} jobs queued, "
                f"{report.errors} input lines rejected, {workers} worker process(es)"
            )
            batch = follow(lambda: client.status(report.batch_id), console, limits_of=client.model_limits)
        n_results, n_errors = write_outputs(client.redis, report.batch_id, results_path, errors_path)
        client.close()
    return RunSummary(batch, results_path, errors_path, n_results, n_errors, time.monotonic() - started)


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
