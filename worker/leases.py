"""Job leases while a chunk runs: renewed, released on shutdown, and never taken by a copy.

Why (issue 8): a chunk's owner used to be its message id, and the lease was set once, for the
visibility timeout. A run longer than that (several attempts of long calls, or a server that
trickles) saw the broker hand its message out again, and the copy, having the same owner, took
the jobs back while the first run was still calling: two calls open for one job. Now every run
has an owner of its own, renews its leases while it runs, and a run that finds a job leased by
another live run re-checks it later through the deferred set instead of dropping or running it
(a killed worker's leases expire and the re-check then runs the job).

Claims hash values are ``"<owner> <lease expiry ms>"`` (see ``worker/lua/claim_jobs.lua``).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import redis.asyncio as aioredis

from ratequeue.jobstore import keys
from ratequeue.jobstore.keys import DEFERRED_SEP
from ratequeue.jobstore.scripts import lua_source

# How long a run's lease on its jobs lasts; the run renews it every third of that while it runs.
# Independent of the broker's visibility timeout (30 min): a copy of a message delivered after a
# worker died finds the dead run's leases gone within a minute, not half an hour.
JOB_LEASE_SECONDS = 60.0


def run_owner(message_id: str | None) -> str:
    """An owner unique to this run of a message (no spaces: the claims format splits on one)."""
    base = (message_id or "run").replace(" ", "_")
    return f"{base}~{uuid.uuid4().hex[:12]}"


class Leases:
    """The lease operations of one event loop's Redis client."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._renew = redis.register_script(lua_source("renew_leases"))
        self._recheck = redis.register_script(lua_source("recheck_later"))

    async def renew(self, batch_id: str, owner: str, custom_ids: Sequence[str], lease: float) -> int:
        """Extend this owner's leases to ``lease`` seconds from now; returns how many it still held."""
        if not custom_ids:
            return 0
        ms = max(1, int(lease * 1000))
        return int(await self._renew(keys=[keys.batch_claims(batch_id)], args=[owner, ms, *custom_ids]))

    async def release(self, batch_id: str, owner: str, custom_ids: Sequence[str]) -> int:
        """Drop this owner's leases (a run cancelled at shutdown): the next run takes the jobs at once."""
        if not custom_ids:
            return 0
        return int(await self._renew(keys=[keys.batch_claims(batch_id)], args=[owner, 0, *custom_ids]))

    async def recheck_later(self, batch_id: str, owner: str, custom_ids: Sequence[str], delay: float) -> int:
        """Defer the jobs among ``custom_ids`` that another live run holds, until its lease ends or
        for ``delay`` seconds if that is sooner (a killed run's jobs run as soon as its lease is gone).

        Returns how many were deferred; jobs with an outcome are left alone. Raises redis errors.
        """
        if not custom_ids:
            return 0
        claim_keys = [keys.batch_results(batch_id), keys.batch_errors(batch_id), keys.batch_claims(batch_id),
                      keys.deferred_jobs()]
        args: list[str | int] = [owner, max(1, int(delay * 1000)), f"{batch_id}{DEFERRED_SEP}", *custom_ids]
        return int(await self._recheck(keys=claim_keys, args=args))
