"""Azure's content filter end to end (issue 13): a 400 ``content_filter`` fails that job at once, its error
carrying the filter's details (category, severity); a 200 whose output was filtered (finish_reason
``content_filter``) is a completed job whose result says so, and is counted; the other jobs are unaffected.
Real worker, the simulator in Azure mode."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from ratequeue.config.settings import load_settings
from ratequeue.producer.api import Client
from ratequeue.sim.process import start_sim
from tests.test_azure_batch import KEY, azure_env, lines, models_file
from tests.test_metrics_worker import free_port, sample, scrape

pytestmark = pytest.mark.e2e

StartWorker = Callable[[dict[str, str]], subprocess.Popen[bytes]]
PROMPT_WORD, OUTPUT_WORD = "forbiddenword", "violentword"


def test_filtered_prompts_fail_at_once_with_the_filters_details_and_filtered_outputs_complete(
        redis_url: str, tmp_path: Path, start_worker: StartWorker) -> None:
    with start_sim(["--dialect", "azure", "--api-key", KEY, "--deployment", "chat-eu:model=gpt-4o-mini:tpm=600000",
                    "--content-filter-word", PROMPT_WORD, "--content-filter-output-word", OUTPUT_WORD]) as sim:
        models = models_file(tmp_path, sim, "chat-eu", 600_000, 10)
        metrics_port = free_port()
        start_worker(azure_env(redis_url, tmp_path, models, AZ_KEY=KEY, RATEQUEUE_METRICS_PORT=str(metrics_port)))
        client = Client(load_settings(azure_env(redis_url, tmp_path, models)))
        words = {3: PROMPT_WORD, 7: PROMPT_WORD, 5: OUTPUT_WORD}
        batch_id = client.submit_batch(lines(20, words=words)).batch_id
        batch = client.wait(batch_id, timeout=30)
        stats = sim.stats(timeline=False)
        errors = {e["custom_id"]: e for e in client.iter_results(batch_id, errors=True)}
        results = {r["custom_id"]: r for r in client.iter_results(batch_id)}
        scraped = scrape(metrics_port)
    assert batch["request_counts"] == {"total": 20, "completed": 18, "failed": 2}
    assert stats["by_status"] == {"200": 18, "400": 2}  # failed at once: one call each, never retried
    assert set(errors) == {"j-3", "j-7"}
    error = errors["j-3"]["error"]
    assert error["code"] == "content_filter"
    # The filter's details, in the error itself: which category, how severe.
    assert "violence" in error["message"] and "high" in error["message"], error
    assert errors["j-3"]["response"]["body"]["error"]["innererror"]["content_filter_result"]["violence"] == {
        "filtered": True, "severity": "high"}
    filtered = results["j-5"]["response"]["body"]["choices"][0]
    assert filtered["finish_reason"] == "content_filter"
    assert filtered["content_filter_results"]["violence"]["filtered"] is True
    assert all(r["response"]["body"]["choices"][0]["finish_reason"] != "content_filter"
               for cid, r in results.items() if cid != "j-5")
    assert sample(scraped, "ratequeue_filtered_outputs_total") == 1
    assert sample(scraped, "ratequeue_job_failures_total", code="content_filter") == 2

