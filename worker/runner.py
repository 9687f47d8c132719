"""One job, from its chunk to its stored outcome (or a deferral): the heart of the worker.

    parked pair?   -> defer, unless this job takes the one probe of the cooldown
    gate.acquire   -> wait for the shared bucket; past defer_after: defer (frees the chunk slot)
    call upstream  -> learn limits from the headers, reconcile the bucket
    SUCCESS        -> store the result (and unpark the pair if this was the probe)
    FAIL           -> store the upstream error
    PARK           -> park the pair, defer the job (it stays queued, not failed)
    RETRY          -> count the attempt in Redis; a 429 sets the pair's shared "not before" so every
                      worker pauses; other errors back off (tenacity full jitter) here or, if long,
                      in the deferred set. Waiting for capacity never counts as an attempt.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ratequeue.config.models import ModelSpec, ModelTable
from ratequeue.config.settings import Settings
from ratequeue.errors import RequestTooLargeError, UnknownModelError
from ratequeue.jobstore import keys
from ratequeue.jobstore.jobs import StoredJob
from ratequeue.redact import configured_secrets, redact_response
from ratequeue.worker import metrics
from ratequeue.worker.feedback import MAX_SERVER_WAIT, RateLimitHeaders, parse_ratelimit_headers
from ratequeue.worker.gate import BucketGate, CapacityTimeout, GateRegistry
from ratequeue.worker.learned import Learned
from ratequeue.worker.limiter import BucketLimits, Limiter
from ratequeue.worker.outcomes import Outcomes
from ratequeue.worker.parking import Parking, pair_field
from ratequeue.worker.policy import Backoff, Classified, Verdict, classify
from ratequeue.worker.reconciler import Reconciler
from ratequeue.worker.store import BatchState, JobStore
from ratequeue.worker.upstream import UpstreamClient, UpstreamResponse
from ratequeue.worker.usage import Usage, usage_of

log = logging.getLogger(__name__)


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
    ) -> None:
        self.settings = settings
        self.table = table
        self.limiter = limiter
        self.gates = GateRegistry(limiter)
        self.reconciler = Reconciler(limiter)
        self.store = store
        self.outcomes = Outcomes(store)
        self.client = client
        self.parking = parking
        self.backoff = Backoff()
        self.in_flight = asyncio.Semaphore(settings.max_in_flight)
        self.learned = Learned(settings, store.redis)

    async def run(self, state: BatchState, job: StoredJob, started: float) -> bool:
        """Run one job; True when its outcome is stored, False when it was deferred."""
        batch_id, s = state.batch_id, self.settings
        stop_code = await self._stop_code(state)
        if stop_code:
            what = "was cancelled" if stop_code == "batch_cancelled" else "expired"
            await self.outcomes.fail(batch_id, job, stop_code, f"the batch {what} before this request ran")
            return True
        try:
            spec = self.table.get(job.model)
        except UnknownModelError as exc:
            await self.outcomes.fail(batch_id, job, "model_not_found", str(exc), param="body.model")
            return True
        account = state.account
        pair = pair_field(account, spec.name)
        gate = await self._gate(account, spec)

        def price() -> int:  # called when the reservation is made: a rule learned meanwhile applies
            return job.charge_under(self.learned.rule(pair, spec))

        charge = price()
        if charge > gate.limits.tpm:
            err = RequestTooLargeError(charge, gate.limits.tpm, spec.name)
            await self.outcomes.fail(batch_id, job, err.code, err.reason, param="body")
            return True
        key = keys.bucket_key(account, spec.name)
        deadline = started + s.job_deadline_seconds
        while True:
            if time.time() > deadline:
                await self._give_up(batch_id, job, "deadline_exceeded")
                return True
            parked = await self.parking.state(account, spec.name)
            if parked is not None:
                wait = await self.parking.take_probe(account, spec.name, s.park_cooldown_seconds)
                if wait is not None:
                    await self.store.defer(batch_id, job.custom_id, wait)
                    metrics.deferred(spec.name, account, "parked")
                    return False
            try:
                grant = await gate.acquire(
                    price(), timeout=max(0.0, min(s.defer_after_seconds, deadline - time.time())), price=price
                )
            except CapacityTimeout as exc:
                await self.store.defer(batch_id, job.custom_id, _redis_wait(max(exc.retry_in, 0.5)))
                metrics.deferred(spec.name, account, "capacity")
                return False
            except RequestTooLargeError as exc:  # limits learned lower, or a dearer rule, meanwhile
                await self.outcomes.fail(batch_id, job, exc.code, exc.reason, param="body")
                return True
            metrics.waited_for_capacity(spec.name, account, grant.waited)
            rule = self.learned.rule(pair, spec)
            charge = job.charge_under(rule)
            if charge > grant.cost:  # granted at the old price just before a dearer rule was learned
                self.reconciler.add(key, gate.limits, token_delta=grant.cost - charge)
            if parked is None and await self.parking.state(account, spec.name) is not None:
                # Parked while this job waited for its send time: give the capacity back, wait.
                self.reconciler.add(key, gate.limits, token_delta=charge, request_delta=1)
                await self.store.defer(batch_id, job.custom_id, s.park_cooldown_seconds)
                metrics.deferred(spec.name, account, "parked")
                return False
            async with self.in_flight:
                with metrics.in_flight(spec.name, account):
                    resp = await self.client.post(job.url, job.body, f"{batch_id}/{job.custom_id}")
            verdict = classify(resp, park_after=s.park_retry_after_seconds)
            if verdict.verdict is not Verdict.SUCCESS:  # the boundary: an upstream error may echo the key
                resp = redact_response(resp, configured_secrets(s))
            usage = usage_of(resp.body) if verdict.verdict is Verdict.SUCCESS else None
            headers = parse_ratelimit_headers(resp.headers)
            metrics.record_response(
                spec.name,
                account,
                status=resp.status,
                outcome=verdict.verdict.value,
                reason=verdict.reason,
                latency_s=resp.elapsed,
                charge=charge,
                usage=usage,
                cost_usd=metrics.cost_usd(spec, usage),
                estimated_prompt_tokens=job.prompt_tokens,
                limit_requests=headers.limit_requests,
                limit_tokens=headers.limit_tokens,
            )
            self.learned.learn_limits(pair, spec, headers, gate)
            if verdict.verdict is Verdict.SUCCESS:
                self.learned.check_rule(pair, rule, job, headers)
            self._reconcile(key, gate.limits, rule, job, charge, verdict, usage, headers)
            log.info(
                "upstream model=%s charge=%d status=%s reason=%s latency=%.3fs request_id=%s",
                spec.name, charge, resp.status, verdict.reason, resp.elapsed, resp.request_id,
            )
            if verdict.verdict is Verdict.SUCCESS:
                if self.learned.throttled(pair):
                    self.learned.adjust_throttle(pair, spec, gate, refused=False)
                if parked is not None:
                    log.warning("probe succeeded: %s unparked", pair_field(account, spec.name))
                    await self.parking.unpark(account, spec.name)
                await self.outcomes.succeed(batch_id, job, spec, resp, usage or Usage())
                return True
            if verdict.verdict is Verdict.FAIL:
                await self.outcomes.upstream_error(batch_id, job, resp, verdict.reason)
                return True
            message = _message(resp)
            if verdict.verdict is Verdict.PARK:
                # The server's wait, but never longer than the cap: it is re-checked by a probe.
                cooldown = _redis_wait(max(s.park_cooldown_seconds, min(
                    verdict.retry_after or 0.0, max(s.park_max_cooldown_seconds, s.park_cooldown_seconds))))
                if verdict.retry_after is not None:
                    message = f"the server asked to wait {verdict.retry_after:.0f} s: {message}"
                log.error("parking %s for %.0f s: %s", pair_field(account, spec.name), cooldown, verdict.reason)
                await self.parking.park(account, spec.name, verdict.reason, message, cooldown)
                await self.store.defer(batch_id, job.custom_id, cooldown)
                metrics.deferred(spec.name, account, "parked")
                return False
            attempts = await self.store.record_attempt(batch_id, job.custom_id, resp.status, message)
            if attempts >= s.max_attempts:
                await self._give_up(batch_id, job, "max_attempts_exceeded")
                return True
            delay = _redis_wait(self.backoff.delay(attempts, verdict))
            metrics.retry(spec.name, account, verdict.reason)
            if verdict.reason.startswith("rate_limit"):
                # One 429 pauses every worker on every host: the gate honours the shared time.
                await self.limiter.set_not_before(key, delay)
                if headers.limit_tokens is None and headers.limit_requests is None:
                    self.learned.adjust_throttle(pair, spec, gate, refused=True)
                continue
            if delay > s.defer_after_seconds:
                await self.store.defer(batch_id, job.custom_id, delay)
                metrics.deferred(spec.name, account, "backoff")
                return False
            await asyncio.sleep(delay)

    async def _stop_code(self, state: BatchState) -> str | None:
        if state.status in ("cancelling", "cancelled"):
            return "batch_cancelled"
        if state.status == "expired":
            return "batch_expired"
        if state.expires_at is not None and time.time() > state.expires_at:
            await self.store.mark_expired(state.batch_id)
            return "batch_expired"
        return None

    async def _give_up(self, batch_id: str, job: StoredJob, code: str) -> None:
        attempts, last = await self.store.attempts(batch_id, job.custom_id)
        history = {"attempts": attempts, "last_status": last.get("status"), "last_message": last.get("message", "")}
        await self.outcomes.gave_up(batch_id, job, code, history)

    async def _gate(self, account: str, spec: ModelSpec) -> BucketGate:
        pair = pair_field(account, spec.name)
        await self.learned.load(pair)
        metrics.set_limits(spec.name, account, spec.rpm, spec.tpm, "configured")
        return self.gates.get(keys.bucket_key(account, spec.name), self.learned.limits(pair, spec))

    def _reconcile(
        self,
        key: str,
        limits: BucketLimits,
        rule: str,
        job: StoredJob,
        charge: int,
        verdict: Classified,
        usage: Usage | None,
        headers: RateLimitHeaders,
    ) -> None:
        """Correct the shared bucket with what the server reported about this request."""
        token_delta = 0
        # A 429 is not refunded, although the server charged it no tokens: it proves our bucket
        # held more than the server's by at least about `charge`, and keeping the charge pays
        # that back. Refunding it kept a hidden debt (from requests the server priced higher than
        # we did) alive for ever: every send after the refund drew another 429.
        if usage is not None and usage.prompt_tokens and rule == "sum":
            # Under the sum rule the server charged its own prompt count plus the same reserved
            # output, so the difference of the prompt counts is exactly what we over/under-charged.
            token_delta = job.prompt_tokens - usage.prompt_tokens
        if token_delta == 0 and headers.remaining_tokens is None and headers.remaining_requests is None:
            return
        self.reconciler.add(
            key,
            limits,
            token_delta=token_delta,
            remaining_tokens=headers.remaining_tokens,
            remaining_requests=headers.remaining_requests,
        )


def _message(resp: UpstreamResponse) -> str:
    if resp.body_problem is not None and 200 <= resp.status < 300:
        return resp.describe_problem()  # the body's first bytes: what the server really sent
    return str(resp.error.get("message") or resp.transport_error or f"HTTP {resp.status}")


def _redis_wait(seconds: float) -> float:
    """A wait that is safe to turn into Redis milliseconds (PX, ZADD scores): finite, 0 to a day."""
    if seconds != seconds:  # NaN: no wait is known; the shortest sane one
        return 0.5
    return min(max(seconds, 0.0), MAX_SERVER_WAIT)
