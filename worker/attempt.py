"""What one pass of a job through the runner's loop knows, how it ended, and the one place its
metrics are recorded.

A job's run is a loop of passes (``worker.runner``): acquire capacity, send, classify, settle. A
pass ends in a ``Step``: the outcome is stored, the job is deferred (with a ``Deferral`` reason),
or it goes round again (after a short backoff, or at once for a 429, whose wait the gate honours).
``observe`` turns a finished pass into metrics; nothing else in the runner records any, except the
in-flight gauge, which must wrap the call itself.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ratequeue.config.accounts import Route
from ratequeue.config.charge import ChargeRule
from ratequeue.config.models import ModelSpec
from ratequeue.jobstore import keys
from ratequeue.jobstore.jobs import StoredJob
from ratequeue.worker import metrics
from ratequeue.worker.feedback import RateLimitHeaders
from ratequeue.worker.gate import BucketGate
from ratequeue.worker.ledger import Ticket
from ratequeue.worker.parking import pair_field
from ratequeue.worker.policy import Classified, Verdict
from ratequeue.worker.upstream import UpstreamResponse
from ratequeue.worker.usage import Usage


class End(enum.Enum):
    """How a pass ended."""

    STORED = "stored"  # the job's outcome is stored (a result or an error line)
    DEFERRED = "deferred"  # the job went to the deferred set; a worker requeues it when due
    AGAIN = "again"  # another pass now, in this coroutine (after ``Step.delay``)
    DROPPED = "dropped"  # its batch is paused (lease released, no outcome: a resume enqueues it) or gone


class Deferral(enum.StrEnum):
    """Why a job was deferred: the ``reason`` label of ``ratequeue_deferrals_total`` (keep the values)."""

    CAPACITY = "capacity"  # no capacity within defer_after
    BACKOFF = "backoff"  # a retry wait longer than defer_after
    PARKED = "parked"  # the pair is paused
    BUDGET = "budget"  # its worst-case cost does not fit its batch's or the day's budget (worker.budget)


@dataclass(frozen=True)
class Step:
    """The end of one pass."""

    end: End
    deferral: Deferral | None = None
    # Seconds to sleep before the next pass (End.AGAIN); None after a 429, whose wait the gate keeps.
    delay: float | None = None


STORED = Step(End.STORED)


@dataclass(frozen=True)
class JobRun:
    """One job on its way: what every step needs, fixed once its route and bucket are known.

    ``account`` and ``spec.name`` name the bucket (worker.routing.Target); ``route`` is where the
    call goes (None: the client's own base URL and key, as before accounts)."""

    batch_id: str
    job: StoredJob
    spec: ModelSpec
    account: str
    gate: BucketGate
    deadline: float  # time.time() after which the job gives up
    route: Route | None = None

    @property
    def pair(self) -> str:
        return pair_field(self.account, self.spec.name)

    @property
    def key(self) -> str:
        return keys.bucket_key(self.account, self.spec.name)


@dataclass(frozen=True)
class Sent:
    """One upstream call and what the policy made of it."""

    resp: UpstreamResponse  # redacted unless it is a success
    verdict: Classified
    rule: ChargeRule  # the charge rule it was priced under
    charge: int  # tokens it was charged in the bucket
    usage: Usage | None  # a success's usage, else None
    headers: RateLimitHeaders
    probe: bool  # the one request of a parked pair's cooldown
    ticket: Ticket | None = None  # its place in the account-wide charge ledger (worker/ledger.py)
    sent_at: float | None = None  # monotonic time just before the call went out


@dataclass
class Pass:
    """What one pass got to: filled in by the steps as they happen."""

    waited: float | None = None  # seconds the gate made it wait, once it granted capacity
    sent: Sent | None = None
    step: Step | None = None  # None when the pass raised


def observe(run: JobRun, done: Pass) -> None:
    """Record a finished pass's metrics: the seam between the runner and Prometheus.

    Called once per pass, also when it raised (a paid answer is counted even if storing it failed).
    Job outcomes are counted by ``worker.outcomes`` instead: only the store knows a line is new.
    """
    model, account = run.spec.name, run.account
    if done.waited is not None:
        metrics.waited_for_capacity(model, account, done.waited)
    sent = done.sent
    if sent is not None:
        metrics.record_response(
            model,
            account,
            status=sent.resp.status,
            outcome=sent.verdict.verdict.value,
            reason=sent.verdict.reason,
            latency_s=sent.resp.elapsed,
            charge=sent.charge,
            usage=sent.usage,
            cost_usd=metrics.cost_usd(run.spec, sent.usage),
            estimated_prompt_tokens=run.job.prompt_tokens,
            limit_requests=sent.headers.limit_requests,
            limit_tokens=sent.headers.limit_tokens,
        )
        metrics.server_view(model, account, sent.headers)
    step = done.step
    if step is None:
        return
    # A retry is counted when the job will in fact be tried again (now or from the deferred set),
    # not when it gave up after its last attempt.
    if sent is not None and sent.verdict.verdict is Verdict.RETRY and step.end is not End.STORED:
        metrics.retry(model, account, sent.verdict.reason)
    if step.deferral is not None:
        metrics.deferred(model, account, step.deferral.value)
