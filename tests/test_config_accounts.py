"""config.accounts: accounts, Azure deployments and routes read from the models file; the implicit
account of a configuration without them; any model name on an openai-compatible account."""

from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path

import pytest

from ratequeue.config.accounts import AccountTable
from ratequeue.config.accounts_load import load_account_table
from ratequeue.config.apikey import TokenFile
from ratequeue.config.models import UNLIMITED, load_model_table
from ratequeue.config.settings import load_settings
from ratequeue.errors import ConfigError, InvalidRequestError, UnknownModelError

OPENAI_KEY = "sk-proj-openaisecret0123456789"
AZURE_KEY = "0123456789abcdefazuresecret"
ENV = {"OPENAI_API_KEY": OPENAI_KEY, "AZURE_EU_KEY": AZURE_KEY}

FULL = """\
[accounts.openai]
dialect = "openai"
api_key_env = "OPENAI_API_KEY"
organization = "org-team"

[accounts.azure-eu]
dialect = "azure"
base_url = "https://myres-eu.openai.azure.com/"
api_version = "2024-10-21"
api_key_env = "AZURE_EU_KEY"

[accounts.azure-eu.deployments.gpt-4o-mini]
deployment = "gpt4omini-eu"
tpm = 200000

[accounts.azure-eu.deployments.my-finetune]
deployment = "ft-eu"
tpm = 30000
rpm = 50
window_seconds = 10

[accounts.gpu]
dialect = "openai-compatible"
base_url = "http://gpu1:8000/v1"

[routes]
"gpt-4o-mini" = ["openai", "azure-eu"]
"llama-8b" = [{ account = "gpu", model = "meta-llama/Llama-3.1-8B-Instruct" }]
"""


def _load(tmp_path: Path, text: str, env: dict[str, str] | None = None, **settings_env: str) -> AccountTable:
    path = tmp_path / "models.toml"
    path.write_text(text)
    settings = load_settings({"RATEQUEUE_MODELS_FILE": str(path), **settings_env})
    return load_account_table(settings, env=ENV if env is None else env)


@pytest.fixture
def full(tmp_path: Path) -> AccountTable:
    return _load(tmp_path, FULL)


# -- no [accounts]: today's behaviour --------------------------------------------------------------


@pytest.mark.parametrize("with_file", [False, True])
def test_the_implicit_account_is_todays(tmp_path: Path, with_file: bool) -> None:
    env = {"OPENAI_API_KEY": OPENAI_KEY, "OPENAI_ORG_ID": "org-x", "OPENAI_PROJECT_ID": "proj-y",
           "OPENAI_BASE_URL": "http://127.0.0.1:9999/v1/"}
    if with_file:  # a models file without [accounts] changes nothing either
        (tmp_path / "m.toml").write_text('[models."gpt-4o-mini"]\ntpm = 5000\n')
        env["RATEQUEUE_MODELS_FILE"] = str(tmp_path / "m.toml")
    settings = load_settings(env)
    accounts = load_account_table(settings, env={})
    account = accounts.account()
    assert accounts.implicit and accounts.names() == ["default"] and accounts.default_account() is account
    assert account.bucket_id == settings.account_id  # existing buckets keep their keys
    assert account.base_url == settings.base_url == "http://127.0.0.1:9999"
    assert account.auth_headers() == {"authorization": f"Bearer {OPENAI_KEY}", "openai-organization": "org-x",
                                      "openai-project": "proj-y"}
    (route,) = accounts.routes_for("gpt-4o-mini-2024-07-18")
    assert route.pair == (settings.account_id, "gpt-4o-mini") and route.target == "gpt-4o-mini-2024-07-18"
    assert route.spec == load_model_table(settings).get("gpt-4o-mini")
    assert route.url("/v1/chat/completions") == "http://127.0.0.1:9999/v1/chat/completions"
    assert route.window_seconds is None and route.max_concurrency is None
    with pytest.raises(UnknownModelError):  # as today: a model the table lacks is refused
        accounts.routes_for("llama3.1:8b")


def test_the_implicit_account_without_a_key_sends_no_authorization() -> None:
    settings = load_settings({})
    accounts = load_account_table(settings, env={})
    assert accounts.account().auth_headers() == {} and accounts.account().bucket_id == settings.account_id
    assert accounts.secrets() == ()


# -- the three dialects -----------------------------------------------------------------------------


def test_openai_account(full: AccountTable) -> None:
    account = full.account("openai")
    assert account.base_url == "https://api.openai.com"
    assert account.auth_headers() == {"authorization": f"Bearer {OPENAI_KEY}", "openai-organization": "org-team"}
    # the same key, organization and server as the environment's: the same buckets
    assert account.bucket_id == load_settings({"OPENAI_API_KEY": "sk-other", "OPENAI_ORG_ID": "org-team"}).account_id
    (route,) = full.routes_for("gpt-4o", "openai")
    assert route.url("/chat/completions") == "https://api.openai.com/v1/chat/completions"


def test_azure_account_deployments_and_urls(full: AccountTable) -> None:
    account = full.account("azure-eu")
    assert account.base_url == "https://myres-eu.openai.azure.com"
    assert account.auth_headers() == {"api-key": AZURE_KEY}
    (route,) = full.routes_for("gpt-4o-mini", "azure-eu")
    assert route.target == "gpt4omini-eu" and route.pair == (account.bucket_id, "gpt4omini-eu")
    assert (route.spec.tpm, route.spec.rpm, route.window_seconds) == (200000, 1200, 1.0)  # 6 RPM per 1,000 TPM
    assert route.spec.encoding == "o200k_base" and route.spec.input_per_1m == 0.15  # the model's, from the table
    base = "https://myres-eu.openai.azure.com/openai"
    deployment = f"{base}/deployments/gpt4omini-eu"
    assert route.url("/v1/chat/completions") == f"{deployment}/chat/completions?api-version=2024-10-21"
    assert route.url("/v1/embeddings") == f"{deployment}/embeddings?api-version=2024-10-21"
    assert route.url("/v1/responses") == f"{base}/responses?api-version=2024-10-21"
    with pytest.raises(InvalidRequestError, match="has no deployment of 'gpt-4o'") as caught:
        full.routes_for("gpt-4o", "azure-eu")
    assert caught.value.code == "model_not_found"


def test_azure_model_absent_from_the_table_takes_its_deployments_limits(full: AccountTable) -> None:
    (route,) = full.routes_for("my-finetune", "azure-eu")
    spec = route.spec
    assert (spec.tpm, spec.rpm, route.window_seconds, spec.limits_known) == (30000, 50, 10.0, True)
    assert spec.encoding == "cl100k_base" and spec.cost_usd(1000, 0, 1000) == 0.0


def test_azure_bucket_id_is_the_resource_whatever_the_key(tmp_path: Path) -> None:
    one = _load(tmp_path, FULL).account("azure-eu").bucket_id
    other = _load(tmp_path, FULL, env={**ENV, "AZURE_EU_KEY": "another-key-0123456789"}).account("azure-eu").bucket_id
    assert one == other and AZURE_KEY not in one


def test_any_model_name_on_an_openai_compatible_account(full: AccountTable) -> None:
    account = full.account("gpu")
    assert account.base_url == "http://gpu1:8000" and account.auth_headers() == {}
    for name in ("llama3.1:8b", "mistralai/Mistral-7B-Instruct"):
        (route,) = full.routes_for(name, "gpu")
        spec = route.spec
        assert route.target == name and spec.name == name and route.pair == (account.bucket_id, name)
        assert not spec.limits_known and (spec.rpm, spec.tpm) == (UNLIMITED, UNLIMITED)
        assert spec.encoding == "cl100k_base" and spec.cost_usd(10_000, 0, 10_000) == 0.0
        assert route.max_concurrency == 64 and "/v1/embeddings" in spec.endpoints
        assert route.url("/v1/chat/completions") == "http://gpu1:8000/v1/chat/completions"
    (known,) = full.routes_for("gpt-4o-mini", "gpu")  # a model the table has keeps its spec there
    assert known.spec.limits_known and known.spec.encoding == "o200k_base"


def test_openai_compatible_options(tmp_path: Path) -> None:
    accounts = _load(tmp_path, '[accounts.local]\ndialect = "openai-compatible"\nbase_url = "http://127.0.0.1:11434"\n'
                     'encoding = "o200k_base"\ntokenize = "server"\nmax_concurrency = 8\ncontext_window = 8192\n'
                     'api_key_env = "LOCAL_KEY"\n', env={"LOCAL_KEY": "local-key-value-12345"})
    (route,) = accounts.routes_for("qwen2.5:7b")  # the only account is the default
    assert (route.spec.encoding, route.spec.context_window, route.max_concurrency) == ("o200k_base", 8192, 8)
    assert accounts.account().tokenize == "server"
    assert accounts.account().auth_headers() == {"authorization": "Bearer local-key-value-12345"}


# -- routes -----------------------------------------------------------------------------------------


def test_a_model_with_several_routes(full: AccountTable) -> None:
    routes = full.routes_for("gpt-4o-mini")
    assert [r.name for r in routes] == ["openai/gpt-4o-mini", "azure-eu/gpt4omini-eu"]
    assert len({r.pair for r in routes}) == 2  # a bucket each
    assert [r.name for r in full.routes_for("gpt-4o-mini-2024-07-18")] == [
        "openai/gpt-4o-mini-2024-07-18", "azure-eu/gpt4omini-eu"]  # a snapshot takes its model's routes
    assert [r.name for r in full.routes_for("gpt-4o-mini", "azure-eu")] == ["azure-eu/gpt4omini-eu"]


def test_a_route_may_name_the_model_differently_on_its_account(full: AccountTable) -> None:
    (route,) = full.routes_for("llama-8b")
    assert route.model == "llama-8b" and route.target == "meta-llama/Llama-3.1-8B-Instruct"
    assert route.spec.name == route.target and route.pair[1] == route.target


def test_a_job_naming_no_account_needs_a_default_or_a_route(full: AccountTable, tmp_path: Path) -> None:
    assert full.default_account() is None
    with pytest.raises(InvalidRequestError, match="none is the default_account") as caught:
        full.routes_for("gpt-4o")
    assert caught.value.field == "account" and caught.value.code == "unknown_account"
    with pytest.raises(InvalidRequestError, match="unknown account 'nope'"):
        full.account("nope")
    chosen = _load(tmp_path, 'default_account = "openai"\n' + FULL)
    assert [r.name for r in chosen.routes_for("gpt-4o")] == ["openai/gpt-4o"]


def test_all_routes_lists_routes_and_deployments(full: AccountTable) -> None:
    names = [r.name for r in full.all_routes()]
    assert names == sorted(["azure-eu/ft-eu", "azure-eu/gpt4omini-eu", "gpu/meta-llama/Llama-3.1-8B-Instruct",
                            *(f"openai/{name}" for name in full.table.names())])


# -- secrets ----------------------------------------------------------------------------------------


def test_secrets_never_show(full: AccountTable) -> None:
    shown = repr([full.account(name) for name in full.names()]) + repr(full.routes_for("gpt-4o-mini"))
    shown += str(full.account("azure-eu")) + repr(full.account("openai").credential)
    for secret in (OPENAI_KEY, AZURE_KEY, OPENAI_KEY[-4:], AZURE_KEY[-4:]):
        assert secret not in shown
    assert "$AZURE_EU_KEY" in shown  # where the key comes from is shown
    assert set(full.secrets()) == {OPENAI_KEY, AZURE_KEY}


def test_a_key_file(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text(AZURE_KEY + "\n")
    key.chmod(0o600)
    accounts = _load(tmp_path, FULL.replace('api_key_env = "AZURE_EU_KEY"', f'api_key_file = "{key}"'), env=ENV)
    assert accounts.account("azure-eu").auth_headers() == {"api-key": AZURE_KEY}


def test_a_bearer_token_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("entra-token-one-0123456789")
    token.chmod(0o600)
    text = FULL.replace('api_key_env = "AZURE_EU_KEY"', f'bearer_token_file = "{token}"')
    account = _load(tmp_path, text).account("azure-eu")
    assert account.auth_headers() == {"authorization": "Bearer entra-token-one-0123456789"}
    tokens = TokenFile(token, str(token), check_seconds=0)
    token.write_text("entra-token-two-0123456789-renewed")
    os.utime(token, ns=(0, 10**18))  # a new mtime even within the filesystem's timestamp granularity
    assert tokens.current().reveal() == "entra-token-two-0123456789-renewed"
    token.unlink()  # a renewal in progress: the last good token is kept
    assert tokens.current().reveal() == "entra-token-two-0123456789-renewed"


def test_an_account_whose_key_is_not_here_can_be_kept_unusable(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(FULL)
    settings = load_settings({"RATEQUEUE_MODELS_FILE": str(path)})
    accounts = load_account_table(settings, env={"OPENAI_API_KEY": OPENAI_KEY}, require_credentials=False)
    azure = accounts.account("azure-eu")
    assert azure.unusable == f"{path}:10: accounts.azure-eu.api_key_env: the variable AZURE_EU_KEY is not set"
    assert azure.auth_headers() == {} and accounts.account("openai").unusable is None
    assert azure.bucket_id == _load(tmp_path, FULL).account("azure-eu").bucket_id  # Azure's id needs no key
    with pytest.raises(ConfigError, match="AZURE_EU_KEY is not set"):
        load_account_table(settings, env={"OPENAI_API_KEY": OPENAI_KEY})
    # an organization's bucket id needs no key either
    keyless = load_account_table(settings, env={}, require_credentials=False).account("openai")
    assert keyless.unusable and keyless.bucket_id == accounts.account("openai").bucket_id


def test_accounts_pickle(full: AccountTable) -> None:  # settings and tables cross process boundaries
    account = full.account("azure-eu")
    assert pickle.loads(pickle.dumps(account)).auth_headers() == account.auth_headers()
    route = full.routes_for("gpt-4o-mini", "azure-eu")[0]
    assert dataclasses.replace(pickle.loads(pickle.dumps(route)), account=account) == route


# -- README -----------------------------------------------------------------------------------------


def _readme_examples() -> list[str]:
    text = (Path(__file__).parent.parent / "README.md").read_text()
    section = text.split("### Accounts: ", 1)[1].split("\n## ", 1)[0]
    return [block.split("```", 1)[0] for block in section.split("```toml\n")[1:]]


def test_readme_has_one_example_per_provider() -> None:
    assert len(_readme_examples()) == 4


@pytest.mark.parametrize("index", range(4))
def test_readme_examples_load(tmp_path: Path, index: int) -> None:
    env = {"OPENAI_API_KEY": OPENAI_KEY, "AZURE_EU_KEY": AZURE_KEY, "OPENAI_KEY_A": "sk-a-0123456789",
           "OPENAI_KEY_B": "sk-b-0123456789"}
    accounts = _load(tmp_path, _readme_examples()[index], env=env)
    assert accounts.all_routes() or accounts.routes_for("gpt-4o-mini")
    if index == 1:
        (route,) = accounts.routes_for("gpt-4o-mini")
        assert (route.target, route.spec.rpm, route.window_seconds) == ("gpt4omini-eu", 1200, 10.0)
    if index == 3:
        assert [r.name for r in accounts.routes_for("gpt-4o-mini")] == ["key-a/gpt-4o-mini", "key-b/gpt-4o-mini"]
        assert accounts.routes_for("llama-8b")[0].target == "meta-llama/Llama-3.1-8B-Instruct"


# -- per-account limits of OpenAI accounts on different tiers -----------------------------------------

TIERS = """\
[accounts.tier1]
api_key_env = "KEY_1"
[accounts.tier1.models."gpt-4o-mini"]
rpm = 500
tpm = 200000

[accounts.tier5]
api_key_env = "KEY_5"
[accounts.tier5.models."gpt-4o-mini"]
rpm = 30000
tpm = 150000000
[accounts.tier5.models."gpt-4o"]
tpm = 30000000

[routes]
"gpt-4o-mini" = ["tier1", "tier5"]
"""


def test_openai_accounts_on_different_tiers_size_their_own_buckets(tmp_path: Path) -> None:
    accounts = _load(tmp_path, TIERS, env={"KEY_1": "sk-tier-one-0123456789", "KEY_5": "sk-tier-five-0123456789"})
    table_spec = accounts.table.get("gpt-4o-mini")
    one, five = accounts.routes_for("gpt-4o-mini")
    assert (one.spec.rpm, one.spec.tpm) == (500, 200_000)
    assert (five.spec.rpm, five.spec.tpm) == (30_000, 150_000_000)
    assert one.pair != five.pair and one.spec.name == five.spec.name == "gpt-4o-mini"  # a bucket each, same model
    (snapshot,) = accounts.routes_for("gpt-4o-mini-2024-07-18", "tier1")  # a snapshot takes its model's limits
    assert (snapshot.spec.rpm, snapshot.spec.tpm) == (500, 200_000)
    (gpt4o,) = accounts.routes_for("gpt-4o", "tier5")  # tpm alone: rpm stays the table's
    assert (gpt4o.spec.rpm, gpt4o.spec.tpm) == (accounts.table.get("gpt-4o").rpm, 30_000_000)
    (plain,) = accounts.routes_for("gpt-4o", "tier1")  # a model the account does not list: the table's
    assert plain.spec == accounts.table.get("gpt-4o")
    assert (one.spec.encoding, one.spec.input_per_1m) == (table_spec.encoding, table_spec.input_per_1m)
    by_route = {r.name: (r.spec.rpm, r.spec.tpm) for r in accounts.all_routes()}  # the workers' metrics series
    assert by_route["tier1/gpt-4o-mini"] == (500, 200_000) and by_route["tier5/gpt-4o-mini"] == (30_000, 150_000_000)


def test_an_openai_compatible_account_may_give_any_models_limits(tmp_path: Path) -> None:
    accounts = _load(tmp_path, '[accounts.groq]\ndialect = "openai-compatible"\nbase_url = "http://127.0.0.1:9"\n'
                     '[accounts.groq.models."llama3.1:8b"]\nrpm = 30\ntpm = 6000\n', env={})
    (route,) = accounts.routes_for("llama3.1:8b")
    assert (route.spec.rpm, route.spec.tpm, route.spec.limits_known) == (30, 6000, True)
    (other,) = accounts.routes_for("qwen2.5:7b")
    assert not other.spec.limits_known
