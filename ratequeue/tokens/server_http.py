"""The HTTP side of counting with a server's ``/tokenize`` (ratequeue/tokens/server.py): posting many
requests at once from synchronous code, and reading what each answer says."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from typing import Any

import aiohttp
import orjson

__all__ = ["Answer", "Poster", "failure", "refused"]

Answer = tuple[int | None, bytes, str | None]  # (status, body, None), or (None, b"", why there is no answer)
_NOT_THERE = (404, 405, 501)  # no such path (vLLM's 404 for an unknown model is a refusal: see refused)
_REFUSED = (400, 422)  # this request: the server cannot count it (a message its chat template rejects)


def _server_message(raw: bytes) -> str | None:
    """The message of a vLLM error answer (``{"message"}`` or ``{"error": {"message"}}``); None for another
    body (a web framework's ``{"detail": "Not Found"}`` for a path it does not serve)."""
    try:
        answer = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
        answer = answer["error"]
    message = answer.get("message") if isinstance(answer, dict) else None
    return message[:200] if isinstance(message, str) and message else None


def refused(status: int | None, raw: bytes) -> bool:
    """This request is refused (the server counts others): a 400/422, or vLLM's 404 for a model it does
    not serve (an error with a message, unlike the 404 of a path it does not serve)."""
    return status in _REFUSED or (status == 404 and _server_message(raw) is not None)


def failure(status: int | None, raw: bytes) -> str | None:
    """Why an answer gives no count (None: it gives one)."""
    if refused(status, raw):
        message = _server_message(raw)
        return f"{status}: {message}" if message else str(status)
    if status in _NOT_THERE:
        return f"it has no /tokenize ({status})"
    if status != 200:
        return f"it answered {status}"
    try:
        answer = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return "its answer is not JSON"
    count = answer.get("count") if isinstance(answer, dict) else None
    if type(count) is not int or count < 0:
        return 'its answer has no integer "count"'
    return None


class Poster:
    """POSTs on an event loop of its own thread (the caller may be inside another loop): aiohttp's
    pool, kept-alive connections, at most `concurrency` requests in flight over every call."""

    def __init__(self, concurrency: int, timeout: float) -> None:
        self._concurrency = concurrency
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=min(3.0, timeout))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ratequeue-tokenize", daemon=True)
        self._thread.start()
        self._session: aiohttp.ClientSession | None = None
        self._slots: asyncio.Semaphore | None = None

    def post_all(self, url: str, payloads: list[dict[str, Any]], headers: dict[str, str]) -> Future[list[Answer]]:
        """Start posting every payload to `url`; the future gives one Answer per payload, in order."""
        return asyncio.run_coroutine_threadsafe(self._all(url, payloads, headers), self._loop)

    async def _all(self, url: str, payloads: list[dict[str, Any]], headers: dict[str, str]) -> list[Answer]:
        if self._session is None or self._slots is None:
            connector = aiohttp.TCPConnector(limit=self._concurrency)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
            self._slots = asyncio.Semaphore(self._concurrency)  # the timeout then never counts a wait for a slot
        session, slots = self._session, self._slots

        async def one(payload: dict[str, Any]) -> Answer:
            async with slots:
                try:
                    async with session.post(url, data=orjson.dumps(payload), headers=headers) as response:
                        return response.status, await response.read(), None
                except TimeoutError:
                    return None, b"", f"it did not answer within {self._timeout.total:g} s"
                except aiohttp.ClientError as exc:
                    return None, b"", f"it is unreachable ({type(exc).__name__}: {str(exc)[:200]})"

        return list(await asyncio.gather(*(one(p) for p in payloads)))

    def close(self) -> None:
        """Close the connections, stop the loop and its thread."""
        if self._session is not None:
            asyncio.run_coroutine_threadsafe(self._session.close(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
