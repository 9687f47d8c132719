"""The larger chaos run: N jobs against a simulator injecting 500/502/503 and slow answers, with R
SIGKILLs and restarts of Redis (append-only persistence) under workers that are NOT restarted, and
optionally K SIGKILLs of worker processes (each replaced, as a service manager would), then the same
workload fault-free. Every setting is the default a user gets (timeouts, visibility timeout, defer
time) unless ``--tuned`` asks for the short ones of earlier rounds. Prints jobs lost, duplicate
lines, answers paid more than once, extra upstream calls, worker exits and both wall times.

    .venv/bin/python bench/chaos_bench.py --jobs 5000 --fault-rate 0.05 --redis-kills 3

With default settings a SIGKILLed worker's chunks come back after the visibility timeout (30 min),
so ``--kills`` belongs with ``--tuned`` until dead workers are noticed sooner.
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

from ratequeue.config.settings import load_settings
from ratequeue.producer.api import Client
from ratequeue.producer.embedded import EmbeddedRedis
from ratequeue.sim.process import start_sim


def _tolerant(fn: Any) -> Any:
    for _ in range(200):
        try:
            return fn()
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            time.sleep(0.2)
    raise RuntimeError("redis did not come back")


def run(
    jobs: int, fault_rate: float, kills: int, redis_kills: int, args: argparse.Namespace, tmp: Path
) -> dict[str, Any]:
    server = EmbeddedRedis(tmp / f"redis-{fault_rate}").start()
    sim_args = ["--rpm", str(args.rpm), "--tpm", str(args.tpm), "--latency-ms", str(args.latency_ms),
                "--fail-rate", str(fault_rate), "--slow-rate", str(fault_rate), "--slow-ms", "3000", "--seed", "5"]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with start_sim(sim_args) as sim:
            tuned = dict(RATEQUEUE_VISIBILITY_TIMEOUT="20", RATEQUEUE_READ_TIMEOUT="10", RATEQUEUE_DEFER_AFTER="3")
            env = worker_env(sim.url, server.url, args.rpm, args.tpm, **(tuned if args.tuned else {}))

            def start() -> subprocess.Popen[bytes]:
                log = (tmp / f"worker-{len(procs)}.log").open("wb")
                p = subprocess.Popen([sys.executable, "-m", "ratequeue.worker"], env=env, stdout=log,
                                     stderr=subprocess.STDOUT, cwd=ROOT)
                procs.append(p)
                return p

            live = [start(), start()]
            time.sleep(2.0)
            client = Client(load_settings(env))
            started = time.monotonic()
            report = client.submit_batch(mixed_workload(jobs, seed=3))
            minimum = jobs / args.rpm * 60
            events = [(minimum * (i + 1) / (kills + 2), "kill") for i in range(kills)]
            events += [(minimum * (i + 1) / (redis_kills + 1) + 0.5, "redis") for i in range(redis_kills)]
            killed: set[int] = set()
            for at, what in sorted(events):
                time.sleep(max(0.0, at - (time.monotonic() - started)))
                if what == "kill":
                    victim = live.pop(0)
                    victim.send_signal(signal.SIGKILL)
                    killed.add(victim.pid)
                    live.append(start())
                else:
                    server.kill()  # a crash, not a shutdown: the workers are left as they are
                    time.sleep(args.redis_down)
                    server.start()
            while _tolerant(lambda: client.status(report.batch_id))["status"] != "completed":
                time.sleep(0.5)
            wall = time.monotonic() - started
            results = _tolerant(lambda: list(client.iter_results(report.batch_id)))
            errors = _tolerant(lambda: list(client.iter_results(report.batch_id, errors=True)))
            stats = sim.stats(timeline=False)
            calls, answers = stats["calls_by_client_id"], stats["answers_by_client_id"]
            exited = [p.returncode for p in procs if p.pid not in killed and p.poll() is not None]
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
        "paid_twice": sum(1 for n in answers.values() if n > 1),
        "worker_exits": exited,
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
    ap.add_argument("--kills", type=int, default=0, help="worker SIGKILLs (each replaced); pair with --tuned")
    ap.add_argument("--redis-kills", type=int, default=3, help="Redis SIGKILLs and restarts; workers kept")
    ap.add_argument("--redis-down", type=float, default=3.0, help="seconds Redis stays down each time")
    ap.add_argument("--tuned", action="store_true", help="short timeouts: visibility 20 s, read 10 s, defer 3 s")
    ap.add_argument("--rpm", type=int, default=6000)
    ap.add_argument("--tpm", type=int, default=50_000_000)
    ap.add_argument("--latency-ms", type=float, default=300)
    args = ap.parse_args()
    print(f"setup: {args.jobs} mixed jobs, {args.rpm} RPM / {args.tpm:,} TPM, latency {args.latency_ms} ms, "
          f"2 workers, {'tuned timeouts' if args.tuned else 'default settings'}; chaos: {args.fault_rate:.0%} 5xx + "
          f"{args.fault_rate:.0%} slow (3 s), {args.redis_kills} Redis SIGKILLs ({args.redis_down:g} s down, "
          f"workers not restarted), {args.kills} worker SIGKILLs")
    with tempfile.TemporaryDirectory() as tmp:
        chaos = run(args.jobs, args.fault_rate, args.kills, args.redis_kills, args, Path(tmp))
        calm = run(args.jobs, 0.0, 0, 0, args, Path(tmp))
    extra = chaos["calls"] - args.jobs
    print(f"chaos:      wall {chaos['wall']:.1f} s; lost {chaos['lost']}; duplicate lines {chaos['duplicates']}; "
          f"answers paid twice {chaos['paid_twice']}; upstream calls {chaos['calls']} ({extra} beyond one per job; "
          f"max {chaos['max_calls_per_job']} for one job); failed {chaos['failed']} {chaos['error_codes']}; "
          f"worker exits {chaos['worker_exits']}")
    print(f"fault-free: wall {calm['wall']:.1f} s; lost {calm['lost']}; duplicate lines {calm['duplicates']}; "
          f"answers paid twice {calm['paid_twice']}; upstream calls {calm['calls']}")


if __name__ == "__main__":
    main()
