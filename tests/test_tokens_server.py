"""What a request of a ``tokenize = "server"`` account asks the server's /tokenize (vLLM's request shapes),
where that URL is (the server's root, not under /v1), and how a count from it enters the estimate."""

from __future__ import annotations

import logging
import socket
import time

import pytest

from ratequeue.config.accounts import Account, Route
from ratequeue.config.models import generic_spec
from ratequeue.config.urls import normalize_base_url
from ratequeue.errors import InvalidRequestError
from ratequeue.tokens.estimate import Counted, estimate_request
from ratequeue.tokens.server import ServerCounts, tokenize_payloads, tokenize_url
from ratequeue.tokens.server_http import failure, refused

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


def test_chat_is_one_request_with_its_messages_and_tools_under_the_model_named_on_the_server() -> None:
    body = {"model": "llama-8b", "messages": MESSAGES, "tools": TOOLS, "max_tokens": 5}
    assert tokenize_payloads("/v1/chat/completions", body, "meta-llama/Llama-3.1-8B-Instruct") == [
        {"model": "meta-llama/Llama-3.1-8B-Instruct", "messages": MESSAGES, "tools": TOOLS}]


def test_prompts_and_inputs_are_one_request_per_string_and_token_ids_count_themselves() -> None:
    assert tokenize_payloads("/v1/completions", {"prompt": ["a", "", [1, 2, 3]]}, "m") == [
        {"model": "m", "prompt": "a"}, {"model": "m", "prompt": ""}, 3]
    assert tokenize_payloads("/v1/embeddings", {"input": "text"}, "m") == [{"model": "m", "prompt": "text"}]


@pytest.mark.parametrize(("url", "body"), [
    ("/v1/responses", {"input": "hi"}),  # vLLM's /tokenize has no shape for it
    ("/v1/chat/completions", {"messages": []}),
    ("/v1/chat/completions", {"messages": ["hi"]}),
    ("/v1/completions", {"prompt": [1, 2, 3]}),  # one prompt given as token ids
    ("/v1/embeddings", {"input": ["ok", ""]}),  # an empty input: the local count names it
    ("/v1/embeddings", {"input": 7}),
])
def test_what_the_server_is_not_asked_is_left_to_the_local_count(url: str, body: dict[str, object]) -> None:
    assert tokenize_payloads(url, body, "m") is None


@pytest.mark.parametrize("given", ["http://gpu1:8000", "http://gpu1:8000/v1", "http://gpu1:8000/v1/"])
def test_tokenize_is_at_the_servers_root_beside_v1(given: str) -> None:
    account = Account("gpu", "openai-compatible", normalize_base_url(given), "b", tokenize="server")
    assert tokenize_url(account) == "http://gpu1:8000/tokenize"
    proxied = Account("gpu", "openai-compatible", normalize_base_url("https://proxy/llama/v1"), "b")
    assert tokenize_url(proxied) == "https://proxy/llama/tokenize"


def test_a_server_count_replaces_the_local_one_and_its_max_model_len_the_context_window() -> None:
    spec = generic_spec("m")  # context window 131,072; its output may fill it
    body = {"model": "m", "messages": MESSAGES}
    estimate = estimate_request("/v1/chat/completions", body, spec, Counted((40,), 4096))
    assert (estimate.prompt_tokens, estimate.output_tokens) == (40, 4096 - 40)
    assert estimate_request("/v1/chat/completions", body, spec, Counted((40,))).output_tokens == 131_072 - 40
    completions = {"model": "m", "prompt": ["a", "b"], "max_tokens": 10}
    assert estimate_request("/v1/completions", completions, spec, Counted((7, 9), 4096)).prompt_tokens == 16
    with pytest.raises(InvalidRequestError, match=r"input of 5000 tokens exceeds the server.s max_model_len of 4096"):
        estimate_request("/v1/embeddings", {"model": "m", "input": "x"}, spec, Counted((5000,), 4096))
    with pytest.raises(InvalidRequestError, match=r"max_tokens.*4097 exceeds m's maximum output of 4096"):
        estimate_request("/v1/chat/completions", {**body, "max_tokens": 4097}, spec, Counted((40,), 4096))


@pytest.mark.integration  # a listening socket in the test process
def test_a_server_that_never_answers_is_given_up_after_the_timeout_with_one_warning() -> None:
    listener = socket.socket()  # accepts connections (the kernel's backlog) and never answers
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    account = Account("gpu", "openai-compatible", f"http://127.0.0.1:{port}", "b", tokenize="server")
    route = Route(account, "m", "m", generic_spec("m"))
    bodies = [{"model": "m", "messages": [{"role": "user", "content": f"hi {i}"}]} for i in range(50)]
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    logger = logging.getLogger("ratequeue.tokens.server")
    logger.addHandler(handler)
    counts = ServerCounts(timeout=0.5)
    try:
        started = time.monotonic()
        counts.prefetch([(route, "/v1/chat/completions", body) for body in bodies])
        assert counts.lookup(route, "/v1/chat/completions", bodies[7]) is None  # counted locally
        assert time.monotonic() - started < 2  # one probe waited for, not 50
    finally:
        counts.close()
        logger.removeHandler(handler)
        listener.close()
    assert [r.getMessage() for r in seen] == [
        f"account gpu: counting tokens with the local encoding cl100k_base, not the server's "
        f"http://127.0.0.1:{port}/tokenize: it did not answer within 0.5 s (asked again in 300 s)"]


@pytest.mark.parametrize(("status", "body", "reason", "refusal"), [
    (200, b'{"count": 7, "max_model_len": 8192, "tokens": []}', None, False),
    (404, b'{"detail": "Not Found"}', "it has no /tokenize (404)", False),  # FastAPI: no such path
    (405, b'{"detail": "Method Not Allowed"}', "it has no /tokenize (405)", False),
    (501, b"", "it has no /tokenize (501)", False),
    (500, b"oops", "it answered 500", False),
    (401, b'{"error": "Unauthorized"}', "it answered 401", False),
    (200, b"<html></html>", "its answer is not JSON", False),
    (200, b'{"count": "7"}', 'its answer has no integer "count"', False),
    (200, b"[7]", 'its answer has no integer "count"', False),
    (404, b'{"object": "error", "message": "The model `x` does not exist.", "code": 404}',
     "404: The model `x` does not exist.", True),  # vLLM: this model only
    (400, b'{"error": {"message": "bad role", "code": 400}}', "400: bad role", True),
    (422, b"{}", "422", True),
])
def test_what_an_answer_of_tokenize_says(status: int, body: bytes, reason: str | None, refusal: bool) -> None:
    assert failure(status, body) == reason
    assert refused(status, body) is refusal
