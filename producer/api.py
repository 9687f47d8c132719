"""The Python API other services import.

    from ratequeue import submit_batch, submit_job, status, wait, iter_results

    batch = submit_batch("prompts.jsonl")            # stored in Redis before it returns
    wait(batch.batch_id)                             # until completed / cancelled / expired
    for line in iter_results(batch.batch_id): ...    # Batch output lines, input order

Every function takes an optional ``client`` (a ``Client``); by default one is built from the
environment (``RATEQUEUE_REDIS_URL``, ...). Workers (``ratequeue worker``) do the calls.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import orjson
import redis

from ratequeue.config.accounts import IMPLICIT, AccountTable
from ratequeue.config.accounts_load import load_account_table
from ratequeue.config.models import ModelTable, load_model_table
from ratequeue.config.settings import DEFAULT_REDIS_URL, Settings, load_settings
from ratequeue.errors import BatchNotFoundError, InvalidRequestError, RedisFullError, UsageError
from ratequeue.jobstore import budgets, keys
from ratequeue.jobstore.batches import BatchExistsError, BatchStatus, BatchStore
from ratequeue.producer import capacity
from ratequeue.producer.batch_ids import check_batch_id, file_sha256, submitted_before
from ratequeue.producer.batchfile import Limits, LineError, LineValidator, read_lines
from ratequeue.producer.model_progress import ModelLimits, configured_limits, model_limits
from ratequeue.producer.operate import BatchOperations
from ratequeue.producer.reading import BatchReading
from ratequeue.producer.retention import delete_batch
from ratequeue.producer.submit import SubmitReport, Submitter
from ratequeue.queue import Publish, publisher
from ratequeue.redis_tls import redis_options
from ratequeue.tokens.server import ServerCounts

log = logging.getLogger(__name__)

# Connecting gives up after this long: an unreachable (firewalled) Redis is said at once, not hung on.
REDIS_CONNECT_TIMEOUT = 5.0


class Client(BatchReading, BatchOperations):
    """A connection to one ratequeue deployment (its Redis) with the settings, model table and accounts.

    A batch is sent with one account (``account=``: an alias of the models file's ``[accounts]``, else
    its default); a request line may name its own with a top-level ``"account"``. The keys are the
    workers' business: this process needs none of them.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        table: ModelTable | None = None,
        publish: Publish | None = None,
        accounts: AccountTable | None = None,
    ) -> None:
        self.settings = settings or load_settings()
        self.table = table or load_model_table(self.settings)
        self.accounts = accounts or load_account_table(self.settings, self.table, require_credentials=False)
        self.redis = redis.Redis.from_url(
            self.settings.redis_url or DEFAULT_REDIS_URL, socket_connect_timeout=REDIS_CONNECT_TIMEOUT,
            **redis_options(self.settings),
        )
        if publish is None:
            publish = publisher(self.settings)
        self._submitter = Submitter(
            self.redis, publish, chunk_size=self.settings.chunk_size, retention=self.settings.retention_seconds
        )
        # Prompts of tokenize = "server" accounts are counted by their servers (ratequeue/tokens/server.py).
        server_counted = any(a.dialect == "openai-compatible" and a.tokenize == "server" for a in self.accounts)
        self._counts = ServerCounts() if server_counted else None
        self._validator = LineValidator(self.accounts, counts=self._counts)
        self._batches = BatchStore(self.redis)

    def account_name(self, account: str | None) -> str:
        """The alias a batch of `account` (None: the default) is sent with: ``default`` without
        [accounts], "" with no default (each line names its own account, or is refused for naming
        none). Raises UsageError for an alias the configuration lacks, before anything is stored."""
        if self.accounts.implicit and account in (None, IMPLICIT):
            return IMPLICIT
        if account is None and self.accounts.default_account() is None:
            return ""
        try:
            return self.accounts.account(account).name
        except InvalidRequestError as exc:
            raise UsageError(str(exc)) from None

    def _bucket_account(self, account: str | None) -> str:
        """The bucket id a batch of `account` is shown under (its meta's ``account``: status reads its
        parked pairs and limits there): today's fingerprint without [accounts]. Raises UsageError for
        an alias the configuration lacks, before anything is stored."""
        name = self.account_name(account)
        if self.accounts.implicit:
            return self.settings.account_id
        return self.accounts.account(name).bucket_id if name else ""

    def submit_batch(
        self,
        source: str | Path | BinaryIO | Iterable[Mapping[str, Any]],
        completion_window: str = "24h",
        metadata: Mapping[str, Any] | None = None,
        batch_id: str | None = None,
        account: str | None = None,
        validator: LineValidator | None = None,
        on_created: Callable[[str], None] | None = None,
        budget_usd: float | None = None,
    ) -> SubmitReport:
        """Submit a Batch-format JSONL file (path or binary stream) or an iterable of request dicts.

        ``account``: the alias its lines are sent with unless a line names its own (default: the
        configuration's default account). Raises ``UsageError`` for an unknown alias.

        Invalid lines become error lines of the batch (naming line, field and reason); the valid
        ones run. Returns once every job is stored in Redis and enqueued. Raises ``UsageError``
        for an input with no requests (nothing is kept).

        With ``batch_id`` (1-64 letters, digits, ``_``, ``-``) submitting is idempotent: the same
        id and input again return the stored batch (``report.existing``) and queue nothing, also
        when two submits race; the same id with another input raises ``BatchError`` naming both.
        A stream or iterable given with a ``batch_id`` is read into memory first (its sha256 is
        compared before anything is stored). A file's sha256 is kept as ``input_sha256``.

        ``budget_usd``: the batch's budget; workers send no call whose worst-case cost would take
        its spend past it (``ratequeue budget BATCH --usd`` raises it; ratequeue/jobstore/budgets.py).
        """
        name = str(source) if isinstance(source, str | Path) else "<stream>"
        if batch_id is not None:
            check_batch_id(batch_id)
        digest = ""
        if isinstance(source, str | Path):
            digest = file_sha256(source)
        elif batch_id is not None:
            raw = source.read() if hasattr(source, "read") else b"\n".join(_as_lines(source))
            digest, source = hashlib.sha256(raw).hexdigest(), io.BytesIO(raw)
        bucket_account = self._bucket_account(account)
        # ``validator``: stricter line checks of the caller's (the HTTP API's tenant rules).
        # ``on_created(batch_id)``: called once the batch exists, before any of its jobs is queued.
        validator = validator or (
            self._validator if account is None else LineValidator(self.accounts, account, self._counts))
        capacity.ensure_room(self.redis, 0)  # a full Redis is said before the file is read
        try:
            batch_id = self._submitter.create_batch(
                bucket_account, "", name, completion_window, metadata, batch_id, digest, self.account_name(account)
            )
        except BatchExistsError:
            assert batch_id is not None
            return submitted_before(self.redis, batch_id, name, digest)
        if on_created is not None:  # before any job is queued (the HTTP API records its owner)
            on_created(batch_id)
        if budget_usd is not None:  # before any job is queued: none may run unbudgeted
            budgets.set_batch_budget(self.redis, batch_id, budget_usd)
        limits = Limits(self.settings.max_file_bytes, self.settings.max_lines, self.settings.max_line_bytes)
        try:
            try:
                if isinstance(source, str | Path):
                    with open(source, "rb") as stream:
                        report = self._submitter.add(batch_id, read_lines(stream, validator, limits))
                else:
                    report = self._submitter.add(batch_id, read_lines(_as_lines(source), validator, limits))
            finally:
                self._close_counts()
            if report.jobs + report.errors == 0:  # blank: a batch of nothing would "complete" at once
                delete_batch(self.redis, batch_id, force=True)
                raise UsageError(f"{name} has no requests")
            if report.by_model:
                self._batches.describe(batch_id, models=",".join(sorted(report.by_model)))
            self._submitter.seal(batch_id)
        except (RedisFullError, redis.exceptions.OutOfMemoryError) as exc:
            # All or nothing: what was stored goes (deleting needs no memory). Under a maxmemory
            # no chunk was enqueued yet (see Submitter.add), so none of it has run.
            delete_batch(self.redis, batch_id, force=True)
            if isinstance(exc, RedisFullError):
                raise
            raise capacity.full_error(self.redis, exc) from exc
        return report

    def submit_job(
        self,
        body: Mapping[str, Any],
        url: str = "/v1/chat/completions",
        custom_id: str | None = None,
        batch_id: str | None = None,
        account: str | None = None,
    ) -> tuple[str, str]:
        """Enqueue one request; returns (batch_id, custom_id).

        Without ``batch_id`` the job gets a batch of its own. With one, it joins that open batch
        (made with ``open_batch``). ``account``: the alias it is sent with (default: the
        configuration's default). Raises ``InvalidRequestError`` for a request that can be known
        to fail (an unknown account included), before anything is stored.
        """
        custom_id = custom_id or f"job-{time.time_ns()}"
        request: dict[str, Any] = {"custom_id": custom_id, "method": "POST", "url": url, "body": dict(body)}
        if account is not None:
            request["account"] = account
        try:
            job = self._validator.job(1, custom_id, request)
        finally:
            self._close_counts()
        own_batch = batch_id is None
        if batch_id is None:
            batch_id = self._submitter.create_batch(self._bucket_account(job.account), url, "<submit_job>",
                                                    account_name=self.account_name(job.account))
        elif (joined := self._batches.status(batch_id)) is None:
            raise BatchNotFoundError(f"no batch {batch_id!r}")
        elif joined is not BatchStatus.VALIDATING:  # closed, cancelled or past its window: no job joins
            raise InvalidRequestError("batch_id", f"batch {batch_id} is {joined.value}: it takes no more jobs")
        elif self.redis.hexists(keys.batch_jobs(batch_id), custom_id):
            raise InvalidRequestError("custom_id", f"{custom_id!r} is already in batch {batch_id}")
        self._submitter.add(batch_id, [job])
        if own_batch:
            self._submitter.seal(batch_id)
        return batch_id, custom_id

    def open_batch(self, completion_window: str = "24h", metadata: Mapping[str, Any] | None = None) -> str:
        """A batch that ``submit_job`` calls can join until ``close_batch``."""
        return self._submitter.create_batch(self.settings.account_id, "", "<open>", completion_window, metadata)

    def close_batch(self, batch_id: str) -> str:
        """No more jobs will join; the batch completes when its jobs have. Returns the status."""
        self.status(batch_id)  # raises BatchNotFoundError
        return self._submitter.seal(batch_id)

    def model_limits(self, model: str, account: str | None = None) -> ModelLimits | None:
        """The per-minute limits ``model`` runs at on `account` (None: the default): learned by the
        workers, else configured (the account's own, else the table's; None if nothing describes them)."""
        limits = model_limits(self.redis, self.table, self._bucket_account(account), model)
        if limits is None or limits.source != "learned":
            limits = configured_limits(self.accounts, model, self.account_name(account)) or limits
        return limits

    @property
    def server_counts(self) -> ServerCounts | None:
        """Where prompts of tokenize = "server" accounts are counted (None: every account counts locally)."""
        return self._counts

    def _close_counts(self) -> None:
        """End the connections to tokenize = "server" accounts' servers (kept for one submit)."""
        if self._counts is not None:
            self._counts.close()

    def close(self) -> None:
        self._close_counts()
        self.redis.close()


def _as_lines(source: BinaryIO | Iterable[Mapping[str, Any]]) -> Iterable[bytes]:
    """A binary stream as it is, or request dicts as JSON lines."""
    if hasattr(source, "read"):
        return source  # type: ignore[return-value]
    return (orjson.dumps(request) for request in source)


_default: Client | None = None


def default_client() -> Client:
    global _default
    if _default is None:
        _default = Client()
    return _default


def submit_batch(source: Any, completion_window: str = "24h", client: Client | None = None,
                 batch_id: str | None = None, account: str | None = None) -> SubmitReport:
    return (client or default_client()).submit_batch(source, completion_window, batch_id=batch_id, account=account)


def submit_job(body: Mapping[str, Any], url: str = "/v1/chat/completions", custom_id: str | None = None,
               batch_id: str | None = None, client: Client | None = None,
               account: str | None = None) -> tuple[str, str]:
    return (client or default_client()).submit_job(body, url, custom_id, batch_id, account)


def status(batch_id: str, client: Client | None = None) -> dict[str, Any]:
    return (client or default_client()).status(batch_id)


def wait(batch_id: str, timeout: float | None = None, client: Client | None = None) -> dict[str, Any]:
    return (client or default_client()).wait(batch_id, timeout)


def iter_results(batch_id: str, errors: bool = False, client: Client | None = None) -> Iterator[dict[str, Any]]:
    return (client or default_client()).iter_results(batch_id, errors)


__all__ = ["Client", "LineError", "iter_results", "status", "submit_batch", "submit_job", "wait"]
