"""The charge rule learned (issue 11): the simulator charges by one rule, the workers are configured
with the other; prints the utilisation of the binding limit, 429s, when the rule was learned and
every charge-rule line the workers logged (a wrong one is a verdict for the rule the server does
not apply).

    .venv/bin/python bench/charge_rule_bench.py                      # both ways, 2 workers each
    .venv/bin/python bench/charge_rule_bench.py --server max --jobs 1500 --pin   # the rule pinned
    .venv/bin/python bench/charge_rule_bench.py --server sum --configured same --n 1,2,3 --no-charge-n
    .venv/bin/python bench/charge_rule_bench.py --server sum --configured same --without-max 3 \
        --missing-max-charge 2000 --tpm 1000000 --jobs 1000

Scenarios: ``max/sum`` = the server charges max(prompt, n x max_tokens) while ratequeue keeps its
default (sum); ``sum/max`` = the server charges prompt + n x max_tokens, max configured.
``--configured same`` configures the server's own rule: any charge-rule line is then wrong, unless
the server differs in another dimension: ``--no-charge-n`` (it charges one output allowance whatever
n; jobs get n from ``--n``), ``--missing-max-charge`` (what it charges per choice of a request
without max_tokens; ``--without-max K`` leaves it out of every K-th job; ratequeue's guess is the
model's max output, 16,384).
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from common import BENCH_REDIS_URL, HEADER, figures, flush, mixed_workload, peak_rss_mb, worker_env, workers

from ratequeue.config.settings import load_settings
from ratequeue.producer.api import Client
from ratequeue.sim.process import start_sim

_RULE_LINE = re.compile(r"^\[(\S+ \S+): WARNING/\S+\] (.*(?:the server charges|seems to charge) (.*?), not .*)$")


def rule_lines(log_dir: Path) -> list[tuple[float, str, str]]:
    """(epoch seconds, what it says the server charges, the line) of every charge-rule warning."""
    found = []
    for log in sorted(log_dir.glob("worker-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            m = _RULE_LINE.match(line)
            if m:
                at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                found.append((at, m.group(3), f"{log.stem}: {m.group(2)}"))
    return sorted(found)


def wrong(said: str, server: str, args: argparse.Namespace) -> bool:
    """Does a line say something the server does not do?"""
    if said.startswith("by the"):
        return f"'{server}'" not in said
    if "whatever n" in said or "n x the output" in said:
        return ("whatever n" in said) == args.charge_n
    allowance = re.match(r"(\d+) tokens per choice", said)
    if allowance and args.missing_max_charge:  # above the server's: a bound from above, refined later
        return int(allowance.group(1)) < args.missing_max_charge * 0.98
    return True


def workload(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The mixed jobs, with n cycling through ``--n`` and every ``--without-max``-th job naming no max."""
    jobs = list(mixed_workload(args.jobs, args.seed))
    for i, job in enumerate(jobs):
        job["body"]["n"] = args.n[i % len(args.n)]
        if args.without_max and i % args.without_max == 0:
            del job["body"]["max_tokens"]
    return jobs


def run(args: argparse.Namespace, server: str) -> None:
    other = "sum" if server == "max" else "max"
    configured = server if args.configured == "same" else other
    flush(BENCH_REDIS_URL)
    sim_args = ["--rpm", str(int(args.rpm)), "--tpm", str(int(args.tpm)), "--latency-ms", str(args.latency_ms),
                "--burst-seconds", str(args.sim_burst_seconds), "--charge-rule", server, "--seed", str(args.seed),
                *(["--no-retry-after"] if args.no_retry_after else []), *([] if args.charge_n else ["--no-charge-n"]),
                *(["--missing-max-charge", str(args.missing_max_charge)] if args.missing_max_charge else [])]
    extra = {"RATEQUEUE_LEARN_CHARGE_RULE": "0"} if args.pin else {}
    if args.log_dir:  # every send's charge logged (INFO) for a profile
        extra["RATEQUEUE_LOG_LEVEL"] = "INFO"
    print(f"\nsetup: server {server} / configured {configured}{' (pinned)' if args.pin else ''}; sim "
          f"{' '.join(sim_args)}; {args.workers} worker process(es); {args.jobs} mixed-size jobs, n {args.n}, "
          f"{f'every {args.without_max}th without max_tokens' if args.without_max else 'all with max_tokens'}; "
          f"redis {BENCH_REDIS_URL}")
    with start_sim(sim_args) as sim, tempfile.TemporaryDirectory() as tmp:
        env = worker_env(sim.url, BENCH_REDIS_URL, args.rpm, args.tpm, charge_rule=configured, **extra)
        logs = args.log_dir / server if args.log_dir else Path(tmp) / "logs"
        with workers(args.workers, env, logs) as procs:
            client = Client(load_settings(env))
            time.sleep(2.0)  # workers connected and warm before the clock starts
            sim.reset()
            started, epoch = time.monotonic(), time.time()
            report = client.submit_batch(workload(args))
            batch = client.wait(report.batch_id, timeout=3600, poll=0.2)
            wall = time.monotonic() - started
            rss = max(peak_rss_mb(p.pid) for p in procs)
        stats = sim.stats()
        lines = rule_lines(logs)
    counts = batch["request_counts"]
    print(f"batch {batch['status']}: {counts}")
    bad = [line for _, said, line in lines if wrong(said, server, args)]
    for at, _, line in lines:
        print(f"  +{at - epoch:5.1f} s  {line}")
    learned = [at - epoch for at, said, line in lines if not wrong(said, server, args) and "switching" in line]
    print(f"rule lines: {len(lines)}, wrong: {len(bad)}; learned after "
          f"{f'{learned[0]:.1f} s' if learned else '-'} (first right 'switching' line, from submit)")
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
    ap.add_argument("--n", type=lambda v: [int(x) for x in v.split(",")], default=[1],
                    help="the jobs' n, cycled through (e.g. 1,2,3)")
    ap.add_argument("--no-charge-n", dest="charge_n", action="store_false",
                    help="the simulator charges one output allowance whatever n")
    ap.add_argument("--without-max", type=int, default=0, metavar="K", help="every K-th job names no max_tokens")
    ap.add_argument("--missing-max-charge", type=int, default=None,
                    help="what the simulator charges per choice without max_tokens (default: its max output, 4096)")
    ap.add_argument("--log-dir", type=Path, default=None, help="keep the workers' logs (INFO) under DIR/<server>")
    args = ap.parse_args()
    for server in ("max", "sum") if args.server == "both" else (args.server,):
        run(args, server)


if __name__ == "__main__":
    main()
