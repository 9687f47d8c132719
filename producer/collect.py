"""Reading batches back: the Batch object, and result/error lines in input order (streamed)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson
import redis

from ratequeue.errors import BatchNotFoundError
from ratequeue.jobstore import keys
from ratequeue.jobstore.batches import FINAL, BatchStatus
from ratequeue.jobstore.budgets import batch_budget
from ratequeue.jobstore.codec import text
from ratequeue.producer.model_progress import read_model_counts
from ratequeue.producer.submit import INPUT_ERROR_MARK
from ratequeue.redact import redact

PAGE = 1000
_INT_FIELDS = ("total", "completed", "failed", "prompt_tokens", "completion_tokens", "cached_tokens")
# expires_at ends the completion window (OpenAI's field); retained_until, ratequeue's own, is when
# an ended batch and its results leave Redis (None while it runs).
_TIME_FIELDS = ("created_at", "in_progress_at", "finalizing_at", "completed_at", "failed_at", "cancelling_at",
                "cancelled_at", "expired_at", "expires_at", "retained_until")
FINAL_STATUSES = frozenset(status.value for status in FINAL)  # the state machine's (jobstore/batches.py)


def batch_object(client: redis.Redis, batch_id: str) -> dict[str, Any]:
    """The batch as an OpenAI Batch object (plus ratequeue's token and cost totals, and ``models``:
    per model, its jobs by state, the charged tokens left and why it is paused, if it is; lines
    rejected at submit count in the batch's totals only).

    Raises ``BatchNotFoundError``.
    """
    raw = client.hgetall(keys.batch_meta(batch_id))
    if not raw:
        raise BatchNotFoundError(f"no batch {batch_id!r} in this Redis")
    meta = {text(k): text(v) for k, v in raw.items()}
    ints = {name: int(meta.get(name, 0) or 0) for name in _INT_FIELDS}
    times = {name: int(meta[name]) if meta.get(name) else None for name in _TIME_FIELDS}
    status = meta.get("status", BatchStatus.VALIDATING.value)
    models = read_model_counts(client, batch_id, meta.get("account", ""), running=status not in FINAL_STATUSES)
    return {
        "id": batch_id,
        "object": "batch",
        "endpoint": meta.get("endpoint") or None,
        "input_file_id": meta.get("input_file") or None,
        "completion_window": meta.get("completion_window", "24h"),
        "status": status,
        "output_file_id": None,
        "error_file_id": None,
        **times,
        "request_counts": {"total": ints["total"], "completed": ints["completed"], "failed": ints["failed"]},
        "usage": {
            "prompt_tokens": ints["prompt_tokens"],
            "completion_tokens": ints["completion_tokens"],
            "cached_tokens": ints["cached_tokens"],
        },
        "cost_usd": float(meta.get("cost_usd", 0) or 0),
        # ratequeue's extension: paused by Client.pause (the status stays in_progress)
        "paused": meta.get("paused") == "1",
        # Its budget (USD), and "paused": "budget" / "daily budget" while a budget stops its calls.
        "budget": batch_budget(client, batch_id),
        "metadata": orjson.loads(meta.get("metadata") or "{}"),
        "models": {model: counts.as_json() for model, counts in models.items()},
    }


def iter_lines(
    client: redis.Redis, batch_id: str, kind: str = "results", secrets: Iterable[str] = ()
) -> Iterator[bytes]:
    """Stream a batch's result lines (``kind="results"``) or error lines (``"errors"``) in input
    order, a page of ``PAGE`` at a time: memory does not grow with the batch.

    Error lines are redacted (`secrets` and key-shaped strings): one stored by an older worker
    may hold an upstream message that echoed the key.
    """
    outcome_key = keys.batch_results(batch_id) if kind == "results" else keys.batch_errors(batch_id)
    order_key = keys.batch_order(batch_id)
    start = 0
    while True:
        page = [text(e) for e in client.lrange(order_key, start, start + PAGE - 1)]
        if not page:
            return
        start += len(page)
        marked = [e for e in page if e.startswith(INPUT_ERROR_MARK)]
        ids = [e for e in page if not e.startswith(INPUT_ERROR_MARK)]
        found = dict(zip(ids, client.hmget(outcome_key, ids), strict=True)) if ids else {}
        input_errors: dict[str, bytes] = {}
        if kind == "errors" and marked:
            pipe = client.pipeline(transaction=False)
            for e in marked:
                pipe.lindex(keys.batch_input_errors(batch_id), int(e[1:]))
            input_errors = dict(zip(marked, pipe.execute(), strict=True))
        for entry in page:
            line = input_errors.get(entry) if entry.startswith(INPUT_ERROR_MARK) else found.get(entry)
            if line is not None:
                line = line if isinstance(line, bytes) else line.encode()
                yield redact(line.decode(), secrets).encode() if kind == "errors" else line


def write_outputs(
    client: redis.Redis, batch_id: str, results_path: Path, errors_path: Path, secrets: Iterable[str] = ()
) -> tuple[int, int]:
    """Write the results and errors files (JSONL, input order; errors redacted, see ``iter_lines``);
    returns the line counts."""
    counts = []
    for kind, path in (("results", results_path), ("errors", errors_path)):
        n = 0
        tmp = path.with_name(path.name + ".part")
        with tmp.open("wb") as out:
            for line in iter_lines(client, batch_id, kind, secrets):
                out.write(line)
                out.write(b"\n")
                n += 1
        tmp.replace(path)
        counts.append(n)
    return counts[0], counts[1]


def errors_path_for(results_path: Path) -> Path:
    """Where the errors file goes beside a results file: ``.errors`` before the last suffix
    (out.jsonl -> out.errors.jsonl, out.v2.jsonl -> out.v2.errors.jsonl); a name with no suffix
    gets ``.errors.jsonl`` (out -> out.errors.jsonl)."""
    if not results_path.suffix:
        return results_path.with_name(f"{results_path.name}.errors.jsonl")
    return results_path.with_name(f"{results_path.stem}.errors{results_path.suffix}")

