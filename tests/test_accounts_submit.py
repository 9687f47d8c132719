"""A job names its account (issue 13): the line's "account", the batch's (--account, the API), else
the configuration's default; an unknown one is a per-line error naming line, field and the known
names; the model is checked on the account's route. Without [accounts] nothing changes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import orjson
import pytest
import redis

from ratequeue.config.accounts import AccountTable
from ratequeue.config.accounts_load import load_account_table
from ratequeue.config.models import generic_spec
from ratequeue.config.settings import load_settings
from ratequeue.errors import UsageError
from ratequeue.jobstore import keys
from ratequeue.jobstore.jobs import StoredJob
from ratequeue.producer.api import Client
from ratequeue.producer.batchfile import LineError, LineValidator, read_lines
from ratequeue.tokens.estimate import estimate_request
from tests.conftest import ROOT

MODELS = """\
default_account = "team-a"

[accounts.team-a]
api_key_env = "KEY_A"

[accounts.team-b]
base_url = "http://team-b.example.test"
api_key_env = "KEY_B"

[accounts.gpu]
dialect = "openai-compatible"
base_url = "http://gpu1:8000"
encoding = "o200k_base"

[accounts.azure-eu]
dialect = "azure"
base_url = "https://myres-eu.openai.azure.com"
api_version = "2024-10-21"
api_key_env = "AZURE_EU_KEY"

[accounts.azure-eu.deployments.gpt-4o-mini]
deployment = "gpt4omini-eu"
tpm = 200000

[routes]
"llama-8b" = [{ account = "gpu", model = "meta-llama/Llama-3.1-8B-Instruct" }]
"""


def _accounts(tmp_path: Path, text: str = MODELS) -> AccountTable:
    path = tmp_path / "models.toml"
    path.write_text(text)
    return load_account_table(load_settings({"RATEQUEUE_MODELS_FILE": str(path)}), env={}, require_credentials=False)


def _line(n: int, model: str = "gpt-4o-mini", account: object = None, **extra: object) -> bytes:
    body = {"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    line: dict[str, object] = {"custom_id": f"c-{n}", "method": "POST", "url": "/v1/chat/completions", "body": body}
    if account is not None:
        line["account"] = account
    return orjson.dumps({**line, **extra})


def _read(validator: LineValidator, *lines: bytes) -> list[StoredJob | LineError]:
    return list(read_lines(lines, validator))


def test_a_job_takes_its_lines_account_else_the_batchs_else_the_default(tmp_path: Path) -> None:
    accounts = _accounts(tmp_path)
    jobs = _read(LineValidator(accounts), _line(1), _line(2, account="team-b"))
    assert [j.account for j in jobs if isinstance(j, StoredJob)] == ["team-a", "team-b"]
    jobs = _read(LineValidator(accounts, "team-b"), _line(1), _line(2, account="team-a"))
    assert [j.account for j in jobs if isinstance(j, StoredJob)] == ["team-b", "team-a"]
    assert StoredJob.loads("c-2", jobs[1].dumps()) == jobs[1]  # type: ignore[union-attr]


def test_an_unknown_account_is_an_error_of_its_line_naming_the_field_and_the_known_names(tmp_path: Path) -> None:
    jobs = _read(LineValidator(_accounts(tmp_path)), _line(1, account="team-c"), _line(2), _line(3, account=7))
    bad, good, typed = jobs
    assert isinstance(bad, LineError) and bad.param == "account" and bad.keyed
    assert bad.message == ("line 1: account: unknown account 'team-c' (configured: azure-eu, gpu, team-a, team-b)")
    assert isinstance(good, StoredJob)
    assert isinstance(typed, LineError) and typed.param == "account" and "line 3" in typed.message


def test_with_several_accounts_and_no_default_a_line_must_name_one(tmp_path: Path) -> None:
    accounts = _accounts(tmp_path, MODELS.replace('default_account = "team-a"\n', ""))
    missing, named = _read(LineValidator(accounts), _line(1), _line(2, account="team-b"))
    assert isinstance(missing, LineError) and missing.param == "account"
    assert "name one" in missing.message and "team-a, team-b" in missing.message
    assert isinstance(named, StoredJob) and named.account == "team-b"


def test_models_are_checked_on_the_accounts_route(tmp_path: Path) -> None:
    """Any name on an openai-compatible account (counted with its encoding); a deployment of the
    model on an Azure one; the table's models on an openai one."""
    v = LineValidator(_accounts(tmp_path))
    llama, unknown, azure, no_deployment, renamed = _read(
        v, _line(1, "llama3.1:8b", "gpu"), _line(2, "llama3.1:8b", "team-a"), _line(3, "gpt-4o-mini", "azure-eu"),
        _line(4, "gpt-4o", "azure-eu"), _line(5, "llama-8b"))
    assert isinstance(llama, StoredJob) and (llama.model, llama.account) == ("llama3.1:8b", "gpu")
    body = orjson.loads(_line(1, "llama3.1:8b"))["body"]
    expected = estimate_request("/v1/chat/completions", body, generic_spec("llama3.1:8b", "o200k_base"))
    assert (llama.prompt_tokens, llama.charge) == (expected.prompt_tokens, expected.charge)
    assert isinstance(unknown, LineError) and unknown.param == "body.model" and unknown.code == "model_not_found"
    assert isinstance(azure, StoredJob) and (azure.model, azure.account) == ("gpt-4o-mini", "azure-eu")
    assert isinstance(no_deployment, LineError) and no_deployment.param == "body.model"
    assert no_deployment.message.startswith("line 4: body.model: account 'azure-eu' has no deployment of 'gpt-4o'")
    # A [routes] model: stored under the name the line gave, on the route's account.
    assert isinstance(renamed, StoredJob) and (renamed.model, renamed.account) == ("llama-8b", "gpu")


def test_without_accounts_a_job_is_stored_as_before() -> None:
    from ratequeue.config.models import load_model_table

    v = LineValidator(load_model_table(load_settings({})))
    job, named, other = _read(v, _line(1, "gpt-4o-mini-2024-07-18"), _line(2, account="default"),
                              _line(3, account="team-a"))
    assert isinstance(job, StoredJob) and job.account is None and job.model == "gpt-4o-mini"
    assert b'"a"' not in job.dumps()
    assert isinstance(named, StoredJob) and named.account is None
    assert isinstance(other, LineError) and other.message.endswith("unknown account 'team-a' (configured: default)")


def test_a_batch_is_chunked_by_account_and_model_and_an_unknown_batch_account_stores_nothing(
        redis_url: str, rclient: redis.Redis, tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(MODELS)
    settings = load_settings({"RATEQUEUE_REDIS_URL": redis_url, "RATEQUEUE_MODELS_FILE": str(path)})
    chunks: list[list[str]] = []
    client = Client(settings, publish=lambda _batch, ids, _queue=None: chunks.append(list(ids)))
    with pytest.raises(UsageError, match="unknown account 'nope'"):
        client.submit_batch([orjson.loads(_line(1))], account="nope")
    assert rclient.zcard(keys.batches_index()) == 0
    lines = [orjson.loads(_line(n, account="team-a" if n % 2 else None)) for n in range(6)]
    report = client.submit_batch(lines, account="team-b")
    assert sorted(sorted(c) for c in chunks) == [["c-0", "c-2", "c-4"], ["c-1", "c-3", "c-5"]]
    meta = rclient.hget(keys.batch_meta(report.batch_id), "account")
    assert meta is not None and meta.decode() == client.accounts.account("team-b").bucket_id
    stored = StoredJob.loads("c-0", rclient.hget(keys.batch_jobs(report.batch_id), "c-0"))  # type: ignore[arg-type]
    assert stored.account == "team-b"
    batch_id, _ = client.submit_job(orjson.loads(_line(9))["body"], custom_id="one", account="gpu")
    one = StoredJob.loads("one", rclient.hget(keys.batch_jobs(batch_id), "one"))  # type: ignore[arg-type]
    assert one.account == "gpu"


def test_submit_account_names_the_batchs_account_and_an_unknown_one_is_a_usage_error(
        redis_url: str, rclient: redis.Redis, tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text(MODELS)
    (tmp_path / "in.jsonl").write_bytes(_line(1) + b"\n" + _line(2, account="team-a") + b"\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RATEQUEUE_", "OPENAI_"))}
    env.update(RATEQUEUE_REDIS_URL=redis_url, RATEQUEUE_MODELS_FILE=str(models), PYTHONPATH=str(ROOT))

    def submit(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ratequeue.producer.cli", "submit", "--no-check", *args,
                               str(tmp_path / "in.jsonl")], env=env, capture_output=True, text=True, timeout=60)

    refused = submit("--account", "nope")
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        "error: account: unknown account 'nope' (configured: azure-eu, gpu, team-a, team-b)")
    assert rclient.zcard(keys.batches_index()) == 0
    done = submit("--account", "team-b")
    assert done.returncode == 0, done.stderr
    batch_id = done.stdout.strip().splitlines()[-1]
    stored = rclient.hgetall(keys.batch_jobs(batch_id))
    assert {cid.decode(): StoredJob.loads(cid.decode(), raw).account for cid, raw in stored.items()} == {
        "c-1": "team-b", "c-2": "team-a"}


def test_a_submitter_without_the_key_names_the_workers_bucket_and_shows_its_pauses(
        redis_url: str, rclient: redis.Redis, tmp_path: Path) -> None:
    """The submitter holds no key; the worker holds team-b's. Both must name the same bucket, or
    ``status`` reads the pauses of a bucket no worker uses (the finding: none shown)."""
    from ratequeue.worker.routing import Routing

    path = tmp_path / "models.toml"
    path.write_text(MODELS)
    settings = load_settings({"RATEQUEUE_REDIS_URL": redis_url, "RATEQUEUE_MODELS_FILE": str(path)})
    client = Client(settings, publish=lambda *_: None,
                    accounts=load_account_table(settings, env={}, require_credentials=False))
    worker = Routing(load_account_table(settings, env={"KEY_B": "sk-team-b-0123456789abcdef"},
                                        require_credentials=False))
    report = client.submit_batch([orjson.loads(_line(1))], account="team-b")
    job = StoredJob.loads("c-1", rclient.hget(keys.batch_jobs(report.batch_id), "c-1"))  # type: ignore[arg-type]
    meta = rclient.hget(keys.batch_meta(report.batch_id), "account")
    target = worker.target("unused", job)
    assert meta is not None and meta.decode() == target.account
    assert client.account_workers()["team-b"]["bucket"] == target.account
    rotated = load_account_table(settings, env={"KEY_B": "sk-team-b-rotated-key-0123"}, require_credentials=False)
    assert rotated.account("team-b").bucket_id == target.account  # a new key of the same account: the same bucket
    assert "sk-team-b" not in target.account
    rclient.hset(keys.parked_pairs(), target.pair, orjson.dumps({"reason": "invalid_api_key", "message": "",
                                                                 "since": 0, "cooldown": 60}))
    shown = client.status(report.batch_id)["models"]["gpt-4o-mini"]
    assert shown["paused"] is not None and shown["paused"]["reason"] == "invalid_api_key"


def test_chunks_go_to_their_accounts_queue_at_submit_resume_and_after_a_deferral(
        redis_url: str, rclient: redis.Redis, tmp_path: Path) -> None:
    """Each account's jobs go to its own queue (a worker without its key consumes none of it): when
    submitted, when a batch is resumed, and when the deferred mover sends due jobs back; jobs of
    several routes (no account named) and a configuration without [accounts] keep the shared queue."""
    from ratequeue.queue import QUEUE
    from ratequeue.worker.deferred import DeferredMover

    sent: list[tuple[str, str, tuple[str, ...]]] = []

    def publish(batch_id: str, custom_ids: Sequence[str], queue: str = QUEUE) -> None:
        sent.append((queue, batch_id, tuple(sorted(custom_ids))))

    path = tmp_path / "models.toml"
    path.write_text(MODELS + '"gpt-4o" = ["team-a", "team-b"]\n')
    settings = load_settings({"RATEQUEUE_REDIS_URL": redis_url, "RATEQUEUE_MODELS_FILE": str(path)})
    client = Client(settings, publish=publish)
    mixed = client.submit_batch([orjson.loads(_line(1)), orjson.loads(_line(2, account="team-b")),
                                 orjson.loads(_line(3, model="gpt-4o"))]).batch_id
    single = client.submit_batch([orjson.loads(_line(4, account="team-b"))]).batch_id
    expected = {("ratequeue.account.team-a", mixed, ("c-1",)), ("ratequeue.account.team-b", mixed, ("c-2",)),
                (QUEUE, mixed, ("c-3",)), ("ratequeue.account.team-b", single, ("c-4",))}
    assert set(sent) == expected
    sent.clear()
    client.resume(mixed)
    client.resume(single)
    assert set(sent) == expected
    sent.clear()
    rclient.zadd(keys.deferred_jobs(), {f"{b}{keys.DEFERRED_SEP}c-{n}": 0 for b, n in
                                        ((mixed, 1), (mixed, 2), (mixed, 3), (single, 4))})
    assert DeferredMover(rclient, publish).move_due() == 4
    assert set(sent) == expected
    sent.clear()
    plain = Client(load_settings({"RATEQUEUE_REDIS_URL": redis_url}), publish=publish)
    old = plain.submit_batch([orjson.loads(_line(5))]).batch_id
    assert not [f for f in rclient.hkeys(keys.batch_models(old)) if f.startswith(b"queue:")]  # stored as before
    rclient.zadd(keys.deferred_jobs(), {f"{old}{keys.DEFERRED_SEP}c-5": 0})
    assert DeferredMover(rclient, publish).move_due() == 1
    assert sent == [(QUEUE, old, ("c-5",))] * 2


def test_the_limits_a_batch_is_shown_against_are_its_accounts(redis_url: str, tmp_path: Path) -> None:
    """`run`'s progress and ETA read the configured limits of the batch's account (its usage tier),
    not the model table's, until the workers learn the server's."""
    from tests.test_config_accounts import TIERS

    path = tmp_path / "models.toml"
    path.write_text('default_account = "tier1"\n' + TIERS)
    client = Client(load_settings({"RATEQUEUE_REDIS_URL": redis_url, "RATEQUEUE_MODELS_FILE": str(path)}),
                    publish=lambda *_: None)
    one, five = client.model_limits("gpt-4o-mini"), client.model_limits("gpt-4o-mini", "tier5")
    assert one is not None and (one.rpm, one.tpm, one.source) == (500, 200_000, "configured")
    assert five is not None and (five.rpm, five.tpm) == (30_000, 150_000_000)
