"""The live progress bar of `ratequeue run`: jobs done, req/min, tok/min and ETA."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ratequeue.producer.collect import FINAL_STATUSES

WINDOW = 10.0  # seconds of history the rates are measured over


class RateMeter:
    """Rates of done jobs and tokens over the last ``WINDOW`` seconds."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int, int]] = deque()

    def add(self, now: float, done: int, tokens: int) -> None:
        self._samples.append((now, done, tokens))
        while len(self._samples) > 2 and now - self._samples[0][0] > WINDOW:
            self._samples.popleft()

    def per_minute(self) -> tuple[float, float]:
        """(requests per minute, tokens per minute); zeros until two samples exist."""
        if len(self._samples) < 2:
            return 0.0, 0.0
        (t0, d0, k0), (t1, d1, k1) = self._samples[0], self._samples[-1]
        span = max(t1 - t0, 1e-6)
        return (d1 - d0) / span * 60, (k1 - k0) / span * 60


def _eta(remaining: int, req_per_min: float) -> str:
    if remaining <= 0:
        return "0s"
    if req_per_min <= 0:
        return "?"
    seconds = int(remaining / req_per_min * 60)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def follow(status: Callable[[], dict[str, Any]], console: Console | None = None, poll: float = 0.5) -> dict[str, Any]:
    """Show progress until the batch reaches a final status; returns the final Batch object."""
    console = console or Console(stderr=True)
    meter = RateMeter()
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rates]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("jobs", total=None, rates="")
        while True:
            batch = status()
            counts = batch["request_counts"]
            done = counts["completed"] + counts["failed"]
            tokens = batch["usage"]["prompt_tokens"] + batch["usage"]["completion_tokens"]
            meter.add(time.monotonic(), done, tokens)
            rpm, tpm = meter.per_minute()
            rates = (
                f"{rpm:,.0f} req/min  {tpm:,.0f} tok/min  ETA {_eta(counts['total'] - done, rpm)}  "
                f"failed {counts['failed']}"
            )
            progress.update(task, total=counts["total"] or None, completed=done, rates=rates)
            if batch["status"] in FINAL_STATUSES:
                return batch
            time.sleep(poll)
