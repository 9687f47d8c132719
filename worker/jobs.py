"""A job as stored in Redis at submit: the request plus what the producer worked out about it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True)
class StoredJob:
    """One request of a batch. ``model`` is the model-table name whose bucket it draws from;
    ``charge`` the tokens the rate limiter debits; ``prompt_tokens`` our own count of the prompt."""

    custom_id: str
    line: int
    url: str
    body: dict[str, Any]
    model: str
    charge: int
    prompt_tokens: int

    def dumps(self) -> bytes:
        return orjson.dumps(
            {"l": self.line, "u": self.url, "b": self.body, "m": self.model, "c": self.charge, "p": self.prompt_tokens}
        )

    @classmethod
    def loads(cls, custom_id: str, raw: bytes | str) -> StoredJob:
        d = orjson.loads(raw)
        return cls(custom_id, d["l"], d["u"], d["b"], d["m"], d["c"], d["p"])
