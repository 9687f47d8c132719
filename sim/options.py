"""Option parsing shared by every part of the simulator's settings: value checks, ``k=v`` specs, masked keys."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """An option or model spec that cannot be used; the message says which and why."""


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def coerce(name: str, kind: str, minimum: float | None, value: Any) -> Any:
    """Check one option's value (strings from the CLI are converted); raises ConfigError.

    Kinds: int, float, bool, str, strs (a list of strings; a string is one item), "?" prefixed when None
    is allowed.
    """
    if kind.startswith("?"):
        if value is None:
            return None
        kind = kind[1:]
    try:
        if kind == "bool":
            if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
                return value.lower() in _TRUE
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind == "strs":
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
                raise TypeError
            return tuple(items)
        if kind == "str":
            if not isinstance(value, str):
                raise TypeError
            return value
        if isinstance(value, bool):
            raise TypeError
        number: float = int(value) if kind == "int" else float(value)
        if kind == "int" and isinstance(value, float) and value != number:
            raise TypeError
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: expected {kind}, got {value!r}") from exc
    if minimum is not None and number < minimum:
        raise ConfigError(f"{name}: must be >= {minimum}, got {value!r}")
    return number


def spec_fields(spec: str) -> tuple[str, dict[str, str]]:
    """Split a spec into its name (parts without ``=``) and its ``key=value`` fields."""
    name_parts: list[str] = []
    fields: dict[str, str] = {}
    for part in spec.split(":"):
        key, sep, value = part.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
        else:
            name_parts.append(part)
    return ":".join(name_parts).strip(), fields


def mask_key(key: str) -> str:
    """Show a key the way OpenAI's errors do: ``sk-...abcd``, never the whole secret."""
    if len(key) < 12:
        return "***"
    return f"{key[:3]}...{key[-4:]}"
