"""Every Redis key ratequeue uses, built in one place.

Keys of one (account, model) bucket share the hash tag ``{account:model}``, and every key of one
batch the hash tag ``{<batch_id>}`` (``rq:batch:{<batch_id>}:jobs``), so that a Lua script or a
MULTI touching several of them stays in one Redis Cluster slot. The shared structures (batch
index, deferred set, parked pairs, learned limits) hold members of many batches or pairs and
live in slots of their own: no batch script takes them in KEYS, except ``recheck_later.lua``
(batch keys and the deferred set; see its header).
"""

from __future__ import annotations

PREFIX = "rq"
# Between batch id and custom_id in members of the deferred set (custom_ids may hold anything else).
DEFERRED_SEP = "\t"


def bucket_key(account: str, model: str) -> str:
    """The hash holding the request and token buckets of one (account, model)."""
    return f"{PREFIX}:bucket:{{{account}:{model}}}"


def _batch(batch_id: str) -> str:
    """The prefix of every key of one batch: its id is the hash tag (one Cluster slot per batch)."""
    return f"{PREFIX}:batch:{{{batch_id}}}"


def batch_meta(batch_id: str) -> str:
    """Hash: the batch record (status, counters, times); its schema is ratequeue/jobstore/batches.py."""
    return _batch(batch_id)


def batch_jobs(batch_id: str) -> str:
    """Hash: custom_id -> the stored job (request, line number, estimate)."""
    return f"{_batch(batch_id)}:jobs"


def batch_order(batch_id: str) -> str:
    """List of custom_ids in input order; results are collected in this order."""
    return f"{_batch(batch_id)}:order"


def batch_results(batch_id: str) -> str:
    """Hash: custom_id -> Batch output line. Written with HSETNX: a stored result is never overwritten."""
    return f"{_batch(batch_id)}:results"


def batch_errors(batch_id: str) -> str:
    """Hash: custom_id -> Batch error line (jobs that could not be run)."""
    return f"{_batch(batch_id)}:errors"


def batch_input_errors(batch_id: str) -> str:
    """List of error lines for input lines that were rejected at submit (no usable custom_id)."""
    return f"{_batch(batch_id)}:input_errors"


def batches_index() -> str:
    """Sorted set of batch ids by creation time."""
    return f"{PREFIX}:batches"


def deferred_jobs() -> str:
    """Sorted set of chunks waiting for capacity, scored by the time they may run again."""
    return f"{PREFIX}:deferred"


def batch_attempts(batch_id: str) -> str:
    """Hash: custom_id -> failed upstream attempts so far (survives worker crashes)."""
    return f"{_batch(batch_id)}:attempts"


def batch_last_failure(batch_id: str) -> str:
    """Hash: custom_id -> JSON of the last failed attempt (status, message)."""
    return f"{_batch(batch_id)}:last_failure"


def batch_keys(batch_id: str) -> list[str]:
    """Every key of one batch, meta first: what expires when the batch ends, or goes on delete.

    A key added to a batch must be added here, or it outlives the batch (tests/test_retention.py
    checks that every ``rq:batch:{<id>}*`` key of an ended batch carries a TTL).
    """
    return [
        batch_meta(batch_id),
        batch_jobs(batch_id),
        batch_order(batch_id),
        batch_results(batch_id),
        batch_errors(batch_id),
        batch_input_errors(batch_id),
        batch_attempts(batch_id),
        batch_last_failure(batch_id),
        batch_claims(batch_id),
        batch_started(batch_id),
        batch_models(batch_id),
    ]


def outcome_keys(batch_id: str) -> list[str]:
    """The KEYS of store_outcome.lua: results, errors, meta, jobs, claims, models, the
    deployment's totals, then the batch's other keys."""
    first = [batch_results(batch_id), batch_errors(batch_id), batch_meta(batch_id), batch_jobs(batch_id),
             batch_claims(batch_id), batch_models(batch_id)]
    return [*first, totals(), *(k for k in batch_keys(batch_id) if k not in first)]


def totals() -> str:
    """Hash: the deployment's counters of stored outcomes since Redis began, never expiring:
    ``completed:<model>``, ``failed:<model>``, ``prompt_tokens:<model>``,
    ``completion_tokens:<model>``, ``cost_nusd:<model>`` (nano-dollars) and
    ``cost_nusd_day:<days since epoch>`` (all models, the UTC day). Written by store_outcome.lua
    with each outcome; published by ratequeue/producer/exporter_totals.py."""
    return f"{PREFIX}:totals"


def batch_models(batch_id: str) -> str:
    """Hash: per-model counters of one batch, fields ``"<counter>:<model>"`` (counter first: a
    model name may hold colons). Counters: ``jobs`` and ``charge`` (tokens the limiter charges,
    summed over its jobs) added at submit; ``completed``, ``failed`` and ``charge_done`` added as
    outcomes are stored (store_outcome.lua). Read by ratequeue/producer/model_progress.py."""
    return f"{_batch(batch_id)}:models"


def batch_claims(batch_id: str) -> str:
    """Hash: custom_id -> "<owner> <lease expiry ms>" of the run currently executing the job."""
    return f"{_batch(batch_id)}:claims"


def pair_field(account: str, model: str) -> str:
    """The field of one (account, model) in the shared hashes ``parked_pairs`` and ``learned_limits``."""
    return f"{account}:{model}"


def parked_pairs() -> str:
    """Hash: "<account>:<model>" -> JSON {reason, message, since, cooldown} of paused pairs."""
    return f"{PREFIX}:parked"


def probe_lock(account: str, model: str) -> str:
    """String set NX with a TTL of one cooldown: whoever sets it may send the one probe request."""
    return f"{PREFIX}:probe:{{{account}:{model}}}"


def parked_jobs(account: str, model: str) -> str:
    """Set of deferred-set members ("<batch_id>\t<custom_id>") deferred because the pair was
    parked: unparking makes them due at once instead of after the cooldown."""
    return f"{PREFIX}:parkedjobs:{{{account}:{model}}}"


def learned_limits() -> str:
    """Hash: "<account>:<model>" -> JSON {rpm, tpm, at} announced by the server's headers."""
    return f"{PREFIX}:learned"


def learned_rules() -> str:
    """Hash: "<account>:<model>" -> "sum" | "max", the charge rule the workers learned from the
    server's remaining-tokens headers (worker/learned.py)."""
    return f"{PREFIX}:rules"


def charge_ledger(account: str, model: str) -> str:
    """Hash {n, sum, max}: running totals of every request sent on the pair by any worker, priced
    under each charge rule (worker/lua/charge_ledger.lua)."""
    return f"{PREFIX}:ledger:{{{account}:{model}}}"


def batch_started(batch_id: str) -> str:
    """Hash: custom_id -> ms since epoch of the job's first run (its total deadline counts from there)."""
    return f"{_batch(batch_id)}:started"


def chunk_failures(message_id: str) -> str:
    """Counter of failed runs of one chunk message (its id survives redelivery); expires in a day."""
    return f"{PREFIX}:chunkfail:{message_id}"


def dead_letters() -> str:
    """List (newest first, capped) of JSON records of dead-lettered chunks."""
    return f"{PREFIX}:deadletter"


def accounts_held() -> str:
    """Hash: worker name -> the aliases of the accounts it holds credentials for ("a,b"), written at
    its start (worker/routing.py); a worker without an account's key asks it whether a live one does."""
    return f"{PREFIX}:accounts:held"


def refused_jobs(account: str) -> str:
    """Set of deferred-set members ("<batch_id>\t<custom_id>") a worker without the key of account
    `account` (an alias) deferred: a worker that holds it makes them due when it starts."""
    return f"{PREFIX}:refusedjobs:{{{account}}}"


def route_use(model: str) -> str:
    """Hash: route name ("<account alias>/<target>") -> how many runs of `model`'s jobs chose it
    (worker/routechoice.py; `ratequeue status` shows each route's count and share)."""
    return f"{PREFIX}:routeuse:{{{model}}}"


def route_pair_field(route: str) -> str:
    """The field of ``route_use`` holding the route's pair ("<bucket id>:<model>"), which the
    workers can name and a `status` without that account's key cannot. A route name has no ':'."""
    return f"pair:{route}"


# The HTTP API's keys (ratequeue/producer/httpapi). A file's keys share the hash tag {<file id>}.
def api_file(file_id: str) -> str:
    """Hash: an uploaded file's record (tenant, filename, bytes, created_at, purpose)."""
    return f"{PREFIX}:apifile:{{{file_id}}}"


def api_file_content(file_id: str) -> str:
    """List: an uploaded file's bytes in pieces of at most 1 MiB, in order."""
    return f"{PREFIX}:apifile:{{{file_id}}}:content"


def api_tenant_files(tenant: str) -> str:
    """Sorted set: the files a tenant uploaded, scored by upload time (s); an entry whose file has
    expired is dropped when the list is read."""
    return f"{PREFIX}:apitenant:{{{tenant}}}:files"


def api_tenant_batches(tenant: str) -> str:
    """Sorted set: the batch ids a tenant created through the API, scored by creation time (s).
    Membership is ownership: another tenant's batch id is answered 404."""
    return f"{PREFIX}:apitenant:{{{tenant}}}:batches"


def api_idempotency(tenant: str, key_sha256: str) -> str:
    """String (JSON {request, batch}): an Idempotency-Key of a tenant's POST /v1/batches, by the
    key's sha256; expires a day after the first request."""
    return f"{PREFIX}:apitenant:{{{tenant}}}:idem:{key_sha256}"


def api_request_count(tenant: str, minute: int) -> str:
    """Counter of a tenant's API requests in one minute (minutes since epoch); expires after it."""
    return f"{PREFIX}:apitenant:{{{tenant}}}:requests:{minute}"


# Budgets in USD (issue 14): every key in one Cluster slot ({budget}), so that one script checks a
# batch's budget and the day's together. Amounts are integers, nano-USD.
def budget_batches() -> str:
    """Hash: "<batch_id>:limit" | ":spent" | ":reserved" of batches with a budget (and spent by any)."""
    return f"{PREFIX}:budget:{{budget}}:batches"


def budget_days() -> str:
    """Hash: "limit" (the daily budget set at run time), "<day>:spent" | ":reserved" (day: UTC days since epoch)."""
    return f"{PREFIX}:budget:{{budget}}:days"


def budget_held() -> str:
    """Sorted set: reservations of calls in flight, scored by when they expire (ms since epoch)."""
    return f"{PREFIX}:budget:{{budget}}:held"


def budget_held_amounts() -> str:
    """Hash: reservation -> "<batch_id> <day> <nano-USD>"."""
    return f"{PREFIX}:budget:{{budget}}:held_amounts"


def budget_blocked() -> str:
    """Hash: batch_id -> "batch" | "daily": the budget that stopped its dispatch (until a call fits again)."""
    return f"{PREFIX}:budget:{{budget}}:blocked"


def budget_keys() -> list[str]:
    """The keys of budget_reserve.lua, in its order (budget_settle.lua takes the first four)."""
    return [budget_batches(), budget_days(), budget_held(), budget_held_amounts(), budget_blocked()]
