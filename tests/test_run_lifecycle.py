"""Issue 10, findings 2, 4, 5 and 6: the life of `ratequeue run`, run as a user runs it.

A real `ratequeue run` subprocess (its own session, so a test can signal it alone, as a terminal
signals its foreground job, or its whole group, as a terminal's Ctrl-C does), embedded Redis in
per-input data directories under a private HOME, real workers and the real simulator. The
simulator's per-call counts (``x-client-request-id`` is ``<batch>/<custom_id>``) tell which jobs
were sent and paid for.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from ratequeue.sim.process import SimHandle, start_sim
from tests.conftest import ROOT, wait_until

pytestmark = pytest.mark.e2e  # subprocesses

RATEQUEUE = [sys.executable, "-c", "from ratequeue.producer.cli import entry; entry()"]
KEY = "sk-lifecycle-0123456789abcdef"
WRONG_KEY = "sk-wrong-key-0123456789abcdef"
RPM = 600  # 10 requests a second: a run of 150 jobs lasts long enough to interrupt
# A 5 s window: the workers use the server's window, and the simulator's default (a minute) would
# let the whole batch go at once.
SLOW_SIM = ["--rpm", str(RPM), "--tpm", "10000000", "--latency-ms", "300", "--api-key", KEY, "--burst-seconds", "5"]


def write_input(path: Path, prefix: str, jobs: int) -> Path:
    lines = [
        {"custom_id": f"{prefix}-{n}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"{prefix} {n}"}],
                  "max_tokens": 8}}
        for n in range(jobs)
    ]
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    return path


def user_env(tmp_path: Path, sim_url: str, key: str = KEY, **extra: str) -> dict[str, str]:
    """A user's environment: no RATEQUEUE_* but what the test sets; HOME of the test's own, so
    the default data root is ``tmp_path/home/.local/share/ratequeue``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RATEQUEUE_", "OPENAI_"))}
    env.update(HOME=str(tmp_path / "home"), PYTHONPATH=str(ROOT), COLUMNS="1000", PYTHONIOENCODING="utf-8",
               OPENAI_BASE_URL=sim_url, OPENAI_API_KEY=key, RATEQUEUE_LOG_LEVEL="WARNING",
               RATEQUEUE_MODEL_GPT_4O_MINI_RPM=str(RPM), **extra)
    return env


def default_run_dir(tmp_path: Path, input_path: Path) -> Path:
    digest = hashlib.sha256(input_path.read_bytes()).hexdigest()
    return tmp_path / "home" / ".local" / "share" / "ratequeue" / "runs" / digest[:16]


class RunProcess:
    """`ratequeue run ...` in a session of its own; its stderr collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen([*RATEQUEUE, *args], env=env, cwd=cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    def children(self) -> list[int]:
        return children_of(self.proc.pid)

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def children_of(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (read off /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def calls(sim: SimHandle, prefix: str) -> dict[str, int]:
    """custom_id -> calls the simulator received for it, for the jobs whose ids start with ``prefix``."""
    return answers(sim, prefix, "calls_by_client_id")


def answers(sim: SimHandle, prefix: str, kind: str = "answers_by_client_id") -> dict[str, int]:
    """custom_id -> answers (200s) the simulator gave it, for the jobs whose ids start with ``prefix``."""
    by_call = sim.stats(timeline=False)[kind]
    out: dict[str, int] = {}
    for call, n in by_call.items():
        custom_id = call.split("/", 1)[1]
        if custom_id.startswith(prefix + "-"):
            out[custom_id] = out.get(custom_id, 0) + n
    return out


def result_ids(path: Path) -> list[str]:
    return [orjson.loads(line)["custom_id"] for line in path.read_bytes().splitlines()]


@pytest.fixture
def slow_sim() -> Iterator[SimHandle]:
    with start_sim(SLOW_SIM) as sim:
        yield sim


def _started(run: RunProcess, sim: SimHandle, prefix: str, at_least: int, workers: int) -> list[int]:
    """Wait until the simulator answered ``at_least`` of the run's jobs; returns the run's children
    (the embedded redis-server and the workers)."""
    wait_until(lambda: sum(answers(sim, prefix).values()) >= at_least, 90, "the run's first answers",
               explain=lambda: run.stderr)
    kids = run.children()
    assert len(kids) == workers + 1, (kids, run.stderr)
    return kids


def test_a_wrong_key_stops_run_and_submit_before_any_call(tmp_path: Path, slow_sim: SimHandle,
                                                          redis_url: str) -> None:
    src = write_input(tmp_path / "in.jsonl", "k", 5)
    env = user_env(tmp_path, slow_sim.url, key=WRONG_KEY)
    started = time.monotonic()
    run = subprocess.run([*RATEQUEUE, "run", str(src), "-o", str(tmp_path / "out.jsonl")], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    refused = (f"error: upstream {slow_sim.url}/v1 refused the API key (401 invalid_api_key); "
               "set OPENAI_API_KEY")
    assert (run.returncode, run.stderr.strip()) == (2, refused)
    assert time.monotonic() - started < 30  # at once, not "0 req/min ETA ?" for good
    submit = subprocess.run([*RATEQUEUE, "submit", str(src)], env={**env, "RATEQUEUE_REDIS_URL": redis_url},
                            capture_output=True, text=True, timeout=60)
    assert (submit.returncode, submit.stderr.strip()) == (2, f"redis: {redis_url}\n{refused}")
    assert slow_sim.stats(timeline=False)["accepted_requests"] == 0
    for out in (run, submit):
        assert "wrong-key" not in out.stdout + out.stderr  # the key never shows
    unchecked = subprocess.run([*RATEQUEUE, "submit", "--no-check", str(src)],
                               env={**env, "RATEQUEUE_REDIS_URL": redis_url}, capture_output=True, text=True,
                               timeout=60)
    assert unchecked.returncode == 0, unchecked.stderr
    assert unchecked.stdout.startswith("batch_")


def test_an_unreachable_upstream_stops_run_at_once(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = write_input(tmp_path / "in.jsonl", "u", 3)
    run = subprocess.run([*RATEQUEUE, "run", str(src), "-o", str(tmp_path / "out.jsonl")],
                         env=user_env(tmp_path, f"http://127.0.0.1:{port}"), cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert (run.returncode, run.stderr.strip()) == (
        2, f"error: cannot reach upstream http://127.0.0.1:{port}/v1 (connection refused); set OPENAI_BASE_URL")


def test_a_key_refused_midway_stops_the_run_and_the_same_command_continues(tmp_path: Path,
                                                                          slow_sim: SimHandle) -> None:
    src = write_input(tmp_path / "in.jsonl", "p", 20)
    out = tmp_path / "out.jsonl"
    args = ["run", "--no-check", str(src), "-o", str(out)]  # past the check: the workers meet the 401
    refused = subprocess.run([*RATEQUEUE, *args], env=user_env(tmp_path, slow_sim.url, key=WRONG_KEY),
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1, refused.stderr
    assert ("error: gpt-4o-mini: paused, upstream refused the key (401); fix OPENAI_API_KEY and run the same "
            "command again to continue") in refused.stderr.splitlines()
    assert out.exists() and result_ids(out) == []  # what is done so far (nothing) is written
    fixed = subprocess.run([*RATEQUEUE, *args], env=user_env(tmp_path, slow_sim.url), cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert fixed.returncode == 0, fixed.stderr
    assert "continuing batch" in fixed.stderr
    assert sorted(result_ids(out)) == sorted(f"p-{n}" for n in range(20))
    # Once more: the batch is complete, nothing is sent again, the files are written again.
    out.unlink()
    sent = slow_sim.stats(timeline=False)["requests_total"]
    again = subprocess.run([*RATEQUEUE, *args], env=user_env(tmp_path, slow_sim.url), cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert re.search(r"^batch batch_\w+ of this input is already completed: nothing is run again, its results "
                     r"are written again \(--fresh runs it anew\)$", again.stderr, re.M), again.stderr
    assert slow_sim.stats(timeline=False)["requests_total"] == sent
    assert sorted(result_ids(out)) == sorted(f"p-{n}" for n in range(20))


def test_ctrl_c_stops_writes_and_says_how_to_continue_and_nothing_leaks_into_other_runs(
    tmp_path: Path, slow_sim: SimHandle
) -> None:
    jobs = 300  # 150 lasted ~11 s once both workers left slow start together: done before a loaded machine's Ctrl-C
    src = write_input(tmp_path / "a.jsonl", "a", jobs)
    out = tmp_path / "a-out.jsonl"
    args = ["run", str(src), "-o", str(out), "-w", "2"]
    env = user_env(tmp_path, slow_sim.url)
    run = RunProcess(args, env, tmp_path)
    try:
        kids = _started(run, slow_sim, "a", 20, workers=2)
        data_dir = default_run_dir(tmp_path, src)
        assert f"data directory: {data_dir}" in run.lines
        # A second run of the same input refuses at once, naming the first.
        second = subprocess.run([*RATEQUEUE, *args], env=env, cwd=tmp_path, capture_output=True, text=True,
                                timeout=60)
        assert (second.returncode, second.stderr.strip()) == (
            2, f"error: data directory {data_dir} is in use by another ratequeue process (pid {run.proc.pid}); "
               "wait for it to end, or pass --data-dir")
        os.kill(run.proc.pid, signal.SIGINT)  # `run` only, as a terminal signals its foreground job
        signalled = time.monotonic()
        wait_until(lambda: any(line.startswith("interrupt: stopping") for line in run.lines), 10,
                   "the interrupt message", explain=lambda: run.stderr)
        assert time.monotonic() - signalled < 5
        # Dispatching stops within a second (parked pairs are read before each call, cached 1 s);
        # the margin is the loaded machine's. Calls already sent may still finish.
        time.sleep(max(0.0, signalled + 3 - time.monotonic()))
        sent_by_then = sum(calls(slow_sim, "a").values())
        assert run.wait(60) == 130
    finally:
        run.kill()
    assert ("interrupt: stopping; waiting up to 5 s for calls in flight — Ctrl-C again to stop at once"
            in run.lines)
    assert f"to continue, run: ratequeue {' '.join(args)}" in run.lines
    done = result_ids(out)
    assert 0 < len(done) < jobs and len(set(done)) == len(done)
    wait_until(lambda: not any(running(pid) for pid in kids), 15, "the run's children to end")
    first_answers = answers(slow_sim, "a")
    assert sum(calls(slow_sim, "a").values()) == sent_by_then

    # Another input: another data directory, and not one call of the interrupted batch.
    slow_sim.reset()
    other = write_input(tmp_path / "b.jsonl", "b", 10)
    b_run = subprocess.run([*RATEQUEUE, "run", str(other), "-o", str(tmp_path / "b-out.jsonl")], env=env,
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert b_run.returncode == 0, b_run.stderr
    assert f"data directory: {default_run_dir(tmp_path, other)}" in b_run.stderr.splitlines()
    assert answers(slow_sim, "a") == {}

    # The same command again continues the batch: what was paid for is not paid again.
    again = subprocess.run([*RATEQUEUE, *args], env=env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=180)
    assert again.returncode == 0, again.stderr
    assert "continuing batch" in again.stderr
    assert sorted(result_ids(out)) == sorted(f"a-{n}" for n in range(jobs))
    paid = sum(first_answers.values()) + sum(answers(slow_sim, "a").values())
    # Answers cut off in flight by the interrupt are paid again; the rest are paid once (was 1.5x).
    assert paid <= jobs * 1.15, (paid, jobs)


def test_the_terminals_ctrl_c_twice_stops_at_once_and_the_batch_can_be_collected(
    tmp_path: Path, slow_sim: SimHandle
) -> None:
    jobs = 300  # 150 lasted ~11 s once both workers left slow start together: done before a loaded machine's Ctrl-C
    src = write_input(tmp_path / "in.jsonl", "t", jobs)
    out = tmp_path / "out.jsonl"
    args = ["run", str(src), "-o", str(out), "-w", "2"]
    env = user_env(tmp_path, slow_sim.url)
    run = RunProcess(args, env, tmp_path)
    try:
        kids = _started(run, slow_sim, "t", 20, workers=2)  # some answers stored by the workers too
        os.killpg(run.proc.pid, signal.SIGINT)  # the whole foreground group, as a terminal's Ctrl-C
        wait_until(lambda: any(line.startswith("interrupt: stopping") for line in run.lines), 10,
                   "the interrupt message", explain=lambda: run.stderr)
        os.killpg(run.proc.pid, signal.SIGINT)
        again = time.monotonic()
        assert run.wait(30) == 130
        assert time.monotonic() - again < 10
    finally:
        run.kill()
    assert f"interrupt: stopped at once; to continue, run: ratequeue {' '.join(args)}" in run.lines
    assert "Aborted!" not in run.stderr and "Traceback" not in run.stderr
    wait_until(lambda: not any(running(pid) for pid in kids), 15, "the run's children to end")
    [batch_id] = re.findall(r"^batch (batch_\w+): \d+ jobs queued", run.stderr, re.M)
    # Its results can be collected from the run's data directory, with the run gone.
    collected = subprocess.run([*RATEQUEUE, "results", batch_id, "-o", str(tmp_path / "so-far.jsonl"),
                                "--data-dir", str(default_run_dir(tmp_path, src))], env=env, cwd=tmp_path,
                               capture_output=True, text=True, timeout=60)
    assert collected.returncode == 0, collected.stderr
    assert 0 < len(result_ids(tmp_path / "so-far.jsonl")) < jobs
    # Stopped at once, it continues all the same (the leases its killed workers held are dropped).
    again = subprocess.run([*RATEQUEUE, *args], env=env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=90)
    assert again.returncode == 0, again.stderr
    assert sorted(result_ids(out)) == sorted(f"t-{n}" for n in range(jobs))
    assert sum(answers(slow_sim, "t").values()) <= jobs * 1.15


def test_run_killed_with_sigkill_leaves_no_process_behind(tmp_path: Path, slow_sim: SimHandle) -> None:
    src = write_input(tmp_path / "in.jsonl", "s", 100)
    run = RunProcess(["run", str(src), "-o", str(tmp_path / "out.jsonl")], user_env(tmp_path, slow_sim.url),
                     tmp_path)
    try:
        kids = _started(run, slow_sim, "s", 5, workers=1)
        os.kill(run.proc.pid, signal.SIGKILL)
        run.wait(10)
    finally:
        run.kill()
    wait_until(lambda: not any(running(pid) for pid in kids), 15, "the children of a killed run to end")


def test_ctrl_c_on_a_shared_redis_pauses_the_batch_so_other_runs_do_not_pay_for_it(
    tmp_path: Path, slow_sim: SimHandle, redis_url: str
) -> None:
    """With RATEQUEUE_REDIS_URL set, other runs' workers share the queue: an interrupted batch is
    paused (not left queued), so their workers drop its chunks; the same command continues it."""
    jobs = 300  # 150 lasted ~11 s once both workers left slow start together: done before a loaded machine's Ctrl-C
    src = write_input(tmp_path / "a.jsonl", "s", jobs)
    out = tmp_path / "a-out.jsonl"
    args = ["run", str(src), "-o", str(out), "-w", "2"]
    env = user_env(tmp_path, slow_sim.url, RATEQUEUE_REDIS_URL=redis_url)
    run = RunProcess(args, env, tmp_path)
    try:
        wait_until(lambda: sum(answers(slow_sim, "s").values()) >= 20, 90, "the run's first answers",
                   explain=lambda: run.stderr)
        os.kill(run.proc.pid, signal.SIGINT)
        assert run.wait(60) == 130
    finally:
        run.kill()
    assert f"to continue, run: ratequeue {' '.join(args)}" in run.lines
    batch_id = re.search(r"batch (batch_\w+)", run.stderr).group(1)  # type: ignore[union-attr]
    status = subprocess.run([*RATEQUEUE, "status", batch_id], env=env, capture_output=True, text=True, timeout=60)
    assert orjson.loads(status.stdout)["paused"] is True, status.stdout
    done_before = len(result_ids(out))
    assert 0 < done_before < jobs

    # An unrelated run on the same Redis: its workers meet the paused batch's chunks and drop them.
    time.sleep(2)  # calls in flight at the interrupt have landed
    slow_sim.reset()
    other = write_input(tmp_path / "b.jsonl", "o", 30)
    b_run = subprocess.run([*RATEQUEUE, "run", str(other), "-o", str(tmp_path / "b-out.jsonl"), "-w", "2"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert b_run.returncode == 0, b_run.stderr
    assert answers(slow_sim, "s") == {} and calls(slow_sim, "s") == {}

    again = subprocess.run([*RATEQUEUE, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr
    assert "continuing batch" in again.stderr
    assert sorted(result_ids(out)) == sorted(f"s-{n}" for n in range(jobs))
