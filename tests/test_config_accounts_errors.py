"""config.accounts_load: every error of a file at once, each with its line and field, none showing a
secret; and config.tomlsource, which finds the lines."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from ratequeue.config.accounts_load import load_account_table
from ratequeue.config.models import generic_spec
from ratequeue.config.settings import load_settings
from ratequeue.config.tomlsource import dotted, key_lines
from ratequeue.errors import ConfigError

KEY = "sk-proj-thisisthesecretkey0123456789"


def _errors(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[str]:
    path = tmp_path / "models.toml"
    path.write_text(text)
    settings = load_settings({"RATEQUEUE_MODELS_FILE": str(path)})
    with pytest.raises(ConfigError) as caught:
        load_account_table(settings, env=env or {})
    message = str(caught.value)
    assert KEY not in message and KEY[-4:] not in message
    lines = message.splitlines()
    return [line.strip().replace(f"{path}:", "") for line in (lines[1:] if len(lines) > 1 else lines)]


BAD = f"""\
default_account = "ghost"

[accounts.openai]
dialect = "openai"
api_key_env = "OPENAI_API_KEY"

[accounts.az]
dialect = "azure"
base_url = "https://res.openai.azure.com"
api_key_env = "AZ_KEY"

[accounts.az.deployments.gpt-4o-mini]
deployment = "gpt4omini"
rpm = 0

[accounts.selfhosted]
dialect = "vllm"
base_url = "http://gpu:8000"

[accounts.plain]
base_url = "http://sim:1"
api_key = "{KEY}"
max_concurrency = 4
api_version = "2024-10-21"
colour = "blue"
organization = 42

[accounts.plain.deployments.x]
deployment = "y"
tpm = 1

[accounts.leaky]
api_key_env = "{KEY}"

[routes]
"gpt-4o-mini" = ["openai", "nowhere", "az"]
"made-up" = ["openai"]
"empty" = []
"""


def test_every_error_of_a_file_is_reported_with_its_line_and_field(tmp_path: Path) -> None:
    found = _errors(tmp_path, BAD, {"OPENAI_API_KEY": "sk-fine-0123456789"})
    assert found == [
        "1: default_account: names no account (accounts: az, leaky, openai, plain, selfhosted)",
        "7: accounts.az: an azure account needs api_version (e.g. \"2024-10-21\")",
        "10: accounts.az.api_key_env: the variable AZ_KEY is not set",
        "12: accounts.az.deployments.gpt-4o-mini: missing field tpm",
        "14: accounts.az.deployments.gpt-4o-mini.rpm: must be a positive integer, got an integer",
        "17: accounts.selfhosted.dialect: must be one of openai, azure, openai-compatible, got 'vllm'",
        "22: accounts.plain.api_key: unknown field; a secret is never written in this file: name its variable "
        "(api_key_env) or file (api_key_file, bearer_token_file)",
        "23: accounts.plain.max_concurrency: only for openai-compatible accounts, not openai",
        "24: accounts.plain.api_version: only for azure accounts, not openai",
        "25: accounts.plain.colour: unknown field (known: api_key_env, api_key_file, api_version, base_url, "
        "bearer_token_file, context_window, deployments, dialect, encoding, max_concurrency, models, "
        "organization, project, tokenize)",
        "26: accounts.plain.organization: must be a string, got an integer",
        "28: accounts.plain.deployments: only for azure accounts, not openai",
        "33: accounts.leaky.api_key_env: must name an environment variable (letters, digits and _), "
        "not hold the key",
        "36: routes.gpt-4o-mini: entry 2: unknown account 'nowhere' (accounts: az, leaky, openai, plain, "
        "selfhosted)",
        "37: routes.made-up: entry 1 (openai): unknown model 'made-up': add it to the model table "
        "(RATEQUEUE_MODELS_FILE)",
        "38: routes.empty: must be a non-empty array: [\"alias\", {account = \"alias\", model = \"its name there\"}]",
    ]


def test_deployment_errors_then_routes_against_deployments(tmp_path: Path) -> None:
    text = """\
[accounts.az]
dialect = "azure"
base_url = "https://res.openai.azure.com"
api_version = "2024-10-21"
api_key_env = "AZ_KEY"
[accounts.az.deployments."gpt-4o-mini"]
deployment = "mini"
tpm = 1000
[accounts.az.deployments."gpt-4.1"]
deployment = "mini"
tpm = 1000
window_seconds = 61
"""
    assert _errors(tmp_path, text, {"AZ_KEY": "azkey-0123456789"}) == [
        "10: accounts.az.deployments.\"gpt-4.1\".deployment: 'mini' is already the deployment of 'gpt-4o-mini'",
        "12: accounts.az.deployments.\"gpt-4.1\".window_seconds: must be at most 60 (Azure enforces over 1 s or 10 s)",
    ]
    text = text.replace('"mini"\ntpm = 1000\nwindow_seconds = 61', '"other"\ntpm = 1000')
    text += '[routes]\n"gpt-4o" = ["az"]\n'
    assert _errors(tmp_path, text, {"AZ_KEY": "azkey-0123456789"}) == [
        "13: routes.gpt-4o: entry 1 (az): body.model: account 'az' has no deployment of 'gpt-4o' "
        "(deployments of: gpt-4.1, gpt-4o-mini)"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[accounts.a]\napi_key_env = "K"\napi_key_file = "/k"\n',
         "3: accounts.a.api_key_file: set only one of api_key_env, api_key_file"),
        ('[accounts.a]\ndialect = "azure"\nbase_url = "https://r.openai.azure.com"\napi_version = "v"\n',
         "1: accounts.a: an azure account needs api_key_env, api_key_file or bearer_token_file"),
        ('[accounts.a]\ndialect = "openai-compatible"\n', "1: accounts.a: an openai-compatible account needs base_url"),
        ('[accounts.a]\nbase_url = "ftp://x"\n',
         "2: accounts.a.base_url: must be an http:// or https:// URL with a host"),
        ('[accounts.a]\ndialect = "openai-compatible"\nbase_url = "http://x"\nencoding = "p50k"\n',
         "4: accounts.a.encoding: must be one of cl100k_base, o200k_base"),
        ('[accounts.a]\napi_key_file = "/nonexistent/key"\n',
         "2: accounts.a.api_key_file: /nonexistent/key: cannot read the key file: No such file or directory"),
        ('[accounts."a b"]\n', "1: accounts.\"a b\": an account alias is letters, digits, '.', '-' and '_', "
         "starting with a letter or digit"),
        ("accounts = 3\n", "1: accounts: must hold at least one [accounts.<alias>] table"),
        ('default_account = ["a"]\n[accounts.a]\n', "1: default_account: must be an account alias, got an array"),
        ('[routes]\nx = ["a"]\n', "1: routes: needs an [accounts] table"),
        ('[accounts.a]\n[routes]\nx = [3]\n',
         "3: routes.x: entry 1: must be an account alias or {account = \"...\", model = \"...\"}"),
        ('[accounts.a]\n[routes]\n"gpt-4o" = ["a", "a"]\n', "3: routes.gpt-4o: entry 2: a is listed twice"),
        ('[accounts.a]\n[routes]\nx = [{account = "a", token = "t"}]\n',
         "3: routes.x: entry 1: must be an account alias or {account = \"...\", model = \"...\"}"),
    ],
)
def test_single_errors(tmp_path: Path, text: str, expected: str) -> None:
    assert _errors(tmp_path, text) == [expected]


def test_a_key_file_anyone_may_read_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    key = tmp_path / "key"
    key.write_text(KEY)
    key.chmod(0o644)
    path = tmp_path / "models.toml"
    path.write_text(f'[accounts.a]\napi_key_file = "{key}"\n')
    load_account_table(load_settings({"RATEQUEUE_MODELS_FILE": str(path)}), env={})
    assert "mode 0644" in caplog.text and KEY not in caplog.text


def test_a_key_with_whitespace_is_refused_without_showing_it(tmp_path: Path) -> None:
    assert _errors(tmp_path, '[accounts.a]\napi_key_env = "K"\n', {"K": KEY + " x"}) == [
        "2: accounts.a.api_key_env: $K: the key contains whitespace or control characters"]


# -- config.tomlsource ------------------------------------------------------------------------------

TRICKY = '''\
top = 1  # [not.a.table]
s = """
[not.a.table]
k = 2 """
lit = \'\'\'a = [b\'\'\'
esc = "a \\" = [ "
[accounts.openai]   # a comment with = and [
arr = [
  "x = 1",
  { y = 2 },
]
"quoted.key=" = 3
a.b."c d" = 4
[accounts.azure-eu.deployments."gpt-4.1"]
tpm = 5
[[arr.tab]]
z = 1
[[arr.tab]]
z = 2
'''


def test_key_lines() -> None:
    tomllib.loads(TRICKY)  # valid TOML
    assert key_lines(TRICKY) == {
        ("top",): 1, ("s",): 2, ("lit",): 5, ("esc",): 6, ("accounts", "openai"): 7,
        ("accounts", "openai", "arr"): 8, ("accounts", "openai", "quoted.key="): 12,
        ("accounts", "openai", "a", "b", "c d"): 13, ("accounts", "azure-eu", "deployments", "gpt-4.1"): 14,
        ("accounts", "azure-eu", "deployments", "gpt-4.1", "tpm"): 15, ("arr", "tab"): 16, ("arr", "tab", "z"): 17,
    }


def test_dotted() -> None:
    assert dotted(("accounts", "azure-eu", "deployments", "gpt-4.1", 'say "x"')) == (
        'accounts.azure-eu.deployments."gpt-4.1"."say \\"x\\""')


def test_generic_spec_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match="encoding"):
        generic_spec("m", "p50k_base")
    with pytest.raises(ValueError, match="max_output_tokens"):
        generic_spec("m", context_window=100, max_output_tokens=101)


def _leaf_paths(node: dict, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for key, value in node.items():
        found += _leaf_paths(value, (*prefix, key)) if isinstance(value, dict) else [(*prefix, key)]
    return found


def test_key_lines_finds_every_key_of_the_builtin_table() -> None:
    text = (Path(__file__).parent.parent / "config" / "models.toml").read_text()
    lines = key_lines(text)
    written = text.splitlines()
    for path in _leaf_paths(tomllib.loads(text)):
        assert written[lines[path] - 1].startswith(f"{path[-1]} ="), path


def test_per_account_model_limits_are_validated_with_line_and_field(tmp_path: Path) -> None:
    text = """\
[accounts.tier1]
api_key_env = "K"
[accounts.tier1.models."gpt-4o-mini"]
rpm = 0
[accounts.tier1.models."gpt-4o-mini-2024-07-18"]
tpm = 1000
[accounts.tier1.models.made-up]
tpm = 1000
[accounts.tier1.models."gpt-4o"]
colour = 3
[accounts.tier1.models."gpt-4.1"]
[accounts.tier1.models.o3]
tpm = "many"
[accounts.az]
dialect = "azure"
base_url = "https://res.openai.azure.com"
api_version = "2024-10-21"
api_key_env = "K"
[accounts.az.models."gpt-4o"]
tpm = 1000
"""
    assert _errors(tmp_path, text, {"K": "sk-fine-0123456789"}) == [
        "4: accounts.tier1.models.gpt-4o-mini.rpm: must be a positive integer, got an integer",
        "5: accounts.tier1.models.gpt-4o-mini-2024-07-18: gpt-4o-mini's limits are set already (line 3): "
        "a snapshot shares its model's",
        "7: accounts.tier1.models.made-up: unknown model 'made-up': add it to the model table (RATEQUEUE_MODELS_FILE)",
        "10: accounts.tier1.models.gpt-4o.colour: unknown field (known: rpm, tpm)",
        "11: accounts.tier1.models.\"gpt-4.1\": set rpm, tpm or both",
        "13: accounts.tier1.models.o3.tpm: must be a positive integer, got a string",
        "19: accounts.az.models: only for openai or openai-compatible accounts, not azure "
        "(an azure deployment's limits are under deployments)",
    ]
