"""Issue 11, the server's window and slow start: the simulator enforces a window other than our
5 s burst, or the limits are configured far too high. Prints each scenario's setup and figures.

    .venv/bin/python bench/window_bench.py                     # every scenario, this checkout
    .venv/bin/python bench/window_bench.py --compare /work/main  # each also run with that checkout's workers
    .venv/bin/python bench/window_bench.py --only 1s-sum --only 60s-max
    .venv/bin/python bench/window_bench.py --scale issue       # the issue's scale, 12 runs (~17 min)
    .venv/bin/python bench/window_bench.py --only 1s-max --timeline --log-dir /tmp/logs  # to profile one

Scenarios (scaled down from the issue's 1,500 jobs so that each takes about a minute on 2 shared cores):
  1s-sum, 1s-max        server window 1 s, both charge rules: 429s <= 0.2%, >= 97% of the limit
  1s-sum-no-retry-after the same without Retry-After on its 429s
  60s-sum, 60s-max      server forgives a whole minute: wall within 5% of the minimum, which here
                        spends the server's opening allowance (a minute of limit) at once
  100x-1s               limits configured 100x too high (300,000 RPM / 40M TPM) on a 1 s window: 429s <= 1%
With --scale issue: 1,500 mixed jobs at 3,000 RPM / 400k TPM for every case (1s-*, 60s-*, 100x-1s-*),
each under both charge rules, with and without Retry-After (names 1s-max-no-retry-after, ...).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import BENCH_REDIS_URL, HEADER, ROOT, figures, flush, mixed_workload, peak_rss_mb, worker_env
from shared_account_bench import Profile

from ratequeue.config.settings import load_settings
from ratequeue.jobstore.heartbeats import live_workers
from ratequeue.producer.api import Client
from ratequeue.sim.process import start_sim

LATENCY_MS = 1000


@dataclass(frozen=True)
class Scenario:
    name: str
    jobs: int
    rpm: int
    tpm: int
    sim_window: float  # the simulator's --burst-seconds
    rule: str
    configured_factor: float = 1.0
    retry_after: bool = True


SCENARIOS = [
    Scenario("1s-sum", 300, 3000, 400_000, 1, "sum"),
    Scenario("1s-max", 300, 3000, 400_000, 1, "max"),
    Scenario("1s-sum-no-retry-after", 300, 3000, 400_000, 1, "sum", retry_after=False),
    Scenario("60s-sum", 400, 3000, 80_000, 60, "sum"),
    Scenario("60s-max", 400, 3000, 50_000, 60, "max"),
    Scenario("100x-1s", 300, 3000, 400_000, 1, "sum", configured_factor=100),
]

# The issue's scale: 1,500 mixed jobs, 3,000 RPM / 400k TPM, every window case under both charge
# rules, with and without Retry-After on the 429s (--scale issue).
ISSUE_SCENARIOS = [
    Scenario(f"{kind}-{rule}{'' if retry_after else '-no-retry-after'}", 1500, 3000, 400_000,
             60 if kind == "60s" else 1, rule, 100 if kind == "100x-1s" else 1, retry_after)
    for kind in ("1s", "60s", "100x-1s") for rule in ("sum", "max") for retry_after in (True, False)
]


def timeline_lines(stats: dict[str, Any], rpm: int, tpm: int) -> list[str]:
    """Per second: requests and tokens accepted, as a share of the server's per-second allowance, and 429s."""
    out = []
    for row in stats["timeline"]:
        req, tok = row["requests_ok"] / (rpm / 60), row["tokens_charged_ok"] / (tpm / 60)
        out.append(f"  t={row['t']:3d} ok {row['requests_ok']:3d} ({req:6.1%} of RPM/s)"
                   f" tokens {row['tokens_charged_ok']:6d} ({tok:6.1%} of TPM/s) 429 {row['r429']}")
    return out


def ready(client: Client, workers: int, launched: float, timeout: float = 60.0) -> None:
    """Wait until every worker is up (its heartbeat, written once Celery is ready) and 2 s have
    passed since their launch, before the clock starts: the minimum counts no start-up, and on a
    loaded machine a worker came up 3-5 s after its launch (a 2 s sleep alone put that in the wall)."""
    while live_workers(client.redis) < workers and time.monotonic() - launched < timeout:
        time.sleep(0.1)
    time.sleep(max(0.0, 2.0 - (time.monotonic() - launched)))


def run(s: Scenario, code: Path, workers: int, show_timeline: bool = False, log_dir: Path | None = None,
        profile: bool = False) -> str:
    """One run with the workers of checkout `code`; returns its figures as a table row plus notes."""
    flush(BENCH_REDIS_URL)
    sim_args = ["--rpm", str(s.rpm), "--tpm", str(s.tpm), "--latency-ms", str(LATENCY_MS),
                "--burst-seconds", str(s.sim_window), "--charge-rule", s.rule, "--seed", "42",
                *([] if s.retry_after else ["--no-retry-after"])]
    logs = nullcontext(tempfile.mkdtemp(dir=log_dir)) if log_dir else tempfile.TemporaryDirectory()
    with start_sim(sim_args) as sim, logs as tmp:
        env = worker_env(sim.url, BENCH_REDIS_URL, s.rpm * s.configured_factor, s.tpm * s.configured_factor,
                         charge_rule=s.rule)
        env["PYTHONPATH"] = str(code)
        if log_dir:  # one line per upstream call, to profile a run
            env["RATEQUEUE_LOG_LEVEL"] = "INFO"
        procs, launched = [], time.monotonic()
        for n in range(workers):
            with (Path(tmp) / f"worker-{n}.log").open("wb") as log:
                procs.append(subprocess.Popen([sys.executable, "-m", "ratequeue.worker"], env=env, stdout=log,
                                              stderr=subprocess.STDOUT, cwd=code))
        try:
            client = Client(load_settings(env))
            ready(client, workers, launched)
            sim.reset()
            trace = Profile(sim.url, [BENCH_REDIS_URL]) if profile else None
            started = time.monotonic()
            if trace:
                trace.start()
            report = client.submit_batch(mixed_workload(s.jobs, 42))
            batch = client.wait(report.batch_id, timeout=900, poll=0.2)
            wall = time.monotonic() - started
            if trace:
                trace.stop()
                trace.print([report.batch_id])
            rss = max(peak_rss_mb(p.pid) for p in procs)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(timeout=30)
        stats = sim.stats()
    row = figures(f"{s.name} ({code.name})", stats, s.rpm, s.tpm, s.jobs, wall, LATENCY_MS / 1000, rss)
    counts = batch["request_counts"]
    notes = f"completed {counts['completed']}, failed {counts['failed']}"
    if s.sim_window >= 60:
        # The server's opening allowance is a minute of limit: only what exceeds it waits for refill.
        opening = max(0.0, (s.jobs - s.rpm) / s.rpm, (stats["tokens_charged"] - s.tpm) / s.tpm) * 60
        minimum = opening + LATENCY_MS / 1000
        notes += f"; minimum with the opening allowance {minimum:.1f} s, wall/min {wall / minimum:.3f}"
    if log_dir:
        notes += f"; worker logs in {tmp}; simulator reset at {stats['started_at']:.3f}"
    lines = [row.row(), f"  {notes}", *(timeline_lines(stats, s.rpm, s.tpm) if show_timeline else [])]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--scale", choices=("small", "issue"), default="small",
                    help="small: 300-400 jobs (about a minute each); issue: 1,500 jobs at 3,000 RPM / 400k TPM")
    ap.add_argument("--only", action="append", default=[], help="scenario name (repeatable)")
    ap.add_argument("--timeline", action="store_true", help="print each second's sends against the allowance")
    ap.add_argument("--log-dir", type=Path, help="keep each run's worker logs in a new directory under this one")
    ap.add_argument("--profile", action="store_true",
                    help="print the calls, 429s, share and the server's reported room every 0.5 s")
    ap.add_argument("--compare", type=Path, help="another checkout whose workers also run each scenario")
    args = ap.parse_args()
    scenarios = ISSUE_SCENARIOS if args.scale == "issue" else SCENARIOS
    chosen = [s for s in scenarios if not args.only or s.name in args.only]
    codes = [ROOT, *([args.compare.resolve()] if args.compare else [])]
    print(f"setup: simulator latency {LATENCY_MS} ms, seed 42, {args.workers} worker process(es), mixed-size jobs; "
          f"redis {BENCH_REDIS_URL}; checkouts {[str(c) for c in codes]}; load {os.getloadavg()[0]:.1f}")
    for s in chosen:
        print(f"\n{s.name}: {s.jobs} jobs, simulator {s.rpm} RPM / {s.tpm:,} TPM, window {s.sim_window:g} s, "
              f"rule {s.rule}, configured {s.configured_factor:g} x, retry-after {'on' if s.retry_after else 'off'}")
        print(HEADER)
        for code in codes:
            print(run(s, code, args.workers, args.timeline, args.log_dir, args.profile), flush=True)
        print(f"load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
