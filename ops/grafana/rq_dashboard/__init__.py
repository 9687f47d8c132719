"""The pieces of ratequeue's Grafana dashboard: PromQL helpers, panel builders, one module per row.

ops/grafana/dashboard.py assembles them and writes ops/grafana/dashboards/ratequeue.json."""
