"""`ratequeue api` end to end: the official openai SDK (base_url at the API) drives the Batch flow
against a real server process, a real worker and the simulator upstream."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from ratequeue.sim.process import SimHandle, start_sim
from tests.conftest import base_env
from tests.httpapi_server import TOKENS, ApiServer, api_server, write_tokens

ENDED = ("completed", "failed", "cancelled", "expired")


@pytest.fixture
def sim() -> Iterator[SimHandle]:
    with start_sim(["--rpm", "3000", "--tpm", "400000", "--latency-ms", "20", "--seed", "5"]) as handle:
        yield handle


@pytest.fixture
def server(redis_url: str, sim: SimHandle, tmp_path: Path,
           start_worker: Callable[[dict[str, str]], subprocess.Popen[bytes]]) -> Iterator[ApiServer]:
    env = base_env(redis_url, sim.url, tmp_path, RATEQUEUE_CHUNK_SIZE="5", RATEQUEUE_WORKER_SLOTS="1",
                   RATEQUEUE_API_TOKENS_FILE=str(write_tokens(tmp_path / "tenants.toml.json")))
    start_worker(env)
    with api_server(env, tmp_path) as handle:
        yield handle


def _line(n: int, url: str = "/v1/chat/completions") -> bytes:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"Summarise item {n}."}],
            "max_tokens": 20}
    return json.dumps({"custom_id": f"r-{n}", "method": "POST", "url": url, "body": body}).encode()


def _wait(sdk: openai.OpenAI, batch_id: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while (batch := sdk.batches.retrieve(batch_id)).status not in ENDED:
        assert time.monotonic() < deadline, f"batch {batch_id} still {batch.status} after {timeout} s"
        time.sleep(0.2)
    return batch


def _jsonl(content: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in content.splitlines()]


def test_sdk_uploads_creates_polls_and_downloads_output_and_error_files(server: ApiServer, sim: SimHandle) -> None:
    sdk = openai.OpenAI(api_key=TOKENS["alpha"], base_url=server.base_url, max_retries=0)
    lines = [_line(n) for n in range(10)]
    lines.insert(4, b"{not json")
    lines.append(_line(99, url="/v1/embeddings"))  # not the batch's endpoint: an error line, as at OpenAI
    content = b"\n".join(lines) + b"\n"
    uploaded = sdk.files.create(file=("prompts.jsonl", content), purpose="batch")
    assert (uploaded.bytes, uploaded.filename, uploaded.purpose) == (len(content), "prompts.jsonl", "batch")
    assert sdk.files.retrieve(uploaded.id).bytes == len(content)
    assert uploaded.expires_at is not None and uploaded.expires_at > uploaded.created_at  # RATEQUEUE_RETENTION_SECONDS
    assert sdk.files.content(uploaded.id).content == content

    batch = sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                               completion_window="24h", metadata={"job": "nightly"})
    assert batch.input_file_id == uploaded.id and batch.metadata == {"job": "nightly"}
    batch = _wait(sdk, batch.id)
    assert batch.status == "completed"
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (12, 10, 2)
    assert batch.usage.input_tokens > 0 and batch.usage.output_tokens > 0

    output = sdk.files.content(batch.output_file_id).content
    results = _jsonl(output)
    assert [r["custom_id"] for r in results] == [f"r-{n}" for n in range(10)]  # input order
    assert all(r["response"]["status_code"] == 200 and r["error"] is None for r in results)
    assert results[0]["response"]["body"]["object"] == "chat.completion"
    output_file = sdk.files.retrieve(batch.output_file_id)
    assert output_file.bytes == len(output) and output_file.expires_at and output_file.expires_at > time.time()
    errors = _jsonl(sdk.files.content(batch.error_file_id).content)
    assert [(e["error"]["code"], e["error"].get("line")) for e in errors] == [("invalid_json", 5),
                                                                             ("invalid_request", 12)]
    assert errors[1]["custom_id"] == "r-99" and errors[1]["error"]["param"] == "url"
    assert sorted(sim.stats()["calls_by_client_id"].values()) == [1] * 10  # one upstream call per job


def test_sdk_cancels_a_running_batch_and_lists_batches_newest_first(server: ApiServer, sim: SimHandle) -> None:
    sdk = openai.OpenAI(api_key=TOKENS["alpha"], base_url=server.base_url, max_retries=0)
    small = sdk.files.create(file=("small.jsonl", b"\n".join(_line(n) for n in range(3))), purpose="batch")
    first = sdk.batches.create(input_file_id=small.id, endpoint="/v1/chat/completions", completion_window="24h")
    second = sdk.batches.create(input_file_id=small.id, endpoint="/v1/chat/completions", completion_window="24h")
    _wait(sdk, first.id), _wait(sdk, second.id)

    sim.configure(latency_ms=3000)  # one chunk (5 calls) in flight, one waiting, at the cancel
    slow = sdk.files.create(file=("slow.jsonl", b"\n".join(_line(n) for n in range(10))), purpose="batch")
    third = sdk.batches.create(input_file_id=slow.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert sdk.batches.cancel(third.id).status in ("cancelling", "cancelled")
    sim.configure(latency_ms=20)
    cancelled = _wait(sdk, third.id)
    assert cancelled.status == "cancelled" and cancelled.request_counts.failed >= 1
    codes = {e["error"]["code"] for e in _jsonl(sdk.files.content(cancelled.error_file_id).content)}
    assert codes == {"batch_cancelled"}

    page = sdk.batches.list(limit=2)
    assert [b.id for b in page.data] == [third.id, second.id] and page.has_more
    assert [b.id for b in sdk.batches.list(limit=2)] == [third.id, second.id, first.id]  # every page
    assert [b.id for b in sdk.batches.list(limit=2, after=second.id).data] == [first.id]
    beta = openai.OpenAI(api_key=TOKENS["beta"], base_url=server.base_url, max_retries=0)
    assert list(beta.batches.list()) == []
