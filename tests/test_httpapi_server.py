"""`ratequeue api` as a deployment runs it: several replicas on one Redis, restarts, and what it
refuses to start with."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from ratequeue.jobstore import keys
from tests.conftest import ROOT, base_env, wait_until
from tests.httpapi_server import TOKENS, api_server, write_tokens

pytestmark = pytest.mark.e2e
LINE = json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                   "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
                            "max_tokens": 5}}).encode() + b"\n"


def test_replicas_share_files_and_batches_and_a_restart_loses_nothing(redis_url: str, tmp_path: Path) -> None:
    env = base_env(redis_url, "http://127.0.0.1:9", tmp_path,
                   RATEQUEUE_API_TOKENS_FILE=str(write_tokens(tmp_path / "tenants.json")))
    with api_server(env, tmp_path) as first, api_server(env, tmp_path) as second:
        one = openai.OpenAI(api_key=TOKENS["alpha"], base_url=first.base_url, max_retries=0)
        two = openai.OpenAI(api_key=TOKENS["alpha"], base_url=second.base_url, max_retries=0)
        uploaded = one.files.create(file=("in.jsonl", LINE * 3), purpose="batch")
        batch = two.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                   completion_window="24h")
        assert one.batches.retrieve(batch.id).request_counts.total == 3
        more = [two.files.create(file=(f"in-{n}.jsonl", LINE), purpose="batch").id for n in range(2)]
        page = one.files.list(limit=2)
        assert [f.id for f in page.data] == more[::-1] and page.has_more  # newest first, over both replicas
        assert [f.id for f in one.files.list(limit=2)] == [*more[::-1], uploaded.id]  # every page
    with api_server(env, tmp_path) as restarted:  # every replica gone, then a new one
        sdk = openai.OpenAI(api_key=TOKENS["alpha"], base_url=restarted.base_url, max_retries=0)
        assert sdk.files.content(uploaded.id).content == LINE * 3
        assert [b.id for b in sdk.batches.list()] == [batch.id]
        assert len(list(sdk.files.list(purpose="batch"))) == 3


def _api(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ratequeue.producer.cli", "api", "--port", "0"], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=30)


def test_refuses_to_start_without_tenants_or_with_an_unknown_account(redis_url: str, tmp_path: Path) -> None:
    env = base_env(redis_url, "http://127.0.0.1:9", tmp_path)
    done = _api(env)
    assert done.returncode == 2 and "set RATEQUEUE_API_TOKENS_FILE" in done.stderr, done.stderr
    tenants = tmp_path / "tenants.json"
    tenants.write_text(json.dumps({"tenants": {"a": {"token_sha256": "1" * 64, "accounts": ["nope"]}}}))
    done = _api({**env, "RATEQUEUE_API_TOKENS_FILE": str(tenants)})
    assert done.returncode == 2 and "'nope' is not an account" in done.stderr, done.stderr


def test_an_idempotency_key_makes_a_retried_create_return_the_first_batch(redis_url: str, tmp_path: Path) -> None:
    env = base_env(redis_url, "http://127.0.0.1:9", tmp_path,
                   RATEQUEUE_API_TOKENS_FILE=str(write_tokens(tmp_path / "tenants.json")))
    with api_server(env, tmp_path) as server:
        sdk = openai.OpenAI(api_key=TOKENS["alpha"], base_url=server.base_url, max_retries=0)
        uploaded = sdk.files.create(file=("in.jsonl", LINE * 2), purpose="batch")
        args: dict[str, Any] = {"input_file_id": uploaded.id, "endpoint": "/v1/chat/completions",
                                "completion_window": "24h"}
        key = {"Idempotency-Key": "nightly-2026-11-30"}
        first = sdk.batches.create(**args, extra_headers=key)
        assert sdk.batches.create(**args, extra_headers=key).id == first.id  # a retry: nothing queued twice
        assert [b.id for b in sdk.batches.list()] == [first.id]
        with pytest.raises(openai.BadRequestError):  # the same key for another request
            sdk.batches.create(**{**args, "metadata": {"run": "2"}}, extra_headers=key)
        assert sdk.batches.create(**args).id != first.id  # no key: a new batch, as OpenAI does
        beta = openai.OpenAI(api_key=TOKENS["beta"], base_url=server.base_url, max_retries=0)
        theirs = beta.files.create(file=("in.jsonl", LINE), purpose="batch")
        assert beta.batches.create(**{**args, "input_file_id": theirs.id}, extra_headers=key).id != first.id


def test_a_batch_is_the_tenants_from_its_creation_even_if_the_server_dies_while_storing_it(
    redis_url: str, rclient: redis.Redis, tmp_path: Path
) -> None:
    """Killed while POST /v1/batches stores a big file's jobs (some already queued and running):
    the batch must not be orphaned, so the tenant can see and cancel it through another replica."""
    env = base_env(redis_url, "http://127.0.0.1:9", tmp_path,
                   RATEQUEUE_API_TOKENS_FILE=str(write_tokens(tmp_path / "tenants.json")))
    lines = b"".join(LINE.replace(b'"custom_id": "a"', f'"custom_id": "a{n}"'.encode()) for n in range(30_000))
    with api_server(env, tmp_path) as doomed:
        sdk = openai.OpenAI(api_key=TOKENS["alpha"], base_url=doomed.base_url, max_retries=0)
        uploaded = sdk.files.create(file=("big.jsonl", lines), purpose="batch")

        def create() -> None:
            with contextlib.suppress(httpx.TransportError):  # the server is killed under it
                httpx.post(f"{doomed.base_url}/batches", headers=doomed.headers(), timeout=60,
                           json={"input_file_id": uploaded.id, "endpoint": "/v1/chat/completions"})

        creating = threading.Thread(target=create, daemon=True)
        creating.start()
        wait_until(lambda: rclient.zcard(keys.batches_index()) > 0, 30, "the batch to be created")
        doomed.process.kill()
        [batch_id] = [m.decode() for m in rclient.zrange(keys.batches_index(), 0, -1)]
        assert rclient.hget(keys.batch_meta(batch_id), "sealed") != b"1", "stored whole before the kill: retry"
    with api_server(env, tmp_path) as replica:
        sdk = openai.OpenAI(api_key=TOKENS["alpha"], base_url=replica.base_url, max_retries=0)
        assert [b.id for b in sdk.batches.list()] == [batch_id]
        assert sdk.batches.retrieve(batch_id).input_file_id == uploaded.id
        assert sdk.batches.cancel(batch_id).status in ("cancelling", "cancelled")
