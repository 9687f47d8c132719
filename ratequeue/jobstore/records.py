"""The Batch-format lines ratequeue writes, built in one place.

Output line:  {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error": null}
Error line:   {"id", "custom_id", "response": null, "error": {"code", "message", "line", "param"}}
An upstream error answer (e.g. a 400) is written as OpenAI's Batch API does: a ``response``
holding the status and body, in the errors output.
"""

from __future__ import annotations

import secrets
from typing import Any

import orjson


def _request_id() -> str:
    return f"batch_req_{secrets.token_hex(12)}"


def output_line(custom_id: str, status_code: int, request_id: str | None, body: Any,
                error: dict[str, Any] | None = None) -> bytes:
    """A Batch output line (JSON, no newline) for an upstream answer; ``error`` says more about an
    error answer than its body does at a glance (Azure's content filter: the categories that fired)."""
    return orjson.dumps(
        {
            "id": _request_id(),
            "custom_id": custom_id,
            "response": {"status_code": status_code, "request_id": request_id, "body": body},
            "error": error,
        }
    )


def error_line(
    custom_id: str | None,
    code: str,
    message: str,
    line: int | None = None,
    param: str | None = None,
    history: dict[str, Any] | None = None,
) -> bytes:
    """A Batch error line (JSON, no newline) for a request that could not be run.

    ``line`` is the 1-based input line, ``param`` the field at fault, ``history`` the attempts
    made (count, last status, last message) when a job failed after retries.
    """
    error: dict[str, Any] = {"code": code, "message": message, "line": line, "param": param}
    if history:
        error["history"] = history
    return orjson.dumps({"id": _request_id(), "custom_id": custom_id, "response": None, "error": error})
