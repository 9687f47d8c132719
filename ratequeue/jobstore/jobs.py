"""A job as stored in Redis at submit: the request plus what the producer worked out about it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from ratequeue.config.charge import ChargeRule

# The body fields naming a request's max output (chat prefers max_completion_tokens).
MAX_OUTPUT_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")


@dataclass(frozen=True)
class StoredJob:
    """One request of a batch. ``model`` is the model-table name whose bucket it draws from;
    ``charge`` the tokens the rate limiter debits (by the model's charge rule at submit);
    ``prompt_tokens`` our own count of the prompt; ``output_tokens`` the output it reserves
    (n x max tokens), so the charge can be worked out again under the other rule. ``account`` is
    the alias of the account it is sent with (config/accounts.py); None: the default account (and
    every job of a configuration without ``[accounts]``, whose stored form is as before)."""

    custom_id: str
    line: int
    url: str
    body: dict[str, Any]
    model: str
    charge: int
    prompt_tokens: int
    output_tokens: int = 0
    account: str | None = None

    def dumps(self) -> bytes:
        fields = {"l": self.line, "u": self.url, "b": self.body, "m": self.model, "c": self.charge,
                  "p": self.prompt_tokens, "o": self.output_tokens}
        if self.account is not None:
            fields["a"] = self.account
        return orjson.dumps(fields)

    @classmethod
    def loads(cls, custom_id: str, raw: bytes | str) -> StoredJob:
        d = orjson.loads(raw)
        return cls(custom_id, d["l"], d["u"], d["b"], d["m"], d["c"], d["p"], d.get("o", 0), d.get("a"))

    def charge_under(self, rule: ChargeRule | str) -> int:
        """The rate-limit charge under ``rule`` (config/charge.py; "sum" or "max" for the
        default of the other dimensions)."""
        if not self.output_tokens:  # embeddings (prompt only), or a job stored before outputs were
            return self.charge
        rule = ChargeRule(rule) if isinstance(rule, str) else rule
        return rule.price(self.prompt_tokens, self.output_tokens, self.choices, self.output_defaulted)

    @property
    def choices(self) -> int:
        """Outputs generated per prompt: ``n`` (``best_of`` if larger, for /v1/completions)."""
        if self.url.rstrip("/").endswith("/responses"):
            return 1
        counts = [self.body.get(k) for k in ("n", "best_of")]
        return max([c for c in counts if type(c) is int and c > 0] or [1])

    @property
    def output_defaulted(self) -> bool:
        """No max output named: the server charges its own default allowance per choice (the
        16 tokens /v1/completions documents are known: not defaulted here)."""
        path = self.url.split("?", 1)[0].rstrip("/")
        if not self.output_tokens or (path.endswith("/completions") and not path.endswith("/chat/completions")):
            return False
        return all(self.body.get(k) is None for k in MAX_OUTPUT_FIELDS)
