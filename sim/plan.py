"""Validate a request body and work out what it costs: prompt size, output budget, bucket charge."""

from __future__ import annotations

from typing import Any, NamedTuple

from ratequeue.sim import errors
from ratequeue.sim.config import ModelLimits, SimConfig
from ratequeue.sim.tokens import Prompt, PromptCounter

# Endpoint kind -> the body field holding the prompt (also what must be present).
PROMPT_FIELD = {"chat": "messages", "embeddings": "input", "responses": "input", "completions": "prompt"}
_MAX_FIELDS = {
    "chat": ("max_completion_tokens", "max_tokens"),
    "completions": ("max_tokens",),
    "responses": ("max_output_tokens",),
    "embeddings": (),
}


class RequestInvalid(Exception):
    """The request cannot run; carries the HTTP status and OpenAI error body to answer."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body["error"]["message"])
        self.status = status
        self.body = body


class Plan(NamedTuple):
    """A valid request, measured."""

    body: dict[str, Any]
    prompt: Prompt
    requested_max: int | None  # max_tokens / max_completion_tokens / max_output_tokens as sent
    output_cap: int  # most tokens one choice may produce when no max was sent
    choices: int  # outputs to generate (n x prompts; 0 for embeddings)
    charge: int  # tokens debited from the TPM bucket at arrival


def _int_param(body: dict[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    too_high = high is not None and isinstance(value, int) and value > high
    if isinstance(value, bool) or not isinstance(value, int) or value < low or too_high:
        bound = f"an integer between {low} and {high}" if high is not None else f"an integer >= {low}"
        raise RequestInvalid(400, errors.invalid_request(
            f"Invalid value for '{name}': expected {bound}, got {value!r}.", name, "invalid_value"))
    return value


def plan_request(kind: str, body: dict[str, Any], limits: ModelLimits, config: SimConfig,
                 counter: PromptCounter, missing_max_fills_context: bool = False) -> Plan:
    """Validate ``body`` for endpoint ``kind`` and measure it; raises RequestInvalid.

    ``missing_max_fills_context``: a request without a max is charged the rest of the context window
    per choice (prompt + that = the whole context), as Azure reserves it (docs/openai-facts.md).
    """
    field = PROMPT_FIELD[kind]
    value = body.get(field)
    if value is None or (isinstance(value, (list, str)) and not value and kind != "completions"):
        raise RequestInvalid(400, errors.invalid_request(
            f"Missing required parameter: '{field}'.", field, "missing_required_parameter"))
    if body.get("stream"):
        raise RequestInvalid(400, errors.invalid_request(
            "Streaming is not supported by ratequeue-sim; send stream: false.", "stream",
            "unsupported_value"))
    requested_max = None
    for name in _MAX_FIELDS[kind]:
        requested_max = _int_param(body, name, 1)
        if requested_max is not None:
            break
    n = (_int_param(body, "n", 1, 128) or 1) if kind in ("chat", "completions") else 1
    if kind == "embeddings":
        _int_param(body, "dimensions", 1, 8192)
        if body.get("encoding_format", "float") not in ("float", "base64"):
            raise RequestInvalid(400, errors.invalid_request(
                "Invalid value for 'encoding_format': expected 'float' or 'base64'.", "encoding_format",
                "invalid_value"))

    prompt = counter.count(kind, body, limits.encoding, config.prompt_estimate)
    # Embeddings and legacy completions judge each input against the window; chat the whole prompt.
    measured = prompt.largest if kind in ("embeddings", "completions") else prompt.tokens
    if measured > limits.context or (requested_max is not None and measured + requested_max > limits.context):
        body_ = errors.context_length_exceeded(limits.context, measured, requested_max, field)
        raise RequestInvalid(400, body_)

    choices = 0 if kind == "embeddings" else n * prompt.items
    if requested_max is None and missing_max_fills_context:
        allowance = max(0, limits.context - measured)
    else:
        allowance = _allowance(requested_max, limits, config)
    output_budget = _charged_choices(choices, n, config) * allowance
    charge = max(prompt.tokens, output_budget) if config.charge_rule == "max" else prompt.tokens + output_budget
    output_cap = max(1, min(limits.max_output, limits.context - measured))
    return Plan(body, prompt, requested_max, output_cap, choices, charge)


def _charged_choices(choices: int, n: int, config: SimConfig) -> int:
    """Choices the TPM charge counts: all of them, or one per prompt (a server that ignores n)."""
    return choices if config.charge_n or not choices else choices // n


def _allowance(requested_max: int | None, limits: ModelLimits, config: SimConfig) -> int:
    """Output tokens charged per choice: the max sent, else the server's default allowance."""
    if requested_max is not None:
        return requested_max
    return config.missing_max_charge if config.missing_max_charge is not None else limits.max_output
