"""The HTTP client for the upstream OpenAI-compatible API: httpx's API over aiohttp's transport.

Why not httpx's own transport: httpcore assigns queued requests to connections in O(n^2)
(encode/httpcore#1035; measured here at 1,803 req/s with 10 concurrent requests on one client and
186 req/s with 200), and even sharded into pools of 16 connections it cost ~2.8 ms of CPU per call
in the worker's profile (347 calls/s for a whole engine thread). ``httpx-aiohttp``'s transport
keeps the httpx client API (timeouts, errors, an injectable transport for tests) and lets
aiohttp's connector, which has neither problem, hold the connections: 561 calls/s measured on
the same run. Cookies are never kept (an API client has no use for them, and the jar costs CPU).

Bounds (issue 8): every call has a total deadline (connect + send + the whole body; aiohttp's read
timeout alone is per read, so a server trickling a byte every few seconds held a call for ever),
and the body is read within ``max_response_bytes`` on the wire and decompressed
(``worker.bounded``). What was wrong with a body is reported in ``body_problem``, never raised.

Requests go straight to the transport (``httpx.AsyncBaseTransport.handle_async_request``, httpx's
public transport API) as ``httpx.Request`` objects with absolute URLs built once per path. The
``AsyncClient`` layer on top (URL merging, auth, redirects, the cookie jar) does nothing an API
call needs here and cost ~24% of a worker's CPU at 1,000 calls/s (py-spy, scenario 5).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx
import orjson
from httpx_aiohttp import AiohttpTransport

from ratequeue.worker.bounded import ACCEPT_ENCODING, BodyTooLarge, UnsupportedEncoding, read_bounded

log = logging.getLogger(__name__)

# Headers worth keeping from a response: rate-limit feedback and tracing. Nothing else is stored.
_KEPT_HEADERS = frozenset((
    "x-ratelimit-limit-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
    "retry-after",
    "retry-after-ms",
    "x-should-retry",
    "x-request-id",
))
HEAD_BYTES = 200  # how much of a body that is not a JSON object is kept to show in the error
TOO_LARGE = "too large"  # prefix of body_problem for an answer over the size limit
_USERINFO = re.compile(r"(\w+://)[^/@\s]+@")  # user:password@ in a URL


@dataclass(frozen=True)
class UpstreamResponse:
    """One answer of the upstream API (or a transport failure, with ``status`` 0)."""

    status: int
    body: Any
    headers: Mapping[str, str] = field(default_factory=dict)
    elapsed: float = 0.0
    transport_error: str | None = None
    # Why the body is not a JSON object ("not valid JSON", "empty body", "too large: ..."), or None.
    body_problem: str | None = None
    head: bytes = b""  # the body's first HEAD_BYTES bytes when body_problem is set

    @property
    def too_large(self) -> bool:
        return (self.body_problem or "").startswith(TOO_LARGE)

    def describe_problem(self) -> str:
        """``HTTP 200 not valid JSON: '{"id": "chatc'``: the problem with the body's first bytes, printable."""
        shown = self.head.decode("utf-8", "replace")
        shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in shown)
        return f"HTTP {self.status} {self.body_problem}: {shown!r}"

    @property
    def request_id(self) -> str | None:
        return self.headers.get("x-request-id")

    @property
    def error(self) -> Mapping[str, Any]:
        """The ``error`` object of an OpenAI error body ({} when there is none)."""
        if isinstance(self.body, Mapping):
            err = self.body.get("error")
            if isinstance(err, Mapping):
                return err
        return {}


@dataclass(frozen=True)
class Timeouts:
    """Seconds; ``read`` is long because a long completion may take minutes to start answering.

    ``total`` bounds the whole call (connect, send, every byte of the answer); ``read`` alone is
    per socket read. None: the same as ``read``.
    """

    connect: float = 10.0
    read: float = 600.0
    pool: float = 10.0
    total: float | None = None


class UpstreamClient:
    """Sends requests to ``base_url`` with the environment's credentials, or to any absolute URL with
    the credentials of the job's account (``post(..., auth=)``); one per event loop."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        organization: str | None = None,
        project: str | None = None,
        timeouts: Timeouts | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 1024,
        max_response_bytes: int = 32 << 20,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        # Only encodings worker.bounded inflates in bounded memory (aiohttp would add br and zstd).
        self._plain = {"content-type": "application/json", "accept-encoding": ACCEPT_ENCODING}
        self._headers = dict(self._plain)
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        if organization:
            self._headers["openai-organization"] = organization
        if project:
            self._headers["openai-project"] = project
        t = timeouts or Timeouts()
        # What httpx's AsyncClient would put in each request's extensions; the transport reads it.
        self._timeout = httpx.Timeout(connect=t.connect, read=t.read, write=t.connect, pool=t.pool).as_dict()
        self._total = t.read if t.total is None else t.total
        self._max_bytes = max_response_bytes
        self._transport = transport
        self._max_connections = max_connections
        self._urls: dict[str, httpx.URL] = {}

    def _session(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=30)
        return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

    def _http(self) -> httpx.AsyncBaseTransport:
        if self._transport is None:  # created on the loop that uses it; _session sets the limit
            self._transport = AiohttpTransport(client=self._session)
        return self._transport

    def _url(self, path: str) -> httpx.URL:
        url = self._urls.get(path)
        if url is None:  # the paths and the configured routes' URLs: a few, built once each
            absolute = path.startswith(("http://", "https://"))
            url = self._urls[path] = httpx.URL(path if absolute else self._base_url + "/" + path.lstrip("/"))
        return url

    async def post(
        self,
        path: str,
        body: Mapping[str, Any],
        client_request_id: str | None = None,
        auth: Mapping[str, str] | None = None,
    ) -> UpstreamResponse:
        """POST ``body`` as JSON to ``path`` (e.g. ``/v1/chat/completions``, or a route's full URL).

        ``auth``: the headers of the job's account (config/accounts.py), sent instead of the
        client's own credentials, never beside them (a self-hosted server gets no OpenAI key).

        Never raises for HTTP or transport failures: they come back as an ``UpstreamResponse``
        (status 0 and ``transport_error`` for timeouts, the total deadline and connection errors;
        ``body_problem`` for a body over the size limit, not JSON, or not a JSON object), so the
        caller's retry policy sees every failure in one shape. Cancellation is raised as usual.
        """
        headers = self._headers if auth is None else {**self._plain, **auth}
        if client_request_id:
            headers = {**headers, "x-client-request-id": client_request_id}
        request = httpx.Request(
            "POST", self._url(path), headers=headers, content=orjson.dumps(body), extensions={"timeout": self._timeout}
        )
        started = time.monotonic()
        problem: str | None = None
        raw = b""
        try:
            async with asyncio.timeout(self._total):
                resp = await self._http().handle_async_request(request)
                try:
                    raw = await read_bounded(resp, self._max_bytes)
                except BodyTooLarge as exc:
                    problem = f"{TOO_LARGE}: {exc}"
                except (UnsupportedEncoding, zlib.error) as exc:
                    problem = f"unreadable body: {exc}"
                finally:
                    await resp.aclose()
        except TimeoutError:  # asyncio.timeout's; httpx's own timeouts are not TimeoutError
            elapsed = time.monotonic() - started
            return UpstreamResponse(0, None, {}, elapsed, f"timeout: no whole answer within {self._total:g} s")
        except (httpx.TransportError, aiohttp.ClientError) as exc:
            return UpstreamResponse(0, None, {}, time.monotonic() - started, transport_failure(exc))
        elapsed = time.monotonic() - started
        kept = {name: value for name, value in resp.headers.multi_items() if name in _KEPT_HEADERS}
        if problem is not None:
            return UpstreamResponse(resp.status_code, None, kept, elapsed, body_problem=problem)
        return _parsed(resp.status_code, raw, kept, elapsed)

    async def aclose(self) -> None:
        if self._transport is not None:
            await self._transport.aclose()
            self._transport = None


def transport_failure(exc: BaseException) -> str:
    """``timeout: ReadTimeout`` or ``connection: ConnectError: connection refused by host:port``.

    The aiohttp error under the httpx one decides: httpx-aiohttp maps every
    ``aiohttp.ClientConnectionError``, a refused connection included, to ``httpx.ConnectTimeout``
    (its map lets the base class win), which reported a server that is down as a slow one.
    """
    cause = exc.__cause__ if isinstance(exc.__cause__, aiohttp.ClientError) else exc
    if isinstance(cause, aiohttp.ClientError):
        timed_out = isinstance(cause, aiohttp.ServerTimeoutError | asyncio.TimeoutError)
        name = type(exc).__name__
        if not timed_out and isinstance(exc, httpx.ConnectTimeout):  # mis-mapped: name what happened
            name = "ConnectError" if isinstance(cause, aiohttp.ClientConnectorError) else type(cause).__name__
    else:
        timed_out = isinstance(exc, httpx.TimeoutException)
        name = type(exc).__name__
    if timed_out:
        return f"timeout: {name}"
    refused = cause.os_error if isinstance(cause, aiohttp.ClientConnectorError) else None
    if isinstance(refused, ConnectionRefusedError) and isinstance(cause, aiohttp.ClientConnectorError):
        return f"connection: {name}: connection refused by {cause.host}:{cause.port}"
    # The text may quote the URL, whose base may carry credentials (https://user:pw@proxy).
    detail = _USERINFO.sub(r"\1[REDACTED]@", str(cause) or type(cause).__name__)
    return f"connection: {name}: {detail[:200]}"


def _parsed(status: int, raw: bytes, kept: dict[str, str], elapsed: float) -> UpstreamResponse:
    """The response with its JSON body; a body that is not a JSON object is described, not trusted."""
    problem: str | None = None
    try:
        parsed: Any = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        parsed, problem = None, "not valid JSON"
    if problem is None and not isinstance(parsed, dict):
        problem = "not a JSON object" if raw else "empty body"
    if problem is None:
        return UpstreamResponse(status, parsed, kept, elapsed)
    if not 200 <= status < 300 and parsed is None and raw:
        # An error page (a proxy's HTML 502): its text is the error message, as before.
        parsed = {"error": {"message": raw[:500].decode("utf-8", "replace"), "type": "invalid_response"}}
    return UpstreamResponse(status, parsed, kept, elapsed, body_problem=problem, head=raw[:HEAD_BYTES])
