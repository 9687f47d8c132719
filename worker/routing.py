"""Where a job goes and with which credentials (issue 13: accounts are data, not a worker's environment).

A stored job names its model and account (``StoredJob.account``; None: the default). The account
table (config/accounts.py, loaded once per worker process) turns them into a ``Route``: the URL, the
headers, the body's model and the bucket. ``Routing.route`` is the one place a job's route is read:
the one ``worker.routechoice`` chose for this run when the model has several (``assign``, made by
the engine before it admits the chunk, ``forget`` at the chunk's end), else the first of ``routes_for``.

Without ``[accounts]`` nothing changes: the bucket is the batch's account id (the submitter's
fingerprint, as before) and the request goes out with the client's own environment key.

Each account's chunks go to its own Celery queue (``queue.queue_for``), which only workers holding
its key consume (``queue.worker_queues``): a worker without the key never receives them. What
follows is the fallback for the jobs that still reach such a worker (a model's several routes on
the shared queue, messages of an older version).

A route whose account this worker holds no credentials for (its key's variable or file is missing
here: ``Account.unusable``) is refused, never sent with another key: its jobs are deferred for
``RATEQUEUE_PARK_COOLDOWN`` seconds and noted per account (``keys.refused_jobs``); every worker that
holds the key makes a few chunks of them due each ``WAKE_SECONDS`` (worker.tasks), and one of them
takes them from the queue (the refuser may take one again: it defers it again, no attempt counted). Deferred, not
handed back as a requeued message: a requeued message returns to the queue and the same idle worker
takes it again at once (a busy loop while it is the only worker), whereas a deferred job waits in
Redis, safe from crashes. Parking the pair in Redis would stop the workers that do hold the key, so
the refusal stays in this worker's view: logged once per account, counted as a ``parked`` deferral;
each worker writes the accounts it holds (``keys.accounts_held``), and ``ratequeue status`` shows
how many live workers hold each account's key.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ratequeue.config.accounts import AccountTable, Route
from ratequeue.config.models import ModelSpec
from ratequeue.errors import InvalidRequestError, UnknownModelError
from ratequeue.jobstore import keys
from ratequeue.jobstore.jobs import StoredJob
from ratequeue.jobstore.keys import DEFERRED_SEP
from ratequeue.worker import metrics
from ratequeue.worker.attempt import STORED, Deferral, End, Step
from ratequeue.worker.backlog import job_ref
from ratequeue.worker.feedback import RateLimitHeaders, header_window
from ratequeue.worker.outcomes import Outcomes
from ratequeue.worker.settle import DEADLINE_EXCEEDED
from ratequeue.worker.store import JobStore

log = logging.getLogger(__name__)

WAKE_SECONDS = 1.0  # how often a worker makes due the jobs refused by workers without its accounts' keys


def held_accounts(accounts: AccountTable) -> list[str]:
    """The aliases of the accounts this process holds credentials for (none without [accounts])."""
    return [] if accounts.implicit else [a.name for a in accounts if a.unusable is None]


@dataclass(frozen=True)
class Target:
    """A job's route and the bucket it draws from: ``account`` is the bucket's account id, ``spec``
    the route's spec named after the bucket's model (an Azure deployment, else the model)."""

    route: Route
    account: str
    spec: ModelSpec

    @property
    def pair(self) -> str:
        """The bucket's (account, model) as the shared hashes name it (parking, learned limits)."""
        return keys.pair_field(self.account, self.spec.name)

    @property
    def key(self) -> str:
        """The bucket's key in Redis."""
        return keys.bucket_key(self.account, self.spec.name)

    @property
    def refused(self) -> str | None:
        """Why this worker cannot send on this route (no credentials here), or None."""
        return self.route.account.unusable


class Routing:
    """The routes of one worker process's account table, and the requests sent on them."""

    def __init__(self, accounts: AccountTable) -> None:
        self.accounts = accounts
        self._warned: set[str] = set()  # accounts whose refusal this worker has logged
        self._chosen: dict[str, Route] = {}  # job_ref -> the route chosen for its current run

    def route(self, job: StoredJob, batch_id: str | None = None) -> Route:
        """The route `job` takes: the one chosen for its run in `batch_id`, else the first.
        Raises InvalidRequestError or UnknownModelError."""
        chosen = self._chosen.get(job_ref(batch_id, job.custom_id)) if batch_id is not None else None
        return chosen or self.accounts.routes_for(job.model, job.account)[0]

    def route_name(self, job: StoredJob, batch_id: str) -> str:
        """The name of the route chosen for `job`'s run ("" if none was: a single route)."""
        chosen = self._chosen.get(job_ref(batch_id, job.custom_id))
        return "" if chosen is None else chosen.name

    def assign(self, ref: str, route: Route) -> None:
        """`route` is the one the job `ref` (backlog.job_ref) takes for this run."""
        self._chosen[ref] = route

    def forget(self, refs: Iterable[str]) -> None:
        """The runs of these jobs ended: their next runs choose again."""
        for ref in refs:
            self._chosen.pop(ref, None)

    def targets(self, batch_account: str, job: StoredJob) -> tuple[Target, ...]:
        """Every route `job` may take, as targets (none for a job the runner will fail)."""
        try:
            return tuple(self._target(batch_account, r) for r in self.accounts.routes_for(job.model, job.account))
        except (InvalidRequestError, UnknownModelError):
            return ()

    def target(self, batch_account: str, job: StoredJob, batch_id: str | None = None) -> Target:
        """`job`'s route (see ``route``) and bucket; `batch_account` keys the bucket without [accounts].
        Raises InvalidRequestError: an account or deployment this configuration lacks, or an unknown
        model (code ``model_not_found``, field ``body.model``, the reason UnknownModelError's text)."""
        try:
            route = self.route(job, batch_id)
        except UnknownModelError as exc:
            raise InvalidRequestError("body.model", str(exc), code="model_not_found") from exc
        return self._target(batch_account, route)

    @staticmethod
    def _target(batch_account: str, route: Route) -> Target:
        if route.account.implicit:
            return Target(route, batch_account, route.spec)
        account, model = route.pair
        # Buckets, parking, learned limits and the ledger are keyed by (account, spec.name): an Azure
        # route's bucket is its deployment's, whatever logical model the job named.
        spec = route.spec if model == route.spec.name else dataclasses.replace(route.spec, name=model)
        return Target(route, account, spec)

    async def refuse(self, store: JobStore, outcomes: Outcomes, batch_id: str, job: StoredJob, target: Target,
                     deadline: float, idle_wait: float) -> Step:
        """`job` cannot be sent by this worker (no credentials for its account here): deferred for
        `idle_wait` seconds and noted in ``keys.refused_jobs``, whose jobs the workers holding the key
        make due (``jobstore.deferrals.wake_refused``); failed once `deadline` (time.time()) has passed
        with none having taken it."""
        account = target.route.account
        if time.time() > deadline:
            message = (f"no worker holding the credentials of account {account.name!r} took it before its "
                       f"deadline (RATEQUEUE_JOB_DEADLINE); here: {target.refused}")
            await outcomes.fail(batch_id, job, DEADLINE_EXCEEDED, message, param="account")
            return STORED
        if account.name not in self._warned:
            self._warned.add(account.name)
            log.warning("account %r: this worker holds no credentials for it (%s); its jobs are left to the workers "
                        "that do (`ratequeue status` counts them under accounts)", account.name, target.refused)
        # Deferred first, noted second: a wake between the two finds the note later, never a job not yet deferred.
        await store.defer(batch_id, job.custom_id, idle_wait)
        async with store.redis.pipeline(transaction=True) as pipe:
            pipe.sadd(keys.refused_jobs(account.name), f"{batch_id}{DEFERRED_SEP}{job.custom_id}")
            pipe.expire(keys.refused_jobs(account.name), int(idle_wait) + 3600)  # outlives the wait it serves
            await pipe.execute()
        metrics.deferred(target.spec.name, target.account, Deferral.PARKED.value)
        return Step(End.DEFERRED, Deferral.PARKED)

    @staticmethod
    def request(route: Route | None, job: StoredJob) -> tuple[str, Mapping[str, Any], Mapping[str, str] | None]:
        """(URL or path, body, auth headers) of `job`'s call on `route`; None headers: the client's
        own (the environment's key, without [accounts] or a route). Raises InvalidRequestError for a
        path the route's server has no operation for (Azure)."""
        if route is None or route.account.implicit:
            return job.url, job.body, None
        # The body names the model as the route's server knows it (a deployment, a renamed route);
        # otherwise it goes as written (a snapshot name stays a snapshot name).
        body = job.body if route.target == route.model else {**job.body, "model": route.target}
        return route.url(job.url), body, route.account.auth_headers()

    @staticmethod
    def limits_per_minute(route: Route | None, spec: ModelSpec, headers: RateLimitHeaders) -> RateLimitHeaders:
        """`headers` with per-minute limits: Azure reports a deployment's per window (worker.feedback)."""
        if route is None or route.account.dialect != "azure":
            return headers
        configured = route.window_seconds or 60.0
        return headers.per_minute(header_window(headers.limit_requests, configured, spec.rpm),
                                  header_window(headers.limit_tokens, configured, spec.tpm))

    def secrets(self) -> tuple[str, ...]:
        """The credentials this worker holds, for the redaction of upstream answers."""
        return self.accounts.secrets()
