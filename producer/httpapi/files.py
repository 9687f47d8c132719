"""Uploaded files, kept in Redis.

Where the bytes live: in the same Redis as the batches, as a list of pieces of at most 1 MiB
(``keys.api_file_content``) under a record hash (``keys.api_file``). Not a data directory, because
(1) several API replicas on one Redis must see each other's uploads (a file uploaded through one
and referenced in ``POST /v1/batches`` on another), which a local directory cannot give without a
shared filesystem; (2) an API server restart must lose nothing accepted: the upload is answered
only once Redis holds it, and Redis's append-only file (what the deployment runs) keeps it. The
price is memory: an upload is capped (``RATEQUEUE_API_MAX_UPLOAD_BYTES``, 413 beyond it, refused
while it streams), refused with 507 when Redis has no room (the submitter's check), and expires
``RATEQUEUE_RETENTION_SECONDS`` after the upload; a batch made from it keeps its own copy of the
jobs, so the file may go first. Pieces are written before the record, and carry the TTL from the
first write: an upload cut off halfway leaves no record, and its pieces expire.

A batch's output and error files are not stored twice: ``file-output-<batch>`` and
``file-errors-<batch>`` are read from the batch's results as they are downloaded.
"""

from __future__ import annotations

import io
import secrets
import time
from collections.abc import Iterator
from typing import Any, BinaryIO

import redis

from ratequeue.jobstore import keys
from ratequeue.jobstore.codec import text
from ratequeue.producer import capacity

# A little under 1 MiB: a piece of exactly 1 MiB plus Redis's few header bytes falls in the
# allocator's next size class (1.25 MiB), and the stored file took 25% more memory than its size.
PIECE = (1 << 20) - 4096
OUTPUT_PREFIX = "file-output-"
ERRORS_PREFIX = "file-errors-"


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


def file_object(file_id: str, size: int, created_at: int, filename: str, purpose: str,
                expires_at: int | None) -> dict[str, Any]:
    """OpenAI's File object; ``expires_at``: when Redis lets it go (s since epoch; None: not yet known)."""
    return {"id": file_id, "object": "file", "bytes": size, "created_at": created_at, "filename": filename,
            "purpose": purpose, "status": "processed", "status_details": None, "expires_at": expires_at}


class FileStore:
    """Uploaded files of every tenant; a tenant only ever reaches its own (``record``)."""

    def __init__(self, client: redis.Redis, retention: float) -> None:
        self._redis = client
        self._ttl = max(1, int(retention))

    def save(self, tenant: str, filename: str, purpose: str, stream: BinaryIO, size: int) -> dict[str, Any]:
        """Store ``size`` bytes read from ``stream``; returns the File object. Raises
        ``RedisFullError`` (before writing) when Redis has no room for them."""
        capacity.ensure_room(self._redis, size, f"the file {filename!r}")
        file_id = new_file_id()
        content = keys.api_file_content(file_id)
        while piece := stream.read(PIECE):
            pipe = self._redis.pipeline(transaction=False)
            pipe.rpush(content, piece)
            pipe.expire(content, self._ttl)
            pipe.execute()
        now = time.time()
        created_at = int(now)
        record = {"tenant": tenant, "filename": filename, "bytes": size, "created_at": created_at, "purpose": purpose}
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(keys.api_file(file_id), mapping=record)  # type: ignore[arg-type]
        pipe.expire(keys.api_file(file_id), self._ttl)
        pipe.expire(content, self._ttl)
        pipe.execute()
        self._redis.zadd(keys.api_tenant_files(tenant), {file_id: now})  # another slot: its own call
        return file_object(file_id, size, created_at, filename, purpose, created_at + self._ttl)

    def record(self, tenant: str, file_id: str) -> dict[str, Any] | None:
        """The File object of ``tenant``'s uploaded file; None when it does not exist or is another
        tenant's (the same answer: existence is not told)."""
        return self._object(tenant, file_id, self._redis.hgetall(keys.api_file(file_id)))

    def _object(self, tenant: str, file_id: str, stored: dict[Any, Any]) -> dict[str, Any] | None:
        raw = {text(k): text(v) for k, v in stored.items()}
        if not raw or raw.get("tenant") != tenant:
            return None
        created_at = int(raw["created_at"])
        return file_object(file_id, int(raw["bytes"]), created_at, raw["filename"], raw["purpose"],
                           created_at + self._ttl)

    def listing(self, tenant: str, after: str | None, limit: int, purpose: str | None) -> dict[str, Any] | None:
        """``GET /v1/files``: the tenant's uploads, newest first, ``limit`` after the file ``after``
        (None when ``after`` is not one of them). Expired entries are dropped from the index."""
        index = keys.api_tenant_files(tenant)
        start = 0
        if after:
            rank = self._redis.zrevrank(index, after)
            if rank is None:
                return None
            start = int(rank) + 1  # type: ignore[arg-type]
        data: list[dict[str, Any]] = []
        gone: list[str] = []
        while len(data) < limit:
            ids = [text(f) for f in self._redis.zrevrange(index, start, start + 99)]
            if not ids:
                break
            pipe = self._redis.pipeline(transaction=False)
            for file_id in ids:
                pipe.hgetall(keys.api_file(file_id))
            for file_id, stored in zip(ids, pipe.execute(), strict=True):
                if len(data) == limit:
                    break
                start += 1
                found = self._object(tenant, file_id, stored)
                if found is None:
                    gone.append(file_id)
                elif purpose is None or found["purpose"] == purpose:
                    data.append(found)
        has_more = self._redis.zcard(index) > start
        if gone:
            self._redis.zrem(index, *gone)
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": has_more}

    def delete(self, tenant: str, file_id: str) -> bool:
        """Remove ``tenant``'s upload; False when there is none of that id for it."""
        if self.record(tenant, file_id) is None:
            return False
        self._redis.delete(keys.api_file(file_id), keys.api_file_content(file_id))
        self._redis.zrem(keys.api_tenant_files(tenant), file_id)
        return True

    def pieces(self, file_id: str) -> Iterator[bytes]:
        """The file's bytes, one stored piece at a time (memory does not grow with the file)."""
        key = keys.api_file_content(file_id)
        index = 0
        while True:
            piece = self._redis.lindex(key, index)
            if piece is None:
                return
            yield piece if isinstance(piece, bytes) else piece.encode()
            index += 1

    def open(self, file_id: str) -> BinaryIO:
        """The file as a buffered binary stream (``readline`` works: the batch reader needs it)."""
        return io.BufferedReader(_PieceReader(self.pieces(file_id)), buffer_size=PIECE)


class _PieceReader(io.RawIOBase):
    def __init__(self, pieces: Iterator[bytes]) -> None:
        self._pieces = pieces
        self._left = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._left:
            piece = next(self._pieces, None)
            if piece is None:
                return 0
            self._left = piece
        n = min(len(buffer), len(self._left))
        buffer[:n] = self._left[:n]
        self._left = self._left[n:]
        return n
