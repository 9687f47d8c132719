"""Counters behind ``GET /sim/stats``: what the simulator saw, so tests can judge the client."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

R429_KINDS = ("tokens", "requests", "too_large", "insufficient_quota")


class Stats:
    """Totals, a per-second timeline and calls per ``X-Client-Request-Id`` since start or reset."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything; the timeline restarts at t=0."""
        self.started = time.monotonic()
        self.started_at = time.time()
        self.by_status: Counter[int] = Counter()
        self.r429: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.accepted_requests = 0
        self.tokens_charged = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.spend_usd = 0.0
        self.by_model: dict[str, list[int]] = {}  # model -> [requests_ok, tokens_charged_ok, r429]
        self.timeline: list[list[int]] = []  # second -> [requests_ok, tokens_charged_ok, r429]
        self.calls_by_client_id: Counter[str] = Counter()
        self.answers_by_client_id: Counter[str] = Counter()  # 200s: answers paid for
        self.models_listed = 0  # GET /v1/models answered 200 (a client's key check; not an API call)
        # Key fingerprints (sim.keys.fingerprint) per model or deployment, and per X-Client-Request-Id.
        self.keys_by_model: dict[str, Counter[str]] = {}
        self.keys_by_client_id: dict[str, Counter[str]] = {}
        self.daily_tokens: Counter[str] = Counter()  # Azure: tokens charged today per deployment
        self.filtered: Counter[str] = Counter()  # Azure content filter: "prompt" (400s) and "output"
        # A self-hosted server's own view: most requests in service / waiting at once, refusals, served.
        self.server = {"max_concurrent": 0, "max_queued": 0, "overloaded": 0, "served": 0}
        self.tokenized = 0  # POST /tokenize answered

    def _slot(self, now: float) -> list[int]:
        second = max(0, int(now - self.started))
        while len(self.timeline) <= second:
            self.timeline.append([0, 0, 0])
        return self.timeline[second]

    def _model(self, model: str) -> list[int]:
        row = self.by_model.get(model)
        if row is None:
            row = self.by_model[model] = [0, 0, 0]
        return row

    def record_accept(self, now: float, model: str, charge: int, ok: bool) -> None:
        """A request passed the buckets and was charged ``charge`` tokens; ``ok`` unless a fault follows."""
        self.accepted_requests += 1
        self.tokens_charged += charge
        if ok:
            slot = self._slot(now)
            slot[0] += 1
            slot[1] += charge
            row = self._model(model)
            row[0] += 1
            row[1] += charge

    def record_key(self, model: str, client_id: str | None, key_fingerprint: str) -> None:
        """The key (fingerprint) a request to ``model`` came with; ``model`` is "" when none was named."""
        by_model = self.keys_by_model.get(model)
        if by_model is None:
            by_model = self.keys_by_model[model] = Counter()
        by_model[key_fingerprint] += 1
        if client_id is not None:
            by_client = self.keys_by_client_id.get(client_id)
            if by_client is None:
                by_client = self.keys_by_client_id[client_id] = Counter()
            by_client[key_fingerprint] += 1

    def record_load(self, in_service: int, queued: int) -> None:
        """A self-hosted server's occupancy as a request arrives or starts."""
        server = self.server
        server["max_concurrent"] = max(server["max_concurrent"], in_service)
        server["max_queued"] = max(server["max_queued"], queued)

    def record_usage(self, prompt: int, completion: int, cost: float) -> None:
        """Usage billed for a successful response."""
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        self.spend_usd += cost

    def record_429(self, now: float, model: str, kind: str) -> None:
        """A 429 of ``kind`` (one of ``R429_KINDS``, or "daily_quota")."""
        self.r429[kind] += 1
        self._slot(now)[2] += 1
        self._model(model)[2] += 1

    def snapshot(self, timeline: bool = True) -> dict[str, Any]:
        """The ``/sim/stats`` JSON."""
        out: dict[str, Any] = {
            "uptime_s": round(time.monotonic() - self.started, 3),
            "started_at": self.started_at,
            "requests_total": sum(self.by_status.values()),
            "by_status": {str(code): n for code, n in sorted(self.by_status.items())},
            # The OpenAI kinds always; a dialect's own ("daily_quota" at Azure) once seen.
            "r429": {kind: self.r429[kind] for kind in R429_KINDS} | dict(self.r429),
            "faults": dict(self.faults),
            "accepted_requests": self.accepted_requests,
            "tokens_charged": self.tokens_charged,
            "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens},
            "spend_usd": round(self.spend_usd, 9),
            "by_model": {
                model: {"requests_ok": row[0], "tokens_charged_ok": row[1], "r429": row[2]}
                for model, row in self.by_model.items()
            },
            "calls_by_client_id": dict(self.calls_by_client_id),
            "answers_by_client_id": dict(self.answers_by_client_id),
            "models_listed": self.models_listed,
            "keys_by_model": {model: dict(keys) for model, keys in self.keys_by_model.items()},
            "keys_by_client_id": {cid: dict(keys) for cid, keys in self.keys_by_client_id.items()},
            "daily_tokens": dict(self.daily_tokens),
            "filtered": dict(self.filtered),
            "server": dict(self.server),
            "tokenized": self.tokenized,
        }
        if timeline:
            out["timeline"] = [
                {"t": t, "requests_ok": s[0], "tokens_charged_ok": s[1], "r429": s[2]}
                for t, s in enumerate(self.timeline)
            ]
        return out
