"""Rows "Workers" and "Redis": latency, slots, chunk redeliveries, Redis latency, errors and memory.

Panels on worker or Redis figures without a model label are deployment-wide (their descriptions say so)."""

from __future__ import annotations

from rq_dashboard.panels import Section, graph, single
from rq_dashboard.promql import PAIR, RI, quantiles


def workers_row() -> Section:
    return (
        Section("Workers: latency, slots, chunks")
        .with_panel(graph("Upstream latency", "s", quantiles("ratequeue_upstream_latency_seconds", "model", PAIR),
                          "Time from sending a request to its full answer, per model.", w=8))
        .with_panel(graph("Wait for capacity", "s", quantiles("ratequeue_capacity_wait_seconds", "model", PAIR),
                          "Time a request waited at the shared bucket before it was sent. Jobs that would wait "
                          "longer are deferred instead (Deferrals panel) and never observed here.", w=8))
        .with_panel(graph("In-flight requests", "short", [
            (f"sum by (model) (ratequeue_in_flight_requests{{{PAIR}}})", "{{model}}"),
        ], "Upstream calls sent and not yet answered, over all workers.", w=8, zero=True))
        .with_panel(graph("Busy slots per worker", "short", [
            ("sum by (instance) (ratequeue_worker_busy_slots)", "{{instance}} busy"),
            ("sum(ratequeue_worker_slots)", "all workers: slots"),
        ], "Deployment-wide: chunk slots in use per worker, against all slots. Busy = slots while chunks wait "
           "means workers are the bottleneck: add workers.", w=8))
        .with_panel(single("Workers alive", "short", [
            ("max(ratequeue_workers_alive)", "heartbeat"),
            ('sum(up{job="ratequeue-worker"}) or vector(0)', "scraped"),
        ], "Deployment-wide: workers with a recent heartbeat in Redis, and worker targets Prometheus scrapes "
           "(listed by the exporter's /sd/workers, a dead worker for 1 h).", w=4))
        .with_panel(graph("Chunks redelivered, dead-lettered, reclaimed", "short", [
            (f"sum(rate(ratequeue_chunks_redelivered_total[{RI}])) * 60", "redelivered"),
            (f"sum(rate(ratequeue_dead_lettered_chunks_total[{RI}])) * 60", "dead-lettered"),
            (f"sum(rate(ratequeue_chunks_reclaimed_total[{RI}])) * 60", "reclaimed from dead workers"),
        ], "Deployment-wide, chunks per minute: delivered again, failed for good (their jobs fail as "
           "chunk_failed), taken back from workers that stopped heartbeating.", w=12, zero=True))
    )


def redis_row() -> Section:
    used, limit = "max(ratequeue_redis_memory_used_bytes)", "max(ratequeue_redis_memory_max_bytes > 0)"
    return (
        Section("Redis: latency, errors, memory, held answers")
        .with_panel(graph("Redis command latency (workers)", "s",
                          quantiles("ratequeue_redis_command_seconds", "operation", "", (0.5, 0.99)),
                          "Deployment-wide: time of the workers' Redis calls by operation.", w=8))
        .with_panel(graph("Redis errors per minute (workers)", "short", [
            (f"sum by (operation) (rate(ratequeue_redis_errors_total[{RI}])) * 60", "{{operation}}"),
        ], "Deployment-wide: workers' Redis calls that failed, by operation.", w=8, zero=True))
        .with_panel(single("Redis reachable", "short", [("max(ratequeue_redis_up)", "redis")],
                           "Deployment-wide: 1 when the exporter could read Redis at its last scrape.", w=4))
        .with_panel(single("Paid answers held by workers", "short",
                           [("sum(ratequeue_outcomes_held) or vector(0)", "held")],
                           "Deployment-wide: answers paid for that workers keep in memory because Redis cannot "
                           "take them (down, loading or full); lost if a worker stops meanwhile.", w=4, red_above=1))
        .with_panel(graph("Redis memory used vs maxmemory", "bytes", [(used, "used"), (limit, "maxmemory")],
                          "Deployment-wide. At maxmemory (policy noeviction) Redis refuses every write: submits "
                          "fail, workers hold answers. No maxmemory line: none is set."))
        .with_panel(single("Redis memory (share of maxmemory)", "percentunit", [(f"{used} / {limit}", "used")],
                           "Deployment-wide. Alerts: 85% for 5 min (warning), 95% for 1 min (critical). Free "
                           "memory with `ratequeue delete` or RATEQUEUE_RETENTION_SECONDS, or raise maxmemory.",
                           w=12, red_above=0.95, orange_above=0.85))
    )
