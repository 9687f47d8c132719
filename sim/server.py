"""The aiohttp application: the dialect's API endpoints (sim/routes.py) plus ``/health`` and the ``/sim/*``
control endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable

import orjson
from aiohttp import web

from ratequeue.sim import errors
from ratequeue.sim.config import ConfigError
from ratequeue.sim.engine import Engine
from ratequeue.sim.routes import add_azure_routes, add_openai_routes, add_selfhosted_routes, json_response

log = logging.getLogger(__name__)

_MAX_BODY_BYTES = 64 * 1024 * 1024


def build_app(engine: Engine) -> web.Application:
    """The simulator as an aiohttp application around ``engine``."""
    app = web.Application(client_max_size=_MAX_BODY_BYTES)

    async def health(request: web.Request) -> web.StreamResponse:
        return json_response({"status": "ok"})

    async def stats(request: web.Request) -> web.StreamResponse:
        timeline = request.query.get("timeline", "1").lower() not in ("0", "false", "no")
        return json_response(engine.stats.snapshot(timeline=timeline))

    async def reset(request: web.Request) -> web.StreamResponse:
        engine.reset()
        return json_response({"status": "ok"})

    async def get_config(request: web.Request) -> web.StreamResponse:
        return json_response(engine.config.to_dict())

    async def set_config(request: web.Request) -> web.StreamResponse:
        try:
            changes = orjson.loads(await request.read())
            if not isinstance(changes, dict):
                raise ConfigError("expected a JSON object of options")
            config = engine.configure(changes)
        except (orjson.JSONDecodeError, ConfigError) as exc:
            return json_response(errors.invalid_request(str(exc)), 400)
        return json_response(config.to_dict())

    async def daily_reset(request: web.Request) -> web.StreamResponse:
        engine.stats.daily_tokens.clear()  # a new day at Azure: parked deployments may resume
        return json_response({"status": "ok"})

    async def not_found(request: web.Request) -> web.StreamResponse:
        if engine.config.dialect == "openai-compatible":
            return json_response({"detail": "Not Found"}, 404)  # FastAPI's, as vLLM answers
        body = errors.invalid_request(f"Invalid URL ({request.method} {request.path})")
        return json_response(body, 404, {"x-request-id": f"req_{engine.new_id()}"})

    dialect = engine.config.dialect
    if dialect == "azure":
        add_azure_routes(app, engine)
    elif dialect == "openai-compatible":
        add_selfhosted_routes(app, engine)
    else:
        add_openai_routes(app, engine)
    app.router.add_get("/health", health)
    app.router.add_get("/sim/stats", stats)
    app.router.add_post("/sim/reset", reset)
    app.router.add_get("/sim/config", get_config)
    app.router.add_post("/sim/config", set_config)
    app.router.add_post("/sim/daily-reset", daily_reset)
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
