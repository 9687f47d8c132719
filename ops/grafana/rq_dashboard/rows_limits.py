"""Rows "Limits" and "429s, retries, failures": accepted work against the limits, what was refused, and
the server's own view of what is left next to our bucket."""

from __future__ import annotations

from rq_dashboard.panels import Section, graph
from rq_dashboard.promql import MODEL, PAIR, bucket_share, limit, per_minute

ACCEPTED = per_minute("ratequeue_accepted_requests_total", "account, model")
CHARGED = per_minute("ratequeue_charged_tokens_total", "account, model")
PAIR_LEGEND = "{{model}} {{account}}"


def _left(what: str) -> list[tuple[str, str]]:
    """The server's x-ratelimit-remaining-* (last seen by any worker) against our bucket's level."""
    server = f"max by (account, model) (ratequeue_server_remaining_{what}{{{PAIR}}})"
    ours = f"max by (account, model) (ratequeue_bucket_level_{what}{{{PAIR}}})"
    return [(server, f"{PAIR_LEGEND} server"), (ours, f"{PAIR_LEGEND} our bucket"),
            (f"{server} - on (account, model) {ours}", f"{PAIR_LEGEND} drift (server - ours)")]


def limits_row() -> Section:
    return (
        Section("Limits: are we using what we pay for?")
        .with_panel(graph("Accepted requests per minute vs RPM limit", "reqpm", [
            (ACCEPTED, f"{PAIR_LEGEND} accepted"),
            (f"max by (account, model, source) (ratequeue_limit_requests_per_minute{{{PAIR}}})",
             f"{PAIR_LEGEND} limit ({{{{source}}}})"),
        ], "Requests the server accepted (not refused by a rate limit) per minute, against the limit: configured "
           "(model table) and learned (x-ratelimit-limit-requests). Refused requests: the 429 panel.", zero=True))
        .with_panel(graph("Charged tokens per minute vs TPM limit", "short", [
            (CHARGED, f"{PAIR_LEGEND} charged"),
            (per_minute("ratequeue_tokens_total", "account, model", extra='kind=~"prompt|completion"'),
             f"{PAIR_LEGEND} used"),
            (f"max by (account, model, source) (ratequeue_limit_tokens_per_minute{{{PAIR}}})",
             f"{PAIR_LEGEND} limit ({{{{source}}}})"),
        ], "Tokens per minute. Charged: what the limit counts for accepted requests (prompt + max output, "
           "reserved at send). Used: prompt + completion tokens the server reported.", zero=True))
        .with_panel(graph("Limit utilisation (accepted work)", "percentunit", [
            (f"{ACCEPTED} / on (account, model) {limit('requests')}", f"{PAIR_LEGEND} requests"),
            (f"{CHARGED} / on (account, model) {limit('tokens')}", f"{PAIR_LEGEND} tokens"),
        ], "Accepted work over the limit in force (learned, else configured); refused requests do not count. "
           "The higher of the two lines is the binding limit. Low while jobs wait: see Deferrals, busy slots "
           "and the server-vs-bucket panels (another client of the account may be using the limit).",
            zero=True, ratio=True))
        .with_panel(graph("Refused requests (429) per minute by type", "reqpm", [
            (per_minute("ratequeue_rate_limited_total", "account, model, type"), f"{PAIR_LEGEND} {{{{type}}}}"),
        ], "429 answers per minute. requests/tokens: a limit was hit (should stay near 0; many: another client "
           "uses the account's limit, or the configured limit is above the account's); quota: insufficient_quota "
           "(the pair is parked); too_large: never fits the TPM; long_wait: a long Retry-After.", zero=True))
        .with_panel(graph("Requests left: server vs our bucket", "short", _left("requests"),
                          "x-ratelimit-remaining-requests last seen by a worker against our shared bucket's level. "
                          "A server figure well below ours (negative drift): someone else uses the limit.", w=8))
        .with_panel(graph("Tokens left: server vs our bucket", "short", _left("tokens"),
                          "x-ratelimit-remaining-tokens last seen by a worker against our shared bucket's level.",
                          w=8))
        .with_panel(graph("Bucket level (share of capacity)", "percentunit", [
            (bucket_share("requests"), f"{PAIR_LEGEND} requests"),
            (bucket_share("tokens"), f"{PAIR_LEGEND} tokens"),
        ], "Level of the shared buckets (1 = full, idle; below 0 = reservations booked ahead).", w=8))
    )


def errors_row() -> Section:
    return (
        Section("Retries and failures")
        .with_panel(graph("Retries by reason", "short", [
            (per_minute("ratequeue_retries_total", "model, reason"), "{{model}} {{reason}}"),
        ], "Upstream attempts that will be retried, per minute.", w=8, zero=True))
        .with_panel(graph("Failed jobs by code", "short", [
            (per_minute("ratequeue_job_failures_total", "model, code", labels=MODEL), "{{model}} {{code}}"),
        ], "Jobs stored as errors per minute, by error code.", w=8, zero=True))
        .with_panel(graph("Upstream 5xx and transport failures", "reqpm", [
            (per_minute("ratequeue_upstream_requests_total", "model, status_class", extra='status_class=~"5xx|none"'),
             "{{model}} {{status_class}}"),
        ], "Upstream answers per minute with a 5xx status, or none at all (timeout, connection error).",
            w=8, zero=True))
    )
