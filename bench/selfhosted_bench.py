"""A self-hosted server (issue 13, part 2): the simulator's openai-compatible dialect serving a fixed
number of requests at once, a bounded queue behind them and 503s (or 429s) beyond, with no rate-limit
headers. N worker processes find its capacity with their adaptive concurrency windows
(worker/concurrency.py). Prints requests/s against the server's capacity, the refusal share, what
the server saw in service and queued at most, and wall time.

    .venv/bin/python bench/selfhosted_bench.py --concurrency 8 --queue-depth 4 --latency-ms 200 --jobs 600

Capacity = concurrency / time in service at full load; with --per-token-ms the time in service is
latency + per-token x completion tokens x (1 + slowdown) (sim/selfhosted.py), taken from the tokens
the simulator generated. requests/s (steady) is the median of the whole seconds between the first
answer and the last; (run) is every answer over that span; "opened" is the second at which the
rate first reached 90% of capacity (the window's slow start, counted from the first answer).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from common import BENCH_REDIS_URL, flush, worker_env, workers

from ratequeue.config.settings import load_settings
from ratequeue.producer.api import Client
from ratequeue.sim.process import start_sim

MODEL = "gpt-4o-mini"  # a table model with limits far above the server's: only concurrency binds


def _jobs(n: int, max_tokens: int) -> list[dict[str, object]]:
    return [{"custom_id": f"s-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": MODEL, "messages": [{"role": "user", "content": f"summarise document {i}"}],
                      "max_tokens": max_tokens}} for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=8, help="requests the server serves at once")
    ap.add_argument("--queue-depth", type=int, default=4, help="requests waiting beyond; more are refused")
    ap.add_argument("--overload-status", choices=("503", "429"), default="503")
    ap.add_argument("--latency-ms", type=float, default=200.0)
    ap.add_argument("--per-token-ms", type=float, default=0.0)
    ap.add_argument("--load-slowdown", type=float, default=1.0)
    ap.add_argument("--max-tokens", type=int, default=20)
    ap.add_argument("--jobs", type=int, default=600)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--redis-url", default=BENCH_REDIS_URL, help="a database this run may flush")
    ap.add_argument("--worker-env", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--timeline", action="store_true", help="print the requests answered in each second")
    args = ap.parse_args()

    flush(args.redis_url)
    sim_args = ["--dialect", "openai-compatible", "--max-concurrency", str(args.concurrency),
                "--queue-depth", str(args.queue_depth), "--overload-status", args.overload_status,
                "--latency-ms", str(args.latency_ms), "--per-token-ms", str(args.per_token_ms),
                "--load-slowdown", str(args.load_slowdown)]
    print(f"setup: sim {' '.join(sim_args)}; {args.workers} worker process(es); {args.jobs} jobs of "
          f"max_tokens {args.max_tokens}; redis {args.redis_url}; worker env {args.worker_env}")
    with start_sim(sim_args) as sim, tempfile.TemporaryDirectory() as tmp:
        extra = dict(item.split("=", 1) for item in args.worker_env)
        env = worker_env(sim.url, args.redis_url, 1_000_000, 1_000_000_000, model=MODEL, **extra)
        with workers(args.workers, env, Path(tmp) / "logs"):
            client = Client(load_settings(env))
            time.sleep(2.0)  # workers connected and warm before the clock starts
            sim.reset()
            started = time.monotonic()
            report = client.submit_batch(_jobs(args.jobs, args.max_tokens))
            batch = client.wait(report.batch_id, timeout=3600, poll=0.2)
            wall = time.monotonic() - started
        stats = sim.stats()
    load = os.getloadavg()
    server, counts = stats["server"], batch["request_counts"]
    served = [row["requests_ok"] for row in stats["timeline"]]
    first = next(i for i, n in enumerate(served) if n)
    last = max(i for i, n in enumerate(served) if n)
    steady = sorted(served[first + 1:last] or served)
    rate = steady[len(steady) // 2]
    whole = sum(served) / (last - first + 1)
    tokens = stats["usage"]["completion_tokens"] / max(server["served"], 1)
    in_service = args.latency_ms / 1000 + args.per_token_ms / 1000 * tokens * (1 + args.load_slowdown)
    capacity = args.concurrency / in_service
    requests = server["served"] + server["overloaded"]
    print(f"batch {batch['status']}: {counts}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.timeline:
        print("requests answered per second:", " ".join(map(str, served)))
    opened = next((i - first for i, n in enumerate(served) if n >= 0.9 * capacity), None)
    print("| server (at once / queue) | workers | jobs | capacity | requests/s steady (run) | of capacity | "
          "opened | refused (share) | max in service / queued | wall | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.concurrency} / {args.queue_depth} | {args.workers} | {args.jobs} | {capacity:.1f}/s | "
          f"{rate:.1f} ({whole:.1f})/s | {rate / capacity:.1%} ({whole / capacity:.1%}) | "
          f"{'never' if opened is None else f'{opened} s'} | "
          f"{server['overloaded']} ({server['overloaded'] / max(requests, 1):.2%}) | "
          f"{server['max_concurrent']} / {server['max_queued']} | {wall:.1f} s | {load[0]:.2f} |")


if __name__ == "__main__":
    main()
