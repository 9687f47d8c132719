"""Shared pieces of the benchmarks: a seeded mixed-size workload, the simulator, worker processes
started as on separate hosts, and the figures every scenario prints."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ratequeue.producer.demo import sample_documents, steady_utilisation  # noqa: E402

BENCH_REDIS_URL = os.environ.get("RATEQUEUE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")


def mixed_workload(n: int, seed: int = 42, model: str = "gpt-4o-mini") -> Iterator[dict[str, Any]]:
    """``n`` chat requests of mixed sizes: prompts of ~40 to ~1,200 tokens, max_tokens 16 to 400."""
    rng = random.Random(seed)
    docs = [d["text"] for d in sample_documents()]
    for i in range(n):
        parts = rng.choice((1, 1, 1, 2, 3, 6, 12))
        text = " ".join(rng.choice(docs) for _ in range(parts))
        yield {
            "custom_id": f"doc-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": model,
                "messages": [{"role": "user", "content": f"Summarise:\n{text}"}],
                "max_tokens": rng.choice((16, 32, 64, 128, 200, 400)),
            },
        }


def worker_env(sim_url: str, redis_url: str, rpm: float | None, tpm: float | None, model: str = "gpt-4o-mini",
               charge_rule: str = "sum", **extra: str) -> dict[str, str]:
    """The environment of a benchmark worker: the simulator as upstream, the model's limits set
    (left to the model table's defaults when ``rpm``/``tpm`` are None)."""
    mangled = model.upper().replace("-", "_").replace(".", "_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RATEQUEUE_", "OPENAI_"))}
    env.update(
        RATEQUEUE_REDIS_URL=redis_url,
        OPENAI_BASE_URL=sim_url,
        OPENAI_API_KEY="sk-bench-000000000000",
        RATEQUEUE_LOG_LEVEL="WARNING",
        PYTHONPATH=str(ROOT),
        **{f"RATEQUEUE_MODEL_{mangled}_CHARGE_RULE": charge_rule},
    )
    if rpm is not None and tpm is not None:
        env[f"RATEQUEUE_MODEL_{mangled}_RPM"] = str(int(rpm))
        env[f"RATEQUEUE_MODEL_{mangled}_TPM"] = str(int(tpm))
    env.update(extra)
    return env


@contextmanager
def workers(count: int, env: Mapping[str, str], log_dir: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` independent `python -m ratequeue.worker` processes (as on ``count`` hosts)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for n in range(count):
        with (log_dir / f"worker-{n}.log").open("wb") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "ratequeue.worker"], env=dict(env), stdout=log,
                                          stderr=subprocess.STDOUT, cwd=ROOT))
    try:
        yield procs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory of a live process (VmHWM), in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a live process has used so far, in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_server_pid(redis_url: str) -> int:
    return int(redis.Redis.from_url(redis_url).info("server")["process_id"])


def flush(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.close()


@dataclass
class Figures:
    scenario: str
    limits: str
    jobs: int
    wall: float
    minimum: float
    utilisation: float
    r429: int
    requests: int
    calls_per_job: float
    peak_rss_mb: float
    whole_run: float = 0.0

    def row(self) -> str:
        return (
            f"| {self.scenario} | {self.limits} | {self.jobs} | {self.wall:.1f} s | {self.minimum:.1f} s | "
            f"{self.wall / self.minimum:.3f} | {self.utilisation:.1%} | "
            f"{self.r429} ({self.r429 / max(self.requests, 1):.2%}) | "
            f"{self.calls_per_job:.3f} | {self.peak_rss_mb:.0f} MB | {self.whole_run:.1%} |"
        )


HEADER = (
    "| scenario | limits | jobs | wall | minimum | wall/min | utilisation (steady) | 429s (share) | calls/job | "
    "peak RSS/worker | utilisation (whole run) |\n|---|---|---|---|---|---|---|---|---|---|---|"
)


def figures(scenario: str, stats: Mapping[str, Any], rpm: float, tpm: float, jobs: int, wall: float,
            latency: float, rss: float, burst_seconds: float = 5.0) -> Figures:
    """The standard row: minimum = max(N/RPM, charged tokens/TPM) + one latency.

    The steady state leaves out the opening (the limiter's burst capacity, spent while the
    workers ramp up: burst seconds + one latency + 2 s) and the closing tail (one latency + 1 s).
    """
    charged = stats["tokens_charged"]
    minimum = max(jobs / rpm, charged / tpm) * 60 + latency
    use = steady_utilisation(stats["timeline"], rpm, tpm, trim=int(burst_seconds + latency + 2),
                             trim_end=int(latency + 1))
    r429 = sum(stats["r429"].values())
    calls = stats["requests_total"]
    whole = max(stats["accepted_requests"] / (wall * rpm / 60), charged / (wall * tpm / 60))
    return Figures(scenario, f"{int(rpm)} RPM / {int(tpm):,} TPM", jobs, wall, minimum, use["binding"], r429,
                   calls, calls / max(jobs, 1), rss, whole)


def write_jsonl(path: Path, rows: Iterator[dict[str, Any]]) -> None:
    with path.open("wb") as out:
        for row in rows:
            out.write(orjson.dumps(row) + b"\n")
