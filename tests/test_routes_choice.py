"""The choice among a model's several routes (worker/routechoice.py): the rule on its own, then the
chooser against a real Redis (the shared buckets' levels, parked pairs, this worker's queue)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from ratequeue.config.accounts_load import load_account_table
from ratequeue.config.settings import load_settings
from ratequeue.jobstore import keys
from ratequeue.jobstore.jobs import StoredJob
from ratequeue.producer.batchfile import LineValidator
from ratequeue.worker.backlog import Backlog, job_ref
from ratequeue.worker.bucket_values import BucketLevels, BucketLimits
from ratequeue.worker.learned import Learned
from ratequeue.worker.limiter import Limiter
from ratequeue.worker.parking import Parking
from ratequeue.worker.routechoice import PROBE_BEHIND_SECONDS, Candidate, RouteChooser, bucket_wait, choose
from ratequeue.worker.routing import Routing, Target
from tests.conftest import async_wait_until

MODELS = """\
[accounts.a]
base_url = "http://127.0.0.1:9"
api_key_env = "KEY_A"
[accounts.b]
base_url = "http://127.0.0.1:9"
api_key_env = "KEY_B"
[routes]
"gpt-4o-mini" = ["a", "b"]
"""


# The rule.

def test_the_route_that_can_start_the_job_soonest_wins_and_ties_are_taken_in_turn() -> None:
    assert choose([Candidate(wait=0.5), Candidate(wait=0.1)]) == 1
    assert choose([Candidate(wait=0.1, ahead=0.5), Candidate(wait=0.3)]) == 1  # this worker's queue counts
    assert [choose([Candidate(), Candidate(wait=0.01), Candidate(wait=1.0)], turn) for turn in range(4)] == [0, 1, 0, 1]


def test_parked_and_keyless_routes_are_skipped_while_another_is_usable() -> None:
    assert choose([Candidate(parked=True), Candidate(wait=9.0)]) == 1
    assert choose([Candidate(refused=True), Candidate(wait=9.0)]) == 1
    # Every route parked: the first keyed one (the runner defers or probes it as for a single route).
    assert choose([Candidate(refused=True), Candidate(parked=True), Candidate(parked=True)]) == 1
    assert choose([Candidate(parked=True), Candidate(parked=True, probe_due=True)]) == 1
    assert choose([Candidate(refused=True), Candidate(refused=True)]) == 0


def test_a_parked_route_is_probed_only_while_the_healthy_routes_have_a_queue() -> None:
    due = Candidate(parked=True, probe_due=True)
    assert choose([due, Candidate(wait=0.0)]) == 1  # an idle healthy route needs no help
    assert choose([due, Candidate(wait=PROBE_BEHIND_SECONDS)]) == 0
    assert choose([Candidate(parked=True), Candidate(wait=5.0)]) == 1  # not due: skipped whatever the queue


def test_the_bucket_wait_is_reserve_luas_rule_on_the_levels() -> None:
    limits = BucketLimits(rpm=600, tpm=60_000, burst_seconds=1.0)  # 10 requests, 1,000 tokens a second
    now_us = 1_000_000_000_000
    full = BucketLevels(now_us, requests=5.0, tokens=5_000.0, not_before_ms=0, request_capacity=10,
                        token_capacity=10_000)
    assert bucket_wait(full, limits, 100) == 0.0
    debt = BucketLevels(now_us, requests=-4.0, tokens=5_000.0, not_before_ms=0, request_capacity=10,
                        token_capacity=10_000)
    assert bucket_wait(debt, limits, 100) == pytest.approx(0.5)  # 5 requests to refill at 10/s
    tokens = BucketLevels(now_us, requests=5.0, tokens=-1_000.0, not_before_ms=0, request_capacity=10,
                          token_capacity=10_000)
    assert bucket_wait(tokens, limits, 1_000) == pytest.approx(2.0)
    after_429 = BucketLevels(now_us, requests=5.0, tokens=5_000.0, not_before_ms=now_us // 1000 + 3_000,
                             request_capacity=10, token_capacity=10_000)
    assert bucket_wait(after_429, limits, 100) == pytest.approx(3.0)


# The chooser, against the real Redis.

def _chooser(tmp_path: Path, url: str, models: str = MODELS) -> tuple[RouteChooser, Routing, aioredis.Redis, Parking]:
    path = tmp_path / "models.toml"
    path.write_text(models)
    settings = load_settings({"RATEQUEUE_MODELS_FILE": str(path), "RATEQUEUE_REDIS_URL": url})
    routing = Routing(load_account_table(settings, env={"KEY_A": "sk-a-0123456789abcdef",
                                                        "KEY_B": "sk-b-0123456789abcdef"}))
    client = aioredis.Redis.from_url(url)
    parking = Parking(client, cache_ttl=0.0)
    chooser = RouteChooser(routing, Limiter(client), parking, Backlog(), Learned(settings, client), client)
    return chooser, routing, client, parking


def _jobs(n: int) -> list[StoredJob]:
    body = {"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    return [StoredJob(f"c-{i}", i, "/v1/chat/completions", body, "gpt-4o-mini", 20, 15, 5, None) for i in range(n)]


def _chosen(routing: Routing, jobs: list[StoredJob]) -> list[str]:
    return [routing.route(job, "batch-1").account.name for job in jobs]


def _admit(chooser: RouteChooser, routing: Routing, jobs: list[StoredJob]) -> None:
    """What the engine does next: the chunk's jobs queued in this worker for their route's bucket."""
    target = routing.target("x", jobs[0], "batch-1")
    chooser.backlog.admit(target.key, chooser.learned.limits(target.pair, target.spec),
                          {job_ref("batch-1", j.custom_id): j.charge for j in jobs})


@pytest.mark.integration
def test_successive_chunks_spread_over_the_routes_and_the_use_is_counted_for_status(
        tmp_path: Path, redis_url: str) -> None:
    async def run() -> None:
        chooser, routing, client, _ = _chooser(tmp_path, redis_url)
        first, second = _jobs(10)[:5], _jobs(10)[5:]
        await chooser.assign("batch-1", "x", first)
        taken = _chosen(routing, first)[0]
        assert _chosen(routing, first) == [taken] * 5  # a chunk takes one route
        _admit(chooser, routing, first)
        await chooser.assign("batch-1", "x", second)
        assert _chosen(routing, second) == [{"a": "b", "b": "a"}[taken]] * 5  # the first has the first chunk queued
        await async_wait_until(lambda: _counted(client), 5, "the use counted")
        routing.forget(job_ref("batch-1", j.custom_id) for j in first + second)
        assert _chosen(routing, second) == ["a"] * 5  # forgotten: the first route, as without a choice
        await client.aclose()

    async def _counted(client: aioredis.Redis) -> bool:
        use = await client.hgetall(keys.route_use("gpt-4o-mini"))
        return use.get(b"a/gpt-4o-mini") == use.get(b"b/gpt-4o-mini") == b"5"

    asyncio.run(run())


@pytest.mark.integration
def test_a_route_whose_bucket_is_in_debt_or_parked_is_left_aside(tmp_path: Path, redis_url: str) -> None:
    async def run() -> None:
        chooser, routing, client, parking = _chooser(tmp_path, redis_url)
        a, b = routing.targets("x", _jobs(1)[0])
        # Other workers' reservations put a's bucket a few seconds in debt: b takes this chunk.
        # (Not in slow start, which grants one request at a time while the server's limits are unknown.)
        limits = dataclasses.replace(chooser.learned.limits(a.pair, a.spec), slow_start=False)
        granted = await chooser.limiter.reserve(a.key, limits, [0] * int(limits.request_capacity * 2))
        assert granted.retry_in is not None  # the bucket is a whole reservation horizon in debt
        jobs = _jobs(4)
        await chooser.assign("batch-1", "x", jobs)
        assert _chosen(routing, jobs) == ["b"] * 4
        # b parked (its probe not due yet), a still in debt: a all the same.
        await parking.park(b.account, b.spec.name, "invalid_api_key", "401", cooldown=60)
        await chooser.assign("batch-1", "x", jobs)
        assert _chosen(routing, jobs) == ["a"] * 4
        await client.aclose()

    asyncio.run(run())


@pytest.mark.integration
def test_a_parked_route_whose_probe_is_due_gets_one_job_of_a_chunk_while_the_other_has_a_queue(
        tmp_path: Path, redis_url: str) -> None:
    async def run() -> None:
        chooser, routing, client, parking = _chooser(tmp_path, redis_url)
        _, b = routing.targets("x", _jobs(1)[0])
        await parking.park(b.account, b.spec.name, "invalid_api_key", "401", cooldown=0.01)
        await asyncio.sleep(0.02)  # the cooldown passed: a probe may go
        jobs = _jobs(6)
        await chooser.assign("batch-1", "x", jobs)
        assert _chosen(routing, jobs) == ["a"] * 6  # a idle: no need of b, no probe
        _admit(chooser, routing, jobs)  # now a has a queue (a tie would no longer be one)
        more = [dataclasses.replace(j, custom_id=f"m-{i}") for i, j in enumerate(_jobs(6))]
        await chooser.assign("batch-1", "x", more)
        assert _chosen(routing, more) == ["b"] + ["a"] * 5  # one job probes b; the chunk's others take a
        again = [dataclasses.replace(j, custom_id=f"n-{i}") for i, j in enumerate(_jobs(6))]
        await chooser.assign("batch-1", "x", again)
        assert _chosen(routing, again) == ["a"] * 6  # this worker's probe is out: not another at once
        await client.aclose()

    asyncio.run(run())


def test_a_job_naming_no_account_of_a_model_with_several_routes_is_stored_free_to_take_any(tmp_path: Path) -> None:
    """Stored with its account, it had only that account's routes at the worker: the first took all."""
    path = tmp_path / "models.toml"
    path.write_text('default_account = "a"\n' + MODELS)
    accounts = load_account_table(load_settings({"RATEQUEUE_MODELS_FILE": str(path)}), env={},
                                  require_credentials=False)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    line = {"url": "/v1/chat/completions", "body": body}
    assert LineValidator(accounts).job(1, "c-1", line).account is None
    assert LineValidator(accounts).job(1, "c-2", {**line, "account": "b"}).account == "b"  # named: kept
    assert LineValidator(accounts, account="a").job(1, "c-3", line).account == "a"  # the batch's: kept


@pytest.mark.integration
def test_work_booked_to_come_back_on_a_route_counts_in_its_wait(tmp_path: Path, redis_url: str) -> None:
    """Profile of 3,000 jobs on two routes: with both routes' queues past ``defer_after``, the queues
    alone left one route a hair shorter, so it took every deferred chunk (30 chunks, booked 60 s
    ahead) while the other's schedule was 15 s: chunks go where their booked turn is soonest."""
    async def run() -> None:
        chooser, routing, client, _ = _chooser(tmp_path, redis_url)
        jobs = _jobs(200)
        targets = {t.route.account.name: t for t in routing.targets("x", jobs[0])}
        _admit_on(chooser, targets["a"], jobs[:40])
        _admit_on(chooser, targets["b"], jobs[40:100])  # b's queue is longer...
        limits = chooser.learned.limits(targets["a"].pair, targets["a"].spec)
        chooser.backlog.schedule(targets["a"].key, limits, [j.charge for j in jobs[100:190]] * 20, 0.0)
        chooser.backlog.schedule(targets["a"].key, limits, [j.charge for j in jobs[100:190]], 0.0,
                                 [job_ref("batch-1", j.custom_id) for j in jobs[100:190]])  # not back yet
        chunk = jobs[190:]
        await chooser.assign("batch-1", "x", chunk)
        assert _chosen(routing, chunk) == ["b"] * 10  # ...but a has far more booked to come back
        await client.aclose()

    asyncio.run(run())


def _admit_on(chooser: RouteChooser, target: Target, jobs: list[StoredJob]) -> None:
    chooser.backlog.admit(target.key, chooser.learned.limits(target.pair, target.spec),
                          {job_ref("batch-1", j.custom_id): j.charge for j in jobs})


@pytest.mark.integration
def test_a_chunk_back_from_its_deferral_leaves_no_booking_on_the_route_that_deferred_it(
        tmp_path: Path, redis_url: str) -> None:
    """Profile (3,000 jobs, two routes): chunks back from route a's schedule were chosen afresh and went
    to b, while their own bookings kept a looking busy: a sat idle for 7 s with work deferred on b."""
    async def run() -> None:
        chooser, routing, client, _ = _chooser(tmp_path, redis_url)
        jobs = _jobs(60)
        targets = {t.route.account.name: t for t in routing.targets("x", jobs[0])}
        _admit_on(chooser, targets["b"], jobs[:10])  # b has a short queue, a none
        limits = chooser.learned.limits(targets["a"].pair, targets["a"].spec)
        chunk = jobs[10:]
        chooser.backlog.schedule(targets["a"].key, limits, [j.charge for j in chunk] * 20, 0.0)  # since gone
        chooser.backlog.schedule(targets["a"].key, limits, [j.charge for j in chunk], 0.0,
                                 [job_ref("batch-1", j.custom_id) for j in chunk])
        await chooser.assign("batch-1", "x", chunk)  # the booked chunk itself comes back
        assert _chosen(routing, chunk) == ["a"] * 50
        await client.aclose()

    asyncio.run(run())


@pytest.mark.integration
def test_ties_rotate_per_model_when_two_models_chunks_interleave(tmp_path: Path, redis_url: str) -> None:
    """One turn counter for all models gave each model the same tie index for ever when their chunks
    alternated (h-review: model A took route b four times in a row, model B route a)."""
    two_models = MODELS + '"gpt-4o" = ["a", "b"]\n'

    def jobs(model: str, first: int) -> list[StoredJob]:
        body = {"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
        return [StoredJob(f"{model}-{i}", i, "/v1/chat/completions", body, model, 20, 15, 5, None)
                for i in range(first, first + 3)]

    async def run() -> None:
        chooser, routing, client, _ = _chooser(tmp_path, redis_url, two_models)
        taken: dict[str, list[str]] = {"gpt-4o-mini": [], "gpt-4o": []}
        for n in range(4):  # nothing admitted: every choice is a tie between two idle routes
            for model in taken:
                chunk = jobs(model, 3 * n)
                await chooser.assign("batch-1", "x", chunk)
                taken[model].append(_chosen(routing, chunk)[0])
        assert taken["gpt-4o-mini"] in (["a", "b"] * 2, ["b", "a"] * 2), taken
        assert taken["gpt-4o"] in (["a", "b"] * 2, ["b", "a"] * 2), taken
        await client.aclose()

    asyncio.run(run())
