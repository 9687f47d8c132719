"""The simulator's settings: defaults, per-model overrides and runtime updates.

The same option names serve the CLI (``--fail-rate``), ``POST /sim/config`` (``fail_rate``) and
``SimHandle.configure(fail_rate=...)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ratequeue.sim import catalog
from ratequeue.sim.options import ConfigError, coerce, mask_key
from ratequeue.sim.specs import ModelSpec, parse_model_spec, updated_specs

__all__ = ["CHARGE_RULES", "DIALECTS", "PROMPT_ESTIMATES", "ConfigError", "ModelLimits", "ModelSpec", "SimConfig",
           "mask_key", "parse_model_spec"]

CHARGE_RULES = ("sum", "max")
PROMPT_ESTIMATES = ("tiktoken", "chars")
# openai: api.openai.com; azure: Azure OpenAI deployments (sim/azure.py); openai-compatible: a
# self-hosted server such as vLLM or Ollama (sim/selfhosted.py).
DIALECTS = ("openai", "azure", "openai-compatible")
AZURE_WINDOWS = (1.0, 10.0)
OVERLOAD_STATUSES = (503, 429)
# Self-hosted POST /tokenize: vLLM's answer, or a broken one (an HTML page, JSON without "count") to test clients.
TOKENIZE_ANSWERS = ("vllm", "not-json", "no-count")


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
    "dialect": ("str", None),
    "accept_keys": ("strs", None),
    "per_key_buckets": ("bool", None),
    "azure_window": ("float", 1),
    "azure_token_window": ("?float", 1),
    "azure_odd_headers": ("float", 0),
    "entra_token": ("?str", None),
    "daily_quota_tokens": ("?int", 0),
    "content_filter_words": ("strs", None),
    "content_filter_output_words": ("strs", None),
    "max_concurrency": ("int", 1),
    "queue_depth": ("int", 0),
    "overload_status": ("int", None),
    "load_slowdown": ("float", 0),
    "tokenize": ("bool", None),
    "tokenize_answer": ("str", None),
    "tokenize_latency_ms": ("float", 0),
}
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
    served: str = ""  # the model answering (an Azure deployment's model); "" means ``name``
    token_burst_seconds: float | None = None  # the token bucket's own window (None: ``burst_seconds``)
    daily_tokens: int | None = None  # an Azure deployment's daily quota


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
    dialect: str = "openai"
    accept_keys: tuple[str, ...] = ()  # keys accepted besides api_key (several accounts on one server)
    per_key_buckets: bool = False  # each key its own buckets (separate accounts), else one per model
    deployments: dict[str, ModelSpec] = field(default_factory=dict)  # Azure: deployment -> limits
    azure_window: float = 10.0  # seconds over which Azure enforces a deployment's limits (1 or 10)
    azure_token_window: float | None = None  # the token limit's own window (None: azure_window)
    azure_odd_headers: float = 0.0  # share of Azure answers whose remaining-* headers read -1 / 0
    entra_token: str | None = None  # Azure: the bearer token accepted in place of an api-key
    daily_quota_tokens: int | None = None  # Azure: tokens per deployment per day (None: no quota)
    content_filter_words: tuple[str, ...] = ()  # Azure: a prompt holding one gets 400 content_filter
    content_filter_output_words: tuple[str, ...] = ()  # Azure: ... gets its output filtered
    max_concurrency: int = 8  # self-hosted: requests served at once
    queue_depth: int = 64  # self-hosted: requests waiting beyond those; more are refused
    overload_status: int = 503  # self-hosted: the refusal's status (503 as Ollama, or 429)
    load_slowdown: float = 1.0  # self-hosted: per-token time x (1 + this x busy / capacity)
    tokenize: bool = True  # self-hosted: serve POST /tokenize
    tokenize_answer: str = "vllm"  # self-hosted: what /tokenize answers (TOKENIZE_ANSWERS)
    tokenize_latency_ms: float = 0.0  # self-hosted: the time /tokenize takes to answer (a remote server's)

    def limits_for(self, model: str) -> ModelLimits | None:
        """Resolve ``model``'s limits (an Azure deployment's in the azure dialect); None when it is unknown:
        ``strict_models`` on and the model not configured, or deployments configured and not this one."""
        if self.dialect == "azure":
            return self._deployment_limits(model)
        spec = self.models.get(model)
        if spec is None:
            if self.strict_models:
                return None
            spec = ModelSpec()
        return self._resolve(model, model, spec, self.rpm, self.burst_seconds)

    def _deployment_limits(self, deployment: str) -> ModelLimits | None:
        spec = self.deployments.get(deployment)
        if spec is None:
            if self.deployments:
                return None
            spec = ModelSpec()  # none configured: any deployment, serving the model of its name
        tpm = spec.tpm if spec.tpm is not None else self.tpm
        # Azure derives a deployment's RPM from its TPM: 6 RPM per 1,000 TPM for the older chat models
        # (learn.microsoft.com "Azure OpenAI quotas and limits"; a Microsoft Q&A answer gives
        # RPM = TPM x 6 / 1000: 20,000 TPM -> 120 RPM). ``rpm=`` overrides it, as newer models differ.
        derived_rpm = max(1, tpm * 6 // 1000)
        window = spec.burst_seconds if spec.burst_seconds is not None else self.azure_window
        limits = self._resolve(deployment, spec.model or deployment, spec, derived_rpm, window)
        return dataclasses.replace(
            limits,
            token_burst_seconds=self.azure_token_window if spec.burst_seconds is None else None,
            daily_tokens=spec.daily_tokens if spec.daily_tokens is not None else self.daily_quota_tokens,
        )

    def _resolve(self, name: str, served: str, spec: ModelSpec, rpm: int, burst: float) -> ModelLimits:
        default_in, default_out = catalog.price_per_m(served)
        return ModelLimits(
            name=name,
            rpm=spec.rpm if spec.rpm is not None else rpm,
            tpm=spec.tpm if spec.tpm is not None else self.tpm,
            burst_seconds=spec.burst_seconds if spec.burst_seconds is not None else burst,
            context=spec.context if spec.context is not None else self.context,
            max_output=spec.max_output if spec.max_output is not None else self.max_output,
            encoding=spec.encoding or catalog.encoding_for(served),
            input_price=spec.input_price if spec.input_price is not None else default_in,
            output_price=spec.output_price if spec.output_price is not None else default_out,
            served=served if served != name else "",
        )

    def updated(self, changes: Mapping[str, Any]) -> SimConfig:
        """Return a copy with ``changes`` applied; raises ConfigError (nothing is applied then).

        ``models`` maps a name to a dict of fields (merged into its current spec), a ``k=v:k=v`` string,
        or None (removes it); a list of ``NAME:k=v`` spec strings is accepted too; ``models=None``
        removes every override.
        """
        values: dict[str, Any] = {}
        for key, value in changes.items():
            if key in ("models", "deployments"):
                values[key] = updated_specs(getattr(self, key), value, key[:-1])
                continue
            if key not in _OPTIONS:
                raise ConfigError(f"unknown option {key!r} (known: models, deployments, {', '.join(_OPTIONS)})")
            kind, minimum = _OPTIONS[key]
            values[key] = coerce(key, kind, minimum, value)
        new = dataclasses.replace(self, **values)
        if new.charge_rule not in CHARGE_RULES:
            raise ConfigError(f"charge_rule: expected one of {CHARGE_RULES}, got {new.charge_rule!r}")
        if new.prompt_estimate not in PROMPT_ESTIMATES:
            raise ConfigError(
                f"prompt_estimate: expected one of {PROMPT_ESTIMATES}, got {new.prompt_estimate!r}"
            )
        _check_choices(new)
        for rate in ("fail_rate", "slow_rate", "azure_odd_headers"):
            if getattr(new, rate) > 1:
                raise ConfigError(f"{rate}: must be <= 1, got {getattr(new, rate)}")
        return new

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view; the API key is masked."""
        out = dataclasses.asdict(self)
        out["models"] = {name: spec.fields() for name, spec in self.models.items()}
        out["deployments"] = {name: spec.fields() for name, spec in self.deployments.items()}
        out["api_key"] = mask_key(self.api_key) if self.api_key else None
        out["accept_keys"] = [mask_key(key) for key in self.accept_keys]
        out["entra_token"] = mask_key(self.entra_token) if self.entra_token else None
        return out

    def keys(self) -> tuple[str, ...]:
        """Every key accepted; empty when no key is required."""
        if self.api_key is None and not self.accept_keys:
            return ()
        return tuple(k for k in (self.api_key, *self.accept_keys) if k is not None)


def _check_choices(config: SimConfig) -> None:
    """Options limited to a few values; raises ConfigError."""
    for name, allowed in (
        ("dialect", DIALECTS), ("azure_window", AZURE_WINDOWS), ("overload_status", OVERLOAD_STATUSES),
        ("tokenize_answer", TOKENIZE_ANSWERS),
    ):
        if getattr(config, name) not in allowed:
            raise ConfigError(f"{name}: expected one of {allowed}, got {getattr(config, name)!r}")
