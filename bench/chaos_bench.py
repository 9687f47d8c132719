"""The larger chaos run: N jobs against a simulator injecting 500/502/503 and slow answers, with K
SIGKILLs of worker processes and one Redis restart (append-only persistence), then the same
workload fault-free. Prints jobs lost, duplicates, extra upstream calls and both wall times.

    .venv/bin/python bench/chaos_bench.py --jobs 5000 --fault-rate 0.05 --kills 5
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import redis
from common import ROOT, mixed_workload, worker_env

from config.settings import load_settings
from producer.api import Client
from producer.embedded import EmbeddedRedis
from sim.process import start_sim


def _tolerant(fn: Any) -> Any:
    for _ in range(200):
        try:
            return fn()
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            time.sleep(0.2)
    raise RuntimeError("redis did not come back")


def run(jobs: int, fault_rate: float, kills: int, restart: bool, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    server = EmbeddedRedis(tmp / f"redis-{fault_rate}").start()
    sim_args = ["--rpm", str(args.rpm), "--tpm", str(args.tpm), "--latency-ms", str(args.latency_ms),
                "--fail-rate", str(fault_rate), "--slow-rate", str(fault_rate), "--slow-ms", "3000", "--seed", "5"]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with start_sim(sim_args) as sim:
            env = worker_env(sim.url, server.url, args.rpm, args.tpm, RATEQUEUE_VISIBILITY_TIMEOUT="20",
                             RATEQUEUE_READ_TIMEOUT="10", RATEQUEUE_DEFER_AFTER="3", RATEQUEUE_MAX_ATTEMPTS="6")

            def start() -> subprocess.Popen[bytes]:
                log = (tmp / f"worker-{len(procs)}.log").open("wb")
                p = subprocess.Popen([sys.executable, "-m", "worker"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                     cwd=ROOT)
                procs.append(p)
                return p

            live = [start(), start()]
            time.sleep(2.0)
            client = Client(load_settings(env))
            started = time.monotonic()
            report = client.submit_batch(mixed_workload(jobs, seed=3))
            minimum = jobs / args.rpm * 60
            events = [(minimum * (i + 1) / (kills + 2), "kill") for i in range(kills)]
            if restart:
                events.append((minimum / 2 + 0.5, "restart"))
            for at, what in sorted(events):
                time.sleep(max(0.0, at - (time.monotonic() - started)))
                if what == "kill":
                    victim = live.pop(0)
                    victim.send_signal(signal.SIGKILL)
                    live.append(start())
                else:
                    server.stop()
                    time.sleep(1.0)
                    server.start()
            while _tolerant(lambda: client.status(report.batch_id))["status"] != "completed":
                time.sleep(0.5)
            wall = time.monotonic() - started
            results = _tolerant(lambda: list(client.iter_results(report.batch_id)))
            errors = _tolerant(lambda: list(client.iter_results(report.batch_id, errors=True)))
            calls = sim.stats(timeline=False)["calls_by_client_id"]
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait(timeout=30)
        server.stop()
    seen = Counter(line["custom_id"] for line in results + errors)
    per_job = Counter({cid.split("/", 1)[1]: n for cid, n in calls.items()})
    return {
        "wall": wall,
        "lost": jobs - len(seen),
        "duplicates": sum(n - 1 for n in seen.values() if n > 1),
        "calls": sum(per_job.values()),
        "max_calls_per_job": max(per_job.values()),
        "failed": len(errors),
        "error_codes": dict(Counter(_code(e) for e in errors)),
    }


def _code(line: dict[str, Any]) -> Any:
    return line["error"]["code"] if line["error"] else line["response"]["status_code"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=5000)
    ap.add_argument("--fault-rate", type=float, default=0.05)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--rpm", type=int, default=6000)
    ap.add_argument("--tpm", type=int, default=50_000_000)
    ap.add_argument("--latency-ms", type=float, default=300)
    args = ap.parse_args()
    print(f"setup: {args.jobs} mixed jobs, {args.rpm} RPM / {args.tpm:,} TPM, latency {args.latency_ms} ms, "
          f"2 workers; chaos: {args.fault_rate:.0%} 5xx + {args.fault_rate:.0%} slow (3 s), {args.kills} SIGKILLs, "
          "1 Redis restart")
    with tempfile.TemporaryDirectory() as tmp:
        chaos = run(args.jobs, args.fault_rate, args.kills, True, args, Path(tmp))
        calm = run(args.jobs, 0.0, 0, False, args, Path(tmp))
    extra = chaos["calls"] - args.jobs
    print(f"chaos:      wall {chaos['wall']:.1f} s; lost {chaos['lost']}; duplicate lines {chaos['duplicates']}; "
          f"upstream calls {chaos['calls']} ({extra} beyond one per job; "
          f"max {chaos['max_calls_per_job']} for one job); "
          f"failed {chaos['failed']} {chaos['error_codes']}")
    print(f"fault-free: wall {calm['wall']:.1f} s; lost {calm['lost']}; duplicate lines {calm['duplicates']}; "
          f"upstream calls {calm['calls']}")


if __name__ == "__main__":
    main()
