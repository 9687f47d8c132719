"""Turning what happened to a job into its one stored Batch line."""

from __future__ import annotations

from typing import Any

from ratequeue.config.models import ModelSpec
from ratequeue.jobstore import records
from ratequeue.jobstore.jobs import StoredJob
from ratequeue.worker import metrics
from ratequeue.worker.policy import CONTENT_FILTER, filter_details, output_filtered
from ratequeue.worker.store import JobStore, Outcome
from ratequeue.worker.upstream import UpstreamResponse
from ratequeue.worker.usage import Usage


class Outcomes:
    """Stores results and errors of one batch's jobs through a ``JobStore``."""

    def __init__(self, store: JobStore) -> None:
        self._store = store

    async def succeed(
        self, batch_id: str, job: StoredJob, spec: ModelSpec, resp: UpstreamResponse, usage: Usage
    ) -> None:
        line = records.output_line(job.custom_id, resp.status, resp.request_id, resp.body)
        if output_filtered(resp.body):  # still a result (and paid for): counted, its body says so
            metrics.output_filtered(spec.name)
        cost = spec.cost_usd(usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens)
        outcome = Outcome("result", line, usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, cost)
        if await self._store.store(batch_id, job.custom_id, outcome):
            self._finished(batch_id, spec.name, ok=True)

    async def upstream_error(
        self, batch_id: str, job: StoredJob, resp: UpstreamResponse, reason: str
    ) -> None:
        """A definitive error answer: kept as the Batch API does, response and body in the errors."""
        if resp.status == 0:
            await self.fail(batch_id, job, reason, f"upstream unreachable: {resp.transport_error}")
            return
        if resp.too_large:  # nothing of the body was kept to store
            message = f"HTTP {resp.status} answer {resp.body_problem} (RATEQUEUE_MAX_RESPONSE_BYTES); not stored"
            await self.fail(batch_id, job, reason, message)
            return
        error = None
        if reason == CONTENT_FILTER:  # the filter's verdict in the error itself, not only deep in the body
            details = filter_details(resp.error)
            message = str(resp.error.get("message") or "filtered by the content filter")
            error = {"code": CONTENT_FILTER, "message": f"{message} [filtered: {details or 'not said'}]",
                     "param": resp.error.get("param")}
        line = records.output_line(job.custom_id, resp.status, resp.request_id, resp.body, error)
        if await self._store.store(batch_id, job.custom_id, Outcome("error", line)):
            self._finished(batch_id, job.model, ok=False, code=reason)

    async def gave_up(self, batch_id: str, job: StoredJob, code: str, history: dict[str, Any]) -> None:
        """Retries exhausted (or the job's deadline passed): the error carries the whole history."""
        message = f"gave up after {history['attempts']} attempts: {history.get('last_message', '')}"
        await self.fail(batch_id, job, code, message, history=history)

    async def fail(
        self,
        batch_id: str,
        job: StoredJob,
        code: str,
        message: str,
        param: str | None = None,
        history: dict[str, Any] | None = None,
    ) -> None:
        line = records.error_line(job.custom_id, code, message, job.line, param, history)
        if await self._store.store(batch_id, job.custom_id, Outcome("error", line)):
            self._finished(batch_id, job.model, ok=False, code=code)

    def _finished(self, batch_id: str, model: str, ok: bool, code: str = "") -> None:
        """Count a stored outcome; its time since submission comes from the batch state this
        process already holds (no Redis round trip per job)."""
        state = self._store.watch.known(batch_id)
        account, submitted = (state.account, state.created_at) if state is not None else (None, None)
        metrics.job_finished(model, ok, code, account=account, submitted_at=submitted)
