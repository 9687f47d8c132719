"""Row "Queues": what is left per model, when it will be done (or why it is stalled), how long jobs take."""

from __future__ import annotations

from rq_dashboard.panels import Section, graph, listing, single
from rq_dashboard.promql import MODEL, PAIR, STALL_CODES, eta_or_stalled, per_minute, quantiles


def queue_row() -> Section:
    return (
        Section("Queues: what is left, when will it be done?")
        .with_panel(single("ETA per model", "s", [(eta_or_stalled(), "{{model}}")],
                           "Time to finish the pending jobs at the binding limit (charged tokens and requests "
                           "left over the limit in force times the share): from ratequeue_eta_seconds. "
                           "\"stalled (reason)\" while the model has pending jobs and nothing can proceed "
                           "(parked, paused, no_workers, redis_full: ratequeue_stalled).",
                           w=8, texts={code: (f"stalled ({reason})", "red") for reason, code in STALL_CODES.items()},
                           no_value="no pending jobs"))
        .with_panel(graph("Jobs waiting per model", "short", [
            (f"max by (model) (ratequeue_pending_jobs{{{MODEL}}})", "{{model}} pending"),
            (f"max by (model) (ratequeue_deferred_jobs{{{MODEL}}})", "{{model}} deferred"),
        ], "Jobs of unfinished batches without an outcome yet, and those of them deferred (until capacity, "
           "a retry, or a parked pair's probe).", w=8))
        .with_panel(graph("Oldest waiting job", "s", [
            (f"max by (model) (ratequeue_oldest_pending_job_age_seconds{{{MODEL}}})", "{{model}}"),
        ], "Age of the oldest job without an outcome, per model (since its submission).", w=8))
        .with_panel(graph("Job duration, submission to outcome", "s",
                          quantiles("ratequeue_job_duration_seconds", "model", PAIR),
                          "From a job's submission to its stored outcome (waiting, deferrals and retries "
                          "included), per model.", w=8))
        .with_panel(graph("Jobs stored per minute", "short", [
            (per_minute("ratequeue_stored_jobs_total", "model, outcome", labels=MODEL), "{{model}} {{outcome}}"),
        ], "Outcomes stored in Redis per minute (counted in Redis with each outcome: exact, and kept when a "
           "worker is killed).", w=8))
        .with_panel(graph("Deferrals per minute", "short", [
            (per_minute("ratequeue_deferrals_total", "model, reason"), "{{model}} {{reason}}"),
        ], "Jobs moved to the deferred set per minute: capacity (none soon: the wait-for-capacity quantiles "
           "do not see these), backoff (long retry wait) or parked (pair paused).", w=8, zero=True))
        .with_panel(graph("Chunk messages", "short", [
            ("max by (queue) (ratequeue_queue_depth_messages)", "{{queue}} waiting"),
            ("max(ratequeue_unacked_messages)", "delivered, unacked"),
        ], "Deployment-wide (chunks carry no model label): chunk messages waiting for a worker slot, and "
           "delivered but not yet acked.", w=8))
        .with_panel(listing("Batches by status", "short", "max by (status) (ratequeue_batches)",
                            "Deployment-wide: batches in Redis by status.", w=4))
        .with_panel(single("Parked pairs", "short", [
            (f"count(max by (account, model) (ratequeue_pair_parked_since_timestamp_seconds{{{PAIR}}})) "
             "or vector(0)", "parked"),
        ], "(account, model) pairs paused (quota spent, key refused, long Retry-After).", w=3, red_above=1))
        .with_panel(listing("Parked pairs (since the first park)", "dateTimeAsIso",
                            "max by (account, model, reason) "
                            f"(ratequeue_pair_parked_since_timestamp_seconds{{{PAIR}}}) * 1000",
                            "Which pairs are parked, why, and since when (the first park: failed probes do not "
                            "move it). `ratequeue resume` unparks.", w=9))
    )
