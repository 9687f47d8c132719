"""Issue 10, finding 5: a worker stopped twice ends at once.

Before: after a Ctrl-C the worker began Celery's warm shutdown; a second Ctrl-C started the cold
one, which raises with the threads pool (``TaskPool does not implement kill_job``), and a worker
whose Redis had gone (the terminal's Ctrl-C stopped the embedded redis-server too) then ignored
SIGTERM: an orphan with parent 1. A real worker, a real redis-server, the real simulator.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ratequeue.config.settings import load_settings
from ratequeue.producer.api import Client
from ratequeue.producer.embedded import EmbeddedRedis
from ratequeue.sim.process import start_sim
from tests.conftest import base_env, wait_until

StartWorker = Callable[[dict[str, str]], subprocess.Popen[bytes]]
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


@pytest.mark.parametrize(("second", "redis_goes"), [(signal.SIGINT, False), (signal.SIGTERM, True)])
def test_a_second_stop_signal_ends_a_busy_worker_at_once(
    tmp_path: Path, start_worker: StartWorker, second: signal.Signals, redis_goes: bool
) -> None:
    with start_sim(["--latency-ms", "20000"]) as sim, EmbeddedRedis(tmp_path / "redis") as server:
        env = base_env(server.url, sim.url, tmp_path)
        client = Client(load_settings(env))
        for _ in range(5):
            client.submit_job(BODY)
        client.close()
        worker = start_worker(env)
        wait_until(lambda: sim.stats(timeline=False)["requests_total"] >= 5, 60, "calls in flight")
        worker.send_signal(signal.SIGINT)  # warm shutdown: it waits for the calls (20 s)
        if redis_goes:
            server.kill()  # as the terminal's Ctrl-C did to the embedded redis-server
        time.sleep(1)
        assert worker.poll() is None  # still waiting, as a warm shutdown should
        worker.send_signal(second)
        sent = time.monotonic()
        code = worker.wait(15)
    assert time.monotonic() - sent < 10
    assert code == 128 + second
    log = "".join(p.read_text(errors="replace") for p in tmp_path.glob("worker-*.log"))
    assert f"worker: {second.name} again: exiting at once" in log
    assert "kill_job" not in log
