"""Continuing a run: the batch an input already has, and the stops that leave it resumable.

A batch records the sha256 of its input file (``input_sha256`` in its meta) and the account it
is sent with (``account_name``). Running the same input with the same account again continues its
unfinished batch (its jobs without an outcome are enqueued again; those
done are not paid twice) instead of submitting a new one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ratequeue.errors import RatequeueError, UsageError
from ratequeue.jobstore import keys
from ratequeue.jobstore.codec import text
from ratequeue.producer.api import Client
from ratequeue.producer.collect import FINAL_STATUSES
from ratequeue.producer.model_progress import pause_words

# Park reasons (worker/policy.py Reason values) that no wait cures, and what the user must do.
LASTING_PARKS = {
    "invalid_api_key": "fix OPENAI_API_KEY",
    "insufficient_quota": "add credit to the account",
}
STALL_SECONDS = 15.0  # no job finished for this long while a model is parked for good: stop


class RunStopped(RatequeueError):
    """The run ended before its batch did; ``exit_code`` is what the command exits with."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def batch_of_input(client: Client, input_digest: str, account: str) -> tuple[str, str] | None:
    """(batch id, status) of the newest batch made from the input with this sha256 and sent with
    `account` (an alias, ``Client.account_name``); raises UsageError, saying what to do, when the
    input has a batch of another account only: continuing it would send its lines with that
    account's key, and a new batch would pay again for what it has done."""
    ids = [text(b) for b in client.redis.zrevrange(keys.batches_index(), 0, -1)]
    pipe = client.redis.pipeline(transaction=False)
    for batch_id in ids:
        pipe.hmget(keys.batch_meta(batch_id), "input_sha256", "status", "account_name")
    other: tuple[str, str] | None = None
    for batch_id, (digest, status, name) in zip(ids, pipe.execute(), strict=True):
        if digest is None or text(digest) != input_digest:
            continue
        if name is None or text(name) == account:  # a batch of an older version: its account unknown
            return batch_id, text(status or b"validating")
        other = other or (batch_id, text(name))
    if other is not None:
        raise UsageError(_another_account(client, *other, account))
    return None


def _another_account(client: Client, batch_id: str, had: str, wanted: str) -> str:
    batch = client.status(batch_id)
    counts, status = batch["request_counts"], batch["status"]
    done = f"{counts['completed'] + counts['failed']} of {counts['total']} done, {status}"
    same = f"with --account {had}" if had else "without --account"
    keep = f"to write its results again, run {same}" if status in FINAL_STATUSES else (
        f"to continue it, run again {same}")
    return (f"batch {batch_id} of this input was sent with {_named(had)} ({done}); this run names {_named(wanted)}: "
            f"{keep}; to send the whole input with {_named(wanted)}, add --fresh (what is done is sent, and paid, "
            "again)")


def _named(account: str) -> str:
    return f"account '{account}'" if account else "each line's own account"


def batch_models(client: Client, batch_id: str) -> list[str]:
    raw = client.redis.hget(keys.batch_meta(batch_id), "models")
    return [m for m in text(raw or b"").split(",") if m]


def lasting_parks(client: Client, batch_id: str, models: list[str]) -> dict[str, str]:
    """model -> why, for the batch's models parked for a reason no wait cures.

    Parking is per (account, model), the account being the batch's (fixed when it was submitted,
    from the key of that time), not the current key's."""
    account = text(client.redis.hget(keys.batch_meta(batch_id), "account") or b"")
    found = {}
    for pair, record in client.parked().items():
        pair_account, _, model = pair.partition(":")
        if pair_account == account and model in models and record.get("reason") in LASTING_PARKS:
            found[model] = f"{pause_words(record['reason'], '', 0)}; {LASTING_PARKS[record['reason']]}"
    return found


def unpark_lasting(client: Client, batch_id: str, models: list[str]) -> list[str]:
    """Restart the batch's pairs parked for a lasting reason (the user says it is fixed, and the
    preflight, unless skipped, has just seen the key accepted)."""
    return [pair for model in sorted(lasting_parks(client, batch_id, models)) for pair in client.unpark(model)]


def watched_status(client: Client, batch_id: str, models: list[str]) -> Callable[[], dict[str, Any]]:
    """``client.status`` for the progress display, raising ``RunStopped`` (exit 1) when the batch
    cannot move on by itself: every model it uses is parked for a lasting reason, or one is and no
    job has finished for ``STALL_SECONDS`` (the other models are done or waiting on it)."""
    last: list[float] = [-1.0, time.monotonic()]  # done count, when it last changed

    def status() -> dict[str, Any]:
        batch = client.status(batch_id)
        if batch["status"] in FINAL_STATUSES:
            return batch
        counts = batch["request_counts"]
        done = counts["completed"] + counts["failed"]
        if done != last[0]:
            last[:] = [done, time.monotonic()]
        parked = lasting_parks(client, batch_id, models)
        stalled = time.monotonic() - last[1] > STALL_SECONDS
        if parked and (set(parked) >= set(models) or stalled):
            lines = [f"{model}: paused, {why} and run the same command again to continue"
                     for model, why in sorted(parked.items())]
            raise RunStopped("\n".join(lines), exit_code=1)
        return batch

    return status
