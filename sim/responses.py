"""Successful response bodies in OpenAI's shapes, with deterministic made-up output."""

from __future__ import annotations

import base64
import hashlib
import math
import random
from array import array
from typing import Any, NamedTuple

# Each of these is one token, with or without a leading space, in both o200k_base and cl100k_base
# (tests/test_sim_responses.py checks it), so a reply of N words is N completion tokens.
_WORDS = [
    "the", "data", "model", "queue", "rate", "token", "limit", "time", "request", "worker", "batch",
    "system", "result", "value", "order", "number", "first", "state", "point", "level", "line", "group",
    "case", "word", "part", "place", "world", "house", "program", "question", "problem",
]


class Output(NamedTuple):
    """One generated choice: its size in tokens and why it stopped ("stop" or "length")."""

    tokens: int
    finish_reason: str


class Filler:
    """Filler text of an exact token count, sliced from one prebuilt string (no per-request joining)."""

    def __init__(self, words: int = 8192) -> None:
        self._text = ""
        self._ends: list[int] = [0]
        self._grow(words)

    def _grow(self, words: int) -> None:
        parts = [_WORDS[i % len(_WORDS)] for i in range(words)]
        self._text = " ".join(parts)
        ends = [0]
        for part in parts:
            ends.append(ends[-1] + len(part) + (1 if ends[-1] else 0))
        self._ends = ends

    def text(self, tokens: int) -> str:
        """``tokens`` filler words (one token each)."""
        if tokens >= len(self._ends):
            self._grow(max(tokens + 1, 2 * len(self._ends)))
        return self._text[: self._ends[tokens]]


def _unit(seed: int, key: bytes, index: int) -> float:
    """A number in [0, 1) fixed by (seed, key, index)."""
    digest = hashlib.blake2b(
        key, digest_size=8, key=seed.to_bytes(8, "little", signed=True), salt=index.to_bytes(16, "little")
    ).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def choose_output(seed: int, key: bytes, index: int, requested_max: int | None, model_max: int) -> Output:
    """Size of choice ``index``: (0.2..1.0) x the requested max, else 100..300 capped by ``model_max``."""
    u = _unit(seed, key, index)
    if requested_max is not None:
        tokens = max(1, min(requested_max, math.ceil((0.2 + 0.8 * u) * requested_max)))
        return Output(tokens, "length" if tokens >= requested_max else "stop")
    tokens = min(model_max, 100 + int(u * 201))
    return Output(tokens, "length" if tokens >= model_max else "stop")


def embedding_vector(seed: int, key: bytes, dim: int) -> list[float]:
    """A unit vector of ``dim`` floats fixed by (seed, key)."""
    rng = random.Random(int(_unit(seed, key, 0) * 2**53))
    vec = [rng.random() * 2.0 - 1.0 for _ in range(dim)]
    norm = math.sqrt(sum(x * x for x in vec)) or 1.0
    return [x / norm for x in vec]


def encode_base64(vec: list[float]) -> str:
    """OpenAI's ``encoding_format: base64``: little-endian float32 bytes."""
    return base64.b64encode(array("f", vec).tobytes()).decode("ascii")


def chat_body(
    rid: str, created: int, model: str, outputs: list[Output], texts: list[str], prompt_tokens: int
) -> dict[str, Any]:
    """``chat.completion`` with one choice per output."""
    completion = sum(o.tokens for o in outputs)
    return {
        "id": f"chatcmpl-{rid}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": text, "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": out.finish_reason,
            }
            for i, (out, text) in enumerate(zip(outputs, texts, strict=True))
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "service_tier": "default",
        "system_fingerprint": "fp_sim",
    }


def completion_body(
    rid: str, created: int, model: str, outputs: list[Output], texts: list[str], prompt_tokens: int
) -> dict[str, Any]:
    """Legacy ``text_completion``."""
    completion = sum(o.tokens for o in outputs)
    return {
        "id": f"cmpl-{rid}",
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {"text": text, "index": i, "logprobs": None, "finish_reason": out.finish_reason}
            for i, (out, text) in enumerate(zip(outputs, texts, strict=True))
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        },
        "system_fingerprint": "fp_sim",
    }


def responses_body(
    rid: str, created: int, model: str, output: Output, text: str, input_tokens: int, max_output: int | None
) -> dict[str, Any]:
    """A Responses API ``response`` object with one assistant message."""
    incomplete = output.finish_reason == "length"
    return {
        "id": f"resp_{rid}",
        "object": "response",
        "created_at": created,
        "status": "incomplete" if incomplete else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "error": None,
        "model": model,
        "output": [
            {
                "type": "message",
                "id": f"msg_{rid}",
                "status": "incomplete" if incomplete else "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "max_output_tokens": max_output,
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output.tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output.tokens,
        },
    }


def embeddings_body(model: str, vectors: list[list[float]] | list[str], prompt_tokens: int) -> dict[str, Any]:
    """An embeddings ``list``; vectors are float lists or base64 strings."""
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
