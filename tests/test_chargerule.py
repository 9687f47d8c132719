"""Reading the server's charge rule off x-ratelimit-remaining-tokens / -reset-tokens, against the
account-wide ledger (a simulated server bucket here; tests/test_charge_rule_learning.py runs the
real workers against the simulator)."""

from __future__ import annotations

import math
import random

from ratequeue.jobstore.jobs import StoredJob
from ratequeue.worker.chargerule import ChargeRuleCheck, Observation, judge
from ratequeue.worker.ledger import Ticket


def test_judge_picks_the_rule_that_explains_the_server() -> None:
    assert judge(10_000, 10_000, 6_000) == "sum"
    assert judge(6_100, 10_000, 6_000) == "max"
    assert judge(8_000, 10_000, 6_000) is None  # halfway: no verdict


def _serve(server_rule: str, pace: float, processes: int = 2, shared_ledger: bool = True,
           start: float = 0.5, seconds: float = 40.0, seed: int = 1) -> list[str]:
    """A server bucket of 5 s (600k TPM) charging by ``server_rule``; ``processes`` clients take
    turns sending, paced so that their spend priced by the sum rule is ``pace`` x the refill.
    Each process judges only its own answers; the ledger holds everyone's sends (or, as before
    issue 11, only the process's own). Returns every verdict."""
    rng = random.Random(seed)
    limit = 600_000
    rate, cap = limit / 60, limit / 60 * 5
    level, now = cap * start, 0.0
    ledgers = [[0, 0, 0] for _ in range(1 if shared_ledger else processes)]
    checks = [ChargeRuleCheck() for _ in range(processes)]
    verdicts = []
    for i in range(int(seconds * 60)):
        prompt, output = rng.randint(50, 800), rng.choice((64, 256, 512))
        job = StoredJob("x", 1, "/v1/chat/completions", {"max_tokens": output}, "m", prompt + output, prompt, output)
        dt = job.charge_under("sum") / (rate * pace)
        now += dt
        level = min(cap, level + rate * dt) - job.charge_under(server_rule)
        assert level >= 0, "the simulated clients overran the server"
        who = i % processes
        ledger = ledgers[0 if shared_ledger else who]
        ledger[0] += 1
        ledger[1] += job.charge_under("sum")
        ledger[2] += job.charge_under("max")
        reset = math.ceil((cap - level) / rate * 1000) / 1000  # rounded up to 1 ms, as the server does
        obs = Observation(Ticket(now, *ledger), job.charge_under("sum"), job.charge_under("max"), int(level), limit,
                          reset)
        verdict = checks[who].observe("pair", obs)
        if verdict:
            verdicts.append(verdict)
        if now > seconds:
            break
    return verdicts


def test_either_rule_is_read_while_the_server_bucket_drains() -> None:
    # Spending more than the refill (by the server's own rule) from half a bucket: the window test.
    assert set(_serve("sum", pace=1.1, processes=1, seconds=20)) == {"sum"}
    assert set(_serve("max", pace=1.6, processes=1, seconds=10)) == {"max"}


def test_two_processes_sharing_the_ledger_read_the_rule_right() -> None:
    sums, maxes = _serve("sum", pace=1.05, seconds=20), _serve("max", pace=1.6, seconds=8)
    assert set(sums) == {"sum"} and len(sums) >= 4
    assert set(maxes) == {"max"} and len(maxes) >= 2


def test_each_process_alone_misreads_a_shared_account() -> None:
    # The bug of issue 11: a worker comparing the account-wide header with its own requests only
    # sees the server charge twice what it sent, and calls a max-rule server "sum".
    assert "sum" in _serve("max", pace=1.6, seconds=8, shared_ledger=False)


def test_a_full_server_bucket_still_refutes_the_sum_rule() -> None:
    # Sum configured, the server charges max: paced by the sum rule ratequeue spends well below
    # the refill, the server's bucket sits at its capacity and the window test has nothing to say;
    # the tokens it misses after each request (reset-tokens) are fewer than the sum rule charged.
    verdicts = _serve("max", pace=0.95, start=1.0, seconds=20)
    assert set(verdicts) == {"max"} and len(verdicts) >= 4
    # A sum-rule server in the same place never refutes "sum": no wrong verdict.
    assert "max" not in _serve("sum", pace=0.95, start=1.0, seconds=20)


def test_no_output_budget_or_headers_give_no_tail_verdict() -> None:
    check = ChargeRuleCheck(window=0.0, min_requests=1)
    for n in range(1, 100):  # a full bucket: missing only 300 tokens after a sum-500 request
        obs = Observation(Ticket(n / 10, n, 500 * n, 300 * n), 500, 300, 9_700, 600_000, 0.03, exact=False)
        assert check.observe("p", obs) is None
        no_reset = Observation(Ticket(n / 10, n, 500 * n, 300 * n), 500, 300, 599_000, 600_000, None)
        assert check.observe("q", no_reset) is None  # near the limit: may be clipped


def test_charge_under_each_rule() -> None:
    job = StoredJob("x", 1, "/v1/chat/completions", {}, "m", 700, 200, 500)
    assert (job.charge_under("sum"), job.charge_under("max")) == (700, 500)
    embedding = StoredJob("e", 1, "/v1/embeddings", {}, "m", 42, 42, 0)
    assert embedding.charge_under("max") == 42
