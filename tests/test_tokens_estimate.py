"""worker.estimate.estimate_request: output reservation, charge rules, validation, context checks."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from ratequeue.config.models import ModelSpec, ModelTable, load_model_table_from
from ratequeue.errors import InvalidRequestError
from ratequeue.tokens import estimate
from ratequeue.tokens.count import count_chat_prompt
from ratequeue.tokens.encodings import count_text, ensure_offline_encodings, get_encoding
from ratequeue.tokens.estimate import Estimate, endpoint_path, estimate_request

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module", autouse=True)
def _offline_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path_factory.mktemp("tiktoken")))
        ensure_offline_encodings()
        yield


@pytest.fixture(scope="module")
def table() -> ModelTable:
    return load_model_table_from()


@pytest.fixture(autouse=True)
def _fresh_warnings() -> Iterator[None]:
    estimate._warned_defaulted.clear()
    yield
    estimate._warned_defaulted.clear()


def _body(text: str = "hello world", **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}


def _prompt(spec: ModelSpec, text: str = "hello world") -> int:
    return count_chat_prompt(_body(text), get_encoding(spec.encoding))


def test_endpoint_path() -> None:
    assert endpoint_path("/v1/chat/completions") == CHAT
    assert endpoint_path("/chat/completions") == CHAT
    assert endpoint_path("v1/embeddings/") == "/v1/embeddings"
    assert endpoint_path("/v1/responses?stream=false") == "/v1/responses"


def test_explicit_max_tokens_sum_rule(table: ModelTable) -> None:
    spec = table.get("gpt-4o-mini")
    prompt = _prompt(spec)
    assert prompt == 3 + 1 + 2 + 3  # message, "user", "hello world", priming
    est = estimate_request(CHAT, _body(max_tokens=300), spec)
    assert est == Estimate(
        prompt_tokens=prompt, output_tokens=300, output_defaulted=False, charge=prompt + 300
    )


def test_n_multiplies_the_reserved_output(table: ModelTable) -> None:
    spec = table.get("gpt-4o-mini")
    est = estimate_request(CHAT, _body(max_tokens=300, n=3), spec)
    assert (est.output_tokens, est.charge) == (900, est.prompt_tokens + 900)


def test_max_completion_tokens_wins_over_max_tokens(table: ModelTable) -> None:
    est = estimate_request(CHAT, _body(max_tokens=300, max_completion_tokens=50), table.get("o4-mini"))
    assert est.output_tokens == 50


def test_max_charge_rule(table: ModelTable) -> None:
    spec = dataclasses.replace(table.get("gpt-4o-mini"), charge_rule="max")
    small = estimate_request(CHAT, _body(max_tokens=300), spec)
    assert small.charge == 300  # max(9, 300)
    long_text = "word " * 2000
    big = estimate_request(CHAT, _body(long_text, max_tokens=10), spec)
    assert big.charge == big.prompt_tokens > 10


def test_defaulted_output_reserves_the_model_maximum_and_warns_once(
    table: ModelTable, caplog: pytest.LogCaptureFixture
) -> None:
    spec = table.get("gpt-4o-mini")
    with caplog.at_level(logging.WARNING, logger="ratequeue.tokens.estimate"):
        first = estimate_request(CHAT, _body(), spec)
        second = estimate_request(CHAT, _body(n=2), spec)
        estimate_request(CHAT, _body(), table.get("gpt-4o"))
    assert first.output_defaulted and first.output_tokens == 16384
    assert first.charge == first.prompt_tokens + 16384
    assert second.output_tokens == 2 * 16384
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2  # once per model
    assert "gpt-4o-mini" in messages[0] and "max_tokens" in messages[0] and "throughput" in messages[0]


def test_defaulted_output_is_capped_by_what_the_prompt_leaves(table: ModelTable) -> None:
    spec = table.get("gpt-4")  # 8192 window, 8192 max output
    est = estimate_request(CHAT, _body("word " * 1000), spec)
    assert est.output_tokens == 8192 - est.prompt_tokens and est.charge == 8192


def test_embeddings_charge_the_prompt(table: ModelTable) -> None:
    spec = table.get("text-embedding-3-small")
    est = estimate_request("/v1/embeddings", {"input": ["hello world", [1, 2, 3]]}, spec)
    assert est == Estimate(prompt_tokens=5, output_tokens=0, output_defaulted=False, charge=5)


def test_completions(table: ModelTable) -> None:
    spec = dataclasses.replace(table.get("gpt-3.5-turbo"), endpoints=("/v1/completions",))
    est = estimate_request(
        "/v1/completions", {"prompt": ["hello world", "get_weather"], "max_tokens": 10}, spec
    )
    assert (est.prompt_tokens, est.output_tokens) == (4, 20)  # each prompt gets its own completion
    default = estimate_request("/v1/completions", {"prompt": "hello world", "n": 2, "best_of": 3}, spec)
    assert (default.output_tokens, default.output_defaulted) == (3 * 16, True)  # API default of 16


def test_responses(table: ModelTable) -> None:
    spec = table.get("gpt-4.1-mini")
    est = estimate_request("/v1/responses", {"input": "hello world", "max_output_tokens": 100}, spec)
    assert (est.prompt_tokens, est.output_tokens) == (3 + 3 + 1 + 2, 100)
    with pytest.raises(InvalidRequestError) as info:
        estimate_request("/v1/responses", {"input": "x", "max_output_tokens": 0}, spec)
    assert info.value.field == "body.max_output_tokens"


def test_tools_are_in_the_charge(table: ModelTable) -> None:
    spec = table.get("gpt-4o-mini")
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    plain = estimate_request(CHAT, _body(max_tokens=5), spec)
    with_tool = estimate_request(CHAT, _body(max_tokens=5, tools=[tool]), spec)
    assert with_tool.prompt_tokens > plain.prompt_tokens


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"max_tokens": 0}, "body.max_tokens"),
        ({"max_tokens": -5}, "body.max_tokens"),
        ({"max_tokens": "100"}, "body.max_tokens"),
        ({"max_tokens": 1.5}, "body.max_tokens"),
        ({"max_tokens": True}, "body.max_tokens"),
        ({"max_completion_tokens": 0}, "body.max_completion_tokens"),
        ({"max_completion_tokens": 10, "max_tokens": "x"}, "body.max_tokens"),
        ({"n": 0}, "body.n"),
        ({"n": "2"}, "body.n"),
        ({"max_tokens": 20000}, "body.max_tokens"),  # above gpt-4o-mini's 16384
    ],
)
def test_validation_names_the_field(table: ModelTable, extra: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        estimate_request(CHAT, _body(**extra), table.get("gpt-4o-mini"))
    assert info.value.field == field and info.value.code == "invalid_request"


def test_null_limits_count_as_unset(table: ModelTable) -> None:
    est = estimate_request(
        CHAT, _body(max_tokens=None, n=None, max_completion_tokens=None), table.get("gpt-4o")
    )
    assert est.output_defaulted and est.output_tokens == 16384


@pytest.mark.parametrize(
    ("url", "body", "field"),
    [
        (CHAT, {"messages": []}, "body.messages"),
        (CHAT, {"messages": [{"role": "user", "content": "a"}, 3]}, "body.messages[1]"),
        (CHAT, [1, 2], "body"),
        ("/v1/images/generations", {}, "url"),
        ("/v1/embeddings", {"input": "x"}, "url"),  # gpt-4o-mini does not serve embeddings
    ],
)
def test_request_shape_errors(table: ModelTable, url: str, body: Any, field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        estimate_request(url, body, table.get("gpt-4o-mini"))
    assert info.value.field == field


def test_embedding_errors(table: ModelTable) -> None:
    spec = table.get("text-embedding-3-small")
    cases: list[tuple[dict[str, Any], str]] = [({}, "body.input"), ({"input": []}, "body.input")]
    for body, field in [*cases, ({"input": ""}, "body.input")]:
        with pytest.raises(InvalidRequestError) as info:
            estimate_request("/v1/embeddings", body, spec)
        assert info.value.field == field
    with pytest.raises(InvalidRequestError) as info:
        estimate_request("/v1/embeddings", {"input": ["ok", [1] * 8192]}, spec)
    assert (info.value.field, info.value.code) == ("body.input[1]", "context_length_exceeded")
    assert "8192 tokens exceeds the context window of 8191" in str(info.value)


def test_context_length_exceeded_with_explicit_max(table: ModelTable) -> None:
    spec = table.get("gpt-4")  # 8192 tokens
    prompt = _prompt(spec, "word " * 5000)
    assert 5000 <= prompt < 8192
    with pytest.raises(InvalidRequestError) as info:
        estimate_request(CHAT, _body("word " * 5000, max_tokens=4000), spec)
    err = info.value
    assert (err.field, err.code) == ("body", "context_length_exceeded")
    assert f"{prompt + 4000} tokens exceeds the context window of 8192" in err.reason
    fits = estimate_request(CHAT, _body("word " * 5000, max_tokens=8192 - prompt), spec)
    assert fits.charge == 8192


def test_context_length_exceeded_by_the_prompt_alone(table: ModelTable) -> None:
    spec = table.get("gpt-4")
    with pytest.raises(InvalidRequestError) as info:
        estimate_request(CHAT, _body("word " * 9000), spec)
    assert info.value.code == "context_length_exceeded"
    assert "exceeds the context window of 8192" in info.value.reason


def test_special_tokens_in_user_text(table: ModelTable) -> None:
    spec = table.get("gpt-4o-mini")
    est = estimate_request(CHAT, _body("<|endoftext|>", max_tokens=1), spec)
    assert est.prompt_tokens == 3 + 1 + count_text("<|endoftext|>", get_encoding("o200k_base")) + 3
