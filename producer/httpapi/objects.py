"""What the API answers, in OpenAI's shapes: the error body and the Batch object."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from ratequeue.producer.collect import FINAL_STATUSES
from ratequeue.producer.httpapi.files import ERRORS_PREFIX, OUTPUT_PREFIX

# The Batch object's fields, in OpenAI's order; ratequeue's extras (cost_usd, paused) follow them.
_TIMES = ("created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at",
          "expired_at", "cancelling_at", "cancelled_at")


class ApiError(Exception):
    """An answer other than 2xx, as OpenAI words them: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def not_found(kind: str, object_id: str) -> ApiError:
    """404 for a missing object and for another tenant's alike (existence is not told)."""
    return ApiError(404, f"No such {kind} object: {object_id}", param="id", code="not_found")


def invalid(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


def openai_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """ratequeue's Batch object (``collect.batch_object``) in OpenAI's shape: its usage as
    input/output tokens, and the output and error file ids once the batch has ended with lines of
    each kind (OpenAI's files are written at the end too). Keeps ratequeue's ``cost_usd`` and
    ``paused``; drops the per-model breakdown (``ratequeue status`` shows it)."""
    counts = batch["request_counts"]
    ended = batch["status"] in FINAL_STATUSES
    usage = batch["usage"]
    return {
        "id": batch["id"],
        "object": "batch",
        "endpoint": batch["endpoint"],
        "errors": None,
        "input_file_id": batch["input_file_id"],
        "completion_window": batch["completion_window"],
        "status": batch["status"],
        "output_file_id": OUTPUT_PREFIX + batch["id"] if ended and counts["completed"] else None,
        "error_file_id": ERRORS_PREFIX + batch["id"] if ended and counts["failed"] else None,
        **{name: batch.get(name) for name in _TIMES},
        "request_counts": counts,
        "metadata": batch["metadata"] or None,
        "usage": {
            "input_tokens": usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": usage["cached_tokens"]},
            "output_tokens": usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"],
        },
        "cost_usd": batch["cost_usd"],
        "paused": batch["paused"],
    }
