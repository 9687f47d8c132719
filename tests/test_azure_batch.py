"""Azure OpenAI end to end (issue 13): real workers, the real simulator in Azure mode, a models file with
an azure account. Deployment paths, ``api-key``, per-deployment limits enforced over 1 s or 10 s windows,
whose headers report the limits per window, not per minute.

The findings reproduced: the per-window ``x-ratelimit-limit-requests`` (20 for 120 RPM at 10 s) was taken
as per-minute (a 6x, at 1 s a 60x, slowdown), its ``remaining`` read as minutes of limit widened the bucket
past Azure's window, and the bucket's default burst (5 s) overran a 1 s window at once.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from ratequeue.config.settings import load_settings
from ratequeue.jobstore import keys
from ratequeue.producer.api import Client
from ratequeue.sim.process import SimHandle, start_sim
from ratequeue.worker.bucket_values import window_key
from tests.conftest import base_env

pytestmark = pytest.mark.e2e

StartWorker = Callable[[dict[str, str]], subprocess.Popen[bytes]]
KEY = "azure-key-0123456789abcdef"
VERSION = "2024-10-21"


@pytest.fixture
def azure_sim(request: pytest.FixtureRequest) -> Iterator[SimHandle]:
    window, deployment, *extra = request.param
    with start_sim(["--dialect", "azure", "--api-key", KEY, "--azure-window", str(window),
                    "--deployment", deployment, *extra]) as sim:
        yield sim


def models_file(tmp_path: Path, sim: SimHandle, deployment: str, tpm: int, window: float,
                rpm: int | None = None) -> Path:
    path = tmp_path / "models.toml"
    extra = f"rpm = {rpm}\n" if rpm is not None else ""
    path.write_text(f"""\
[accounts.az]
dialect = "azure"
base_url = "{sim.url}"
api_version = "{VERSION}"
api_key_env = "AZ_KEY"

[accounts.az.deployments.gpt-4o-mini]
deployment = "{deployment}"
tpm = {tpm}
window_seconds = {window}
{extra}""")
    return path


def azure_env(redis_url: str, tmp_path: Path, models: Path, **extra: str) -> dict[str, str]:
    """A worker's environment with the Azure key only (no OpenAI key: nothing may go out with one)."""
    env = base_env(redis_url, "http://127.0.0.1:9", tmp_path, RATEQUEUE_MODELS_FILE=str(models), **extra)
    env.pop("OPENAI_API_KEY")
    return env


def lines(n: int, max_tokens: int | None = 20, prefix: str = "j", words: dict[int, str] | None = None
          ) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(n):
        body: dict[str, Any] = {"model": "gpt-4o-mini",
                                "messages": [{"role": "user", "content": f"item {i} {(words or {}).get(i, '')}"}]}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        out.append({"custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
    return out


def r429(stats: dict[str, Any]) -> int:
    return int(stats["by_status"].get("429", 0))


@pytest.mark.parametrize(
    ("azure_sim", "tpm", "window", "jobs"),
    [
        # 60,000 TPM -> 360 RPM: 60 requests per 10 s window. The per-window header read as per-minute
        # (60 RPM, a 56 s burst) took ~35 s for these 90 jobs; an honest bucket takes ~5 s.
        ((10, "chat-eu:model=gpt-4o-mini:tpm=60000"), 60_000, 10, 90),
        # 120,000 TPM -> 720 RPM: 12 requests a second. A 5 s burst (60 requests) drew ~48 429s at once.
        ((1, "chat-eu:model=gpt-4o-mini:tpm=120000"), 120_000, 1, 100),
    ],
    indirect=["azure_sim"],
    ids=["window10", "window1"],
)
def test_an_azure_batch_runs_at_the_deployments_limits_with_no_failures_and_few_429s(
        redis_url: str, rclient: redis.Redis, tmp_path: Path, start_worker: StartWorker, azure_sim: SimHandle,
        tpm: int, window: int, jobs: int) -> None:
    models = models_file(tmp_path, azure_sim, "chat-eu", tpm, window)
    start_worker(azure_env(redis_url, tmp_path, models, AZ_KEY=KEY))
    client = Client(load_settings(azure_env(redis_url, tmp_path, models)))
    batch_id = client.submit_batch(lines(jobs)).batch_id
    batch = client.wait(batch_id, timeout=40)
    stats = azure_sim.stats(timeline=False)
    assert batch["request_counts"] == {"total": jobs, "completed": jobs, "failed": 0}
    assert "401" not in stats["by_status"] and "404" not in stats["by_status"], stats["by_status"]
    assert stats["by_status"]["200"] == jobs
    # Azure's rule: 429s <= 1% of requests (a single one is allowed in these small batches).
    assert r429(stats) <= max(1, 0.01 * stats["requests_total"]), stats["by_status"]
    wall = batch["completed_at"] - batch["in_progress_at"]
    rps = tpm * 6 / 1000 / 60
    burst = rps * window
    # What the workers learned from the per-window headers: per-minute limits, a bucket within the window.
    learned = {k.decode(): orjson.loads(v) for k, v in rclient.hgetall(keys.learned_limits()).items()}
    for limits in learned.values():  # written only when they differ from the configured ones
        assert limits["rpm"] == pytest.approx(tpm * 6 / 1000, rel=0.02)
        assert limits["tpm"] == pytest.approx(tpm, rel=0.02)
    for key in rclient.scan_iter(window_key(keys.bucket_key("*", "chat-eu"))):
        held = float(rclient.get(key) or 0)
        assert held <= window, f"the bucket holds {held:.1f} s of limit"
    assert wall < (jobs - burst) / rps * 1.5 + 3, f"{wall:.1f} s: the deployment's limits were not used"
