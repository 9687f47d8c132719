"""Several routes for one model (issue 13 part 4): do two routes of R/2 RPM finish a batch as fast as
one route of R RPM?

"one": one simulator at --rpm, one account, one route. "two": two simulators at --rpm / 2 each (each
requiring its own key), two accounts, `[routes] "gpt-4o-mini" = ["a", "b"]`. The same worker
processes (--workers) and jobs in both. A small warm-up batch first (the limits learned, the
workers up), then the timed batch: wall time from submit to its final status. Prints each route's
200s and 429s and the `status` routes view.

    .venv/bin/python bench/routes_bench.py --redis-url redis://127.0.0.1:6398/0 --jobs 3000 --rpm 6000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from common import BENCH_REDIS_URL, ROOT, flush, workers

from ratequeue.config.settings import load_settings
from ratequeue.producer.api import Client
from ratequeue.sim.process import start_sim

KEYS = {"a": "sk-bench-route-a-0123456789", "b": "sk-bench-route-b-0123456789"}


def _env(redis_url: str, models: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RATEQUEUE_", "OPENAI_"))}
    level = os.environ.get("RATEQUEUE_BENCH_LOG_LEVEL", "WARNING")  # DEBUG with --log-dir: a profile
    env.update(RATEQUEUE_REDIS_URL=redis_url, RATEQUEUE_MODELS_FILE=str(models), RATEQUEUE_LOG_LEVEL=level,
               PYTHONPATH=str(ROOT), KEY_A=KEYS["a"], KEY_B=KEYS["b"])
    return env


def _lines(tag: str, n: int) -> list[dict[str, object]]:
    return [{"custom_id": f"{tag}-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "gpt-4o-mini", "max_tokens": 20, "messages": [{"role": "user", "content": f"item {i}"}]}}
            for i in range(n)]


def _models(tmp: Path, urls: dict[str, str]) -> Path:
    path = tmp / f"models-{len(urls)}.toml"
    accounts = "".join(f'[accounts.{n}]\nbase_url = "{u}"\napi_key_env = "KEY_{n.upper()}"\n' for n, u in urls.items())
    path.write_text(f'default_account = "a"\n{accounts}[routes]\n"gpt-4o-mini" = [{", ".join(map(repr, urls))}]\n'
                    .replace("'", '"'))
    return path


def run(scenario: str, args: argparse.Namespace, tmp: Path) -> float:
    flush(args.redis_url)
    names = ["a"] if scenario == "one" else ["a", "b"]
    rpm = args.rpm // len(names)
    sim_args = ["--rpm", str(rpm), "--tpm", "100000000", "--burst-seconds", str(args.sim_burst),
                "--latency-ms", str(args.latency_ms)]
    with start_sim([*sim_args, "--api-key", KEYS["a"]]) as a, start_sim([*sim_args, "--api-key", KEYS["b"]]) as b:
        sims = {"a": a, "b": b}
        env = _env(args.redis_url, _models(tmp, {n: sims[n].url for n in names}))
        with workers(args.workers, env, tmp / scenario):
            client = Client(load_settings(env))
            # Two chunks (RATEQUEUE_CHUNK_SIZE 50): each route serves one and learns its limits.
            client.wait(client.submit_batch(_lines("warm", 100)).batch_id, timeout=120)
            started = time.monotonic()
            batch = client.wait(client.submit_batch(_lines(scenario, args.jobs)).batch_id, timeout=900, poll=0.05)
            wall = time.monotonic() - started
            routes = client.overview().get("routes", {}).get("gpt-4o-mini", {})
        full = {n: sims[n].stats(timeline=args.log_dir is not None) for n in names}
        stats = {n: s["by_status"] for n, s in full.items()}
        if args.log_dir:  # per-second calls per route, for profiles
            (Path(args.log_dir) / f"{scenario}-sim.json").write_text(json.dumps(full))
    counts = batch["request_counts"]
    per_route = " ".join(f"{n}:200={s.get('200', 0)} {n}:429={s.get('429', 0)}" for n, s in stats.items())
    print(f"{scenario:4s} routes={len(names)}x{rpm}RPM jobs={args.jobs} completed={counts['completed']} "
          f"failed={counts['failed']} wall={wall:.2f}s ideal={args.jobs / (args.rpm / 60):.2f}s {per_route}")
    if routes:
        print(f"     status routes: {routes}")
    print(f"     load: {os.getloadavg()}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", default=BENCH_REDIS_URL)
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--rpm", type=int, default=6000, help="the summed limit (each of two routes has half)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--sim-burst", type=float, default=1.0, help="the simulators' bucket, seconds of limit")
    parser.add_argument("--scenario", choices=("one", "two", "both"), default="both")
    parser.add_argument("--log-dir", help="keep the workers' logs here (profiles: RATEQUEUE_BENCH_LOG_LEVEL=DEBUG)")
    args = parser.parse_args()
    walls = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("RATEQUEUE_BENCH_TMP")) as tmp:
        for scenario in ("one", "two") if args.scenario == "both" else (args.scenario,):
            walls[scenario] = run(scenario, args, Path(args.log_dir or tmp))
    if len(walls) == 2:
        print(f"two routes / one route of their sum: {walls['two'] / walls['one']:.3f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
