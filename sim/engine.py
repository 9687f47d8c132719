"""The simulator's judgement of one API request: auth, validation, buckets, faults, the reply.

Pure and synchronous (the server awaits only the reply's delay), so one event loop needs no locks.
"""

from __future__ import annotations

import hmac
import math
import os
import random
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import orjson

from ratequeue.sim import catalog, errors
from ratequeue.sim.buckets import ModelBuckets
from ratequeue.sim.config import ModelLimits, SimConfig, mask_key
from ratequeue.sim.durations import ceil_ms, format_wait
from ratequeue.sim.plan import RequestInvalid, plan_request
from ratequeue.sim.render import render
from ratequeue.sim.responses import Filler
from ratequeue.sim.stats import Stats
from ratequeue.sim.tokens import PromptCounter

_FAULT_STATUSES = (500, 502, 503)


class Reply(NamedTuple):
    """What to answer: status, JSON body, headers, and seconds to wait first."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str]
    delay: float


class Engine:
    """Holds the configuration, the buckets of every model and the statistics."""

    def __init__(self, config: SimConfig, counter: PromptCounter | None = None) -> None:
        self.config = config
        self.counter = counter or PromptCounter()
        self.stats = Stats()
        self.filler = Filler()
        self._limits: dict[str, ModelLimits | None] = {}
        self._buckets: dict[str, ModelBuckets] = {}
        self._id_prefix = os.urandom(4).hex()
        self._next_id = 0
        self._reseed()

    def _reseed(self) -> None:
        # Separate streams, so turning slow replies on does not change which requests fail.
        self._fault_rng = random.Random(f"{self.config.seed}:fail")
        self._slow_rng = random.Random(f"{self.config.seed}:slow")

    def new_id(self) -> str:
        """A unique 32-hex-digit id (random prefix + counter: cheaper than uuid4 per request)."""
        self._next_id += 1
        return f"{self._id_prefix}{self._next_id:024x}"

    def configure(self, changes: Mapping[str, Any]) -> SimConfig:
        """Apply runtime changes; buckets keep what they used. Raises ConfigError (nothing applied)."""
        new = self.config.updated(changes)
        old_seed = self.config.seed
        self.config = new
        self._limits.clear()
        now = time.monotonic()
        for model, buckets in list(self._buckets.items()):
            limits = new.limits_for(model)
            if limits is None:
                del self._buckets[model]
            elif limits != buckets.limits:
                buckets.reconfigure(limits, now)
        if new.seed != old_seed:
            self._reseed()
        return new

    def reset(self) -> None:
        """Clear statistics and spend, refill every bucket, restart the seeded fault sequence."""
        self.stats.reset()
        now = time.monotonic()
        for buckets in self._buckets.values():
            buckets.fill(now)
        self._reseed()

    def _model(self, model: str, now: float) -> ModelBuckets | None:
        if model not in self._limits:
            self._limits[model] = self.config.limits_for(model)
        limits = self._limits[model]
        if limits is None:
            return None
        buckets = self._buckets.get(model)
        if buckets is None:
            buckets = self._buckets[model] = ModelBuckets(limits, now)
        else:
            buckets.refill(now)
        return buckets

    def handle(self, kind: str, raw: bytes, authorization: str | None, client_id: str | None) -> Reply:
        """Judge one request to endpoint ``kind`` (chat, embeddings, responses, completions)."""
        now = time.monotonic()
        cfg = self.config
        stats = self.stats
        rid = self.new_id()
        headers = {"x-request-id": f"req_{rid}", "openai-organization": cfg.organization}
        if client_id is not None:
            stats.calls_by_client_id[client_id] += 1
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            body = None
        model = body.get("model") if body is not None else None
        buckets = self._model(model, now) if isinstance(model, str) and model else None

        def reply(status: int, payload: dict[str, Any], delay: float = 0.0) -> Reply:
            stats.by_status[status] += 1
            if status == 200 and client_id is not None:
                stats.answers_by_client_id[client_id] += 1
            if buckets is not None and cfg.ratelimit_headers:
                _add_ratelimit_headers(headers, buckets)
            return Reply(status, payload, headers, delay)

        if cfg.api_key is not None and not _authorized(authorization, cfg.api_key):
            return reply(401, errors.invalid_api_key(_sent_key(authorization)))
        if body is None:
            return reply(400, errors.invalid_json())
        if not isinstance(model, str) or not model:
            return reply(400, errors.invalid_request("you must provide a model parameter", "model"))
        if buckets is None:
            return reply(404, errors.model_not_found(model))
        limits = buckets.limits
        try:
            plan = plan_request(kind, body, limits, cfg, self.counter)
        except RequestInvalid as exc:
            return reply(exc.status, exc.body)

        charge = plan.charge
        tokens = buckets.tokens
        if charge > min(limits.tpm, tokens.capacity):
            stats.record_429(now, model, "too_large")
            return reply(429, errors.request_too_large(model, cfg.organization, limits.tpm, charge))
        if cfg.quota_usd is not None and stats.spend_usd >= cfg.quota_usd:
            stats.record_429(now, model, "insufficient_quota")
            return reply(429, errors.insufficient_quota())
        requests = buckets.requests
        if not requests.take(1):
            stats.record_429(now, model, "requests")
            wait = requests.wait_for(1)
            self._add_retry_after(headers, wait)
            return reply(429, errors.rate_limited(
                model, cfg.organization, "requests", limits.rpm, requests.used, 1, format_wait(wait)))
        # The request bucket stays debited when the token bucket refuses: failed requests count.
        if not tokens.take(charge):
            stats.record_429(now, model, "tokens")
            wait = tokens.wait_for(charge)
            self._add_retry_after(headers, wait)
            return reply(429, errors.rate_limited(
                model, cfg.organization, "tokens", limits.tpm, tokens.used, charge, format_wait(wait)))

        # Charged like a real server; only then may it fail or be slow.
        fault = self._fault_rng.random() < cfg.fail_rate
        slow = self._slow_rng.random() < cfg.slow_rate
        status = self._fault_rng.choice(_FAULT_STATUSES) if fault else 200
        stats.record_accept(now, model, charge, ok=not fault)
        delay = cfg.latency_ms / 1000
        if slow:
            stats.faults["slow"] += 1
            delay += cfg.slow_ms / 1000
        if fault:
            stats.faults[str(status)] += 1
            return reply(status, errors.SERVER_ERRORS[status], delay)
        out = render(kind, model, plan, rid, cfg.seed, self.filler)
        prompt = plan.prompt.tokens
        cost = (prompt * limits.input_price + out.completion_tokens * limits.output_price) / 1e6
        stats.record_usage(prompt, out.completion_tokens, cost)
        # Choices are generated side by side, so the longest one sets the time.
        delay += cfg.per_token_ms * out.longest / 1000
        return reply(200, out.body, delay)

    def list_models(self, authorization: str | None) -> Reply:
        """``GET /v1/models``: the configured models (else the catalogue's), behind the same key
        check as the API calls; never charged, so a client can check its key for free."""
        headers = {"x-request-id": f"req_{self.new_id()}", "openai-organization": self.config.organization}
        if self.config.api_key is not None and not _authorized(authorization, self.config.api_key):
            self.stats.by_status[401] += 1
            return Reply(401, errors.invalid_api_key(_sent_key(authorization)), headers, 0.0)
        self.stats.models_listed += 1
        names = sorted(self.config.models) or sorted(catalog.PRICES_PER_M)
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "ratequeue-sim"} for name in names]
        return Reply(200, {"object": "list", "data": data}, headers, 0.0)

    def _add_retry_after(self, headers: dict[str, str], wait: float) -> None:
        if self.config.retry_after:
            ms = ceil_ms(wait)
            headers["retry-after"] = str(max(1, math.ceil(ms / 1000)))
            headers["retry-after-ms"] = str(ms)


def _add_ratelimit_headers(headers: dict[str, str], buckets: ModelBuckets) -> None:
    requests, tokens = buckets.requests, buckets.tokens
    headers["x-ratelimit-limit-requests"] = str(requests.limit)
    headers["x-ratelimit-limit-tokens"] = str(tokens.limit)
    headers["x-ratelimit-remaining-requests"] = str(requests.remaining)
    headers["x-ratelimit-remaining-tokens"] = str(tokens.remaining)
    headers["x-ratelimit-reset-requests"] = format_wait(requests.reset_seconds)
    headers["x-ratelimit-reset-tokens"] = format_wait(tokens.reset_seconds)


def _sent_key(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, key = authorization.partition(" ")
    key = key.strip() if scheme.lower() == "bearer" else authorization.strip()
    return mask_key(key) if key else None


def _authorized(authorization: str | None, api_key: str) -> bool:
    if not authorization:
        return False
    scheme, _, key = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), api_key.encode())
