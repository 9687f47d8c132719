"""The core pipeline benchmark: simulator at fixed limits, N worker processes, a seeded mixed-size
workload. Prints utilisation of the binding limit over the steady state, 429s, and wall time
against the theoretical minimum.

    .venv/bin/python bench/pipeline_bench.py --rpm 3000 --tpm 400000 --latency-ms 1000 --jobs 2000 --workers 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from common import (
    BENCH_REDIS_URL,
    HEADER,
    cpu_seconds,
    figures,
    flush,
    mixed_workload,
    peak_rss_mb,
    redis_server_pid,
    worker_env,
    workers,
)

from ratequeue.config.settings import load_settings
from ratequeue.producer.api import Client
from ratequeue.sim.process import start_sim


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rpm", type=float, default=3000)
    ap.add_argument("--tpm", type=float, default=400_000)
    ap.add_argument("--latency-ms", type=float, default=1000)
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--sim-burst-seconds", type=float, default=10.0,
                    help="capacity of the simulator's buckets in seconds of limit (OpenAI: short slices)")
    ap.add_argument("--charge-rule", choices=("sum", "max"), default="sum")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--scenario", default="core")
    ap.add_argument("--worker-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment of the workers, e.g. RATEQUEUE_WORKER_SLOTS=32")
    ap.add_argument("--configured-factor", type=float, default=1.0,
                    help="the workers' configured limits as a multiple of the simulator's (1.1: 10%% too high)")
    ap.add_argument("--unconfigured", action="store_true",
                    help="leave the limits to the model table's defaults (the workers learn them from headers)")
    ap.add_argument("--no-retry-after", action="store_true", help="the simulator sends no Retry-After headers")
    ap.add_argument("--timeline", action="store_true", help="print the requests answered in each second")
    args = ap.parse_args()

    flush(BENCH_REDIS_URL)
    sim_args = [
        "--rpm", str(int(args.rpm)), "--tpm", str(int(args.tpm)), "--latency-ms", str(args.latency_ms),
        "--burst-seconds", str(args.sim_burst_seconds), "--charge-rule", args.charge_rule, "--seed", str(args.seed),
        *(["--no-retry-after"] if args.no_retry_after else []),
    ]
    print(f"setup: sim {' '.join(sim_args)}; {args.workers} worker process(es); {args.jobs} mixed-size jobs; "
          f"redis {BENCH_REDIS_URL}; worker env {args.worker_env}; configured limits "
          f"{'model-table defaults' if args.unconfigured else f'{args.configured_factor:g} x the simulator'}")
    with start_sim(sim_args) as sim, tempfile.TemporaryDirectory() as tmp:
        extra = dict(item.split("=", 1) for item in args.worker_env)
        rpm = None if args.unconfigured else args.rpm * args.configured_factor
        tpm = None if args.unconfigured else args.tpm * args.configured_factor
        env = worker_env(sim.url, BENCH_REDIS_URL, rpm, tpm, charge_rule=args.charge_rule, **extra)
        with workers(args.workers, env, Path(tmp) / "logs") as procs:
            client = Client(load_settings(env))
            time.sleep(2.0)  # workers connected and warm before the clock starts
            sim.reset()
            pids = {"workers": [p.pid for p in procs], "simulator": [sim.process.pid],
                    "redis": [redis_server_pid(BENCH_REDIS_URL)], "producer (this process)": [os.getpid()]}
            cpu_before = {name: sum(cpu_seconds(pid) for pid in ids) for name, ids in pids.items()}
            started = time.monotonic()
            report = client.submit_batch(mixed_workload(args.jobs, args.seed))
            submitted = time.monotonic() - started
            batch = client.wait(report.batch_id, timeout=3600, poll=0.2)
            wall = time.monotonic() - started
            rss = max(peak_rss_mb(p.pid) for p in procs)
            cpu = {name: sum(cpu_seconds(pid) for pid in ids) - cpu_before[name] for name, ids in pids.items()}
        stats = sim.stats()
    counts = batch["request_counts"]
    print(f"batch {batch['status']}: {counts}; submit took {submitted:.2f} s")
    used = ", ".join(f"{name} {secs:.1f}" for name, secs in cpu.items())
    print(f"CPU seconds during the run (2 cores = {2 * wall:.1f} s available): {used}")
    if args.timeline:
        print("requests answered per second:", " ".join(str(r["requests_ok"]) for r in stats["timeline"]))
    row = figures(args.scenario, stats, args.rpm, args.tpm, args.jobs, wall, args.latency_ms / 1000, rss)
    print(HEADER)
    print(row.row())


if __name__ == "__main__":
    main()
