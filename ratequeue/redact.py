"""Removing credentials from text that came from outside: upstream error messages and bodies.

An upstream (a proxy, a gateway, a self-hosted server) may echo the caller's key in an error
message. Anything derived from an upstream answer passes through here before it is stored in
Redis, logged or printed: the configured key(s) by exact match, and whatever looks like a key
(``sk-...`` keys of every kind, ``Bearer <token>``, Azure ``api-key`` values).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from ratequeue.config.settings import Settings

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_Answer = TypeVar("_Answer", bound="DataclassInstance")

__all__ = ["REDACTED", "SK_REDACTED", "configured_secrets", "redact", "redact_json", "redact_response"]

REDACTED = "[REDACTED]"
SK_REDACTED = "sk-...REDACTED"
MIN_SECRET = 8  # a shorter configured "key" would blank out ordinary words; it is no real key anyway

# Token characters of keys and bearer tokens (base64url, JWTs, OpenAI keys); no quote or backslash,
# so redacting the text of serialized JSON keeps it valid JSON.
_TOKEN = r"[A-Za-z0-9._~+/=-]"
_PATTERN = re.compile(
    # sk-..., sk-proj-..., sk-svcacct-..., sk-admin-...: OpenAI's (and others') secret key prefix;
    # "sk-...abcd" (already masked, with dots) is left alone.
    rf"(?P<sk>\bsk-[A-Za-z0-9_-]{{16,}})"
    rf"|(?P<bearer>\b[Bb]earer\s+){_TOKEN}{{8,}}"
    # Azure's api-key header or query parameter, also inside (escaped) JSON: "api_key": "..."
    rf"|(?P<apikey>\b(?i:(?:x-)?api[-_]key)\\?[\"']?\s*[:=]\s*\\?[\"']?){_TOKEN}{{8,}}"
)


def _replace(match: re.Match[str]) -> str:
    if match.group("sk"):
        return SK_REDACTED
    return (match.group("bearer") or match.group("apikey")) + REDACTED


def configured_secrets(settings: Settings) -> tuple[str, ...]:
    """The credentials of `settings` that must never be echoed back (the API key)."""
    return (settings.api_key.reveal(),) if settings.api_key is not None else ()


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with `secrets` (exact matches) and anything credential-shaped replaced by a marker."""
    for secret in secrets:
        if len(secret) >= MIN_SECRET and secret in text:
            text = text.replace(secret, REDACTED)
    return _PATTERN.sub(_replace, text)


def redact_json(value: Any, secrets: Iterable[str] = ()) -> Any:
    """A parsed JSON value with every string in it (object keys too) passed through ``redact``."""
    secrets = tuple(secrets)
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, dict):
        return {redact(k, secrets) if isinstance(k, str) else k: redact_json(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_json(v, secrets) for v in value]
    return value


def redact_response(resp: _Answer, secrets: Iterable[str] = ()) -> _Answer:
    """`resp` (a dataclass, the worker's ``UpstreamResponse``) with every text it carries redacted:
    what the worker keeps of a failed call.

    The body is walked as JSON; every other str or bytes field (the transport error, and whatever
    else describes the answer, such as the raw first bytes of a body that is not JSON) is redacted
    as text. Bytes go through ``surrogateescape`` so that what is not a secret stays byte for byte.
    """
    secrets = tuple(secrets)
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(resp):
        value = getattr(resp, f.name)
        if f.name == "body":
            changes[f.name] = redact_json(value, secrets)
        elif isinstance(value, str):
            changes[f.name] = redact(value, secrets)
        elif isinstance(value, bytes):
            shown = redact(value.decode("utf-8", "surrogateescape"), secrets)
            changes[f.name] = shown.encode("utf-8", "surrogateescape")
    return dataclasses.replace(resp, **changes)
