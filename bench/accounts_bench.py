"""Two accounts served by two workers (issue 13): what a worker without one account's key costs.

Two simulators, one per account, each requiring its own key; a batch whose jobs alternate between
the accounts; two worker processes that either both hold both keys ("both") or of which one holds
only account a's ("one-lacks-b": b's chunks wait in b's own queue, which only the other worker
consumes; before queues per account, the worker lacking b's key took them, deferred them and
handed them on).
Prints wall time, requests per account's server (401s must be 0: no job went out with another
key), the refusing worker's CPU seconds and its deferrals.

    .venv/bin/python bench/accounts_bench.py --redis-url redis://127.0.0.1:6379/14 --jobs 2000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from common import BENCH_REDIS_URL, ROOT, cpu_seconds, flush, workers

from ratequeue.config.settings import load_settings
from ratequeue.producer.api import Client
from ratequeue.sim.process import start_sim

KEYS = {"a": "sk-bench-team-a-0123456789", "b": "sk-bench-team-b-0123456789"}


def _env(redis_url: str, models: Path, holds: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RATEQUEUE_", "OPENAI_"))}
    env.update(RATEQUEUE_REDIS_URL=redis_url, RATEQUEUE_MODELS_FILE=str(models), RATEQUEUE_LOG_LEVEL="WARNING",
               PYTHONPATH=str(ROOT), **{f"KEY_{k.upper()}": KEYS[k] for k in holds})
    return env


def _lines(n: int) -> list[dict[str, object]]:
    return [{"custom_id": f"j-{i}", "method": "POST", "url": "/v1/chat/completions", "account": "ab"[i % 2],
             "body": {"model": "gpt-4o-mini", "max_tokens": 20, "messages": [{"role": "user", "content": f"item {i}"}]}}
            for i in range(n)]


def run(scenario: str, redis_url: str, jobs: int, latency_ms: float, tmp: Path) -> None:
    flush(redis_url)
    sim_args = ["--rpm", "1000000", "--tpm", "1000000000", "--latency-ms", str(latency_ms)]
    with start_sim([*sim_args, "--api-key", KEYS["a"]]) as a, start_sim([*sim_args, "--api-key", KEYS["b"]]) as b:
        models = tmp / "models.toml"
        models.write_text(f'[accounts.a]\nbase_url = "{a.url}"\napi_key_env = "KEY_A"\n'
                          f'[accounts.b]\nbase_url = "{b.url}"\napi_key_env = "KEY_B"\n')
        with workers(1, _env(redis_url, models, "ab"), tmp / f"{scenario}-full") as full, \
                workers(1, _env(redis_url, models, "ab" if scenario == "both" else "a"), tmp / scenario) as other:
            client = Client(load_settings(_env(redis_url, models, "")))
            time.sleep(3)  # both workers ready: the first chunks go to either
            cpu0 = cpu_seconds(other[0].pid)
            started = time.monotonic()
            batch_id = client.submit_batch(_lines(jobs)).batch_id
            batch = client.wait(batch_id, timeout=600)
            wall = time.monotonic() - started
            cpu = cpu_seconds(other[0].pid) - cpu0
            full_pid = full[0].pid
        sa, sb = a.stats(timeline=False), b.stats(timeline=False)
    counts = batch["request_counts"]
    print(f"{scenario:12s} jobs={jobs} completed={counts['completed']} failed={counts['failed']} wall={wall:.1f}s "
          f"a:200={sa['by_status'].get('200', 0)} a:401={sa['by_status'].get('401', 0)} "
          f"b:200={sb['by_status'].get('200', 0)} b:401={sb['by_status'].get('401', 0)} "
          f"second-worker-cpu={cpu:.1f}s (first worker pid {full_pid})")
    print(f"  load: {os.getloadavg()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", default=BENCH_REDIS_URL)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--scenario", choices=("both", "one-lacks-b", "all"), default="all")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for scenario in ("both", "one-lacks-b") if args.scenario == "all" else (args.scenario,):
            run(scenario, args.redis_url, args.jobs, args.latency_ms, Path(tmp))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
