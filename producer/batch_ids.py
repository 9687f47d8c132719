"""Batch ids the caller chooses (``submit --batch-id``), and what makes a submit under one
idempotent: the sha256 of the raw input bytes, stored with the batch as ``input_sha256`` when it is
created (in the same script, so a racing submit sees it) and compared by a second submit."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import redis

from ratequeue.errors import BatchError, BatchNotFoundError, UsageError
from ratequeue.jobstore import keys
from ratequeue.jobstore.codec import text
from ratequeue.producer.submit import SubmitReport

__all__ = ["check_batch_id", "file_sha256", "submitted_before"]

_BATCH_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # no braces: the id is a Redis Cluster hash tag


def check_batch_id(batch_id: str) -> None:
    """Raise ``UsageError`` unless ``batch_id`` is 1-64 letters, digits, ``_`` or ``-``."""
    if not _BATCH_ID.fullmatch(batch_id):
        raise UsageError(f"batch id {batch_id!r}: use 1 to 64 letters, digits, '_' or '-'")


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (read in blocks)."""
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def submitted_before(client: redis.Redis, batch_id: str, name: str, digest: str) -> SubmitReport:
    """The report of a submit whose ``batch_id`` is in use: the same input (sha256) is the same
    batch, queued once (``existing``, nothing counted). Raises ``BatchError`` naming both inputs
    when they differ."""
    meta = {text(k): text(v) for k, v in client.hgetall(keys.batch_meta(batch_id)).items()}
    if not meta:  # deleted between the refused create and this read
        raise BatchNotFoundError(f"no batch {batch_id!r} in this Redis (it was deleted meanwhile)")
    stored = meta.get("input_sha256", "")
    if stored != digest:
        raise BatchError(
            f"batch id {batch_id} is taken by {meta.get('input_file') or '<unknown>'} "
            f"(sha256 {stored[:12] or '?'}); {name} differs (sha256 {digest[:12]})"
        )
    return SubmitReport(batch_id, existing=True)
