"""The tenants file of `ratequeue api`: hashes only, clear errors, the right tenant for a token."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import redis

from ratequeue.config.accounts_load import load_account_table
from ratequeue.config.settings import load_settings
from ratequeue.errors import ConfigError
from ratequeue.jobstore import keys
from ratequeue.jobstore.jobs import StoredJob
from ratequeue.producer.batchfile import LineError, read_lines
from ratequeue.producer.httpapi.batches import TenantLineValidator
from ratequeue.producer.httpapi.idempotency import PENDING_TTL_SECONDS, Idempotency
from ratequeue.producer.httpapi.objects import ApiError
from ratequeue.producer.httpapi.tenants import Tenant, load_tenants
from tests.conftest import ROOT


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def test_tokens_map_to_their_tenant_and_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    path.write_text(f'[tenants.reports]\ntoken_sha256 = ["{_sha("old")}", "{_sha("new")}"]\naccounts = ["main"]\n'
                    f'[tenants.search]\ntoken_sha256 = "{_sha("s3cret").upper()}"\nrequests_per_minute = 60\n')
    tenants = load_tenants(path)
    assert tenants.authenticate("old").name == tenants.authenticate("new").name == "reports"  # type: ignore[union-attr]
    found = tenants.authenticate("s3cret")
    assert found is not None and (found.name, found.requests_per_minute, found.accounts) == ("search", 60, ())
    for wrong in ("", None, "s3cre", "s3cret ", _sha("s3cret")):
        assert tenants.authenticate(wrong) is None
    assert _sha("s3cret") not in repr(found)


@pytest.mark.parametrize(("tenant", "message"), [
    ({"token": "plain"}, "field 'token': configure token_sha256"),
    ({}, "field 'token_sha256': missing"),
    ({"token_sha256": "abc"}, "field 'token_sha256': not 64 hex digits"),
    ({"token_sha256": "0" * 64, "acounts": ["x"]}, "unknown field(s) acounts"),
    ({"token_sha256": "0" * 64, "accounts": "main"}, "field 'accounts': must be a list"),
    ({"token_sha256": "0" * 64, "requests_per_minute": 0}, "field 'requests_per_minute'"),
])
def test_bad_tenant_is_named_with_its_field(tmp_path: Path, tenant: dict[str, object], message: str) -> None:
    path = tmp_path / "tenants.json"
    path.write_text(json.dumps({"tenants": {"reports": tenant}}))
    with pytest.raises(ConfigError) as refused:
        load_tenants(path)
    assert f"tenant 'reports': {message}" in str(refused.value) and "plain" not in str(refused.value)


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it"):
        load_tenants(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[tenants\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_tenants(bad)
    bad.write_text("[other]\n")
    with pytest.raises(ConfigError, match=r"no \[tenants\.NAME\] table"):
        load_tenants(bad)
    shared = json.dumps({"tenants": {"a": {"token_sha256": "1" * 64}, "b": {"token_sha256": "1" * 64}}})
    (tmp_path / "shared.json").write_text(shared)
    with pytest.raises(ConfigError, match="share a token hash"):
        load_tenants(tmp_path / "shared.json")
    (tmp_path / "name.json").write_text(json.dumps({"tenants": {"a{b}": {"token_sha256": "1" * 64}}}))
    with pytest.raises(ConfigError, match="a tenant name is"):
        load_tenants(tmp_path / "name.json")


def test_the_compose_tenants_file_loads_and_admits_no_one_until_replaced() -> None:
    tenants = load_tenants(ROOT / "ops/api/tenants.toml")
    assert [t.name for t in tenants] == ["example"]
    assert tenants.authenticate("") is None and tenants.authenticate("0" * 64) is None


def test_a_tenants_lines_run_on_its_accounts_and_the_batchs_endpoint_only(tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text('default_account = "team-a"\n[accounts.team-a]\napi_key_env = "KEY_A"\n'
                      '[accounts.team-b]\nbase_url = "http://team-b.example.test"\napi_key_env = "KEY_B"\n')
    accounts = load_account_table(load_settings({"RATEQUEUE_MODELS_FILE": str(models)}), env={},
                                  require_credentials=False)

    def line(n: int, account: str | None = None, url: str = "/v1/chat/completions") -> bytes:
        body = {"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
        extra = {"account": account} if account else {}
        return json.dumps({"custom_id": f"c-{n}", "method": "POST", "url": url, "body": body, **extra}).encode()

    def tenant(*names: str) -> Tenant:
        return Tenant("t", (b"\0" * 32,), names)

    validator = TenantLineValidator(accounts, tenant("team-b"), "/v1/chat/completions")
    own, named, other, wrong_url = read_lines([line(1), line(2, "team-b"), line(3, "team-a"),
                                               line(4, url="/v1/embeddings")], validator)
    assert isinstance(own, StoredJob) and own.account == "team-b"  # the tenant's first account, not the default
    assert isinstance(named, StoredJob) and named.account == "team-b"
    assert isinstance(other, LineError) and other.param == "account" and "not one this tenant may use" in other.message
    assert isinstance(wrong_url, LineError) and wrong_url.param == "url" and "/v1/chat/completions" in wrong_url.message
    # A tenant with no accounts listed: the configuration's default, and no line may name another.
    anyone = TenantLineValidator(accounts, tenant(), "/v1/chat/completions")
    default, named = read_lines([line(1), line(2, "team-b")], anyone)
    assert isinstance(default, StoredJob) and default.account == "team-a"
    assert isinstance(named, LineError) and named.param == "account"


def test_an_idempotency_claim_of_a_request_that_never_finished_is_freed_in_minutes(rclient: redis.Redis) -> None:
    claims = Idempotency(rclient)
    body = {"input_file_id": "file-1", "endpoint": "/v1/chat/completions"}
    assert claims.claim("alpha", "k1", body) is None  # the first request goes ahead...
    key = keys.api_idempotency("alpha", hashlib.sha256(b"k1").hexdigest())
    assert 0 < rclient.ttl(key) <= PENDING_TTL_SECONDS  # ...and if its process dies, the key is free again soon
    with pytest.raises(ApiError) as busy:
        claims.claim("alpha", "k1", body)
    assert busy.value.status == 409
    claims.finish("alpha", "k1", body, "batch_1")
    assert rclient.ttl(key) > PENDING_TTL_SECONDS and claims.claim("alpha", "k1", body) == "batch_1"
    assert claims.claim("beta", "k1", body) is None  # keys are per tenant
