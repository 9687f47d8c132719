"""The usual approach, for comparison: N independent processes, each throttling itself to the
account's full limit, as OpenAI's cookbook `api_request_parallel_processor.py` does.

Each process keeps its own request and token capacity, refilled at the limit per minute up to a
whole minute's worth, counts each request's tokens, and retries a failed request at once. They
share nothing, so together they send N times the limit: the simulator answers with a 429 storm.

    .venv/bin/python bench/naive_baseline.py --processes 4 --rpm 3000 --tpm 400000 --jobs 2000
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import time
from typing import Any

import aiohttp
from common import mixed_workload

from ratequeue.sim.process import start_sim


def _tokens(body: dict[str, Any]) -> int:
    # The cookbook's estimate: prompt characters / 4 plus n x max_tokens.
    chars = sum(len(m["content"]) for m in body["messages"])
    return chars // 4 + body.get("max_tokens", 15)


async def _process(url: str, jobs: list[dict[str, Any]], rpm: float, tpm: float) -> None:
    capacity_r, capacity_t, last = rpm, tpm, time.monotonic()
    queue: list[dict[str, Any]] = list(reversed(jobs))
    inflight: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession() as session:

        async def call(job: dict[str, Any]) -> None:
            async with session.post(f"{url}{job['url']}", json=job["body"],
                                    headers={"authorization": "Bearer sk-naive"}) as resp:
                await resp.read()
                if resp.status != 200:
                    queue.append(job)  # retried at once, no backoff

        while queue or inflight:
            now = time.monotonic()
            capacity_r = min(rpm, capacity_r + rpm / 60 * (now - last))
            capacity_t = min(tpm, capacity_t + tpm / 60 * (now - last))
            last = now
            if queue:
                cost = _tokens(queue[-1]["body"])
                if capacity_r >= 1 and capacity_t >= cost:
                    capacity_r -= 1
                    capacity_t -= cost
                    task = asyncio.create_task(call(queue.pop()))
                    inflight.add(task)
                    task.add_done_callback(inflight.discard)
                    continue
            await asyncio.sleep(0.001)


def _run(url: str, jobs: list[dict[str, Any]], rpm: float, tpm: float) -> None:
    asyncio.run(_process(url, jobs, rpm, tpm))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--rpm", type=float, default=3000)
    ap.add_argument("--tpm", type=float, default=400_000)
    ap.add_argument("--latency-ms", type=float, default=1000)
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--sim-burst-seconds", type=float, default=10.0)
    args = ap.parse_args()
    jobs = list(mixed_workload(args.jobs, 42))
    sim_args = ["--rpm", str(int(args.rpm)), "--tpm", str(int(args.tpm)), "--latency-ms", str(args.latency_ms),
                "--burst-seconds", str(args.sim_burst_seconds)]
    print(f"setup: sim {' '.join(sim_args)}; {args.processes} independent processes each at the full limit; "
          f"{args.jobs} mixed-size jobs")
    with start_sim(sim_args) as sim:
        started = time.monotonic()
        procs = [multiprocessing.Process(target=_run, args=(sim.url, jobs[i :: args.processes], args.rpm, args.tpm))
                 for i in range(args.processes)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        wall = time.monotonic() - started
        stats = sim.stats(timeline=False)
    r429 = sum(stats["r429"].values())
    print(f"| naive x{args.processes} | {int(args.rpm)} RPM / {int(args.tpm):,} TPM | {args.jobs} | {wall:.1f} s | "
          f"429s {r429} ({r429 / max(stats['requests_total'], 1):.1%} of {stats['requests_total']} requests) | "
          f"calls/job {stats['requests_total'] / args.jobs:.2f} |")


if __name__ == "__main__":
    main()
