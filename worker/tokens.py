"""Token counts of requests and the rate-limit charge they take when sent.

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
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from config.models import ModelSpec
from worker.encodings import Count, Encoder, get_encoding, text_counter
from worker.errors import InvalidRequestError

__all__ = [
    "Estimate",
    "count_chat_prompt",
    "count_completion_prompt",
    "count_embedding_input",
    "count_responses_input",
    "endpoint_path",
    "estimate_request",
]

log = logging.getLogger(__name__)

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
# An image part: 85 tokens at detail "low"; otherwise 765, the count of a 1024x1024 image at "high"
# (85 + 170 per 512px tile, 4 tiles). Larger or wider images cost more; this is an estimate.
IMAGE_TOKENS_LOW = 85
IMAGE_TOKENS_DEFAULT = 765
# /v1/completions produces 16 tokens when max_tokens is not set (OpenAI's API reference).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
EMBEDDING_MAX_INPUTS = 2048  # inputs per /v1/embeddings request

_KINDS = ("chat/completions", "responses", "completions", "embeddings")
ENDPOINTS = {f"/v1/{kind}": kind.split("/")[0] for kind in _KINDS}  # path -> endpoint
_TEXT_PARTS = frozenset(("text", "input_text", "output_text"))
_IMAGE_PARTS = frozenset(("image_url", "input_image"))

_warned_defaulted: set[str] = set()  # models whose defaulted max output was already logged


@dataclass(frozen=True, slots=True)
class Estimate:
    """A request's tokens: `charge` is what the TPM bucket is charged when the request is sent."""

    prompt_tokens: int
    output_tokens: int  # n x the max output reserved
    output_defaulted: bool  # no max in the request: the model's max (16 for /v1/completions) reserved
    charge: int


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


def _positive_int(body: Mapping[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if type(value) is not int or value < 1:
        raise _bad(f"body.{key}", f"must be a positive integer, got {value!r}")
    return value


def _too_long(tokens: int, spec: ModelSpec, field: str = "body", what: str = "the prompt") -> Exception:
    reason = f"{what} of {tokens} tokens exceeds the context window of {spec.context_window} of {spec.name}"
    return InvalidRequestError(field, reason, code="context_length_exceeded")


def _warn_defaulted(spec: ModelSpec, max_key: str) -> None:
    if spec.name not in _warned_defaulted:  # once per model and process: batches repeat the omission
        _warned_defaulted.add(spec.name)
        log.warning(
            "%s: requests without %s reserve the model's maximum output (%d tokens per choice) against "
            "its TPM limit; setting max_tokens raises throughput",
            spec.name,
            max_key,
            spec.max_output_tokens,
        )


def endpoint_path(url: str) -> str:
    """`url` as a path such as ``/v1/chat/completions``: query dropped, ``/v1`` added if missing."""
    path = "/" + url.split("?", 1)[0].strip("/")
    return path if path.startswith("/v1/") else "/v1" + path


def estimate_request(url: str, body: Mapping[str, Any], spec: ModelSpec) -> Estimate:
    """Prompt tokens, reserved output tokens and TPM charge of one request to `spec`'s model.

    The output reserved is n x (max_completion_tokens or max_tokens, or max_output_tokens for
    /v1/responses); with none set, the model's max_output_tokens (capped by what the prompt leaves
    of the context window) is reserved and a warning is logged once per model. The charge follows
    spec.charge_rule: "sum" = prompt + output, "max" = max(prompt, output); embeddings charge the prompt.

    Raises InvalidRequestError naming the field (code ``context_length_exceeded`` when too long).
    """
    path = endpoint_path(url)
    endpoint = ENDPOINTS.get(path)
    if endpoint is None:
        raise _bad("url", f"unsupported endpoint {path!r} (supported: {', '.join(ENDPOINTS)})")
    if path not in spec.endpoints:
        raise _bad("url", f"{spec.name} is not served at {path} (allowed: {', '.join(spec.endpoints)})")
    if not isinstance(body, Mapping):
        raise _bad("body", "must be an object")
    enc = get_encoding(spec.encoding)

    if endpoint == "embeddings":
        counts = count_embedding_input(body, enc)
        for j, tokens in enumerate(counts):
            if tokens > spec.context_window:
                field = "body.input" if len(counts) == 1 else f"body.input[{j}]"
                raise _too_long(tokens, spec, field, "the input")
        prompt = sum(counts)
        return Estimate(prompt, 0, output_defaulted=False, charge=prompt)

    n = 1
    if endpoint == "responses":
        prompts = [count_responses_input(body, enc)]
        max_key = "max_output_tokens"
    elif endpoint == "completions":
        prompts = count_completion_prompt(body, enc)
        max_key = "max_tokens"
        best_of = _positive_int(body, "best_of")  # best_of completions are generated server-side
        n = max(_positive_int(body, "n") or 1, best_of or 1)
    else:
        prompts = [count_chat_prompt(body, enc)]
        max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        _positive_int(body, "max_tokens")  # validated even when max_completion_tokens wins
        n = _positive_int(body, "n") or 1
    explicit = _positive_int(body, max_key)
    longest = max(prompts, default=0)
    if explicit is not None:
        if explicit > spec.max_output_tokens:
            limit = spec.max_output_tokens
            raise _bad(f"body.{max_key}", f"{explicit} exceeds {spec.name}'s maximum output of {limit}")
        if longest + explicit > spec.context_window:
            raise _too_long(longest + explicit, spec, what=f"the prompt plus {max_key}={explicit}")
        per_choice = explicit
    else:
        if longest > spec.context_window:
            raise _too_long(longest, spec)
        if endpoint == "completions":
            cap = COMPLETIONS_DEFAULT_MAX_TOKENS
        else:
            cap = spec.max_output_tokens
            _warn_defaulted(spec, max_key)
        # The reply can never outgrow what the prompt leaves of the context window.
        per_choice = min(cap, spec.context_window - longest)

    prompt = sum(prompts)
    output = n * per_choice * len(prompts)
    charge = prompt + output if spec.charge_rule == "sum" else max(prompt, output)
    return Estimate(prompt, output, output_defaulted=explicit is None, charge=charge)
