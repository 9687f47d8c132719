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

from worker import keys
from worker.store import DEFERRED_SEP

# KEYS[1] claims hash; ARGV[1] owner, ARGV[2] lease ms (0: release), ARGV[3..] custom_ids.
# Only leases this owner still holds are touched: a job it deferred (lease dropped) stays free.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prefix = ARGV[1] .. ' '
local n = 0
for i = 3, #ARGV do
  local claim = redis.call('HGET', KEYS[1], ARGV[i])
  if claim and string.sub(claim, 1, #prefix) == prefix then
    if tonumber(ARGV[2]) > 0 then
      redis.call('HSET', KEYS[1], ARGV[i], prefix .. (now + tonumber(ARGV[2])))
    else
      redis.call('HDEL', KEYS[1], ARGV[i])
    end
    n = n + 1
  end
end
return n
"""

# KEYS: results, errors, claims, deferred set; ARGV[1] owner, ARGV[2] delay ms, ARGV[3] member
# prefix ("<batch_id>\t"), ARGV[4..] custom_ids. A job with no outcome whose lease another live
# run holds is put in the deferred set (NX: an entry already there keeps its time).
_RECHECK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = 0
for i = 4, #ARGV do
  local cid = ARGV[i]
  if redis.call('HEXISTS', KEYS[1], cid) == 0 and redis.call('HEXISTS', KEYS[2], cid) == 0 then
    local claim = redis.call('HGET', KEYS[3], cid)
    if claim then
      local holder, expiry = string.match(claim, '^(%S+) (%d+)$')
      if holder ~= ARGV[1] and tonumber(expiry) > now then
        redis.call('ZADD', KEYS[4], 'NX', now + tonumber(ARGV[2]), ARGV[3] .. cid)
        n = n + 1
      end
    end
  end
end
return n
"""


def run_owner(message_id: str | None) -> str:
    """An owner unique to this run of a message (no spaces: the claims format splits on one)."""
    base = (message_id or "run").replace(" ", "_")
    return f"{base}~{uuid.uuid4().hex[:12]}"


class Leases:
    """The lease operations of one event loop's Redis client."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._renew = redis.register_script(_RENEW)
        self._recheck = redis.register_script(_RECHECK)

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
        """Defer, by ``delay`` seconds, the jobs among ``custom_ids`` that another live run holds.

        Returns how many were deferred; jobs with an outcome are left alone. Raises redis errors.
        """
        if not custom_ids:
            return 0
        claim_keys = [keys.batch_results(batch_id), keys.batch_errors(batch_id), keys.batch_claims(batch_id),
                      keys.deferred_jobs()]
        args: list[str | int] = [owner, max(1, int(delay * 1000)), f"{batch_id}{DEFERRED_SEP}", *custom_ids]
        return int(await self._recheck(keys=claim_keys, args=args))
