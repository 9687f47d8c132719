"""Redis replies come back as bytes (or str, with decode_responses): one way to read them as text."""

from __future__ import annotations

from typing import Any


def text(value: Any) -> str:
    """A Redis reply (bytes or str) as str."""
    return value.decode() if isinstance(value, bytes) else str(value)
