"""Warning about ``RATEQUEUE_*`` variables that are no setting: a misspelt one (``RATEQUEUE_REDIS_ULR``)
would otherwise be ignored without a word, and the default used instead."""

from __future__ import annotations

import difflib
import logging
from collections.abc import Collection, Mapping

__all__ = ["warn_unknown"]

log = logging.getLogger("ratequeue.config.settings")

_PREFIX = "RATEQUEUE_"
_OVERRIDE_PREFIX = "RATEQUEUE_MODEL_"  # per-model overrides: checked where they are read
# RATEQUEUE_* variables that are not settings but are read by someone: the CLI (DEBUG), the test
# suite and benchmarks, docker-compose and Grafana's provisioning. They must not be warned about.
_NOT_SETTINGS = frozenset({
    "RATEQUEUE_DEBUG", "RATEQUEUE_TEST_DB", "RATEQUEUE_TEST_METRICS_DB", "RATEQUEUE_BENCH_REDIS_URL",
    "RATEQUEUE_PROMETHEUS_URL", "RATEQUEUE_DASHBOARDS_DIR", "RATEQUEUE_REDIS_MAXMEMORY",
})
_warned: set[str] = set()


def warn_unknown(env: Mapping[str, str], read: Collection[str]) -> None:
    """Log one warning per process for each ``RATEQUEUE_*`` variable of ``env`` that is neither
    among the settings the loader ``read`` nor a known non-setting, naming the closest setting."""
    settings = sorted(v[len(_PREFIX):] for v in {*read, "RATEQUEUE_DEBUG"} if v.startswith(_PREFIX))
    for var in sorted(env):
        if (not var.startswith(_PREFIX) or var in read or var in _NOT_SETTINGS
                or var.startswith(_OVERRIDE_PREFIX) or var in _warned):
            continue
        _warned.add(var)
        # Compared without the prefix every name shares, or any name would look close.
        close = difflib.get_close_matches(var[len(_PREFIX):], settings, n=1, cutoff=0.6)
        if close:
            log.warning("%s is not a ratequeue setting; did you mean %s%s?", var, _PREFIX, close[0])
        else:
            log.warning("%s is not a ratequeue setting (see the README for the list)", var)
