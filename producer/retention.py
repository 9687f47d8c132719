"""Deleting a batch from Redis, all at once (``Client.delete``, ``ratequeue delete``).

Ended batches need no deleting: the script that ends a batch (_batch_end.lua) sets every key of a batch to
expire ``RATEQUEUE_RETENTION_SECONDS`` after it ends. What expiry cannot reach are the members a
batch leaves in the shared sorted sets (the batch index and the deferred set): the delete below
removes them; after an expiry, the workers' deferred mover drops them (worker/deferred.py).
"""

from __future__ import annotations

import redis

from ratequeue.errors import BatchNotFoundError, BatchRunningError
from ratequeue.jobstore import keys
from ratequeue.jobstore.batches import BatchStore
from ratequeue.jobstore.budgets import forget_batch
from ratequeue.jobstore.keys import DEFERRED_SEP

_GLOB_SPECIAL = "\\*?[]^-"


def delete_batch(client: redis.Redis, batch_id: str, force: bool = False) -> str:
    """Remove the batch, every key of it and its members in the shared sets; returns the status
    it had. Raises ``BatchNotFoundError``, or ``BatchRunningError`` for a batch that has not
    ended unless ``force``.

    A running batch is refused rather than cancelled first: a delete cannot be undone and throws
    away results already paid for, so deleting work in progress must be asked for (``force``).
    Forced, it goes at once: workers drop chunks of a batch that is gone, and an outcome that
    comes back later is not stored (store_outcome.lua never recreates a batch).
    """
    deleted, status = BatchStore(client).delete(batch_id, force)
    if status is None:
        raise BatchNotFoundError(f"no batch {batch_id!r} in this Redis")
    if not deleted:
        raise BatchRunningError(
            f"batch {batch_id} is still {status.value}: cancel it and wait for it to end, "
            "or delete it anyway with --force (force=True)"
        )
    # The shared sets live in other Cluster slots than the batch: removed after its keys. A
    # producer that dies in between leaves members the workers drop (worker/deferred.py).
    client.zrem(keys.batches_index(), batch_id)
    purge_deferred(client, batch_id)
    forget_batch(client, batch_id)
    return status.value


def purge_deferred(client: redis.Redis, batch_id: str) -> int:
    """Remove the batch's entries from the deferred set; returns how many.

    An incremental scan (ZSCAN) rather than one Lua call: the set is shared by every batch and
    may be large, and a long script would stall Redis for everyone. An entry deferred again by a
    worker meanwhile is dropped by the mover when it comes due.
    """
    pattern = "".join(f"\\{c}" if c in _GLOB_SPECIAL else c for c in batch_id) + DEFERRED_SEP + "*"
    removed = 0
    members = [m for m, _ in client.zscan_iter(keys.deferred_jobs(), match=pattern, count=1000)]
    for start in range(0, len(members), 1000):
        removed += int(client.zrem(keys.deferred_jobs(), *members[start : start + 1000]))
    return removed
