"""The account-wide charge ledger: what every worker sent on an (account, model), in send order.

``x-ratelimit-remaining-tokens`` counts everyone's use of the account. Compared with one process's
own requests it misreads the charge rule as soon as two processes share the account (issue 11:
"server seems to charge by 'sum'" 9 times per run against a max-rule server, 2 workers). So each
send adds its ``Terms`` (from which its charge under every candidate rule follows) to running
totals in Redis and gets the totals back (``charge_ledger.lua``): the difference of two tickets is
exactly what the whole
deployment sent between two of this process's requests, whichever worker sent it (sends are
batched per turn of the event loop: see ``ChargeLedger``). A 429 was not
charged by the server, so its charges are taken back (the sequence number stays).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import astuple, dataclass, field
from typing import Any

import redis.asyncio as aioredis

from ratequeue.config.charge import ChargeRule
from ratequeue.jobstore import keys
from ratequeue.jobstore.jobs import StoredJob
from ratequeue.jobstore.scripts import lua_source

log = logging.getLogger(__name__)
TICKET_WAIT = 1.0  # seconds an answer waits for its ledger ticket at most (then: no observation)
KEEP_MS = 3_600_000  # a ledger idle for an hour is dropped; a new one simply starts from 0


@dataclass(frozen=True)
class Terms:
    """What a request (or a stretch of the ledger) adds up to, so that its charge under any rule
    (config/charge.py) follows: requests that named their max output are priced under each
    (combine, n counted) pair; of those that did not, the server's own allowance per choice is
    unknown, so their prompts and choices are kept for it to be solved for."""

    sum: int = 0
    max: int = 0
    sum1: int = 0  # n not counted
    max1: int = 0
    dprompt: int = 0  # requests without a max output: prompt tokens
    dchoices: int = 0  # ... choices, n counted
    dprompts: int = 0  # ... requests (n not counted)

    @classmethod
    def of(cls, job: StoredJob) -> Terms:
        if job.output_defaulted:
            return cls(dprompt=job.prompt_tokens, dchoices=job.choices, dprompts=1)
        price = {(c, m): job.charge_under(ChargeRule(c, m)) for c in ("sum", "max") for m in (True, False)}
        return cls(price["sum", True], price["max", True], price["sum", False], price["max", False])

    def __add__(self, other: Terms) -> Terms:
        return Terms(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    def __sub__(self, other: Terms) -> Terms:
        return Terms(*(a - b for a, b in zip(astuple(self), astuple(other), strict=True)))

    def __neg__(self) -> Terms:
        return Terms() - self

    def total(self, rule: ChargeRule, missing: int) -> int:
        """The charge of all of it under `rule`, `missing` tokens per choice without a max (a
        max-rule charge taken as the allowance: it is the larger unless prompts are huge)."""
        explicit = getattr(self, rule.combine + ("" if rule.n_multiplies else "1"))
        allowance = missing * (self.dchoices if rule.n_multiplies else self.dprompts)
        return explicit + allowance + (self.dprompt if rule.combine == "sum" else 0)


@dataclass(frozen=True)
class Ticket:
    """One request's place in the ledger: when this process sent it (its monotonic clock) and the
    ledger's totals including it. Only tickets of one process are ever compared."""

    at: float
    n: int
    totals: Terms


@dataclass
class _Batch:
    """Sends of one pair within one turn of the event loop, added to the ledger in one call."""

    terms: Terms = Terms()
    waiting: list[tuple[float, asyncio.Future[Ticket | None]]] = field(default_factory=list)


class ChargeLedger:
    """Records sends and refunds in ``keys.charge_ledger``; a Redis error costs an observation, never a send.

    The sends of one turn of the event loop share one Redis call (at 1,000 calls/s a call per send
    cost ~20% of a worker's CPU), made while the requests are on their way: a send never waits for
    it. Requests of one batch share the ledger's totals after the batch; the few batch-mates sent
    after a request but counted before it are a symmetric error at both ends of a window.
    """

    def __init__(self, redis: aioredis.Redis) -> None:
        self._script = redis.register_script(lua_source("charge_ledger", "ratequeue.worker"))
        self._pending: dict[str, _Batch] = {}
        self._background: set[asyncio.Future[object]] = set()

    def record(self, account: str, model: str, job: StoredJob) -> asyncio.Future[Ticket | None]:
        """Add one send; its ticket comes when the batch is in the ledger (None if Redis did not answer).
        Read it with ``ticket_of`` once the answer is in (a send must never hang on it)."""
        key = keys.charge_ledger(account, model)
        loop = asyncio.get_running_loop()
        batch = self._pending.get(key)
        if batch is None:
            batch = self._pending[key] = _Batch()
            self._keep(loop.create_task(self._flush(key)))
        batch.terms += Terms.of(job)
        ticket: asyncio.Future[Ticket | None] = loop.create_future()
        batch.waiting.append((time.monotonic(), ticket))
        return ticket

    @staticmethod
    async def ticket_of(recorded: asyncio.Future[Ticket | None]) -> Ticket | None:
        """The ticket, once the answer is in: normally there long before; else waited for a
        second at most. Shielded: a send cancelled here must not cancel its batch-mates' ticket."""
        if not recorded.done():
            try:
                await asyncio.wait_for(asyncio.shield(recorded), TICKET_WAIT)
            except TimeoutError:
                return None
        return recorded.result()

    async def _flush(self, key: str) -> None:
        """Runs after the sends of this turn were recorded: one call for all of them."""
        batch = self._pending.pop(key)
        try:
            n, *totals = await self._script(keys=[key], args=[KEEP_MS, len(batch.waiting), *astuple(batch.terms)])
            terms: Terms | None = Terms(*map(int, totals))
        except Exception as exc:  # the rule check loses these observations; the calls went ahead
            log.debug("charge ledger not updated: %s", exc)
            terms = None
        for at, ticket in batch.waiting:
            if not ticket.done():  # a send cancelled meanwhile (shutdown) must not stop the others' tickets
                ticket.set_result(None if terms is None else Ticket(at, int(n), terms))

    def refund(self, account: str, model: str, job: StoredJob) -> None:
        """Take back a send the server refused without charging (a 429), without waiting."""
        args = [KEEP_MS, 0, *astuple(-Terms.of(job))]
        self._keep(asyncio.ensure_future(self._script(keys=[keys.charge_ledger(account, model)], args=args)))

    def _keep(self, future: asyncio.Future[Any]) -> None:
        """Hold a fire-and-forget call until it is done (a task nobody references may vanish)."""
        self._background.add(future)
        future.add_done_callback(self._done)

    def _done(self, future: asyncio.Future[Any]) -> None:
        self._background.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.debug("charge ledger call lost: %s", future.exception())
