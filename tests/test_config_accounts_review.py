"""config.accounts_load on what a hurried user writes: a key pasted where the name of its variable
or file belongs (the error must not show it, whatever the key's alphabet), names that end in a
line break (Python's "$" matches before one), and a route listed twice under two spellings."""

from __future__ import annotations

from pathlib import Path

import pytest

from ratequeue.config.accounts_load import load_account_table
from ratequeue.config.settings import load_settings
from ratequeue.errors import ConfigError

pytestmark = pytest.mark.unit

AZURE_HEX_KEY = "a3f09c1d7e2b4c5a8d6f0e9b1c2d3e4f"  # Azure's keys: 32 hex digits, a letter first here
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJlMDEyMzQ1Njc4OQ"
AZURE = '[accounts.az]\ndialect = "azure"\nbase_url = "https://r.openai.azure.com"\napi_version = "2024-10-21"\n'


def _error(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    path = tmp_path / "models.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_account_table(load_settings({"RATEQUEUE_MODELS_FILE": str(path)}), env=env or {})
    return str(caught.value).replace(f"{path}:", "")


@pytest.mark.parametrize(("field", "secret"), [
    ("api_key_env", AZURE_HEX_KEY),  # a valid variable name: "the variable <key> is not set"
    ("api_key_file", AZURE_HEX_KEY),  # "file <key>: cannot read the key file"
    ("api_key_file", "sk-proj-thisisthesecretkey0123456789"),
    ("bearer_token_file", JWT),
])
def test_a_key_written_where_its_name_belongs_is_never_shown(tmp_path: Path, field: str, secret: str) -> None:
    message = _error(tmp_path, AZURE + f'{field} = "{secret}"\n')
    assert message.startswith(f"5: accounts.az.{field}: "), message
    assert secret not in message and secret[:12] not in message and secret[-8:] not in message, message
    assert "key" in message


def test_an_unset_variable_or_missing_file_is_still_named_when_it_cannot_be_a_key(tmp_path: Path) -> None:
    assert _error(tmp_path, AZURE + 'api_key_env = "AZURE_EU_KEY_2"\n') == (
        "5: accounts.az.api_key_env: the variable AZURE_EU_KEY_2 is not set")
    message = _error(tmp_path, AZURE + 'api_key_file = "/run/secrets/azure-eu-key"\n')
    assert message.startswith("5: accounts.az.api_key_file: /run/secrets/azure-eu-key: cannot read"), message


@pytest.mark.parametrize(("text", "expected"), [
    ('[accounts."a\\n"]\n', "1: accounts.\"a\\n\": an account alias is letters, digits, '.', '-' and '_', "
     "starting with a letter or digit"),
    (AZURE + 'api_key_env = "K\\n"\n', "5: accounts.az.api_key_env: must name an environment variable "
     "(letters, digits and _), not hold the key"),
    (AZURE + 'api_key_env = "K"\n[accounts.az.deployments.m]\ndeployment = "mini\\n"\ntpm = 1000\n',
     "7: accounts.az.deployments.m.deployment: an Azure deployment name is letters, digits, '.', '-' and '_'"),
])
def test_a_name_ending_in_a_line_break_is_refused(tmp_path: Path, text: str, expected: str) -> None:
    assert _error(tmp_path, text, {"K": "azkey-0123456789", "K\n": "azkey-0123456789"}) == expected


def test_a_route_listed_twice_under_two_spellings_is_refused(tmp_path: Path) -> None:
    text = '[accounts.a]\napi_key_env = "K"\n[routes]\n"gpt-4o-mini" = ["a", {account = "a", model = "gpt-4o-mini"}]\n'
    assert _error(tmp_path, text, {"K": "sk-fine-0123456789"}) == "4: routes.gpt-4o-mini: entry 2: a is listed twice"


def test_a_models_file_and_a_key_file_saved_with_a_byte_order_mark_are_read(tmp_path: Path) -> None:
    """Windows tools (Notepad before 2019, PowerShell 5's Set-Content -Encoding UTF8) start UTF-8 with
    a BOM: tomllib refused it ("Invalid statement (at line 1, column 1)"), and in a key file it was
    "whitespace or control characters" of the key."""
    key = tmp_path / "key"
    key.write_bytes("\ufeffsk-fine-0123456789\r\n".encode())
    key.chmod(0o600)
    path = tmp_path / "models.toml"
    path.write_bytes(f'\ufeff[accounts.a]\r\napi_key_file = "{key}"\r\n'.encode())
    table = load_account_table(load_settings({"RATEQUEUE_MODELS_FILE": str(path)}), env={})
    credential = table.account("a").credential
    assert credential is not None and credential.value() == "sk-fine-0123456789"
