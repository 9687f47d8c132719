"""Which charge rule does the server apply? Read it off ``x-ratelimit-remaining-tokens``.

Public sources disagree: OpenAI's platform docs charge max(prompt, n x max_tokens), its help
centre and Azure prompt + n x max_tokens. The server's token bucket refills at limit/60 per
second, so between two responses it charged

    C_server = R_first - R_last + limit/60 x (t_last - t_first)

for the requests it received in between. Summing what each rule would have charged for the
requests answered in that window tells which rule the server uses. Windows in which the
server's bucket was (nearly) full are skipped: refill beyond its capacity is lost and the
arithmetic no longer holds. Responses arrive out of order, so a window is long (10 s) and needs
enough requests for the edges to average out.
"""

from __future__ import annotations

from dataclasses import dataclass

_FULL = 0.98  # remaining at or above this share of the limit: the bucket may have been clipped
_CLEAR = 0.5  # the better rule must explain the server's charge this much better than the other


@dataclass
class _Window:
    started: float
    first_remaining: int
    limit: int
    sum_total: int = 0
    max_total: int = 0
    requests: int = 0
    clipped: bool = False


class ChargeRuleCheck:
    """Per (account, model) windows of responses; ``observe`` returns a verdict when one closes."""

    def __init__(self, window: float = 10.0, min_requests: int = 20) -> None:
        self._window = window
        self._min_requests = min_requests
        self._open: dict[str, _Window] = {}

    def observe(
        self, pair: str, now: float, remaining: int | None, limit: int | None, sum_charge: int, max_charge: int
    ) -> str | None:
        """Account one answered request; "sum" or "max" when a window closes with a clear answer."""
        if remaining is None or limit is None:
            return None
        win = self._open.get(pair)
        if win is None or win.limit != limit:
            self._open[pair] = _Window(now, remaining, limit, clipped=remaining >= _FULL * limit)
            return None
        win.sum_total += sum_charge
        win.max_total += max_charge
        win.requests += 1
        win.clipped = win.clipped or remaining >= _FULL * limit
        if now - win.started < self._window:
            return None
        self._open[pair] = _Window(now, remaining, limit, clipped=remaining >= _FULL * limit)
        if win.clipped or win.requests < self._min_requests or win.sum_total == win.max_total:
            return None
        server = win.first_remaining - remaining + limit / 60.0 * (now - win.started)
        return judge(server, win.sum_total, win.max_total)


def judge(server: float, sum_total: int, max_total: int) -> str | None:
    """The rule whose total is clearly nearer the server's charge, or None when unclear."""
    gap = abs(sum_total - max_total)
    sum_off, max_off = abs(server - sum_total), abs(server - max_total)
    if min(sum_off, max_off) > gap * (1 - _CLEAR) or abs(sum_off - max_off) < gap * _CLEAR:
        return None
    return "sum" if sum_off < max_off else "max"
