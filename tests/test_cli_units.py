"""Pieces of the command line's behaviour that need no I/O: where the errors file goes, the
unknown-variable warning of the settings loader, the path checks and the error mapping."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import redis

from ratequeue.config import unknown
from ratequeue.config.settings import load_settings, shown_redis_url
from ratequeue.errors import BatchNotFoundError, ConfigError, UsageError
from ratequeue.producer.cli_errors import ExitCode, check_writable, describe, state
from ratequeue.producer.collect import errors_path_for


@pytest.mark.parametrize(("results", "errors"), [
    ("out.jsonl", "out.errors.jsonl"),
    ("out.v2.jsonl", "out.v2.errors.jsonl"),
    ("run.2026.11.29.jsonl", "run.2026.11.29.errors.jsonl"),
    ("dir.d/out", "dir.d/out.errors.jsonl"),
    ("out.json", "out.errors.json"),
])
def test_the_errors_file_sits_beside_the_results_file(results: str, errors: str) -> None:
    assert errors_path_for(Path(results)) == Path(errors)


@pytest.fixture
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(unknown, "_warned", set())


def test_an_unknown_variable_is_warned_once_with_the_closest_name(
    fresh_warnings: None, caplog: pytest.LogCaptureFixture
) -> None:
    env = {"RATEQUEUE_REDIS_ULR": "redis://x", "RATEQUEUE_CHUNKSIZE": "5", "RATEQUEUE_ZZZ": "1"}
    with caplog.at_level(logging.WARNING, logger="ratequeue.config.settings"):
        load_settings(env)
        load_settings(env)  # once per process, however often settings are loaded
    assert [r.getMessage() for r in caplog.records] == [
        "RATEQUEUE_CHUNKSIZE is not a ratequeue setting; did you mean RATEQUEUE_CHUNK_SIZE?",
        "RATEQUEUE_REDIS_ULR is not a ratequeue setting; did you mean RATEQUEUE_REDIS_URL?",
        "RATEQUEUE_ZZZ is not a ratequeue setting (see the README for the list)",
    ]


def test_settings_overrides_and_the_variables_of_tests_and_tools_are_not_warned_about(
    fresh_warnings: None, caplog: pytest.LogCaptureFixture
) -> None:
    env = {"RATEQUEUE_TEST_DB": "11", "RATEQUEUE_TEST_METRICS_DB": "10", "RATEQUEUE_BENCH_REDIS_URL": "redis://x",
           "RATEQUEUE_DEBUG": "1", "RATEQUEUE_MODEL_GPT_4O_TPM": "1000", "RATEQUEUE_PROMETHEUS_URL": "http://p",
           "RATEQUEUE_DASHBOARDS_DIR": "/d", "RATEQUEUE_REDIS_MAXMEMORY": "2gb", "RATEQUEUE_LOG_LEVEL": "INFO",
           "RATEQUEUE_REDIS_CA_FILE": "/ca.pem", "RATEQUEUE_SHUTDOWN_GRACE": "1", "OPENAI_WHATEVER": "x"}
    with caplog.at_level(logging.WARNING, logger="ratequeue.config.settings"):
        load_settings(env)
    assert caplog.records == []


def test_the_redis_url_shown_hides_the_password() -> None:
    assert shown_redis_url(None) == "redis://127.0.0.1:6379/0"
    assert shown_redis_url("redis://:pw-123456@h:1/2") == "redis://:***@h:1/2"
    assert shown_redis_url("rediss://bob:pw-123456@h:1/2") == "rediss://bob:***@h:1/2"


def test_paths_are_checked_for_writing(tmp_path: Path) -> None:
    check_writable(tmp_path / "new.jsonl", "-o")  # a new file in a writable directory
    (tmp_path / "old.jsonl").write_text("")
    check_writable(tmp_path / "old.jsonl", "-o")
    with pytest.raises(UsageError, match=r"^cannot write -o .*/missing/x: .*/missing does not exist$"):
        check_writable(tmp_path / "missing" / "x", "-o")
    with pytest.raises(UsageError, match=r"is a directory$"):
        check_writable(tmp_path, "--errors")


def test_expected_failures_map_to_one_line_and_a_code(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state, "redis_url", "redis://:***@h:1/0")
    refused = redis.ConnectionError("Error 111 connecting to h:1. Connection refused.")
    assert describe(refused) == (
        "error: cannot reach Redis at redis://:***@h:1/0 (connection refused); set RATEQUEUE_REDIS_URL",
        ExitCode.USAGE)
    assert describe(redis.TimeoutError("Timeout connecting to server")) == (
        "error: cannot reach Redis at redis://:***@h:1/0 (timed out); set RATEQUEUE_REDIS_URL", ExitCode.USAGE)
    assert describe(BatchNotFoundError("no batch 'b' in this Redis")) == (
        "error: no batch 'b' in this Redis", ExitCode.USAGE)
    assert describe(ConfigError("RATEQUEUE_CHUNK_SIZE='x': not an integer"))[1] == ExitCode.USAGE  # type: ignore[index]
    assert describe(KeyboardInterrupt()) == ("interrupted", ExitCode.INTERRUPTED)
    assert describe(FileNotFoundError(2, "No such file or directory", "x.jsonl")) == (
        "error: x.jsonl: no such file or directory", ExitCode.USAGE)
    assert describe(ZeroDivisionError()) is None  # a bug keeps its traceback


def test_the_default_redis_is_named_as_the_default(capsys: pytest.CaptureFixture[str]) -> None:
    from ratequeue.producer.cli_parts import say_redis as _say_redis

    _say_redis(None)
    _say_redis("redis://:pw-123456@h:1/2")
    assert capsys.readouterr().err.splitlines() == [
        "redis: redis://127.0.0.1:6379/0 (default; set RATEQUEUE_REDIS_URL to change)",
        "redis: redis://:***@h:1/2",
    ]


def test_a_script_error_is_a_bug_and_keeps_its_traceback() -> None:
    assert describe(redis.ResponseError("ERR user_script:1: Script attempted to access nonexistent global")) is None
