"""Turn a planned request into its successful response body."""

from __future__ import annotations

import time
from typing import Any

import orjson

from ratequeue.sim import catalog
from ratequeue.sim.plan import PROMPT_FIELD, Plan
from ratequeue.sim.responses import (
    Filler,
    chat_body,
    choose_output,
    completion_body,
    embedding_vector,
    embeddings_body,
    encode_base64,
    responses_body,
)


class Rendered:
    """A 200 body with its completion token count and longest choice (for per-token latency)."""

    __slots__ = ("body", "completion_tokens", "longest")

    def __init__(self, body: dict[str, Any], completion_tokens: int, longest: int) -> None:
        self.body = body
        self.completion_tokens = completion_tokens
        self.longest = longest


def render(kind: str, model: str, plan: Plan, rid: str, seed: int, filler: Filler) -> Rendered:
    """Build the body; output sizes are fixed by (seed, prompt), so a retried request gets the same reply."""
    created = int(time.time())
    body = plan.body
    if kind == "embeddings":
        return Rendered(_embeddings(model, plan, seed), 0, 0)
    key = orjson.dumps(body.get(PROMPT_FIELD[kind]))
    if kind == "responses" and isinstance(body.get("instructions"), str):
        key += body["instructions"].encode()
    outputs = [choose_output(seed, key, i, plan.requested_max, plan.output_cap) for i in range(plan.choices)]
    texts = [filler.text(out.tokens) for out in outputs]
    completion = sum(out.tokens for out in outputs)
    longest = max(out.tokens for out in outputs)
    prompt_tokens = plan.prompt.tokens
    if kind == "chat":
        payload = chat_body(rid, created, model, outputs, texts, prompt_tokens)
    elif kind == "completions":
        payload = completion_body(rid, created, model, outputs, texts, prompt_tokens)
    else:
        payload = responses_body(rid, created, model, outputs[0], texts[0], prompt_tokens, plan.requested_max)
    return Rendered(payload, completion, longest)


def _embeddings(model: str, plan: Plan, seed: int) -> dict[str, Any]:
    value = plan.body.get("input")
    items: list[Any]
    if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, int) for v in value)):
        items = [value]
    else:
        items = list(value) if isinstance(value, list) else [value]
    dim = plan.body.get("dimensions") or catalog.embedding_dim(model)
    vectors = [embedding_vector(seed, orjson.dumps(item), dim) for item in items]
    if plan.body.get("encoding_format") == "base64":
        return embeddings_body(model, [encode_base64(v) for v in vectors], plan.prompt.tokens)
    return embeddings_body(model, vectors, plan.prompt.tokens)
