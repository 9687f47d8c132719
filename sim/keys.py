"""Which key a request came with, as a fingerprint: tests check "each job was sent with its own account's
key" from ``/sim/stats`` without the simulator ever storing, printing or returning a secret."""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Iterable

NO_KEY = "none"  # the fingerprint of a request that sent no key


@functools.lru_cache(maxsize=1024)  # a server sees a few keys, over and over: hash each once
def fingerprint(key: str | None) -> str:
    """A short stable digest of ``key`` (``"key-" + 12 hex digits of its SHA-256``); ``NO_KEY`` for none.

    Tests compute the same with ``ratequeue.sim.keys.fingerprint("sk-...")``.
    """
    if not key:
        return NO_KEY
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def bearer(authorization: str | None) -> str | None:
    """The token of ``Authorization: Bearer TOKEN``; None when absent or of another scheme."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def sent_key(authorization: str | None) -> str | None:
    """What a client offered as its key: the bearer token, else the whole header (a missing "Bearer ")."""
    if not authorization:
        return None
    return bearer(authorization) or authorization.strip() or None


def matches(key: str | None, accepted: Iterable[str]) -> bool:
    """Whether ``key`` is one of ``accepted`` (compared in constant time)."""
    if key is None:
        return False
    sent = key.encode()
    return any(hmac.compare_digest(sent, candidate.encode()) for candidate in accepted)
