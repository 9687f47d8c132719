"""Row "Cost and tokens": spend (from Redis' totals, exact) against the daily budget, tokens, estimates."""

from __future__ import annotations

from rq_dashboard.panels import Section, graph, listing, single
from rq_dashboard.promql import MODEL, RI, per_minute, quantiles


def cost_row() -> Section:
    return (
        Section("Cost and tokens")
        .with_panel(graph("Cost per hour", "currencyUSD", [
            (f"sum by (model) (rate(ratequeue_stored_cost_usd_total{{{MODEL}}}[{RI}])) * 3600", "{{model}}"),
        ], "Spend rate in USD per hour of the stored outcomes, priced from the model table.", w=8))
        .with_panel(single("Spend today vs daily budget", "currencyUSD", [
            ('max(ratequeue_spent_usd{scope="daily"})', "spent today (UTC)"),
            ('max(ratequeue_budget_usd{scope="daily"})', "budget"),
        ], "Deployment-wide: cost stored since 00:00 UTC, and RATEQUEUE_DAILY_BUDGET_USD (no budget figure: the "
           "setting is unset). The budget alerts fire at 80% and 100%.", w=4))
        .with_panel(listing("Cost per batch (newest 20)", "currencyUSD",
                            "max by (batch_id) (ratequeue_recent_batch_cost_usd)",
                            "Deployment-wide: spend of each of the 20 newest batches; older ones: "
                            "`ratequeue status BATCH_ID`.", w=12))
        .with_panel(graph("Tokens per minute by kind", "short", [
            (per_minute("ratequeue_stored_tokens_total", "model, kind", labels=MODEL), "{{model}} {{kind}}"),
        ], "Prompt and completion tokens of the stored outcomes, as the server reported them.", w=8))
        .with_panel(graph("Prompt token estimate error (absolute)", "short",
                          quantiles("ratequeue_token_estimate_abs_error_tokens", "model", MODEL, (0.5, 0.95)),
                          "|our prompt token count - the server's| per request, per model (0: exact).", w=8))
        .with_panel(graph("Prompt token estimates by direction", "short", [
            (per_minute("ratequeue_token_estimates_total", "model, direction", labels=MODEL),
             "{{model}} {{direction}}"),
        ], "Estimates per minute that were over (we reserved more), under or exact.", w=8, zero=True))
    )
