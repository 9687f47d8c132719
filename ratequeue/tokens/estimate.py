"""What one request charges against its model's limits: prompt tokens, reserved output, charge.

The output reserved is what OpenAI reserves: n x (max_completion_tokens or max_tokens, or
max_output_tokens for /v1/responses), or the model's maximum when none is set. The charge follows
the model's configured charge rule (config/charge.py): the starting guess; the workers price a job
again by the rule learned from the server when they send it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ratequeue.config.models import ModelSpec
from ratequeue.errors import InvalidRequestError
from ratequeue.tokens.count import (
    count_chat_prompt,
    count_completion_prompt,
    count_embedding_input,
    count_responses_input,
)
from ratequeue.tokens.encodings import get_encoding

__all__ = ["ENDPOINTS", "Counted", "Estimate", "endpoint_path", "estimate_request"]

log = logging.getLogger(__name__)

# /v1/completions produces 16 tokens when max_tokens is not set (OpenAI's API reference).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
_KINDS = ("chat/completions", "responses", "completions", "embeddings")
ENDPOINTS = {f"/v1/{kind}": kind.split("/")[0] for kind in _KINDS}  # path -> endpoint

_warned_defaulted: set[str] = set()  # models whose defaulted max output was already logged


def _bad(field: str, reason: str) -> InvalidRequestError:
    return InvalidRequestError(field, reason)


@dataclass(frozen=True, slots=True)
class Estimate:
    """A request's tokens: `charge` is what the TPM bucket is charged when the request is sent."""

    prompt_tokens: int
    output_tokens: int  # n x the max output reserved
    output_defaulted: bool  # no max in the request: the model's max (16 for /v1/completions) reserved
    charge: int


@dataclass(frozen=True, slots=True)
class Counted:
    """Prompt tokens counted elsewhere (a server's ``/tokenize``): one count per prompt (per input of an
    embeddings request), and the server's ``max_model_len`` (None: it gave none)."""

    prompts: tuple[int, ...]
    max_model_len: int | None = None


class _ShapesOnly:
    """An encoder that counts any text as one token: the count functions then only check a request's
    fields (raising their errors) when a server has counted its tokens."""

    def encode_ordinary(self, text: str) -> list[int]:
        return [0] if text else []


_SHAPES_ONLY = _ShapesOnly()


def _served_by(spec: ModelSpec, max_model_len: int) -> ModelSpec:
    """`spec` with the server's context length: a generic spec's output may fill it (as before)."""
    fills = spec.max_output_tokens >= spec.context_window
    output = max_model_len if fills else min(spec.max_output_tokens, max_model_len)
    return dataclasses.replace(spec, context_window=max_model_len, max_output_tokens=output)


def _positive_int(body: Mapping[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if type(value) is not int or value < 1:
        raise _bad(f"body.{key}", f"must be a positive integer, got {value!r}")
    return value


def _too_long(tokens: int, spec: ModelSpec, field: str = "body", what: str = "the prompt",
              limit: str = "the context window") -> Exception:
    reason = f"{what} of {tokens} tokens exceeds {limit} of {spec.context_window} of {spec.name}"
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


def estimate_request(url: str, body: Mapping[str, Any], spec: ModelSpec, counted: Counted | None = None) -> Estimate:
    """Prompt tokens, reserved output tokens and TPM charge of one request to `spec`'s model.

    The output reserved is n x (max_completion_tokens or max_tokens, or max_output_tokens for
    /v1/responses); with none set, the model's max_output_tokens (capped by what the prompt leaves
    of the context window) is reserved and a warning is logged once per model. The charge follows
    spec.rule (config/charge.py): "sum" = prompt + output, "max" = max(prompt, output); embeddings charge the prompt.

    `counted`: the prompt counts of the server that will serve it (the local encoding counts without
    it), whose ``max_model_len`` then stands for the context window.

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
    bound = "the context window"
    if counted is not None and counted.max_model_len:
        spec, bound = _served_by(spec, counted.max_model_len), "the server's max_model_len"
    enc = get_encoding(spec.encoding) if counted is None else _SHAPES_ONLY

    if endpoint == "embeddings":
        counts = count_embedding_input(body, enc)
        counts = list(counted.prompts) if counted is not None else counts
        for j, tokens in enumerate(counts):
            if tokens > spec.context_window:
                field = "body.input" if len(counts) == 1 else f"body.input[{j}]"
                raise _too_long(tokens, spec, field, "the input", bound)
        prompt = sum(counts)
        return Estimate(prompt, 0, output_defaulted=False, charge=prompt)

    n = 1
    if endpoint == "responses":  # no server counts these (vLLM's /tokenize takes messages or a prompt)
        prompts = [count_responses_input(body, get_encoding(spec.encoding))]
        max_key = "max_output_tokens"
    elif endpoint == "completions":
        prompts = count_completion_prompt(body, enc)
        prompts = list(counted.prompts) if counted is not None else prompts
        max_key = "max_tokens"
        best_of = _positive_int(body, "best_of")  # best_of completions are generated server-side
        n = max(_positive_int(body, "n") or 1, best_of or 1)
    else:
        prompts = [count_chat_prompt(body, enc)]
        prompts = [sum(counted.prompts)] if counted is not None else prompts
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
            raise _too_long(longest + explicit, spec, what=f"the prompt plus {max_key}={explicit}", limit=bound)
        per_choice = explicit
    else:
        if longest > spec.context_window:
            raise _too_long(longest, spec, limit=bound)
        if endpoint == "completions":
            cap = COMPLETIONS_DEFAULT_MAX_TOKENS
        else:
            cap = spec.max_output_tokens
            _warn_defaulted(spec, max_key)
        # The reply can never outgrow what the prompt leaves of the context window.
        per_choice = min(cap, spec.context_window - longest)

    prompt = sum(prompts)
    output = n * per_choice * len(prompts)
    defaulted = explicit is None and endpoint != "completions"  # 16 tokens there: the server's documented default
    charge = spec.rule.price(prompt, output, n, defaulted)
    return Estimate(prompt, output, output_defaulted=explicit is None, charge=charge)
