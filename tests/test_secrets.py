"""Secrets never stored or printed: redaction of credentials in upstream answers, end to end."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from ratequeue.config.settings import load_settings
from ratequeue.producer.api import Client
from ratequeue.producer.collect import errors_path_for, write_outputs
from ratequeue.redact import REDACTED, redact, redact_json
from tests.conftest import base_env
from tests.test_failure_kinds import StartWorker

# Not sk- shaped: only the exact match on the configured key can catch it.
KEY = "azkey0123456789abcdefSECRETVALUE"
FOREIGN = "sk-proj-AbCdEf0123456789_foreignKEY-xyz"  # some other key an upstream might echo


@pytest.mark.parametrize(
    "secret",
    [
        "sk-0123456789abcdefABCDEF0123456789abcdef0123",
        "sk-proj-AbC_dEf-0123456789abcdefghijklmnop",
        "sk-svcacct-Zz0123456789abcdefABCDEF_-xy",
        "sk-admin-0123456789abcdefABCDEFxyz",
        "sk-ant-api03-0123456789abcdef_ABCDEF",
    ],
)
def test_sk_style_keys_are_redacted(secret: str) -> None:
    out = redact(f"Incorrect API key provided: {secret}. You can find your API key at ...")
    assert secret not in out and secret[-8:] not in out
    assert "sk-...REDACTED" in out and out.startswith("Incorrect API key provided: ")


def test_configured_key_bearer_and_azure_api_key_are_redacted() -> None:
    text = f"key {KEY} was refused"
    assert redact(text, [KEY]) == f"key {REDACTED} was refused"
    assert KEY in redact(text)  # not key-shaped: only the configured key list catches it
    assert redact("Authorization: Bearer abc.DEF-123_456/789+xyz=") == f"Authorization: Bearer {REDACTED}"
    assert redact("bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig") == f"bearer {REDACTED}"
    azure = "0123456789abcdef0123456789abcdef"
    for text in (f"api-key: {azure}", f'{{"api_key": "{azure}"}}', f"?api-key={azure}&x=1", f"Api-Key={azure}"):
        out = redact(text)
        assert azure not in out and REDACTED in out, text
    # A JSON-encoded JSON string (an error line's body as text) stays valid JSON.
    nested = json.dumps(json.dumps({"api-key": azure, "auth": f"Bearer {azure}", "k": KEY}))
    out = redact(nested, [KEY])
    assert azure not in out and KEY not in out and json.loads(json.loads(out))["k"] == REDACTED


def test_ordinary_text_and_masked_keys_are_left_alone() -> None:
    for text in (
        "Incorrect API key provided: sk-...abcd. You can find your API key at https://platform.openai.com.",
        "a risk-assessment and a task-based desk-top plan",
        "Rate limit reached for gpt-4o in organization org-123 on tokens per min (TPM)",
        "the api-key header is missing",
        "",
    ):
        assert redact(text, [KEY]) == text
    assert redact("abc abc", ["abc"]) == "abc abc"  # too short to be a key: never matched exactly


def test_redact_json_walks_strings_of_any_depth() -> None:
    body = {
        "error": {"message": f"bad key {KEY}", "code": 401, "param": None,
                  "details": [{"hint": f"Bearer {FOREIGN}"}, True, 1.5], f"{FOREIGN}": "name"},
    }
    out = redact_json(body, [KEY])
    text = json.dumps(out)
    assert KEY not in text and FOREIGN not in text
    assert out["error"]["code"] == 401 and out["error"]["param"] is None
    assert out["error"]["details"][1:] == [True, 1.5]
    assert redact_json("plain", [KEY]) == "plain" and redact_json(None) is None


class EchoServer:
    """An upstream that echoes the caller's credentials in every error it answers."""

    def __init__(self) -> None:
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)

    async def _handle(self, request: web.Request) -> web.Response:
        auth = request.headers.get("authorization", "")
        key = auth.removeprefix("Bearer ")
        body = await request.json()
        echoed = f"key {key} (header {auth!r}, and {FOREIGN})"
        error: dict[str, Any] = {"type": "invalid_request_error", "param": None, "api_key": key}
        if body["model"] == "gpt-4.1-mini":  # refused key: parks the pair
            error.update(message=f"Incorrect API key provided: {echoed}", code="invalid_api_key")
            return web.json_response({"error": error}, status=401)
        if body["model"] == "gpt-4o":  # rate limited: waits, then gives up at its deadline with its history
            error.update(message=f"Rate limit reached for {echoed}", type="requests", code="rate_limit_exceeded")
            return web.json_response({"error": error}, status=429, headers={"retry-after-ms": "20"})
        error.update(message=f"Bad request from {echoed}", code="bad_request", details=[{"auth": auth}])
        return web.json_response({"error": error}, status=400)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        self._ready.set()
        self._loop.run_forever()

    def __enter__(self) -> EchoServer:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *_: object) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture
def echo_server() -> Iterator[EchoServer]:
    with EchoServer() as server:
        yield server


def _job(cid: str, model: str) -> dict[str, Any]:
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}}


def _every_value(client: Any) -> Iterator[bytes]:  # redis-py types its replies loosely
    """Every byte string stored in the database: keys, and the values of every type."""
    for key in client.scan_iter(count=500):
        yield key
        kind = client.type(key)
        if kind == b"string":
            yield client.get(key) or b""
        elif kind == b"hash":
            for field, value in client.hgetall(key).items():
                yield field + b"=" + value
        elif kind == b"list":
            yield from client.lrange(key, 0, -1)
        elif kind == b"zset":
            yield from client.zrange(key, 0, -1)
        elif kind == b"set":
            yield from client.smembers(key)


def test_an_upstream_that_echoes_the_key_leaves_it_nowhere(
    redis_url: str, tmp_path: Path, start_worker: StartWorker, echo_server: EchoServer
) -> None:
    # A 429 is not an attempt: the rate-limited job gives up at its deadline, with the 429's words.
    env = base_env(redis_url, echo_server.url, tmp_path, OPENAI_API_KEY=KEY, RATEQUEUE_MAX_ATTEMPTS="2",
                   RATEQUEUE_LOG_LEVEL="INFO", RATEQUEUE_PARK_COOLDOWN="60", RATEQUEUE_JOB_DEADLINE="3")
    start_worker(env)
    client = Client(load_settings(env))
    jobs = [_job("bad", "gpt-4o-mini"), _job("limited", "gpt-4o"), _job("refused", "gpt-4.1-mini")]
    report = client.submit_batch(jobs)
    deadline = time.monotonic() + 30
    while client.status(report.batch_id)["request_counts"]["failed"] < 2 or not client.parked():
        assert time.monotonic() < deadline, client.status(report.batch_id)
        time.sleep(0.1)
    results = tmp_path / "out.jsonl"
    write_outputs(client.redis, report.batch_id, results, errors_path_for(results))
    errors = {e["custom_id"]: e for e in map(json.loads, errors_path_for(results).read_text().splitlines())}
    assert errors["bad"]["response"]["status_code"] == 400
    assert errors["bad"]["response"]["body"]["error"]["api_key"] == REDACTED  # the body is kept, redacted
    assert errors["limited"]["error"]["code"] == "deadline_exceeded"
    assert "Rate limit reached for key" in errors["limited"]["error"]["message"]
    [parked] = client.parked().values()
    assert parked["reason"] == "invalid_api_key" and "Incorrect API key provided" in parked["message"]

    shown = [errors_path_for(results).read_text(), json.dumps(client.parked()), json.dumps(client.overview()),
             json.dumps(client.status(report.batch_id)), (tmp_path / "worker-0.log").read_text()]
    stored = b"\n".join(_every_value(client.redis))
    for secret in (KEY, FOREIGN, KEY[6:20], FOREIGN[8:24]):
        assert secret.encode() not in stored, secret
        for text in shown:
            assert secret not in text
    assert b"REDACTED" in stored
    client.close()


def test_records_written_before_redaction_are_redacted_when_read(redis_url: str, tmp_path: Path) -> None:
    # An older worker stored the upstream's words verbatim: status, parked() and the errors
    # output still never show the key.
    from ratequeue.jobstore import keys, records
    from ratequeue.worker.parking import pair_field

    env = base_env(redis_url, "http://127.0.0.1:9", tmp_path, OPENAI_API_KEY=KEY)
    client = Client(load_settings(env), publish=lambda *_: None)
    batch = client.submit_batch([_job("old", "gpt-4o-mini")])
    line = records.error_line("old", "http_400", f"Bad key {KEY} and {FOREIGN}", 1, None)
    client.redis.hset(keys.batch_errors(batch.batch_id), "old", line)
    entry = {"reason": "invalid_api_key", "message": f"Incorrect API key provided: {KEY}", "since": 1.0,
             "cooldown": 60.0}
    client.redis.hset(keys.parked_pairs(), pair_field("acct", "gpt-4o"), json.dumps(entry))
    results = tmp_path / "out.jsonl"
    write_outputs(client.redis, batch.batch_id, results, errors_path_for(results), [KEY])
    shown = [json.dumps(client.parked()), json.dumps(client.overview()), errors_path_for(results).read_text(),
             json.dumps(list(client.iter_results(batch.batch_id, errors=True)))]
    for text in shown:
        assert FOREIGN not in text and KEY not in text
    client.close()


def test_redact_response_covers_the_body_and_every_text_field() -> None:
    from ratequeue.redact import redact_response
    from ratequeue.worker.upstream import UpstreamResponse

    resp = UpstreamResponse(401, {"error": {"message": f"bad {KEY}"}}, {"x-request-id": "req_1"}, 0.5,
                            transport_error=f"connection: Bearer {KEY}")
    out = redact_response(resp, [KEY])
    assert KEY not in repr(out) and out.status == 401 and out.headers == resp.headers and out.elapsed == 0.5
    assert out.body == {"error": {"message": f"bad {REDACTED}"}}
