"""The Azure OpenAI dialect (``--dialect azure``): deployments, ``api-version``, ``api-key`` or Entra ID tokens,
limits per deployment over 1 s or 10 s windows, a daily quota, and the content filter.

What Azure does, and where it is said:
- A deployment's RPM is derived from its TPM, 6 per 1,000 (``SimConfig._deployment_limits``), and both are
  enforced over short windows, "typically 1 or 10 seconds" (Microsoft Q&A 1336515; docs/openai-facts.md).
- Headers: ``x-ratelimit-remaining-requests`` / ``-tokens`` on every answer; the request limit is reported per
  window, not per minute: 120 RPM shows ``x-ratelimit-limit-requests: 20`` and ``remaining-requests: 19``
  after one call at 10 s windows (Microsoft Q&A 2265464; clemenssiebler.com on these headers). No
  ``x-ratelimit-reset-*``. Azure sometimes sends -1 or 0 (docs/openai-facts.md): ``--azure-odd-headers``.
- 429s carry ``retry-after`` and ``retry-after-ms`` and Azure's wording (sim/azure_errors.py).
- With no max_tokens, the whole context window is charged (docs/openai-facts.md).
- Content filter: a filtered prompt gets 400 ``content_filter``; a filtered output finishes with
  ``finish_reason: "content_filter"`` and ``content_filter_results`` flagged; answers carry
  ``prompt_filter_results`` and per-choice ``content_filter_results``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import orjson

from ratequeue.sim import azure_errors, errors
from ratequeue.sim.buckets import ModelBuckets
from ratequeue.sim.durations import ceil_ms
from ratequeue.sim.engine import Engine, Reply, parse_body
from ratequeue.sim.keys import bearer, fingerprint, matches
from ratequeue.sim.plan import PROMPT_FIELD, RequestInvalid, plan_request

# Paths under /openai/deployments/{deployment}/ -> endpoint kind. The Responses API has no deployment in its
# path (POST /openai/responses, the deployment is the body's "model").
DEPLOYMENT_PATHS = {"chat/completions": "chat", "embeddings": "embeddings", "completions": "completions"}


class AzureDialect:
    """Judges Azure requests with the engine's buckets (one set per deployment), stats and renderer."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def handle(
        self, kind: str, deployment: str | None, api_version: str | None, raw: bytes,
        api_key: str | None, authorization: str | None, client_id: str | None,
    ) -> Reply:
        """Judge one request; ``deployment`` is None for /openai/responses (then the body's model)."""
        engine = self.engine
        cfg = engine.config
        stats = engine.stats
        now = time.monotonic()
        rid = engine.new_id()
        headers = {"x-request-id": _uuid(rid), "apim-request-id": _uuid(rid[::-1]), "x-ms-region": "Sim Region"}
        if client_id is not None:
            stats.calls_by_client_id[client_id] += 1
        body = parse_body(raw)
        if deployment is None and body is not None and isinstance(body.get("model"), str):
            deployment = body["model"]
        token = bearer(authorization)
        key_fingerprint = fingerprint(api_key or token)
        stats.record_key(deployment or "", client_id, key_fingerprint)
        buckets: ModelBuckets | None = None

        def reply(status: int, payload: dict[str, Any], delay: float = 0.0) -> Reply:
            stats.by_status[status] += 1
            if status == 200 and client_id is not None:
                stats.answers_by_client_id[client_id] += 1
            if buckets is not None and cfg.ratelimit_headers:
                self._add_headers(headers, buckets)
            return Reply(status, payload, headers, delay)

        if not api_version:
            return reply(404, azure_errors.resource_not_found())
        refusal = self._refuse_credentials(api_key, token)
        if refusal is not None:
            return reply(401, refusal)
        if not deployment or engine.limits(deployment) is None:
            return reply(404, azure_errors.deployment_not_found())
        if body is None:
            return reply(400, errors.invalid_json())
        if _holds(body.get(PROMPT_FIELD[kind]), cfg.content_filter_words):
            stats.filtered["prompt"] += 1
            return reply(400, azure_errors.prompt_filtered())
        buckets = engine.buckets(deployment, key_fingerprint, now)
        assert buckets is not None  # the deployment is known (checked above)
        limits = buckets.limits
        try:
            plan = plan_request(kind, body, limits, cfg, engine.counter, missing_max_fills_context=True)
        except RequestInvalid as exc:
            return reply(exc.status, exc.body)

        charge = plan.charge
        daily = limits.daily_tokens
        if daily is not None and stats.daily_tokens[deployment] >= daily:
            stats.record_429(now, deployment, "daily_quota")
            engine.add_retry_after(headers, azure_errors.DAILY_QUOTA_SECONDS)
            return reply(429, azure_errors.daily_quota(kind, api_version))
        requests, tokens = buckets.requests, buckets.tokens
        if not requests.take(1):
            stats.record_429(now, deployment, "requests")
            return reply(429, self._rate_limited(headers, kind, api_version, "call", requests.wait_for(1)))
        # A request larger than a whole window passes when the window is untouched, leaving a debt.
        if not tokens.take(charge, borrow=True):
            stats.record_429(now, deployment, "tokens")
            wait = tokens.wait_for(charge, borrow=True)
            return reply(429, self._rate_limited(headers, kind, api_version, "token", wait))
        stats.daily_tokens[deployment] += charge

        served = engine.serve(kind, limits, plan, rid, now, charge)
        if served.rendered is None:
            return reply(served.status, served.body, served.delay)
        if kind in ("chat", "completions"):
            flagged = _holds(body.get(PROMPT_FIELD[kind]), cfg.content_filter_output_words)
            if flagged:
                stats.filtered["output"] += 1
            _annotate(served.body, kind, flagged)
        return reply(200, served.body, served.delay + cfg.per_token_ms * served.rendered.longest / 1000)

    def _refuse_credentials(self, api_key: str | None, token: str | None) -> dict[str, Any] | None:
        """The 401 body for credentials the resource does not take; None when they pass (or none are needed)."""
        cfg = self.engine.config
        keys = cfg.keys()
        if not keys and cfg.entra_token is None:
            return None
        if api_key is not None:
            return None if matches(api_key, keys) else azure_errors.invalid_key()
        if token is not None:
            accepted = (cfg.entra_token,) if cfg.entra_token is not None else ()
            return None if matches(token, accepted) else azure_errors.invalid_token()
        return azure_errors.invalid_key()

    def _rate_limited(
        self, headers: dict[str, str], kind: str, api_version: str, limit: str, wait: float
    ) -> dict[str, Any]:
        self.engine.add_retry_after(headers, wait)
        return azure_errors.rate_limited(kind, api_version, limit, max(1, math.ceil(ceil_ms(wait) / 1000)))

    def _add_headers(self, headers: dict[str, str], buckets: ModelBuckets) -> None:
        """Per-window limits and what remains of them; now and then -1 / 0, as Azure sometimes sends."""
        requests, tokens = buckets.requests, buckets.tokens
        headers["x-ratelimit-limit-requests"] = str(math.floor(requests.capacity))
        headers["x-ratelimit-limit-tokens"] = str(math.floor(tokens.capacity))
        odd = self.engine.config.azure_odd_headers
        if odd and self.engine.odd_rng.random() < odd:
            headers["x-ratelimit-remaining-requests"] = "-1"
            headers["x-ratelimit-remaining-tokens"] = "0"
            return
        headers["x-ratelimit-remaining-requests"] = str(requests.remaining)
        headers["x-ratelimit-remaining-tokens"] = str(tokens.remaining)


def _holds(prompt: Any, words: tuple[str, ...]) -> bool:
    """Whether any of ``words`` occurs (case-insensitively) in the prompt's text."""
    if not words or prompt is None:
        return False
    text = orjson.dumps(prompt).decode().lower()
    return any(word.lower() in text for word in words)


def _annotate(body: dict[str, Any], kind: str, flagged: bool) -> None:
    """Add Azure's filter annotations; a flagged output loses its text and finishes as ``content_filter``."""
    body["prompt_filter_results"] = [
        {"prompt_index": 0, "content_filter_results": azure_errors.filter_results(False)}
    ]
    for choice in body.get("choices", []):
        choice["content_filter_results"] = azure_errors.filter_results(flagged)
        if flagged:
            choice["finish_reason"] = "content_filter"
            if kind == "chat":
                choice["message"]["content"] = None
            else:
                choice["text"] = ""


def _uuid(hex32: str) -> str:
    """A 32-hex-digit id in UUID form, as Azure's request ids are."""
    return f"{hex32[:8]}-{hex32[8:12]}-{hex32[12:16]}-{hex32[16:20]}-{hex32[20:32]}"
