"""The account-wide charge ledger: what every worker sent on an (account, model), in send order.

``x-ratelimit-remaining-tokens`` counts everyone's use of the account. Compared with one process's
own requests it misreads the charge rule as soon as two processes share the account (issue 11:
"server seems to charge by 'sum'" 9 times per run against a max-rule server, 2 workers). So each
send first adds its charge under both rules to running totals in Redis and gets the totals back
(one ``charge_ledger.lua`` call): the difference of two tickets is exactly what the whole
deployment sent between two of this process's requests, whichever worker sent it. A 429 was not
charged by the server, so its charges are taken back (the sequence number stays).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from ratequeue.jobstore import keys
from ratequeue.jobstore.jobs import StoredJob
from ratequeue.jobstore.scripts import lua_source

log = logging.getLogger(__name__)
KEEP_MS = 3_600_000  # a ledger idle for an hour is dropped; a new one simply starts from 0


@dataclass(frozen=True)
class Ticket:
    """One request's place in the ledger: when this process sent it (its monotonic clock) and the
    ledger's totals including it. Only tickets of one process are ever compared."""

    at: float
    n: int
    sum_total: int
    max_total: int


class ChargeLedger:
    """Records sends and refunds in ``keys.charge_ledger``; a Redis error costs an observation, never a send."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._script = redis.register_script(lua_source("charge_ledger", "ratequeue.worker"))
        self._background: set[asyncio.Future[object]] = set()

    async def record(self, account: str, model: str, job: StoredJob) -> Ticket | None:
        """Add one send; its ticket, or None when Redis did not answer."""
        at = time.monotonic()
        try:
            n, sum_total, max_total = await self._script(
                keys=[keys.charge_ledger(account, model)],
                args=[1, job.charge_under("sum"), job.charge_under("max"), KEEP_MS],
            )
        except Exception as exc:  # the rule check loses one observation; the call goes ahead
            log.debug("charge ledger not updated: %s", exc)
            return None
        return Ticket(at, int(n), int(sum_total), int(max_total))

    def refund(self, account: str, model: str, job: StoredJob) -> None:
        """Take back a send the server refused without charging (a 429), without waiting."""
        args = [0, -job.charge_under("sum"), -job.charge_under("max"), KEEP_MS]
        future = asyncio.ensure_future(self._script(keys=[keys.charge_ledger(account, model)], args=args))
        self._background.add(future)
        future.add_done_callback(self._done)

    def _done(self, future: asyncio.Future[object]) -> None:
        self._background.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.debug("charge ledger refund lost: %s", future.exception())
