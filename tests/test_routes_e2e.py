"""Several routes for one model (issue 13 part 4), end to end: real workers, real Redis, one
simulator per route (each requiring its own key).

- Two routes of R/2 RPM each finish a batch about as fast as one route of R RPM (a generous bound
  here; the 5% figure is measured by bench/routes_bench.py at a larger scale).
- A route whose key is refused (401) is parked; the other route finishes the batch.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ratequeue.config.settings import load_settings
from ratequeue.producer.api import Client
from ratequeue.sim.process import start_sim
from tests.conftest import base_env

pytestmark = pytest.mark.e2e

StartWorker = Callable[[dict[str, str]], subprocess.Popen[bytes]]
KEY_A = "sk-route-a-0123456789abcdef"
KEY_B = "sk-route-b-fedcba9876543210"
RPM = 1200  # the summed limit: 20 requests a second
N = 40  # 2 s at the summed limit


def _sim(rpm: int, key: str) -> list[str]:
    # A one-second burst: the wall time is set by the rate, not by a minute's budget spent at once.
    return ["--api-key", key, "--rpm", str(rpm), "--burst-seconds", "1", "--latency-ms", "20"]


def _models_file(tmp_path: Path, urls: dict[str, str]) -> Path:
    path = tmp_path / f"models-{len(urls)}.toml"
    accounts = "".join(f'[accounts.{name}]\nbase_url = "{url}"\napi_key_env = "KEY_{name.upper()}"\n\n'
                       for name, url in urls.items())
    routes = ", ".join(f'"{name}"' for name in urls)
    path.write_text(f'default_account = "a"\n\n{accounts}[routes]\n"gpt-4o-mini" = [{routes}]\n')
    return path


def _env(redis_url: str, tmp_path: Path, models: Path, **extra: str) -> dict[str, str]:
    # Chunks of 10: a chunk takes one route (worker/routechoice.py), so 40 jobs make 4 choices.
    env = base_env(redis_url, "http://127.0.0.1:9", tmp_path, RATEQUEUE_MODELS_FILE=str(models),
                   RATEQUEUE_CHUNK_SIZE="10", **extra)
    env.pop("OPENAI_API_KEY")
    return env


def _lines(tag: str, n: int = N, model: str = "gpt-4o-mini") -> list[dict[str, object]]:
    return [{"custom_id": f"{tag}-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": f"{i}"}]}}
            for i in range(n)]


def _run(client: Client, tag: str, n: int = N, timeout: float = 60,
         model: str = "gpt-4o-mini") -> tuple[float, dict[str, object]]:
    """Wall time of a batch of `n` jobs (from submit to its final status) and its Batch object."""
    started = time.monotonic()
    batch_id = client.submit_batch(_lines(tag, n, model)).batch_id
    batch = client.wait(batch_id, timeout=timeout, poll=0.05)
    return time.monotonic() - started, batch


def _warm(client: Client, model: str = "gpt-4o-mini") -> None:
    """A few jobs first (two chunks: each route learns its limits) before the timed batch."""
    _, batch = _run(client, f"warm-{model}", 20, model=model)
    assert batch["request_counts"] == {"total": 20, "completed": 20, "failed": 0}


def test_two_routes_finish_as_fast_as_one_route_of_their_summed_limits(
        redis_url: str, tmp_path: Path, start_worker: StartWorker) -> None:
    """One worker, two models: gpt-4.1-mini on one route of RPM (account "one"), gpt-4o-mini on two
    routes of RPM / 2 (accounts a and b), each route a simulator of its own; the same jobs for each."""
    with start_sim(_sim(RPM, KEY_A)) as one, start_sim(_sim(RPM // 2, KEY_A)) as a, \
            start_sim(_sim(RPM // 2, KEY_B)) as b:
        models = _models_file(tmp_path, {"a": a.url, "b": b.url})
        models.write_text(models.read_text().replace(
            "[routes]", f'[accounts.one]\nbase_url = "{one.url}"\napi_key_env = "KEY_A"\n\n[routes]'
        ) + '"gpt-4.1-mini" = ["one"]\n')
        env = _env(redis_url, tmp_path, models, KEY_A=KEY_A, KEY_B=KEY_B)
        start_worker(env)
        client = Client(load_settings(env))
        for model in ("gpt-4.1-mini", "gpt-4o-mini"):
            _warm(client, model)
        single, batch = _run(client, "one", model="gpt-4.1-mini")
        assert batch["request_counts"]["completed"] == N
        double, batch = _run(client, "two")
        assert batch["request_counts"]["completed"] == N
        shares = [sim.stats(timeline=False)["by_status"].get("200", 0) for sim in (a, b)]
    # Before the choice, every job took the first route: twice the single route's time.
    assert double < single * 1.3 + 0.5, f"two routes {double:.1f} s, one route of their sum {single:.1f} s"
    assert min(shares) >= (N + 20) // 4, f"the routes' shares of the calls: {shares}"
    routes = client.overview()["routes"]["gpt-4o-mini"]
    assert set(routes) == {"a/gpt-4o-mini", "b/gpt-4o-mini"}
    assert sum(r["routed"] for r in routes.values()) >= N + 20
    assert abs(sum(r["share"] for r in routes.values()) - 1.0) < 0.01


def test_a_route_refusing_its_key_is_parked_while_the_other_finishes_the_batch(
        redis_url: str, tmp_path: Path, start_worker: StartWorker) -> None:
    with start_sim(_sim(RPM, KEY_A)) as a, start_sim(_sim(RPM, KEY_B)) as b:
        models = _models_file(tmp_path, {"a": a.url, "b": b.url})
        # b's key is a wrong one: its server answers 401.
        env = _env(redis_url, tmp_path, models, KEY_A=KEY_A, KEY_B="sk-route-b-wrong-000000000000",
                   RATEQUEUE_PARK_COOLDOWN="2")
        start_worker(env)
        client = Client(load_settings(env))
        _, batch = _run(client, "park", 60, timeout=30)
        refused = b.stats(timeline=False)["by_status"]
        served = a.stats(timeline=False)["by_status"]
        parked = client.overview()["parked"]
        routes = client.overview()["routes"]["gpt-4o-mini"]
    assert batch["request_counts"] == {"total": 60, "completed": 60, "failed": 0}
    assert served == {"200": 60}
    assert set(refused) == {"401"}
    assert [pair for pair in parked if pair.endswith(":gpt-4o-mini")], parked
    assert routes["b/gpt-4o-mini"]["parked"] and not routes["a/gpt-4o-mini"]["parked"]
