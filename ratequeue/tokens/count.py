"""Token counts of requests (the charge they take is ``worker/estimate.py``).

Chat prompts follow OpenAI's "How to count tokens with tiktoken" formula: 3 tokens per message,
the tokens of every string field (role, content, name, tool_call_id, ...), 1 more per ``name``, and 3
that prime the reply. What the formula does not cover is estimated, and documented where it is:
images (a fixed count per image), tool definitions (their compact JSON; OpenAI does not publish how it
renders them, and JSON somewhat over-counts, the safe side for a limiter), audio and files (0).

Text is encoded with ``encode_ordinary``: user text may contain ``<|endoftext|>`` and is counted
as the plain text it is, never as a special token.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ratequeue.errors import InvalidRequestError
from ratequeue.tokens.encodings import Count, Encoder, text_counter

__all__ = [
    "count_chat_prompt",
    "count_completion_prompt",
    "count_embedding_input",
    "count_responses_input",
]

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
# An image part: 85 tokens at detail "low"; otherwise 765, the count of a 1024x1024 image at "high"
# (85 + 170 per 512px tile, 4 tiles). Larger or wider images cost more; this is an estimate.
IMAGE_TOKENS_LOW = 85
IMAGE_TOKENS_DEFAULT = 765
EMBEDDING_MAX_INPUTS = 2048  # inputs per /v1/embeddings request

_TEXT_PARTS = frozenset(("text", "input_text", "output_text"))
_IMAGE_PARTS = frozenset(("image_url", "input_image"))


def _bad(field: str, reason: str) -> InvalidRequestError:
    return InvalidRequestError(field, reason)


def _count_parts(parts: Any, count: Count, field: str) -> int:
    """Tokens of a content value: a string, None, or a list of content parts."""
    if isinstance(parts, str):
        return count(parts)
    if parts is None:
        return 0
    if not isinstance(parts, list):
        raise _bad(field, "must be a string, null or a list of content parts")
    total = 0
    for j, part in enumerate(parts):
        if not isinstance(part, Mapping):
            raise _bad(f"{field}[{j}]", "must be an object (a content part)")
        kind = part.get("type")
        if kind in _TEXT_PARTS:
            text = part.get("text")
            total += count(text) if isinstance(text, str) else 0
        elif kind in _IMAGE_PARTS:
            image = part.get("image_url")
            detail = image.get("detail") if isinstance(image, Mapping) else part.get("detail")
            total += IMAGE_TOKENS_LOW if detail == "low" else IMAGE_TOKENS_DEFAULT
        elif kind == "refusal":
            text = part.get("refusal")
            total += count(text) if isinstance(text, str) else 0
        # input_audio, file and unknown part types: no count is published; they count 0
    return total


def _count_call(call: Any, count: Count) -> int:
    """Tokens of a function call: its name and its arguments string."""
    if not isinstance(call, Mapping):
        return 0
    return sum(count(v) for v in (call.get("name"), call.get("arguments")) if isinstance(v, str))


_json_counts: dict[tuple[int, str], int] = {}


def _count_definitions(definitions: Any, count: Count) -> int:
    """Tokens of tool/function definitions, approximated as their compact JSON (OpenAI's real
    rendering is unpublished). Memoised per definition: batch jobs repeat the same tools."""
    if not isinstance(definitions, list):
        return 0
    total = 0
    for definition in definitions:
        text = json.dumps(definition, separators=(",", ":"), ensure_ascii=False, default=str)
        key = (id(count), text)
        n = _json_counts.get(key)
        if n is None:
            n = count(text)
            if len(_json_counts) < 4096:
                _json_counts[key] = n
        total += n
    return total


def count_chat_prompt(body: Mapping[str, Any], enc: Encoder) -> int:
    """Prompt tokens of a /v1/chat/completions body (messages, tools, functions).

    Raises InvalidRequestError if messages is missing or empty, a message is not an object, or a
    content or tool_calls value has an impossible type.
    """
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("body.messages", "must be a non-empty list of messages")
    count = text_counter(enc)
    total = REPLY_PRIMING
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise _bad(f"body.messages[{i}]", "must be an object")
        total += TOKENS_PER_MESSAGE
        for key, value in message.items():
            if isinstance(value, str):
                total += count(value)
                if key == "name":
                    total += TOKENS_PER_NAME
            elif value is None:
                continue
            elif key == "content":
                total += _count_parts(value, count, f"body.messages[{i}].content")
            elif key == "tool_calls":
                if not isinstance(value, list):
                    raise _bad(f"body.messages[{i}].tool_calls", "must be a list")
                for call in value:
                    total += _count_call(call.get("function") if isinstance(call, Mapping) else None, count)
            elif key == "function_call":
                total += _count_call(value, count)
            # other structured fields (audio: {id}) hold no prompt text
    return (
        total
        + _count_definitions(body.get("tools"), count)
        + _count_definitions(body.get("functions"), count)
    )


def count_responses_input(body: Mapping[str, Any], enc: Encoder) -> int:
    """Prompt tokens of a /v1/responses body: `instructions`, `input` (a string or a list of items
    counted like chat messages) and `tools`. Raises InvalidRequestError for an impossible input type."""
    count = text_counter(enc)
    total = REPLY_PRIMING
    instructions = body.get("instructions")
    if isinstance(instructions, str):  # sent as a system message
        total += TOKENS_PER_MESSAGE + 1 + count(instructions)
    items = body.get("input")
    if isinstance(items, str):  # one user message
        total += TOKENS_PER_MESSAGE + 1 + count(items)
    elif isinstance(items, list):
        for i, item in enumerate(items):
            if not isinstance(item, Mapping):
                raise _bad(f"body.input[{i}]", "must be an object")
            total += TOKENS_PER_MESSAGE
            kind = item.get("type", "message")
            if kind == "message":
                role = item.get("role")
                total += count(role) if isinstance(role, str) else 0
                total += _count_parts(item.get("content"), count, f"body.input[{i}].content")
            elif kind == "function_call":
                total += _count_call(item, count)
            elif kind == "function_call_output":
                output = item.get("output")
                total += count(output) if isinstance(output, str) else 0
            # reasoning, item_reference and built-in tool calls: nothing countable is published
    elif items is not None:
        raise _bad("body.input", "must be a string or a list of input items")
    return total + _count_definitions(body.get("tools"), count)


def count_completion_prompt(body: Mapping[str, Any], enc: Encoder) -> list[int]:
    """Tokens of each prompt of a /v1/completions body (a string, a list of strings, a token-id
    list or a list of token-id lists). Raises InvalidRequestError for another type."""
    prompt = body.get("prompt")
    if prompt is None:  # the API's default prompt is "<|endoftext|>": one token
        return [1]
    return _count_inputs(prompt, text_counter(enc), "body.prompt", allow_empty=True)


def count_embedding_input(body: Mapping[str, Any], enc: Encoder) -> list[int]:
    """Tokens of each input of a /v1/embeddings body (a string, a list of strings, a token-id list
    or a list of token-id lists). Raises InvalidRequestError if input is missing, empty or mistyped."""
    if body.get("input") is None:
        raise _bad("body.input", "is required")
    return _count_inputs(body["input"], text_counter(enc), "body.input", allow_empty=False)


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(type(t) is int and t >= 0 for t in value)


def _count_inputs(value: Any, count: Count, field: str, *, allow_empty: bool) -> list[int]:
    if isinstance(value, str):
        if not value and not allow_empty:
            raise _bad(field, "must not be empty")
        return [count(value)]
    if not isinstance(value, list) or (not value and not allow_empty):
        raise _bad(field, "must be a non-empty string or a non-empty list")
    if value and type(value[0]) is int:  # one prompt given as token ids
        if not _is_token_ids(value):
            raise _bad(field, "a list of token ids must hold only integers >= 0")
        return [len(value)]
    if not allow_empty and len(value) > EMBEDDING_MAX_INPUTS:
        raise _bad(field, f"holds {len(value)} inputs; at most {EMBEDDING_MAX_INPUTS} are allowed")
    counts = []
    for j, item in enumerate(value):
        if isinstance(item, str):
            counts.append(count(item))
        elif _is_token_ids(item):
            counts.append(len(item))
        else:
            raise _bad(f"{field}[{j}]", "must be a string or a list of token ids")
        if counts[-1] == 0 and not allow_empty:
            raise _bad(f"{field}[{j}]", "must not be empty")
    return counts
