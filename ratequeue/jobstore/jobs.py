"""A job as stored in Redis at submit: the request plus what the producer worked out about it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True)
class StoredJob:
    """One request of a batch. ``model`` is the model-table name whose bucket it draws from;
    ``charge`` the tokens the rate limiter debits (by the model's charge rule at submit);
    ``prompt_tokens`` our own count of the prompt; ``output_tokens`` the output it reserves
    (n x max tokens), so the charge can be worked out again under the other rule."""

    custom_id: str
    line: int
    url: str
    body: dict[str, Any]
    model: str
    charge: int
    prompt_tokens: int
    output_tokens: int = 0

    def dumps(self) -> bytes:
        return orjson.dumps(
            {"l": self.line, "u": self.url, "b": self.body, "m": self.model, "c": self.charge,
             "p": self.prompt_tokens, "o": self.output_tokens}
        )

    @classmethod
    def loads(cls, custom_id: str, raw: bytes | str) -> StoredJob:
        d = orjson.loads(raw)
        return cls(custom_id, d["l"], d["u"], d["b"], d["m"], d["c"], d["p"], d.get("o", 0))

    def charge_under(self, rule: str) -> int:
        """The rate-limit charge under ``rule``: "sum" (prompt + output) or "max" (the larger)."""
        if not self.output_tokens:  # embeddings (prompt only), or a job stored before outputs were
            return self.charge
        if rule == "max":
            return max(self.prompt_tokens, self.output_tokens)
        return self.prompt_tokens + self.output_tokens
