"""End to end: simulator + real Redis + a real worker process + the Python API."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from ratequeue.config.settings import load_settings
from ratequeue.producer.api import Client
from ratequeue.producer.collect import write_outputs
from ratequeue.sim.process import SimHandle, start_sim
from tests.conftest import base_env


@pytest.fixture
def sim() -> Iterator[SimHandle]:
    with start_sim(["--rpm", "3000", "--tpm", "400000", "--latency-ms", "50", "--seed", "3"]) as handle:
        yield handle


def _chat(n: int, model: str = "gpt-4o-mini", max_tokens: int = 30) -> dict[str, object]:
    return {
        "custom_id": f"c-{n}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": model,
            "messages": [{"role": "user", "content": f"Summarise item {n}."}],
            "max_tokens": max_tokens,
        },
    }


def _client(env: dict[str, str]) -> Client:
    return Client(load_settings(env), publish=None)


def test_batch_runs_to_completion_with_results_in_input_order(
    redis_url: str,
    sim: SimHandle,
    tmp_path: Path,
    start_worker: Callable[[dict[str, str]], subprocess.Popen[bytes]],
) -> None:
    env = base_env(redis_url, sim.url, tmp_path, RATEQUEUE_CHUNK_SIZE="7")
    start_worker(env)
    lines = [orjson.dumps(_chat(n)) for n in range(60)]
    lines.insert(10, b"{broken")
    lines.append(
        orjson.dumps(
            {
                **_chat(999),
                "url": "/v1/embeddings",
                "body": {"model": "text-embedding-3-small", "input": ["a", "b"]},
            }
        )
    )
    lines.append(orjson.dumps({**_chat(1000), "url": "/v1/responses",
                               "body": {"model": "gpt-4o-mini", "input": "Say hi.", "max_output_tokens": 16}}))
    lines.append(orjson.dumps({**_chat(1001), "url": "/v1/completions",
                               "body": {"model": "gpt-3.5-turbo-instruct", "prompt": "Once upon", "max_tokens": 8}}))
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    client = _client(env)
    report = client.submit_batch(source)
    assert (report.jobs, report.errors) == (63, 1)
    batch = client.wait(report.batch_id, timeout=60)
    assert batch["status"] == "completed"
    assert batch["request_counts"] == {"total": 64, "completed": 63, "failed": 1}
    assert batch["usage"]["prompt_tokens"] > 0 and batch["cost_usd"] > 0

    out, err = tmp_path / "out.jsonl", tmp_path / "out.errors.jsonl"
    assert write_outputs(client.redis, report.batch_id, out, err) == (63, 1)
    results = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert [r["custom_id"] for r in results] == [f"c-{n}" for n in range(60)] + ["c-999", "c-1000", "c-1001"]
    for r in results:
        assert set(r) == {"id", "custom_id", "response", "error"} and r["error"] is None
        assert r["response"]["status_code"] == 200 and r["response"]["request_id"].startswith("req_")
        assert r["id"].startswith("batch_req_")
    assert results[0]["response"]["body"]["object"] == "chat.completion"
    assert [r["response"]["body"]["object"] for r in results[-3:]] == ["list", "response", "text_completion"]
    [error] = [orjson.loads(line) for line in err.read_bytes().splitlines()]
    assert (
        error["response"] is None
        and error["error"]["line"] == 11
        and error["error"]["code"] == "invalid_json"
    )
    # exactly one upstream call per job
    calls = sim.stats()["calls_by_client_id"]
    assert sorted(calls.values()) == [1] * 63


def test_submit_job_for_services_and_upstream_errors_go_to_errors(
    redis_url: str,
    sim: SimHandle,
    tmp_path: Path,
    start_worker: Callable[[dict[str, str]], subprocess.Popen[bytes]],
) -> None:
    env = base_env(redis_url, sim.url, tmp_path, RATEQUEUE_MAX_ATTEMPTS="3")
    start_worker(env)
    client = _client(env)
    batch_id, cid = client.submit_job(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    )
    line = client.result(batch_id, cid, timeout=30)
    assert line["response"]["status_code"] == 200
    assert client.wait(batch_id, timeout=10)["status"] == "completed"

    sim.configure(fail_rate=1.0)  # every call answers 5xx: retried, then reported with its history
    open_id = client.open_batch()
    client.submit_job(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5},
        custom_id="flaky",
        batch_id=open_id,
    )
    client.close_batch(open_id)
    batch = client.wait(open_id, timeout=60)
    assert batch["request_counts"]["failed"] == 1
    [err] = list(client.iter_results(open_id, errors=True))
    assert err["custom_id"] == "flaky"
    assert err["error"]["code"] == "max_attempts_exceeded"
    assert err["error"]["history"]["attempts"] == load_settings(env).max_attempts
    assert sim.stats()["calls_by_client_id"][f"{open_id}/flaky"] == load_settings(env).max_attempts
