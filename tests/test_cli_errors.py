"""What a user sees when something expected goes wrong: one line on stderr, the documented exit code
(0 every line succeeded, 1 some failed or were rejected, 2 usage or configuration, 130 interrupted),
no traceback, and no work done before the arguments are known to be usable. Through the real CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import redis

from ratequeue.sim.process import start_sim
from tests.conftest import ROOT, private_redis, wait_until

pytestmark = pytest.mark.e2e  # subprocesses

RATEQUEUE = [sys.executable, "-m", "ratequeue.producer.cli"]
UNREACHABLE = "redis://127.0.0.1:1/0"
REFUSED = f"error: cannot reach Redis at {UNREACHABLE} (connection refused); set RATEQUEUE_REDIS_URL"

SUBMIT = ("submit", "--no-check")  # these tests have no upstream to check the key against


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RATEQUEUE_", "OPENAI_"))}
    env.update(RATEQUEUE_DATA_DIR=str(tmp_path / "data"), PYTHONPATH=str(ROOT), COLUMNS="200", **extra)
    return env


def _cli(tmp_path: Path, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RATEQUEUE, *args], env=_env(tmp_path, **env), cwd=tmp_path, capture_output=True,
                          text=True, timeout=timeout)


def _last_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr.strip().splitlines()[-1]


def _requests(n: int, model: str = "gpt-4o-mini") -> bytes:
    return b"".join(
        orjson.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                      "body": {"model": model, "messages": [{"role": "user", "content": f"doc {i}"}],
                               "max_tokens": 8}}) + b"\n"
        for i in range(n)
    )


def _batches(client: redis.Redis) -> list[bytes]:
    return list(client.scan_iter("rq:batch:*"))


@pytest.fixture
def requests_file(tmp_path: Path) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_bytes(_requests(3))
    return path


# 1. Redis unreachable or refusing -------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["status"], ["status", "batch_x"], ["submit", "IN"], ["results", "batch_x", "-o", "out.jsonl"],
    ["cancel", "batch_x"], ["resume"], ["resume", "batch_x"], ["delete", "batch_x"],
])
def test_an_unreachable_redis_is_one_line_naming_the_url(tmp_path: Path, requests_file: Path, args: list[str]) -> None:
    args = [str(requests_file) if a == "IN" else a for a in args]
    proc = _cli(tmp_path, *args, RATEQUEUE_REDIS_URL=UNREACHABLE)
    assert (proc.returncode, _last_line(proc)) == (2, REFUSED)
    assert f"redis: {UNREACHABLE}" in proc.stderr  # the Redis used is named before it is tried


def test_the_password_in_the_url_is_never_shown(tmp_path: Path) -> None:
    proc = _cli(tmp_path, "status", RATEQUEUE_REDIS_URL="redis://:hunter2hunter2@127.0.0.1:1/0")
    assert proc.returncode == 2
    assert _last_line(proc) == ("error: cannot reach Redis at redis://:***@127.0.0.1:1/0 (connection refused); "
                                "set RATEQUEUE_REDIS_URL")
    assert "hunter2" not in proc.stderr + proc.stdout


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    flag = _cli(tmp_path, "--debug", "status", RATEQUEUE_REDIS_URL=UNREACHABLE)
    env = _cli(tmp_path, "status", RATEQUEUE_REDIS_URL=UNREACHABLE, RATEQUEUE_DEBUG="1")
    for proc in (flag, env):
        assert proc.returncode != 0
        assert "Traceback" in proc.stderr and "redis.exceptions.ConnectionError" in proc.stderr


def test_a_redis_that_wants_a_password_or_refuses_it(tmp_path: Path) -> None:
    with private_redis() as url:
        redis.Redis.from_url(url).config_set("requirepass", "right-password-1")
        port_db = url.removeprefix("redis://")
        none = _cli(tmp_path, "status", RATEQUEUE_REDIS_URL=url)
        wrong = _cli(tmp_path, "status", RATEQUEUE_REDIS_URL=f"redis://:wrong-password-1@{port_db}")
        right = _cli(tmp_path, "status", RATEQUEUE_REDIS_URL=f"redis://:right-password-1@{port_db}")
    assert none.returncode == 2
    assert _last_line(none) == (f"error: Redis at {url} wants a password (NOAUTH); "
                                "put it in RATEQUEUE_REDIS_URL (redis://:PASSWORD@host:port/db)")
    assert wrong.returncode == 2
    assert _last_line(wrong) == (f"error: Redis at redis://:***@{port_db} refused the password (WRONGPASS); "
                                 "check RATEQUEUE_REDIS_URL")
    assert "wrong-password-1" not in wrong.stderr
    assert right.returncode == 0, right.stderr


def test_a_black_holed_host_fails_within_the_connect_timeout(tmp_path: Path) -> None:
    # A listening socket whose accept queue is full drops further SYNs: the connect hangs like
    # one to a firewalled host.
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(4):  # fill the accept queue (its length is backlog + 1 on Linux)
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    try:
        started = time.monotonic()
        proc = _cli(tmp_path, "status", "batch_x", RATEQUEUE_REDIS_URL=f"redis://127.0.0.1:{port}/0")
        elapsed = time.monotonic() - started
    finally:
        for s in fillers:
            s.close()
        server.close()
    assert proc.returncode == 2
    assert _last_line(proc).startswith(f"error: cannot reach Redis at redis://127.0.0.1:{port}/0 (")
    assert elapsed < 30  # the connect timeout is 5 s; generous for a loaded machine


def test_a_bad_setting_is_one_line(tmp_path: Path) -> None:
    proc = _cli(tmp_path, "status", RATEQUEUE_REDIS_URL=UNREACHABLE, RATEQUEUE_CHUNK_SIZE="lots")
    assert (proc.returncode, _last_line(proc)) == (2, "error: RATEQUEUE_CHUNK_SIZE='lots': not an integer")


def test_a_missing_batch_is_one_line(tmp_path: Path, redis_url: str) -> None:
    for args in (["status", "batch_nope"], ["cancel", "batch_nope"], ["delete", "batch_nope"],
                 ["results", "batch_nope", "-o", "x.jsonl"], ["resume", "batch_nope"]):
        proc = _cli(tmp_path, *args, RATEQUEUE_REDIS_URL=redis_url)
        assert (proc.returncode, _last_line(proc)) == (2, "error: no batch 'batch_nope' in this Redis"), args


def test_the_redis_used_is_named(tmp_path: Path, redis_url: str) -> None:
    proc = _cli(tmp_path, "status", RATEQUEUE_REDIS_URL=redis_url)
    assert proc.returncode == 0
    assert proc.stderr.splitlines()[0] == f"redis: {redis_url}"


# 3. Arguments checked before any work ---------------------------------------------------------

@pytest.mark.parametrize(("output", "message"), [
    ("/nonexistent/dir/x.jsonl", "error: cannot write -o /nonexistent/dir/x.jsonl: /nonexistent/dir does not exist"),
    ("FILE/x.jsonl", "error: cannot write -o FILE/x.jsonl: FILE is not a directory"),
    ("DIR", "Error: Invalid value for '-o' / '--output': File 'DIR' is a directory."),  # click's own check
])
def test_an_unwritable_output_is_refused_before_anything_is_submitted(
    tmp_path: Path, requests_file: Path, rclient: redis.Redis, redis_url: str, output: str, message: str
) -> None:
    (tmp_path / "DIR").mkdir()
    (tmp_path / "FILE").write_text("x")
    output = output.replace("FILE", str(tmp_path / "FILE")).replace("DIR", str(tmp_path / "DIR"))
    message = message.replace("FILE", str(tmp_path / "FILE")).replace("DIR", str(tmp_path / "DIR"))
    with start_sim(["--rpm", "6000", "--tpm", "1000000"]) as sim:
        proc = _cli(tmp_path, "run", str(requests_file), "-o", output, "-w", "1", RATEQUEUE_REDIS_URL=redis_url,
                    OPENAI_BASE_URL=sim.url, OPENAI_API_KEY="sk-cli-test-00000000")
        assert sim.stats(timeline=False)["requests_total"] == 0
    assert (proc.returncode, _last_line(proc)) == (2, message)
    assert _batches(rclient) == []


def test_an_unwritable_errors_file_is_refused_before_anything_is_submitted(
    tmp_path: Path, requests_file: Path, rclient: redis.Redis, redis_url: str
) -> None:
    proc = _cli(tmp_path, "run", str(requests_file), "-o", str(tmp_path / "out.jsonl"), "--errors",
                "/nonexistent/e.jsonl", RATEQUEUE_REDIS_URL=redis_url)
    assert (proc.returncode, _last_line(proc)) == (
        2, "error: cannot write --errors /nonexistent/e.jsonl: /nonexistent does not exist")
    assert _batches(rclient) == []


def test_results_checks_its_paths_before_reading(tmp_path: Path, redis_url: str) -> None:
    proc = _cli(tmp_path, "results", "batch_x", "-o", "/nonexistent/dir/x.jsonl", RATEQUEUE_REDIS_URL=redis_url)
    assert (proc.returncode, _last_line(proc)) == (
        2, "error: cannot write -o /nonexistent/dir/x.jsonl: /nonexistent/dir does not exist")


def test_workers_must_be_at_least_one(tmp_path: Path, requests_file: Path) -> None:
    proc = _cli(tmp_path, "run", str(requests_file), "-o", "out.jsonl", "-w", "0", timeout=30)
    assert proc.returncode == 2
    assert _last_line(proc) == "Error: Invalid value for '-w' / '--workers': 0 is not in the range x>=1."


@pytest.mark.parametrize("command", ["run", "submit"])
def test_a_bad_window_names_the_accepted_form(tmp_path: Path, requests_file: Path, command: str) -> None:
    extra = ["-o", "out.jsonl"] if command == "run" else []
    proc = _cli(tmp_path, command, str(requests_file), *extra, "--window", "5x", RATEQUEUE_REDIS_URL=UNREACHABLE)
    assert proc.returncode == 2
    assert _last_line(proc) == ("Error: Invalid value for '--window': '5x': a completion window is a whole "
                                "number (1 or more) and a unit, s, m, h or d (24h, 30m, 7d)")


def test_an_empty_input_file_is_a_usage_error(tmp_path: Path, rclient: redis.Redis, redis_url: str) -> None:
    empty = tmp_path / "x.jsonl"
    empty.write_bytes(b"\n  \n")
    proc = _cli(tmp_path, *SUBMIT, str(empty), RATEQUEUE_REDIS_URL=redis_url)
    assert (proc.returncode, _last_line(proc)) == (2, f"error: {empty} has no requests")
    assert _batches(rclient) == [] and rclient.llen("ratequeue") == 0


def test_run_says_an_empty_input_before_asking_the_upstream(tmp_path: Path) -> None:
    empty = tmp_path / "x.jsonl"
    empty.write_bytes(b"")
    proc = _cli(tmp_path, "run", str(empty), "-o", "out.jsonl", OPENAI_BASE_URL="http://127.0.0.1:1")
    assert (proc.returncode, _last_line(proc)) == (2, f"error: {empty} has no requests")


def test_a_file_of_no_requests_exits_1_naming_where_the_errors_are(
    tmp_path: Path, rclient: redis.Redis, redis_url: str
) -> None:
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    proc = _cli(tmp_path, *SUBMIT, str(binary), RATEQUEUE_REDIS_URL=redis_url)
    batch_id = proc.stdout.strip()
    assert proc.returncode == 1
    assert _last_line(proc) == (f"error: every line of {binary} was rejected; "
                                f"see ratequeue results {batch_id} -o FILE")
    assert rclient.llen("ratequeue") == 0  # nothing was queued


def test_submit_exits_1_when_some_lines_were_rejected(tmp_path: Path, redis_url: str) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(_requests(2) + b'{"custom_id": "bad"}\n')
    proc = _cli(tmp_path, *SUBMIT, str(src), RATEQUEUE_REDIS_URL=redis_url)
    assert proc.returncode == 1
    assert "2 jobs queued, 1 input lines rejected" in proc.stderr
    assert proc.stdout.strip().startswith("batch_")


def test_a_run_in_which_every_line_failed_exits_1(tmp_path: Path, requests_file: Path) -> None:
    with start_sim(["--rpm", "6000", "--tpm", "1000000", "--fail-rate", "1"]) as sim:
        proc = _cli(tmp_path, "run", str(requests_file), "-o", "out.jsonl", timeout=180, OPENAI_BASE_URL=sim.url,
                    OPENAI_API_KEY="sk-cli-test-00000000", RATEQUEUE_MAX_ATTEMPTS="1")
    assert proc.returncode == 1, proc.stderr
    assert "0 completed, 3 failed of 3" in proc.stderr
    assert _last_line(proc) == f"error: every line of {requests_file} failed; see out.errors.jsonl"


def test_a_run_of_only_rejected_lines_exits_1_without_calling_upstream(tmp_path: Path) -> None:
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    with start_sim(["--rpm", "6000", "--tpm", "1000000"]) as sim:
        proc = _cli(tmp_path, "run", str(binary), "-o", "out.jsonl", timeout=180, OPENAI_BASE_URL=sim.url,
                    OPENAI_API_KEY="sk-cli-test-00000000")
        assert sim.stats(timeline=False)["requests_total"] == 0
    assert proc.returncode == 1
    assert _last_line(proc) == f"error: every line of {binary} failed; see out.errors.jsonl"


# Unknown RATEQUEUE_* variables ----------------------------------------------------------------

def test_a_misspelt_variable_is_warned_about_with_the_closest_name(tmp_path: Path, redis_url: str) -> None:
    proc = _cli(tmp_path, "status", RATEQUEUE_REDIS_URL=redis_url, RATEQUEUE_REDIS_ULR="redis://x",
                RATEQUEUE_TEST_DB="11", RATEQUEUE_MODEL_GPT_4O_TPM="1000")
    assert proc.returncode == 0
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: RATEQUEUE_REDIS_ULR is not a ratequeue setting; did you mean RATEQUEUE_REDIS_URL?"]


# Interrupted ----------------------------------------------------------------------------------

def test_ctrl_c_exits_130_without_a_traceback(tmp_path: Path, requests_file: Path, redis_url: str) -> None:
    submitted = _cli(tmp_path, *SUBMIT, str(requests_file), RATEQUEUE_REDIS_URL=redis_url)
    batch_id = submitted.stdout.strip()
    proc = subprocess.Popen([*RATEQUEUE, "status", batch_id, "--wait"],
                            env=_env(tmp_path, RATEQUEUE_REDIS_URL=redis_url),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr = ""

    def warned() -> bool:
        nonlocal stderr
        assert proc.stderr is not None
        stderr += proc.stderr.readline()
        return "no live worker" in stderr

    wait_until(warned, timeout=30, what="the no-worker warning")
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=30)
    stderr += rest
    assert proc.returncode == 130
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == "interrupted"


# The worker names its Redis ----------------------------------------------------------------

def test_the_worker_says_which_redis_it_connects_to(tmp_path: Path) -> None:
    env = _env(tmp_path, RATEQUEUE_REDIS_URL="redis://:hunter2hunter2@127.0.0.1:1/0")
    proc = subprocess.Popen([sys.executable, "-m", "ratequeue.worker"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []

    def said() -> bool:
        assert proc.stdout is not None
        seen.append(proc.stdout.readline())
        return "Cannot connect" in seen[-1]

    try:
        wait_until(said, timeout=60, what="the worker's first connection error")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    output = "".join(seen)
    assert "connecting to Redis at redis://:***@127.0.0.1:1/0" in output
    assert "hunter2" not in output
