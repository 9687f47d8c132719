"""``Idempotency-Key`` on ``POST /v1/batches``: a client that sends the same key again (a retry
after a timeout or a dropped connection) gets the batch the first request made instead of a
second batch, which would pay for every line twice. The official SDK sends no such header by
itself; ``extra_headers={"Idempotency-Key": ...}`` adds it.

A key is the tenant's own and lasts a day from the batch's creation (``keys.api_idempotency``); a
claim left by a process that died mid-request is freed after 10 minutes. It holds the sha256 of
the request body and, once the batch exists, its id. The same key with another body is refused
(400), and while the first request is still storing its jobs a second one gets 409.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import orjson
import redis

from ratequeue.jobstore import keys
from ratequeue.producer.httpapi.objects import ApiError

KEY_TTL_SECONDS = 86_400
# A claim whose request never finished (its API process died) frees the key after this long, not a day.
PENDING_TTL_SECONDS = 600
MAX_KEY_LENGTH = 255


class Idempotency:
    """Claims of idempotency keys in Redis (shared by every replica)."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    def claim(self, tenant: str, key: str, body: Mapping[str, Any]) -> str | None:
        """None when this request is the first with ``key`` (it must ``finish`` or ``abandon``);
        else the id of the batch the first one made. Raises ``ApiError`` 400 for a key used with
        another body, 409 while the first request is still running."""
        if not key or len(key) > MAX_KEY_LENGTH:
            raise ApiError(400, f"Idempotency-Key: 1 to {MAX_KEY_LENGTH} characters", param="Idempotency-Key",
                           code="invalid_value")
        digest = hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()
        record = orjson.dumps({"request": digest, "batch": ""})
        if self._redis.set(self._key(tenant, key), record, nx=True, ex=PENDING_TTL_SECONDS):
            return None
        stored = self._redis.get(self._key(tenant, key))
        earlier = orjson.loads(stored) if stored else {"request": digest, "batch": ""}
        if earlier["request"] != digest:
            raise ApiError(400, "this Idempotency-Key was used with another request body in the last 24 h",
                           param="Idempotency-Key", code="idempotency_key_reused")
        if not earlier["batch"]:
            raise ApiError(409, "a request with this Idempotency-Key is still being processed; retry shortly",
                           code="idempotency_key_in_use", headers={"retry-after": "1"})
        return str(earlier["batch"])

    def finish(self, tenant: str, key: str, body: Mapping[str, Any], batch_id: str) -> None:
        digest = hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()
        self._redis.set(self._key(tenant, key), orjson.dumps({"request": digest, "batch": batch_id}),
                        ex=KEY_TTL_SECONDS)

    def abandon(self, tenant: str, key: str) -> None:
        """The first request failed: the key is free for a retry."""
        self._redis.delete(self._key(tenant, key))

    @staticmethod
    def _key(tenant: str, key: str) -> str:
        return keys.api_idempotency(tenant, hashlib.sha256(key.encode()).hexdigest())
