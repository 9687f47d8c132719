"""Reading the server's charge rule off x-ratelimit-remaining-tokens / -reset-tokens, against the
account-wide ledger (a simulated server bucket here; tests/test_charge_rule_learning.py runs the
real workers against the simulator)."""

from __future__ import annotations

import math
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from ratequeue.config.charge import ChargeRule
from ratequeue.config.models import ModelSpec, load_model_table_from
from ratequeue.config.settings import load_settings
from ratequeue.errors import ConfigError
from ratequeue.jobstore.jobs import StoredJob
from ratequeue.worker.backlog import Backlog, job_ref
from ratequeue.worker.chargerule import ChargeRuleCheck, Observation, Verdict, judge
from ratequeue.worker.ledger import Terms, Ticket
from ratequeue.worker.limiter import BucketLimits
from ratequeue.worker.rulelearner import RuleLearner


def test_judge_picks_the_rule_that_explains_the_server() -> None:
    assert judge(10_000, 10_000, 6_000) == "sum"
    assert judge(6_100, 10_000, 6_000) == "max"
    assert judge(8_000, 10_000, 6_000) is None  # halfway: no verdict


SUM, MAX = ChargeRule("sum"), ChargeRule("max")
MODEL_MAX = 16_384  # the model table's max output: what we reserve for a request without max_tokens


def _job(rng: random.Random, n_choices: tuple[int, ...] = (1,), defaulted: float = 0.0) -> StoredJob:
    # The draws of the plain case (n = 1, every max named) come first and alone: the same jobs as before.
    prompt, max_tokens = rng.randint(50, 800), rng.choice((64, 256, 512))
    n = rng.choice(n_choices) if len(n_choices) > 1 else n_choices[0]
    body: dict[str, object] = {"n": n}
    if not defaulted or rng.random() >= defaulted:
        body["max_tokens"] = max_tokens
    output = n * int(body.get("max_tokens", MODEL_MAX))  # type: ignore[call-overload]
    return StoredJob("x", 1, "/v1/chat/completions", body, "m", prompt + output, prompt, output)


def _serve(server: ChargeRule | str, pace: float, processes: int = 2, shared_ledger: bool = True,
           start: float = 0.5, seconds: float = 40.0, seed: int = 1, configured: ChargeRule = SUM,
           n_choices: tuple[int, ...] = (1,), defaulted: float = 0.0) -> list[Verdict]:
    """A server bucket of 5 s (600k TPM) charging by ``server``; ``processes`` clients take
    turns sending, paced so that their spend priced by the server's rule (the sum rule for a max
    server) is ``pace`` x the refill. Each process judges only its own answers; the ledger holds
    everyone's sends (or, as before issue 11, only the process's own). Returns every verdict."""
    server = ChargeRule(server) if isinstance(server, str) else server
    rng = random.Random(seed)
    limit = 600_000
    rate, cap = limit / 60, limit / 60 * 5
    level, now = cap * start, 0.0
    ledgers = [(0, Terms()) for _ in range(1 if shared_ledger else processes)]
    checks = [ChargeRuleCheck() for _ in range(processes)]
    verdicts = []
    for i in range(int(seconds * 60)):
        job = _job(rng, n_choices, defaulted)
        dt = job.charge_under(replace(server, combine="sum")) / (rate * pace)
        now += dt
        level = min(cap, level + rate * dt) - job.charge_under(server)
        assert level >= 0, "the simulated clients overran the server"
        who = i % processes
        count, totals = ledgers[0 if shared_ledger else who]
        ledgers[0 if shared_ledger else who] = (count + 1, totals + Terms.of(job))
        reset = math.ceil((cap - level) / rate * 1000) / 1000  # rounded up to 1 ms, as the server does
        obs = Observation(Ticket(now, count + 1, totals + Terms.of(job)), Terms.of(job), int(level), limit, reset)
        verdict = checks[who].observe("pair", obs, configured, MODEL_MAX)
        if verdict:
            verdicts.append(verdict)
        if now > seconds:
            break
    return verdicts


def _combines(verdicts: list[Verdict]) -> list[str]:
    return [v.combine for v in verdicts if v.combine is not None]


def test_either_rule_is_read_while_the_server_bucket_drains() -> None:
    # Spending more than the refill (by the server's own rule) from half a bucket: the window test.
    assert set(_combines(_serve("sum", pace=1.1, processes=1, seconds=20))) == {"sum"}
    assert set(_combines(_serve("max", pace=1.6, processes=1, seconds=10))) == {"max"}


def test_two_processes_sharing_the_ledger_read_the_rule_right() -> None:
    sums, maxes = _combines(_serve("sum", pace=1.05, seconds=20)), _combines(_serve("max", pace=1.6, seconds=8))
    assert set(sums) == {"sum"} and len(sums) >= 4
    assert set(maxes) == {"max"} and len(maxes) >= 2


def test_each_process_alone_misreads_a_shared_account() -> None:
    # The bug of issue 11: a worker comparing the account-wide header with its own requests only
    # sees the server charge twice what it sent, and calls a max-rule server "sum".
    assert "sum" in _combines(_serve("max", pace=1.6, seconds=8, shared_ledger=False))


def test_a_full_server_bucket_still_refutes_the_sum_rule() -> None:
    # Sum configured, the server charges max: paced by the sum rule ratequeue spends well below
    # the refill, the server's bucket sits at its capacity and the window test has nothing to say;
    # the tokens it misses after each request (reset-tokens) are fewer than the sum rule charged.
    verdicts = _combines(_serve("max", pace=0.95, start=1.0, seconds=20))
    assert set(verdicts) == {"max"} and len(verdicts) >= 4
    # A sum-rule server in the same place never refutes "sum": no wrong verdict.
    assert "max" not in _combines(_serve("sum", pace=0.95, start=1.0, seconds=20))


def test_no_output_budget_or_headers_give_no_tail_verdict() -> None:
    check = ChargeRuleCheck(window=0.0, min_requests=1)
    defaulted, named = Terms(dprompt=200, dchoices=1, dprompts=1), Terms(500, 300, 500, 300)
    for n in range(1, 100):  # a full bucket: missing only 300 tokens after a sum-500 request
        obs = Observation(Ticket(n / 10, n, Terms(dprompt=200 * n, dchoices=n, dprompts=n)), defaulted, 9_700,
                          600_000, 0.03)
        verdict = check.observe("p", obs, SUM, MODEL_MAX)
        assert verdict.combine is None and verdict.n_multiplies is None  # its allowance only: at most ~310
        no_reset = Observation(Ticket(n / 10, n, Terms(500 * n, 300 * n, 500 * n, 300 * n)), named, 599_000,
                               600_000, None)
        assert not check.observe("q", no_reset, SUM, MODEL_MAX)  # near the limit: may be clipped


@pytest.mark.parametrize("combine", ["sum", "max"])
def test_a_server_that_ignores_n_is_read(combine: str) -> None:
    # Requests with n of 1 to 3, the server charging one output allowance whatever n.
    verdicts = _serve(ChargeRule(combine, n_multiplies=False), pace=1.1, seconds=20, n_choices=(1, 2, 3),
                      configured=ChargeRule(combine))
    said = [v.n_multiplies for v in verdicts if v.n_multiplies is not None]
    assert set(said) == {False} and len(said) >= 3, verdicts  # a window may not tell: None, never True
    assert set(_combines(verdicts)) <= {combine}, verdicts


def test_a_full_server_bucket_still_refutes_counting_n() -> None:
    # n counted configured, the server ignores n: we over-reserve and its bucket stays full.
    verdicts = _serve(ChargeRule("sum", n_multiplies=False), pace=0.6, start=1.0, seconds=20, n_choices=(1, 2, 3))
    said = [v.n_multiplies for v in verdicts if v.n_multiplies is not None]
    assert set(said) == {False} and len(said) >= 3, verdicts
    assert "max" not in _combines(verdicts), verdicts


def test_a_server_that_counts_n_is_read() -> None:
    verdicts = _serve(SUM, pace=1.1, seconds=20, n_choices=(1, 2, 3), configured=ChargeRule("max", False))
    assert {v.n_multiplies for v in verdicts if v.n_multiplies is not None} == {True}, verdicts
    assert set(_combines(verdicts)) == {"sum"}, verdicts


def test_every_n_of_one_says_nothing_of_n() -> None:
    assert all(v.n_multiplies is None for v in _serve("sum", pace=1.1, seconds=10))


@pytest.mark.parametrize("combine", ["sum", "max"])
def test_the_allowance_without_max_tokens_is_solved_for(combine: str) -> None:
    # A third of the requests name no max output; the server charges 4,096 per choice for them
    # (we reserved the model's 16,384), and the configured combine rule is the server's.
    verdicts = _serve(ChargeRule(combine, missing_max_tokens=4096), pace=1.05, seconds=30, defaulted=0.3,
                      n_choices=(1, 2), configured=ChargeRule(combine))
    allowances = [v.missing_max_tokens for v in verdicts if v.missing_max_tokens is not None]
    solved = [x for x in allowances if abs(x - 4096) < 0.05 * 4096]
    # Solved by the window test; the tails' bounds from above may come first, never below it.
    assert len(solved) >= 3 and all(x > 4096 * 0.95 for x in allowances), verdicts
    assert set(_combines(verdicts)) <= {combine}, verdicts


def test_a_full_server_bucket_still_caps_the_allowance() -> None:
    # We reserve the model's 16,384 per choice without a max; the server charges 2,000 and its
    # bucket stays full (the window test is mute): what it misses after each such request bounds
    # its allowance from above, never below what it charged.
    verdicts = _serve(ChargeRule("sum", missing_max_tokens=2000), pace=0.5, start=1.0, seconds=20, defaulted=0.3)
    capped = [v.missing_max_tokens for v in verdicts if v.missing_max_tokens is not None]
    assert len(capped) >= 3 and all(2000 <= x < 16_384 * 0.5 for x in capped), verdicts


def test_a_learned_allowance_gives_no_further_verdict() -> None:
    server = ChargeRule("sum", missing_max_tokens=4096)
    verdicts = _serve(server, pace=1.1, seconds=20, defaulted=0.3, configured=server)
    assert all(v.missing_max_tokens is None for v in verdicts) and set(_combines(verdicts)) <= {"sum"}, verdicts


def test_the_combine_rule_is_read_among_requests_without_max_tokens() -> None:
    # Sum configured, the server charges max with its own allowance: each candidate's allowance
    # solved for from a whole window predicts its first half right only for the server's rule.
    verdicts = _serve(ChargeRule("max", missing_max_tokens=4096), pace=1.1, seconds=30, defaulted=0.3)
    assert _combines(verdicts) and set(_combines(verdicts)) == {"max"}, verdicts


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_all_three_dimensions_are_read_from_one_mix(seed: int) -> None:
    # Max configured; the server charges sum, one allowance whatever n, 4,096 without a max.
    server = ChargeRule("sum", n_multiplies=False, missing_max_tokens=4096)
    verdicts = _serve(server, pace=1.05, seconds=20, defaulted=0.3, n_choices=(1, 2), configured=MAX, seed=seed)
    shapes = {(v.combine, v.n_multiplies) for v in verdicts} - {(None, None)}
    assert shapes == {("sum", False)} and Verdict("sum", False, 4096) in verdicts, verdicts
    assert all(v.missing_max_tokens is None or v.missing_max_tokens > 4096 * 0.95 for v in verdicts), verdicts


def test_charge_under_each_rule() -> None:
    job = StoredJob("x", 1, "/v1/chat/completions", {}, "m", 700, 200, 500)
    assert (job.charge_under("sum"), job.charge_under("max")) == (700, 500)
    embedding = StoredJob("e", 1, "/v1/embeddings", {}, "m", 42, 42, 0)
    assert embedding.charge_under("max") == 42


def test_charge_under_n_and_a_missing_max() -> None:
    job = StoredJob("x", 1, "/v1/chat/completions", {"n": 3, "max_tokens": 100}, "m", 500, 200, 300)
    assert job.charge_under(ChargeRule("sum", n_multiplies=False)) == 300
    assert job.charge_under(ChargeRule("max", n_multiplies=False)) == 200
    assert job.charge_under(ChargeRule("sum", missing_max_tokens=50)) == 500  # it named its max
    free = StoredJob("y", 1, "/v1/chat/completions", {"n": 2}, "m", 200 + 2 * 16_384, 200, 2 * 16_384)
    assert free.output_defaulted and free.charge_under(ChargeRule("sum", missing_max_tokens=4096)) == 200 + 8192
    assert free.charge_under(ChargeRule("max", False, 4096)) == 4096
    legacy = StoredJob("z", 1, "/v1/completions", {"prompt": "x"}, "m", 17, 1, 16)
    assert not legacy.output_defaulted  # /v1/completions documents its default of 16 tokens


def test_a_model_is_pinned_in_the_table(tmp_path: Path) -> None:
    table = tmp_path / "models.toml"
    table.write_text('[models."gpt-4o"]\ncharge_rule = "max"\ncharge_rule_pinned = true\n')
    specs = load_model_table_from(table)
    assert specs.get("gpt-4o").charge_rule_pinned and specs.get("gpt-4o").rule == MAX
    assert not specs.get("gpt-4o-mini").charge_rule_pinned  # the default: learned
    table.write_text('[models."gpt-4o"]\ncharge_rule_pinned = "yes"\n')
    with pytest.raises(ConfigError, match=r'models.toml:2: models."gpt-4o".charge_rule_pinned: must be true or false'):
        load_model_table_from(table)


def test_work_deferred_under_the_old_rule_is_recalled() -> None:
    # Deferred by a schedule priced under the rule then in force; a new rule makes it due now
    # (the runner re-scores these members in the deferred set) and starts the schedule afresh.
    backlog = Backlog()
    limits = BucketLimits(600, 60_000, 5.0)
    with backlog.waiting("k", limits, 60_000):  # a minute's worth of tokens already waiting here
        first = backlog.schedule("k", limits, [10_000, 10_000], 1.0, [job_ref("b", "j1"), job_ref("b", "j2")])
        later = backlog.defer_for("k", limits, 10_000, patience=1.0, job=job_ref("b", "j3"))
        assert later is not None and later > first > 0
        assert sorted(backlog.recall("k")) == ["b\tj1", "b\tj2", "b\tj3"]
        assert backlog.recall("k") == []  # recalled once
        # not behind the old schedule
        assert backlog.schedule("k", limits, [1_000], 1.0) == pytest.approx(first, abs=0.1)
    assert backlog.recall("unknown") == []


def _learner(pinned: bool) -> tuple[RuleLearner, ModelSpec, list[object]]:
    written: list[object] = []

    def write(call: Any) -> None:  # the fire-and-forget write, not run here
        written.append(call)
        call.close()

    learner = RuleLearner(load_settings({}), aioredis.Redis(), write)
    learner.confirmations = 2
    spec = replace(load_model_table_from().get("gpt-4o-mini"), charge_rule_pinned=pinned)
    return learner, spec, written


def test_a_pinned_model_is_told_of_another_allowance_once_and_keeps_its_own(caplog: pytest.LogCaptureFixture) -> None:
    learner, spec, written = _learner(pinned=True)
    for seen in (2101, 2101, 2218, 2218, 2101, 2101):  # each window's figure differs a little
        learner._confirm("a:gpt-4o-mini", spec, "missing_max_tokens", seen)
    assert learner.rule("a:gpt-4o-mini", spec) == ChargeRule("sum") and not written
    said = [r.getMessage() for r in caplog.records if "seems to charge" in r.getMessage()]
    assert len(said) == 1 and "2101 tokens per choice without max_tokens, not 16384" in said[0], said


def test_an_unpinned_model_follows_each_dimension_after_two_verdicts() -> None:
    learner, spec, written = _learner(pinned=False)
    learner._confirm("a:gpt-4o-mini", spec, "n_multiplies", False)
    assert learner.rule("a:gpt-4o-mini", spec) == ChargeRule("sum") and not written
    learner._confirm("a:gpt-4o-mini", spec, "n_multiplies", False)
    learner._confirm("a:gpt-4o-mini", spec, "missing_max_tokens", 2218)
    learner._confirm("a:gpt-4o-mini", spec, "missing_max_tokens", 2101)  # the same side: the highest is taken
    assert learner.rule("a:gpt-4o-mini", spec) == ChargeRule("sum", False, 2218) and len(written) == 2
    learner.take("a:gpt-4o-mini", [b"max", None, b"2000"])  # what the other workers published
    assert learner.rule("a:gpt-4o-mini", spec) == ChargeRule("max", False, 2000)
