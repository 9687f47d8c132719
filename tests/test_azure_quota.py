"""Azure's daily quota end to end (issue 13): "Please retry after 86400 seconds" parks the deployment's pair
(no retry storm, no failed job, ``status`` says why); after a new day (``/sim/daily-reset``) the pair's probe
succeeds and the batch finishes. Real workers, the simulator in Azure mode."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from ratequeue.config.settings import load_settings
from ratequeue.producer.api import Client
from ratequeue.sim.process import start_sim
from tests.conftest import wait_until
from tests.test_azure_batch import KEY, azure_env, lines, models_file

pytestmark = pytest.mark.e2e

StartWorker = Callable[[dict[str, str]], subprocess.Popen[bytes]]


def test_a_spent_daily_quota_parks_the_deployment_and_a_new_day_finishes_the_batch(
        redis_url: str, tmp_path: Path, start_worker: StartWorker) -> None:
    # About 40 tokens a job: the day's 600 tokens run out after ~15 of the 40 jobs.
    with start_sim(["--dialect", "azure", "--api-key", KEY, "--azure-window", "10", "--daily-quota-tokens", "600",
                    "--deployment", "chat-eu:model=gpt-4o-mini:tpm=60000"]) as sim:
        models = models_file(tmp_path, sim, "chat-eu", 60_000, 10)
        # The park lasts RATEQUEUE_PARK_MAX_COOLDOWN at most (an hour by default; 2 s here): then one probe.
        start_worker(azure_env(redis_url, tmp_path, models, AZ_KEY=KEY, RATEQUEUE_PARK_MAX_COOLDOWN="2",
                               RATEQUEUE_PARK_COOLDOWN="1"))
        client = Client(load_settings(azure_env(redis_url, tmp_path, models)))
        batch_id = client.submit_batch(lines(40, max_tokens=20)).batch_id

        def parked() -> dict[str, dict[str, object]]:
            return {pair: record for pair, record in client.overview()["parked"].items() if pair.endswith(":chat-eu")}

        wait_until(parked, 20, "the deployment parked", explain=lambda: sim.stats(timeline=False)["by_status"])
        (record,) = parked().values()
        assert record["reason"] == "long_retry_after"
        assert "86400 seconds" in str(record["message"]), record  # status says why: Azure's own words
        done_then = client.status(batch_id)["request_counts"]["completed"]
        # Parked, not failing, not storming: a probe goes once the park's 2 s are over, is refused and
        # parks the pair again (last_probe noted); the other jobs wait, each refused at most once.
        wait_until(lambda: any(r.get("last_probe") for r in parked().values()), 15, "a refused probe",
                   explain=parked)
        counts = client.status(batch_id)["request_counts"]
        assert counts["failed"] == 0 and counts["completed"] == done_then < 40
        refused = sim.stats(timeline=False)["r429"].get("daily_quota", 0)
        assert refused <= 40 - done_then + 2, f"{refused} daily-quota 429s for {40 - done_then} jobs"

        sim.daily_reset()
        batch = client.wait(batch_id, timeout=30)
        assert batch["request_counts"] == {"total": 40, "completed": 40, "failed": 0}
        assert not parked()
        assert sim.stats(timeline=False)["by_status"]["200"] == 40
