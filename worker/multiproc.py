"""Emptying prometheus-client's multi-process directory when a worker starts (prefork pool).

Its own module, importing nothing of prometheus-client or the worker's metrics: the files must
be removed before any metric exists in the process (an unlabelled metric opens its file when it
is created, at import), or the process's values would go to a deleted file. Leftover files made
a restarted worker (in a container, often with the same pid) carry the old counts (issue 12,
finding 9).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def wipe_multiprocess_dir() -> int:
    """Remove the ``*.db`` files of ``PROMETHEUS_MULTIPROC_DIR`` (if set); returns how many."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        return 0
    removed = 0
    for db in Path(folder).glob("*.db"):
        try:
            db.unlink()
            removed += 1
        except OSError as exc:  # metrics are never worth not starting the worker
            log.warning("metrics: cannot remove %s: %s", db, exc)
    return removed
