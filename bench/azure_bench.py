"""An Azure OpenAI deployment (issue 13): a mixed batch through the simulator in Azure mode, whose limits
are enforced over 10 s or 1 s windows and reported per window in its headers.

Scenarios: ``window10`` and ``window1`` (the deployment's window, configured as window_seconds in the
models file too), ``window1-odd`` (10% of answers carry Azure's -1 / 0 remaining headers) and
``window10-unset`` (Azure enforces 10 s while the models file leaves window_seconds at its default 1 s:
the worker reads the headers' window off the configured RPM, its bucket holds 1 s). Prints the standard
row (bench/common.py), failed jobs and load.

    .venv/bin/python bench/azure_bench.py --redis-url redis://127.0.0.1:6397/14 --jobs 1500
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from common import BENCH_REDIS_URL, HEADER, ROOT, figures, flush, mixed_workload, peak_rss_mb, workers

from ratequeue.config.settings import load_settings
from ratequeue.producer.api import Client
from ratequeue.sim.process import start_sim

KEY = "azure-bench-key-0123456789abcdef"
# scenario -> (the simulator's window, window_seconds in the models file or None, share of odd headers)
SCENARIOS = {
    "window10": (10, 10, 0.0),
    "window1": (1, 1, 0.0),
    "window1-odd": (1, 1, 0.1),
    "window10-unset": (10, None, 0.0),
}


def _env(redis_url: str, models: Path, key: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RATEQUEUE_", "OPENAI_"))}
    env.update(RATEQUEUE_REDIS_URL=redis_url, RATEQUEUE_MODELS_FILE=str(models), RATEQUEUE_LOG_LEVEL="WARNING",
               PYTHONPATH=str(ROOT), **({"AZ_KEY": KEY} if key else {}))
    return env


def run(scenario: str, redis_url: str, jobs: int, tpm: int, latency_ms: float, count: int, tmp: Path) -> None:
    window, configured, odd = SCENARIOS[scenario]
    flush(redis_url)
    rpm = tpm * 6 // 1000
    sim_args = ["--dialect", "azure", "--api-key", KEY, "--azure-window", str(window), "--latency-ms",
                str(latency_ms), "--azure-odd-headers", str(odd),
                "--deployment", f"chat-eu:model=gpt-4o-mini:tpm={tpm}"]
    with start_sim(sim_args) as sim:
        models = tmp / f"{scenario}.toml"
        models.write_text(f'[accounts.az]\ndialect = "azure"\nbase_url = "{sim.url}"\napi_version = "2024-10-21"\n'
                          f'api_key_env = "AZ_KEY"\n[accounts.az.deployments.gpt-4o-mini]\ndeployment = "chat-eu"\n'
                          f'tpm = {tpm}\n' + (f"window_seconds = {configured}\n" if configured else ""))
        with workers(count, _env(redis_url, models, True), tmp / scenario) as procs:
            client = Client(load_settings(_env(redis_url, models, False)))
            time.sleep(3)  # the workers are up: the run measures the limiter, not their start
            sim.reset()
            started = time.monotonic()
            batch_id = client.submit_batch(list(mixed_workload(jobs))).batch_id
            batch = client.wait(batch_id, timeout=1800)
            wall = time.monotonic() - started
            rss = max(peak_rss_mb(p.pid) for p in procs)
        stats = sim.stats()
    row = figures(scenario, stats, rpm, tpm, jobs, wall, latency_ms / 1000, rss, burst_seconds=window)
    counts = batch["request_counts"]
    print(row.row())
    print(f"  {scenario}: completed={counts['completed']} failed={counts['failed']} 429s={stats['r429']} "
          f"statuses={stats['by_status']} load={os.getloadavg()}")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", default=BENCH_REDIS_URL)
    parser.add_argument("--jobs", type=int, default=1500)
    parser.add_argument("--tpm", type=int, default=600_000, help="the deployment's TPM (RPM: 6 per 1,000)")
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--scenario", choices=(*SCENARIOS, "all"), default="all")
    args = parser.parse_args()
    print(HEADER)
    with tempfile.TemporaryDirectory() as tmp:
        for scenario in SCENARIOS if args.scenario == "all" else (args.scenario,):
            run(scenario, args.redis_url, args.jobs, args.tpm, args.latency_ms, args.workers, Path(tmp))


if __name__ == "__main__":
    main()
