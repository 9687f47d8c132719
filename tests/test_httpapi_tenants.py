"""The tenants file of `ratequeue api`: hashes only, clear errors, the right tenant for a token."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from ratequeue.errors import ConfigError
from ratequeue.producer.httpapi.tenants import load_tenants
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
