"""How fast cancel and pause take hold (issue 10: a cancel took ~11 s and let 46 more jobs complete).

N jobs against the simulator (latency and a request rate that make the batch last long enough),
W worker processes with default settings; half-way, the batch is cancelled (or paused). The
simulator's per-request counts are sampled every 50 ms, so the figures are: how long the cancel
call took, when the last new upstream call of the batch arrived after it returned, how many calls
arrived after it returned, and how long until the batch was ``cancelled`` (every job settled).

    .venv/bin/python bench/control_bench.py --jobs 1000 --workers 2 --action cancel
    .venv/bin/python bench/control_bench.py --jobs 1000 --workers 2 --action pause
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
from common import BENCH_REDIS_URL, ROOT, mixed_workload, worker_env

from ratequeue.config.settings import load_settings
from ratequeue.producer.api import Client
from ratequeue.sim.process import SimHandle, start_sim


def _calls(sim: SimHandle, batch_id: str) -> int:
    calls = sim.stats(timeline=False)["calls_by_client_id"]
    return sum(n for cid, n in calls.items() if cid.startswith(batch_id + "/"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rpm", type=int, default=1200)
    ap.add_argument("--latency-ms", type=float, default=300)
    ap.add_argument("--action", choices=("cancel", "pause"), default="cancel")
    ap.add_argument("--watch", type=float, default=6.0, help="Seconds to keep sampling after the action.")
    args = ap.parse_args()

    redis.Redis.from_url(BENCH_REDIS_URL).flushdb()
    sim_args = ["--rpm", str(args.rpm), "--tpm", "100000000", "--latency-ms", str(args.latency_ms)]
    with start_sim(sim_args) as sim, tempfile.TemporaryDirectory() as tmp:
        env = worker_env(sim.url, BENCH_REDIS_URL, args.rpm, 100_000_000)
        workers = [subprocess.Popen([sys.executable, "-m", "ratequeue.worker"], env=env, cwd=ROOT,
                                    stdout=(Path(tmp) / f"w{i}.log").open("wb"), stderr=subprocess.STDOUT)
                   for i in range(args.workers)]
        try:
            client = Client(load_settings(env))
            batch_id = client.submit_batch(mixed_workload(args.jobs)).batch_id
            while client.status(batch_id)["request_counts"]["completed"] < args.jobs // 2:
                time.sleep(0.05)
            began = time.monotonic()
            client.cancel(batch_id) if args.action == "cancel" else client.pause(batch_id)
            returned = time.monotonic()
            at_return = last = _calls(sim, batch_id)
            last_new = returned
            ended: float | None = None
            while time.monotonic() - returned < args.watch:
                now_calls = _calls(sim, batch_id)
                if now_calls > last:
                    last, last_new = now_calls, time.monotonic()
                if ended is None and client.status(batch_id)["status"] == "cancelled":
                    ended = time.monotonic() - returned
                time.sleep(0.05)
            batch = client.status(batch_id)
        finally:
            for w in workers:
                w.terminate()
            for w in workers:
                w.wait(30)
    print(f"{args.action} of {args.jobs} jobs half-way, {args.workers} workers, {args.latency_ms:g} ms latency, "
          f"{args.rpm} RPM")
    print(f"  {args.action} call took          {returned - began:.3f} s")
    print(f"  calls arriving after it        {last - at_return}")
    print(f"  last new call after it         {last_new - returned:.3f} s")
    if args.action == "cancel":
        print(f"  batch cancelled after it       {'not within the watch' if ended is None else f'{ended:.3f} s'}")
    print(f"  final: status {batch['status']}, paused {batch.get('paused')}, counts {batch['request_counts']}")


if __name__ == "__main__":
    main()
