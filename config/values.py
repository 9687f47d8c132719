"""Value types of the settings (a secret that never shows itself, a picklable frozen map) and the
account fingerprint computed from them."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["FrozenMap", "Secret", "account_fingerprint"]


class Secret:
    """A string that never shows itself in repr, str, logs or tracebacks; ``reveal()`` returns it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret value itself."""
        return self._value

    def masked(self) -> str:
        """``sk-...abcd``: OpenAI's public ``sk-`` prefix and the last 4 characters; all hidden if short."""
        if len(self._value) < 12:  # the last 4 of a short secret give too much away
            return "***"
        prefix = "sk-" if self._value.startswith("sk-") else ""
        return f"{prefix}...{self._value[-4:]}"

    def __repr__(self) -> str:
        return f"Secret({self.masked()!r})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)


class FrozenMap(Mapping[str, Any]):
    """A read-only mapping that, unlike ``MappingProxyType``, pickles (settings cross processes)."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = dict(data)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return repr(self._data)


def account_fingerprint(api_key: str, organization: str | None = None, base_url: str = "") -> str:
    """A short, stable id of an account that never reveals the key (sha256, 12 hex chars).

    The organization wins over the key when set, since all keys of one organization share one limit.
    """
    ident = f"org:{organization}" if organization else f"key:{api_key}"
    return hashlib.sha256(f"{base_url}|{ident}".encode()).hexdigest()[:12]
