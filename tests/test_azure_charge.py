"""A request without max_tokens on Azure (issue 13): Azure reserves the rest of the context window per choice
(prompt + that = the whole context; sim/azure.py), so the worker must charge that too, or its bucket lets
through several times what the deployment's window holds and draws a 429 for most of them. Real worker,
the simulator in Azure mode."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from ratequeue.config.settings import load_settings
from ratequeue.producer.api import Client
from ratequeue.sim.process import start_sim
from tests.test_azure_batch import KEY, azure_env, lines, models_file, r429

pytestmark = pytest.mark.e2e

StartWorker = Callable[[dict[str, str]], subprocess.Popen[bytes]]
TPM = 7_680_000  # 128,000 tokens a second: one whole-context request a second, ten in a 10 s window


def test_jobs_without_max_tokens_are_charged_the_whole_context_as_azure_does(
        redis_url: str, tmp_path: Path, start_worker: StartWorker) -> None:
    with start_sim(["--dialect", "azure", "--api-key", KEY, "--azure-window", "10",
                    "--deployment", f"chat-eu:model=gpt-4o-mini:tpm={TPM}"]) as sim:
        models = models_file(tmp_path, sim, "chat-eu", TPM, 10)
        start_worker(azure_env(redis_url, tmp_path, models, AZ_KEY=KEY))
        client = Client(load_settings(azure_env(redis_url, tmp_path, models)))
        # 16 jobs of 128,000 tokens each: 10 at once, then one a second (charged 16,384 + the prompt, as
        # OpenAI's default output, all 16 went at once and 6 drew 429s).
        batch_id = client.submit_batch(lines(16, max_tokens=None)).batch_id
        batch = client.wait(batch_id, timeout=40)
        stats = sim.stats(timeline=False)
    assert batch["request_counts"] == {"total": 16, "completed": 16, "failed": 0}
    assert r429(stats) <= 1, stats["by_status"]
