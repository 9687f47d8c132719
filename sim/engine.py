"""The simulator's judgement of one API request: auth, validation, buckets, faults, the reply.

Pure and synchronous (the server awaits only the reply's delay), so one event loop needs no locks.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import orjson

from ratequeue.sim import catalog, errors
from ratequeue.sim.buckets import ModelBuckets
from ratequeue.sim.config import ConfigError, ModelLimits, SimConfig, mask_key
from ratequeue.sim.durations import ceil_ms, format_wait
from ratequeue.sim.keys import bearer, fingerprint, matches, sent_key
from ratequeue.sim.plan import Plan, RequestInvalid, plan_request
from ratequeue.sim.render import Rendered, render
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


class Served(NamedTuple):
    """An accepted request's outcome: a seeded fault (``rendered`` None) or the rendered answer."""

    status: int
    body: dict[str, Any]
    delay: float  # base latency plus any slow fault; per-token time is the caller's (it depends on load)
    rendered: Rendered | None


def parse_body(raw: bytes) -> dict[str, Any] | None:
    """The request's JSON object; None when it is not one."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return body if isinstance(body, dict) else None


class Engine:
    """Holds the configuration, the buckets of every model and the statistics."""

    def __init__(self, config: SimConfig, counter: PromptCounter | None = None) -> None:
        self.config = config
        self.counter = counter or PromptCounter()
        self.stats = Stats()
        self.filler = Filler()
        self._limits: dict[str, ModelLimits | None] = {}
        self._buckets: dict[tuple[str, str], ModelBuckets] = {}  # (key scope, model or deployment)
        self._id_prefix = os.urandom(4).hex()
        self._next_id = 0
        self._reseed()

    def _reseed(self) -> None:
        # Separate streams, so turning slow replies on does not change which requests fail.
        self._fault_rng = random.Random(f"{self.config.seed}:fail")
        self._slow_rng = random.Random(f"{self.config.seed}:slow")
        self.odd_rng = random.Random(f"{self.config.seed}:odd")  # Azure's odd -1 / 0 headers

    def new_id(self) -> str:
        """A unique 32-hex-digit id (random prefix + counter: cheaper than uuid4 per request)."""
        self._next_id += 1
        return f"{self._id_prefix}{self._next_id:024x}"

    def configure(self, changes: Mapping[str, Any]) -> SimConfig:
        """Apply runtime changes; buckets keep what they used. Raises ConfigError (nothing applied)."""
        new = self.config.updated(changes)
        if new.dialect != self.config.dialect:  # the server's routes were built for the first one
            raise ConfigError(f"dialect: fixed at start ({self.config.dialect}); start another simulator")
        old_seed = self.config.seed
        self.config = new
        self._limits.clear()
        now = time.monotonic()
        for scoped, buckets in list(self._buckets.items()):
            limits = new.limits_for(scoped[1])
            if limits is None:
                del self._buckets[scoped]
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

    def limits(self, model: str) -> ModelLimits | None:
        """``model``'s (or an Azure deployment's) limits; None when the server does not know it."""
        if model not in self._limits:
            self._limits[model] = self.config.limits_for(model)
        return self._limits[model]

    def buckets(self, model: str, key_fingerprint: str, now: float) -> ModelBuckets | None:
        """The buckets charged for ``model``, refilled to ``now``: one set per model, or per (key, model)
        with ``per_key_buckets`` (accounts of their own); None when the model is unknown."""
        limits = self.limits(model)
        if limits is None:
            return None
        scoped = (key_fingerprint if self.config.per_key_buckets else "", model)
        buckets = self._buckets.get(scoped)
        if buckets is None:
            buckets = self._buckets[scoped] = ModelBuckets(limits, now)
        else:
            buckets.refill(now)
        return buckets

    def serve(self, kind: str, limits: ModelLimits, plan: Plan, rid: str, now: float, charge: int) -> Served:
        """A request past every check and charged ``charge``: only now may it fail or be slow, as at a real
        server; else render it and bill its usage."""
        cfg = self.config
        stats = self.stats
        fault = self._fault_rng.random() < cfg.fail_rate
        slow = self._slow_rng.random() < cfg.slow_rate
        status = self._fault_rng.choice(_FAULT_STATUSES) if fault else 200
        stats.record_accept(now, limits.name, charge, ok=not fault)
        delay = cfg.latency_ms / 1000
        if slow:
            stats.faults["slow"] += 1
            delay += cfg.slow_ms / 1000
        if fault:
            stats.faults[str(status)] += 1
            return Served(status, errors.SERVER_ERRORS[status], delay, None)
        out = render(kind, limits.served or limits.name, plan, rid, cfg.seed, self.filler)
        prompt = plan.prompt.tokens
        cost = (prompt * limits.input_price + out.completion_tokens * limits.output_price) / 1e6
        stats.record_usage(prompt, out.completion_tokens, cost)
        return Served(200, out.body, delay, out)

    def handle(self, kind: str, raw: bytes, authorization: str | None, client_id: str | None) -> Reply:
        """Judge one request to endpoint ``kind`` (chat, embeddings, responses, completions)."""
        now = time.monotonic()
        cfg = self.config
        stats = self.stats
        rid = self.new_id()
        headers = {"x-request-id": f"req_{rid}", "openai-organization": cfg.organization}
        if client_id is not None:
            stats.calls_by_client_id[client_id] += 1
        body = parse_body(raw)
        named = body.get("model") if body is not None else None
        model = named if isinstance(named, str) else ""
        key = sent_key(authorization)
        key_fingerprint = fingerprint(key)
        stats.record_key(model, client_id, key_fingerprint)
        buckets = self.buckets(model, key_fingerprint, now) if model else None

        def reply(status: int, payload: dict[str, Any], delay: float = 0.0) -> Reply:
            stats.by_status[status] += 1
            if status == 200 and client_id is not None:
                stats.answers_by_client_id[client_id] += 1
            if buckets is not None and cfg.ratelimit_headers:
                _add_ratelimit_headers(headers, buckets)
            return Reply(status, payload, headers, delay)

        keys = cfg.keys()
        if keys and not matches(bearer(authorization), keys):
            return reply(401, errors.invalid_api_key(mask_key(key) if key else None))
        if body is None:
            return reply(400, errors.invalid_json())
        if not model:
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
            self.add_retry_after(headers, wait)
            return reply(429, errors.rate_limited(
                model, cfg.organization, "requests", limits.rpm, requests.used, 1, format_wait(wait)))
        # The request bucket stays debited when the token bucket refuses: failed requests count.
        if not tokens.take(charge):
            stats.record_429(now, model, "tokens")
            wait = tokens.wait_for(charge)
            self.add_retry_after(headers, wait)
            return reply(429, errors.rate_limited(
                model, cfg.organization, "tokens", limits.tpm, tokens.used, charge, format_wait(wait)))

        served = self.serve(kind, limits, plan, rid, now, charge)
        if served.rendered is None:
            return reply(served.status, served.body, served.delay)
        # Choices are generated side by side, so the longest one sets the time.
        return reply(200, served.body, served.delay + cfg.per_token_ms * served.rendered.longest / 1000)

    def list_models(self, authorization: str | None) -> Reply:
        """``GET /v1/models``: the configured models (else the catalogue's), behind the same key
        check as the API calls; never charged, so a client can check its key for free."""
        headers = {"x-request-id": f"req_{self.new_id()}", "openai-organization": self.config.organization}
        keys = self.config.keys()
        if keys and not matches(bearer(authorization), keys):
            self.stats.by_status[401] += 1
            key = sent_key(authorization)
            return Reply(401, errors.invalid_api_key(mask_key(key) if key else None), headers, 0.0)
        self.stats.models_listed += 1
        names = sorted(self.config.models) or sorted(catalog.PRICES_PER_M)
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "ratequeue-sim"} for name in names]
        return Reply(200, {"object": "list", "data": data}, headers, 0.0)

    def add_retry_after(self, headers: dict[str, str], wait: float) -> None:
        """``retry-after`` (whole seconds, at least 1) and ``retry-after-ms``, unless turned off."""
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
