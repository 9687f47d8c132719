"""Submit throughput with ``tokenize = "server"`` (issue 13, part 2): a JSONL file of chat jobs for an
openai-compatible account, submitted with ``Client.submit_batch`` (read, count, store in Redis, enqueue;
no worker runs) while the simulator's self-hosted dialect answers ``POST /tokenize``. Prints, per mode,
the seconds and jobs/s of the submit and the /tokenize calls the simulator answered.

    .venv/bin/python bench/tokenize_bench.py --jobs 10000 --repeat 3

Modes: ``local`` (the account's encoding, cl100k_base), ``server`` (each distinct request asked once,
CONCURRENCY in flight), ``server-404`` (a server without /tokenize: one probe, then local counts).
``--distinct`` is the share of jobs whose request is unique (the rest repeat earlier ones, as batches
that send one prompt to many documents' worth of jobs do): 1.0 by default, every job asked.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import orjson
from common import BENCH_REDIS_URL, flush, mixed_workload

from ratequeue.config.settings import load_settings
from ratequeue.producer.api import Client
from ratequeue.sim.process import SimHandle, start_sim

MODEL = "llama3.1:8b"


def write_jobs(path: Path, n: int, distinct: float, seed: int = 7) -> None:
    """`n` mixed-size chat jobs; a share 1 - `distinct` of them repeat an earlier job's request."""
    rng = random.Random(seed)
    bodies: list[dict[str, object]] = []
    with path.open("wb") as out:
        for i, job in enumerate(mixed_workload(n, model=MODEL)):
            body = job["body"]
            if bodies and rng.random() >= distinct:
                body = rng.choice(bodies)
            else:
                body["messages"][0]["content"] += f"\n(document {i})"  # unique: counted on its own
                bodies.append(body)
            out.write(orjson.dumps({**job, "body": body}) + b"\n")


def submit_once(mode: str, path: Path, sim: SimHandle, redis_url: str, tmp: Path) -> tuple[float, int, int]:
    """(seconds, jobs stored, /tokenize calls answered) of one submit."""
    flush(redis_url)
    sim.configure(tokenize=mode != "server-404")
    sim.reset()
    models = tmp / f"models-{mode}.toml"
    tokenize = "local" if mode == "local" else "server"
    models.write_text(f'[accounts.gpu]\ndialect = "openai-compatible"\nbase_url = "{sim.url}/v1"\n'
                      f'tokenize = "{tokenize}"\n')
    client = Client(load_settings({"RATEQUEUE_REDIS_URL": redis_url, "RATEQUEUE_MODELS_FILE": str(models)}))
    started = time.perf_counter()
    report = client.submit_batch(path)
    seconds = time.perf_counter() - started
    client.close()
    return seconds, report.jobs, int(sim.stats(timeline=False)["tokenized"])


@contextlib.contextmanager
def simulator(url: str | None) -> Iterator[SimHandle]:
    """A simulator started here, or the one already running at `url` (to compare two checkouts' submits
    against the same server)."""
    if url is None:
        with start_sim(["--dialect", "openai-compatible"]) as sim:
            yield sim
    else:
        yield SimHandle(None, url.rstrip("/"), deque())  # type: ignore[arg-type]  # only its HTTP calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--distinct", type=float, default=1.0, help="share of jobs with a request of their own")
    ap.add_argument("--modes", default="local,server,server-404")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--redis-url", default=BENCH_REDIS_URL, help="a database this run may flush")
    ap.add_argument("--sim-url", help="a running simulator (--dialect openai-compatible) instead of one started here")
    ap.add_argument("--tokenize-latency-ms", type=float, default=0.0, help="the time /tokenize takes to answer")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmpdir, simulator(args.sim_url) as sim:
        sim.configure(tokenize_latency_ms=args.tokenize_latency_ms)
        tmp = Path(tmpdir)
        path = tmp / "jobs.jsonl"
        write_jobs(path, args.jobs, args.distinct)
        print(f"setup: {args.jobs} chat jobs ({path.stat().st_size / 1e6:.1f} MB, distinct share {args.distinct}), "
              f"sim openai-compatible on this machine (/tokenize answers after {args.tokenize_latency_ms:g} ms), "
              f"Redis {args.redis_url}")
        for mode in args.modes.split(","):
            for run in range(1, args.repeat + 1):
                load = os.getloadavg()[0]
                seconds, jobs, asked = submit_once(mode, path, sim, args.redis_url, tmp)
                print(f"{mode:>10} run {run}: {seconds:6.2f} s  {jobs / seconds:7.0f} jobs/s  "
                      f"/tokenize calls {asked:6d}  load {load:.2f}", flush=True)
        flush(args.redis_url)


if __name__ == "__main__":
    main()
