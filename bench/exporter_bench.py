"""How long one exporter scrape takes with a big backlog (issue 12: the scrape must stay cheap).

A private redis-server; batches submitted by the producer's own code (chunks not enqueued, no
workers), then a share of their jobs deferred by defer.lua, as workers do under fair slots. Each
scenario scrapes ``--scrapes`` times (in process, ``RedisCollector.collect``) and prints the
first scrape (the deferred jobs of several-model batches are read once, then remembered) and the
median of the others, with the load average.

    python bench/exporter_bench.py --jobs 100000
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import click
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ratequeue.config.models import load_model_table_from  # noqa: E402
from ratequeue.config.settings import load_settings  # noqa: E402
from ratequeue.jobstore import keys  # noqa: E402
from ratequeue.jobstore.scripts import lua_source  # noqa: E402
from ratequeue.producer.api import Client  # noqa: E402
from ratequeue.producer.exporter import RedisCollector  # noqa: E402
from tests.conftest import private_redis  # noqa: E402

MODELS = ("gpt-4o-mini", "gpt-4o")


def _rows(n: int, models: tuple[str, ...], prefix: str) -> list[dict[str, object]]:
    return [{"custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": models[i % len(models)], "messages": [{"role": "user", "content": f"Summarise {i}."}],
                      "max_tokens": 50}} for i in range(n)]


def _scrapes(client: redis.Redis, count: int) -> tuple[float, float, int, dict[str, float]]:
    """First and median scrape times, samples per scrape, and the pending and deferred jobs it read."""
    collector = RedisCollector(client, load_model_table_from(), 5.0)
    times = []
    for _ in range(count):
        started = time.perf_counter()
        families = list(collector.collect())
        times.append(time.perf_counter() - started)
    samples = sum(len(f.samples) for f in families)
    read = {f.name: sum(s.value for s in f.samples) for f in families
            if f.name in ("ratequeue_pending_jobs", "ratequeue_deferred_jobs")}
    return times[0], statistics.median(times[1:]), samples, read


def _scenario(url: str, name: str, jobs: int, batches: int, models: tuple[str, ...], deferred: float,
              scrapes: int) -> None:
    client = redis.Redis.from_url(url)
    client.flushdb()
    with tempfile.TemporaryDirectory() as data:
        settings = load_settings({"RATEQUEUE_REDIS_URL": url, "OPENAI_API_KEY": "sk-bench-000000000000",
                                  "RATEQUEUE_DATA_DIR": data, "RATEQUEUE_MAX_LINES": str(jobs)})
        producer = Client(settings, publish=lambda _b, _ids: None)
        started = time.perf_counter()
        ids = [producer.submit_batch(_rows(jobs // batches, models, f"b{b}")).batch_id for b in range(batches)]
        submit_s = time.perf_counter() - started
        producer.close()
    defer = client.register_script(lua_source("defer"))
    pipe = client.pipeline(transaction=False)
    per_batch = int(jobs // batches * deferred)
    for batch_id in ids:
        for i in range(per_batch):
            defer(keys=[keys.deferred_jobs()], args=[f"{batch_id}\tb{ids.index(batch_id)}-{i}", 60_000], client=pipe)
    pipe.execute()
    first, median, samples, read = _scrapes(client, scrapes)
    load = os.getloadavg()[0]
    print(f"{name}: {read['ratequeue_pending_jobs']:,.0f} pending in {batches} batch(es) of {'+'.join(models)}, "
          f"{read['ratequeue_deferred_jobs']:,.0f} deferred: first scrape {first * 1000:.0f} ms, "
          f"then median {median * 1000:.0f} ms ({scrapes - 1} scrapes, {samples} samples); "
          f"submit {submit_s:.0f} s; load {load:.2f}", flush=True)
    client.close()


@click.command()
@click.option("--jobs", default=100_000, show_default=True)
@click.option("--scrapes", default=6, show_default=True)
def main(jobs: int, scrapes: int) -> None:
    with private_redis() as url:
        _scenario(url, "one model", jobs, 1, MODELS[:1], 0.5, scrapes)
        _scenario(url, "two models, one batch", jobs, 1, MODELS, 0.5, scrapes)
        _scenario(url, "two models, 100 batches", jobs, 100, MODELS, 0.5, scrapes)


if __name__ == "__main__":
    main()
