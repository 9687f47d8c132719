"""A misbehaving OpenAI-style server for the hostile-upstream tests (a real HTTP server, in a subprocess).

The first path segment picks the misbehaviour, with an optional argument after a colon, so one
server serves every test and a worker points at a mode with ``OPENAI_BASE_URL=<url>/<mode>``:

    /ok/v1/chat/completions            a valid chat completion
    /bomb:<GiB>/...                    200, Content-Encoding: gzip, ~1 MB a GiB of zeros (streamed, never held)
    /huge:<MB>/...                     200, a JSON body of <MB> MB with a Content-Length
    /huge_chunked:<MB>/...             the same without a Content-Length (chunked)
    /trickle:<s>/...                   200, then one byte every <s> seconds, for ever
    /hang:<s>/...                      no answer for <s> seconds, then a valid one
    /broken /html /empty /array        a 200 with broken JSON, an HTML page, no body, a JSON array
    /ra429:<value>/...                 429 rate_limit_exceeded with ``retry-after: <value>``
    /flaky_broken:<n>/...              broken JSON for a job's first <n> calls, then a valid answer

``GET /_stats``: calls by mode, calls now open, and the most calls ever open at once for one
``x-client-request-id`` (one job). ``python -m tests.hostile_server`` prints ``hostile listening on <url>``.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web

_OK = {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "gpt-4o-mini",
       "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
       "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}
_STATIC = {
    "broken": b'{"id": "chatcmpl-1", "choices": [{"mess',
    "html": b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>",
    "empty": b"",
    "array": b'[1, 2, 3]',
}
_MIB = 1 << 20


def gzip_bomb_blocks() -> tuple[bytes, bytes]:
    """(first, repeat): the gzip stream of zeros is ``first + repeat * n``, each piece 1 MiB of zeros.

    A full flush after every MiB resets the compressor, so every piece after the first (which
    carries the gzip header) compresses to the same ~1 KB: the server streams GiBs for nothing.
    """
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(_MIB)
    first = comp.compress(zeros) + comp.flush(zlib.Z_FULL_FLUSH)
    repeat = comp.compress(zeros) + comp.flush(zlib.Z_FULL_FLUSH)
    return first, repeat


class Hostile:
    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.open_now: Counter[str] = Counter()  # by client request id
        self.max_open: Counter[str] = Counter()
        self.per_job: Counter[str] = Counter()
        self.bomb = gzip_bomb_blocks()

    async def stats(self, _: web.Request) -> web.Response:
        return web.json_response({"calls": self.calls, "open": sum(self.open_now.values()),
                                  "max_open_per_job": max(self.max_open.values(), default=0),
                                  "calls_per_job": self.per_job})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        mode, _, arg = request.match_info["mode"].partition(":")
        job = request.headers.get("x-client-request-id", "")
        self.calls[mode] += 1
        self.per_job[job] += 1
        self.open_now[job] += 1
        self.max_open[job] = max(self.max_open[job], self.open_now[job])
        try:
            await request.read()
            return await self._answer(request, mode, arg, job)
        finally:
            self.open_now[job] -= 1

    async def _answer(self, request: web.Request, mode: str, arg: str, job: str) -> web.StreamResponse:
        if mode in _STATIC:
            return web.Response(status=200, body=_STATIC[mode], content_type="application/json")
        if mode == "flaky_broken":
            if self.per_job[job] <= int(arg or 1):
                return web.Response(status=200, body=_STATIC["broken"], content_type="application/json")
            return web.json_response(_OK)
        if mode == "ra429":
            body = {"error": {"message": "Rate limit reached for gpt-4o-mini on tokens per min (TPM)",
                              "type": "tokens", "param": None, "code": "rate_limit_exceeded"}}
            return web.json_response(body, status=429, headers={"retry-after": arg})
        if mode == "hang":
            await asyncio.sleep(float(arg or 3600))
            return web.json_response(_OK)
        if mode in ("bomb", "huge", "huge_chunked", "trickle"):
            return await self._stream(request, mode, arg)
        return web.json_response(_OK)

    async def _stream(self, request: web.Request, mode: str, arg: str) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={"content-type": "application/json"})
        if mode == "bomb":
            resp.headers["content-encoding"] = "gzip"
        elif mode == "huge":
            resp.content_length = int(float(arg or 100) * 1_000_000)
        await resp.prepare(request)
        try:
            if mode == "bomb":
                first, repeat = self.bomb
                await resp.write(first)
                for _ in range(int(float(arg or 2) * 1024)):
                    await resp.write(repeat)
            elif mode == "trickle":
                await resp.write(b"{")
                while True:
                    await asyncio.sleep(float(arg or 5))
                    await resp.write(b" ")
            else:
                total = int(float(arg or 100) * 1_000_000)
                piece = b"a" * _MIB
                await resp.write(b'{"x": "')
                sent = 7
                while sent < total - 2:
                    n = min(_MIB, total - 2 - sent)
                    await resp.write(piece[:n])
                    sent += n
                await resp.write(b'"}')
            await resp.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            pass  # the client hung up: that is what a bounded client does
        return resp


def make_app() -> web.Application:
    hostile = Hostile()
    app = web.Application(client_max_size=64 * _MIB)
    app.router.add_get("/_stats", hostile.stats)
    app.router.add_post("/{mode}/{rest:.*}", hostile.handle)
    return app


class HostileServer:
    """A running hostile server subprocess; ``url`` has no trailing slash."""

    def __init__(self) -> None:
        root = Path(__file__).resolve().parent.parent
        self.process = subprocess.Popen(
            [sys.executable, "-u", "-m", "tests.hostile_server"], cwd=root, stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        match = re.search(r"listening on (\S+)", line)
        if not match:
            self.stop()
            raise RuntimeError(f"hostile server did not start: {line!r}")
        self.url = match.group(1)

    def stats(self) -> dict[str, Any]:
        return dict(httpx.get(self.url + "/_stats", timeout=10).json())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


async def _serve() -> None:
    runner = web.AppRunner(make_app(), handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"hostile listening on http://127.0.0.1:{port}", flush=True)
    started = time.monotonic()
    while time.monotonic() - started < 3600:  # never outlives a forgotten test run by long
        await asyncio.sleep(5)


if __name__ == "__main__":
    asyncio.run(_serve())
