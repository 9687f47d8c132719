"""Learning from the server's headers: limits configured wrongly, and the charge rule."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import orjson

from ratequeue.config.settings import load_settings
from ratequeue.producer.api import Client
from ratequeue.sim.process import start_sim
from tests.conftest import base_env

StartWorker = Callable[[dict[str, str]], subprocess.Popen[bytes]]


# A server of 60,000 TPM (5 s burst) that charges prompt + max_tokens, answering in 50 ms.
SERVER_60K_TPM_SUM = ["--rpm", "100000", "--tpm", "60000", "--burst-seconds", "5", "--charge-rule", "sum",
                      "--latency-ms", "50"]


def _jobs(n: int, max_tokens: int = 60) -> list[dict[str, object]]:
    return [{"custom_id": f"l-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"summarise {i}"}],
                      "max_tokens": max_tokens}} for i in range(n)]


def test_limits_configured_ten_times_too_high_are_learned_within_seconds(
    redis_url: str, tmp_path: Path, start_worker: StartWorker
) -> None:
    args = ["--rpm", "100000", "--tpm", "10000000", "--model", "gpt-4o-mini:rpm=1200:tpm=60000", "--latency-ms", "50",
            "--burst-seconds", "10"]
    with start_sim(args) as sim:
        env = base_env(redis_url, sim.url, tmp_path, RATEQUEUE_MODEL_GPT_4O_MINI_RPM="12000",
                       RATEQUEUE_MODEL_GPT_4O_MINI_TPM="600000")
        start_worker(env)
        client = Client(load_settings(env))
        started = time.monotonic()
        report = client.submit_batch(_jobs(150))
        while not client.redis.hlen("rq:learned"):
            assert time.monotonic() - started < 5, "limits not learned within 5 s"
            time.sleep(0.05)
        [learned] = [orjson.loads(v) for v in client.redis.hvals("rq:learned")]
        assert (learned["rpm"], learned["tpm"]) == (1200, 60000)
        batch = client.wait(report.batch_id, timeout=60, poll=0.2)
        stats = sim.stats()
    assert batch["request_counts"]["completed"] == 150
    r429 = stats["r429"]["tokens"] + stats["r429"]["requests"]
    # Only the opening burst, sized to the wrong limits, can draw 429s; the learned bucket then holds.
    assert r429 <= 75
    late = [row["r429"] for row in stats["timeline"][4:]]
    assert sum(late) == 0


def test_a_server_charging_more_than_configured_is_found_out_and_followed(
    redis_url: str, tmp_path: Path, start_worker: StartWorker
) -> None:
    # The server charges prompt + max_tokens ("sum"); the model is configured with "max", which
    # undercharges, so the workers overrun the limit. The drop in x-ratelimit-remaining-tokens
    # shows the server's rule within a window or two, and with learning allowed the workers follow it.
    with start_sim(SERVER_60K_TPM_SUM) as sim:
        env = base_env(redis_url, sim.url, tmp_path, RATEQUEUE_MODEL_GPT_4O_MINI_CHARGE_RULE="max",
                       RATEQUEUE_MODEL_GPT_4O_MINI_TPM="60000", RATEQUEUE_LEARN_CHARGE_RULE="1",
                       RATEQUEUE_LOG_LEVEL="WARNING")
        worker = start_worker(env)
        client = Client(load_settings(env))
        jobs = [{"custom_id": f"r-{i}", "method": "POST", "url": "/v1/chat/completions",
                 "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "word " * 120}],
                          "max_tokens": 100}} for i in range(700)]
        report = client.submit_batch(jobs)
        log = tmp_path / "worker-0.log"
        deadline = time.monotonic() + 45
        while "charges by the 'sum' rule" not in log.read_text():
            assert time.monotonic() < deadline, "charge rule not learned"
            assert worker.poll() is None
            time.sleep(0.5)
        learned_at = len(sim.stats()["timeline"])
        time.sleep(10)
        timeline = sim.stats()["timeline"]
        client.cancel(report.batch_id)
    early, late = timeline[2:learned_at], timeline[learned_at + 4:]
    rate = [sum(r["r429"] for r in rows) / max(sum(r["requests_ok"] + r["r429"] for r in rows), 1)
            for rows in (early, late)]
    # Before the switch the workers undercharge and draw 429s; after it, jobs already queued are
    # priced anew when reserved, the few granted at the old price pay the difference, and the
    # unrefunded 429s have paid back what the server charged beyond our bucket: 429s stop.
    # (Before the switch the 429s already cut the bucket's share of the limits: fewer than 20%. Since
    # a level is lowered to 40% of the server's remaining (reconcile.lua's claim, issue 11), an
    # undercharging bucket stays below the server's before the switch too: 0 measured, so the rule
    # learned, not the early 429s, is what this test's first half checks.)
    assert late and rate[1] <= 0.02, rate


def test_a_bucket_as_large_as_the_servers_draws_almost_no_429s(
    redis_url: str, tmp_path: Path, start_worker: StartWorker
) -> None:
    # Workers and server both hold 5 s of tokens, so the opening burst and every refill land right
    # on the server's edge, where timing noise draws a few 429s. Those must stay a few: a refused
    # request is not refunded, so each 429 moves our bucket back below the server's.
    with start_sim(SERVER_60K_TPM_SUM) as sim:
        env = base_env(redis_url, sim.url, tmp_path, RATEQUEUE_MODEL_GPT_4O_MINI_CHARGE_RULE="sum",
                       RATEQUEUE_MODEL_GPT_4O_MINI_TPM="60000", RATEQUEUE_BURST_SECONDS="5")
        start_worker(env)
        client = Client(load_settings(env))
        report = client.submit_batch(_jobs(130, max_tokens=200))
        batch = client.wait(report.batch_id, timeout=60, poll=0.5)
        stats = sim.stats()
    assert batch["request_counts"]["completed"] == 130
    refused = stats["r429"]["tokens"] + stats["r429"]["requests"]
    assert refused <= 3, stats["r429"]
