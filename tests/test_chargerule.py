"""Reading the server's charge rule off x-ratelimit-remaining-tokens."""

from __future__ import annotations

import random

from ratequeue.jobstore.jobs import StoredJob
from ratequeue.worker.chargerule import ChargeRuleCheck, judge


def test_judge_picks_the_rule_that_explains_the_server() -> None:
    assert judge(10_000, 10_000, 6_000) == "sum"
    assert judge(6_100, 10_000, 6_000) == "max"
    assert judge(8_000, 10_000, 6_000) is None  # halfway: no verdict


def _simulate(server_rule: str, seed: int = 1) -> list[str]:
    """A server bucket charging by ``server_rule``, answering 30 requests a second for 40 s."""
    rng = random.Random(seed)
    limit, remaining, now = 600_000, 400_000.0, 0.0
    check, verdicts = ChargeRuleCheck(window=10.0, min_requests=20), []
    for _ in range(1200):
        prompt, output = rng.randint(50, 800), rng.choice((64, 256, 512))
        job = StoredJob("x", 1, "/v1/chat/completions", {}, "m", prompt + output, prompt, output)
        now += 1 / 30
        remaining = min(limit, remaining + limit / 60 / 30) - job.charge_under(server_rule)
        verdict = check.observe("pair", now, int(remaining), limit, job.charge_under("sum"), job.charge_under("max"))
        if verdict:
            verdicts.append(verdict)
    return verdicts


def test_windows_of_responses_reveal_either_rule() -> None:
    assert set(_simulate("sum")) == {"sum"} and len(_simulate("sum")) >= 3
    assert set(_simulate("max")) == {"max"} and len(_simulate("max")) >= 3


def test_a_full_bucket_or_missing_headers_give_no_verdict() -> None:
    check = ChargeRuleCheck(window=1.0, min_requests=1)
    for t in range(100):
        assert check.observe("p", t / 10, 600_000, 600_000, 500, 300) is None  # clipped at capacity
        assert check.observe("q", t / 10, None, None, 500, 300) is None


def test_charge_under_each_rule() -> None:
    job = StoredJob("x", 1, "/v1/chat/completions", {}, "m", 700, 200, 500)
    assert (job.charge_under("sum"), job.charge_under("max")) == (700, 500)
    embedding = StoredJob("e", 1, "/v1/embeddings", {}, "m", 42, 42, 0)
    assert embedding.charge_under("max") == 42
