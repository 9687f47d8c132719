"""A tenant's batches: made from its uploaded files, listed newest first, read and cancelled.

Ownership is the tenant's sorted set of batch ids (``keys.api_tenant_batches``): an id that is not
in it is answered 404, whether the batch exists or not. The batch itself is an ordinary ratequeue
batch (workers, ``ratequeue status`` and ``results`` see it as any other)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

from ratequeue.config.accounts import AccountTable
from ratequeue.errors import BatchNotFoundError, InvalidRequestError, UsageError
from ratequeue.jobstore import keys
from ratequeue.jobstore.batches import BatchStore
from ratequeue.jobstore.codec import text
from ratequeue.jobstore.jobs import StoredJob
from ratequeue.producer.api import Client
from ratequeue.producer.batchfile import SUPPORTED_URLS, LineValidator
from ratequeue.producer.collect import iter_lines
from ratequeue.producer.httpapi.files import ERRORS_PREFIX, OUTPUT_PREFIX, FileStore, file_object
from ratequeue.producer.httpapi.idempotency import Idempotency
from ratequeue.producer.httpapi.objects import ApiError, invalid, not_found, openai_batch
from ratequeue.producer.httpapi.tenants import Tenant
from ratequeue.producer.submit import parse_window
from ratequeue.redact import configured_secrets
from ratequeue.tokens.server import ServerCounts

MAX_LIST = 100
_METADATA_PAIRS = 16  # OpenAI's limits on metadata: 16 pairs, keys of 64 and values of 512 characters


class TenantLineValidator(LineValidator):
    """Checks, on top of every line check: the line's url is the batch's endpoint (as OpenAI's
    Batch API requires), and an account the line names is one the tenant may spend."""

    def __init__(self, accounts: AccountTable, tenant: Tenant, endpoint: str,
                 counts: ServerCounts | None = None) -> None:
        super().__init__(accounts, tenant.accounts[0] if tenant.accounts else None, counts)
        self._tenant = tenant
        self._endpoint = endpoint

    def job(self, line: int, custom_id: str, request: dict[str, Any]) -> StoredJob:
        url = request.get("url")
        if url != self._endpoint:
            raise InvalidRequestError("url", f"{url!r} is not the batch's endpoint {self._endpoint}")
        account = request.get("account")
        if account is not None and account not in self._tenant.accounts:
            raise InvalidRequestError("account", f"account {account!r} is not one this tenant may use",
                                      code="unknown_account")
        return super().job(line, custom_id, request)


class TenantBatches:
    """The batch operations of the API, each for one tenant."""

    def __init__(self, client: Client, files: FileStore) -> None:
        self._client = client
        self._files = files
        self._redis = client.redis
        self._store = BatchStore(client.redis)
        self._idempotency = Idempotency(client.redis)

    def create(self, tenant: Tenant, body: Mapping[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        """``POST /v1/batches``: the file's lines become jobs (bad lines go to the error file).
        With an ``idempotency_key`` seen before (same body), the batch made then."""
        file_id, endpoint, window, metadata = _create_params(body)
        if self._files.record(tenant.name, file_id) is None:
            raise ApiError(404, f"No such File object: {file_id}", param="input_file_id", code="not_found")
        if idempotency_key is None:
            return self._create(tenant, file_id, endpoint, window, metadata)
        earlier = self._idempotency.claim(tenant.name, idempotency_key, body)
        if earlier is not None:
            return self.get(tenant, earlier)
        try:
            batch = self._create(tenant, file_id, endpoint, window, metadata)
        except BaseException:
            self._idempotency.abandon(tenant.name, idempotency_key)
            raise
        self._idempotency.finish(tenant.name, idempotency_key, body, batch["id"])
        return batch

    def _create(self, tenant: Tenant, file_id: str, endpoint: str, window: str,
                metadata: dict[str, str] | None) -> dict[str, Any]:
        validator = TenantLineValidator(self._client.accounts, tenant, endpoint, self._client.server_counts)
        account = tenant.accounts[0] if tenant.accounts else None
        budget = _budget_of(metadata)

        def own(batch_id: str) -> None:
            """The tenant's from the start: a server that dies while the jobs are stored leaves a
            batch the tenant sees (and can cancel) through any replica, not an orphan that runs."""
            self._store.describe(batch_id, input_file=file_id, endpoint=endpoint)
            created = self._redis.zscore(keys.batches_index(), batch_id) or 0
            self._redis.zadd(keys.api_tenant_batches(tenant.name), {batch_id: created})

        try:
            with self._files.open(file_id) as stream:
                report = self._client.submit_batch(stream, window, metadata, account=account, validator=validator,
                                                   on_created=own, budget_usd=budget)
        except UsageError as exc:
            raise invalid("input_file_id", f"{file_id}: {exc}") from None
        return self.get(tenant, report.batch_id)

    def owns(self, tenant: Tenant, batch_id: str) -> bool:
        return self._redis.zscore(keys.api_tenant_batches(tenant.name), batch_id) is not None

    def get(self, tenant: Tenant, batch_id: str) -> dict[str, Any]:
        """``GET /v1/batches/{id}``. Raises ``ApiError`` 404 for a batch that is not the tenant's."""
        if not self.owns(tenant, batch_id):
            raise not_found("Batch", batch_id)
        try:
            return openai_batch(self._client.status(batch_id))
        except BatchNotFoundError:  # past its retention: gone from the tenant's list too
            self._redis.zrem(keys.api_tenant_batches(tenant.name), batch_id)
            raise not_found("Batch", batch_id) from None

    def cancel(self, tenant: Tenant, batch_id: str) -> dict[str, Any]:
        """``POST /v1/batches/{id}/cancel``: no new call within about a second; the rest fail as cancelled."""
        if not self.owns(tenant, batch_id):
            raise not_found("Batch", batch_id)
        self._client.cancel(batch_id)
        return self.get(tenant, batch_id)

    def listing(self, tenant: Tenant, after: str | None, limit: int) -> dict[str, Any]:
        """``GET /v1/batches``: newest first, ``limit`` (1-100) after the batch ``after``."""
        key = keys.api_tenant_batches(tenant.name)
        start = 0
        if after:
            rank = self._redis.zrevrank(key, after)
            if rank is None:
                raise not_found("Batch", after)
            start = int(rank) + 1  # type: ignore[arg-type]
        data: list[dict[str, Any]] = []
        gone: list[str] = []  # past their retention; removed after the walk, so ranks stay put
        while len(data) < limit:
            ids = [text(b) for b in self._redis.zrevrange(key, start, start + limit - 1)]
            if not ids:
                break
            for batch_id in ids[: limit - len(data)]:
                start += 1
                try:
                    data.append(openai_batch(self._client.status(batch_id)))
                except BatchNotFoundError:
                    gone.append(batch_id)
        has_more = self._redis.zcard(key) > start
        if gone:
            self._redis.zrem(key, *gone)
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": has_more}

    def result_file(self, tenant: Tenant, file_id: str) -> tuple[str, str] | None:
        """(batch id, "results" | "errors") for an output or error file id of the tenant's batch
        that has one; None for an id of another kind. Raises ``ApiError`` 404 otherwise."""
        for prefix, kind, field in ((OUTPUT_PREFIX, "results", "output_file_id"),
                                    (ERRORS_PREFIX, "errors", "error_file_id")):
            if file_id.startswith(prefix):
                batch_id = file_id[len(prefix):]
                try:
                    batch = self.get(tenant, batch_id)
                except ApiError:
                    raise not_found("File", file_id) from None
                if batch[field] != file_id:
                    raise not_found("File", file_id)
                return batch_id, kind
        return None

    def result_lines(self, batch_id: str, kind: str) -> Iterator[bytes]:
        """The file's JSONL lines (input order; error lines redacted), each ending in a newline."""
        for line in iter_lines(self._redis, batch_id, kind, configured_secrets(self._client.settings)):
            yield line + b"\n"

    def result_file_object(self, batch_id: str, kind: str) -> dict[str, Any]:
        """The File object of a batch's output or error file: it goes with the batch (``retained_until``)."""
        size = sum(len(line) for line in self.result_lines(batch_id, kind))
        created, retained = self._redis.hmget(keys.batch_meta(batch_id), ["created_at", "retained_until"])
        prefix = OUTPUT_PREFIX if kind == "results" else ERRORS_PREFIX
        name = f"batch_{batch_id}_{'output' if kind == 'results' else 'error'}.jsonl"
        return file_object(prefix + batch_id, size, int(text(created or 0)), name, "batch_output",
                           int(text(retained)) if retained else None)


def _create_params(body: Mapping[str, Any]) -> tuple[str, str, str, dict[str, str] | None]:
    """(input_file_id, endpoint, completion_window, metadata) of a ``POST /v1/batches`` body."""
    file_id = body.get("input_file_id")
    if not isinstance(file_id, str) or not file_id:
        raise invalid("input_file_id", "input_file_id: missing or not a string")
    endpoint = body.get("endpoint")
    if endpoint not in SUPPORTED_URLS:
        raise invalid("endpoint", f"endpoint: {endpoint!r} is not one of {', '.join(sorted(SUPPORTED_URLS))}")
    window = body.get("completion_window", "24h")
    try:
        parse_window(window if isinstance(window, str) else "")
    except ValueError as exc:
        raise invalid("completion_window", f"completion_window: {exc}") from None
    metadata = body.get("metadata")
    if metadata is not None and (
        not isinstance(metadata, dict) or len(metadata) > _METADATA_PAIRS
        or not all(isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
                   for k, v in metadata.items())
    ):
        raise invalid("metadata", "metadata: at most 16 string keys (64 characters) and string values (512)")
    return file_id, endpoint, window, metadata


BUDGET_KEY = "ratequeue_budget_usd"  # metadata the SDK sends as it is (its values are strings)


def _budget_of(metadata: Mapping[str, str] | None) -> float | None:
    """The batch's budget in USD from ``metadata.ratequeue_budget_usd`` (None: none)."""
    raw = (metadata or {}).get(BUDGET_KEY)
    if raw is None:
        return None
    try:
        usd = float(raw)
    except (TypeError, ValueError):
        usd = float("nan")
    if not math.isfinite(usd) or usd < 0:
        raise invalid(f"metadata.{BUDGET_KEY}", f"metadata.{BUDGET_KEY}: {raw!r} is not an amount of USD (0 or more)")
    return usd
