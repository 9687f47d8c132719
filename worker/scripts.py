"""Loads the Lua scripts shipped in ``worker/lua`` (one operation each) from package data."""

from __future__ import annotations

from functools import cache
from importlib import resources


@cache
def lua_source(name: str) -> str:
    """The text of ``worker/lua/<name>.lua``."""
    return (resources.files("worker") / "lua" / f"{name}.lua").read_text(encoding="utf-8")
