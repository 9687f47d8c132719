"""`from ratequeue import ...`: the public API, its ``__all__`` complete and sorted."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

import ratequeue
from ratequeue import errors
from ratequeue.producer import api


def test_all_is_sorted_and_every_name_resolves() -> None:
    assert ratequeue.__all__ == sorted(ratequeue.__all__)
    for name in ratequeue.__all__:
        assert getattr(ratequeue, name) is not None, name


def test_all_holds_the_producer_api_and_every_error() -> None:
    error_classes = {n for n, v in vars(errors).items() if inspect.isclass(v) and issubclass(v, errors.RatequeueError)}
    assert set(api.__all__) | error_classes <= set(ratequeue.__all__)
    assert ratequeue.Client is api.Client and ratequeue.RedisFullError is errors.RedisFullError


@pytest.mark.e2e
def test_importing_ratequeue_loads_neither_the_producer_nor_the_worker() -> None:
    loaded = "sorted(m for m in sys.modules if m.startswith(('ratequeue.producer', 'ratequeue.worker', 'celery')))"
    code = f"import sys, ratequeue; from ratequeue.jobstore import keys; print({loaded})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
