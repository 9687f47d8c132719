"""``ratequeue submit --batch-id`` (idempotent, also under concurrent submits) and ``ratequeue
status --wait`` (exit code from the batch's end), through the real CLI, Redis, workers and simulator."""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from ratequeue.config.settings import load_settings
from ratequeue.producer.api import Client
from ratequeue.sim.process import SimHandle, start_sim
from tests.conftest import base_env, wait_until
from tests.test_cli_errors import RATEQUEUE, _cli, _last_line, _requests

pytestmark = pytest.mark.e2e  # subprocesses

SUBMIT = ("submit", "--no-check")  # these tests have no upstream to check the key against


@pytest.fixture
def sim() -> Iterator[SimHandle]:
    with start_sim(["--rpm", "6000", "--tpm", "1000000"]) as handle:
        yield handle


def _queued(rclient: redis.Redis) -> int:
    return int(rclient.llen("ratequeue"))


def test_the_same_batch_id_twice_queues_once(tmp_path: Path, redis_url: str, rclient: redis.Redis) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(_requests(120))
    first = _cli(tmp_path, *SUBMIT, str(src), "--batch-id", "nightly-2026-11-29", RATEQUEUE_REDIS_URL=redis_url)
    assert (first.returncode, first.stdout.strip()) == (0, "nightly-2026-11-29"), first.stderr
    queued = _queued(rclient)
    again = _cli(tmp_path, *SUBMIT, str(src), "--batch-id", "nightly-2026-11-29", RATEQUEUE_REDIS_URL=redis_url)
    assert (again.returncode, again.stdout.strip()) == (0, "nightly-2026-11-29"), again.stderr
    assert "was submitted before from this input: nothing queued again" in again.stderr
    assert _queued(rclient) == queued == 3  # 120 jobs in chunks of 50, enqueued once
    meta = rclient.hgetall("rq:batch:{nightly-2026-11-29}")
    assert meta[b"total"] == b"120"
    assert meta[b"input_sha256"].decode() == hashlib.sha256(src.read_bytes()).hexdigest()


def test_two_concurrent_submits_of_one_id_make_one_batch(tmp_path: Path, redis_url: str, rclient: redis.Redis) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(_requests(400))
    from tests.test_cli_errors import _env

    env = _env(tmp_path, RATEQUEUE_REDIS_URL=redis_url)
    procs = [subprocess.Popen([*RATEQUEUE, *SUBMIT, str(src), "--batch-id", "race"], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert [out.strip() for out, _ in outputs] == ["race", "race"]
    assert sum("nothing queued again" in err for _, err in outputs) == 1
    assert rclient.hget("rq:batch:{race}", "total") == b"400"
    assert _queued(rclient) == 8  # 400 jobs in chunks of 50, once


def test_the_same_id_with_another_file_names_both(tmp_path: Path, redis_url: str, rclient: redis.Redis) -> None:
    one, other = tmp_path / "one.jsonl", tmp_path / "other.jsonl"
    one.write_bytes(_requests(2))
    other.write_bytes(_requests(3))
    assert _cli(tmp_path, *SUBMIT, str(one), "--batch-id", "b1", RATEQUEUE_REDIS_URL=redis_url).returncode == 0
    queued = _queued(rclient)
    proc = _cli(tmp_path, *SUBMIT, str(other), "--batch-id", "b1", RATEQUEUE_REDIS_URL=redis_url)
    one_sha, other_sha = (hashlib.sha256(p.read_bytes()).hexdigest()[:12] for p in (one, other))
    assert (proc.returncode, _last_line(proc)) == (
        2, f"error: batch id b1 is taken by {one} (sha256 {one_sha}); {other} differs (sha256 {other_sha})")
    assert _queued(rclient) == queued


@pytest.mark.parametrize("bad", ["has space", "a" * 65, "x{y}", ""])
def test_a_batch_id_is_checked(tmp_path: Path, redis_url: str, rclient: redis.Redis, bad: str) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(_requests(1))
    proc = _cli(tmp_path, *SUBMIT, str(src), "--batch-id", bad, RATEQUEUE_REDIS_URL=redis_url)
    assert (proc.returncode, _last_line(proc)) == (
        2, f"error: batch id {bad!r}: use 1 to 64 letters, digits, '_' or '-'")
    assert list(rclient.scan_iter("rq:batch:*")) == []


def test_the_python_api_takes_a_batch_id_and_stores_the_input_digest(tmp_path: Path, redis_url: str) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(_requests(2))
    client = Client(load_settings({"RATEQUEUE_REDIS_URL": redis_url}))
    try:
        first = client.submit_batch(src, batch_id="api-1")
        again = client.submit_batch(src, batch_id="api-1")
        plain = client.submit_batch(src)
        assert (first.batch_id, first.jobs, first.existing) == ("api-1", 2, False)
        assert (again.batch_id, again.jobs, again.existing) == ("api-1", 0, True)
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
        for batch_id in ("api-1", plain.batch_id):
            assert client.redis.hget(f"rq:batch:{{{batch_id}}}", "input_sha256") == digest.encode()
    finally:
        client.close()


def test_status_wait_exits_0_for_a_clean_batch_and_1_for_one_with_failed_lines(
    tmp_path: Path, redis_url: str, rclient: redis.Redis, sim: SimHandle,
    start_worker: Callable[[dict[str, str]], object],
) -> None:
    env = base_env(redis_url, sim.url, tmp_path)
    start_worker(env)
    wait_until(lambda: rclient.zcard("rq:workers") > 0, timeout=60, what="the worker's first heartbeat")
    clean, dirty = tmp_path / "clean.jsonl", tmp_path / "dirty.jsonl"
    clean.write_bytes(_requests(5))
    dirty.write_bytes(_requests(2) + b'{"custom_id": "bad"}\n')
    extra = {k: v for k, v in env.items() if k.startswith(("RATEQUEUE_", "OPENAI_")) and k != "RATEQUEUE_DATA_DIR"}
    ids = [_cli(tmp_path, *SUBMIT, str(f), **extra).stdout.strip() for f in (clean, dirty)]
    waited = [_cli(tmp_path, "status", batch_id, "--wait", timeout=180, **extra) for batch_id in ids]
    assert [w.returncode for w in waited] == [0, 1], [w.stderr for w in waited]
    assert '"status": "completed"' in waited[0].stdout and '"failed": 1' in waited[1].stdout
    assert all("no live worker" not in w.stderr for w in waited)


def test_status_wait_with_no_worker_warns_and_times_out_with_1(tmp_path: Path, redis_url: str) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(_requests(1))
    batch_id = _cli(tmp_path, *SUBMIT, str(src), RATEQUEUE_REDIS_URL=redis_url).stdout.strip()
    proc = _cli(tmp_path, "status", batch_id, "--wait", "--timeout", "1", RATEQUEUE_REDIS_URL=redis_url)
    assert proc.returncode == 1
    assert _last_line(proc) == f"error: batch {batch_id} still in_progress after 1.0 s"
    assert (f"warning: no live worker on {redis_url} (none sent a heartbeat in the last 30 s): batch {batch_id} "
            "waits until one starts (ratequeue worker, with the same RATEQUEUE_REDIS_URL)") in proc.stderr
    assert '"status": "in_progress"' in proc.stdout


def test_status_timeout_needs_wait(tmp_path: Path) -> None:
    proc = _cli(tmp_path, "status", "b", "--timeout", "1")
    assert (proc.returncode, _last_line(proc)) == (2, "Error: --timeout goes with --wait")
