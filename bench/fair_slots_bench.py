"""Fair slots: two models with very different limits share the workers' slots. One model
(``--slow-model``) has a long backlog queued first; the other (``--fast-model``) is queued behind
it. Each model's pace is read from the simulator's per-model counts, sampled every second, over
the time both have work; the figure is each model's share of its own binding limit then.

    .venv/bin/python bench/fair_slots_bench.py --workers 1
    .venv/bin/python bench/fair_slots_bench.py --workers 2 --kill-after 15   # one worker left after a kill
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import tempfile
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

from common import BENCH_REDIS_URL, flush, mixed_workload, worker_env, workers

from ratequeue.config.settings import load_settings
from ratequeue.producer.api import Client
from ratequeue.sim.process import SimHandle, start_sim


def _mangled(model: str) -> str:
    return model.upper().replace("-", "_").replace(".", "_")


def _sample(sim: SimHandle, models: list[str]) -> dict[str, tuple[int, int]]:
    by_model = sim.stats(timeline=False)["by_model"]
    return {m: (by_model.get(m, {}).get("requests_ok", 0), by_model.get(m, {}).get("tokens_charged_ok", 0))
            for m in models}


def _share(first: tuple[float, dict[str, tuple[int, int]]], last: tuple[float, dict[str, tuple[int, int]]],
           model: str, rpm: float, tpm: float) -> tuple[float, float]:
    """(requests per minute, share of the binding limit) of ``model`` between two samples."""
    seconds = last[0] - first[0]
    requests = last[1][model][0] - first[1][model][0]
    tokens = last[1][model][1] - first[1][model][1]
    minutes = max(seconds, 1e-9) / 60
    return requests / minutes, max(requests / minutes / rpm, tokens / minutes / tpm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slow-model", default="gpt-4o")
    ap.add_argument("--slow-rpm", type=float, default=120)
    ap.add_argument("--slow-tpm", type=float, default=1_000_000)
    ap.add_argument("--slow-jobs", type=int, default=1200)
    ap.add_argument("--fast-model", default="gpt-4o-mini")
    ap.add_argument("--fast-rpm", type=float, default=600)
    ap.add_argument("--fast-tpm", type=float, default=1_000_000)
    ap.add_argument("--fast-jobs", type=int, default=600)
    ap.add_argument("--latency-ms", type=float, default=1000)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--kill-after", type=float, default=None,
                    help="SIGKILL the first worker this many seconds after submitting (the after-a-kill case)")
    ap.add_argument("--charge-rule", choices=("sum", "max"), default="sum")
    ap.add_argument("--sim-burst-seconds", type=float, default=10.0)
    ap.add_argument("--trim", type=float, default=5.0, help="seconds left out after the fast model's first answer")
    ap.add_argument("--worker-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment of the workers (default slots 8, chunk size 25: a scaled-down fleet)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--log-dir", type=Path, default=None, help="keep the workers' logs here")
    args = ap.parse_args()

    flush(BENCH_REDIS_URL)
    models = [args.slow_model, args.fast_model]
    limits = {args.slow_model: (args.slow_rpm, args.slow_tpm), args.fast_model: (args.fast_rpm, args.fast_tpm)}
    sim_args = [
        "--rpm", "100000", "--tpm", "100000000", "--latency-ms", str(args.latency_ms),
        "--burst-seconds", str(args.sim_burst_seconds), "--charge-rule", args.charge_rule, "--seed", str(args.seed),
        *(arg for m, (rpm, tpm) in limits.items() for arg in ("--model", f"{m}:rpm={int(rpm)}:tpm={int(tpm)}")),
    ]
    extra = {"RATEQUEUE_WORKER_SLOTS": "8", "RATEQUEUE_CHUNK_SIZE": "25",
             **dict(item.split("=", 1) for item in args.worker_env)}
    print(f"setup: sim {' '.join(sim_args)}; {args.workers} worker process(es)"
          f"{f', the first killed at {args.kill_after:g} s' if args.kill_after is not None else ''}; "
          f"{args.slow_jobs} {args.slow_model} jobs queued, then {args.fast_jobs} {args.fast_model} jobs; "
          f"worker env {extra}; load {os.getloadavg()[0]:.2f}")
    with start_sim(sim_args) as sim, tempfile.TemporaryDirectory() as tmp:
        log_dir = args.log_dir or Path(tmp) / "logs"
        slow_rpm, slow_tpm = limits[args.slow_model]
        env = worker_env(sim.url, BENCH_REDIS_URL, slow_rpm, slow_tpm, model=args.slow_model,
                         charge_rule=args.charge_rule, **extra)
        fast = _mangled(args.fast_model)
        env.update({f"RATEQUEUE_MODEL_{fast}_RPM": str(int(args.fast_rpm)),
                    f"RATEQUEUE_MODEL_{fast}_TPM": str(int(args.fast_tpm)),
                    f"RATEQUEUE_MODEL_{fast}_CHARGE_RULE": args.charge_rule})
        with workers(args.workers, env, log_dir) as procs:
            client = Client(load_settings(env))
            time.sleep(2.0)
            sim.reset()
            started = time.monotonic()
            slow_batch = client.submit_batch(mixed_workload(args.slow_jobs, args.seed, model=args.slow_model))
            fast_batch = client.submit_batch(mixed_workload(args.fast_jobs, args.seed + 1, model=args.fast_model))
            samples = _run(sim, models, procs, args, started, fast_total=args.fast_jobs)
            for batch_id in (slow_batch.batch_id, fast_batch.batch_id):
                client.cancel(batch_id)
    _report(samples, args, limits, started)


def _run(sim: SimHandle, models: list[str], procs: list[subprocess.Popen[bytes]], args: Any, started: float,
         fast_total: int) -> list[tuple[float, dict[str, tuple[int, int]]]]:
    """Sample the per-model counts every second until the fast model's jobs are all answered."""
    samples = []
    killed = False
    deadline = started + 600
    while time.monotonic() < deadline:
        now = time.monotonic()
        sample = _sample(sim, models)
        samples.append((now - started, sample))
        if sample[args.fast_model][0] >= fast_total:
            break
        if args.kill_after is not None and not killed and now - started >= args.kill_after:
            procs[0].send_signal(signal.SIGKILL)
            killed = True
        time.sleep(1.0)
    return samples


def _last_progress(samples: list[tuple[float, dict[str, tuple[int, int]]]], model: str, begin: int) -> int:
    """The sample that ends the window: the one before the last, or the last before ``model``
    made no progress for 3 s (the jobs a killed worker held wait for their leases, at most 60 s
    after the kill: they are not runnable work, see worker.reaper)."""
    counts = [s[model][0] for _, s in samples]
    for i in range(begin, len(counts) - 4):
        if counts[i] == counts[i + 3]:
            return i
    return max(begin, len(samples) - 2)


def _report(samples: list[tuple[float, dict[str, tuple[int, int]]]], args: Any,
            limits: dict[str, tuple[float, float]], started: float) -> None:
    fast, slow = args.fast_model, args.slow_model
    first_fast = next((i for i, (_, s) in enumerate(samples) if s[fast][0] > 0), None)
    if first_fast is None:
        print(f"{fast} never answered")
        return
    start_at = samples[first_fast][0] + args.trim
    begin = next((i for i, (t, _) in enumerate(samples) if t >= start_at), first_fast)
    end = _last_progress(samples, fast, begin)
    window = (samples[begin], samples[end])
    if args.kill_after is not None:  # the part after the kill (plus the reaper's few seconds)
        after = next((i for i, (t, _) in enumerate(samples) if t >= args.kill_after + 10), begin)
        window = (samples[max(after, begin)], window[1])
    print(f"window: {window[0][0]:.0f} s to {window[1][0]:.0f} s after submitting (both models had runnable "
          f"work; {fast}: {window[1][1][fast][0]} answered by then, all {samples[-1][1][fast][0]} at "
          f"{samples[-1][0]:.0f} s)")
    for model in (fast, slow):
        print(f"{model} per second:", " ".join(str(b[1][model][0] - a[1][model][0]) for a, b in pairwise(samples)))
    total = samples[-1][1][fast][0]
    at = {share: next(t for t, s in samples if s[fast][0] >= share * total) for share in (0.5, 0.9, 1.0)}
    print(f"{fast}: first answer at {samples[first_fast][0]:.0f} s, half at {at[0.5]:.0f} s, 90% at {at[0.9]:.0f} s, "
          f"all at {at[1.0]:.0f} s (at its limit: {total / limits[fast][0] * 60:.0f} s from the first answer)")
    print("| model | limit | RPM while both had work | share of its own limit |\n|---|---|---|---|")
    for model in (slow, fast):
        rpm, tpm = limits[model]
        pace, share = _share(window[0], window[1], model, rpm, tpm)
        print(f"| {model} | {int(rpm)} RPM / {int(tpm):,} TPM | {pace:.0f} | {share:.1%} |")


if __name__ == "__main__":
    main()
