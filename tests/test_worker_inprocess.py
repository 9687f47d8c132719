"""The worker built in-process from settings (no module-level app, no environment): its Celery app
carries the task, and its engine runs a chunk against a real simulator and Redis."""

from __future__ import annotations

from pathlib import Path

import redis

from ratequeue.config.settings import load_settings
from ratequeue.jobstore import keys
from ratequeue.producer.api import Client
from ratequeue.queue import RUN_CHUNK
from ratequeue.sim.process import start_sim
from ratequeue.worker.app import build_worker
from tests.conftest import base_env


def test_a_worker_built_from_settings_runs_a_chunk_in_process(redis_url: str, rclient: redis.Redis,
                                                              tmp_path: Path) -> None:
    with start_sim(["--rpm", "100000", "--tpm", "10000000"]) as sim:
        settings = load_settings(base_env(redis_url, sim.url, tmp_path))
        app, runtime = build_worker(settings)
        assert RUN_CHUNK in app.tasks and app.conf.broker_url == redis_url
        jobs = [{"custom_id": f"p-{i}", "method": "POST", "url": "/v1/chat/completions",
                 "body": {"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": f"{i}"}]}}
                for i in range(3)]
        batch_id = Client(settings, publish=lambda *_: None).submit_batch(jobs).batch_id
        try:
            report = runtime.engine().run_chunk(batch_id, ["p-0", "p-1", "p-2"])
        finally:
            runtime.on_shutdown()
        assert (report.stored, report.deferred, report.skipped) == (3, 0, 0)
        assert rclient.hlen(keys.batch_results(batch_id)) == 3
