"""Settling an answered call: store it, retry it, park its pair, or defer the job.

    SUCCESS  store the result (and unpark the pair if this was the probe)
    FAIL     store the upstream error ("Request too large": as ``request_too_large``, at once; its
             charge is refunded by the runner: the server weighed it against nothing)
    PARK     park the pair, defer the job (it stays queued, not failed)
    RETRY    a rate-limit 429 is not an attempt (only the job's deadline bounds it): it sets the
             pair's shared "not before" so every worker pauses, and goes round again at once (the
             gate honours that time). Other errors count the attempt in Redis (past max_attempts:
             give up, with the history) and back off (full jitter) here or, if long, in the
             deferred set. Waiting for capacity never counts as an attempt; nor does a refusal
             of a concurrency-bound server ("overloaded": its window was cut, worker.concurrency),
             retried after a short jittered wait.
"""

from __future__ import annotations

import logging
import re

from ratequeue.config.settings import Settings
from ratequeue.errors import RequestTooLargeError
from ratequeue.jobstore.keys import DEFERRED_SEP
from ratequeue.worker.attempt import STORED, Deferral, End, JobRun, Sent, Step
from ratequeue.worker.feedback import MAX_SERVER_WAIT
from ratequeue.worker.learned import Learned
from ratequeue.worker.limiter import Limiter
from ratequeue.worker.outcomes import Outcomes
from ratequeue.worker.parking import Parking
from ratequeue.worker.policy import Backoff, Reason, Verdict
from ratequeue.worker.store import JobStore
from ratequeue.worker.upstream import UpstreamResponse
from ratequeue.worker.usage import Usage

log = logging.getLogger(__name__)

# "Request too large for gpt-4o ... (TPM): Limit 30000, Requested 31538." (OpenAI's 429)
_LIMIT = re.compile(r"\bLimit (\d+)")
_REQUESTED = re.compile(r"\bRequested (\d+)")
# Error codes of jobs the worker gave up on (stored in the error line; the job_failures code label).
DEADLINE_EXCEEDED = "deadline_exceeded"
MAX_ATTEMPTS_EXCEEDED = "max_attempts_exceeded"


class Settler:
    """Turns a classified answer (or a deferral, or giving up) into what is written to Redis."""

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        outcomes: Outcomes,
        parking: Parking,
        limiter: Limiter,
        learned: Learned,
    ) -> None:
        self.settings = settings
        self.store = store
        self.outcomes = outcomes
        self.parking = parking
        self.limiter = limiter
        self.learned = learned
        self.backoff = Backoff()

    async def settle(self, run: JobRun, sent: Sent) -> Step:
        """Act on the verdict of ``sent``."""
        verdict = sent.verdict.verdict
        if verdict is Verdict.SUCCESS:
            return await self._succeed(run, sent)
        if sent.verdict.kind is Reason.REQUEST_TOO_LARGE:
            return await self._too_large(run, sent)
        if verdict is Verdict.FAIL:
            await self.outcomes.upstream_error(run.batch_id, run.job, sent.resp, sent.verdict.reason)
            return STORED
        if verdict is Verdict.PARK:
            return await self._park(run, sent)
        return await self._retry(run, sent)

    async def defer(self, run: JobRun, seconds: float, why: Deferral) -> Step:
        """Move the job to the deferred set for ``seconds``; its chunk slot is freed.

        A job deferred for a parked pair is noted, so that unparking makes it due at once. If the
        pair was unparked before the note (this worker's parked state was up to a second old),
        that unpark could not see it: it is made due here.
        """
        await self.store.defer(run.batch_id, run.job.custom_id, seconds)
        if why is Deferral.PARKED:
            member = f"{run.batch_id}{DEFERRED_SEP}{run.job.custom_id}"
            await self.parking.note_deferred(run.account, run.spec.name, member, seconds)
            if await self.parking.state(run.account, run.spec.name, fresh=True) is None:
                await self.store.defer(run.batch_id, run.job.custom_id, 0.0)
        return Step(End.DEFERRED, why)

    async def give_up(self, run: JobRun, code: str) -> Step:
        """Store the job as failed with ``code``; the error carries its attempts and last failure."""
        attempts, last = await self.store.attempts(run.batch_id, run.job.custom_id)
        history = {"attempts": attempts, "last_status": last.get("status"), "last_message": last.get("message", "")}
        await self.outcomes.gave_up(run.batch_id, run.job, code, history)
        return STORED

    async def _succeed(self, run: JobRun, sent: Sent) -> Step:
        if self.learned.throttled(run.pair):
            self.learned.adjust_throttle(run.pair, run.spec, run.gate, refused=False)
        if sent.probe:
            log.warning("probe succeeded: %s unparked", run.pair)
            await self.parking.unpark(run.account, run.spec.name)
        await self.outcomes.succeed(run.batch_id, run.job, run.spec, sent.resp, sent.usage or Usage())
        return STORED

    async def _too_large(self, run: JobRun, sent: Sent) -> Step:
        """The server can never accept it (larger than its TPM): the same error line as the
        start-of-run check, with the server's own figures when its message has them."""
        message = str(sent.resp.error.get("message") or "")
        limit = _figure(_LIMIT, message) or self.learned.tpm(run.pair, run.spec)
        err = RequestTooLargeError(_figure(_REQUESTED, message) or sent.charge, limit, run.spec.name)
        await self.outcomes.fail(run.batch_id, run.job, err.code, f"{err.reason} (said the server)", param="body")
        return STORED

    async def _park(self, run: JobRun, sent: Sent) -> Step:
        s, verdict = self.settings, sent.verdict
        # The server's wait, but never longer than the cap: it is re-checked by a probe.
        cooldown = redis_wait(max(s.park_cooldown_seconds, min(
            verdict.retry_after or 0.0, max(s.park_max_cooldown_seconds, s.park_cooldown_seconds))))
        message = failure_message(sent.resp)
        if verdict.retry_after is not None:
            message = f"the server asked to wait {verdict.retry_after:.0f} s: {message}"
        log.error("parking %s for %.0f s: %s", run.pair, cooldown, verdict.reason)
        await self.parking.park(run.account, run.spec.name, verdict.reason, message, cooldown)
        return await self.defer(run, cooldown, Deferral.PARKED)

    async def _retry(self, run: JobRun, sent: Sent) -> Step:
        s = self.settings
        if sent.verdict.kind.rate_limited:
            # A rate-limit refusal is waiting for capacity, not a failed attempt (issue 11): on a
            # shared account another client's spending would otherwise fail our jobs. The job's
            # deadline still bounds it; the pace adapts (the runner told the shared bucket). Kept
            # as the last failure, so that a job past its deadline says what it waited for.
            await self.store.record_attempt(
                run.batch_id, run.job.custom_id, sent.resp.status, failure_message(sent.resp), count=False
            )
            delay = redis_wait(self.backoff.delay(1, sent.verdict))
            # One 429 pauses every worker on every host: the gate honours the shared time.
            await self.limiter.set_not_before(run.key, delay)
            if sent.headers.limit_tokens is None and sent.headers.limit_requests is None:
                self.learned.adjust_throttle(run.pair, run.spec, run.gate, refused=True)
            return Step(End.AGAIN)
        if sent.verdict.kind is Reason.OVERLOADED:
            # The server's queue is full: the pair's window, cut by this answer, paces the retry;
            # no shared pause (the other workers' windows judge their own answers).
            await self.store.record_attempt(
                run.batch_id, run.job.custom_id, sent.resp.status, failure_message(sent.resp), count=False
            )
            delay = redis_wait(self.backoff.delay(1, sent.verdict))
            if delay > s.defer_after_seconds:
                return await self.defer(run, delay, Deferral.BACKOFF)
            return Step(End.AGAIN, delay=delay)
        attempts = await self.store.record_attempt(
            run.batch_id, run.job.custom_id, sent.resp.status, failure_message(sent.resp)
        )
        if attempts >= s.max_attempts:
            return await self.give_up(run, MAX_ATTEMPTS_EXCEEDED)
        delay = redis_wait(self.backoff.delay(attempts, sent.verdict))
        if delay > s.defer_after_seconds:
            return await self.defer(run, delay, Deferral.BACKOFF)
        return Step(End.AGAIN, delay=delay)


def _figure(pattern: re.Pattern[str], message: str) -> int | None:
    match = pattern.search(message)
    return int(match.group(1)) if match else None


def failure_message(resp: UpstreamResponse) -> str:
    """What an attempt's failure is recorded as: the server's message, the transport error, or the
    first bytes of a 2xx body that was not a JSON object."""
    if resp.body_problem is not None and 200 <= resp.status < 300:
        return resp.describe_problem()  # the body's first bytes: what the server really sent
    return str(resp.error.get("message") or resp.transport_error or f"HTTP {resp.status}")


def redis_wait(seconds: float) -> float:
    """A wait that is safe to turn into Redis milliseconds (PX, ZADD scores): finite, 0 to a day."""
    if seconds != seconds:  # NaN: no wait is known; the shortest sane one
        return 0.5
    return min(max(seconds, 0.0), MAX_SERVER_WAIT)
