"""Token usage as reported in an upstream answer, whatever the endpoint's shape."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


def _int(value: Any) -> int:
    return value if isinstance(value, int) and value > 0 else 0


def usage_of(body: Any) -> Usage:
    """Read ``usage`` from a chat/completions/embeddings (prompt_/completion_tokens) or a
    responses (input_/output_tokens) answer; zeros where the server said nothing."""
    if not isinstance(body, Mapping):
        return Usage()
    usage = body.get("usage")
    if not isinstance(usage, Mapping):
        return Usage()
    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
    cached = _int(details.get("cached_tokens")) if isinstance(details, Mapping) else 0
    prompt = _int(usage.get("prompt_tokens")) or _int(usage.get("input_tokens"))
    completion = _int(usage.get("completion_tokens")) or _int(usage.get("output_tokens"))
    return Usage(prompt, completion, cached)
