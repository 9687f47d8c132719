"""Making deferred jobs due now (sync client: the producer's cancel and unpark).

A job waits in the deferred set (``keys.deferred_jobs``, scored by when it is due) for capacity,
a backoff or a parked pair's cooldown. When what it waits for is over sooner (the pair is
unparked) or its wait no longer matters (the batch was cancelled: it must be failed now, not at
its turn minutes later), its score is set to 0: a worker's mover enqueues it within half a second.
The worker's own copy, for a probe that succeeded, is ``worker.parking.Parking.unpark``.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import redis

from ratequeue.jobstore import keys
from ratequeue.jobstore.keys import DEFERRED_SEP


def wake(client: redis.Redis, members: Collection[Any]) -> int:
    """Make the deferred entries among ``members`` (str or bytes) due now (others are not
    added); returns how many."""
    if not members:
        return 0
    mapping: dict[Any, float] = dict.fromkeys(members, 0.0)
    return int(client.zadd(keys.deferred_jobs(), mapping, xx=True, ch=True) or 0)


def wake_batch(client: redis.Redis, batch_id: str) -> int:
    """Make every deferred job of ``batch_id`` due now (a scan of the deferred set)."""
    members = list(client.zscan_iter(keys.deferred_jobs(), match=f"{batch_id}{DEFERRED_SEP}*", count=1000))
    return wake(client, [member for member, _ in members])


def wake_pair(client: redis.Redis, account: str, model: str) -> int:
    """Make the jobs deferred because (account, model) was parked due now."""
    with client.pipeline(transaction=True) as pipe:
        pipe.smembers(keys.parked_jobs(account, model))
        pipe.delete(keys.parked_jobs(account, model))
        members, _ = pipe.execute()
    return wake(client, members)


def wake_refused(client: redis.Redis, account: str, limit: int) -> int:
    """Make up to `limit` of the jobs deferred for lack of account `account`'s key due now (a worker
    holding it asks; bounded, so that while it is busy they do not circle between it and a worker
    without the key faster than it can take them)."""
    members = client.spop(keys.refused_jobs(account), limit)
    return wake(client, members or [])
