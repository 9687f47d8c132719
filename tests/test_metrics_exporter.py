"""The exporter (producer.exporter) against the real Redis: every gauge from a known state of the keys."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis
from prometheus_client import CollectorRegistry
from redis.backoff import NoBackoff
from redis.retry import Retry

from ratequeue.config.models import load_model_table_from
from ratequeue.jobstore import keys
from ratequeue.jobstore.heartbeats import worker_addresses_key
from ratequeue.producer.exporter import RECENT_BATCHES, RedisCollector
from ratequeue.producer.exporter_workers import sd_targets
from ratequeue.worker.limiter import BucketLimits, SyncLimiter
from ratequeue.worker.metrics_server import Heartbeat, workers_key
from tests.conftest import METRICS_REDIS_URL, ROOT, base_env, private_redis

REDIS_URL = METRICS_REDIS_URL
BURST = 5.0
MAXMEMORY = 20 * 1024 * 1024
MINI = {"model": "gpt-4o-mini"}


@pytest.fixture
def limited_redis(tmp_path: Path) -> Iterator[redis.Redis]:
    """A private Redis with the production policy: 20 MB, then every write refused."""
    with private_redis("--maxmemory", "20mb", "--maxmemory-policy", "noeviction") as url:
        client = redis.Redis.from_url(url)
        yield client
        client.close()


def _registry(client: redis.Redis, learn: bool = True) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(RedisCollector(client, load_model_table_from(), BURST, learn_limits=learn))
    return registry


def _batch(client: redis.Redis, batch_id: str, status: str, total: int, completed: int, failed: int,
           cost: float, created: float, model: str = "gpt-4o-mini") -> None:
    """A batch's meta and per-model counters as submit and store_outcome.lua write them."""
    client.hset(keys.batch_meta(batch_id), mapping={
        "status": status, "total": total, "completed": completed, "failed": failed, "cost_usd": repr(cost),
    })
    client.hset(keys.batch_models(batch_id), mapping={
        f"jobs:{model}": total, f"completed:{model}": completed, f"failed:{model}": failed,
    })
    client.zadd(keys.batches_index(), {batch_id: created})


def test_queue_depth_unacked_and_deferred(mredis: redis.Redis) -> None:
    mredis.rpush("ratequeue", "m1", "m2", "m3")
    mredis.rpush("ratequeue\x06\x163", "m4")  # kombu's list for priority 3
    mredis.hset("unacked", mapping={"tag1": "x", "tag2": "y"})
    _batch(mredis, "b", "in_progress", 5, 0, 0, 0.0, 1.0)
    now_ms = int(time.time() * 1000)
    mredis.zadd(keys.deferred_jobs(), {"b\tc1": now_ms - 5000, "b\tc2": now_ms + 60_000, "b\tc3": now_ms + 5000})
    reg = _registry(mredis)
    assert reg.get_sample_value("ratequeue_queue_depth_messages", {"queue": "ratequeue"}) == 4
    assert reg.get_sample_value("ratequeue_unacked_messages") == 2
    assert reg.get_sample_value("ratequeue_deferred_jobs", {"model": "gpt-4o-mini"}) == 3
    assert reg.get_sample_value("ratequeue_deferred_due_jobs") == 1
    assert reg.get_sample_value("ratequeue_redis_up") == 1


def test_batches_by_status_pending_jobs_and_recent_costs(mredis: redis.Redis) -> None:
    _batch(mredis, "batch_old", "completed", 10, 9, 1, 0.5, 1.0)
    _batch(mredis, "batch_run", "in_progress", 10, 3, 1, 0.25, 2.0)
    _batch(mredis, "batch_new", "validating", 4, 0, 0, 0.0, 3.0)
    _batch(mredis, "batch_bye", "cancelled", 5, 2, 3, 0.125, 4.0)
    reg = _registry(mredis)
    collector_view = {s: reg.get_sample_value("ratequeue_batches", {"status": s}) for s in
                      ("validating", "in_progress", "finalizing", "completed", "failed", "cancelled", "expired")}
    assert collector_view == {"validating": 1, "in_progress": 1, "finalizing": 0, "completed": 1, "failed": 0,
                              "cancelled": 1, "expired": 0}
    assert reg.get_sample_value("ratequeue_pending_jobs", MINI) == 6 + 4  # unfinished batches only
    assert reg.get_sample_value("ratequeue_recent_batch_cost_usd", {"batch_id": "batch_old"}) == 0.5
    assert reg.get_sample_value("ratequeue_recent_batch_cost_usd", {"batch_id": "batch_run"}) == 0.25

    # The running batch finishes; a final batch is remembered and not read again, and a batch
    # deleted from the index disappears.
    mredis.hset(keys.batch_meta("batch_run"), mapping={"status": "completed", "completed": 9, "cost_usd": "0.75"})
    mredis.hset(keys.batch_meta("batch_old"), "status", "in_progress")  # final statuses never change: not re-read
    mredis.zrem(keys.batches_index(), "batch_bye")
    assert reg.get_sample_value("ratequeue_batches", {"status": "completed"}) == 2
    assert reg.get_sample_value("ratequeue_batches", {"status": "cancelled"}) == 0
    assert reg.get_sample_value("ratequeue_pending_jobs", MINI) == 4
    assert reg.get_sample_value("ratequeue_recent_batch_cost_usd", {"batch_id": "batch_run"}) == 0.75
    assert reg.get_sample_value("ratequeue_recent_batch_cost_usd", {"batch_id": "batch_bye"}) is None


def test_cost_per_batch_only_for_the_newest(mredis: redis.Redis) -> None:
    for i in range(RECENT_BATCHES + 5):
        _batch(mredis, f"batch_{i:03d}", "completed", 1, 1, 0, i / 100, float(i))
    reg = _registry(mredis)
    shown = [i for i in range(RECENT_BATCHES + 5)
             if reg.get_sample_value("ratequeue_recent_batch_cost_usd", {"batch_id": f"batch_{i:03d}"}) is not None]
    assert shown == list(range(5, RECENT_BATCHES + 5))
    assert reg.get_sample_value("ratequeue_batches", {"status": "completed"}) == RECENT_BATCHES + 5


def test_parked_pairs(mredis: redis.Redis) -> None:
    reg = _registry(mredis)
    assert reg.get_sample_value("ratequeue_parked_pairs") == 0
    mredis.hset(keys.parked_pairs(), mapping={
        "acc1:gpt-4o": orjson.dumps({"reason": "insufficient_quota", "message": "m", "since": 1700000000.5,
                                     "cooldown": 60}),
        "acc2:gpt-4o-mini": b"not json",
    })
    assert reg.get_sample_value("ratequeue_parked_pairs") == 2
    labels = {"account": "acc1", "model": "gpt-4o", "reason": "insufficient_quota"}
    assert reg.get_sample_value("ratequeue_pair_parked_since_timestamp_seconds", labels) == 1700000000.5
    unknown = {"account": "acc2", "model": "gpt-4o-mini", "reason": "unknown"}
    assert reg.get_sample_value("ratequeue_pair_parked_since_timestamp_seconds", unknown) == 0


def test_bucket_levels_with_configured_and_learned_limits(mredis: redis.Redis) -> None:
    table = load_model_table_from()
    spec = table.get("gpt-4o-mini")
    limiter = SyncLimiter(mredis)
    configured = BucketLimits(spec.rpm, spec.tpm, BURST)
    learned = BucketLimits(10_000, 2_000_000, BURST)
    limiter.reserve(keys.bucket_key("acc1", "gpt-4o-mini"), configured, [5000])
    limiter.reserve(keys.bucket_key("acc2", "gpt-4o-mini"), learned, [5000])
    mredis.hset(keys.learned_limits(), "acc2:gpt-4o-mini", orjson.dumps({"rpm": 10_000, "tpm": 2_000_000, "at": 1}))
    mredis.hset(keys.bucket_key("acc1", "no-such-model"), "rl", "1")  # a model this table lacks: skipped
    reg = _registry(mredis)
    one = {"model": "gpt-4o-mini", "account": "acc1"}
    two = {"model": "gpt-4o-mini", "account": "acc2"}
    assert reg.get_sample_value("ratequeue_bucket_capacity_tokens", one) == pytest.approx(configured.token_capacity)
    assert reg.get_sample_value("ratequeue_bucket_capacity_requests", one) == pytest.approx(configured.request_capacity)
    level = reg.get_sample_value("ratequeue_bucket_level_tokens", one)
    assert level is not None and configured.token_capacity - 5000 <= level < configured.token_capacity
    assert reg.get_sample_value("ratequeue_bucket_capacity_tokens", two) == pytest.approx(learned.token_capacity)
    assert reg.get_sample_value("ratequeue_bucket_pause_seconds", one) == 0
    assert reg.get_sample_value("ratequeue_bucket_level_tokens", {"model": "no-such-model", "account": "acc1"}) is None
    # Without learning, the exporter uses the table, as the workers then do.
    plain = _registry(mredis, learn=False)
    assert plain.get_sample_value("ratequeue_bucket_capacity_tokens", two) == pytest.approx(configured.token_capacity)

    limiter.set_not_before(keys.bucket_key("acc1", "gpt-4o-mini"), 30.0)
    pause = reg.get_sample_value("ratequeue_bucket_pause_seconds", one)
    assert pause is not None and 25 < pause <= 30
    # An idle bucket's hash expires (missing = full): the pair is still shown, full.
    mredis.delete(keys.bucket_key("acc1", "gpt-4o-mini"))
    assert reg.get_sample_value("ratequeue_bucket_level_tokens", one) == pytest.approx(configured.token_capacity)


def test_live_workers_from_heartbeats(mredis: redis.Redis) -> None:
    reg = _registry(mredis)
    assert reg.get_sample_value("ratequeue_workers_alive") == 0
    assert reg.get_sample_value("ratequeue_worker_last_seen_timestamp_seconds") == 0
    now = time.time()
    mredis.zadd(workers_key(), {"w1": now - 1, "w2": now - 5, "w3": now - 600})
    assert reg.get_sample_value("ratequeue_workers_alive") == 2
    assert reg.get_sample_value("ratequeue_worker_last_seen_timestamp_seconds") == pytest.approx(now - 1)


def test_worker_discovery_lists_heartbeat_addresses_for_an_hour(mredis: redis.Redis) -> None:
    """/sd/workers: one target per address (the newest worker's), a dead one kept for an hour."""
    beat = Heartbeat(mredis, "ratequeue-2@new", address="10.0.0.2:9464").start()
    beat.stop()  # stopped cleanly: forgotten at once
    assert sd_targets(mredis) == []
    now = time.time()
    mredis.zadd(workers_key(), {"dead": now - 600, "old": now - 4000, "before": now - 900, "none": now})
    mredis.hset(worker_addresses_key(), mapping={"dead": "10.0.0.1:9464", "old": "10.0.0.3:9464",
                                                 "before": "10.0.0.1:9464"})
    beat = Heartbeat(mredis, "ratequeue-2@new", address="10.0.0.2:9464").start()
    try:
        assert [(t["targets"], t["labels"]["__meta_ratequeue_worker"]) for t in sd_targets(mredis)] == [
            (["10.0.0.2:9464"], "ratequeue-2@new"), (["10.0.0.1:9464"], "dead"),  # an hour-old beat: gone
        ]
    finally:
        beat.stop()


@pytest.mark.integration  # a private redis-server
def test_redis_memory_against_maxmemory_up_to_full(limited_redis: redis.Redis) -> None:
    client = limited_redis
    reg = _registry(client)
    assert reg.get_sample_value("ratequeue_redis_memory_max_bytes") == MAXMEMORY
    used = reg.get_sample_value("ratequeue_redis_memory_used_bytes")
    assert used is not None and 0 < used < MAXMEMORY / 4
    # Something for every read of a scrape, the bucket's Lua peek included, then fill Redis until it
    # refuses writes: the scrape that matters most must still read everything.
    _batch(client, "batch_run", "in_progress", 10, 3, 1, 0.25, 2.0)
    client.zadd(workers_key(), {"w1": time.time() + 600})  # a live worker (its beat stays recent)
    full = {"model": "gpt-4o-mini", "reason": "redis_full"}
    assert reg.get_sample_value("ratequeue_stalled", full) == 0
    spec = load_model_table_from().get("gpt-4o-mini")
    SyncLimiter(client).reserve(keys.bucket_key("acc1", "gpt-4o-mini"), BucketLimits(spec.rpm, spec.tpm, BURST), [1])
    with pytest.raises(redis.OutOfMemoryError):
        for i in range(MAXMEMORY // 100_000 + 100):
            client.set(f"fill:{i}", b"x" * 100_000)
    used = reg.get_sample_value("ratequeue_redis_memory_used_bytes")
    assert used is not None and used / MAXMEMORY > 0.95  # what RatequeueRedisMemoryFull compares
    assert reg.get_sample_value("ratequeue_redis_up") == 1
    assert reg.get_sample_value("ratequeue_pending_jobs", MINI) == 6
    assert reg.get_sample_value("ratequeue_stalled", full) == 1  # no outcome can be stored
    assert reg.get_sample_value("ratequeue_eta_seconds", MINI) is None
    assert reg.get_sample_value("ratequeue_bucket_level_requests", {"model": "gpt-4o-mini", "account": "acc1"})
    # Deleting makes room again (what the alerts advise), and the gauge follows.
    client.delete(*[f"fill:{i}" for i in range(MAXMEMORY // 100_000 + 100)])
    used = reg.get_sample_value("ratequeue_redis_memory_used_bytes")
    assert used is not None and used < MAXMEMORY / 4
    assert reg.get_sample_value("ratequeue_stalled", full) == 0


@pytest.mark.integration  # a private redis-server
def test_redis_memory_max_is_zero_without_maxmemory(tmp_path: Path) -> None:
    with private_redis() as url:
        client = redis.Redis.from_url(url)
        reg = _registry(client)
        assert reg.get_sample_value("ratequeue_redis_memory_max_bytes") == 0
        assert (reg.get_sample_value("ratequeue_redis_memory_used_bytes") or 0) > 0
        client.close()


@pytest.mark.integration  # a private redis-server
def test_memory_is_kept_when_a_later_read_fails(limited_redis: redis.Redis) -> None:
    limited_redis.set(keys.batches_index(), "not a sorted set")  # the batch read fails: WRONGTYPE
    reg = _registry(limited_redis)
    assert reg.get_sample_value("ratequeue_redis_up") == 0
    assert reg.get_sample_value("ratequeue_pending_jobs") is None
    assert reg.get_sample_value("ratequeue_redis_memory_max_bytes") == MAXMEMORY


@pytest.mark.integration  # connects to a closed port
def test_redis_down_gives_only_redis_up_zero() -> None:
    client = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    reg = _registry(client)
    assert reg.get_sample_value("ratequeue_redis_up") == 0
    assert reg.get_sample_value("ratequeue_pending_jobs") is None
    assert reg.get_sample_value("ratequeue_redis_memory_used_bytes") is None
    assert reg.get_sample_value("ratequeue_redis_memory_max_bytes") is None


@pytest.mark.e2e  # the exporter process
def test_exporter_process_serves_metrics(mredis: redis.Redis, tmp_path: Path) -> None:
    """`python -m ratequeue.producer.exporter` (what `ratequeue exporter` runs) prints its port and serves /metrics."""
    _batch(mredis, "batch_x", "in_progress", 3, 1, 0, 0.0, 1.0)
    env = base_env(REDIS_URL, "http://127.0.0.1:9", tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "ratequeue.producer.exporter", "--port", "0", "--host", "127.0.0.1"],
                            env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "listening on http://127.0.0.1:" in line, line
        url = line.strip().rsplit(" ", 1)[-1]
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        assert 'ratequeue_pending_jobs{model="gpt-4o-mini"} 2.0' in body
        assert 'ratequeue_batches{status="in_progress"} 1.0' in body
        assert "ratequeue_redis_memory_used_bytes " in body and "ratequeue_redis_memory_max_bytes " in body
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0  # SIGTERM is a clean stop (PID 1 in a container too)


def test_bucket_gauges_use_an_accounts_own_limits(mredis: redis.Redis, tmp_path: Path) -> None:
    """Two openai accounts of different tiers serving one model: each bucket is shown with its
    account's configured limits (as its workers size it), not the model table's."""
    from ratequeue.config.accounts_load import load_account_table
    from ratequeue.config.settings import load_settings
    from ratequeue.producer.exporter_pairs import configured_pair_limits
    from tests.test_config_accounts import TIERS

    (tmp_path / "models.toml").write_text(TIERS)
    accounts = load_account_table(load_settings({"RATEQUEUE_MODELS_FILE": str(tmp_path / "models.toml")}),
                                  require_credentials=False, env={})
    pairs = configured_pair_limits(accounts)
    one, five = (accounts.account(name).bucket_id for name in ("tier1", "tier5"))
    assert pairs[f"{one}:gpt-4o-mini"] == (500, 200_000) and pairs[f"{five}:gpt-4o-mini"] == (30_000, 150_000_000)
    limits = BucketLimits(500, 200_000, BURST)
    SyncLimiter(mredis).reserve(keys.bucket_key(one, "gpt-4o-mini"), limits, [100])
    registry = CollectorRegistry()
    registry.register(RedisCollector(mredis, load_model_table_from(), BURST, pair_limits=pairs))
    shown = {"model": "gpt-4o-mini", "account": one}
    assert registry.get_sample_value("ratequeue_bucket_capacity_tokens", shown) == pytest.approx(limits.token_capacity)
    assert registry.get_sample_value("ratequeue_bucket_capacity_requests", shown) == pytest.approx(
        limits.request_capacity)
