"""The live progress of `ratequeue run`: a batch line (done, failed, ETA) and one line per model
(done / in flight / waiting, the measured share of its limits, its ETA, or paused and why).

On a terminal the lines are redrawn in place; written to a file or a pipe they are printed every
``LOG_EVERY`` seconds and whenever a model is paused or resumes, so a log shows why a run waits.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from ratequeue.producer.collect import FINAL_STATUSES
from ratequeue.producer.model_progress import ModelCounts, ModelLimits, batch_eta, capped_share, model_eta

WINDOW = 10.0  # seconds of history the rates are measured over
LOG_EVERY = 10.0  # seconds between progress lines when the output is not a terminal
BURST = "burst: the bucket's saved capacity"
LimitsOf = Callable[[str], "ModelLimits | None"]


class RateMeter:
    """Rates of done jobs and tokens over the last ``WINDOW`` seconds."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int, int]] = deque()

    def add(self, now: float, done: int, tokens: int) -> None:
        self._samples.append((now, done, tokens))
        while len(self._samples) > 2 and now - self._samples[0][0] > WINDOW:
            self._samples.popleft()

    @property
    def seconds(self) -> float:
        """The span the rates are measured over."""
        return self._samples[-1][0] - self._samples[0][0] if self._samples else 0.0

    def per_minute(self) -> tuple[float, float]:
        """(requests per minute, tokens per minute); zeros until two samples exist."""
        if len(self._samples) < 2:
            return 0.0, 0.0
        (t0, d0, k0), (t1, d1, k1) = self._samples[0], self._samples[-1]
        span = max(t1 - t0, 1e-6)
        return (d1 - d0) / span * 60, (k1 - k0) / span * 60


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    whole = int(seconds + 0.5)
    return f"{whole // 60}m{whole % 60:02d}s" if whole >= 60 else f"{whole}s"


def _share(rate: float, limit: float, unit: str) -> str:
    """" (97% of RPM)", capped at 100% with the burst explained."""
    if limit <= 0:
        return ""
    shown, over = capped_share(rate / limit)
    return f" ({shown} of {unit}; {BURST})" if over else f" ({shown} of {unit})"


class ProgressView:
    """The progress lines, from successive Batch objects (with their ``models`` field).

    ``limits_of(model)`` gives a model's limits (None: unknown); without it the ETA comes from
    the measured rate alone."""

    def __init__(self, limits_of: LimitsOf | None = None) -> None:
        self._limits_of = limits_of
        self._meters: dict[str, RateMeter] = {}
        self._limits: dict[str, ModelLimits | None] = {}
        self.eta: float | None = None
        self.paced_by: dict[str, str] = {}  # model -> what set its ETA (see model_eta)
        self.paused: frozenset[str] = frozenset()

    def update(self, batch: dict[str, Any], now: float) -> list[str]:
        """Take a new Batch object; returns the lines (the batch's, then one per model)."""
        etas: dict[str, float | None] = {}
        lines = []
        for model, raw in batch.get("models", {}).items():
            counts = ModelCounts.from_json(raw)
            meter = self._meters.setdefault(model, RateMeter())
            meter.add(now, counts.done, counts.charge_done)
            limits = self._limits_for(model)
            rpm, tpm = meter.per_minute()
            etas[model], why = model_eta(counts, limits, rpm, meter.seconds)
            self.paced_by[model] = why
            lines.append(_model_line(model, counts, limits, rpm, tpm, etas[model], why))
        self.paused = frozenset(m for m, raw in batch.get("models", {}).items() if raw.get("paused"))
        # no per-model counters (a batch stored by an older version, or still empty): unknown
        self.eta = 0.0 if batch["status"] in FINAL_STATUSES else batch_eta(etas) if etas else None
        counts = batch["request_counts"]
        head = (f"{batch['id']}: {counts['completed'] + counts['failed']}/{counts['total']} done, "
                f"{counts['failed']} failed, ETA {format_eta(self.eta)}")
        if len(etas) > 1 and self.eta:
            head += f" (set by {max(etas, key=lambda m: etas[m] or 0.0)})"
        if (budget := batch.get("budget")) and budget.get("paused"):  # ratequeue/jobstore/budgets.py
            head += f" · paused: {budget_text(budget)}"
            self.paused |= {"budget"}
        return [head, *lines]

    def _limits_for(self, model: str) -> ModelLimits | None:
        known = self._limits.get(model)
        if self._limits_of is not None and (known is None or known.source != "learned"):
            known = self._limits[model] = self._limits_of(model)  # a worker may learn them meanwhile
        return known


def budget_text(budget: dict[str, Any]) -> str:
    """ "budget, $0.0412 spent + $0.0013 reserved of $0.0500" (the limit: the batch's, or the day's)."""
    figures = budget.get("daily") or budget  # a daily budget's stop: the day's figures
    limit = figures.get("limit_usd")
    of = f" of ${limit:,.4f}" if limit is not None else ""
    return f"{budget['paused']}, ${figures['spent_usd']:,.4f} spent + ${figures['reserved_usd']:,.4f} reserved{of}"


def _model_line(model: str, counts: ModelCounts, limits: ModelLimits | None, rpm: float, tpm: float,
                eta: float | None, why: str) -> str:
    states = f"{counts.done} done · {counts.in_flight} in flight · {counts.waiting} waiting"
    if counts.paused is not None:
        return f"{model}: paused, {counts.paused.message} · {states}"
    rates = (f"{rpm:,.0f} req/min{_share(rpm, limits.rpm, 'RPM') if limits else ''} · "
             f"{tpm:,.0f} tok/min{_share(tpm, limits.tpm, 'TPM') if limits else ''}")
    paced = {"RPM": " (at RPM)", "TPM": " (at TPM)", "measured": " (measured rate)"}.get(why, "")
    return f"{model}: {states} · {rates} · ETA {format_eta(eta)}{paced}"


def follow(
    status: Callable[[], dict[str, Any]],
    console: Console | None = None,
    poll: float = 0.5,
    limits_of: LimitsOf | None = None,
) -> dict[str, Any]:
    """Show progress until the batch reaches a final status; returns the final Batch object.

    ``limits_of(model)``: the model's limits for the ETA (``Client.model_limits``)."""
    console = console or Console(stderr=True)
    view = ProgressView(limits_of)
    if not console.is_terminal:
        return _follow_as_log(status, console, poll, view)
    with Live(console=console, auto_refresh=False, transient=False) as live:
        while True:
            batch = status()
            lines = view.update(batch, time.monotonic())
            counts = batch["request_counts"]
            head = Table.grid(padding=(0, 1))  # a bar of its own width: a full-width one hides the lines below
            head.add_row(ProgressBar(total=counts["total"] or None, completed=counts["completed"] + counts["failed"],
                                     width=30), Text(lines[0]))
            live.update(Group(head, *(Text(f"  {line}") for line in lines[1:])), refresh=True)
            if batch["status"] in FINAL_STATUSES:
                return batch
            time.sleep(poll)


def _follow_as_log(status: Callable[[], dict[str, Any]], console: Console, poll: float,
                   view: ProgressView) -> dict[str, Any]:
    printed_at, paused = float("-inf"), frozenset[str]()
    while True:
        batch = status()
        now = time.monotonic()
        lines = view.update(batch, now)
        final = batch["status"] in FINAL_STATUSES
        if final or view.paused != paused or now - printed_at >= LOG_EVERY:
            console.print("\n  ".join(lines), markup=False, highlight=False, soft_wrap=True)
            printed_at, paused = now, view.paused
        if final:
            return batch
        time.sleep(poll)
