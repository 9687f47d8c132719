"""UpstreamClient in-process, through an injected ``httpx.MockTransport``: what it sends, and every
kind of answer it can get back (success, 4xx, 429 in each header form, 5xx, broken bodies,
timeouts, connection errors, the size limit), each as the one ``UpstreamResponse`` shape the
runner's policy reads. ``tests/test_hostile_upstream.py`` does the same over real sockets.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from email.utils import formatdate
from typing import Any

import httpx
import pytest

from ratequeue.worker.feedback import parse_ratelimit_headers
from ratequeue.worker.policy import Reason, Verdict, classify
from ratequeue.worker.upstream import HEAD_BYTES, Timeouts, UpstreamClient, UpstreamResponse

CHAT = "/v1/chat/completions"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
OK = {"id": "chatcmpl-1", "object": "chat.completion", "choices": [],
      "usage": {"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10}}
Handler = Callable[[httpx.Request], httpx.Response | Awaitable[httpx.Response]]


class Chunks(httpx.AsyncByteStream):
    """A body that arrives in pieces, as from a socket (not read in advance by httpx)."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk


def post(handler: Handler, limit: int = 1 << 20, total: float = 5.0, **client: Any) -> UpstreamResponse:
    """One call through a MockTransport running ``handler``."""

    async def go() -> UpstreamResponse:
        up = UpstreamClient("https://api.example.test/", "sk-test-key", transport=httpx.MockTransport(handler),
                            timeouts=Timeouts(read=total, total=total), max_response_bytes=limit, **client)
        try:
            return await up.post(CHAT, BODY, "batch_1/job-1")
        finally:
            await up.aclose()

    return asyncio.run(go())


def answer(status: int, body: Any = None, **headers: str) -> Handler:
    return lambda request: httpx.Response(status, json=body, headers=headers)


def test_a_success_sends_the_request_and_keeps_only_the_useful_headers() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=OK, headers={
            "x-request-id": "req_1", "x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "990",
            "set-cookie": "a=b", "openai-processing-ms": "12"})

    resp = post(handler, organization="org-1", project="proj-1")
    (request,) = seen
    assert (request.method, str(request.url)) == ("POST", "https://api.example.test/v1/chat/completions")
    assert request.headers["authorization"] == "Bearer sk-test-key"
    assert request.headers["openai-organization"] == "org-1" and request.headers["openai-project"] == "proj-1"
    assert request.headers["x-client-request-id"] == "batch_1/job-1"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["accept-encoding"] == "gzip, deflate"
    assert json.loads(request.content) == BODY
    assert (resp.status, resp.body, resp.body_problem, resp.request_id) == (200, OK, None, "req_1")
    assert set(resp.headers) == {"x-request-id", "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens"}
    assert parse_ratelimit_headers(resp.headers).remaining_tokens == 990
    assert classify(resp) == classify(resp) and classify(resp).verdict is Verdict.SUCCESS


def test_no_key_sends_no_authorization() -> None:
    seen: list[httpx.Request] = []

    async def go() -> None:
        up = UpstreamClient("http://h", None, transport=httpx.MockTransport(lambda r: seen.append(r) or
                                                                             httpx.Response(200, json=OK)))
        await up.post("v1/embeddings", BODY)
        await up.aclose()

    asyncio.run(go())
    assert "authorization" not in seen[0].headers and str(seen[0].url) == "http://h/v1/embeddings"
    assert "x-client-request-id" not in seen[0].headers


@pytest.mark.parametrize(("status", "error", "verdict", "reason"), [
    (400, {"message": "bad", "type": "invalid_request_error", "code": "context_length_exceeded"},
     Verdict.FAIL, "context_length_exceeded"),
    (400, {"message": "bad", "type": "invalid_request_error"}, Verdict.FAIL, "http_400"),
    (403, {"message": "forbidden"}, Verdict.FAIL, "http_403"),
    (404, {"message": "no", "code": "model_not_found"}, Verdict.FAIL, "model_not_found"),
    (401, {"message": "Incorrect API key", "code": "invalid_api_key"}, Verdict.PARK, "invalid_api_key"),
    (408, {"message": "timed out"}, Verdict.RETRY, "http_408"),
    (409, {"message": "conflict"}, Verdict.RETRY, "http_409"),
    (500, {"message": "oops", "type": "server_error"}, Verdict.RETRY, "server_error"),
    (503, {"message": "overloaded"}, Verdict.RETRY, "server_error"),
    (429, {"message": "You exceeded your current quota", "type": "insufficient_quota",
           "code": "insufficient_quota"}, Verdict.PARK, "insufficient_quota"),
    (429, {"message": "Request too large for gpt-4o", "type": "tokens"}, Verdict.FAIL, "request_too_large"),
])
def test_every_error_class(status: int, error: dict[str, str], verdict: Verdict, reason: str) -> None:
    resp = post(answer(status, {"error": error}, **{"x-request-id": "req_e"}))
    got = classify(resp, park_after=300)
    assert (resp.status, dict(resp.error), resp.request_id) == (status, error, "req_e")
    assert (got.verdict, got.reason) == (verdict, reason)
    assert got.reason == (got.detail or got.kind.value)


@pytest.mark.parametrize(("headers", "message", "wait"), [
    ({"retry-after-ms": "1500", "retry-after": "9"}, "", 1.5),  # -ms wins
    ({"retry-after": "2"}, "", 2.0),
    ({}, "Rate limit reached. Please try again in 1.2s. Visit ...", 1.2),
    ({}, "Rate limit reached. Please try again in 1m30s.", 90.0),
    ({"retry-after": "garbage"}, "", None),
    ({}, "Rate limit reached.", None),
])
def test_a_429_with_each_form_of_the_wait(headers: dict[str, str], message: str, wait: float | None) -> None:
    error = {"message": message, "type": "requests", "code": "rate_limit_exceeded"}
    got = classify(post(answer(429, {"error": error}, **headers)), park_after=300)
    assert (got.verdict, got.kind, got.retry_after) == (Verdict.RETRY, Reason.RATE_LIMIT_REQUESTS, wait)
    assert got.kind.rate_limited


def test_a_429_retry_after_as_an_http_date_and_a_long_one_parks() -> None:
    error = {"message": "slow down", "type": "tokens", "code": "rate_limit_exceeded"}
    dated = classify(post(answer(429, {"error": error}, **{"retry-after": formatdate(time.time() + 30, usegmt=True)})),
                     park_after=300)
    assert dated.kind is Reason.RATE_LIMIT_TOKENS and 25 <= (dated.retry_after or 0) <= 31
    long = classify(post(answer(429, {"error": error}, **{"retry-after": "86400"})), park_after=300)
    assert (long.verdict, long.reason, long.retry_after) == (Verdict.PARK, "long_retry_after", 86400.0)


def test_a_429_keeps_the_ratelimit_headers() -> None:
    headers = {"x-ratelimit-limit-requests": "500", "x-ratelimit-remaining-requests": "0",
               "x-ratelimit-limit-tokens": "30000", "x-ratelimit-remaining-tokens": "12",
               "x-ratelimit-reset-tokens": "6m0s"}
    resp = post(answer(429, {"error": {"message": "x", "type": "tokens"}}, **headers))
    parsed = parse_ratelimit_headers(resp.headers)
    assert (parsed.limit_requests, parsed.remaining_requests, parsed.limit_tokens, parsed.remaining_tokens,
            parsed.reset_tokens) == (500, 0, 30000, 12, 360.0)


def test_a_proxy_html_error_page_becomes_the_message() -> None:
    resp = post(lambda r: httpx.Response(502, text="<html>Bad Gateway</html>"))
    assert resp.error["message"] == "<html>Bad Gateway</html>" and resp.body_problem == "not valid JSON"
    assert classify(resp).reason == "server_error"


@pytest.mark.parametrize(("content", "problem"), [
    (b'{"id": "chatcmpl-1", "choi', "not valid JSON"),
    (b"", "empty body"),
    (b"[1, 2]", "not a JSON object"),
    (b"<html>maintenance</html>", "not valid JSON"),
])
def test_a_malformed_2xx_is_described_and_retried(content: bytes, problem: str) -> None:
    resp = post(lambda r: httpx.Response(200, content=content))
    assert (resp.status, resp.body_problem, resp.head) == (200, problem, content[:HEAD_BYTES])
    got = classify(resp)
    assert (got.verdict, got.kind) == (Verdict.RETRY, Reason.INVALID_RESPONSE)
    assert resp.describe_problem().startswith(f"HTTP 200 {problem}: ")


def test_a_compressed_body_is_inflated_whether_streamed_or_read() -> None:
    packed = gzip.compress(json.dumps(OK).encode())
    streamed = post(lambda r: httpx.Response(200, headers={"content-encoding": "gzip"},
                                             stream=Chunks(packed[:10], packed[10:])))
    whole = post(lambda r: httpx.Response(200, headers={"content-encoding": "gzip"}, content=packed))
    assert streamed.body == whole.body == OK


@pytest.mark.parametrize(("encoding", "content"), [("br", b"\x0b\x02\x80{}\x03"), ("gzip", b"not gzip at all")])
def test_an_unreadable_body_is_a_problem_not_an_exception(encoding: str, content: bytes) -> None:
    resp = post(lambda r: httpx.Response(200, headers={"content-encoding": encoding}, stream=Chunks(content)))
    assert resp.status == 200 and (resp.body_problem or "").startswith("unreadable body")
    assert classify(resp).verdict is Verdict.RETRY


@pytest.mark.parametrize(("raised", "expected"), [
    (httpx.ReadTimeout("read timed out"), "timeout: ReadTimeout"),
    (httpx.ConnectTimeout("connect timed out"), "timeout: ConnectTimeout"),
    (httpx.ConnectError("connection refused"), "connection: ConnectError: connection refused"),
    (httpx.RemoteProtocolError("server disconnected"), "connection: RemoteProtocolError: server disconnected"),
    (httpx.ConnectError("no route to https://user:pw-1234@proxy.test/v1"),
     "connection: ConnectError: no route to https://[REDACTED]@proxy.test/v1"),
])
def test_timeouts_and_connection_errors_come_back_as_status_0(raised: Exception, expected: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise raised

    resp = post(handler)
    assert (resp.status, resp.body, resp.transport_error) == (0, None, expected)
    got = classify(resp)
    assert (got.verdict, got.reason) == (Verdict.RETRY, expected.split(":")[0])


@pytest.mark.integration
def test_a_closed_port_is_a_connection_refused_not_a_timeout() -> None:
    # The real transport (aiohttp under httpx-aiohttp), a real socket: httpx-aiohttp maps aiohttp's
    # ClientConnectorError to httpx.ConnectTimeout, so the cause decides, not the mapped class.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there

    async def go() -> UpstreamResponse:
        up = UpstreamClient(f"http://127.0.0.1:{port}", "sk-test-key", timeouts=Timeouts(connect=5, read=5))
        try:
            return await up.post(CHAT, BODY)
        finally:
            await up.aclose()

    started = time.monotonic()
    resp = asyncio.run(go())
    assert resp.status == 0 and time.monotonic() - started < 5  # refused at once, no timeout waited
    assert resp.transport_error == f"connection: ConnectError: connection refused by 127.0.0.1:{port}"
    got = classify(resp)
    assert (got.verdict, got.kind) == (Verdict.RETRY, Reason.CONNECTION)


def test_the_total_deadline_cuts_a_slow_answer() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return httpx.Response(200, json=OK)

    started = time.monotonic()
    resp = post(handler, total=0.2)
    assert time.monotonic() - started < 2
    assert resp.status == 0 and resp.transport_error == "timeout: no whole answer within 0.2 s"
    assert classify(resp).kind is Reason.TIMEOUT


def test_a_read_error_in_the_middle_of_the_body() -> None:
    class Broken(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b'{"id": '
            raise httpx.ReadError("connection reset")

    resp = post(lambda r: httpx.Response(200, stream=Broken()))
    assert (resp.status, resp.transport_error) == (0, "connection: ReadError: connection reset")


@pytest.mark.parametrize("make", [
    lambda big: httpx.Response(200, content=big),  # read whole by httpx (decoded size)
    lambda big: httpx.Response(200, stream=Chunks(big[:600], big[600:])),  # counted on the wire
    lambda big: httpx.Response(200, headers={"content-length": str(len(big))}, stream=Chunks(b"{}")),  # announced
    lambda big: httpx.Response(200, headers={"content-encoding": "gzip"}, stream=Chunks(gzip.compress(big))),  # bomb
])
def test_the_size_limit_fails_the_answer(make: Callable[[bytes], httpx.Response]) -> None:
    big = b'{"x": "' + b"a" * 2000 + b'"}'
    resp = post(lambda r: make(big), limit=1000)
    assert resp.status == 200 and resp.too_large and resp.body is None
    got = classify(resp)
    assert (got.verdict, got.kind) == (Verdict.FAIL, Reason.RESPONSE_TOO_LARGE)


def test_an_answer_at_the_limit_is_kept() -> None:
    body = b'{"x": "' + b"a" * 991 + b'"}'
    assert len(body) == 1000
    assert post(lambda r: httpx.Response(200, stream=Chunks(body)), limit=1000).body == {"x": "a" * 991}
