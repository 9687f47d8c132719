"""Accounts are data (issue 13): every job goes out with its own account's key, to its account's
server, whichever worker runs it. Real worker processes, real Redis, one simulator per account
(each requiring its own key: a request with another key would be a 401 there).

The finding reproduced: two workers holding different keys on one Redis sent each submitter's jobs
with whichever key the worker that took them held.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from ratequeue.config.settings import load_settings
from ratequeue.producer.api import Client
from ratequeue.queue import queue_for
from ratequeue.sim.process import SimHandle, start_sim
from tests.conftest import base_env, wait_until

pytestmark = pytest.mark.e2e

StartWorker = Callable[[dict[str, str]], subprocess.Popen[bytes]]
KEY_A = "sk-team-a-0123456789abcdef"
KEY_B = "sk-team-b-fedcba9876543210"


@pytest.fixture
def sims() -> Iterator[tuple[SimHandle, SimHandle]]:
    with start_sim(["--api-key", KEY_A]) as a, start_sim(["--api-key", KEY_B]) as b:
        yield a, b


def _models_file(tmp_path: Path, a: SimHandle, b: SimHandle) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(f"""\
default_account = "team-a"

[accounts.team-a]
base_url = "{a.url}"
api_key_env = "KEY_A"

[accounts.team-b]
base_url = "{b.url}"
api_key_env = "KEY_B"
""")
    return path


def _env(redis_url: str, tmp_path: Path, models: Path, **keys: str) -> dict[str, str]:
    """A worker's (or submitter's) environment: the models file and only the keys given; the
    environment's own OPENAI_* point at team a's server with team a's key, as the workers of the
    finding had (before the fix, every job went there with it)."""
    env = base_env(redis_url, "http://127.0.0.1:9", tmp_path, RATEQUEUE_MODELS_FILE=str(models), **keys)
    env.pop("OPENAI_API_KEY")
    return env


def _requests(n: int) -> list[dict[str, object]]:
    """Jobs of both accounts, interleaved: odd lines name team-b, even ones take the default (team-a)."""
    lines: list[dict[str, object]] = []
    for i in range(n):
        line: dict[str, object] = {
            "custom_id": f"{'b' if i % 2 else 'a'}-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": f"item {i}"}]},
        }
        if i % 2:
            line["account"] = "team-b"
        lines.append(line)
    return lines


def _check_each_job_went_to_its_own_account(batch_id: str, batch: dict[str, object], a: SimHandle,
                                           b: SimHandle, n: int) -> None:
    assert batch["status"] == "completed" and batch["request_counts"] == {"total": n, "completed": n, "failed": 0}
    for sim, mine in ((a, "a-"), (b, "b-")):
        stats = sim.stats(timeline=False)
        seen = {cid.split("/", 1)[1] for cid in stats["calls_by_client_id"]}
        assert seen == {f"{mine}{i}" for i in range(n) if (i % 2 == 1) == (mine == "b-")}, (
            f"{sim.url} ({mine[0]}'s server) saw other jobs than its account's: {sorted(seen)}")
        assert "401" not in stats["by_status"], f"a request reached {sim.url} with another account's key"
        assert stats["by_status"].get("200") == n // 2


def test_one_worker_holding_both_keys_sends_each_job_with_its_own_account(
        redis_url: str, tmp_path: Path, start_worker: StartWorker, sims: tuple[SimHandle, SimHandle]) -> None:
    a, b = sims
    models = _models_file(tmp_path, a, b)
    start_worker(_env(redis_url, tmp_path, models, KEY_A=KEY_A, KEY_B=KEY_B))
    client = Client(load_settings(_env(redis_url, tmp_path, models)))  # the submitter holds no key
    batch_id = client.submit_batch(_requests(20)).batch_id
    _check_each_job_went_to_its_own_account(batch_id, client.wait(batch_id, timeout=60), a, b, 20)


def test_two_workers_with_different_keys_each_send_only_their_own_accounts_jobs(
        redis_url: str, tmp_path: Path, start_worker: StartWorker, sims: tuple[SimHandle, SimHandle]) -> None:
    """The finding: each worker holds one key. A job of the other account is left to the worker
    that holds its key (deferred, never sent with the wrong one), and every job completes."""
    a, b = sims
    models = _models_file(tmp_path, a, b)
    # Each worker's own environment also names its own server and key, as before accounts.
    start_worker({**_env(redis_url, tmp_path, models, KEY_A=KEY_A), "OPENAI_BASE_URL": a.url, "OPENAI_API_KEY": KEY_A})
    start_worker({**_env(redis_url, tmp_path, models, KEY_B=KEY_B), "OPENAI_BASE_URL": b.url, "OPENAI_API_KEY": KEY_B})
    client = Client(load_settings(_env(redis_url, tmp_path, models)))
    batch_id = client.submit_batch(_requests(30)).batch_id
    _check_each_job_went_to_its_own_account(batch_id, client.wait(batch_id, timeout=90), a, b, 30)


def test_a_worker_without_one_accounts_key_runs_the_others_and_leaves_that_ones_jobs_waiting(
        redis_url: str, tmp_path: Path, start_worker: StartWorker, sims: tuple[SimHandle, SimHandle]) -> None:
    """Team a's jobs run; team b's are neither sent (b's server sees nothing) nor failed: they wait,
    and run once a worker holding b's key starts."""
    a, b = sims
    models = _models_file(tmp_path, a, b)
    start_worker(_env(redis_url, tmp_path, models, KEY_A=KEY_A))
    client = Client(load_settings(_env(redis_url, tmp_path, models)))
    batch_id = client.submit_batch(_requests(10)).batch_id
    wait_until(lambda: client.status(batch_id)["request_counts"]["completed"] == 5, 30, "team a's 5 jobs")
    assert client.status(batch_id)["request_counts"]["failed"] == 0
    assert b.stats(timeline=False)["requests_total"] == 0
    # Team b's chunk waits in team b's own queue, which this worker does not consume: it never took
    # it (before queues per account it took it, refused it and deferred its jobs, again and again).
    assert client.redis.llen(queue_for("team-b")) == 1 and client.overview()["queue_depth"] == 1
    assert "holds no credentials" not in (tmp_path / "worker-0.log").read_text()
    # `ratequeue status` says why b's jobs wait; the submitter holds no key, yet names the workers' buckets.
    ids = {name: client.accounts.account(name).bucket_id for name in ("team-a", "team-b")}
    assert client.overview()["accounts"] == {
        "team-a": {"dialect": "openai", "bucket": ids["team-a"], "workers_with_key": 1},
        "team-b": {"dialect": "openai", "bucket": ids["team-b"], "workers_with_key": 0}}
    start_worker(_env(redis_url, tmp_path, models, KEY_B=KEY_B))
    _check_each_job_went_to_its_own_account(batch_id, client.wait(batch_id, timeout=60), a, b, 10)


def test_a_self_hosted_model_runs_with_no_key_and_no_rate_limit_headers(
        redis_url: str, tmp_path: Path, start_worker: StartWorker) -> None:
    """Any model name on an openai-compatible account: no models table entry, no key, no headers
    (its limits unknown: nothing holds it back but the server)."""
    with start_sim(["--no-ratelimit-headers", "--latency-ms", "20"]) as gpu:
        models = tmp_path / "models.toml"
        models.write_text(f'[accounts.gpu]\ndialect = "openai-compatible"\nbase_url = "{gpu.url}"\n')
        env = _env(redis_url, tmp_path, models)
        start_worker(env)
        client = Client(load_settings(env))
        lines = [{"custom_id": f"l-{i}", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": "llama3.1:8b", "max_tokens": 5, "messages": [{"role": "user", "content": f"{i}"}]}}
                 for i in range(40)]
        batch_id = client.submit_batch(lines).batch_id
        batch = client.wait(batch_id, timeout=60)
        stats = gpu.stats(timeline=False)
    assert batch["request_counts"] == {"total": 40, "completed": 40, "failed": 0}
    assert stats["by_status"] == {"200": 40}
    assert batch["usage"]["prompt_tokens"] > 0


def test_run_account_sends_the_batch_with_that_account_after_checking_its_server(
        redis_url: str, tmp_path: Path) -> None:
    """`ratequeue run --account gpu`: the key check asks the account's server (no key needed), the
    local workers send every job there; a model only that account serves is accepted."""
    with start_sim(["--no-ratelimit-headers"]) as gpu, start_sim(["--api-key", KEY_A]) as a:
        models = tmp_path / "models.toml"
        models.write_text(f'default_account = "team-a"\n[accounts.team-a]\nbase_url = "{a.url}"\n'
                          f'api_key_env = "KEY_A"\n[accounts.gpu]\ndialect = "openai-compatible"\n'
                          f'base_url = "{gpu.url}"\n')
        lines = [{"custom_id": f"l-{i}", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": "mistralai/Mistral-7B-Instruct", "max_tokens": 5,
                           "messages": [{"role": "user", "content": f"{i}"}]}} for i in range(5)]
        (tmp_path / "in.jsonl").write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
        env = _env(redis_url, tmp_path, models, KEY_A=KEY_A)
        proc = subprocess.run([sys.executable, "-m", "ratequeue.producer.cli", "run", "--account", "gpu",
                               str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl")],
                              env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 5
        stats = gpu.stats(timeline=False)
        assert stats["by_status"] == {"200": 5} and stats["models_listed"] == 1  # the key check went there
        assert a.stats(timeline=False)["requests_total"] == 0


def test_a_worker_with_a_bad_accounts_table_exits_naming_file_line_and_field(tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text('[accounts.azure-eu]\ndialect = "azure"\nbase_url = "https://r.openai.azure.com"\n'
                      'api_key_env = "AZURE_EU_KEY"\n')
    env = _env("redis://127.0.0.1:9/0", tmp_path, models)
    proc = subprocess.run([sys.executable, "-m", "ratequeue.worker"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith(
        f'{models}:1: accounts.azure-eu: an azure account needs api_version (e.g. "2024-10-21")')
