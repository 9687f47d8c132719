"""config.models and config.model_layers: an error of the models file names its line, as those of
[accounts] and [routes] do (issue 13: "validated at start with the line and field of any error")."""

from __future__ import annotations

from pathlib import Path

import pytest

from ratequeue.config.models import load_model_table
from ratequeue.config.settings import load_settings
from ratequeue.errors import ConfigError

pytestmark = pytest.mark.unit

NEW = 'context_window = 10\nmax_output_tokens = 1\nencoding = "o200k_base"\ninput_per_1m = 1\noutput_per_1m = 1\n'


def _error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "models.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_model_table(load_settings({"RATEQUEUE_MODELS_FILE": str(path)}))
    return str(caught.value).replace(f"{path}:", "")


@pytest.mark.parametrize(("text", "expected"), [
    ('[models."gpt-4o"]\nrpm = 5\n\n[acounts.a]\n',
     "4: acounts: unknown top-level key (expected replace, defaults, models, accounts, routes, default_account)"),
    ("# a comment\nreplace = 1\n", "2: replace: must be true or false"),
    ("[models]\n\nx = 1\n", "3: models.x: must be a table"),
    ('[models."gpt-4o"]\nrpm = 5\ncharge_rule = "avg"\n',
     "3: models.\"gpt-4o\".charge_rule: must be one of sum, max, got 'avg'"),
    ('[defaults]\n\ntpm = 0\n[models."new"]\nrpm = 1\n' + NEW,
     "3: defaults.tpm: must be a positive integer, got 0 (used by model 'new')"),
    ('\n[models."new"]\nrpm = 1\n',
     '2: models."new": missing field(s) encoding, tpm, context_window, max_output_tokens, input_per_1m, output_per_1m'),
])
def test_an_error_of_the_models_file_names_its_line(tmp_path: Path, text: str, expected: str) -> None:
    assert _error(tmp_path, text) == expected
