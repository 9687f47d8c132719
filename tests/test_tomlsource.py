"""config.tomlsource beyond the common layout: files written on Windows (CRLF line ends: read as text,
they reach the locator as LF), and keys that ``dotted`` must quote so that an error stays on one line
and names the field as TOML would."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from ratequeue.config.accounts_load import load_account_table
from ratequeue.config.settings import load_settings
from ratequeue.config.tomlsource import Problems, dotted
from ratequeue.errors import ConfigError

pytestmark = pytest.mark.unit

LF = '[accounts.a]\napi_key_env = "K"\n\n[accounts.b]\ncolour = "blue"\n'


def test_an_error_in_a_crlf_file_names_its_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_bytes(LF.replace("\n", "\r\n").encode())
    with pytest.raises(ConfigError) as caught:
        load_account_table(load_settings({"RATEQUEUE_MODELS_FILE": str(path)}), env={"K": "sk-fine-0123456789"})
    assert str(caught.value).startswith(f"{path}:5: accounts.b.colour: unknown field")


@pytest.mark.parametrize(("key", "shown"), [
    ("a\n", '"a\\n"'),  # a bare-looking key with a line end is no bare key: quoted, escaped
    ("tab\there", '"tab\\there"'),
    ("bell\x07", '"bell\\u0007"'),
    ("", '""'),
    ("é", '"é"'),
])
def test_dotted_quotes_and_escapes_what_is_not_a_bare_key(key: str, shown: str) -> None:
    assert dotted(("models", key)) == f"models.{shown}"
    assert tomllib.loads(f"{shown} = 1") == {key: 1}  # what it shows is the key, as TOML reads it


def test_an_error_stays_on_one_line_whatever_the_key() -> None:
    problems = Problems("f.toml", '["a\\n"]\nx = 1\n')
    problems.add(("a\n", "x"), "unknown field")
    with pytest.raises(ConfigError) as caught:
        problems.check()
    assert str(caught.value) == 'f.toml:2: "a\\n".x: unknown field'
