"""The other dimensions of the charge rule learned by default (issue 11): whether the server counts
``n``, what it charges a request without a max output, and a rule pinned per model. Real worker
processes against the simulator charging by a family the model table does not say, the ledger
and ``rq:rules`` in real Redis."""

from __future__ import annotations

import re
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from ratequeue.config.settings import load_settings
from ratequeue.jobstore import keys
from ratequeue.producer.api import Client
from ratequeue.sim.process import start_sim
from tests.conftest import base_env

StartWorker = Callable[[dict[str, str]], subprocess.Popen[bytes]]
UPSTREAM = re.compile(r"upstream model=(\S+) charge=(\d+) ")


def _server(*extra: str, tpm: int = 300_000) -> list[str]:
    """A simulator of ``tpm`` (5 s buckets) answering in 50 ms, charging as ``extra`` says."""
    return ["--rpm", "100000", "--tpm", str(tpm), "--burst-seconds", "5", "--latency-ms", "50", *extra]


def _jobs(count: int, model: str = "gpt-4o-mini", n: tuple[int, ...] = (1,), without_max: int = 0) -> list[dict]:
    """Prompts of ~130 tokens with max_tokens 100 and n cycling through `n`; every `without_max`-th
    job names no max output."""
    jobs = []
    for i in range(count):
        body: dict[str, object] = {"model": model, "messages": [{"role": "user", "content": f"{i} " + "word " * 120}],
                                   "n": n[i % len(n)]}
        if not without_max or i % without_max:
            body["max_tokens"] = 100
        jobs.append({"custom_id": f"{model}-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
    return jobs


def _logs(tmp_path: Path, workers: int = 2) -> list[str]:
    return [(tmp_path / f"worker-{n}.log").read_text() for n in range(workers)]


def _run(redis_url: str, tmp_path: Path, start_worker: StartWorker, sim_args: list[str], jobs: list[dict],
         done: Callable[[dict[str, str]], bool], seconds: float = 60, after: float = 4,
         shown: Callable[[str], bool] | None = None, **extra: str) -> tuple[dict[str, str], str]:
    """Two workers run `jobs` against the simulator until `done(rules)` (or `seconds`); `after`
    seconds more for any second, wrong or repeated, verdict. Returns rq:rules, its fields without
    the account (``gpt-4o-mini|n``), and the second worker's metrics once `shown(metrics)` (or 20 s
    more: its gauges follow at its next reload, every 5 s, and next chunk)."""
    port = _free_port()
    with start_sim(sim_args) as sim:
        env = base_env(redis_url, sim.url, tmp_path, **extra)
        workers = [start_worker(env), start_worker({**env, "RATEQUEUE_METRICS_PORT": str(port)})]
        client = Client(load_settings(env))
        prefix = f"{client.settings.account_id}:"

        def rules() -> dict[str, str]:
            raw = client.redis.hgetall(keys.learned_rules())
            return {k.decode().removeprefix(prefix): v.decode() for k, v in raw.items()}

        report = client.submit_batch(jobs)  # all queued before any rule is learned
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not done(rules()):
            assert all(w.poll() is None for w in workers)
            time.sleep(0.25)
        time.sleep(after)
        learned = rules()
        until = time.monotonic() + 20
        while True:
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            if shown is None or shown(metrics) or time.monotonic() > until:
                break
            time.sleep(0.5)
        client.cancel(report.batch_id)
    return learned, metrics


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_two_workers_learn_a_server_that_ignores_n(redis_url: str, tmp_path: Path, start_worker: StartWorker) -> None:
    # n of 1, 2 and 3; the server charges one output allowance whatever n, we reserve n of them.
    n_field = "gpt-4o-mini|n"
    gauge = re.compile(r'ratequeue_charge_rule_n_counted\{[^}]*model="gpt-4o-mini"[^}]*\} 0\.0')
    rules, metrics = _run(redis_url, tmp_path, start_worker, _server("--no-charge-n"), _jobs(2000, n=(1, 2, 3)),
                          lambda r: n_field in r, shown=lambda m: bool(gauge.search(m)),
                          RATEQUEUE_MODEL_GPT_4O_MINI_TPM="300000")
    text = "".join(_logs(tmp_path))
    assert gauge.search(metrics), [line for line in metrics.splitlines() if "charge_rule" in line]
    assert rules.get(n_field) == "0", text[-3000:]
    assert rules.get("gpt-4o-mini") in (None, "sum"), rules
    switched = "the server charges one output allowance whatever n, not n x the output allowance: switching"
    assert text.count(switched) == 1, text[-3000:]


def test_two_workers_learn_the_allowance_without_max_tokens_and_price_queued_jobs_by_it(
    redis_url: str, tmp_path: Path, start_worker: StartWorker
) -> None:
    # A third of the jobs name no max output: we reserve the model's 16,384 tokens for each, the
    # server charges 2,000. Every job is queued before the allowance is learned; those sent after
    # it are priced by it (the charge the worker logs for each send). The allowance learned is
    # never below the server's (under-reserving draws 429s: 1,912 was learned once, read off one
    # window of ~2 s at 3M TPM) and within 5% above it: the least the server's bucket missed after
    # such a request bounds it from above at once, a run of windows then reads it with a margin
    # for their blurred ends (worker/allowance.py).
    missing_field = "gpt-4o-mini|missing"

    def near_2000(rules: dict[str, str]) -> bool:
        return missing_field in rules and 2000 <= int(rules[missing_field]) <= 2100

    rules, _ = _run(redis_url, tmp_path, start_worker, _server("--missing-max-charge", "2000", tpm=3_000_000),
                 _jobs(4000, without_max=3), near_2000, after=12, RATEQUEUE_MODEL_GPT_4O_MINI_TPM="3000000",
                 RATEQUEUE_LOG_LEVEL="INFO")
    logs = _logs(tmp_path)
    assert near_2000(rules), rules
    assert rules.get("gpt-4o-mini") in (None, "sum"), rules
    assert "tokens per choice without max_tokens, not 16384: switching" in "".join(logs)
    learned = [int(x) for x in re.findall(r"the server charges (\d+) tokens per choice", "".join(logs))]
    assert min(learned) >= 2000, learned  # never under the server's, not even for a while
    after_switch = []
    for log in logs:
        # This worker's sends after it last took a new allowance (its own verdict, or another
        # worker's at its next reload, within 5 s), less the first few (capacity granted before).
        taken = max(log.rfind(": switching"), log.rfind("as another worker learned"))
        if taken > 0:
            after_switch += [int(c) for _, c in UPSTREAM.findall(log[taken:])][5:]
    without_max = [c for c in after_switch if c > 1000]  # with a max: ~230 tokens
    assert without_max and all(c < 3000 for c in without_max), without_max[:50]


def test_a_model_pinned_in_the_table_keeps_its_rule_while_another_learns(
    redis_url: str, tmp_path: Path, start_worker: StartWorker
) -> None:
    # The server charges max for both models; gpt-4o-mini's rule is pinned in the user's model
    # table, gpt-4o's (configured sum too) is learned, RATEQUEUE_LEARN_CHARGE_RULE left at its default.
    table = tmp_path / "models.toml"
    table.write_text('[models."gpt-4o-mini"]\ncharge_rule = "sum"\ncharge_rule_pinned = true\ntpm = 150000\n'
                     '[models."gpt-4o"]\ncharge_rule = "sum"\ntpm = 150000\n')
    jobs = [job for pair in zip(_jobs(1000), _jobs(1000, "gpt-4o"), strict=True) for job in pair]
    rules, _ = _run(redis_url, tmp_path, start_worker, _server("--charge-rule", "max", tpm=150_000), jobs,
                 lambda r: "gpt-4o" in r, RATEQUEUE_MODELS_FILE=str(table))
    logs = _logs(tmp_path)
    assert rules.get("gpt-4o") == "max", rules
    assert not any(field.startswith("gpt-4o-mini") for field in rules), rules
    assert "gpt-4o-mini: the server charges" not in "".join(logs)
    for log in logs:  # said once by each worker: pinned, it never switches
        assert log.count("gpt-4o-mini: the server seems to charge by the 'max' rule, not the configured 'sum'") <= 1
    assert "gpt-4o-mini: the server seems to charge by the 'max' rule" in "".join(logs)
