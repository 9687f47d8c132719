"""Budgets in USD (issue 14): where dispatch stops, how fast a raise resumes it, what a run costs.

N mixed-size jobs against the simulator, W worker processes; the batch's budget is a share of its
worst case (every job's prompt at list price plus its whole max_tokens output). The figures: the
actual cost when it stopped against the budget (it must never pass it), the jobs done then, the
time from ``ratequeue budget --usd`` (``set_batch_budget``) returning to the next upstream call of
the batch, and the wall time of the same batch run with and without a budget (the reserve and
settle calls are two Redis round trips per call).

    .venv/bin/python bench/budget_bench.py --jobs 1000 --workers 2 --share 0.3 \\
        --redis-url redis://127.0.0.1:6397/14
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
from ratequeue.jobstore import keys
from ratequeue.jobstore.budgets import NANO, batch_budget, set_batch_budget, to_nano
from ratequeue.jobstore.jobs import StoredJob
from ratequeue.producer.api import Client
from ratequeue.sim.process import SimHandle, start_sim
from ratequeue.worker.budget import worst_case_usd


def _calls(sim: SimHandle, batch_id: str) -> int:
    calls = sim.stats(timeline=False)["calls_by_client_id"]
    return sum(n for cid, n in calls.items() if cid.startswith(batch_id + "/"))


def _worst(client: Client, batch_id: str) -> float:
    spec = client.table.get("gpt-4o-mini")
    jobs = client.redis.hgetall(keys.batch_jobs(batch_id))
    return sum(to_nano(worst_case_usd(spec, StoredJob.loads(c.decode(), raw))) for c, raw in jobs.items()) / NANO


def _run_to_end(client: Client, jobs: int, budget: float | None) -> float:
    started = time.monotonic()
    batch_id = client.submit_batch(mixed_workload(jobs, seed=7), budget_usd=budget).batch_id
    client.wait(batch_id, timeout=600, poll=0.1)
    return time.monotonic() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--share", type=float, default=0.3, help="The budget as a share of the batch's worst case.")
    ap.add_argument("--rpm", type=int, default=6000)
    ap.add_argument("--latency-ms", type=float, default=100)
    ap.add_argument("--redis-url", default=BENCH_REDIS_URL)
    args = ap.parse_args()

    redis.Redis.from_url(args.redis_url).flushdb()
    sim_args = ["--rpm", str(args.rpm), "--tpm", "100000000", "--latency-ms", str(args.latency_ms)]
    with start_sim(sim_args) as sim, tempfile.TemporaryDirectory() as tmp:
        env = worker_env(sim.url, args.redis_url, args.rpm, 100_000_000)
        workers = [subprocess.Popen([sys.executable, "-m", "ratequeue.worker"], env=env, cwd=ROOT,
                                    stdout=(Path(tmp) / f"w{i}.log").open("wb"), stderr=subprocess.STDOUT)
                   for i in range(args.workers)]
        try:
            client = Client(load_settings(env))
            probe = client.submit_batch(mixed_workload(args.jobs), budget_usd=0.0).batch_id
            worst = _worst(client, probe)
            budget = round(worst * args.share, 9)
            batch_id = client.submit_batch(mixed_workload(args.jobs), budget_usd=budget).batch_id
            began = time.monotonic()
            while (shown := batch_budget(client.redis, batch_id) or {}).get("paused") != "budget" or \
                    shown["reserved_usd"] > 0:
                time.sleep(0.05)
            stopped = time.monotonic() - began
            time.sleep(1.0)  # the last results stored
            at_stop = client.status(batch_id)
            calls = _calls(sim, batch_id)
            set_batch_budget(client.redis, batch_id, worst * 2)
            raised = time.monotonic()
            while _calls(sim, batch_id) == calls:
                time.sleep(0.01)
            resumed = time.monotonic() - raised
            done = client.wait(batch_id, timeout=600, poll=0.1)
            plain = _run_to_end(client, args.jobs, None)
            budgeted = _run_to_end(client, args.jobs, worst * 2)
        finally:
            for w in workers:
                w.terminate()
            for w in workers:
                w.wait(30)
    print(f"{args.jobs} mixed jobs, {args.workers} workers, {args.rpm} RPM, {args.latency_ms:g} ms latency; "
          f"worst case ${worst:.6f}, budget ${budget:.6f} ({args.share:g} of it)")
    print(f"  stopped after                  {stopped:.2f} s, {at_stop['request_counts']['completed']} jobs done, "
          f"{at_stop['request_counts']['failed']} failed")
    print(f"  actual cost at the stop        ${at_stop['cost_usd']:.6f} ({at_stop['cost_usd'] / budget:.1%} of budget)")
    print(f"  first call after the raise     {resumed:.3f} s")
    print(f"  after the raise                {done['status']}, {done['request_counts']}, ${done['cost_usd']:.6f}")
    print(f"  wall time, no budget / budget  {plain:.2f} s / {budgeted:.2f} s")


if __name__ == "__main__":
    main()
