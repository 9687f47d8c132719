"""The Starlette application: OpenAI's Files and Batches routes, bearer-token auth per tenant,
body size limits and a per-tenant request limit.

    POST /v1/files                 multipart: file, purpose=batch       -> File
    GET  /v1/files                 ?after=&limit=&purpose= (uploads, newest first) -> list of File
    GET  /v1/files/{id}            an upload, or a batch's output/error file -> File
    GET  /v1/files/{id}/content    its bytes (JSONL)
    DELETE /v1/files/{id}          an upload (batches made from it keep their jobs)
    POST /v1/batches               {input_file_id, endpoint, completion_window, metadata} -> Batch
                                   (Idempotency-Key: a retry gets the same batch; idempotency.py)
    GET  /v1/batches               ?after=&limit= (newest first)        -> list of Batch
    GET  /v1/batches/{id}          -> Batch
    POST /v1/batches/{id}/cancel   -> Batch
    GET  /health                   no auth: 200 when Redis answers

Every error is OpenAI's ``{"error": {message, type, param, code}}``: 401 for a missing or unknown
token, 404 for an id that is not the caller's (whether it exists or not), 413 past a size limit,
429 past the tenant's requests per minute (with Retry-After). Redis and the batch store are
synchronous: their calls run in Starlette's thread pool.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import redis
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message, Receive

from ratequeue.errors import RedisFullError
from ratequeue.jobstore import keys
from ratequeue.producer.api import Client
from ratequeue.producer.httpapi.batches import MAX_LIST, TenantBatches
from ratequeue.producer.httpapi.files import FileStore
from ratequeue.producer.httpapi.objects import ApiError, invalid, not_found
from ratequeue.producer.httpapi.tenants import Tenant, Tenants

log = logging.getLogger(__name__)
MAX_FILE_LIST = 10_000  # OpenAI's most (and default) files in one list page
# What a multipart body may hold besides the file: boundaries, part headers, the purpose field.
MULTIPART_SLACK = 64 * 1024
Handler = Callable[[Request, Tenant], Awaitable[Response]]


class BodyTooLarge(Exception):
    pass


def _limited(receive: Receive, limit: int) -> Receive:
    """``receive`` that raises ``BodyTooLarge`` as soon as more than ``limit`` bytes have come:
    a large body is refused while it streams, never read whole first."""
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise BodyTooLarge
        return message

    return wrapped


def _too_large(what: str, limit: int, setting: str) -> ApiError:
    return ApiError(413, f"{what} is larger than the limit of {limit} bytes ({setting})", code="too_large")


class Api:
    """The routes over one ``Client`` (its Redis, settings and accounts) and the tenants."""

    def __init__(self, client: Client, tenants: Tenants) -> None:
        self.client = client
        self.tenants = tenants
        self.files = FileStore(client.redis, client.settings.retention_seconds)
        self.batches = TenantBatches(client, self.files)
        self.max_upload = client.settings.api_max_upload_bytes
        self.max_json = client.settings.api_max_json_bytes

    def app(self) -> Starlette:
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/files", self._authed(self.upload), methods=["POST"]),
            Route("/v1/files", self._authed(self.list_files), methods=["GET"]),
            Route("/v1/files/{file_id}", self._authed(self.file), methods=["GET"]),
            Route("/v1/files/{file_id}", self._authed(self.delete_file), methods=["DELETE"]),
            Route("/v1/files/{file_id}/content", self._authed(self.content), methods=["GET"]),
            Route("/v1/batches", self._authed(self.create_batch), methods=["POST"]),
            Route("/v1/batches", self._authed(self.list_batches), methods=["GET"]),
            Route("/v1/batches/{batch_id}", self._authed(self.batch), methods=["GET"]),
            Route("/v1/batches/{batch_id}/cancel", self._authed(self.cancel), methods=["POST"]),
        ]
        return Starlette(routes=routes, exception_handlers={HTTPException: _http_error})

    def _authed(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                tenant = self.tenants.authenticate(_bearer(request))
                if tenant is None:
                    raise ApiError(401, "Incorrect API key provided. Ask the ratequeue operator for a token.",
                                   code="invalid_api_key")
                if tenant.requests_per_minute is not None:
                    await run_in_threadpool(self._count_request, tenant, tenant.requests_per_minute)
                return await handler(request, tenant)
            except ApiError as exc:
                return exc.response()
            except HTTPException as exc:  # Starlette's: a malformed multipart body (400)
                return ApiError(exc.status_code, f"{request.url.path}: {exc.detail}").response()
            except RedisFullError as exc:
                return ApiError(507, str(exc), type="server_error", code="storage_full").response()
            except redis.exceptions.OutOfMemoryError:  # full halfway through an upload: its pieces expire
                return ApiError(507, "Redis is full (maxmemory): nothing was kept", type="server_error",
                                code="storage_full").response()
            except redis.RedisError:
                return ApiError(503, "the job store (Redis) is unavailable; try again", type="server_error",
                                code="store_unavailable", headers={"retry-after": "1"}).response()
            except Exception:  # a bug: said in OpenAI's shape (the SDK retries a 500), the traceback logged
                log.exception("%s %s failed", request.method, request.url.path)
                return ApiError(500, "internal error in ratequeue api (its log has the details)",
                                type="server_error", code="internal_error").response()

        return endpoint

    def _count_request(self, tenant: Tenant, limit: int) -> None:
        """Count this request in the tenant's minute (in Redis: every replica shares the count);
        raise ``ApiError`` 429 past ``limit``."""
        now = time.time()
        key = keys.api_request_count(tenant.name, int(now // 60))
        pipe = self.client.redis.pipeline(transaction=True)
        pipe.incr(key)
        pipe.expire(key, 120)
        count = pipe.execute()[0]
        if count > limit:
            wait = max(1, math.ceil(60 - now % 60))
            raise ApiError(429, f"Rate limit reached for requests: limit {limit} per minute. Try again in {wait}s.",
                           type="requests", code="rate_limit_exceeded", headers={"retry-after": str(wait)})

    async def health(self, request: Request) -> Response:
        try:
            await run_in_threadpool(self.client.redis.ping)
        except redis.RedisError:
            return JSONResponse({"status": "redis unavailable"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def upload(self, request: Request, tenant: Tenant) -> Response:
        limit = self.max_upload
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit + MULTIPART_SLACK:
            raise _too_large("the upload", limit, "RATEQUEUE_API_MAX_UPLOAD_BYTES")
        limited = Request(request.scope, _limited(request.receive, limit + MULTIPART_SLACK))
        try:
            async with limited.form(max_files=1, max_fields=8) as form:
                purpose, upload = form.get("purpose"), form.get("file")
                if purpose != "batch":
                    raise invalid("purpose", f"purpose: {purpose!r} is not supported (only 'batch')")
                if not isinstance(upload, UploadFile):
                    raise invalid("file", "file: missing (a multipart file part named 'file')")
                size = upload.size or 0
                if size > limit:
                    raise _too_large("the file", limit, "RATEQUEUE_API_MAX_UPLOAD_BYTES")
                if size == 0:
                    raise invalid("file", "file: empty")
                await upload.seek(0)
                saved = await run_in_threadpool(
                    self.files.save, tenant.name, upload.filename or "upload.jsonl", purpose, upload.file, size
                )
        except BodyTooLarge:
            raise _too_large("the upload", limit, "RATEQUEUE_API_MAX_UPLOAD_BYTES") from None
        return JSONResponse(saved)

    async def list_files(self, request: Request, tenant: Tenant) -> Response:
        limit = _limit(request, default=MAX_FILE_LIST, most=MAX_FILE_LIST)
        after = request.query_params.get("after") or None
        purpose = request.query_params.get("purpose") or None
        found = await run_in_threadpool(self.files.listing, tenant.name, after, limit, purpose)
        if found is None:
            raise not_found("File", after or "")
        return JSONResponse(found)

    async def file(self, request: Request, tenant: Tenant) -> Response:
        file_id = request.path_params["file_id"]
        found = await run_in_threadpool(self._file_object, tenant, file_id)
        return JSONResponse(found)

    def _file_object(self, tenant: Tenant, file_id: str) -> dict[str, Any]:
        result = self.batches.result_file(tenant, file_id)
        if result is not None:
            return self.batches.result_file_object(*result)
        found = self.files.record(tenant.name, file_id)
        if found is None:
            raise not_found("File", file_id)
        return found

    async def delete_file(self, request: Request, tenant: Tenant) -> Response:
        file_id = request.path_params["file_id"]
        if not await run_in_threadpool(self.files.delete, tenant.name, file_id):
            raise not_found("File", file_id)  # a batch's output and error files go with the batch
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})

    async def content(self, request: Request, tenant: Tenant) -> Response:
        file_id = request.path_params["file_id"]
        result = await run_in_threadpool(self.batches.result_file, tenant, file_id)
        if result is not None:
            return StreamingResponse(self.batches.result_lines(*result), media_type="application/jsonl")
        if await run_in_threadpool(self.files.record, tenant.name, file_id) is None:
            raise not_found("File", file_id)
        return StreamingResponse(self.files.pieces(file_id), media_type="application/octet-stream")

    async def create_batch(self, request: Request, tenant: Tenant) -> Response:
        body = await self._json(request)
        key = request.headers.get("idempotency-key")
        return JSONResponse(await run_in_threadpool(self.batches.create, tenant, body, key))

    async def list_batches(self, request: Request, tenant: Tenant) -> Response:
        limit = _limit(request, default=20, most=MAX_LIST)
        after = request.query_params.get("after") or None
        return JSONResponse(await run_in_threadpool(self.batches.listing, tenant, after, limit))

    async def batch(self, request: Request, tenant: Tenant) -> Response:
        return JSONResponse(await run_in_threadpool(self.batches.get, tenant, request.path_params["batch_id"]))

    async def cancel(self, request: Request, tenant: Tenant) -> Response:
        return JSONResponse(await run_in_threadpool(self.batches.cancel, tenant, request.path_params["batch_id"]))

    async def _json(self, request: Request) -> dict[str, Any]:
        """The request's JSON object, read up to ``max_json`` bytes (413 past it)."""
        limit = self.max_json
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise _too_large("the request body", limit, "RATEQUEUE_API_MAX_JSON_BYTES")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large("the request body", limit, "RATEQUEUE_API_MAX_JSON_BYTES")
            chunks.append(chunk)
        try:
            body = orjson.loads(b"".join(chunks))
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        return body


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 (no such route) and 405 in OpenAI's error shape."""
    assert isinstance(exc, HTTPException)
    return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}").response()


def _limit(request: Request, default: int, most: int) -> int:
    """The ``limit`` query parameter: 1 to ``most``; raises ``ApiError`` 400 otherwise."""
    raw = request.query_params.get("limit", str(default))
    if not raw.isdigit() or not 1 <= int(raw) <= most:
        raise invalid("limit", f"limit: {raw!r} is not a whole number from 1 to {most}")
    return int(raw)


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None
