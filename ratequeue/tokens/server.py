"""Prompt counts from a self-hosted server's ``POST /tokenize`` (``tokenize = "server"`` on an
openai-compatible account), for the producer to store with each job at submit.

vLLM serves it at the server's root, beside ``/v1`` (``vllm/entrypoints/serve/tokenize/api_router.py``):
``{"model", "messages"[, "tools"]}`` (the chat template applied, generation prompt included, as a chat
request is) or ``{"model", "prompt"}`` -> ``{"count", "max_model_len", "tokens"}``. A chat request is one
call; a completions prompt or an embeddings input of several strings is one call per string (token-id
prompts count themselves); /v1/responses has no /tokenize shape and is counted locally.

Why at submit and not in the worker: a line whose prompt does not fit the server's ``max_model_len``
fails there with its line number before anything runs, the stored charge is what progress and the
bucket see from the start, and the workers' hot path gets no extra round trip per job. Submit stays
fast: the producer asks for a block of lines at once (``start``) and checks and stores the block before
it while the server counts (``finish`` then waits for the answers); ``CONCURRENCY`` requests in flight
over kept-alive connections; each distinct request asked once (a bounded cache of digests).

A server that cannot count (no /tokenize: 404/405/501, unreachable, an answer that is not JSON or has
no integer ``count``, another error status) is asked nothing more for ``RETRY_AFTER`` seconds: the
account's jobs are counted with its local ``encoding``, with one warning naming the account and the
reason. A request the server refuses (400/422, or 404 for a model it does not serve) is counted
locally; one warning per account.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import orjson

from ratequeue.config.accounts import Account, Route
from ratequeue.config.urls import redact_url
from ratequeue.tokens.estimate import Counted, endpoint_path
from ratequeue.tokens.server_http import Answer, Poster, failure, refused

__all__ = ["CONCURRENCY", "RETRY_AFTER", "Asked", "ServerCounts", "counted_by_server", "tokenize_payloads"]

log = logging.getLogger(__name__)

CONCURRENCY = 32  # /tokenize requests in flight per submitting process
TIMEOUT = 10.0  # seconds for one answer (connecting: 3)
RETRY_AFTER = 300.0  # seconds an account that could not count is counted locally before asking again
_CACHE_MAX = 200_000  # distinct requests remembered (16-byte digests): batches repeat prompts
_REFUSAL = -1  # cached for a request the server refused


def counted_by_server(route: Route) -> bool:
    """Whether `route`'s prompts are counted by its server (``tokenize = "server"``)."""
    return route.account.dialect == "openai-compatible" and route.account.tokenize == "server"


def tokenize_payloads(url: str, body: Mapping[str, Any], model: str) -> list[dict[str, Any] | int] | None:
    """The /tokenize requests whose counts make a request's prompt counts, in order (an int: a count
    known without asking); None when the request is counted locally (responses, or a shape the local
    count rejects with the field's error)."""
    path = endpoint_path(url)
    if path == "/v1/chat/completions":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, Mapping) for m in messages):
            return None
        payload: dict[str, Any] = {"model": model, "messages": messages}
        if isinstance(body.get("tools"), list) and body["tools"]:
            payload["tools"] = body["tools"]
        return [payload]
    key = {"/v1/completions": "prompt", "/v1/embeddings": "input"}.get(path)
    value = body.get(key) if key else None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or len(value) > 2048 or type(value[0]) is int:
        return None  # missing, mistyped, or one token-id prompt: the local count says so or counts it
    items: list[dict[str, Any] | int] = []
    for item in value:
        if isinstance(item, str) and (item or key == "prompt"):
            items.append({"model": model, "prompt": item})
        elif isinstance(item, list) and all(type(t) is int and t >= 0 for t in item) and item:
            items.append(len(item))
        else:
            return None
    return items


def tokenize_url(account: Account) -> str:
    """``{root}/tokenize``: the account's base URL is the root ``/v1/...`` paths go under."""
    return account.base_url + "/tokenize"


def _key(url: str, payload: dict[str, Any]) -> bytes:
    return hashlib.blake2b(url.encode() + b"\0" + orjson.dumps(payload), digest_size=16).digest()


@dataclass
class Asked:
    """Requests posted by ``ServerCounts.start``: per account, its route, (key, payload)s, their answers."""

    posts: list[tuple[Route, list[tuple[bytes, dict[str, Any]]], Future[list[Answer]]]] = field(default_factory=list)


class ServerCounts:
    """Counts from the servers of ``tokenize = "server"`` accounts, remembered per distinct request.

    Its methods hold a lock: a Client shared by threads counts for one of them at a time. ``close()``
    ends the connections (a later use opens new ones); what was counted and which accounts fell back
    are kept.
    """

    def __init__(self, concurrency: int = CONCURRENCY, timeout: float = TIMEOUT) -> None:
        self._concurrency = concurrency
        self._timeout = timeout
        self._cache: dict[bytes, int] = {}
        self._max_len: dict[tuple[str, str], int] = {}  # (url, model) -> the server's max_model_len
        self._local_until: dict[str, float] = {}  # account -> monotonic time its server is asked again
        self._confirmed: set[str] = set()  # accounts whose server answered a count
        self._refusal_warned: set[str] = set()
        self._asking: set[bytes] = set()  # started, not finished: the next block does not ask them again
        self._poster: Poster | None = None
        self._lock = threading.RLock()

    def start(self, asks: Sequence[tuple[Route, str, Mapping[str, Any]]]) -> Asked:
        """Start asking the servers for every (route, url, body) not counted yet; never raises. The
        first request to a server not heard from yet is asked (and waited for) alone."""
        with self._lock:
            todo: dict[str, tuple[Route, dict[bytes, dict[str, Any]]]] = {}
            for route, url, body in asks:
                account = route.account
                if not counted_by_server(route) or self._counts_locally(account):
                    continue
                target = tokenize_url(account)
                for item in tokenize_payloads(url, body, route.target) or ():
                    if isinstance(item, int):
                        continue
                    key = _key(target, item)
                    if key not in self._cache and key not in self._asking:
                        todo.setdefault(account.name, (route, {}))[1][key] = item
            asked = Asked()
            for route, payloads in todo.values():
                pending = list(payloads.items())
                if route.account.name not in self._confirmed:
                    pending = pending[1:] if self._store(route, pending[:1], self._post(route, pending[:1])) else []
                if pending:
                    asked.posts.append((route, pending, self._post(route, pending)))
                    self._asking.update(key for key, _ in pending)
            return asked

    def finish(self, asked: Asked) -> None:
        """Wait for the answers of `start` and keep their counts."""
        with self._lock:
            for route, pending, answers in asked.posts:
                self._store(route, pending, answers)
                self._asking.difference_update(key for key, _ in pending)

    def prefetch(self, asks: Sequence[tuple[Route, str, Mapping[str, Any]]]) -> None:
        """``start`` then ``finish``."""
        self.finish(self.start(asks))

    def lookup(self, route: Route, url: str, body: Mapping[str, Any]) -> Counted | None:
        """The server's counts of one request (asked now if not yet); None: count it locally."""
        with self._lock:
            account = route.account
            if not counted_by_server(route) or self._counts_locally(account):
                return None
            items = tokenize_payloads(url, body, route.target)
            if items is None:
                return None
            target = tokenize_url(account)
            counts: list[int] = []
            for item in items:
                if isinstance(item, int):
                    counts.append(item)
                    continue
                key = _key(target, item)
                if key not in self._cache:
                    self.prefetch([(route, url, body)])
                found = self._cache.get(key, _REFUSAL)
                if found == _REFUSAL:
                    return None
                counts.append(found)
            return Counted(tuple(counts), self._max_len.get((target, route.target)))

    def close(self) -> None:
        """End the connections and their thread."""
        with self._lock:
            if self._poster is not None:
                self._poster.close()
                self._poster = None

    def _counts_locally(self, account: Account) -> bool:
        until = self._local_until.get(account.name)
        return until is not None and time.monotonic() < until

    def _post(self, route: Route, pending: list[tuple[bytes, dict[str, Any]]]) -> Future[list[Answer]]:
        if self._poster is None:
            self._poster = Poster(self._concurrency, self._timeout)
        headers = {"content-type": "application/json", **route.account.auth_headers()}
        return self._poster.post_all(tokenize_url(route.account), [payload for _, payload in pending], headers)

    def _store(self, route: Route, pending: list[tuple[bytes, dict[str, Any]]], answers: Future[list[Answer]]) -> bool:
        """Keep the counts of `answers`; False (the account then counted locally) if the server failed."""
        account, target = route.account, tokenize_url(route.account)
        for (key, _), (status, raw, error) in zip(pending, answers.result(), strict=True):
            reason = error or failure(status, raw)
            if reason is None:
                answer = orjson.loads(raw)
                self._cache[key] = answer["count"]
                max_len = answer.get("max_model_len")
                if type(max_len) is int and max_len > 0:
                    self._max_len[(target, route.target)] = max_len
                self._confirmed.add(account.name)
            elif refused(status, raw):
                self._cache[key] = _REFUSAL
                if account.name not in self._refusal_warned:
                    self._refusal_warned.add(account.name)
                    log.warning("account %s: %s refused to count a request (%s); such requests are counted "
                                "with the local encoding %s", account.name, redact_url(target), reason,
                                account.encoding)
            else:
                if not self._counts_locally(account):  # a block asked before the fallback: said once
                    self._confirmed.discard(account.name)
                    self._local_until[account.name] = time.monotonic() + RETRY_AFTER
                    log.warning("account %s: counting tokens with the local encoding %s, not the server's %s: "
                                "%s (asked again in %d s)", account.name, account.encoding, redact_url(target),
                                reason, RETRY_AFTER)
                return False
        if len(self._cache) > _CACHE_MAX:
            self._cache.clear()
        return True
