"""OpenAI error bodies, worded as the real API words them (see docs/openai-facts.md)."""

from __future__ import annotations

from typing import Any

_RATE_LIMITS_URL = "https://platform.openai.com/account/rate-limits"
_KIND_TEXT = {"tokens": "tokens per min (TPM)", "requests": "requests per min (RPM)"}


def error_body(
    message: str, type_: str, code: str | int | None = None, param: str | None = None
) -> dict[str, Any]:
    """The ``{"error": {...}}`` envelope every OpenAI error uses."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def rate_limited(
    model: str, org: str, kind: str, limit: int, used: int, requested: int, wait: str
) -> dict[str, Any]:
    """429 for a refused bucket; ``kind`` is "tokens" or "requests", ``wait`` a Go-style duration."""
    return error_body(
        f"Rate limit reached for {model} in organization {org} on {_KIND_TEXT[kind]}: Limit {limit}, "
        f"Used {used}, Requested {requested}. Please try again in {wait}. "
        f"Visit {_RATE_LIMITS_URL} to learn more.",
        kind,
        "rate_limit_exceeded",
    )


def request_too_large(model: str, org: str, limit: int, requested: int) -> dict[str, Any]:
    """429 for a request larger than the whole TPM limit: permanent, never worth a retry."""
    return error_body(
        f"Request too large for {model} in organization {org} on tokens per min (TPM): Limit {limit}, "
        f"Requested {requested}. The input or output tokens must be reduced in order to run successfully. "
        f"Visit {_RATE_LIMITS_URL} to learn more.",
        "tokens",
        "rate_limit_exceeded",
    )


def insufficient_quota() -> dict[str, Any]:
    """429 once the configured spend is used up: not a rate limit, never worth a retry."""
    return error_body(
        "You exceeded your current quota, please check your plan and billing details. "
        "For more information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors.",
        "insufficient_quota",
        "insufficient_quota",
    )


def context_length_exceeded(context: int, prompt: int, completion: int | None, field: str) -> dict[str, Any]:
    """400 for a prompt (plus requested completion) over the model's context window."""
    if completion is None:
        message = (
            f"This model's maximum context length is {context} tokens. However, your {field} resulted in "
            f"{prompt} tokens. Please reduce the length of the {field}."
        )
    else:
        message = (
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt + completion} tokens ({prompt} in the {field}, {completion} in the completion). "
            f"Please reduce the length of the {field} or completion."
        )
    return error_body(message, "invalid_request_error", "context_length_exceeded", field)


def invalid_api_key(masked: str | None) -> dict[str, Any]:
    """401; ``masked`` is the sent key already masked (``sk-...abcd``), None when no key was sent."""
    if masked is None:
        message = (
            "You didn't provide an API key. You need to provide your API key in an Authorization header "
            "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY). You can obtain an API key from "
            "https://platform.openai.com/account/api-keys."
        )
    else:
        message = (
            f"Incorrect API key provided: {masked}. You can find your API key at "
            "https://platform.openai.com/account/api-keys."
        )
    return error_body(message, "invalid_request_error", "invalid_api_key")


def model_not_found(model: str) -> dict[str, Any]:
    """404 for a model the simulator was not told about (``--strict-models``)."""
    return error_body(
        f"The model `{model}` does not exist or you do not have access to it.",
        "invalid_request_error",
        "model_not_found",
        "model",
    )


def invalid_json() -> dict[str, Any]:
    """400 for a body that is not a JSON object."""
    return error_body(
        "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
        "your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not "
        "valid JSON.)",
        "invalid_request_error",
    )


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """400 for a missing or wrong parameter."""
    return error_body(message, "invalid_request_error", code, param)


SERVER_ERRORS: dict[int, dict[str, Any]] = {
    500: error_body(
        "The server had an error while processing your request. Sorry about that!", "server_error"
    ),
    502: error_body("Bad gateway.", "cf_bad_gateway", 502),
    503: error_body(
        "That model is currently overloaded with other requests. You can retry your request, or contact us "
        "through our help center at help.openai.com if the error persists.",
        "server_error",
    ),
}
