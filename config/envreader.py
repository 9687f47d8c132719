"""Typed reads of environment variables: each bad value raises ConfigError naming the variable and
the reason (never echoing a secret); an empty value counts as unset (``FOO=`` in a compose file).
``config.settings`` is the one module that hands ``os.environ`` to it."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from ratequeue.errors import ConfigError

__all__ = ["EnvReader", "parse_int"]


class EnvReader:
    """Typed reads of one environment mapping; empty values count as unset."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.read: set[str] = set()  # every variable asked for: the settings there are

    def text(self, var: str) -> str | None:
        self.read.add(var)
        value = self.env.get(var, "").strip()
        return value or None

    def number(self, var: str, default: float, *, minimum: float = 0.0, allow_zero: bool = False) -> float:
        raw = self.text(var)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{var}={raw!r}: not a number (seconds)") from None
        if not math.isfinite(value) or value < minimum or (value == minimum and not allow_zero):
            bound = f">= {minimum:g}" if allow_zero else f"> {minimum:g}"
            raise ConfigError(f"{var}={raw!r}: must be a finite number {bound}")
        return value

    def integer(
        self, var: str, default: int | None, *, minimum: int = 1, maximum: int | None = None
    ) -> int | None:
        raw = self.text(var)
        if raw is None:
            return default
        return parse_int(var, raw, minimum=minimum, maximum=maximum)

    def integer_default(self, var: str, default: int) -> int:
        value = self.integer(var, default)
        assert value is not None  # a default was given
        return value

    def bind_address(self, var: str, default: str) -> str:
        raw = self.text(var)
        if raw is None:
            return default
        if re.search(r"[\s/@]", raw):
            raise ConfigError(f"{var}={raw!r}: must be an address to bind (127.0.0.1, 0.0.0.0, ::), not a URL")
        return raw

    def share(self, var: str, default: float) -> float:
        """A share of the limits: above 0 and at most 1."""
        message = f"{var}={self.text(var)!r}: must be a number above 0 and at most 1 (a share of the limits)"
        try:
            value = self.number(var, default)
        except ConfigError:
            raise ConfigError(message) from None
        if value > 1:
            raise ConfigError(message)
        return value

    def address(self, var: str) -> str | None:
        """A "host:port" (port 1-65535), or None when unset."""
        raw = self.text(var)
        if raw is None:
            return None
        host, _, port = raw.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{var}={raw!r}: must be host:port (port 1-65535)")
        return raw

    def budget(self, var: str) -> float | None:
        """A positive amount of USD, or None when unset."""
        if self.text(var) is None:
            return None
        try:
            return self.number(var, 0.0)
        except ConfigError:
            raise ConfigError(f"{var}={self.text(var)!r}: must be an amount of USD above 0") from None

    def flag(self, var: str, default: bool) -> bool:
        raw = self.text(var)
        if raw is None:
            return default
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{var}={raw!r}: must be true or false")


def parse_int(var: str, raw: str, *, minimum: int = 1, maximum: int | None = None) -> int:
    """`raw` as an int in [minimum, maximum]; underscores allowed (``200_000_000``). Raises ConfigError."""
    try:
        value = int(raw, 10)
    except ValueError:
        raise ConfigError(f"{var}={raw!r}: not an integer") from None
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise ConfigError(f"{var}={raw!r}: must be {bound}")
    return value
