"""The charge rule learned (issue 11): the simulator charges by one rule, the workers are configured
with the other; prints the utilisation of the binding limit, 429s, when the rule was learned and
every charge-rule line the workers logged (a wrong one is a verdict for the rule the server does
not apply).

    .venv/bin/python bench/charge_rule_bench.py                      # both ways, 2 workers each
    .venv/bin/python bench/charge_rule_bench.py --server max --jobs 1500 --pin   # the rule pinned

Scenarios: ``max/sum`` = the server charges max(prompt, n x max_tokens) while ratequeue keeps its
default (sum); ``sum/max`` = the server charges prompt + n x max_tokens, max configured.
``--configured same`` configures the server's own rule: any charge-rule line is then wrong.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from datetime import datetime
from pathlib import Path

from common import BENCH_REDIS_URL, HEADER, figures, flush, mixed_workload, peak_rss_mb, worker_env, workers

from ratequeue.config.settings import load_settings
from ratequeue.producer.api import Client
from ratequeue.sim.process import start_sim

_RULE_LINE = re.compile(r"^\[(\S+ \S+): WARNING/\S+\] (.*(?:charges by the|seems to charge by the) '(\w+)' rule.*)$")


def rule_lines(log_dir: Path) -> list[tuple[float, str, str]]:
    """(epoch seconds, rule named, the line) of every charge-rule warning in the workers' logs."""
    found = []
    for log in sorted(log_dir.glob("worker-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            m = _RULE_LINE.match(line)
            if m:
                at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                found.append((at, m.group(3), f"{log.stem}: {m.group(2)}"))
    return sorted(found)


def run(args: argparse.Namespace, server: str) -> None:
    other = "sum" if server == "max" else "max"
    configured = server if args.configured == "same" else other
    flush(BENCH_REDIS_URL)
    sim_args = ["--rpm", str(int(args.rpm)), "--tpm", str(int(args.tpm)), "--latency-ms", str(args.latency_ms),
                "--burst-seconds", str(args.sim_burst_seconds), "--charge-rule", server, "--seed", str(args.seed),
                *(["--no-retry-after"] if args.no_retry_after else [])]
    extra = {"RATEQUEUE_LEARN_CHARGE_RULE": "0"} if args.pin else {}
    print(f"\nsetup: server {server} / configured {configured}{' (pinned)' if args.pin else ''}; sim "
          f"{' '.join(sim_args)}; {args.workers} worker process(es); {args.jobs} mixed-size jobs; "
          f"redis {BENCH_REDIS_URL}")
    with start_sim(sim_args) as sim, tempfile.TemporaryDirectory() as tmp:
        env = worker_env(sim.url, BENCH_REDIS_URL, args.rpm, args.tpm, charge_rule=configured, **extra)
        logs = Path(tmp) / "logs"
        with workers(args.workers, env, logs) as procs:
            client = Client(load_settings(env))
            time.sleep(2.0)  # workers connected and warm before the clock starts
            sim.reset()
            started, epoch = time.monotonic(), time.time()
            report = client.submit_batch(mixed_workload(args.jobs, args.seed))
            batch = client.wait(report.batch_id, timeout=3600, poll=0.2)
            wall = time.monotonic() - started
            rss = max(peak_rss_mb(p.pid) for p in procs)
        stats = sim.stats()
        lines = rule_lines(logs)
    counts = batch["request_counts"]
    print(f"batch {batch['status']}: {counts}")
    wrong = [line for _, rule, line in lines if rule != server]
    for at, _, line in lines:
        print(f"  +{at - epoch:5.1f} s  {line}")
    learned = [at - epoch for at, rule, line in lines if rule == server and "switching" in line]
    print(f"rule lines: {len(lines)}, wrong: {len(wrong)}; learned after "
          f"{f'{learned[0]:.1f} s' if learned else '-'} (first 'switching' line, from submit)")
    print(HEADER)
    print(figures(f"{server}/{configured}", stats, args.rpm, args.tpm, args.jobs, wall, args.latency_ms / 1000,
                  rss).row())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", choices=("max", "sum", "both"), default="both", help="the simulator's charge rule")
    ap.add_argument("--rpm", type=float, default=3000)
    ap.add_argument("--tpm", type=float, default=400_000)
    ap.add_argument("--latency-ms", type=float, default=1000)
    ap.add_argument("--jobs", type=int, default=1500)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--sim-burst-seconds", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--no-retry-after", action="store_true", help="the simulator sends no Retry-After headers")
    ap.add_argument("--configured", choices=("other", "same"), default="other",
                    help="configure the rule the server does not apply (default), or the same one (no switch due)")
    ap.add_argument("--pin", action="store_true", help="RATEQUEUE_LEARN_CHARGE_RULE=0: keep the configured rule")
    args = ap.parse_args()
    for server in ("max", "sum") if args.server == "both" else (args.server,):
        run(args, server)


if __name__ == "__main__":
    main()
