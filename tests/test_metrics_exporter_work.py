"""The exporter's figures of the work left (issue 12, findings 1, 6, 7, 8), from real batches in the
real Redis: submitted by the producer's code, outcomes stored and jobs deferred by the real Lua
scripts. Pending, deferred and the oldest job's age per model; stalled by reason and the ETA only
when the model can proceed; the totals of stored outcomes; the day's spend and budget."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis
from prometheus_client import CollectorRegistry

from ratequeue.config.models import load_model_table_from
from ratequeue.config.settings import load_settings
from ratequeue.jobstore import keys
from ratequeue.jobstore.batches import BatchStore
from ratequeue.jobstore.heartbeats import workers_key
from ratequeue.jobstore.scripts import lua_source
from ratequeue.producer.api import Client
from ratequeue.producer.exporter import RedisCollector
from ratequeue.producer.model_progress import ModelCounts, ModelLimits, limit_eta
from tests.conftest import METRICS_REDIS_URL

MINI, FOUR = "gpt-4o-mini", "gpt-4o"
REASONS = ("no_workers", "redis_full", "parked", "paused")


@pytest.fixture
def client(mredis: redis.Redis, tmp_path: Path) -> Iterator[Client]:
    """The producer's client on the monitoring database; chunks are not enqueued (no workers here)."""
    settings = load_settings({"RATEQUEUE_REDIS_URL": METRICS_REDIS_URL, "OPENAI_API_KEY": "sk-test-0123456789abcdef",
                              "RATEQUEUE_DATA_DIR": str(tmp_path)})
    c = Client(settings, publish=lambda _batch, _ids: None)
    yield c
    c.close()


def _registry(client: redis.Redis, **options: float) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(RedisCollector(client, load_model_table_from(), 5.0, **options))  # type: ignore[arg-type]
    return registry


def _submit(client: Client, models: list[str], prefix: str) -> str:
    rows = [{"custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": m, "messages": [{"role": "user", "content": f"item {i}"}], "max_tokens": 10}}
            for i, m in enumerate(models)]
    return client.submit_batch(rows).batch_id


def _store(r: redis.Redis, batch_id: str, *custom_ids: str, nano_usd: int = 2850) -> list[int]:
    args: list[str | int] = []
    for cid in custom_ids:
        args += [cid, "result", orjson.dumps({"custom_id": cid}).decode(), 9, 3, 0, nano_usd]
    return [int(x) for x in BatchStore(r).store_outcomes(batch_id, args)]


def _defer(r: redis.Redis, batch_id: str, *custom_ids: str) -> None:
    script = r.register_script(lua_source("defer"))
    for cid in custom_ids:
        script(keys=[keys.deferred_jobs()], args=[f"{batch_id}\t{cid}", 60_000])


def _stalled(reg: CollectorRegistry, model: str) -> dict[str, float | None]:
    return {reason: reg.get_sample_value("ratequeue_stalled", {"model": model, "reason": reason})
            for reason in REASONS}


def test_pending_deferred_and_oldest_job_per_model(mredis: redis.Redis, client: Client) -> None:
    mixed = _submit(client, [MINI, MINI, MINI, FOUR, FOUR], "mixed")
    time.sleep(1.1)
    single = _submit(client, [MINI] * 4, "single")
    _defer(mredis, mixed, "mixed-0", "mixed-3")  # several models: each job's model is read
    _defer(mredis, single, "single-0", "single-1")  # one model: no job read
    reg = _registry(mredis)
    value = reg.get_sample_value
    assert value("ratequeue_pending_jobs", {"model": MINI}) == 7
    assert value("ratequeue_pending_jobs", {"model": FOUR}) == 2
    assert value("ratequeue_deferred_jobs", {"model": MINI}) == 3
    assert value("ratequeue_deferred_jobs", {"model": FOUR}) == 1
    older = value("ratequeue_oldest_pending_job_age_seconds", {"model": MINI})
    assert older is not None and older >= 1.0
    assert value("ratequeue_oldest_pending_job_age_seconds", {"model": FOUR}) == pytest.approx(older, abs=0.5)

    # The older batch's gpt-4o-mini jobs are done: that model's oldest job is now the newer batch's.
    assert _store(mredis, mixed, "mixed-0", "mixed-1", "mixed-2") == [1, 1, 1]
    assert value("ratequeue_pending_jobs", {"model": MINI}) == 4
    newer = value("ratequeue_oldest_pending_job_age_seconds", {"model": MINI})
    assert newer is not None and newer < older - 0.9
    # Deferred members are counted where they are: the stored job's stale entry still counts.
    assert value("ratequeue_deferred_jobs", {"model": MINI}) == 3


def test_stalled_by_reason_and_eta_only_while_the_model_can_proceed(mredis: redis.Redis, client: Client) -> None:
    batch_id = _submit(client, [MINI] * 10, "j")
    account = client.settings.account_id
    reg = _registry(mredis, max_share=0.5)
    assert _stalled(reg, MINI) == {**dict.fromkeys(REASONS, 0.0), "no_workers": 1.0}  # no heartbeat at all
    assert reg.get_sample_value("ratequeue_eta_seconds", {"model": MINI}) is None

    mredis.zadd(workers_key(), {"w1": time.time()})
    assert _stalled(reg, MINI) == dict.fromkeys(REASONS, 0.0)
    spec = load_model_table_from().get(MINI)
    counts = ModelCounts(10, 0, 0, 0, client.status(batch_id)["models"][MINI]["tokens"], 0)
    expected, _limit = limit_eta(counts, ModelLimits(spec.rpm * 0.5, spec.tpm * 0.5, "configured"))
    assert reg.get_sample_value("ratequeue_eta_seconds", {"model": MINI}) == pytest.approx(expected)
    mredis.hset(keys.bucket_key(account, MINI), "fs", "0.25")  # other clients leave us a quarter
    assert reg.get_sample_value("ratequeue_eta_seconds", {"model": MINI}) == pytest.approx(expected * 4)

    parked = {"reason": "insufficient_quota", "message": "m", "since": time.time(), "cooldown": 60}
    mredis.hset(keys.parked_pairs(), keys.pair_field(account, MINI), orjson.dumps(parked))
    assert _stalled(reg, MINI) == {**dict.fromkeys(REASONS, 0.0), "parked": 1.0}
    assert reg.get_sample_value("ratequeue_eta_seconds", {"model": MINI}) is None

    mredis.hdel(keys.parked_pairs(), keys.pair_field(account, MINI))
    BatchStore(mredis).pause(batch_id)
    assert _stalled(reg, MINI) == {**dict.fromkeys(REASONS, 0.0), "paused": 1.0}
    assert reg.get_sample_value("ratequeue_eta_seconds", {"model": MINI}) is None

    # Done: no pending jobs, no stalled series, no ETA.
    BatchStore(mredis).pause(batch_id, paused=False)
    _store(mredis, batch_id, *(f"j-{i}" for i in range(10)))
    assert _stalled(reg, MINI) == dict.fromkeys(REASONS, None)
    assert reg.get_sample_value("ratequeue_eta_seconds", {"model": MINI}) is None


def test_stored_totals_count_each_outcome_once_and_the_days_spend(mredis: redis.Redis, client: Client) -> None:
    reg = _registry(mredis)
    value = reg.get_sample_value
    # Every model of the table starts at 0: rate() sees the first outcome.
    assert value("ratequeue_stored_jobs_total", {"model": FOUR, "outcome": "completed"}) == 0
    assert value("ratequeue_stored_jobs_created", {"model": FOUR, "outcome": "completed"}) is None
    assert value("ratequeue_budget_usd", {"scope": "daily"}) is None  # no budget set
    batch_id = _submit(client, [MINI] * 3, "j")
    assert _store(mredis, batch_id, "j-0", "j-1") == [1, 1]
    assert _store(mredis, batch_id, "j-1", "j-2") == [0, 1]  # a redelivered copy counts nothing
    assert value("ratequeue_stored_jobs_total", {"model": MINI, "outcome": "completed"}) == 3
    assert value("ratequeue_stored_jobs_total", {"model": MINI, "outcome": "failed"}) == 0
    assert value("ratequeue_stored_tokens_total", {"model": MINI, "kind": "prompt"}) == 27
    assert value("ratequeue_stored_tokens_total", {"model": MINI, "kind": "completion"}) == 9
    assert value("ratequeue_stored_cost_usd_total", {"model": MINI}) == pytest.approx(3 * 2.85e-6, rel=1e-12)
    assert float(mredis.hget(keys.batch_meta(batch_id), "cost_usd") or 0) == pytest.approx(3 * 2.85e-6, rel=1e-12)
    assert value("ratequeue_spent_usd", {"scope": "daily"}) == pytest.approx(3 * 2.85e-6, rel=1e-12)
    budgeted = _registry(mredis, daily_budget_usd=25.0)
    assert budgeted.get_sample_value("ratequeue_budget_usd", {"scope": "daily"}) == 25.0
    # Yesterday's spend is not today's.
    today = int(mredis.time()[0]) // 86400
    mredis.hset(keys.totals(), f"cost_nusd_day:{today}", 0)
    mredis.hset(keys.totals(), f"cost_nusd_day:{today - 1}", 10**9)
    assert value("ratequeue_spent_usd", {"scope": "daily"}) == 0
    # The totals outlive the batch: it ended (every job stored) with TTLs on its keys, not on them.
    assert mredis.ttl(keys.batch_meta(batch_id)) > 0 and mredis.ttl(keys.totals()) == -1


def test_eta_uses_the_limits_the_workers_use(mredis: redis.Redis, client: Client) -> None:
    """Learned limits (rq:learned) when learning is on, the table's when it is off."""
    batch_id = _submit(client, [MINI] * 10, "j")
    mredis.zadd(workers_key(), {"w1": time.time()})
    learned = {"rpm": 5, "tpm": 100_000_000, "at": 1}  # 10 requests at 5 RPM: 120 s
    mredis.hset(keys.learned_limits(), keys.pair_field(client.settings.account_id, MINI), orjson.dumps(learned))
    assert _registry(mredis).get_sample_value("ratequeue_eta_seconds", {"model": MINI}) == pytest.approx(120)
    spec = load_model_table_from().get(MINI)
    counts = ModelCounts(10, 0, 0, 0, client.status(batch_id)["models"][MINI]["tokens"], 0)
    table_eta, _ = limit_eta(counts, ModelLimits(spec.rpm, spec.tpm, "configured"))
    plain = _registry(mredis, learn_limits=False)
    assert plain.get_sample_value("ratequeue_eta_seconds", {"model": MINI}) == pytest.approx(table_eta)
