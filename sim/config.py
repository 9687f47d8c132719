"""The simulator's settings: defaults, per-model overrides and runtime updates.

The same option names serve the CLI (``--fail-rate``), ``POST /sim/config`` (``fail_rate``) and
``SimHandle.configure(fail_rate=...)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ratequeue.sim import catalog

CHARGE_RULES = ("sum", "max")
PROMPT_ESTIMATES = ("tiktoken", "chars")


class ConfigError(ValueError):
    """An option or model spec that cannot be used; the message says which and why."""


# Option name -> (kind, minimum). Kinds: int, float, bool, str, and "?" prefixed when None is allowed.
_OPTIONS: dict[str, tuple[str, float | None]] = {
    "rpm": ("int", 1),
    "tpm": ("int", 1),
    "burst_seconds": ("float", 0.001),
    "context": ("int", 1),
    "max_output": ("int", 1),
    "strict_models": ("bool", None),
    "charge_rule": ("str", None),
    "charge_n": ("bool", None),
    "missing_max_charge": ("?int", 1),
    "prompt_estimate": ("str", None),
    "latency_ms": ("float", 0),
    "per_token_ms": ("float", 0),
    "fail_rate": ("float", 0),
    "slow_rate": ("float", 0),
    "slow_ms": ("float", 0),
    "seed": ("int", None),
    "quota_usd": ("?float", 0),
    "api_key": ("?str", None),
    "retry_after": ("bool", None),
    "ratelimit_headers": ("bool", None),
    "organization": ("str", None),
}
_MODEL_FIELDS: dict[str, tuple[str, float | None]] = {
    "rpm": ("int", 1),
    "tpm": ("int", 1),
    "burst_seconds": ("float", 0.001),
    "context": ("int", 1),
    "max_output": ("int", 1),
    "encoding": ("str", None),
    "input_price": ("float", 0),
    "output_price": ("float", 0),
}
_MODEL_ALIASES = {"burst": "burst_seconds", "max_output_tokens": "max_output"}


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _coerce(name: str, kind: str, minimum: float | None, value: Any) -> Any:
    """Check one option's value (strings from the CLI are converted); raises ConfigError."""
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


@dataclass(frozen=True)
class ModelSpec:
    """Per-model overrides; a field left None falls back to the global default."""

    rpm: int | None = None
    tpm: int | None = None
    burst_seconds: float | None = None
    context: int | None = None
    max_output: int | None = None
    encoding: str | None = None
    input_price: float | None = None
    output_price: float | None = None

    def merged(self, changes: Mapping[str, Any]) -> ModelSpec:
        """Return a copy with ``changes`` applied; raises ConfigError on an unknown field or bad value."""
        values: dict[str, Any] = {}
        for key, value in changes.items():
            name = _MODEL_ALIASES.get(key, key)
            if name not in _MODEL_FIELDS:
                raise ConfigError(f"unknown model field {key!r} (known: {', '.join(_MODEL_FIELDS)})")
            kind, minimum = _MODEL_FIELDS[name]
            values[name] = None if value is None else _coerce(name, kind, minimum, value)
        if values.get("encoding") not in (None, "o200k_base", "cl100k_base"):
            raise ConfigError(f"encoding: expected o200k_base or cl100k_base, got {values['encoding']!r}")
        return dataclasses.replace(self, **values)


def parse_model_spec(spec: str) -> tuple[str, ModelSpec]:
    """Parse ``NAME:rpm=500:tpm=30000:context=128000:max_output=16384``; raises ConfigError.

    Parts without ``=`` form the name, so fine-tune names with colons (``ft:gpt-4o:org::id``) survive.
    """
    name, fields = _spec_fields(spec)
    if not name:
        raise ConfigError(f"model spec {spec!r} has no model name")
    try:
        return name, ModelSpec().merged(fields)
    except ConfigError as exc:
        raise ConfigError(f"model spec {spec!r}: {exc}") from exc


def _spec_fields(spec: str) -> tuple[str, dict[str, str]]:
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


@dataclass(frozen=True)
class ModelLimits:
    """Everything the server needs about one model, defaults resolved."""

    name: str
    rpm: int
    tpm: int
    burst_seconds: float
    context: int
    max_output: int
    encoding: str
    input_price: float  # USD per 1M tokens
    output_price: float


@dataclass(frozen=True)
class SimConfig:
    """All simulator options (see ``sim.cli`` for what each one does)."""

    rpm: int = 5000
    tpm: int = 800_000
    burst_seconds: float = 60.0
    context: int = 128_000
    max_output: int = 4096
    models: dict[str, ModelSpec] = field(default_factory=dict)
    strict_models: bool = False
    charge_rule: str = "sum"
    charge_n: bool = True  # the output allowance counts every one of n choices
    missing_max_charge: int | None = None  # allowance per choice without a max (None: the model's max output)
    prompt_estimate: str = "tiktoken"
    latency_ms: float = 0.0
    per_token_ms: float = 0.0
    fail_rate: float = 0.0
    slow_rate: float = 0.0
    slow_ms: float = 0.0
    seed: int = 0
    quota_usd: float | None = None
    api_key: str | None = None
    retry_after: bool = True
    ratelimit_headers: bool = True
    organization: str = "org-sim"

    def limits_for(self, model: str) -> ModelLimits | None:
        """Resolve ``model``'s limits; None when ``strict_models`` is on and the model is not configured."""
        spec = self.models.get(model)
        if spec is None:
            if self.strict_models:
                return None
            spec = ModelSpec()
        default_in, default_out = catalog.price_per_m(model)
        return ModelLimits(
            name=model,
            rpm=spec.rpm if spec.rpm is not None else self.rpm,
            tpm=spec.tpm if spec.tpm is not None else self.tpm,
            burst_seconds=spec.burst_seconds if spec.burst_seconds is not None else self.burst_seconds,
            context=spec.context if spec.context is not None else self.context,
            max_output=spec.max_output if spec.max_output is not None else self.max_output,
            encoding=spec.encoding or catalog.encoding_for(model),
            input_price=spec.input_price if spec.input_price is not None else default_in,
            output_price=spec.output_price if spec.output_price is not None else default_out,
        )

    def updated(self, changes: Mapping[str, Any]) -> SimConfig:
        """Return a copy with ``changes`` applied; raises ConfigError (nothing is applied then).

        ``models`` maps a name to a dict of fields (merged into its current spec), a ``k=v:k=v`` string,
        or None (removes it); a list of ``NAME:k=v`` spec strings is accepted too; ``models=None``
        removes every override.
        """
        values: dict[str, Any] = {}
        for key, value in changes.items():
            if key == "models":
                values["models"] = _updated_models(self.models, value)
                continue
            if key not in _OPTIONS:
                raise ConfigError(f"unknown option {key!r} (known: models, {', '.join(_OPTIONS)})")
            kind, minimum = _OPTIONS[key]
            values[key] = _coerce(key, kind, minimum, value)
        new = dataclasses.replace(self, **values)
        if new.charge_rule not in CHARGE_RULES:
            raise ConfigError(f"charge_rule: expected one of {CHARGE_RULES}, got {new.charge_rule!r}")
        if new.prompt_estimate not in PROMPT_ESTIMATES:
            raise ConfigError(
                f"prompt_estimate: expected one of {PROMPT_ESTIMATES}, got {new.prompt_estimate!r}"
            )
        for rate in ("fail_rate", "slow_rate"):
            if getattr(new, rate) > 1:
                raise ConfigError(f"{rate}: must be <= 1, got {getattr(new, rate)}")
        return new

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view; the API key is masked."""
        out = dataclasses.asdict(self)
        out["models"] = {
            name: {k: v for k, v in dataclasses.asdict(spec).items() if v is not None}
            for name, spec in self.models.items()
        }
        out["api_key"] = mask_key(self.api_key) if self.api_key else None
        return out


def _updated_models(current: Mapping[str, ModelSpec], value: Any) -> dict[str, ModelSpec]:
    models = dict(current)
    items: Iterable[tuple[str, Any]]
    if value is None:  # drop every per-model override
        return {}
    if isinstance(value, list):
        items = [parse_model_spec(str(spec)) for spec in value]
    elif isinstance(value, Mapping):
        items = value.items()
    else:
        raise ConfigError(f"models: expected an object or a list of specs, got {value!r}")
    for name, entry in items:
        if entry is None:
            models.pop(name, None)
        elif isinstance(entry, ModelSpec):
            models[name] = entry
        elif isinstance(entry, str):  # "rpm=5:tpm=100", fields only
            models[name] = models.get(name, ModelSpec()).merged(_spec_fields(entry)[1])
        elif isinstance(entry, Mapping):
            models[name] = models.get(name, ModelSpec()).merged(entry)
        else:
            raise ConfigError(f"models.{name}: expected an object, a spec string or null, got {entry!r}")
    return models


def mask_key(key: str) -> str:
    """Show a key the way OpenAI's errors do: ``sk-...abcd``, never the whole secret."""
    if len(key) < 12:
        return "***"
    return f"{key[:3]}...{key[-4:]}"
