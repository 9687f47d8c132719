"""Throughput of the simulator: one sim process, chat requests fired by an aiohttp client.

    .venv/bin/python bench/sim_throughput.py --requests 20000 --concurrency 128

The client runs in its own process(es) (``--client-procs``) so the number is the server's, not the
client's; on a 2-core machine one client process already leaves the server one core.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ratequeue.sim.process import start_sim

BODY = (
    b'{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are terse."},'
    b'{"role":"user","content":"Summarise the rate limit rules of the API in one line, please."}],'
    b'"max_tokens":64}'
)


async def _fire(url: str, requests: int, concurrency: int) -> Counter[int]:
    statuses: Counter[int] = Counter()
    remaining = requests
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                async with session.post(
                    url + "/v1/chat/completions", data=BODY, headers={"Content-Type": "application/json"}
                ) as response:
                    await response.read()
                    statuses[response.status] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


def _client(url: str, requests: int, concurrency: int) -> tuple[Counter[int], float, float]:
    """Fire ``requests``; returns the statuses and the wall-clock start and end (process start excluded)."""
    start = time.time()
    statuses = asyncio.run(_fire(url, requests, concurrency))
    return statuses, start, time.time()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=128, help="connections in all")
    parser.add_argument("--client-procs", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1_000)
    args = parser.parse_args()

    limits = ["--rpm", "100000000", "--tpm", "100000000000", "--latency-ms", "0"]
    with start_sim(limits) as sim:
        _client(sim.url, args.warmup, min(args.concurrency, 32))
        sim.reset()
        per_proc = args.requests // args.client_procs
        conc = max(1, args.concurrency // args.client_procs)
        cpu_before = _cpu_seconds(sim.process.pid)
        with multiprocessing.get_context("spawn").Pool(args.client_procs) as pool:
            results = pool.starmap(_client, [(sim.url, per_proc, conc)] * args.client_procs)
        cpu = _cpu_seconds(sim.process.pid) - cpu_before
        elapsed = max(end for _, _, end in results) - min(start for _, start, _ in results)
        total: Counter[int] = sum((statuses for statuses, _, _ in results), Counter())
        stats = sim.stats(timeline=False)
    sent = sum(total.values())
    print(
        f"setup: 1 sim process (latency 0, limits ~unlimited), {args.client_procs} aiohttp client "
        f"process(es), {args.concurrency} connections, {sent} chat requests, {os.cpu_count()} cores"
    )
    print(f"statuses: {dict(total)}; sim counted {stats['requests_total']} requests")
    print(f"elapsed {elapsed:.2f}s -> {sent / elapsed:,.0f} req/s; "
          f"sim CPU {cpu:.2f}s = {cpu / sent * 1e6:.0f} µs per request")


if __name__ == "__main__":
    main()
