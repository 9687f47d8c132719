"""A self-hosted server (issue 13, part 2): no rate-limit headers, a fixed number of requests served at
once, a short queue behind them and 503s beyond. The workers' adaptive concurrency window must find
that capacity and use it: throughput within 10% of it, 503s under 1% of the requests, no job failed.

Two ways a user meets it: a model of the table (gpt-4o-mini) with limits set far above anything the
server serves, so that only the server's concurrency binds; and the issue's own case, a name no table
knows (`llama3.1:8b`) on an account marked openai-compatible in the models file, with no key at all.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from ratequeue.config.settings import load_settings
from ratequeue.producer.api import Client
from ratequeue.sim.process import start_sim
from tests.conftest import base_env

StartWorker = Callable[[dict[str, str]], subprocess.Popen[bytes]]

pytestmark = pytest.mark.timeout(60)

CONCURRENCY, QUEUE, LATENCY = 8, 4, 0.2  # the server: capacity 8 / 0.2 s = 40 requests a second
CAPACITY = CONCURRENCY / LATENCY
JOBS = 300


def _jobs(n: int, model: str) -> list[dict[str, object]]:
    return [{"custom_id": f"s-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": model, "messages": [{"role": "user", "content": f"summarise {i}"}],
                      "max_tokens": 20}} for i in range(n)]


def _environment(kind: str, redis_url: str, server_url: str, tmp_path: Path) -> tuple[dict[str, str], str]:
    """The workers' and submitter's environment, and the model the jobs name."""
    if kind == "table-model":
        return base_env(redis_url, server_url, tmp_path, RATEQUEUE_MODEL_GPT_4O_MINI_RPM="1000000",
                        RATEQUEUE_MODEL_GPT_4O_MINI_TPM="1000000000"), "gpt-4o-mini"
    models = tmp_path / "models.toml"
    models.write_text(f'[accounts.gpu]\ndialect = "openai-compatible"\nbase_url = "{server_url}"\n')
    env = base_env(redis_url, "http://127.0.0.1:9", tmp_path, RATEQUEUE_MODELS_FILE=str(models))
    env.pop("OPENAI_API_KEY")
    return env, "llama3.1:8b"


@pytest.mark.parametrize("kind", ["table-model", "unknown-model-no-key"])
def test_a_batch_against_a_concurrency_bound_server_runs_at_its_capacity(
    kind: str, redis_url: str, tmp_path: Path, start_worker: StartWorker
) -> None:
    args = ["--dialect", "openai-compatible", "--max-concurrency", str(CONCURRENCY), "--queue-depth", str(QUEUE),
            "--latency-ms", str(LATENCY * 1000)]
    with start_sim(args) as sim:
        env, model = _environment(kind, redis_url, sim.url, tmp_path)
        start_worker(env)
        client = Client(load_settings(env))
        batch = client.wait(client.submit_batch(_jobs(JOBS, model)).batch_id, timeout=45, poll=0.2)
        stats = sim.stats()
    counts = batch["request_counts"]
    assert (counts["completed"], counts["failed"]) == (JOBS, 0), counts
    server = stats["server"]
    requests = server["served"] + server["overloaded"]
    assert server["overloaded"] < 0.01 * requests, server
    assert server["max_concurrent"] <= CONCURRENCY
    # The steady state: the median of the whole seconds between the first answer and the last (the
    # window opens within 2 s: 4, 6, 9, each step measured before the next).
    served = [row["requests_ok"] for row in stats["timeline"]]
    first = next(i for i, n in enumerate(served) if n)
    last = max(i for i, n in enumerate(served) if n)
    steady = sorted(served[first + 1:last])
    assert len(steady) >= 5 and steady[len(steady) // 2] >= 0.9 * CAPACITY, (served, server)
