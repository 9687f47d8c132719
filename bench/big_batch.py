"""A big batch: 100,000 jobs (size limits raised). Measures the submit rate into Redis, Redis
memory per queued job, the run through 2 workers against the simulator (no latency, limits far
above what the machine can push), and the collection of the results file in a fresh process: its
time and peak memory (the file is written streaming, so memory must not grow with the batch).

    .venv/bin/python bench/big_batch.py --jobs 100000
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
from common import BENCH_REDIS_URL, ROOT, flush, mixed_workload, worker_env, workers, write_jsonl

from ratequeue.config.settings import load_settings
from ratequeue.producer.api import Client
from ratequeue.sim.process import start_sim

COLLECT = """
import sys, time
sys.path.insert(0, {root!r})
import redis
from ratequeue.producer.collect import write_outputs
from pathlib import Path
client = redis.Redis.from_url({url!r})
t = time.monotonic()
n, e = write_outputs(client, {batch!r}, Path({out!r}), Path({out!r} + ".errors"))
# VmHWM, not ru_maxrss: the latter keeps the peak of the forking parent across exec.
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print(n, e, time.monotonic() - t, int(hwm) / 1024)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=100_000)
    args = ap.parse_args()
    flush(BENCH_REDIS_URL)
    r = redis.Redis.from_url(BENCH_REDIS_URL)
    with tempfile.TemporaryDirectory() as tmp, start_sim(["--rpm", "100000000", "--tpm", "100000000000"]) as sim:
        src = Path(tmp) / "big.jsonl"
        write_jsonl(src, mixed_workload(args.jobs, seed=9))
        print(f"setup: {args.jobs} mixed jobs, {src.stat().st_size / 1e6:.1f} MB input; redis {BENCH_REDIS_URL}; "
              "2 workers; simulator without latency")
        env = worker_env(sim.url, BENCH_REDIS_URL, 100_000_000, 100_000_000_000,
                         RATEQUEUE_MAX_LINES=str(args.jobs), RATEQUEUE_MAX_FILE_BYTES=str(10**10))
        client = Client(load_settings(env))
        before = int(r.info("memory")["used_memory"])
        started = time.monotonic()
        report = client.submit_batch(src)
        submit = time.monotonic() - started
        per_job = (int(r.info("memory")["used_memory"]) - before) / args.jobs
        print(f"submit: {report.jobs} jobs in {submit:.1f} s = {report.jobs / submit:,.0f} jobs/s; "
              f"Redis memory {per_job:,.0f} bytes per queued job (job, order entry and chunk message)")
        with workers(2, env, Path(tmp) / "logs"):
            started = time.monotonic()
            batch = client.wait(report.batch_id, timeout=3600, poll=0.5)
            run = time.monotonic() - started
        print(f"run: {batch['request_counts']} in {run:.1f} s = {args.jobs / run:,.0f} jobs/s")
        out = str(Path(tmp) / "out.jsonl")
        code = COLLECT.format(root=str(ROOT), url=BENCH_REDIS_URL, batch=report.batch_id, out=out)
        n, e, seconds, rss = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                            check=True).stdout.split()
        size = Path(out).stat().st_size / 1e6
        print(f"collect: {n} result lines ({size:.0f} MB) + {e} error lines in {float(seconds):.1f} s; "
              f"collector peak RSS {float(rss):.0f} MB")


if __name__ == "__main__":
    main()
