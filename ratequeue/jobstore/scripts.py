"""Loads Lua scripts (one operation each) shipped as package data: the job store's in
``ratequeue/jobstore/lua``, the limiter's beside it in ``worker/lua``.

A script line ``-- include: _<name>.lua`` is replaced by the text of that file (a leading ``_``
marks a library, not an operation). Redis runs each script alone and atomically, and one script
cannot call another inside that step; pasting the library in keeps a rule (the batch's final
status) in one file while every script that applies it stays one atomic call.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

JOBSTORE = "ratequeue.jobstore"
_INCLUDE = re.compile(r"^-- include: (_\w+\.lua)$", re.MULTILINE)


@cache
def lua_source(name: str, package: str = JOBSTORE) -> str:
    """The text of ``<package>/lua/<name>.lua`` (the job store's scripts by default), includes pasted in."""
    folder = resources.files(package) / "lua"
    source = (folder / f"{name}.lua").read_text(encoding="utf-8")
    return _INCLUDE.sub(lambda m: (folder / m.group(1)).read_text(encoding="utf-8"), source)
