"""Budgets in USD (issue 14): dispatch stops before a batch's budget or the day's would be
exceeded, with real workers racing, the simulator answering with usage, and real Redis; raising
the budget resumes; a failed call gives its reservation back."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from ratequeue.config.settings import load_settings
from ratequeue.jobstore import keys
from ratequeue.jobstore.budgets import NANO, to_nano
from ratequeue.jobstore.jobs import StoredJob
from ratequeue.producer.api import Client
from ratequeue.sim.process import SimHandle, start_sim
from ratequeue.worker.budget import worst_case_usd
from tests.conftest import base_env, wait_until

StartWorker = Callable[[dict[str, str]], subprocess.Popen[bytes]]
RATEQUEUE = [sys.executable, "-c", "from ratequeue.producer.cli import entry; entry()"]
MODEL = "gpt-4o-mini"


def _jobs(n: int, prefix: str) -> list[dict[str, Any]]:
    return [{"custom_id": f"{prefix}{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": MODEL, "messages": [{"role": "user", "content": f"Summarise item {i}."}],
                      "max_tokens": 40}} for i in range(n)]


def _cli(env: dict[str, str], *args: str) -> str:
    proc = subprocess.run([*RATEQUEUE, *args], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _worst_case(client: Client, batch_id: str) -> float:
    """The sum of the jobs' worst-case costs, as the workers reserve them."""
    spec = client.table.get(MODEL)
    stored = client.redis.hgetall(keys.batch_jobs(batch_id))
    return sum(to_nano(worst_case_usd(spec, StoredJob.loads(cid.decode(), raw))) for cid, raw in stored.items()) / NANO


def _actual_cost(client: Client, batch_id: str) -> float:
    """The cost of the stored results, from each answer's usage at list price."""
    spec = client.table.get(MODEL)
    cost = 0.0
    for line in client.iter_results(batch_id):
        usage = line["response"]["body"]["usage"]
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        cost += spec.cost_usd(usage["prompt_tokens"], cached, usage["completion_tokens"])
    return cost


def _stopped(client: Client, batch_id: str, why: str) -> bool:
    batch = client.status(batch_id)
    budget = batch["budget"] or {}
    return budget.get("paused") == why and budget["reserved_usd"] == 0


@pytest.fixture
def sim() -> Iterator[SimHandle]:
    with start_sim(["--rpm", "6000", "--tpm", "10000000", "--latency-ms", "100", "--seed", "7"]) as handle:
        yield handle


def test_a_batch_stops_at_its_budget_with_two_workers_racing_and_a_raise_finishes_it(
    redis_url: str, sim: SimHandle, tmp_path: Path, start_worker: StartWorker
) -> None:
    env = base_env(redis_url, sim.url, tmp_path)
    client = Client(load_settings(env))
    total = 60
    probe = client.submit_batch(_jobs(total, "p"), budget_usd=0.0)  # the same jobs, never run: their price
    budget = round(_worst_case(client, probe.batch_id) / 3, 9)  # about a third of the worst case
    batch_id = client.submit_batch(_jobs(total, "j"), budget_usd=budget).batch_id
    start_worker(env)
    start_worker(env)

    wait_until(lambda: _stopped(client, batch_id, "budget"), 60, "the batch stopped by its budget",
               explain=lambda: client.status(batch_id)["budget"])
    # The last answers' costs are counted before their results are stored: wait for those.
    wait_until(lambda: client.status(batch_id)["budget"]["spent_usd"] == pytest.approx(
        _actual_cost(client, batch_id), abs=1e-9), 10, "the stored results to match the budget's spend")
    batch = client.status(batch_id)
    done = batch["request_counts"]["completed"]
    assert 0 < done < total and batch["request_counts"]["failed"] == 0 and batch["status"] == "in_progress"
    actual = _actual_cost(client, batch_id)
    assert actual <= budget  # never past it, whichever worker sent what
    assert batch["cost_usd"] == pytest.approx(actual, abs=1e-9)
    assert "paused: budget" in _cli(env, "status", batch_id).replace('"paused": "budget"', "paused: budget")
    assert sim.stats(timeline=False)["calls_by_client_id"].keys().isdisjoint(
        {f"{probe.batch_id}/p{i}" for i in range(total)})  # the $0 batch sent nothing

    raised = orjson.loads(_cli(env, "budget", batch_id, "--usd", "1"))
    assert raised["batch"]["limit_usd"] == 1.0
    finished = client.wait(batch_id, timeout=60, poll=0.2)
    assert finished["request_counts"] == {"total": total, "completed": total, "failed": 0}
    assert finished["budget"]["paused"] is None and finished["budget"]["reserved_usd"] == 0


def test_the_daily_budget_stops_every_batch_and_a_raise_resumes_them(
    redis_url: str, sim: SimHandle, tmp_path: Path, start_worker: StartWorker
) -> None:
    env = base_env(redis_url, sim.url, tmp_path)
    client = Client(load_settings(env))
    probe = client.submit_batch(_jobs(40, "p"), budget_usd=0.0)
    daily = round(_worst_case(client, probe.batch_id) / 2, 9)  # two batches of 40: about a quarter of them
    start_worker({**env, "RATEQUEUE_DAILY_BUDGET_USD": str(daily)})
    first = client.submit_batch(_jobs(40, "a")).batch_id
    second = client.submit_batch(_jobs(40, "b")).batch_id

    for batch_id in (first, second):
        wait_until(lambda b=batch_id: _stopped(client, b, "daily budget"), 60,
                   f"{batch_id} stopped by the day's budget", explain=lambda b=batch_id: client.status(b)["budget"])

    def spent() -> float:
        return _actual_cost(client, first) + _actual_cost(client, second)

    wait_until(lambda: orjson.loads(_cli(env, "budget"))["daily"]["spent_usd"] == pytest.approx(spent(), abs=1e-9),
               10, "the stored results to match the day's spend")
    assert 0 < spent() <= daily
    assert orjson.loads(_cli(env, "budget"))["daily"]["reserved_usd"] == 0

    _cli(env, "budget", "--daily", "1")
    for batch_id in (first, second):
        finished = client.wait(batch_id, timeout=60, poll=0.2)
        assert finished["request_counts"] == {"total": 40, "completed": 40, "failed": 0}


def test_a_failed_call_gives_its_reservation_back(redis_url: str, tmp_path: Path, start_worker: StartWorker) -> None:
    """A budget of exactly the batch's worst case is enough only if each failed attempt's
    reservation is released: 30% of the calls fail (HTTP 500) and are retried."""
    with start_sim(["--rpm", "6000", "--tpm", "10000000", "--fail-rate", "0.3", "--seed", "3"]) as sim:
        env = base_env(redis_url, sim.url, tmp_path, RATEQUEUE_MAX_ATTEMPTS="20")
        client = Client(load_settings(env))
        total = 30
        probe = client.submit_batch(_jobs(total, "p"), budget_usd=0.0)
        budget = _worst_case(client, probe.batch_id)
        batch_id = client.submit_batch(_jobs(total, "j"), budget_usd=budget).batch_id
        start_worker(env)
        finished = client.wait(batch_id, timeout=90, poll=0.2)
        assert finished["request_counts"] == {"total": total, "completed": total, "failed": 0}
        assert finished["budget"]["reserved_usd"] == 0
        assert finished["budget"]["spent_usd"] == pytest.approx(_actual_cost(client, batch_id), abs=1e-9)
        held = redis.Redis.from_url(redis_url).zcard(keys.budget_held())
        assert held == 0


def test_the_http_api_takes_a_batch_budget_in_its_metadata(
    redis_url: str, sim: SimHandle, tmp_path: Path, start_worker: StartWorker
) -> None:
    import openai

    from tests.httpapi_server import TOKENS, api_server, write_tokens

    env = base_env(redis_url, sim.url, tmp_path, RATEQUEUE_API_TOKENS_FILE=str(write_tokens(tmp_path / "t.json")))
    start_worker(env)
    with api_server(env, tmp_path) as server:
        sdk = openai.OpenAI(api_key=TOKENS["alpha"], base_url=server.base_url, max_retries=0)
        content = b"\n".join(orjson.dumps(line) for line in _jobs(5, "h"))
        uploaded = sdk.files.create(file=("budget.jsonl", content), purpose="batch")
        with pytest.raises(openai.BadRequestError) as refused:
            sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
                               metadata={"ratequeue_budget_usd": "-1"})
        assert refused.value.param == "metadata.ratequeue_budget_usd" and "not an amount of USD" in str(refused.value)
        batch = sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                   completion_window="24h", metadata={"ratequeue_budget_usd": "0"})
        client = Client(load_settings(env))
        wait_until(lambda: _stopped(client, batch.id, "budget"), 30, "the $0 batch stopped by its budget")
        assert sdk.batches.retrieve(batch.id).status == "in_progress"
        assert not any(cid.startswith(batch.id) for cid in sim.stats(timeline=False)["calls_by_client_id"])
        _cli(env, "budget", batch.id, "--usd", "1")
        wait_until(lambda: sdk.batches.retrieve(batch.id).status == "completed", 30, "the batch completed")


def test_a_crashed_workers_reservation_expires_and_a_late_settle_counts_only_the_cost(redis_url: str) -> None:
    """A worker that dies mid-call never settles: its reservation is given back once it expires
    (the next reserve sweeps it), and a settle arriving after that adds the actual cost only."""
    import asyncio

    import redis.asyncio as aioredis

    from ratequeue.jobstore.budgets import set_batch_budget
    from ratequeue.worker.budget import Budgets, Refusal, Reservation

    settings = load_settings(base_env(redis_url, "http://127.0.0.1:9", Path("/tmp")))
    spec = Client(settings).table.get(MODEL)
    job = StoredJob("c1", 1, "/v1/chat/completions", {}, MODEL, 50, 10, 40)
    worst = worst_case_usd(spec, job)
    set_batch_budget(redis.Redis.from_url(redis_url), "b1", worst * 1.5)  # room for one call at a time

    async def main() -> None:
        client = aioredis.Redis.from_url(redis_url)
        budgets = Budgets(settings, client)
        budgets._hold_ms = 300  # a crash's reservation, given back after 0.3 s
        crashed = await budgets.reserve("b1", spec, job)
        assert isinstance(crashed, Reservation)
        assert isinstance(await budgets.reserve("b1", spec, job), Refusal)  # held: no room
        await asyncio.sleep(0.4)
        late = await budgets.reserve("b1", spec, job)  # swept the expired one first
        assert isinstance(late, Reservation)
        await budgets.settle(crashed, worst / 4)  # its call did end after all: only its cost is added
        await budgets.settle(late, worst / 4)
        await client.aclose()

    asyncio.run(main())
    batch = redis.Redis.from_url(redis_url).hgetall(keys.budget_batches())
    assert int(batch[b"b1:reserved"]) == 0
    assert int(batch[b"b1:spent"]) == 2 * to_nano(worst / 4)


def test_the_exporter_publishes_the_budgets_and_their_spend(redis_url: str) -> None:
    """Budgets set at run time show at the next scrape: the day's (over RATEQUEUE_DAILY_BUDGET_USD)
    and each budgeted batch's limit, spend and reservations."""
    from prometheus_client import CollectorRegistry

    from ratequeue.config.models import load_model_table_from
    from ratequeue.jobstore.budgets import set_daily_budget
    from ratequeue.producer.exporter import RedisCollector

    client = redis.Redis.from_url(redis_url)
    registry = CollectorRegistry()
    registry.register(RedisCollector(client, load_model_table_from(), 5.0, daily_budget_usd=25.0))
    value = registry.get_sample_value
    assert value("ratequeue_budget_usd", {"scope": "daily"}) == 25.0  # the environment's
    set_daily_budget(client, 40.0)
    env = base_env(redis_url, "http://127.0.0.1:9", Path("/tmp"))
    producer = Client(load_settings(env))
    b1 = producer.submit_batch(_jobs(2, "e"), budget_usd=2.5).batch_id
    gone = producer.submit_batch(_jobs(2, "g"), budget_usd=1.0).batch_id
    producer.delete(gone, force=True)
    client.hincrby(keys.budget_batches(), f"{b1}:spent", to_nano(0.75))
    client.hincrby(keys.budget_days(), f"{int(client.time()[0]) // 86400}:reserved", to_nano(0.5))
    assert value("ratequeue_budget_usd", {"scope": "daily"}) == 40.0
    assert value("ratequeue_budget_reserved_usd", {"scope": "daily"}) == 0.5
    assert value("ratequeue_batch_budget_usd", {"batch_id": b1}) == 2.5
    assert value("ratequeue_batch_budget_spent_usd", {"batch_id": b1}) == 0.75
    assert value("ratequeue_batch_budget_reserved_usd", {"batch_id": b1}) == 0.0
    assert value("ratequeue_batch_budget_usd", {"batch_id": gone}) is None  # deleted: its series goes
    client.hset(keys.budget_batches(), "expired:limit", 1)  # a batch gone at its retention: not shown
    assert value("ratequeue_batch_budget_usd", {"batch_id": "expired"}) is None


def test_without_budgets_no_call_is_held_and_a_budget_set_later_counts_what_was_spent(
    redis_url: str, sim: SimHandle, tmp_path: Path, start_worker: StartWorker
) -> None:
    """The budget scripts cost every call two Redis round trips: 20,000 jobs took 15.6 s instead of
    11.4 s with no budget anywhere (bench/pipeline_bench.py, no latency). A worker now holds nothing
    while neither the batch nor the day has a budget, and a budget set afterwards starts from what the
    batch (the day) has already spent, read off its stored results."""
    env = base_env(redis_url, sim.url, tmp_path)
    client = Client(load_settings(env))
    batch_id = client.submit_batch(_jobs(30, "j")).batch_id
    start_worker(env)
    done = client.wait(batch_id, timeout=60, poll=0.2)
    assert done["request_counts"]["completed"] == 30
    assert client.redis.hgetall(keys.budget_batches()) == {}  # nothing held or settled for it
    assert client.redis.hgetall(keys.budget_days()) == {}

    raised = orjson.loads(_cli(env, "budget", batch_id, "--usd", "5"))
    assert done["cost_usd"] > 0
    assert raised["batch"]["spent_usd"] == pytest.approx(done["cost_usd"], abs=1e-9)
    daily = orjson.loads(_cli(env, "budget", "--daily", "5"))["daily"]
    assert daily["spent_usd"] == pytest.approx(done["cost_usd"], abs=1e-9)
