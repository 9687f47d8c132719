"""What the retry loops that wait out Redis share: a warning that an outage does not flood the log with."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from tenacity import RetryCallState


def warn_every(log: logging.Logger, seconds: float, message: str) -> Callable[[RetryCallState], None]:
    """A tenacity ``before_sleep`` that logs ``message % error`` at most once per ``seconds``:
    one line per half minute of an outage, not one per try."""
    last: list[float] = []

    def before_sleep(state: RetryCallState) -> None:
        now = time.monotonic()
        if not last or now - last[0] > seconds:
            last[:] = [now]
            exc = state.outcome.exception() if state.outcome is not None else None
            log.warning(message, exc)

    return before_sleep
