"""One job, from its chunk to its stored outcome (or a deferral): the heart of the worker.

A run is a loop of passes; each pass is a few steps with one job each:

    start      the batch stopped? the model unknown? the request over the TPM limit? -> fail now
    admit      past the deadline -> give up; pair parked -> defer, unless this job takes the probe
    acquire    wait for the shared bucket; past defer_after: defer (frees the chunk slot)
    send       call upstream, classify the answer (``worker.policy``), redact an error
               (just before: the batch cancelled or paused meanwhile? -> give the capacity back)
    learn      limits and the charge rule from the headers; reconcile the bucket
    settle     store / retry / park / defer (``worker.settle``)

Each pass ends in a ``Step`` (``worker.attempt``): stored, deferred, dropped or again. Its metrics
are recorded once, by ``worker.attempt.observe``, whatever the branch.

Cancel and pause (issue 10): every pass, and every send, first reads the batch's state, which
``worker.batchwatch`` keeps fresh within 0.25 s; a wait for the bucket or a backoff sleep is cut
short when the batch halts. A cancelled batch's job fails as ``batch_cancelled``; a paused one's
is dropped (lease released, no outcome: ``resume`` enqueues it again). Calls in flight finish.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ratequeue.config.accounts_load import implicit_table
from ratequeue.config.charge import ChargeRule
from ratequeue.config.models import ModelSpec, ModelTable
from ratequeue.config.settings import Settings
from ratequeue.errors import InvalidRequestError, RequestTooLargeError
from ratequeue.jobstore import keys
from ratequeue.jobstore.jobs import StoredJob
from ratequeue.redact import configured_secrets, redact_response
from ratequeue.worker import metrics
from ratequeue.worker.attempt import STORED, Deferral, End, JobRun, Pass, Sent, Step, observe
from ratequeue.worker.backlog import Backlog, job_ref
from ratequeue.worker.batchwatch import BatchState
from ratequeue.worker.budget import Budgets, Refusal
from ratequeue.worker.concurrency import ConcurrencyWindows
from ratequeue.worker.correction import correction
from ratequeue.worker.feedback import parse_ratelimit_headers
from ratequeue.worker.gate import BucketGate, CapacityTimeout, GateRegistry, Grant
from ratequeue.worker.inflight import FairInFlight
from ratequeue.worker.learned import Learned
from ratequeue.worker.limiter import BucketLevels, Limiter
from ratequeue.worker.outcomes import Outcomes
from ratequeue.worker.parking import Parked, Parking, pair_field
from ratequeue.worker.policy import Verdict, classify
from ratequeue.worker.reconciler import Reconciler
from ratequeue.worker.reschedule import Rescheduler
from ratequeue.worker.routing import Routing
from ratequeue.worker.settle import DEADLINE_EXCEEDED, Settler, redis_wait
from ratequeue.worker.store import JobStore
from ratequeue.worker.upstream import UpstreamClient
from ratequeue.worker.usage import usage_of

log = logging.getLogger(__name__)

_STOPPED = {"batch_cancelled": "was cancelled", "batch_expired": "expired"}  # stop code -> what happened


class JobRunner:
    """Runs jobs on one event loop; shares the loop's clients, gates and learned limits."""

    def __init__(
        self,
        settings: Settings,
        table: ModelTable,
        limiter: Limiter,
        store: JobStore,
        client: UpstreamClient,
        parking: Parking,
        routing: Routing | None = None,
    ) -> None:
        self.settings = settings
        self.table = table
        self.routing = routing or Routing(implicit_table(settings, table))
        self.limiter = limiter
        self.gates = GateRegistry(limiter)
        self.backlog = Backlog()  # each pair's jobs waiting here: slots are not held for long waits
        self.reconciler = Reconciler(limiter)
        self.store = store
        self.outcomes = Outcomes(store)
        self.client = client
        self.parking = parking
        self.in_flight = FairInFlight(settings.max_in_flight)  # divided among pairs by rate
        # A self-hosted server's pairs: calls in flight capped by an adaptive window (issue 13).
        self.windows = ConcurrencyWindows(settings.max_concurrency_per_model, self.in_flight)
        self.learned = Learned(settings, store.redis)
        self._priced: dict[str, ChargeRule] = {}  # pair -> the rule its deferred work here was priced by
        self.rescheduler = Rescheduler(self.backlog, store.redis)  # deferred work back sooner
        self.settler = Settler(settings, store, self.outcomes, parking, limiter, self.learned)
        self.budgets = Budgets(settings, store.redis)

    async def run(self, state: BatchState, job: StoredJob, started: float) -> bool:
        """Run one job; True when its outcome is stored, False when it was deferred or dropped."""
        watch = self.store.watch
        async with watch.watching(state.batch_id):
            run = await self._start(state, job, started)
            if isinstance(run, Step):
                return run.end is End.STORED
            while True:
                done = Pass()
                try:
                    step = done.step = await self._pass(run, done)
                finally:
                    observe(run, done)
                if step.end is not End.AGAIN:
                    return step.end is End.STORED
                if step.delay is not None:
                    await watch.unless_halted(run.batch_id, asyncio.sleep(step.delay))

    async def _start(self, state: BatchState, job: StoredJob, started: float) -> JobRun | Step:
        """The job's run, or the step that ended it before any call (stored error, or dropped)."""
        batch_id = state.batch_id
        halt = await self._halt(batch_id, job)
        if halt is not None:
            return halt
        try:
            target = self.routing.target(state.account, job, batch_id)
        except InvalidRequestError as exc:  # an unknown model, or an account or deployment the configuration lost
            await self.outcomes.fail(batch_id, job, exc.code, exc.reason, param=exc.field)
            return STORED
        if target.refused is not None:  # never sent with another key: left to a worker holding it
            s = self.settings
            return await self.routing.refuse(self.store, self.outcomes, batch_id, job, target,
                                             started + s.job_deadline_seconds, s.park_cooldown_seconds)
        spec = target.spec
        # An Azure deployment's window (window_seconds) bounds its bucket's burst (worker.window).
        self.learned.windows.bound(pair_field(target.account, spec.name), target.route.window_seconds)
        gate = await self._gate(target.account, spec)
        run = JobRun(batch_id, job, spec, target.account, gate, started + self.settings.job_deadline_seconds,
                     target.route)
        charge = self._price(run)
        tpm = self.learned.tpm(run.pair, spec)  # the server's, once learned (from any worker), else configured
        if charge > min(tpm, gate.limits.tpm):
            err = RequestTooLargeError(charge, tpm, spec.name)
            await self.outcomes.fail(batch_id, job, err.code, err.reason, param="body")
            return STORED
        return run

    async def _halt(self, batch_id: str, job: StoredJob) -> Step | None:
        """The step that ends the job now if its batch stopped, was paused or is gone, else None."""
        state = await self.store.batch_state(batch_id)
        if state is not None and state.paused and not state.stopped:
            # Read again before dropping: a resume unpauses just before it enqueues the jobs again,
            # and a job dropped on a stale read would then wait for ever.
            state = await self.store.watch.state(batch_id, max_age=0.0)
        if state is None:  # deleted: nothing to store, nothing to call
            return Step(End.DROPPED)
        stop_code = await self._stop_code(state)
        if stop_code:
            message = f"the batch {_STOPPED[stop_code]} before this request ran"
            await self.outcomes.fail(batch_id, job, stop_code, message)
            return STORED
        if state.paused:
            await self.store.release(batch_id, job.custom_id)
            return Step(End.DROPPED)
        return None

    async def _pass(self, run: JobRun, done: Pass) -> Step:
        """One try: admit, acquire, send, learn, settle; fills ``done`` as it goes."""
        if halt := await self._halt(run.batch_id, run.job):
            return halt
        if time.time() > run.deadline:
            return await self.settler.give_up(run, DEADLINE_EXCEEDED)
        parked = await self.parking.state(run.account, run.spec.name)
        if parked is not None:
            wait = await self.parking.take_probe(run.account, run.spec.name, self.settings.park_cooldown_seconds)
            if wait is not None:
                return await self.settler.defer(run, wait, Deferral.PARKED)
        if self.budgets.refused_lately(run.batch_id) and (
                refusal := await self.budgets.precheck(run.batch_id, run.spec, run.job)):  # before taking capacity
            return await self.budgets.defer(self.settler, run, refusal)
        grant = await self._acquire(run)
        if isinstance(grant, Step):
            return grant
        done.waited = grant.waited
        rule = self.learned.rule(run.pair, run.spec)
        charge = run.job.charge_under(rule)
        if charge > grant.cost:  # granted at the old price just before a dearer rule was learned
            self.reconciler.add(run.key, run.gate.limits, token_delta=grant.cost - charge)
        if await self._parked_meanwhile(run, parked, charge):
            return await self.settler.defer(run, self.settings.park_cooldown_seconds, Deferral.PARKED)
        if halt := await self._halt(run.batch_id, run.job):  # cancelled or paused while it waited
            self.reconciler.add(run.key, run.gate.limits, token_delta=charge, request_delta=1)
            return halt
        # The worst case held against the budgets while the call is out (worker.budget).
        held = None if self.budgets.known_free(run.batch_id) else await self.budgets.reserve(
            run.batch_id, run.spec, run.job)
        if isinstance(held, Refusal):
            self.reconciler.add(run.key, run.gate.limits, token_delta=charge, request_delta=1)
            return await self.budgets.defer(self.settler, run, held)
        try:
            sent = done.sent = await self._send(run, rule, charge, probe=parked is not None)
        finally:  # the actual cost replaces the reservation; a call that raised releases it
            if held is not None:
                await self.budgets.settle(held, metrics.cost_usd(run.spec, done.sent.usage if done.sent else None))
        self._learn(run, sent, grant.waited)
        return await self.settler.settle(run, sent)

    def _price(self, run: JobRun) -> int:
        """The job's charge under the rule in force now (a rule learned meanwhile applies)."""
        return run.job.charge_under(self.learned.rule(run.pair, run.spec))

    async def _acquire(self, run: JobRun) -> Grant | Step:
        """Capacity from the shared bucket, or the step that ends the pass without it."""
        ref = job_ref(run.batch_id, run.job.custom_id)
        # A job the engine admitted behind its pair's queue may wait for that queue too.
        patience = self.backlog.patience(ref, self.settings.defer_after_seconds)
        timeout = max(0.0, min(patience, run.deadline - time.time()))
        cost = self._price(run)
        # A job that would time out behind its pair's queue here is deferred now, not after
        # holding its chunk's slot for the whole timeout (worker.backlog: fair slots).
        defer = self.backlog.defer_for(run.key, run.gate.limits, cost, patience=timeout, job=ref)
        if defer is not None:
            return await self.settler.defer(run, redis_wait(defer), Deferral.CAPACITY)
        acquire = run.gate.acquire(cost, timeout=timeout, price=lambda: self._price(run))
        try:
            with self.backlog.waiting(run.key, run.gate.limits, cost, job=ref):
                grant = await self.store.watch.unless_halted(run.batch_id, acquire)
            # Halted while waiting (nothing charged): the next pass's check ends the job.
            return Step(End.AGAIN) if grant is None else grant
        except CapacityTimeout as exc:
            return await self.settler.defer(run, redis_wait(max(exc.retry_in, 0.5)), Deferral.CAPACITY)
        except RequestTooLargeError as exc:  # limits learned lower, or a dearer rule, meanwhile
            await self.outcomes.fail(run.batch_id, run.job, exc.code, exc.reason, param="body")
            return STORED

    async def _parked_meanwhile(self, run: JobRun, parked: Parked | None, charge: int) -> bool:
        """Was the pair parked while this job waited for its send time? Then give the capacity back."""
        if parked is not None or await self.parking.state(run.account, run.spec.name) is None:
            return False
        self.reconciler.add(run.key, run.gate.limits, token_delta=charge, request_delta=1)
        return True

    async def _send(self, run: JobRun, rule: ChargeRule, charge: int, probe: bool) -> Sent:
        """Call upstream and classify the answer; an error answer is redacted here."""
        limits = run.gate.limits  # the calls a second its limits allow at this call's price
        self.windows.before_send(run.pair, run.spec, run.account, run.route.max_concurrency if run.route else None)
        async with self.in_flight.slot(run.pair, min(limits.request_rate, limits.token_rate / max(charge, 1))):
            sent_with = self.in_flight.in_flight(run.pair)  # what its latency is judged against
            # Sent by the whole deployment up to this call: what the remaining-tokens header is compared with.
            ledgered = self.learned.ledger.record(run.account, run.spec.name, run.job)
            url, body, auth = self.routing.request(run.route, run.job)
            sent_at = time.monotonic()  # the server charges it on arrival (worker.reconciler)
            with metrics.in_flight(run.spec.name, run.account):
                resp = await self.client.post(url, body, f"{run.batch_id}/{run.job.custom_id}", auth)
            ticket = await self.learned.ledger.ticket_of(ledgered)
        bound = self.windows.answered(run.pair, run.spec, run.account, resp.status, resp.headers, resp.elapsed,
                                      sent_with)
        verdict = classify(resp, park_after=self.settings.park_retry_after_seconds, concurrency_bound=bound)
        success = verdict.verdict is Verdict.SUCCESS
        if not success:  # the boundary: an upstream error may echo the key
            resp = redact_response(resp, (*configured_secrets(self.settings), *self.routing.secrets()))
        usage = usage_of(resp.body) if success else None
        headers = self.routing.limits_per_minute(run.route, run.spec, parse_ratelimit_headers(resp.headers))
        return Sent(resp, verdict, rule, charge, usage, headers, probe, ticket, sent_at)

    def _learn(self, run: JobRun, sent: Sent, waited: float) -> None:
        """What the answer teaches: the limits, the charge rule, the bucket's true level."""
        self.learned.learn_limits(run.pair, run.spec, sent.headers, run.gate, sent.verdict.kind.rate_limited)
        if sent.verdict.verdict is Verdict.SUCCESS:
            self.learned.check_rule(run.pair, run.spec, sent.rule, run.job, sent.headers, sent.ticket)
        elif sent.resp.status == 429 and sent.ticket is not None:  # refused before the server charged it
            self.learned.ledger.refund(run.account, run.spec.name, run.job)
        self._reconcile(run, sent, waited)
        log.info(
            "upstream model=%s charge=%d status=%s reason=%s latency=%.3fs request_id=%s",
            run.spec.name, sent.charge, sent.resp.status, sent.verdict.reason, sent.resp.elapsed,
            sent.resp.request_id,
        )

    async def _stop_code(self, state: BatchState) -> str | None:
        if state.stop_code is not None:  # cancelling/cancelled, or finalizing/expired (the batch store's rule)
            return state.stop_code
        if state.expires_at is not None and time.time() > state.expires_at:
            await self.store.mark_expired(state.batch_id)
            return "batch_expired"
        return None

    async def _gate(self, account: str, spec: ModelSpec) -> BucketGate:
        pair = pair_field(account, spec.name)
        await self.learned.load(pair)
        metrics.set_limits(spec.name, account, spec.rpm, spec.tpm, "configured")
        rule = self.learned.rule(pair, spec)
        metrics.set_charge_rule(spec.name, account, rule, spec.max_output_tokens)
        if self._priced.setdefault(pair, rule) != rule:
            self._priced[pair] = rule
            await self.rescheduler.recall(keys.bucket_key(account, spec.name))
        gate = self.gates.get(keys.bucket_key(account, spec.name), self.learned.limits(pair, spec))
        if gate.limits.slow_start:  # another worker may hear the limits announced first
            self.learned.watch_announcement(pair, spec, gate)
        await self.rescheduler.reprice(gate.key, gate.limits, catch_up=False)  # each pass: answers catch up
        return gate

    def _follow(self, run: JobRun, levels: BucketLevels) -> None:
        """Spend at the shared bucket's share (worker.learned); price the work waiting here
        against what the bucket holds, and bring work deferred at a smaller share sooner."""
        self.learned.follow_share(run.pair, run.spec, run.gate, levels.share, levels.guessed)
        self.backlog.credit(run.key, run.gate.limits, levels.requests, levels.tokens)
        self.rescheduler.reprice_soon(run.key, run.gate.limits)

    def _reconcile(self, run: JobRun, sent: Sent, waited: float) -> None:
        """Correct the shared bucket with what the server reported about this request."""
        found = correction(sent, run.job.prompt_tokens, waited, self.settings.reserve_horizon_seconds,
                           self.learned.share_cut_at(run.pair))
        if found is None:
            return
        self.reconciler.add(
            run.key,
            run.gate.limits,
            token_delta=found.token_delta,
            remaining_tokens=sent.headers.remaining_tokens,
            remaining_requests=sent.headers.remaining_requests,
            refused=found.refused,
            answered=found.answered,
            charged=found.charged,
            on_levels=lambda levels: self._follow(run, levels),
            sent_at=sent.sent_at,
        )
