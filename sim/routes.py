"""The aiohttp handlers of each dialect's API endpoints (``sim.server`` adds the control endpoints)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from ratequeue.sim import azure_errors, errors
from ratequeue.sim.azure import DEPLOYMENT_PATHS, AzureDialect
from ratequeue.sim.engine import Engine, Reply, parse_body
from ratequeue.sim.gate import Gate
from ratequeue.sim.selfhosted import SelfHosted

log = logging.getLogger(__name__)

# OpenAI's paths, also served by a self-hosted server.
ENDPOINTS = {
    "/v1/chat/completions": "chat",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "responses",
    "/v1/completions": "completions",
}
_JSON = "application/json"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(data: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON answer (orjson: the simulator's hot path)."""
    return web.Response(body=orjson.dumps(data), status=status, headers=headers, content_type=_JSON)


async def answer(engine: Engine, request: web.Request, judge: Callable[[], Reply]) -> web.StreamResponse:
    """Send ``judge()``'s reply after its delay; a simulator bug still answers like an API (a 500 in
    OpenAI's shape), never with aiohttp's text page."""
    try:
        reply = judge()
    except Exception:
        log.exception("simulator failed on %s", request.path)
        engine.stats.by_status[500] += 1
        return json_response(errors.SERVER_ERRORS[500], 500, {"x-request-id": f"req_{engine.new_id()}"})
    if reply.delay > 0:
        await asyncio.sleep(reply.delay)
    return json_response(reply.body, reply.status, reply.headers)


def add_openai_routes(app: web.Application, engine: Engine) -> None:
    """api.openai.com's endpoints."""

    def handler(kind: str) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            raw = await request.read()
            headers = request.headers
            return await answer(engine, request, lambda: engine.handle(
                kind, raw, headers.get("Authorization"), headers.get("X-Client-Request-Id")))

        return handle

    async def list_models(request: web.Request) -> web.StreamResponse:
        reply = engine.list_models(request.headers.get("Authorization"))
        return json_response(reply.body, reply.status, reply.headers)

    for path, kind in ENDPOINTS.items():
        app.router.add_post(path, handler(kind))
    app.router.add_get("/v1/models", list_models)


def add_azure_routes(app: web.Application, engine: Engine) -> None:
    """An Azure OpenAI resource: ``/openai/deployments/{deployment}/...?api-version=...`` and
    ``/openai/responses`` (the deployment named by the body's ``model``)."""
    dialect = AzureDialect(engine)

    def handler(kind: str, by_path: bool) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            raw = await request.read()
            headers = request.headers
            deployment = request.match_info["deployment"] if by_path else None
            return await answer(engine, request, lambda: dialect.handle(
                kind, deployment, request.query.get("api-version"), raw, headers.get("api-key"),
                headers.get("Authorization"), headers.get("X-Client-Request-Id")))

        return handle

    for path, kind in DEPLOYMENT_PATHS.items():
        app.router.add_post(f"/openai/deployments/{{deployment}}/{path}", handler(kind, True))
    app.router.add_post("/openai/responses", handler("responses", False))

    async def not_found(request: web.Request) -> web.StreamResponse:
        return json_response(azure_errors.resource_not_found(), 404)

    app.router.add_route("*", "/openai/{tail:.*}", not_found)


def add_selfhosted_routes(app: web.Application, engine: Engine) -> None:
    """A vLLM/Ollama-like server: OpenAI's paths behind a capacity gate, ``/v1/models`` and ``/tokenize``."""
    server = SelfHosted(engine)
    gate = Gate(lambda: engine.config.max_concurrency, lambda: engine.config.queue_depth, engine.stats)

    def handler(kind: str) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            body = parse_body(await request.read())
            headers = request.headers
            client_id = headers.get("X-Client-Request-Id")
            refusal = server.check(body, headers.get("Authorization"), client_id)
            if refusal is not None:
                return json_response(refusal.body, refusal.status, refusal.headers)
            if not await gate.enter():
                refused = server.overloaded()
                return json_response(refused.body, refused.status, refused.headers)
            try:  # the place is held until the answer is sent: the delay is the time in service
                return await answer(engine, request, lambda: server.handle(kind, body, client_id, gate.in_service))
            finally:
                gate.leave()

        return handle

    async def list_models(request: web.Request) -> web.StreamResponse:
        refusal = server.check(None, request.headers.get("Authorization"), None)
        reply = refusal or server.list_models()
        return json_response(reply.body, reply.status, reply.headers)

    async def tokenize(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        if not engine.config.tokenize:
            return json_response({"detail": "Not Found"}, 404)
        if engine.config.tokenize_answer == "not-json":  # e.g. a proxy's page in front of the server
            engine.stats.tokenized += 1
            return web.Response(text="<html><body>tokenizer unavailable</body></html>", content_type="text/html")
        return await answer(engine, request, lambda: server.tokenize(raw))

    for path, kind in ENDPOINTS.items():
        app.router.add_post(path, handler(kind))
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/tokenize", tokenize)
