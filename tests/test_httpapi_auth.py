"""`ratequeue api`: who may call it and how much. A real server process on the test's Redis, the
official openai SDK and raw HTTP; no worker (nothing here needs a batch to run)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import base_env
from tests.httpapi_server import LIMITED_RPM, TOKENS, ApiServer, api_server, write_tokens

pytestmark = pytest.mark.e2e
MAX_UPLOAD = 100_000


@pytest.fixture
def server(redis_url: str, tmp_path: Path) -> Iterator[ApiServer]:
    env = base_env(redis_url, "http://127.0.0.1:9", tmp_path,
                   RATEQUEUE_API_TOKENS_FILE=str(write_tokens(tmp_path / "tenants.json")),
                   RATEQUEUE_API_MAX_UPLOAD_BYTES=str(MAX_UPLOAD), RATEQUEUE_API_MAX_JSON_BYTES="10000")
    with api_server(env, tmp_path) as handle:
        yield handle


def _sdk(server: ApiServer, tenant: str = "alpha", token: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(api_key=token or TOKENS[tenant], base_url=server.base_url, max_retries=0)


def _jsonl(n: int = 3) -> bytes:
    return b"".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
                                         "max_tokens": 5}}).encode() + b"\n" for i in range(n))


def _error(response: httpx.Response) -> dict[str, object]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return dict(body["error"])


def test_missing_or_wrong_token_is_401_in_openais_shape(server: ApiServer) -> None:
    for headers in ({}, {"Authorization": "Bearer rq-not-a-token"}, {"Authorization": f"Basic {TOKENS['alpha']}"}):
        for method, path in (("GET", "/v1/batches"), ("POST", "/v1/files"), ("GET", "/v1/files/file-x/content")):
            response = httpx.request(method, f"{server.base_url}{path.removeprefix('/v1')}", headers=headers)
            assert response.status_code == 401, (headers, path, response.text)
            assert _error(response)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        _sdk(server, token="rq-not-a-token").batches.list()
    assert TOKENS["alpha"] not in server.log.read_text()


def test_another_tenants_files_and_batches_are_404_like_ids_that_do_not_exist(server: ApiServer) -> None:
    alpha, beta = _sdk(server, "alpha"), _sdk(server, "beta")
    uploaded = alpha.files.create(file=("in.jsonl", _jsonl()), purpose="batch")
    batch = alpha.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert alpha.batches.retrieve(batch.id).id == batch.id
    assert alpha.files.content(uploaded.id).content == _jsonl()

    refused = [
        lambda: beta.batches.retrieve(batch.id),
        lambda: beta.batches.cancel(batch.id),
        lambda: beta.files.retrieve(uploaded.id),
        lambda: beta.files.content(uploaded.id),
        lambda: beta.files.delete(uploaded.id),
        lambda: beta.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                    completion_window="24h"),
    ]
    for call in refused:
        with pytest.raises(openai.NotFoundError):
            call()
    assert [b.id for b in beta.batches.list()] == [] and [f.id for f in beta.files.list()] == []
    assert [f.id for f in alpha.files.list()] == [uploaded.id]
    # The same answer as for an id nobody has: existence is not told.
    mine = httpx.get(f"{server.base_url}/batches/{batch.id}", headers=server.headers("beta"))
    nobodys = httpx.get(f"{server.base_url}/batches/batch_000000000000000000000000", headers=server.headers("beta"))
    assert (mine.status_code, nobodys.status_code) == (404, 404)
    assert _error(mine)["code"] == _error(nobodys)["code"] == "not_found"
    assert alpha.batches.retrieve(batch.id).status in ("validating", "in_progress")  # beta's cancel did nothing
    assert alpha.files.delete(uploaded.id).deleted  # beta's delete did nothing either
    with pytest.raises(openai.NotFoundError):
        alpha.files.retrieve(uploaded.id)
    assert list(alpha.files.list()) == []
    assert alpha.batches.retrieve(batch.id).request_counts.total == 3  # the batch keeps its jobs


def test_upload_over_the_limit_is_413_before_the_body_is_read(server: ApiServer) -> None:
    with pytest.raises(openai.APIStatusError) as refused:
        _sdk(server).files.create(file=("big.jsonl", _jsonl(1) * (MAX_UPLOAD // 100)), purpose="batch")
    assert refused.value.status_code == 413

    # A chunked upload (no Content-Length) that never ends: answered 413 once the limit is passed,
    # so the server counts while the body streams instead of reading it all first.
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /v1/files HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer " + TOKENS["alpha"].encode()
                     + b"\r\nContent-Type: multipart/form-data; boundary=XX\r\nTransfer-Encoding: chunked\r\n\r\n")
        head = (b'--XX\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--XX\r\n'
                b'Content-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n')
        piece = b"y" * 65536
        for part in (head, *[piece] * (3 * MAX_UPLOAD // len(piece))):
            sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        answer = b""
        while b'"code"' not in answer and (more := sock.recv(4096)):  # the headers, then the body
            answer += more
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"code":"too_large"' in answer

    big = {"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "metadata": {"x": "y" * 20_000}}
    response = httpx.post(f"{server.base_url}/batches", json=big, headers=server.headers())
    assert response.status_code == 413 and _error(response)["code"] == "too_large"


def test_tenant_past_its_requests_per_minute_gets_429_with_retry_after(server: ApiServer) -> None:
    # 2 x limit + 1 requests: however a minute boundary splits them, one minute holds more than the limit.
    answers = [httpx.get(f"{server.base_url}/batches", headers=server.headers("limited"))
               for _ in range(2 * LIMITED_RPM + 1)]
    refused = [r for r in answers if r.status_code == 429]
    assert refused and all(r.status_code in (200, 429) for r in answers)
    error = _error(refused[0])
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert 1 <= int(refused[0].headers["retry-after"]) <= 60
    # Other tenants are not limited by it.
    assert httpx.get(f"{server.base_url}/batches", headers=server.headers("alpha")).status_code == 200


def test_bad_requests_name_the_parameter(server: ApiServer) -> None:
    sdk = _sdk(server)
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.files.create(file=("in.jsonl", _jsonl()), purpose="fine-tune")
    assert bad.value.param == "purpose"
    uploaded = sdk.files.create(file=("in.jsonl", _jsonl()), purpose="batch")
    cases = (({"endpoint": "/v1/images"}, "endpoint"), ({"completion_window": "soon"}, "completion_window"),
             ({"metadata": {"k": 1}}, "metadata"))
    for params, param in cases:
        body = {"input_file_id": uploaded.id, "endpoint": "/v1/chat/completions", **params}
        response = httpx.post(f"{server.base_url}/batches", json=body, headers=server.headers())
        assert response.status_code == 400 and _error(response)["param"] == param, response.text
    response = httpx.post(f"{server.base_url}/batches", content=b"{not json", headers=server.headers())
    assert response.status_code == 400 and _error(response)["code"] == "invalid_json"
    assert httpx.get(f"{server.base_url}/nothing", headers=server.headers()).status_code == 404
    broken = httpx.post(f"{server.base_url}/files", content=b"--XX\r\nContent-Disposition: form-data\r\n\r\nx",
                        headers={**server.headers(), "Content-Type": "multipart/form-data; boundary=XX"})
    assert broken.status_code == 400 and _error(broken)["message"], broken.text
