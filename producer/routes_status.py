"""``ratequeue status``'s view of the models served by several routes (issue 13 part 4): for each
route, how many runs chose it (``keys.route_use``, counted by worker/routechoice.py), its share of
them, and whether its pair is parked. A part of the overview (producer/operate.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import redis

from ratequeue.config.accounts import AccountTable, Route
from ratequeue.jobstore import keys
from ratequeue.jobstore.codec import text


def route_use(client: redis.Redis, accounts: AccountTable, parked: Mapping[str, object]) -> dict[str, Any]:
    """model -> route name -> {routed, share, parked} for each model [routes] gives several routes."""
    shown: dict[str, Any] = {}
    for model in accounts.routed_models():
        routes = accounts.routes_for(model)
        if len(routes) < 2:
            continue
        use = {text(k): text(v) for k, v in client.hgetall(keys.route_use(model)).items()}
        counts = {r.name: int(use.get(r.name, 0)) for r in routes}
        total = sum(counts.values())
        shown[model] = {
            r.name: {"routed": counts[r.name], "share": round(counts[r.name] / total, 4) if total else 0.0,
                     "parked": _pair(r, use.get(keys.route_pair_field(r.name))) in parked}
            for r in routes}
    return shown


def _pair(route: Route, seen: str | None) -> str:
    """The route's pair as the workers recorded it, else as the configuration names it (the same: bucket ids never
    depend on a key)."""
    return seen or keys.pair_field(*route.pair)
