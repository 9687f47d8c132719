"""Shared account (issue 11): ratequeue deployments that know nothing of each other (each its own
redis-server) and a foreign client spend one key's limits on the simulator at once. Prints the 429s
of each, the jobs failed, and how much of the limit all of them together used while ratequeue had work.

    .venv/bin/python bench/shared_account_bench.py --deployments 2 --foreign-share 0.5 --charge-rule max

The foreign client is a plain async httpx loop (another service of the organisation): it sends at a
fixed pace whatever the answers, from --foreign-from seconds for --foreign-for seconds. The request
limit binds (the TPM is set high): the foreign client's requests are small.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import redis
from common import mixed_workload, worker_env, workers

from ratequeue.config.settings import load_settings
from ratequeue.jobstore import keys
from ratequeue.producer.api import Client
from ratequeue.sim.process import start_sim


@contextmanager
def private_redis(data_dir: Path) -> Iterator[str]:
    """A redis-server of its own on a free port: one deployment shares nothing with another."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(data_dir)], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        for _ in range(100):
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class ForeignClient:
    """Another client of the account: ``per_second`` requests a second, each in its own task."""

    def __init__(self, url: str, per_second: float, start_after: float, duration: float) -> None:
        self.url, self.per_second, self.start_after, self.duration = url, per_second, start_after, duration
        self.answers: Counter[int] = Counter()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _one(self, http: httpx.AsyncClient) -> None:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "other service"}], "max_tokens": 8}
        try:
            self.answers[(await http.post("/v1/chat/completions", json=body)).status_code] += 1
        except httpx.HTTPError:
            self.answers[0] += 1

    async def _run(self) -> None:
        if self.per_second <= 0:
            return
        await asyncio.sleep(self.start_after)
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
        async with httpx.AsyncClient(base_url=self.url, timeout=60, limits=limits,
                                     headers={"Authorization": "Bearer sk-other-service"}) as http:
            tasks, start = [], time.monotonic()
            n = 0
            while (elapsed := time.monotonic() - start) < self.duration:
                due = n / self.per_second
                if due > elapsed:
                    await asyncio.sleep(due - elapsed)
                tasks.append(asyncio.ensure_future(self._one(http)))
                n += 1
            await asyncio.gather(*tasks)

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self._thread.join()


class Profile:
    """Samples, every ``every`` seconds, the simulator's per-client counts and each deployment's
    shared bucket hash (reconcile.lua: fs share, fl seconds of limit the server reported left),
    so that each deployment's 429s per second can be read against what the server showed."""

    def __init__(self, sim_url: str, redis_urls: list[str], every: float = 0.5) -> None:
        self.sim_url, self.every = sim_url, every
        self.redis = [redis.Redis.from_url(u, decode_responses=True) for u in redis_urls]
        self.rows: list[tuple[float, dict[str, int], dict[str, int], list[dict[str, str]], list[int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _bucket(self, r: redis.Redis) -> dict[str, str]:
        for key in r.scan_iter(match="*bucket:*", count=100):
            if not key.endswith(("}:window", "}:slowstart")):
                return r.hgetall(key)  # type: ignore[return-value]
        return {}

    def _loop(self) -> None:
        started = time.monotonic()
        with httpx.Client(base_url=self.sim_url, timeout=10) as http:
            while not self._stop.wait(self.every):
                snap = http.get("/sim/stats", params={"timeline": "0"}).json()
                self.rows.append((time.monotonic() - started, snap["calls_by_client_id"],
                                  snap["answers_by_client_id"], [self._bucket(r) for r in self.redis],
                                  [int(r.zcard(keys.deferred_jobs())) for r in self.redis]))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def print(self, batches: list[str]) -> None:
        """Per interval and deployment: calls, 429s, the share in force, the server's reported room."""
        print("t(s) | per deployment: calls 429s share server-left(s) (-1: none read yet) jobs-deferred"
              " claim token-level(k)")
        last: list[tuple[int, int]] = [(0, 0)] * len(batches)
        for t, calls, answers, buckets, deferred in self.rows:
            cells = []
            for n, prefix in enumerate(batches):
                c = sum(v for k, v in calls.items() if k.startswith(prefix))
                a = sum(v for k, v in answers.items() if k.startswith(prefix))
                dc, d429 = c - last[n][0], (c - a) - last[n][1]
                last[n] = (c, c - a)
                b = buckets[n]
                share, left = float(b.get("fs", 1)), float(b.get("fl", -1))
                claim, level = float(b.get("fc", 1)), float(b.get("tl", -1000)) / 1000
                cells.append(f"{dc:3d} {d429:3d} {share:.2f} {left:5.1f} {deferred[n]:4d} {claim:.2f} {level:6.1f}")
            print(f"{t:5.1f} | " + " | ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rpm", type=float, default=1200)
    ap.add_argument("--tpm", type=float, default=5_000_000)
    ap.add_argument("--latency-ms", type=float, default=1000)
    ap.add_argument("--jobs", type=int, default=600, help="jobs of each deployment")
    ap.add_argument("--deployments", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1, help="worker processes of each deployment")
    ap.add_argument("--sim-burst-seconds", type=float, default=10.0)
    ap.add_argument("--charge-rule", choices=("sum", "max"), default="sum")
    ap.add_argument("--no-retry-after", action="store_true")
    ap.add_argument("--foreign-share", type=float, default=0.5, help="the foreign client's pace, share of the RPM")
    ap.add_argument("--foreign-from", type=float, default=20.0)
    ap.add_argument("--foreign-for", type=float, default=40.0)
    ap.add_argument("--worker-env", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--timeline", action="store_true")
    ap.add_argument("--log-dir", type=Path, help="keep each deployment's worker logs under this directory")
    ap.add_argument("--profile", action="store_true",
                    help="print each deployment's calls, 429s, share and the server's reported room every 0.5 s")
    args = ap.parse_args()

    sim_args = ["--rpm", str(int(args.rpm)), "--tpm", str(int(args.tpm)), "--latency-ms", str(args.latency_ms),
                "--burst-seconds", str(args.sim_burst_seconds), "--charge-rule", args.charge_rule,
                *(["--no-retry-after"] if args.no_retry_after else [])]
    print(f"setup: sim {' '.join(sim_args)}; {args.deployments} deployment(s) (own redis-server each) x "
          f"{args.workers} worker(s), {args.jobs} mixed jobs each, configured at the simulator's limits; "
          f"foreign client at {args.foreign_share:.0%} of the RPM from {args.foreign_from:g} s for "
          f"{args.foreign_for:g} s; worker env {args.worker_env}")
    extra = dict(item.split("=", 1) for item in args.worker_env)
    with ExitStack() as stack, start_sim(sim_args) as sim:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        clients, redis_urls = [], []
        for d in range(args.deployments):
            url = stack.enter_context(private_redis(tmp))
            redis_urls.append(url)
            env = worker_env(sim.url, url, args.rpm, args.tpm, charge_rule=args.charge_rule, **extra)
            stack.enter_context(workers(args.workers, env, (args.log_dir or tmp) / f"logs-{d}"))
            clients.append(Client(load_settings(env)))
        time.sleep(2.0)
        sim.reset()
        foreign = ForeignClient(sim.url, args.foreign_share * args.rpm / 60, args.foreign_from, args.foreign_for)
        profile = Profile(sim.url, redis_urls) if args.profile else None
        started = time.monotonic()
        foreign.start()
        if profile:
            profile.start()
        batches = [c.submit_batch(mixed_workload(args.jobs, seed=42 + n)).batch_id for n, c in enumerate(clients)]
        done = [c.wait(b, timeout=3600, poll=0.2) for c, b in zip(clients, batches, strict=True)]
        first_done = time.monotonic() - started  # all deployments still had work until about here
        if profile:
            profile.stop()
        foreign.join()
        wall = time.monotonic() - started
        stats = sim.stats()

    calls = Counter({b: sum(n for cid, n in stats["calls_by_client_id"].items() if cid.startswith(b)) for b in batches})
    load = Path("/proc/loadavg").read_text().strip()
    print(f"wall {wall:.1f} s (ratequeue done at {first_done:.1f} s); load average: {load}")
    total_calls = total_429 = failed_rl = 0
    for n, (b, batch) in enumerate(zip(batches, done, strict=True)):
        counts = batch["request_counts"]
        refused = calls[b] - counts["completed"]
        total_calls, total_429 = total_calls + calls[b], total_429 + refused
        failed_rl += counts["failed"]
        print(f"deployment {n}: {counts}; {calls[b]} calls, {refused} 429s ({refused / max(calls[b], 1):.2%})")
    f_calls = sum(foreign.answers.values())
    print(f"foreign client: {f_calls} calls, {foreign.answers[200]} ok, {foreign.answers[429]} 429s "
          f"({foreign.answers[429] / max(f_calls, 1):.2%})")
    print(f"ratequeue: {total_429} 429s of {total_calls} calls = {total_429 / max(total_calls, 1):.2%}; "
          f"jobs failed: {failed_rl}")
    timeline = stats["timeline"]
    # While ratequeue had work: after its opening (latency + 2 s) until it finished (less one latency).
    lo, hi = int(args.latency_ms / 1000 + 2), int(first_done - args.latency_ms / 1000 - 1)
    window = [row["requests_ok"] for row in timeline if lo <= row["t"] < hi]
    if window:
        print(f"all clients together used {sum(window) / len(window) / (args.rpm / 60):.1%} of the RPM "
              f"from t={lo} s to t={hi} s")
    if profile:
        profile.print(batches)
    if args.timeline:
        print("answered ok per second:", " ".join(str(r["requests_ok"]) for r in timeline))
        print("429s per second:       ", " ".join(str(r["r429"]) for r in timeline))


if __name__ == "__main__":
    main()
