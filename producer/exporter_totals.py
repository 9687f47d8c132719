"""The exporter's counters of stored outcomes, and the day's spend against the budget.

Read from the totals hash (``keys.totals``) that store_outcome.lua adds to in the step that
stores each outcome: they equal what Redis holds exactly, whatever happened to the workers. The
workers' own counters (``ratequeue_jobs_total``, ``ratequeue_cost_usd_total``) read ~2% low over
a run with a killed worker (issue 12: 4,184 completed jobs against 4,272 in Redis): a series is
born with its first event, and a killed worker's last seconds are never scraped. Counters here
start at 0 for every model of the table (``rate()`` sees the first job) and for any other model
an outcome was stored for. Exposed without ``_created`` samples.

``ratequeue_spent_usd{scope="daily"}``: cost stored today (UTC day by Redis's clock), all
models; ``ratequeue_budget_usd{scope="daily"}``: ``RATEQUEUE_DAILY_BUDGET_USD``, absent if unset.
"""

from __future__ import annotations

from collections.abc import Iterable

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ratequeue.jobstore import keys
from ratequeue.jobstore.codec import text

__all__ = ["totals_families"]

_NANO = 1e-9
_OUTCOMES = {"completed": "completed", "failed": "failed"}
_TOKENS = {"prompt_tokens": "prompt", "completion_tokens": "completion"}


def totals_families(
    client: redis.Redis, models: Iterable[str], now: float, daily_budget_usd: float | None
) -> list[CounterMetricFamily | GaugeMetricFamily]:
    fields: dict[tuple[str, str], int] = {}
    for raw_field, value in client.hgetall(keys.totals()).items():
        counter, _, model = text(raw_field).partition(":")
        fields[(counter, model)] = int(value)
    known = sorted({*models, *(m for (c, m) in fields if c in _OUTCOMES or c in _TOKENS or c == "cost_nusd")})
    jobs = CounterMetricFamily("ratequeue_stored_jobs", "Job outcomes stored in Redis, by model and outcome.",
                               labels=["model", "outcome"])
    cost = CounterMetricFamily("ratequeue_stored_cost_usd", "Cost in USD of the outcomes stored in Redis.",
                               labels=["model"])
    tokens = CounterMetricFamily("ratequeue_stored_tokens", "Tokens of the outcomes stored in Redis, by kind.",
                                 labels=["model", "kind"])
    for model in known:
        for counter, outcome in _OUTCOMES.items():
            jobs.add_metric([model, outcome], fields.get((counter, model), 0))
        cost.add_metric([model], fields.get(("cost_nusd", model), 0) * _NANO)
        for counter, kind in _TOKENS.items():
            tokens.add_metric([model, kind], fields.get((counter, model), 0))
    today = str(int(now // 86400))
    spent = GaugeMetricFamily("ratequeue_spent_usd", "Cost in USD of the outcomes stored today (UTC day).",
                              labels=["scope"])
    spent.add_metric(["daily"], fields.get(("cost_nusd_day", today), 0) * _NANO)
    families: list[CounterMetricFamily | GaugeMetricFamily] = [jobs, cost, tokens, spent]
    return families + budget_families(client, today, daily_budget_usd)


def budget_families(client: redis.Redis, today: str, daily_budget_usd: float | None) -> list[GaugeMetricFamily]:
    """The budgets dispatch stops at (ratequeue/jobstore/budgets.py): the day's (the one set at run
    time, else RATEQUEUE_DAILY_BUDGET_USD) and each budgeted batch's, with spend and reservations."""
    day = {text(k): int(v) for k, v in client.hgetall(keys.budget_days()).items() if text(k).startswith(
        ("limit", f"{today}:"))}
    limit = day["limit"] * _NANO if "limit" in day else daily_budget_usd
    reserved = GaugeMetricFamily("ratequeue_budget_reserved_usd", "USD held for calls in flight against the budget.",
                                 labels=["scope"])
    reserved.add_metric(["daily"], day.get(f"{today}:reserved", 0) * _NANO)
    families = [reserved]
    if limit is not None:
        budget = GaugeMetricFamily("ratequeue_budget_usd", "Budget in USD (ratequeue budget --daily, else "
                                   "RATEQUEUE_DAILY_BUDGET_USD).", labels=["scope"])
        budget.add_metric(["daily"], limit)
        families.append(budget)
    batches: dict[str, dict[str, int]] = {}
    for raw_field, value in client.hgetall(keys.budget_batches()).items():
        batch_id, _, kind = text(raw_field).rpartition(":")
        batches.setdefault(batch_id, {})[kind] = int(value)
    per_batch = {kind: GaugeMetricFamily(f"ratequeue_batch_budget{suffix}_usd", help_text, labels=["batch_id"])
                 for kind, suffix, help_text in (("limit", "", "A batch's budget in USD."),
                                                 ("spent", "_spent", "A budgeted batch's spend in USD."),
                                                 ("reserved", "_reserved", "USD held for a batch's calls in flight."))}
    budgeted = sorted(b for b, fields in batches.items() if "limit" in fields)
    pipe = client.pipeline(transaction=False)
    for batch_id in budgeted:
        pipe.exists(keys.batch_meta(batch_id))
    for batch_id, exists in zip(budgeted, pipe.execute(), strict=True):
        if exists:  # one series per budgeted batch still in Redis (ended ones too, until their retention)
            for kind, family in per_batch.items():
                family.add_metric([batch_id], batches[batch_id].get(kind, 0) * _NANO)
    return [*families, *per_batch.values()]
