"""The aiohttp application: OpenAI endpoints plus ``/health`` and the ``/sim/*`` control endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from ratequeue.sim import errors
from ratequeue.sim.config import ConfigError
from ratequeue.sim.engine import Engine

log = logging.getLogger(__name__)

ENDPOINTS = {
    "/v1/chat/completions": "chat",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "responses",
    "/v1/completions": "completions",
}
_JSON = "application/json"
_MAX_BODY_BYTES = 64 * 1024 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(data: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, headers=headers, content_type=_JSON)


def _api_handler(engine: Engine, kind: str) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        headers = request.headers
        try:
            reply = engine.handle(kind, raw, headers.get("Authorization"), headers.get("X-Client-Request-Id"))
        except Exception:  # a simulator bug must still answer like an API, not with aiohttp's text page
            log.exception("simulator failed on %s", request.path)
            engine.stats.by_status[500] += 1
            return _json(errors.SERVER_ERRORS[500], 500, {"x-request-id": f"req_{engine.new_id()}"})
        if reply.delay > 0:
            await asyncio.sleep(reply.delay)
        return _json(reply.body, reply.status, reply.headers)

    return handle


def build_app(engine: Engine) -> web.Application:
    """The simulator as an aiohttp application around ``engine``."""
    app = web.Application(client_max_size=_MAX_BODY_BYTES)

    async def health(request: web.Request) -> web.StreamResponse:
        return _json({"status": "ok"})

    async def stats(request: web.Request) -> web.StreamResponse:
        timeline = request.query.get("timeline", "1").lower() not in ("0", "false", "no")
        return _json(engine.stats.snapshot(timeline=timeline))

    async def reset(request: web.Request) -> web.StreamResponse:
        engine.reset()
        return _json({"status": "ok"})

    async def get_config(request: web.Request) -> web.StreamResponse:
        return _json(engine.config.to_dict())

    async def set_config(request: web.Request) -> web.StreamResponse:
        try:
            changes = orjson.loads(await request.read())
            if not isinstance(changes, dict):
                raise ConfigError("expected a JSON object of options")
            config = engine.configure(changes)
        except (orjson.JSONDecodeError, ConfigError) as exc:
            return _json(errors.invalid_request(str(exc)), 400)
        return _json(config.to_dict())

    async def list_models(request: web.Request) -> web.StreamResponse:
        reply = engine.list_models(request.headers.get("Authorization"))
        return _json(reply.body, reply.status, reply.headers)

    async def not_found(request: web.Request) -> web.StreamResponse:
        body = errors.invalid_request(f"Invalid URL ({request.method} {request.path})")
        return _json(body, 404, {"x-request-id": f"req_{engine.new_id()}"})

    for path, kind in ENDPOINTS.items():
        app.router.add_post(path, _api_handler(engine, kind))
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/health", health)
    app.router.add_get("/sim/stats", stats)
    app.router.add_post("/sim/reset", reset)
    app.router.add_get("/sim/config", get_config)
    app.router.add_post("/sim/config", set_config)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def serve(
    engine: Engine,
    host: str = "127.0.0.1",
    port: int = 8900,
    access_log: bool = False,
    on_ready: Callable[[str], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until ``stop`` is set (or SIGINT/SIGTERM in the main thread); ``on_ready`` gets the URL.

    Port 0 picks a free port; the URL passed to ``on_ready`` has the real one. Raises OSError if the
    address cannot be bound.
    """
    runner = web.AppRunner(
        build_app(engine),
        access_log=logging.getLogger("aiohttp.access") if access_log else None,
        handle_signals=False,
    )
    await runner.setup()
    try:
        # A deep backlog: a benchmark opening 200 connections at once must not see SYN drops.
        site = web.TCPSite(runner, host, port, backlog=4096)
        await site.start()
        bound_port = runner.addresses[0][1]
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            # Outside the main thread this fails: the caller owns ``stop`` then.
            with contextlib.suppress(RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
        if on_ready is not None:
            on_ready(_url(host, bound_port))
        await stop.wait()
    finally:
        await runner.cleanup()
