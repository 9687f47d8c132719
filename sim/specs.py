"""Per-model and per-deployment overrides: ``NAME:k=v:k=v`` specs from the CLI, objects from ``/sim/config``."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ratequeue.sim.options import ConfigError, coerce, spec_fields

_FIELDS: dict[str, tuple[str, float | None]] = {
    "rpm": ("int", 1),
    "tpm": ("int", 1),
    "burst_seconds": ("float", 0.001),
    "context": ("int", 1),
    "max_output": ("int", 1),
    "encoding": ("str", None),
    "input_price": ("float", 0),
    "output_price": ("float", 0),
    # Azure deployments only: the model a deployment serves, and its own daily token quota.
    "model": ("str", None),
    "daily_tokens": ("?int", 0),
}
_ALIASES = {"burst": "burst_seconds", "max_output_tokens": "max_output", "daily": "daily_tokens"}
DEPLOYMENT_ONLY = ("model", "daily_tokens")


@dataclass(frozen=True)
class ModelSpec:
    """Per-model (or per-deployment) overrides; a field left None falls back to the global default."""

    rpm: int | None = None
    tpm: int | None = None
    burst_seconds: float | None = None
    context: int | None = None
    max_output: int | None = None
    encoding: str | None = None
    input_price: float | None = None
    output_price: float | None = None
    model: str | None = None
    daily_tokens: int | None = None

    def merged(self, changes: Mapping[str, Any]) -> ModelSpec:
        """Return a copy with ``changes`` applied; raises ConfigError on an unknown field or bad value."""
        values: dict[str, Any] = {}
        for key, value in changes.items():
            name = _ALIASES.get(key, key)
            if name not in _FIELDS:
                raise ConfigError(f"unknown model field {key!r} (known: {', '.join(_FIELDS)})")
            kind, minimum = _FIELDS[name]
            values[name] = None if value is None else coerce(name, kind, minimum, value)
        if values.get("encoding") not in (None, "o200k_base", "cl100k_base"):
            raise ConfigError(f"encoding: expected o200k_base or cl100k_base, got {values['encoding']!r}")
        return dataclasses.replace(self, **values)

    def fields(self) -> dict[str, Any]:
        """The fields that are set (the JSON view)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def parse_model_spec(spec: str, what: str = "model") -> tuple[str, ModelSpec]:
    """Parse ``NAME:rpm=500:tpm=30000:context=128000:max_output=16384``; raises ConfigError.

    Parts without ``=`` form the name, so fine-tune names with colons (``ft:gpt-4o:org::id``) survive.
    ``what`` is "model" or "deployment" (only a deployment takes ``model=`` and ``daily=``).
    """
    name, fields = spec_fields(spec)
    if not name:
        raise ConfigError(f"{what} spec {spec!r} has no {what} name")
    try:
        parsed = ModelSpec().merged(fields)
        _check_kind(parsed, what)
        return name, parsed
    except ConfigError as exc:
        raise ConfigError(f"{what} spec {spec!r}: {exc}") from exc


def _check_kind(spec: ModelSpec, what: str) -> None:
    if what == "model":
        for name in DEPLOYMENT_ONLY:
            if getattr(spec, name) is not None:
                raise ConfigError(f"{name}: only a deployment (--deployment) takes it")


def updated_specs(current: Mapping[str, ModelSpec], value: Any, what: str = "model") -> dict[str, ModelSpec]:
    """Apply a ``models`` / ``deployments`` change: a name maps to a dict of fields (merged into its current
    spec), a ``k=v:k=v`` string, or None (removes it); a list of ``NAME:k=v`` specs is accepted too;
    None removes every override."""
    specs = dict(current)
    items: Iterable[tuple[str, Any]]
    if value is None:
        return {}
    if isinstance(value, list):
        items = [parse_model_spec(str(spec), what) for spec in value]
    elif isinstance(value, Mapping):
        items = value.items()
    else:
        raise ConfigError(f"{what}s: expected an object or a list of specs, got {value!r}")
    for name, entry in items:
        if entry is None:
            specs.pop(name, None)
            continue
        if isinstance(entry, ModelSpec):
            spec = entry
        elif isinstance(entry, str):  # "rpm=5:tpm=100", fields only
            spec = specs.get(name, ModelSpec()).merged(spec_fields(entry)[1])
        elif isinstance(entry, Mapping):
            spec = specs.get(name, ModelSpec()).merged(entry)
        else:
            raise ConfigError(f"{what}s.{name}: expected an object, a spec string or null, got {entry!r}")
        _check_kind(spec, what)
        specs[name] = spec
    return specs
