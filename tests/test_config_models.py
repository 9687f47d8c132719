"""config.models: the built-in table, merging a user's file, env overrides, name resolution, errors."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from ratequeue.config.models import ModelSpec, ModelTable, load_model_table, load_model_table_from
from ratequeue.config.settings import load_settings
from ratequeue.errors import ConfigError, UnknownModelError


@pytest.fixture(scope="module")
def table() -> ModelTable:
    return load_model_table(load_settings({}))


def _user_table(tmp_path: Path, text: str, **env: str) -> ModelTable:
    path = tmp_path / "models.toml"
    path.write_text(text)
    return load_model_table(load_settings({"RATEQUEUE_MODELS_FILE": str(path), **env}))


# -- the built-in table -----------------------------------------------------------------------------


def test_builtin_table_has_every_model(table: ModelTable) -> None:
    assert table.names() == sorted(
        [
            "gpt-3.5-turbo", "gpt-3.5-turbo-16k", "gpt-3.5-turbo-instruct", "gpt-4", "gpt-4-32k", "gpt-4-turbo",
            "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "gpt-4o", "gpt-4o-mini", "o1", "o1-mini", "o3", "o3-mini",
            "o4-mini", "text-embedding-3-large", "text-embedding-3-small", "text-embedding-ada-002",
        ]
    )  # fmt: skip
    assert len(table) == 19 and [spec.name for spec in table] == table.names()


@pytest.mark.parametrize(
    ("name", "input_1m", "output_1m"),
    [  # the user's guide, per 1K tokens x 1000
        ("gpt-3.5-turbo", 0.50, 2.00),
        ("gpt-3.5-turbo-16k", 1.00, 2.00),
        ("gpt-4", 30.0, 60.0),
        ("gpt-4-32k", 60.0, 120.0),
        ("gpt-4.1", 2.00, 8.00),
        ("gpt-4.1-mini", 0.40, 1.60),
        ("o3", 10.0, 40.0),
        ("o3-mini", 1.10, 4.40),
    ],
)
def test_guide_prices(table: ModelTable, name: str, input_1m: float, output_1m: float) -> None:
    spec = table.get(name)
    assert (spec.input_per_1m, spec.output_per_1m) == pytest.approx((input_1m, output_1m))


@pytest.mark.parametrize(
    ("name", "prices"),
    [  # OpenAI's published pricing: input, cached input, output
        ("gpt-4o", (2.50, 1.25, 10.00)),
        ("gpt-4o-mini", (0.15, 0.075, 0.60)),
        ("gpt-4.1-nano", (0.10, 0.025, 0.40)),
        ("gpt-4.1", (2.00, 0.50, 8.00)),
        ("gpt-4.1-mini", (0.40, 0.10, 1.60)),
        ("o1", (15.0, 7.5, 60.0)),
        ("o1-mini", (1.10, 0.55, 4.40)),
        ("o4-mini", (1.10, 0.275, 4.40)),
        ("o3-mini", (1.10, 0.55, 4.40)),
        ("text-embedding-3-small", (0.02, 0.02, 0.0)),
        ("text-embedding-3-large", (0.13, 0.13, 0.0)),
        ("text-embedding-ada-002", (0.10, 0.10, 0.0)),
        ("gpt-4", (30.0, 30.0, 60.0)),  # no cached price: no discount
    ],
)
def test_published_prices(table: ModelTable, name: str, prices: tuple[float, float, float]) -> None:
    spec = table.get(name)
    assert (spec.input_per_1m, spec.cached_input_per_1m, spec.output_per_1m) == pytest.approx(prices)


@pytest.mark.parametrize(
    ("name", "window", "max_out", "encoding"),
    [
        ("gpt-4o", 128000, 16384, "o200k_base"),
        ("gpt-4o-mini", 128000, 16384, "o200k_base"),
        ("gpt-4.1", 1047576, 32768, "o200k_base"),
        ("gpt-4.1-nano", 1047576, 32768, "o200k_base"),
        ("o1", 200000, 100000, "o200k_base"),
        ("o1-mini", 128000, 65536, "o200k_base"),
        ("o3", 200000, 100000, "o200k_base"),
        ("o4-mini", 200000, 100000, "o200k_base"),
        ("gpt-4-turbo", 128000, 4096, "cl100k_base"),
        ("gpt-4", 8192, 8192, "cl100k_base"),
        ("gpt-4-32k", 32768, 8192, "cl100k_base"),
        ("gpt-3.5-turbo", 16385, 4096, "cl100k_base"),
        ("text-embedding-3-small", 8191, 0, "cl100k_base"),
    ],
)
def test_windows_and_encodings(
    table: ModelTable, name: str, window: int, max_out: int, encoding: str
) -> None:
    spec = table.get(name)
    assert (spec.context_window, spec.max_output_tokens, spec.encoding) == (window, max_out, encoding)


def test_kinds_endpoints_and_defaults(table: ModelTable) -> None:
    chat, emb = table.get("gpt-4o-mini"), table.get("text-embedding-3-small")
    assert (chat.kind, chat.charge_rule) == ("chat", "sum")
    assert chat.endpoints == ("/v1/chat/completions", "/v1/responses")
    assert (emb.kind, emb.endpoints) == ("embedding", ("/v1/embeddings",))
    assert (table.get("gpt-4o").rpm, table.get("gpt-4o").tpm) == (500, 30000)
    assert (table.get("gpt-3.5-turbo").rpm, table.get("gpt-3.5-turbo").tpm) == (3500, 90000)
    assert table.get("text-embedding-3-large").tpm == 1_000_000


def test_cost_usd(table: ModelTable) -> None:
    spec = table.get("gpt-4o-mini")
    # 800 uncached x 0.15 + 200 cached x 0.075 + 500 output x 0.60, per million
    assert spec.cost_usd(1000, 200, 500) == pytest.approx((800 * 0.15 + 200 * 0.075 + 500 * 0.60) / 1e6)
    assert table.get("gpt-3.5-turbo").cost_usd(1000, 0, 500) == pytest.approx(0.0015)  # the guide's example
    assert spec.cost_usd(0) == 0.0
    with pytest.raises(ValueError):
        spec.cost_usd(10, 20, 0)
    with pytest.raises(ValueError):
        spec.cost_usd(-1, 0, 0)


# -- resolution -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("gpt-4o-mini", "gpt-4o-mini"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4-0613", "gpt-4"),
        ("gpt-4-32k-0613", "gpt-4-32k"),
        ("gpt-3.5-turbo-0125", "gpt-3.5-turbo"),
        ("gpt-3.5-turbo-16k-0613", "gpt-3.5-turbo-16k"),
        ("gpt-4.1-2025-04-14", "gpt-4.1"),
        ("o3-mini-2025-01-31", "o3-mini"),
        ("gpt-4-turbo-2024-04-09", "gpt-4-turbo"),
        ("gpt-4-1106-preview", "gpt-4-turbo"),  # an alias: not gpt-4 and its 8k window
        ("gpt-4-turbo-preview", "gpt-4-turbo"),
        ("ft:gpt-4o-mini-2024-07-18:org::abc", "gpt-4o-mini"),
        ("ft:gpt-3.5-turbo-0613:my-org:custom:8abc", "gpt-3.5-turbo"),
        ("ft:gpt-4o-mini:org::abc:ckpt-step-10", "gpt-4o-mini"),
    ],
)
def test_resolution(table: ModelTable, name: str, canonical: str) -> None:
    assert table.resolve(name) == canonical
    assert table.get(name) is table.get(canonical)
    assert name in table


@pytest.mark.parametrize(
    "name", ["gpt-5", "gpt-4o-mini-fast", "gpt-4o-mini-2024", "ft:llama:org::x", "ft:", "", "GPT-4O"]
)
def test_unknown_models(table: ModelTable, name: str) -> None:
    with pytest.raises(UnknownModelError) as info:
        table.get(name)
    assert info.value.model == name
    assert name not in table


def test_with_limits_returns_a_new_table(table: ModelTable) -> None:
    learned = table.with_limits("gpt-4o-mini-2024-07-18", rpm=30000, tpm=150_000_000)
    assert (learned.get("gpt-4o-mini").rpm, learned.get("gpt-4o-mini").tpm) == (30000, 150_000_000)
    assert (table.get("gpt-4o-mini").rpm, table.get("gpt-4o-mini").tpm) == (500, 200000)
    only_tpm = table.with_limits("gpt-4o", tpm=800000).get("gpt-4o")
    assert (only_tpm.rpm, only_tpm.tpm) == (500, 800000)
    assert learned.get("gpt-4o") is table.get("gpt-4o")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            table.with_limits("gpt-4o", tpm=bad)  # type: ignore[arg-type]
    with pytest.raises(UnknownModelError):
        table.with_limits("nope", tpm=1)


def test_spec_is_frozen(table: ModelTable) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        table.get("gpt-4o").tpm = 1  # type: ignore[misc]
    assert isinstance(table.get("gpt-4o"), ModelSpec)


# -- the user's file and env overrides --------------------------------------------------------------


def test_user_file_merges_per_model_and_per_field(tmp_path: Path) -> None:
    t = _user_table(
        tmp_path,
        """
        [models."gpt-4o"]
        tpm = 800000

        [models."my-model"]
        rpm = 10
        tpm = 1000
        context_window = 4096
        max_output_tokens = 512
        encoding = "cl100k_base"
        input_per_1m = 1
        output_per_1m = 2
        """,
    )
    gpt4o = t.get("gpt-4o")
    assert (gpt4o.tpm, gpt4o.rpm, gpt4o.context_window) == (800000, 500, 128000)  # other fields kept
    mine = t.get("my-model")
    assert (mine.kind, mine.charge_rule, mine.cached_input_per_1m) == ("chat", "sum", 1.0)  # defaults
    assert mine.endpoints == ("/v1/chat/completions", "/v1/responses")
    assert len(t) == 20 and t.sources[-1] == str(tmp_path / "models.toml")


def test_user_defaults_apply_to_builtin_models(tmp_path: Path) -> None:
    t = _user_table(tmp_path, '[defaults]\ncharge_rule = "max"\n')
    assert {spec.charge_rule for spec in t} == {"max"}


def test_replace_true_replaces_the_builtin_table(tmp_path: Path) -> None:
    t = _user_table(
        tmp_path,
        """
        replace = true
        [defaults]
        kind = "chat"
        charge_rule = "max"
        endpoints = ["/v1/chat/completions"]
        encoding = "o200k_base"
        [models."azure-gpt4o"]
        rpm = 60
        tpm = 10000
        context_window = 128000
        max_output_tokens = 4096
        input_per_1m = 2.5
        output_per_1m = 10
        """,
    )
    assert t.names() == ["azure-gpt4o"]
    assert t.get("azure-gpt4o").charge_rule == "max"
    with pytest.raises(UnknownModelError):
        t.get("gpt-4o")


def test_env_overrides_win_over_the_file(tmp_path: Path) -> None:
    t = _user_table(
        tmp_path,
        '[models."gpt-4o-mini"]\ntpm = 5\n',
        RATEQUEUE_MODEL_GPT_4O_MINI_TPM="2000000",
        RATEQUEUE_MODEL_GPT_4_1_MINI_RPM="7",
        RATEQUEUE_MODEL_O3_CHARGE_RULE="max",
        RATEQUEUE_MODEL_GPT_4_CONTEXT_WINDOW="9000",
    )
    assert t.get("gpt-4o-mini").tpm == 2_000_000
    assert t.get("gpt-4.1-mini").rpm == 7 and t.get("gpt-4.1").rpm == 500
    assert t.get("o3").charge_rule == "max"
    assert t.get("gpt-4").context_window == 9000 and t.get("gpt-4-32k").context_window == 32768


def test_env_override_for_an_unknown_model_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"RATEQUEUE_MODEL_GPT_5_TPM: matches no model"):
        load_model_table(load_settings({"RATEQUEUE_MODEL_GPT_5_TPM": "100"}))


def test_env_override_is_validated_against_the_table() -> None:
    with pytest.raises(ConfigError, match=r"RATEQUEUE_MODEL_GPT_4_MAX_OUTPUT_TOKENS.*exceeds context_window"):
        load_model_table(load_settings({"RATEQUEUE_MODEL_GPT_4_MAX_OUTPUT_TOKENS": "9000"}))


# -- bad files --------------------------------------------------------------------------------------


def _error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        _user_table(tmp_path, text)
    message = str(info.value)
    assert str(tmp_path / "models.toml") in message
    return message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[models."gpt-4o"]\ntpm = -5\n', 'models."gpt-4o".tpm: must be a positive integer, got -5'),
        ('[models."gpt-4o"]\ntpm = "lots"\n', 'models."gpt-4o".tpm: must be a positive integer'),
        ('[models."gpt-4o"]\nrpm = true\n', 'models."gpt-4o".rpm: must be a positive integer'),
        ('[models."gpt-4o"]\ntpm = 1.5\n', 'models."gpt-4o".tpm: must be a positive integer'),
        ('[models."gpt-4o"]\ntmp = 5\n', 'models."gpt-4o".tmp: unknown field'),
        ('[models."gpt-4o"]\nencoding = "p50k_base"\n', 'models."gpt-4o".encoding: must be one of'),
        ('[models."gpt-4o"]\ncharge_rule = "avg"\n', 'models."gpt-4o".charge_rule: must be one of sum, max'),
        ('[models."gpt-4o"]\nkind = "image"\n', 'models."gpt-4o".kind: must be one of chat, embedding'),
        ('[models."gpt-4o"]\ninput_per_1m = -1\n', 'models."gpt-4o".input_per_1m: must be a number >= 0'),
        ('[models."gpt-4o"]\nendpoints = []\n', 'models."gpt-4o".endpoints'),
        ('[models."gpt-4o"]\nendpoints = "/v1/chat"\n', 'models."gpt-4o".endpoints'),
        ('[models."gpt-4o"]\nmax_output_tokens = 200000\n', 'models."gpt-4o".max_output_tokens: exceeds'),
        ('[models."gpt-4o"]\nmax_output_tokens = 0\n', "must be >= 1 for a chat model"),
        ('[models."new"]\nrpm = 1\n', 'models."new": missing field(s)'),
        (
            '[defaults]\ntpm = 0\n[models."new"]\nrpm = 1\ncontext_window = 10\nmax_output_tokens = 1\n'
            'encoding = "o200k_base"\ninput_per_1m = 1\noutput_per_1m = 1\n',
            "defaults.tpm: must be a positive integer, got 0 (used by model 'new')",
        ),
        ("[models]\nx = 1\n", "models.toml:2: models.x: must be a table"),
        ("models = 3\n", "models: must be a table"),
        ("replace = 1\n", "replace: must be true or false"),
        ("limits = 1\n", "unknown top-level key"),
        ("[models.\n", "invalid TOML"),
        ('replace = true\n[defaults]\nkind = "chat"\n', "has no models"),
    ],
)
def test_bad_file_errors_name_file_model_and_field(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in _error(tmp_path, text)


def test_bad_default_names_the_model_using_it(tmp_path: Path) -> None:
    message = _error(tmp_path, '[defaults]\ncharge_rule = "avg"\n')
    assert "defaults.charge_rule" in message and "used by model" in message


def test_missing_or_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError, match=re.escape(f"{missing}: cannot read the model table")):
        load_model_table_from(missing)
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_model_table_from(binary)


def test_alias_collision(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="alias 'gpt-4o'"):
        _user_table(tmp_path, '[models."gpt-4o-mini"]\naliases = ["gpt-4o"]\n')
