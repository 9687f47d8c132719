"""A lone deployment (ratequeue is the account's only client) keeps the whole limit after its
opening (issue 11's shared-account safety must not cost it): its own requests in flight are not
another client's spending. Simulator + real Redis + a real worker process."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from ratequeue.config.settings import load_settings
from ratequeue.producer.api import Client
from ratequeue.sim.process import start_sim
from tests.conftest import base_env, wait_until

StartWorker = Callable[[dict[str, str]], subprocess.Popen[bytes]]
RPM = 1200  # 20 requests a second


def _jobs(tag: str, n: int) -> list[dict[str, object]]:
    return [{"custom_id": f"{tag}-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": f"{tag} {i}"}]}}
            for i in range(n)]


def _share(r: redis.Redis) -> float | None:
    """The shared share of the model's bucket (reconcile.lua's fs), None before the first reading."""
    for key in r.scan_iter("rq:bucket:{*:gpt-4o-mini}"):
        if r.type(key) == b"hash":
            raw = r.hget(key, "fs")
            return None if raw is None else float(raw)
    return None


@pytest.mark.e2e
def test_a_lone_deployment_keeps_the_whole_limit_when_a_burst_starts(
    redis_url: str, tmp_path: Path, start_worker: StartWorker
) -> None:
    """After the opening (share back to 1), the worker idles, then a batch starts at once: the
    server's room sat full while we were idle (its refill lost to its top), then falls by what we
    spend. Compared with the window's whole refill (capped only at its end), that fall read as
    another client's spending: the buffer running dry cut the lone deployment's share by 10-35%
    and reset its claim, and work deferred meanwhile came back priced at the cut share. Our
    bucket holds half of the server's (its window not learned) so that no burst of ours draws a
    429 (at exactly the server's window, one arriving early now and then is refused, and a 429
    rightly cuts the share)."""
    sim_args = ["--rpm", str(RPM), "--tpm", "100000000", "--burst-seconds", "1", "--latency-ms", "500"]
    with start_sim(sim_args) as sim:
        env = base_env(redis_url, sim.url, tmp_path, RATEQUEUE_MODEL_GPT_4O_MINI_RPM=str(RPM),
                       RATEQUEUE_MODEL_GPT_4O_MINI_TPM="100000000", RATEQUEUE_LEARN_WINDOW="0",
                       RATEQUEUE_BURST_SECONDS="0.5")
        start_worker(env)
        client = Client(load_settings(env))
        r = redis.Redis.from_url(redis_url)
        client.wait(client.submit_batch(_jobs("warm", 60)).batch_id, timeout=120, poll=0.1)
        wait_until(lambda: _share(r) == 1.0, 30, "the opening's share back to 1", explain=lambda: _share(r))
        time.sleep(1.5)  # idle: the server's room refills, nothing in flight
        seen: list[float] = []
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                share = _share(r)
                if share is not None:
                    seen.append(share)
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            batch = client.wait(client.submit_batch(_jobs("burst", 120)).batch_id, timeout=120, poll=0.1)
        finally:
            done.set()
            sampler.join()
        stats = sim.stats()
    assert batch["request_counts"]["completed"] == 120, batch["request_counts"]
    assert sum(stats["r429"].values()) == 0, stats["r429"]
    assert seen and min(seen) == 1.0, sorted(set(seen))
