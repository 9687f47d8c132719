"""What a batch will cost and how long it must take, before anything is sent (issue 14: `ratequeue estimate`).

Every line is read and validated exactly as `submit` would (producer/batchfile.py), so the jobs and
their token counts are the ones the workers would reserve; no Redis and no upstream are needed.

- **Cost** at list price: the prompt tokens are known; the output is not, so it is given as a range,
  from nothing to every job's reserved maximum (n x max_tokens, or the model's max output where a
  line names none). Where the model has a cheaper cached-input price, the input's cost with every
  cacheable token served from the prompt cache is given too: OpenAI caches only prompts of 1,024
  tokens or more, in steps of 128 tokens (OpenAI cookbook, "Prompt Caching 201"), so a batch that
  repeats a long prefix (a shared system prompt) lands between the two figures.
- **Minimum wall time** per model: the batch cannot finish faster than its requests at the RPM
  limit or its rate-limit charge (by the configured charge rule) at the TPM limit, whichever is
  longer, with the limits of all the model's routes summed (times RATEQUEUE_MAX_SHARE, the part of
  them ratequeue may take). A model with no configured limits
  (a self-hosted server) has none: its pace is the server's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ratequeue.config.accounts import AccountTable
from ratequeue.config.settings import Settings
from ratequeue.jobstore.jobs import StoredJob
from ratequeue.producer.batchfile import Limits, LineError, LineValidator, read_lines
from ratequeue.producer.model_progress import ModelCounts, ModelLimits, limit_eta

SHOWN_ERRORS = 10  # rejected lines listed one by one; the rest are counted
CACHE_MIN_TOKENS = 1024  # OpenAI's prompt cache: prompts shorter than this are never cached
CACHE_STEP_TOKENS = 128  # ... and cache hits grow in steps of this many tokens


def cacheable_tokens(prompt_tokens: int) -> int:
    """The most of a prompt OpenAI's prompt cache can serve."""
    if prompt_tokens < CACHE_MIN_TOKENS:
        return 0
    return CACHE_MIN_TOKENS + (prompt_tokens - CACHE_MIN_TOKENS) // CACHE_STEP_TOKENS * CACHE_STEP_TOKENS


@dataclass
class ModelEstimate:
    """The jobs of one model: counts in tokens, costs in USD, limits per minute (0: none configured)."""

    model: str
    jobs: int = 0
    prompt_tokens: int = 0
    output_tokens_max: int = 0
    charge: int = 0
    input_usd: float = 0.0
    cached_input_usd: float | None = None
    output_usd_max: float = 0.0
    rpm: float = 0.0
    tpm: float = 0.0

    def _at_limits(self) -> tuple[float, str] | None:
        """The time the limits allow and the limit that binds (model_progress.limit_eta, the ETA's rule)."""
        if not self.rpm and not self.tpm:
            return None
        limits = ModelLimits(self.rpm, self.tpm, "configured")
        return limit_eta(ModelCounts(total=self.jobs, charge=self.charge), limits)

    @property
    def min_seconds(self) -> float | None:
        """The shortest time the limits allow (None: no limits configured, the server sets the pace)."""
        found = self._at_limits()
        return None if found is None else found[0]

    @property
    def binding(self) -> str:
        """Which limit sets the minimum wall time: "requests" or "tokens" ("" without limits)."""
        found = self._at_limits()
        return "" if found is None else {"RPM": "requests", "TPM": "tokens"}[found[1]]


@dataclass
class Estimate:
    """A batch file's estimate: per model, and the lines that would be rejected."""

    models: dict[str, ModelEstimate] = field(default_factory=dict)
    errors: list[LineError] = field(default_factory=list)
    rejected: int = 0

    @property
    def jobs(self) -> int:
        return sum(m.jobs for m in self.models.values())

    @property
    def cost_range_usd(self) -> tuple[float, float]:
        """Least and most the batch can cost at list price (no cached input; no output / every max output)."""
        low = sum(m.input_usd for m in self.models.values())
        return low, low + sum(m.output_usd_max for m in self.models.values())

    @property
    def min_seconds(self) -> float | None:
        """Models run side by side, each at its own limits: the slowest one bounds the batch."""
        known = [s for m in self.models.values() if (s := m.min_seconds) is not None]
        return max(known) if known else None

    def as_dict(self) -> dict[str, Any]:
        low, high = self.cost_range_usd
        return {
            "jobs": self.jobs, "rejected_lines": self.rejected, "cost_usd_min": round(low, 6),
            "cost_usd_max": round(high, 6), "min_seconds": self.min_seconds,
            "models": [{
                "model": m.model, "jobs": m.jobs, "prompt_tokens": m.prompt_tokens,
                "output_tokens_max": m.output_tokens_max, "rate_limit_charge": m.charge,
                "input_usd": round(m.input_usd, 6),
                "cached_input_usd": None if m.cached_input_usd is None else round(m.cached_input_usd, 6),
                "output_usd_max": round(m.output_usd_max, 6), "rpm": m.rpm, "tpm": m.tpm,
                "min_seconds": m.min_seconds, "binding_limit": m.binding or None,
            } for m in self.models.values()],
            "errors": [{"line": e.line, "custom_id": e.custom_id, "code": e.code, "param": e.param,
                        "message": e.message} for e in self.errors],
        }


def estimate_file(path: str | Path, accounts: AccountTable, settings: Settings, account: str | None = None) -> Estimate:
    """Read and validate `path` as `submit` would, and add up what its jobs need."""
    validator = LineValidator(accounts, account)
    limits = Limits(settings.max_file_bytes, settings.max_lines, settings.max_line_bytes)
    with open(path, "rb") as stream:
        return estimate_jobs(read_lines(stream, validator, limits), accounts, settings.max_share)


def estimate_jobs(items: Iterable[StoredJob | LineError], accounts: AccountTable, share: float = 1.0) -> Estimate:
    found = Estimate()
    for item in items:
        if isinstance(item, LineError):
            found.rejected += 1
            if len(found.errors) < SHOWN_ERRORS:
                found.errors.append(item)
            continue
        model = found.models.get(item.model)
        if model is None:
            model = found.models[item.model] = _new_model(item, accounts, share)
        _add(model, item, accounts)
    return found


def _new_model(job: StoredJob, accounts: AccountTable, share: float) -> ModelEstimate:
    routes = accounts.routes_for(job.model, job.account)
    model = ModelEstimate(job.model)
    if all(r.spec.limits_known for r in routes):
        model.rpm = share * sum(r.spec.rpm for r in routes)
        model.tpm = share * sum(r.spec.tpm for r in routes)
    if routes[0].spec.cached_input_per_1m < routes[0].spec.input_per_1m:
        model.cached_input_usd = 0.0
    return model


def _add(model: ModelEstimate, job: StoredJob, accounts: AccountTable) -> None:
    spec = accounts.routes_for(job.model, job.account)[0].spec
    model.jobs += 1
    model.prompt_tokens += job.prompt_tokens
    model.output_tokens_max += job.output_tokens
    model.charge += job.charge
    model.input_usd += spec.cost_usd(job.prompt_tokens)
    model.output_usd_max += spec.cost_usd(0, completion_tokens=job.output_tokens)
    if model.cached_input_usd is not None:
        model.cached_input_usd += spec.cost_usd(job.prompt_tokens, cached_tokens=cacheable_tokens(job.prompt_tokens))


def render(found: Estimate, source: str) -> list[str]:
    """The estimate as lines for a terminal: one per model, the batch's totals, then rejected lines."""
    from ratequeue.producer.progress import format_eta

    lines = [f"{source}: {found.jobs:,} jobs, {found.rejected:,} lines rejected"]
    for m in found.models.values():
        cached = ""  # said only where the cache can serve some of the prompts (1,024 tokens or more)
        if m.cached_input_usd is not None and m.cached_input_usd < m.input_usd:
            cached = f" (${m.cached_input_usd:,.4f} at best from the prompt cache)"
        if m.min_seconds is None:
            pace = "no limits configured: the server sets the pace"
        else:
            limit = f"{m.rpm:,.0f} RPM" if m.binding == "requests" else f"{m.tpm:,.0f} TPM"
            pace = f"at least {format_eta(m.min_seconds)} ({limit} binds)"
        jobs = f"{m.jobs:,} job{'s' if m.jobs != 1 else ''}"
        lines.append(f"  {m.model}: {jobs}, {m.prompt_tokens:,} prompt tokens, up to "
                     f"{m.output_tokens_max:,} output tokens; input ${m.input_usd:,.4f}{cached}, output up to "
                     f"${m.output_usd_max:,.4f}; {pace}")
    low, high = found.cost_range_usd
    lines.append(f"cost at list price: ${low:,.4f} (no output) to ${high:,.4f} (every job's max output)")
    lines.append(f"minimum wall time: {format_eta(found.min_seconds) if found.min_seconds is not None else '?'}"
                 " (models run side by side, each at its own limits)")
    for error in found.errors:
        lines.append(f"rejected: {error.message}")
    if found.rejected > len(found.errors):
        lines.append(f"... and {found.rejected - len(found.errors):,} more rejected lines")
    return lines
