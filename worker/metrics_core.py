"""What every worker metric module shares: cached label children, bounded free-form label values,
and the series a (model, account) pair gets at zero.

Every metric function of the worker is cheap (a dict lookup and an add) and never raises: a
metric must never fail a job (:func:`never_raises`). ``*_created`` series are switched off here,
for every process that imports the worker's metrics: about a third of a worker's series were
``_created`` samples no panel or rule reads (issue 12, finding 10).
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from collections.abc import Callable
from typing import Any, ParamSpec

from prometheus_client import disable_created_metrics

log = logging.getLogger("ratequeue.worker.metrics")
P = ParamSpec("P")

disable_created_metrics()

PAIR = ("model", "account")
_LABEL_VALUE = re.compile(r"^[a-z0-9_]{1,48}$")
MAX_VALUES = 40  # distinct free-form values per label before the rest become "other"

_lock = threading.Lock()
_seen_pairs: set[tuple[str, str]] = set()
_free_values: dict[str, set[str]] = {}
_children: dict[tuple[Any, tuple[str, ...]], Any] = {}
_pair_initializers: list[Callable[[str, str], None]] = []


def labels(metric: Any, *values: str) -> Any:
    """``metric.labels(*values)``, remembered: labels() validates and locks on every call, which
    cost ~5% of a worker's CPU at 1,000 jobs/s (a dict lookup is atomic under the GIL)."""
    key = (metric, values)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*values)
    return child


def bounded(label: str, value: str) -> str:
    """`value` if it is a short snake_case word and the label has room for it, else ``other``."""
    value = value.lower()
    if not _LABEL_VALUE.match(value):
        return "other"
    with _lock:
        seen = _free_values.setdefault(label, set())
        if value in seen:
            return value
        if len(seen) >= MAX_VALUES:
            return "other"
        seen.add(value)
        return value


def on_new_pair(initializer: Callable[[str, str], None]) -> Callable[[str, str], None]:
    """Register a function that creates a module's per-pair series at zero (a decorator)."""
    _pair_initializers.append(initializer)
    return initializer


def pair(model: str, account: str) -> None:
    """Create at zero every series a (model, account) needs for ratios and rates, once per process:
    at worker start for the configured pairs, at first sight for any other, so that "no 429s yet"
    reads 0 rather than "no data" and a counter's first increment is never lost to ``rate()``."""
    with _lock:
        if (model, account) in _seen_pairs:
            return
        _seen_pairs.add((model, account))
    for initializer in _pair_initializers:
        initializer(model, account)


def never_raises(func: Callable[P, None]) -> Callable[P, None]:
    """Log and swallow any exception of a metric function: a metric must never fail a job."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            func(*args, **kwargs)
        except Exception:  # pragma: no cover - defensive
            log.exception("metrics: %s failed", func.__name__)

    return wrapper


def status_class(status: int) -> str:
    """``2xx``, ``4xx``, ``5xx``... for an HTTP status; ``none`` for a transport failure (status 0).
    A 429 is ``4xx`` (its type is in ``ratequeue_rate_limited_total``)."""
    return f"{status // 100}xx" if 100 <= status < 600 else "none"
