"""Loads Lua scripts (one operation each) shipped as package data: the job store's in
``ratequeue/jobstore/lua``, the limiter's beside it in ``worker/lua``."""

from __future__ import annotations

from functools import cache
from importlib import resources

JOBSTORE = "ratequeue.jobstore"


@cache
def lua_source(name: str, package: str = JOBSTORE) -> str:
    """The text of ``<package>/lua/<name>.lua`` (the job store's scripts by default)."""
    return (resources.files(package) / "lua" / f"{name}.lua").read_text(encoding="utf-8")
