"""Throughput and latency of the shared limiter against a real Redis.

(a) single-cost reserve calls from N concurrent asyncio tasks sharing one connection pool;
(b) the same reservations made through one `BucketGate`, which batches waiting costs into one call;
(c) (a) from several processes at once on one bucket, as workers on several hosts would: what the
    limiter (Redis running the Lua script) sustains, beyond one client process's ceiling;
(d) single reserve calls made by `redis-benchmark` (C, 50 connections, no pipelining): Redis's
    own capacity for reserve.lua, without any Python client in the way.

Limits are set far above the load, so every reservation is granted at once: this measures the
limiter's own cost (Redis round trip, Lua, Python), not the rate it enforces.

    .venv/bin/python bench/limiter_bench.py [--url redis://127.0.0.1:6379/0] [--tasks 64] [--seconds 3]
        [--processes 3]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import time
import uuid
from collections.abc import Sequence

import redis
import redis.asyncio

from ratequeue.jobstore.keys import bucket_key
from ratequeue.jobstore.scripts import lua_source
from ratequeue.worker.gate import BucketGate
from ratequeue.worker.limiter import BucketLimits, Limiter, ReserveResult

UNLIMITED = BucketLimits(rpm=1e12, tpm=1e15, burst_seconds=1.0)


class TimedLimiter(Limiter):
    """Records the latency (seconds) and size of every reserve call."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        super().__init__(client)
        self.latencies: list[float] = []
        self.sizes: list[int] = []

    async def reserve(self, key: str, limits: BucketLimits, costs: Sequence[int]) -> ReserveResult:
        start = time.perf_counter()
        try:
            return await super().reserve(key, limits, costs)
        finally:
            self.latencies.append(time.perf_counter() - start)
            self.sizes.append(len(costs))


def percentiles(values: list[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds."""
    q = statistics.quantiles(values, n=100, method="inclusive")
    return q[49] * 1e3, q[98] * 1e3


async def bench_direct(limiter: TimedLimiter, key: str, tasks: int, seconds: float) -> float:
    """(a): each task loops on reserve([cost]); returns reservations per second."""
    stop = time.perf_counter() + seconds

    async def worker() -> int:
        done = 0
        while time.perf_counter() < stop:
            await limiter.reserve(key, UNLIMITED, [100])
            done += 1
        return done

    start = time.perf_counter()
    total = sum(await asyncio.gather(*(worker() for _ in range(tasks))))
    return total / (time.perf_counter() - start)


async def bench_gate(limiter: TimedLimiter, key: str, tasks: int, seconds: float) -> tuple[float, list[float]]:
    """(b): `tasks` coroutines loop on gate.acquire(cost); returns acquires/s and their latencies."""
    gate = BucketGate(limiter, key, UNLIMITED, max_batch=64)
    stop = time.perf_counter() + seconds
    waits: list[float] = []

    async def worker() -> int:
        done = 0
        while time.perf_counter() < stop:
            start = time.perf_counter()
            await gate.acquire(100)
            waits.append(time.perf_counter() - start)
            done += 1
        return done

    start = time.perf_counter()
    total = sum(await asyncio.gather(*(worker() for _ in range(tasks))))
    return total / (time.perf_counter() - start), waits


def _direct_in_process(url: str, key: str, tasks: int, seconds: float, start_at: float) -> tuple[int, list[float]]:
    """(c): one process's part: wait for the common start, run (a); (reservations, latencies)."""

    async def run() -> tuple[int, list[float]]:
        pool = redis.asyncio.BlockingConnectionPool.from_url(url, max_connections=tasks + 4)
        client = redis.asyncio.Redis(connection_pool=pool)
        try:
            limiter = TimedLimiter(client)
            await limiter.reserve(key, UNLIMITED, [1])
            limiter.latencies.clear()
            await asyncio.sleep(max(0.0, start_at - time.time()))
            await bench_direct(limiter, key, tasks, seconds)
            return len(limiter.latencies), limiter.latencies
        finally:
            await client.aclose()

    return asyncio.run(run())


def bench_processes(url: str, key: str, processes: int, tasks: int, seconds: float) -> tuple[float, list[float]]:
    start_at = time.time() + 2.0  # every process connected and warm before the clock starts
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        parts = pool.starmap(_direct_in_process, [(url, key, tasks, seconds, start_at)] * processes)
    return sum(n for n, _ in parts) / seconds, [lat for _, lats in parts for lat in lats]


def bench_redis_benchmark(url: str, key: str, requests: int = 100_000) -> str:
    """(d): redis-benchmark calling reserve.lua with one cost per call; its CSV figures as text."""
    exe = shutil.which("redis-benchmark")
    if exe is None:
        return "(d) skipped: redis-benchmark is not installed"
    conn = redis.Redis.from_url(url)
    sha = conn.script_load(lua_source("reserve", "ratequeue.worker"))
    kw = conn.connection_pool.connection_kwargs
    args = [str(int(UNLIMITED.rpm)), str(int(UNLIMITED.tpm)), "1", "2000000", "100"]
    out = subprocess.run(
        [exe, "--csv", "-n", str(requests), "-c", "50", "-h", str(kw.get("host", "127.0.0.1")),
         "-p", str(kw.get("port", 6379)), "--dbnum", str(kw.get("db", 0)), "EVALSHA", sha, "1", key, *args],
        capture_output=True, text=True, check=True,
    ).stdout
    conn.delete(key)
    row = list(csv.DictReader(out.strip().splitlines()))[-1]
    return (
        f"(d) redis-benchmark, 50 connections, one reserve.lua call per request: {float(row['rps']):,.0f} "
        f"reservations/s; p50 {row['p50_latency_ms']} ms, p99 {row['p99_latency_ms']} ms"
    )


async def main(url: str, tasks: int, gate_tasks: int, seconds: float, processes: int) -> None:
    pool = redis.asyncio.BlockingConnectionPool.from_url(url, max_connections=tasks + 4)
    client = redis.asyncio.Redis(connection_pool=pool)
    info = await client.info("server")
    print(
        f"setup: python {platform.python_version()}, redis-py {redis.__version__}, "
        f"Redis {info['redis_version']} at {url}, {os.cpu_count()} cores, {seconds:.0f} s per run, "
        "limits far above the load (every reservation granted)"
    )
    key = bucket_key(uuid.uuid4().hex[:12], "bench")
    try:
        direct = TimedLimiter(client)
        await direct.reserve(key, UNLIMITED, [1])  # load the script
        direct.latencies.clear()
        rate = await bench_direct(direct, key, tasks, seconds)
        p50, p99 = percentiles(direct.latencies)
        print(
            f"(a) single reserve calls, {tasks} tasks, pool of {tasks + 4}: {rate:,.0f} reservations/s; "
            f"one call p50 {p50:.2f} ms, p99 {p99:.2f} ms"
        )

        gated = TimedLimiter(client)
        rate, waits = await bench_gate(gated, key, gate_tasks, seconds)
        p50, p99 = percentiles(gated.latencies)
        a50, a99 = percentiles(waits)
        mean_batch = statistics.fmean(gated.sizes)
        print(
            f"(b) through one BucketGate, {gate_tasks} tasks, max_batch 64: {rate:,.0f} reservations/s "
            f"in {len(gated.sizes):,} calls (mean batch {mean_batch:.1f}); one call p50 {p50:.2f} ms, "
            f"p99 {p99:.2f} ms; acquire() p50 {a50:.2f} ms, p99 {a99:.2f} ms"
        )
        if processes > 1:
            rate, latencies = await asyncio.to_thread(bench_processes, url, key, processes, tasks, seconds)
            p50, p99 = percentiles(latencies)
            print(
                f"(c) single reserve calls from {processes} processes x {tasks} tasks on one bucket: "
                f"{rate:,.0f} reservations/s; one call p50 {p50:.2f} ms, p99 {p99:.2f} ms"
            )
        print(await asyncio.to_thread(bench_redis_benchmark, url, key))
    finally:
        await client.delete(key)
        await client.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--tasks", type=int, default=64, help="concurrent tasks for (a)")
    parser.add_argument("--gate-tasks", type=int, default=1000, help="concurrent waiters for (b)")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--processes", type=int, default=3, help="client processes for (c); 1 skips it")
    args = parser.parse_args()
    asyncio.run(main(args.url, args.tasks, args.gate_tasks, args.seconds, args.processes))
