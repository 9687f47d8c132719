"""ratequeue: a rate-limit-aware batch job queue for OpenAI-style APIs.

    from ratequeue import Client, submit_batch, wait, iter_results

    batch = submit_batch("prompts.jsonl")            # stored in Redis before it returns
    wait(batch.batch_id)                             # until completed / cancelled / expired
    for line in iter_results(batch.batch_id): ...    # Batch output lines, input order

The names below are the public API; ``tests/test_public_api.py`` keeps ``__all__`` complete and
sorted. The producer's API is loaded on first use, not on ``import ratequeue``: a worker, the
simulator or a service importing one submodule does not pay for the rest.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ratequeue.errors import (
    BatchError,
    BatchNotFoundError,
    BatchRunningError,
    ConfigError,
    InvalidRequestError,
    RatequeueError,
    RedisFullError,
    RequestTooLargeError,
    UnknownModelError,
    UpstreamError,
    UpstreamUnusableError,
    UsageError,
)

if TYPE_CHECKING:
    from ratequeue.producer.api import (
        Client,
        LineError,
        iter_results,
        status,
        submit_batch,
        submit_job,
        wait,
    )
    from ratequeue.producer.submit import SubmitReport

__all__ = [
    "BatchError",
    "BatchNotFoundError",
    "BatchRunningError",
    "Client",
    "ConfigError",
    "InvalidRequestError",
    "LineError",
    "RatequeueError",
    "RedisFullError",
    "RequestTooLargeError",
    "SubmitReport",
    "UnknownModelError",
    "UpstreamError",
    "UpstreamUnusableError",
    "UsageError",
    "iter_results",
    "status",
    "submit_batch",
    "submit_job",
    "wait",
]

_LAZY = {
    "Client": "ratequeue.producer.api",
    "LineError": "ratequeue.producer.api",
    "iter_results": "ratequeue.producer.api",
    "status": "ratequeue.producer.api",
    "submit_batch": "ratequeue.producer.api",
    "submit_job": "ratequeue.producer.api",
    "wait": "ratequeue.producer.api",
    "SubmitReport": "ratequeue.producer.submit",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ratequeue' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
