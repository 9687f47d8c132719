"""An account's own limits per model (``[accounts.<alias>.models."<model>"]``, rpm and/or tpm).

OpenAI's limits depend on the organization's usage tier, so two keys of different tiers serving
the same model have different limits: each account's bucket is sized by its own figures, those of
the model table where it names none. Azure deployments carry their limits in ``deployments``.

    [accounts.tier1.models."gpt-4o-mini"]
    rpm = 500
    tpm = 200000
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ratequeue.config.models import ModelSpec, ModelTable
from ratequeue.config.tomlsource import INTEGER, KeyPath, Problems, check_fields, kind_of
from ratequeue.errors import UnknownModelError

__all__ = ["AccountLimits", "read_account_limits"]

_FIELDS = {"rpm": INTEGER, "tpm": INTEGER}


@dataclass(frozen=True, slots=True)
class AccountLimits:
    """One account's limits for one model; None keeps the model table's figure."""

    rpm: int | None = None
    tpm: int | None = None

    def applied(self, spec: ModelSpec) -> ModelSpec:
        """`spec` with these limits in place of its own."""
        return dataclasses.replace(spec, rpm=self.rpm or spec.rpm, tpm=self.tpm or spec.tpm, limits_known=True)


def read_account_limits(p: Problems, path: KeyPath, raw: Any, table: ModelTable,
                        any_name: bool) -> dict[str, AccountLimits]:
    """The ``models`` table of the account at `path`: model -> its limits, keyed by the model table's
    canonical name (a snapshot shares its model's bucket, so its model's limits). `any_name`: the
    account serves models the table lacks (openai-compatible), keyed as written. Problems go to `p`."""
    found: dict[str, AccountLimits] = {}
    written_at: dict[str, int] = {}
    if not isinstance(raw, dict):
        return found
    for model, fields in raw.items():
        mpath = (*path, "models", model)
        if not isinstance(fields, dict):
            p.add(mpath, f"must be a table (rpm = ..., tpm = ...), got {kind_of(fields)}")
            continue
        before = len(p)
        check_fields(p, mpath, fields, _FIELDS)
        if len(p) == before and not fields.keys() & _FIELDS.keys():
            p.add(mpath, "set rpm, tpm or both")
        canonical = model
        if model in table:
            canonical = table.resolve(model)
        elif not any_name:
            p.add(mpath, str(UnknownModelError(model)))
            continue
        if canonical in found or canonical in written_at:
            p.add(mpath, f"{canonical}'s limits are set already (line {written_at[canonical]}): "
                  "a snapshot shares its model's")
            continue
        written_at[canonical] = p.line(mpath)
        if len(p) == before:
            found[canonical] = AccountLimits(fields.get("rpm"), fields.get("tpm"))
    return found

