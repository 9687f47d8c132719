"""config.settings: environment parsing, errors that name the variable, secret masking."""

from __future__ import annotations

import dataclasses
import logging
import pickle
import re
from pathlib import Path

import pytest

from ratequeue.config.settings import Secret, Settings, load_settings, mangle_model_name, normalize_base_url
from ratequeue.config.values import account_fingerprint
from ratequeue.errors import ConfigError

KEY = "sk-proj-TESTKEY0123456789abcdefWXYZ"


def test_defaults_from_an_empty_environment() -> None:
    s = load_settings({})
    assert s.redis_url is None
    assert s.api_key is None and s.organization is None and s.project is None
    assert s.base_url == "https://api.openai.com"
    assert s.models_file is None
    assert s.data_dir == Path.home() / ".local" / "share" / "ratequeue"
    assert (s.burst_seconds, s.reserve_horizon_seconds) == (5.0, 2.0)
    assert (s.max_in_flight, s.chunk_size, s.worker_slots) == (1024, 50, 32)
    assert (s.connect_timeout, s.read_timeout, s.max_attempts) == (10.0, 600.0, 6)
    assert s.job_deadline_seconds == 3600.0
    assert (s.max_file_bytes, s.max_lines) == (200_000_000, 50_000)
    assert s.metrics_port is None and s.log_level == "INFO" and s.visibility_timeout == 1800.0
    assert s.defer_after_seconds == 10.0
    assert dict(s.model_overrides) == {}
    assert s == Settings()


def test_every_variable_is_read() -> None:
    env = {
        "RATEQUEUE_REDIS_URL": "redis://localhost:6379/2",
        "OPENAI_API_KEY": KEY,
        "OPENAI_ORGANIZATION": "org-abc",
        "OPENAI_PROJECT_ID": "proj_1",
        "OPENAI_BASE_URL": "http://localhost:8080/v1/",
        "RATEQUEUE_MODELS_FILE": "~/models.toml",
        "RATEQUEUE_DATA_DIR": "/var/lib/rq",
        "RATEQUEUE_BURST_SECONDS": "2.5",
        "RATEQUEUE_RESERVE_HORIZON": "0",
        "RATEQUEUE_MAX_IN_FLIGHT": "64",
        "RATEQUEUE_CHUNK_SIZE": "10",
        "RATEQUEUE_WORKER_SLOTS": "4",
        "RATEQUEUE_CONNECT_TIMEOUT": "3",
        "RATEQUEUE_READ_TIMEOUT": "120",
        "RATEQUEUE_MAX_ATTEMPTS": "3",
        "RATEQUEUE_JOB_DEADLINE": "60",
        "RATEQUEUE_MAX_FILE_BYTES": "1_000_000",
        "RATEQUEUE_MAX_LINES": "100",
        "RATEQUEUE_METRICS_PORT": "9464",
        "RATEQUEUE_LOG_LEVEL": "debug",
        "RATEQUEUE_VISIBILITY_TIMEOUT": "300",
        "RATEQUEUE_DEFER_AFTER": "2.5",
    }
    s = load_settings(env)
    assert s.redis_url == "redis://localhost:6379/2"
    assert s.api_key is not None and s.api_key.reveal() == KEY
    assert (s.organization, s.project) == ("org-abc", "proj_1")
    assert s.base_url == "http://localhost:8080"
    assert s.models_file == Path.home() / "models.toml"
    assert s.data_dir == Path("/var/lib/rq")
    assert (s.burst_seconds, s.reserve_horizon_seconds) == (2.5, 0.0)
    assert (s.max_in_flight, s.chunk_size, s.worker_slots) == (64, 10, 4)
    assert (s.connect_timeout, s.read_timeout, s.max_attempts, s.job_deadline_seconds) == (3, 120, 3, 60)
    assert (s.max_file_bytes, s.max_lines, s.metrics_port) == (1_000_000, 100, 9464)
    assert (s.log_level, s.visibility_timeout, s.defer_after_seconds) == ("DEBUG", 300.0, 2.5)


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RATEQUEUE_CHUNK_SIZE", "7")
    assert load_settings().chunk_size == 7


def test_empty_values_count_as_unset() -> None:
    s = load_settings({"OPENAI_API_KEY": "", "RATEQUEUE_CHUNK_SIZE": "  ", "OPENAI_BASE_URL": ""})
    assert s.api_key is None and s.chunk_size == 50 and s.base_url == "https://api.openai.com"


def test_org_id_wins_over_organization() -> None:
    s = load_settings({"OPENAI_ORG_ID": "org-1", "OPENAI_ORGANIZATION": "org-2"})
    assert s.organization == "org-1"


@pytest.mark.parametrize(
    ("raw", "root"),
    [
        ("https://api.openai.com/v1", "https://api.openai.com"),
        ("https://api.openai.com/v1/", "https://api.openai.com"),
        ("https://api.openai.com", "https://api.openai.com"),
        ("https://api.openai.com//", "https://api.openai.com"),
        ("https://res.openai.azure.com/openai/v1", "https://res.openai.azure.com/openai"),
        ("http://127.0.0.1:9000/proxy/", "http://127.0.0.1:9000/proxy"),
    ],
)
def test_base_url_is_the_root_that_v1_paths_are_appended_to(raw: str, root: str) -> None:
    assert normalize_base_url(raw) == root
    assert load_settings({"OPENAI_BASE_URL": raw}).base_url == root


@pytest.mark.parametrize("raw", ["api.openai.com/v1", "ftp://host/v1", "https://", "https://h/v1?x=1"])
def test_bad_base_url(raw: str) -> None:
    with pytest.raises(ConfigError, match="OPENAI_BASE_URL"):
        load_settings({"OPENAI_BASE_URL": raw})


def test_base_url_error_does_not_echo_credentials() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"OPENAI_BASE_URL": "ftp://user:hunter2@proxy/v1"})
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    ("var", "raw"),
    [
        ("RATEQUEUE_BURST_SECONDS", "abc"),
        ("RATEQUEUE_BURST_SECONDS", "0"),
        ("RATEQUEUE_BURST_SECONDS", "-1"),
        ("RATEQUEUE_BURST_SECONDS", "nan"),
        ("RATEQUEUE_READ_TIMEOUT", "inf"),
        ("RATEQUEUE_RESERVE_HORIZON", "-0.5"),
        ("RATEQUEUE_MAX_IN_FLIGHT", "0"),
        ("RATEQUEUE_MAX_IN_FLIGHT", "1.5"),
        ("RATEQUEUE_CHUNK_SIZE", "ten"),
        ("RATEQUEUE_WORKER_SLOTS", "-3"),
        ("RATEQUEUE_MAX_ATTEMPTS", "0"),
        ("RATEQUEUE_MAX_FILE_BYTES", "2e8"),
        ("RATEQUEUE_METRICS_PORT", "70000"),
        ("RATEQUEUE_METRICS_PORT", "0"),
        ("RATEQUEUE_LOG_LEVEL", "verbose"),
        ("RATEQUEUE_REDIS_URL", "http://localhost:6379"),
        ("RATEQUEUE_JOB_DEADLINE", "soon"),
        ("RATEQUEUE_DEFER_AFTER", "0"),
        ("RATEQUEUE_DEFER_AFTER", "1800"),
    ],
)
def test_bad_values_raise_config_error_naming_the_variable(var: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=var):
        load_settings({var: raw})


def test_visibility_timeout_must_exceed_read_timeout() -> None:
    with pytest.raises(ConfigError, match=r"RATEQUEUE_VISIBILITY_TIMEOUT.*RATEQUEUE_READ_TIMEOUT"):
        load_settings({"RATEQUEUE_VISIBILITY_TIMEOUT": "600"})
    assert load_settings({"RATEQUEUE_VISIBILITY_TIMEOUT": "601"}).visibility_timeout == 601


def test_settings_are_frozen_and_hashable() -> None:
    s = load_settings({"OPENAI_API_KEY": KEY, "RATEQUEUE_MODEL_GPT_4O_TPM": "1000"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.chunk_size = 1  # type: ignore[misc]
    assert hash(s) == hash(load_settings({"OPENAI_API_KEY": KEY, "RATEQUEUE_MODEL_GPT_4O_TPM": "1000"}))
    # Settings travel to worker processes: they must pickle, overrides and secret included.
    assert pickle.loads(pickle.dumps(s)) == s


# -- the API key ----------------------------------------------------------------------------------


def test_secret_masks_all_but_the_last_four_characters() -> None:
    secret = Secret(KEY)
    assert repr(secret) == "Secret('sk-...WXYZ')"
    assert str(secret) == repr(secret) and f"{secret}" == repr(secret)
    assert secret.reveal() == KEY
    assert repr(Secret("abcdefghijklmnop")) == "Secret('...mnop')"
    assert repr(Secret("sk-short")) == "Secret('***')"  # too short to show any of it
    assert Secret(KEY) == Secret(KEY) and Secret(KEY) != Secret(KEY + "x")
    assert pickle.loads(pickle.dumps(secret)) == secret


def test_the_key_never_appears_in_settings_repr_or_str() -> None:
    s = load_settings({"OPENAI_API_KEY": KEY})
    for text in (repr(s), str(s), f"{s!r}", repr(dataclasses.asdict(s)["api_key"])):
        assert KEY not in text and "TESTKEY" not in text
    assert "Secret('sk-...WXYZ')" in repr(s)


def test_key_from_a_file(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    s = load_settings({"OPENAI_API_KEY_FILE": str(key_file)})
    assert s.api_key is not None and s.api_key.reveal() == KEY


def test_key_file_errors_name_the_file_never_the_key(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=re.escape(f"OPENAI_API_KEY_FILE={missing}") + ".*cannot read"):
        load_settings({"OPENAI_API_KEY_FILE": str(missing)})
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        load_settings({"OPENAI_API_KEY_FILE": str(empty)})
    broken = tmp_path / "broken"
    broken.write_text(KEY[:10] + " " + KEY[10:])
    with pytest.raises(ConfigError) as info:
        load_settings({"OPENAI_API_KEY_FILE": str(broken)})
    assert "whitespace" in str(info.value) and KEY[10:] not in str(info.value)


def test_key_with_inner_whitespace_is_rejected_without_echo() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"OPENAI_API_KEY": "sk-abc def0123456789"})
    assert "OPENAI_API_KEY" in str(info.value) and "def0123456789" not in str(info.value)


def test_key_and_key_file_are_exclusive(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    with pytest.raises(ConfigError, match="only one") as info:
        load_settings({"OPENAI_API_KEY": KEY, "OPENAI_API_KEY_FILE": str(key_file)})
    assert KEY not in str(info.value)


def test_account_id() -> None:
    anonymous = load_settings({})
    assert anonymous.account_id == account_fingerprint("anonymous", None, "https://api.openai.com")
    a = load_settings({"OPENAI_API_KEY": KEY})
    b = load_settings({"OPENAI_API_KEY": KEY + "2"})
    assert a.account_id != b.account_id and KEY not in a.account_id
    # All keys of one organization share its limits, so they share one account id.
    org_a = load_settings({"OPENAI_API_KEY": KEY, "OPENAI_ORG_ID": "org-1"})
    org_b = load_settings({"OPENAI_API_KEY": KEY + "2", "OPENAI_ORG_ID": "org-1"})
    assert org_a.account_id == org_b.account_id
    # "/v1" or not, the same endpoint is the same account.
    c = load_settings({"OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": "https://api.openai.com/v1/"})
    assert c.account_id == a.account_id


def test_redis_password_is_redacted_in_repr() -> None:
    s = load_settings({"RATEQUEUE_REDIS_URL": "redis://:hunter2@redis:6379/0"})
    assert s.redis_url == "redis://:hunter2@redis:6379/0"
    assert "hunter2" not in repr(s) and "redis://:***@redis:6379/0" in repr(s)


def test_redis_url_error_does_not_echo_password() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"RATEQUEUE_REDIS_URL": "http://:hunter2@redis:6379"})
    assert "hunter2" not in str(info.value)


# -- model overrides --------------------------------------------------------------------------------


def test_mangle_model_name() -> None:
    assert mangle_model_name("gpt-4o-mini") == "GPT_4O_MINI"
    assert mangle_model_name("gpt-4.1-mini") == "GPT_4_1_MINI"
    assert mangle_model_name("text-embedding-3-small") == "TEXT_EMBEDDING_3_SMALL"


def test_model_overrides_are_collected() -> None:
    s = load_settings(
        {
            "RATEQUEUE_MODEL_GPT_4O_MINI_TPM": "2000000",
            "RATEQUEUE_MODEL_GPT_4O_MINI_RPM": "5_000",
            "RATEQUEUE_MODEL_GPT_4_1_MAX_OUTPUT_TOKENS": "1000",
            "RATEQUEUE_MODEL_GPT_4_1_CONTEXT_WINDOW": "50000",
            "RATEQUEUE_MODEL_O3_CHARGE_RULE": "MAX",
            "RATEQUEUE_MODELS_FILE": "/tmp/m.toml",  # not an override
        }
    )
    assert {k: dict(v) for k, v in s.model_overrides.items()} == {
        "GPT_4O_MINI": {"tpm": 2_000_000, "rpm": 5000},
        "GPT_4_1": {"max_output_tokens": 1000, "context_window": 50000},
        "O3": {"charge_rule": "max"},
    }


@pytest.mark.parametrize(
    ("var", "raw", "reason"),
    [
        ("RATEQUEUE_MODEL_GPT_4O_TPM", "lots", "not an integer"),
        ("RATEQUEUE_MODEL_GPT_4O_TPM", "0", ">= 1"),
        ("RATEQUEUE_MODEL_GPT_4O_CHARGE_RULE", "avg", "sum, max"),
        ("RATEQUEUE_MODEL_GPT_4O_TOKENS", "5", "FIELD one of"),
        ("RATEQUEUE_MODEL_TPM", "5", "FIELD one of"),
    ],
)
def test_bad_model_overrides(var: str, raw: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=var) as info:
        load_settings({var: raw})
    assert reason in str(info.value)


def test_a_key_file_readable_by_others_draws_a_warning_naming_file_and_mode(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        s = load_settings({"OPENAI_API_KEY_FILE": str(key_file)})
    assert s.api_key is not None and s.api_key.reveal() == KEY  # still used
    [record] = [r for r in caplog.records if "OPENAI_API_KEY_FILE" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert str(key_file) in record.getMessage() and "0644" in record.getMessage()
    assert KEY not in caplog.text and "TESTKEY" not in caplog.text
    caplog.clear()
    key_file.chmod(0o600)
    with caplog.at_level(logging.WARNING):
        load_settings({"OPENAI_API_KEY_FILE": str(key_file)})
    assert not caplog.records


def test_line_limit_and_redis_tls_settings(tmp_path: Path) -> None:
    s = load_settings({})
    assert (s.max_line_bytes, s.redis_tls_insecure, s.redis_ca_file) == (8 * 1024 * 1024, False, None)
    ca = tmp_path / "ca.pem"
    s = load_settings({"RATEQUEUE_MAX_LINE_BYTES": "1_000", "RATEQUEUE_REDIS_TLS_INSECURE": "1",
                       "RATEQUEUE_REDIS_CA_FILE": str(ca)})
    assert (s.max_line_bytes, s.redis_tls_insecure, s.redis_ca_file) == (1000, True, ca)
    with pytest.raises(ConfigError, match="RATEQUEUE_MAX_LINE_BYTES"):
        load_settings({"RATEQUEUE_MAX_LINE_BYTES": "0"})
