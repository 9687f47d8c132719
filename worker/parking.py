"""Parking: pausing one (account, model) that cannot work for a while, without failing its jobs.

A pair is parked when its quota is spent (429 insufficient_quota), its key is refused (401), or the
server asks for a wait longer than the park bound. Its jobs are deferred, not failed, and other
pairs carry on. Once per cooldown one job becomes the probe (a Redis lock set NX with the
cooldown as TTL, so at most one probe per cooldown across every worker on every host); the probe's
success, or `ratequeue resume`, unparks the pair. A failed probe parks it again, keeping ``since``
(the first park) and noting ``last_probe`` (``park.lua``). The jobs it deferred are noted per pair
(``keys.parked_jobs``) so that unparking makes them due at once, not after the cooldown.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import orjson
import redis.asyncio as aioredis

from ratequeue.jobstore import keys
from ratequeue.jobstore.codec import text
from ratequeue.jobstore.keys import pair_field as pair_field  # re-exported: the worker imports it from here
from ratequeue.jobstore.scripts import lua_source
from ratequeue.redact import redact


@dataclass(frozen=True)
class Parked:
    reason: str
    message: str
    since: float  # s since epoch: when the pair was first parked (kept across failed probes)
    cooldown: float
    last_probe: float | None = None  # s since epoch: the last (re-)park, by a failed probe or the first

    @classmethod
    def loads(cls, raw: bytes | str) -> Parked:
        d = orjson.loads(raw)
        return cls(d["reason"], d["message"], float(d["since"]), float(d["cooldown"]),
                   float(d["last_probe"]) if d.get("last_probe") is not None else None)


class Parking:
    """Reads (cached for ``cache_ttl`` seconds) and writes the parked pairs of one Redis."""

    def __init__(self, redis: aioredis.Redis, cache_ttl: float = 1.0) -> None:
        self._redis = redis
        self._ttl = cache_ttl
        self._cache: tuple[float, dict[str, Parked]] = (0.0, {})
        self._park = redis.register_script(lua_source("park", "ratequeue.worker"))

    async def state(self, account: str, model: str, fresh: bool = False) -> Parked | None:
        """The pair's parking record (read at most ``cache_ttl`` s ago, or now if ``fresh``)."""
        fetched, pairs = self._cache
        if fresh or time.monotonic() - fetched > self._ttl:
            raw = await self._redis.hgetall(keys.parked_pairs())
            pairs = {text(k): Parked.loads(v) for k, v in raw.items()}
            self._cache = (time.monotonic(), pairs)
        return pairs.get(pair_field(account, model))

    async def park(self, account: str, model: str, reason: str, message: str, cooldown: float) -> None:
        """Pause the pair; no probe before ``cooldown`` seconds have passed."""
        # The message comes from the upstream (already redacted by the runner); redacting again here
        # keeps a key-shaped string out of the one record every `status` prints, whoever calls.
        entry = {"reason": reason, "message": redact(message)[:500], "cooldown": cooldown}
        await self._park(
            keys=[keys.parked_pairs(), keys.probe_lock(account, model)],
            args=[pair_field(account, model), orjson.dumps(entry), repr(time.time()), int(cooldown * 1000)],
        )
        self._cache = (0.0, {})

    async def take_probe(self, account: str, model: str, cooldown: float) -> float | None:
        """None when this caller may send the probe; else seconds until the next probe may go."""
        got = await self._redis.set(keys.probe_lock(account, model), "probe", nx=True, px=int(cooldown * 1000))
        if got:
            return None
        ttl_ms = await self._redis.pttl(keys.probe_lock(account, model))
        return max(ttl_ms, 100) / 1000.0

    async def note_deferred(self, account: str, model: str, member: str, cooldown: float) -> None:
        """Remember a job deferred because the pair is parked (``member`` of the deferred set)."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.sadd(keys.parked_jobs(account, model), member)
            # Outlives the longest wait it serves; an unpark deletes it before that.
            pipe.expire(keys.parked_jobs(account, model), int(cooldown) + 3600)
            await pipe.execute()

    async def unpark(self, account: str, model: str) -> None:
        """Restart the pair: its deferred jobs become due now (the worker's copy of
        ``jobstore.deferrals.wake_pair``, for a probe that succeeded)."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hdel(keys.parked_pairs(), pair_field(account, model))
            pipe.delete(keys.probe_lock(account, model))
            pipe.smembers(keys.parked_jobs(account, model))
            pipe.delete(keys.parked_jobs(account, model))
            *_, waiting, _ = await pipe.execute()
        self._cache = (0.0, {})
        if waiting:
            await self._redis.zadd(keys.deferred_jobs(), dict.fromkeys(waiting, 0), xx=True)

