"""The model table: rate limits, context window, encoding and prices of each model.

Built from three layers, later ones winning per model and per field:

1. the built-in ``config/models.toml``;
2. the user's file (``RATEQUEUE_MODELS_FILE``), which may add models or change single fields, or
   replace the built-in table entirely with ``replace = true`` at its top level;
3. ``RATEQUEUE_MODEL_<NAME>_<FIELD>`` environment overrides (see ``config.settings``).

Each table may have a ``[defaults]`` table whose fields apply to every model that does not set them.
A bad value raises :class:`ConfigError` naming the file (or variable), the model and the field.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ratequeue.config.charge import ChargeRule
from ratequeue.config.model_layers import Fields, apply_overrides, merge_layers, read_table_file, read_toml
from ratequeue.config.settings import CHARGE_RULES, Settings
from ratequeue.errors import ConfigError, UnknownModelError

# The tiktoken encodings a model may name: the ones whose rank files ship with ratequeue (offline).
SUPPORTED_ENCODINGS = frozenset({"o200k_base", "cl100k_base"})

__all__ = ["GENERIC_ENCODING", "KINDS", "UNLIMITED", "ModelSpec", "ModelTable", "generic_spec", "load_model_table",
           "load_model_table_from"]

KINDS = ("chat", "embedding")
BUILTIN_SOURCE = "built-in config/models.toml"
_INT_FIELDS = ("rpm", "tpm", "context_window", "max_output_tokens")
_PRICE_FIELDS = ("input_per_1m", "cached_input_per_1m", "output_per_1m")
_FIELDS = frozenset((*_INT_FIELDS, *_PRICE_FIELDS, "kind", "encoding", "charge_rule", "charge_rule_pinned",
                     "endpoints", "aliases"))
_REQUIRED = ("kind", "encoding", "charge_rule", "endpoints", *_INT_FIELDS, "input_per_1m", "output_per_1m")
# A dated snapshot: gpt-4o-mini-2024-07-18, o3-mini-2025-01-31, or the older MMDD form gpt-4-0613.
# The rpm and tpm of a spec whose limits are not known (limits_known False): a self-hosted server
# is bounded by how many requests it serves at once, not by a rate. A number rather than None so
# that every bucket and estimate works unchanged; far above any real limit, so it never binds.
UNLIMITED = 1_000_000_000
GENERIC_ENCODING = "cl100k_base"  # a model absent from the table, unless its account names another
# The paths a model absent from the table may be sent to: whatever its server serves.
GENERIC_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
GENERIC_CONTEXT_WINDOW = 131_072  # the server refuses what does not fit: ratequeue must not refuse first
_SNAPSHOT = re.compile(r"^(?P<base>.+?)-(?:\d{4}-\d{2}-\d{2}|(?:0[1-9]|1[0-2])\d{2})$")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One model's limits (per minute), sizes (tokens) and prices (USD per 1,000,000 tokens)."""

    name: str
    kind: str  # "chat" or "embedding"
    rpm: int
    tpm: int
    context_window: int
    max_output_tokens: int
    encoding: str
    input_per_1m: float
    cached_input_per_1m: float
    output_per_1m: float
    charge_rule: str  # "sum" or "max", see models.toml
    endpoints: tuple[str, ...]
    aliases: tuple[str, ...] = ()
    charge_rule_pinned: bool = False  # never learned from the server: the configured rule is the server's
    # False: a model no table describes (generic_spec): rpm and tpm are UNLIMITED, prices 0, and
    # only the adaptive concurrency window of its route bounds how much is sent.
    limits_known: bool = True
    # Azure: a request without a max output is charged the whole context window (ChargeRule.fills_context).
    missing_fills_context: bool = False

    @property
    def rule(self) -> ChargeRule:
        """The configured charge rule: the starting guess of every dimension (config/charge.py)."""
        return ChargeRule(self.charge_rule, fills_context=self.context_window if self.missing_fills_context else None)

    def cost_usd(self, prompt_tokens: int, cached_tokens: int = 0, completion_tokens: int = 0) -> float:
        """The price in USD of a call. `cached_tokens` is the part of `prompt_tokens` served from
        the prompt cache (as in OpenAI's ``usage.prompt_tokens_details``). Raises ValueError on
        negative counts or more cached than prompt tokens."""
        if min(prompt_tokens, cached_tokens, completion_tokens) < 0 or cached_tokens > prompt_tokens:
            raise ValueError(
                f"bad token counts: prompt={prompt_tokens} cached={cached_tokens} "
                f"completion={completion_tokens}"
            )
        return (
            (prompt_tokens - cached_tokens) * self.input_per_1m
            + cached_tokens * self.cached_input_per_1m
            + completion_tokens * self.output_per_1m
        ) / 1_000_000


class ModelTable:
    """The models ratequeue knows, looked up by exact name, alias, dated snapshot or fine-tune."""

    def __init__(self, specs: Mapping[str, ModelSpec], sources: tuple[str, ...] = ()) -> None:
        self._specs = dict(specs)
        self.sources = sources  # where the table came from, for logs and --check
        self._aliases: dict[str, str] = {}
        for spec in self._specs.values():
            for alias in spec.aliases:
                other = self._aliases.get(alias) or (alias if alias in self._specs else None)
                if other is not None:
                    raise ConfigError(f"model alias {alias!r} of {spec.name!r} is also used by {other!r}")
                self._aliases[alias] = spec.name
        self._resolved: dict[str, str] = {}

    def names(self) -> list[str]:
        """The canonical model names, sorted."""
        return sorted(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __iter__(self) -> Iterator[ModelSpec]:
        return (self._specs[name] for name in self.names())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._lookup(name) is not None

    def resolve(self, name: str) -> str:
        """The canonical name `name` stands for. Raises UnknownModelError."""
        canonical = self._resolved.get(name)
        if canonical is None:
            canonical = self._lookup(name)
            if canonical is None:
                raise UnknownModelError(name)
            if len(self._resolved) < 10_000:  # bounded: model names come from user input
                self._resolved[name] = canonical
        return canonical

    def get(self, name: str) -> ModelSpec:
        """The spec of `name`. Snapshots and fine-tunes get their base model's spec (and so its
        limits and prices). Raises UnknownModelError."""
        return self._specs[self.resolve(name)]

    def with_limits(self, name: str, *, rpm: int | None = None, tpm: int | None = None) -> ModelTable:
        """A new table with `name`'s rpm and/or tpm replaced (limits learned from response headers).

        Raises UnknownModelError, or ValueError for a limit that is not a positive integer.
        """
        spec = self.get(name)
        for label, value in (("rpm", rpm), ("tpm", tpm)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{label} must be a positive integer, got {value!r}")
        changed = dataclasses.replace(
            spec, rpm=spec.rpm if rpm is None else rpm, tpm=spec.tpm if tpm is None else tpm
        )
        return ModelTable({**self._specs, spec.name: changed}, self.sources)

    def _lookup(self, name: str) -> str | None:
        if name in self._specs:
            return name
        if name in self._aliases:
            return self._aliases[name]
        if name.startswith("ft:"):  # ft:<base>:<org>:<suffix>:<id>
            name = name.split(":")[1]
            if name in self._specs or name in self._aliases:
                return self._lookup(name)
        match = _SNAPSHOT.match(name)
        if match is not None:
            base = match.group("base")
            return base if base in self._specs else self._aliases.get(base)
        return None


def generic_spec(
    name: str,
    encoding: str = GENERIC_ENCODING,
    *,
    context_window: int = GENERIC_CONTEXT_WINDOW,
    max_output_tokens: int | None = None,
    rpm: int | None = None,
    tpm: int | None = None,
) -> ModelSpec:
    """The spec of a model the table does not describe, served by an account that accepts any name
    (openai-compatible) or by an Azure deployment that names its own limits.

    Tokens are counted with `encoding`; nothing is charged (prices 0); with no rpm and tpm the
    limits are unknown (``limits_known`` False, both UNLIMITED). The maximum output defaults to the
    whole context window (the server refuses what is too long). Raises ValueError for a bad value.
    """
    if encoding not in SUPPORTED_ENCODINGS:
        raise ValueError(f"encoding must be one of {', '.join(sorted(SUPPORTED_ENCODINGS))}, got {encoding!r}")
    max_output = context_window if max_output_tokens is None else max_output_tokens
    if not 1 <= max_output <= context_window:
        raise ValueError(f"max_output_tokens {max_output} must be between 1 and the context window {context_window}")
    known = rpm is not None or tpm is not None
    return ModelSpec(
        name=name, kind="chat", rpm=rpm or UNLIMITED, tpm=tpm or UNLIMITED, context_window=context_window,
        max_output_tokens=max_output, encoding=encoding, input_per_1m=0.0, cached_input_per_1m=0.0,
        output_per_1m=0.0, charge_rule="sum", endpoints=GENERIC_ENDPOINTS, limits_known=known,
    )


# -- loading (the layers are read and merged in config/model_layers.py) ------------------------------

def _bad(fields: Fields, key: str, name: str, reason: str) -> ConfigError:
    value, source, path = fields[key]
    used_by = f" (used by model {name!r})" if path.startswith("defaults.") else ""
    return ConfigError(f"{source}: {path}: {reason}, got {value!r}{used_by}")


def _build_spec(name: str, fields: Fields, model_source: str) -> ModelSpec:
    for key in fields:
        if key not in _FIELDS:
            raise _bad(fields, key, name, f"unknown field (known: {', '.join(sorted(_FIELDS))})")
    missing = [key for key in _REQUIRED if key not in fields]
    if missing:
        raise ConfigError(f'{model_source}: models."{name}": missing field(s) {", ".join(missing)}')
    v = {key: value for key, (value, _, _) in fields.items()}
    for key in _INT_FIELDS:
        minimum = 0 if key == "max_output_tokens" else 1
        if isinstance(v[key], bool) or not isinstance(v[key], int) or v[key] < minimum:
            reason = "must be a positive integer" if minimum else "must be an integer >= 0"
            raise _bad(fields, key, name, reason)
    v.setdefault("cached_input_per_1m", v["input_per_1m"])
    if "cached_input_per_1m" not in fields:
        fields["cached_input_per_1m"] = fields["input_per_1m"]
    for key in _PRICE_FIELDS:
        price = v[key]
        is_number = isinstance(price, int | float) and not isinstance(price, bool)
        if not is_number or not math.isfinite(price) or price < 0:
            raise _bad(fields, key, name, "must be a number >= 0 (USD per 1M tokens)")
    if v["kind"] not in KINDS:
        raise _bad(fields, "kind", name, f"must be one of {', '.join(KINDS)}")
    if v["charge_rule"] not in CHARGE_RULES:
        raise _bad(fields, "charge_rule", name, f"must be one of {', '.join(CHARGE_RULES)}")
    if not isinstance(v.get("charge_rule_pinned", False), bool):
        raise _bad(fields, "charge_rule_pinned", name, "must be true or false")
    if v["encoding"] not in SUPPORTED_ENCODINGS:
        raise _bad(fields, "encoding", name, f"must be one of {', '.join(sorted(SUPPORTED_ENCODINGS))}")
    for key in ("endpoints", "aliases"):
        items = v.get(key, [])
        if not isinstance(items, list) or not all(isinstance(x, str) and x for x in items):
            raise _bad(fields, key, name, "must be a list of non-empty strings")
    if not v["endpoints"] or not all(e.startswith("/") for e in v["endpoints"]):
        raise _bad(fields, "endpoints", name, 'must list request paths such as "/v1/chat/completions"')
    if v["kind"] == "chat" and v["max_output_tokens"] < 1:
        raise _bad(fields, "max_output_tokens", name, "must be >= 1 for a chat model")
    if v["max_output_tokens"] > v["context_window"]:
        ctx = f"context_window {v['context_window']} ({fields['context_window'][1]})"
        raise _bad(fields, "max_output_tokens", name, f"exceeds {ctx}")
    return ModelSpec(
        name=name,
        kind=v["kind"],
        rpm=v["rpm"],
        tpm=v["tpm"],
        context_window=v["context_window"],
        max_output_tokens=v["max_output_tokens"],
        encoding=v["encoding"],
        input_per_1m=float(v["input_per_1m"]),
        cached_input_per_1m=float(v["cached_input_per_1m"]),
        output_per_1m=float(v["output_per_1m"]),
        charge_rule=v["charge_rule"],
        endpoints=tuple(v["endpoints"]),
        aliases=tuple(v.get("aliases", [])),
        charge_rule_pinned=v.get("charge_rule_pinned", False),
    )


def _builtin_text() -> str:
    return resources.files("ratequeue.config").joinpath("models.toml").read_text(encoding="utf-8")


def load_model_table_from(
    user_file: Path | None = None, overrides: Mapping[str, Mapping[str, int | str]] | None = None
) -> ModelTable:
    """The built-in table merged with `user_file` and `overrides` (mangled name -> field -> value).

    Raises ConfigError naming the file or variable, the model and the field of a bad value.
    """
    layers, texts = [(read_toml(_builtin_text(), BUILTIN_SOURCE), BUILTIN_SOURCE)], {}
    if user_file is not None:
        source, texts[str(user_file)] = str(user_file), read_table_file(user_file)
        doc = read_toml(texts[source], source)
        layers = [(doc, source)] if doc.get("replace", False) else [*layers, (doc, source)]
    defaults, models, tables = merge_layers(layers, texts)  # a user file's sources name their lines
    apply_overrides(models, overrides or {})
    if not models:
        raise ConfigError(f"{layers[-1][1]}: the model table has no models")
    specs = {}
    for name, own in models.items():
        specs[name] = _build_spec(name, {**defaults, **own}, tables[name])
    return ModelTable(specs, tuple(source for _, source in layers))


def load_model_table(settings: Settings) -> ModelTable:
    """The model table for `settings`: built-in, then RATEQUEUE_MODELS_FILE, then env overrides.

    Raises ConfigError for a bad file or override.
    """
    return load_model_table_from(settings.models_file, settings.model_overrides)
