"""PromQL fragments the panels share: the filters, the limit in force, quantiles, the stalled code.

Every selector of a metric that carries a `model` (and `account`) label takes the dashboard's filters, so
the `$account` / `$model` variables apply wherever a metric can be filtered (tests/test_ops_rules.py checks
it). Gauges the exporter publishes are read with ``max``: two exporters publish the same values, never a sum.
"""

from __future__ import annotations

PAIR = 'account=~"$account", model=~"$model"'
MODEL = 'model=~"$model"'
RI = "$__rate_interval"

# ratequeue_stalled{reason} as one number per model, so that a stat panel can map it to a text
# ("stalled (parked)") in place of an ETA: the most fundamental reason wins (the lowest code).
STALL_CODES = {"redis_full": -4, "no_workers": -3, "paused": -2, "parked": -1}


def per_minute(metric: str, by: str, labels: str = PAIR, extra: str = "") -> str:
    """Rate of a counter per minute, summed by `by` (e.g. "account, model")."""
    selector = f"{extra}, {labels}" if extra else labels
    return f"sum by ({by}) (rate({metric}{{{selector}}}[{RI}])) * 60"


def limit(what: str) -> str:
    """The limit in force per (account, model): the server's (learned) where known, else configured."""
    metric = f"ratequeue_limit_{what}_per_minute"
    return (f'(max by (account, model) ({metric}{{source="learned", {PAIR}}})'
            f' or max by (account, model) ({metric}{{source="configured", {PAIR}}}))')


def bucket_share(what: str) -> str:
    """Bucket level over capacity per (account, model)."""
    return (f"max by (account, model) (ratequeue_bucket_level_{what}{{{PAIR}}}) / on (account, model) "
            f"max by (account, model) (ratequeue_bucket_capacity_{what}{{{PAIR}}})")


def quantiles(
    metric: str, by: str, labels: str, levels: tuple[float, ...] = (0.5, 0.95, 0.99)
) -> list[tuple[str, str]]:
    """histogram_quantile targets, one series per value of `by` (never all models under one legend)."""
    legend = " ".join("{{" + label.strip() + "}}" for label in by.split(","))
    selector = f"{{{labels}}}" if labels else ""
    return [
        (f"histogram_quantile({p}, sum by (le, {by}) (rate({metric}_bucket{selector}[{RI}])))",
         f"{legend} p{round(p * 100)}")
        for p in levels
    ]


def eta_or_stalled() -> str:
    """Per model: a negative stall code while nothing can proceed, else the ETA in seconds."""
    stalled = " or ".join(f'{code} * (ratequeue_stalled{{reason="{reason}", {MODEL}}} == 1)'
                          for reason, code in STALL_CODES.items())
    return f"min by (model) ({stalled}) or max by (model) (ratequeue_eta_seconds{{{MODEL}}})"


def or_zero(expr: str) -> str:
    """`expr`, or a single 0 labelled model="(no workers)" when no worker published a series in range
    (the worker-fed series exist from each worker's start, so an empty result means no worker)."""
    return f'({expr}) or on () label_replace(vector(0), "model", "(no workers)", "", "")'
