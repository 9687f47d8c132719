"""The error tree of ratequeue. Every error the project raises derives from one root.

    RatequeueError
    ├── ConfigError               bad settings or model table
    ├── UnknownModelError         a model that is not in the model table
    ├── InvalidRequestError       a request body that can be known to fail (names field and reason)
    │   └── RequestTooLargeError  a request whose charge can never fit the model's TPM limit
    ├── UpstreamError             the upstream API answered with an error (carries status and body)
    ├── UpstreamUnusableError     before any paid call: key refused or server unreachable
    ├── UsageError                an argument that cannot be used (a path that cannot be written,
    │                             an input with no requests)
    ├── BatchError                a batch file or batch id that cannot be used
    │   ├── BatchNotFoundError
    │   └── BatchRunningError     a batch that has not ended cannot be deleted without force
    └── RedisFullError            Redis is at its maxmemory: a batch was refused whole
"""

from __future__ import annotations

from typing import Any


class RatequeueError(Exception):
    """Root of every error ratequeue raises."""


class ConfigError(RatequeueError):
    """A setting or the model table is invalid."""


class UnknownModelError(RatequeueError):
    """The model is not in the model table."""

    def __init__(self, model: str) -> None:
        super().__init__(f"unknown model {model!r}: add it to the model table (RATEQUEUE_MODELS_FILE)")
        self.model = model


class InvalidRequestError(RatequeueError):
    """A request that can be known to fail before any upstream call.

    `field` is a dotted path into the request (``body.messages[2].content``), `code` a short
    machine-readable reason in OpenAI's style (``invalid_request``, ``context_length_exceeded``).
    """

    def __init__(self, field: str, reason: str, code: str = "invalid_request") -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
        self.code = code


class RequestTooLargeError(InvalidRequestError):
    """The request's rate-limit charge exceeds the model's TPM limit: it can never be admitted."""

    def __init__(self, charge: int, tpm: float, model: str) -> None:
        super().__init__(
            "body",
            f"request too large for {model}: it charges {charge} tokens but the limit is {int(tpm)} TPM",
            code="request_too_large",
        )
        self.charge = charge
        self.tpm = tpm


class UpstreamError(RatequeueError):
    """The upstream API answered with an error status."""

    def __init__(self, status: int, message: str, code: str | None = None, body: Any = None) -> None:
        super().__init__(f"upstream {status}: {message}")
        self.status = status
        self.message = message
        self.code = code
        self.body = body


class UsageError(RatequeueError):
    """An argument that cannot be used: a path that cannot be written, an input with no requests."""


class BatchError(RatequeueError):
    """A batch file or batch id that cannot be used."""


class BatchNotFoundError(BatchError):
    """No batch has this id."""


class BatchRunningError(BatchError):
    """A batch that has not ended cannot be deleted without ``force``."""


class RedisFullError(RatequeueError):
    """Redis is at (or too near) its ``maxmemory``: the batch was refused and nothing of it kept."""


class UpstreamUnusableError(RatequeueError):
    """Checked before any paid call: the upstream refused the API key, or cannot be reached."""
