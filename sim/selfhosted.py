"""The self-hosted dialect (``--dialect openai-compatible``): a vLLM- or Ollama-like server.

Any model name is served (``--strict-models`` limits it to the ``--model`` names, as a server serves what it
loaded); no key unless ``--api-key`` (vLLM's ``--api-key``: 401 ``{"error": "Unauthorized"}``); no rate-limit
headers and no buckets. Its limit is capacity (sim/gate.py): beyond ``--max-concurrency`` in service and
``--queue-depth`` waiting, a request is refused with Ollama's 503 "server busy ... maximum pending requests
exceeded" (ollama/ollama server/sched.go) or, with ``--overload-status 429``, text-generation-inference's
429 "Model is overloaded". Latency grows with load: base + per-token time x (1 + slowdown x in service /
capacity). Errors use vLLM's shape ``{"object": "error", "message", "type", "param", "code"}``;
``POST /tokenize`` answers vLLM's ``{"count", "max_model_len", "tokens", "token_strs"}``
(vllm/entrypoints/openai/protocol.py TokenizeResponse).
"""

from __future__ import annotations

import time
from typing import Any

from ratequeue.sim.engine import Engine, Reply, parse_body
from ratequeue.sim.keys import bearer, fingerprint, matches
from ratequeue.sim.plan import RequestInvalid, plan_request

_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError"}
OVERLOADED = {
    503: {"error": "server busy, please try again.  maximum pending requests exceeded"},
    429: {"error": "Model is overloaded", "error_type": "overloaded"},
}
UNAUTHORIZED = {"error": "Unauthorized"}


def vllm_error(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """vLLM's error body."""
    return {"object": "error", "message": message, "type": _ERROR_TYPES.get(status, "BadRequestError"),
            "param": param, "code": status}


class SelfHosted:
    """Judges requests to a self-hosted server; the server holds the ``Gate`` and passes its occupancy."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def check(self, body: dict[str, Any] | None, authorization: str | None, client_id: str | None) -> Reply | None:
        """Before queueing: record the key; the 401 to answer when a key is required and wrong, else None."""
        engine = self.engine
        token = bearer(authorization)
        model = body.get("model") if body is not None else None
        engine.stats.record_key(model if isinstance(model, str) else "", client_id, fingerprint(token))
        if client_id is not None:
            engine.stats.calls_by_client_id[client_id] += 1
        keys = engine.config.keys()
        if keys and not matches(token, keys):
            return self._reply(401, UNAUTHORIZED)
        return None

    def overloaded(self) -> Reply:
        """The refusal of a request that found the queue full."""
        status = self.engine.config.overload_status
        self.engine.stats.server["overloaded"] += 1
        return self._reply(status, OVERLOADED[status])

    def handle(self, kind: str, body: dict[str, Any] | None, client_id: str | None, in_service: int) -> Reply:
        """Serve one admitted request (``body`` None: not a JSON object); ``in_service`` counts it and the
        others being served with it."""
        engine = self.engine
        cfg = engine.config
        now = time.monotonic()
        rid = engine.new_id()
        if body is None:
            return self._reply(400, vllm_error(400, "Invalid JSON body"))
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return self._reply(400, vllm_error(400, "Field required: model", "model"))
        limits = engine.limits(model)
        if limits is None:
            return self._reply(404, vllm_error(404, f"The model `{model}` does not exist.", "model"))
        try:
            plan = plan_request(kind, body, limits, cfg, engine.counter)
        except RequestInvalid as exc:
            return self._reply(exc.status, vllm_error(exc.status, str(exc), exc.body["error"].get("param")))
        served = engine.serve(kind, limits, plan, rid, now, 0)
        if served.rendered is None:
            return self._reply(served.status, served.body, served.delay)
        engine.stats.server["served"] += 1
        if client_id is not None:
            engine.stats.answers_by_client_id[client_id] += 1
        # Decoding slows down as the batch grows: the per-token time scales with the share of capacity in use.
        load = 1 + cfg.load_slowdown * in_service / cfg.max_concurrency
        per_token = cfg.per_token_ms * load * served.rendered.longest / 1000
        return self._reply(200, served.body, served.delay + per_token)

    def tokenize(self, raw: bytes) -> Reply:
        """vLLM's ``POST /tokenize``: ``{"model", "prompt"}`` (or ``"messages"``) -> its tokens, counted as the
        completions (or chat) endpoint counts ``usage.prompt_tokens``."""
        engine = self.engine
        body = parse_body(raw)
        if body is None or not isinstance(body.get("model"), str):
            return self._reply(400, vllm_error(400, "Field required: model", "model"))
        limits = engine.limits(body["model"])
        if limits is None:
            return self._reply(404, vllm_error(404, f"The model `{body['model']}` does not exist.", "model"))
        cfg = engine.config
        if isinstance(body.get("prompt"), str):
            # Counted as usage.prompt_tokens is: with --prompt-estimate chars the ids are not the count.
            by_ids = cfg.prompt_estimate == "tiktoken"
            tokens = engine.counter.encode(limits.encoding, body["prompt"]) if by_ids else None
            count = len(tokens) if tokens is not None else engine.counter.count(
                "completions", body, limits.encoding, cfg.prompt_estimate).tokens
        elif isinstance(body.get("messages"), list):
            count = engine.counter.count("chat", body, limits.encoding, cfg.prompt_estimate).tokens
            tokens = None  # the chat template's ids are the server's own; the count is what a client needs
        else:
            return self._reply(400, vllm_error(400, "Either prompt or messages must be provided", "prompt"))
        engine.stats.tokenized += 1
        payload = {"count": count, "max_model_len": limits.context, "tokens": tokens or [], "token_strs": None}
        if cfg.tokenize_answer == "no-count":  # a server of another shape: a client must not trust it
            del payload["count"]
        return self._reply(200, payload, cfg.tokenize_latency_ms / 1000)

    def list_models(self) -> Reply:
        """``GET /v1/models``: the names served (the ``--model`` ones), in vLLM's shape."""
        engine = self.engine
        engine.stats.models_listed += 1
        data = []
        for name in sorted(engine.config.models):
            limits = engine.limits(name)
            data.append({"id": name, "object": "model", "created": 0, "owned_by": "vllm", "root": name,
                         "parent": None, "max_model_len": limits.context if limits else None})
        return self._reply(200, {"object": "list", "data": data})

    def _reply(self, status: int, payload: dict[str, Any], delay: float = 0.0) -> Reply:
        self.engine.stats.by_status[status] += 1
        # No x-ratelimit-* and no retry-after: a self-hosted server says nothing about its limits.
        return Reply(status, payload, {"x-request-id": self.engine.new_id()}, delay)
