"""Who may call the API: tenants, each with the sha256 of its bearer token(s) and the accounts it
may spend, read from ``RATEQUEUE_API_TOKENS_FILE`` (TOML, or JSON for a ``.json`` name)::

    [tenants.reports]                       # a name of 1-64 letters, digits, '_' or '-'
    token_sha256 = "9f86d081..."            # printf %s "$TOKEN" | sha256sum; a list while rotating
    accounts = ["main"]                     # optional: aliases of RATEQUEUE_MODELS_FILE's [accounts]
    requests_per_minute = 600               # optional: more in one minute are answered 429

Only hashes are configured, never tokens: the file leaks nothing that authenticates. sha256 and
not a slow password hash because a bearer token is a random secret (no dictionary to try), and a
slow hash would cost every request. The presented token's hash is compared with every configured
one by ``hmac.compare_digest``, all of them each time, so the time taken tells nothing about which
(or how much of one) matched.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ratequeue.errors import ConfigError

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a Redis hash tag: no braces
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FIELDS = frozenset({"token_sha256", "accounts", "requests_per_minute"})


@dataclass(frozen=True)
class Tenant:
    """A caller of the API. ``accounts``: the aliases it may spend, its default first (empty: the
    configuration's default account only); ``requests_per_minute``: None for no limit."""

    name: str
    token_hashes: tuple[bytes, ...]
    accounts: tuple[str, ...] = ()
    requests_per_minute: int | None = None

    def __repr__(self) -> str:  # the hashes stay out of logs and tracebacks too
        return f"Tenant({self.name!r}, accounts={self.accounts!r}, requests_per_minute={self.requests_per_minute!r})"


def token_hash(token: str) -> bytes:
    """The sha256 of a bearer token, as raw bytes."""
    return hashlib.sha256(token.encode()).digest()


class Tenants:
    """The configured tenants; ``authenticate`` finds the one a bearer token belongs to."""

    def __init__(self, tenants: list[Tenant]) -> None:
        self._tenants = tenants

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._tenants)

    def authenticate(self, token: str | None) -> Tenant | None:
        """The tenant whose token this is, else None. Compares against every hash every time."""
        if not token:
            return None
        presented = token_hash(token)
        found = None
        for tenant in self._tenants:
            for configured in tenant.token_hashes:
                if hmac.compare_digest(presented, configured) and found is None:
                    found = tenant
        return found


def load_tenants(path: Path) -> Tenants:
    """Read the tenants file. Raises ``ConfigError`` naming the file, the tenant, the field and the
    reason (a hash is never echoed)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"RATEQUEUE_API_TOKENS_FILE={path}: cannot read it ({exc.strerror})") from None
    try:
        data = json.loads(raw) if path.suffix == ".json" else tomllib.loads(raw.decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {exc}") from None
    table = data.get("tenants") if isinstance(data, dict) else None
    if not isinstance(table, dict) or not table:
        raise ConfigError(f"{path}: no [tenants.NAME] table: define at least one tenant")
    tenants = [_tenant(path, name, fields) for name, fields in table.items()]
    seen: dict[bytes, str] = {}
    for tenant in tenants:
        for digest in tenant.token_hashes:
            if digest in seen:
                raise ConfigError(f"{path}: tenants {seen[digest]!r} and {tenant.name!r} share a token hash")
            seen[digest] = tenant.name
    return Tenants(tenants)


def _tenant(path: Path, name: str, fields: Any) -> Tenant:
    where = f"{path}: tenant {name!r}"
    if not _NAME.fullmatch(name):
        raise ConfigError(f"{where}: a tenant name is 1-64 letters, digits, '_' or '-'")
    if not isinstance(fields, Mapping):
        raise ConfigError(f"{where}: must be a table")
    if "token" in fields:
        raise ConfigError(f"{where}: field 'token': configure token_sha256 (the token's sha256), never the token")
    unknown = set(fields) - _FIELDS
    if unknown:
        known = ", ".join(sorted(_FIELDS))
        raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))} (known: {known})")
    hashes = fields.get("token_sha256")
    hashes = [hashes] if isinstance(hashes, str) else hashes
    if not isinstance(hashes, list) or not hashes:
        raise ConfigError(f"{where}: field 'token_sha256': missing (the hex sha256 of its bearer token)")
    for value in hashes:
        if not isinstance(value, str) or not _SHA256.fullmatch(value.lower()):
            raise ConfigError(f"{where}: field 'token_sha256': not 64 hex digits (printf %s \"$TOKEN\" | sha256sum)")
    accounts = fields.get("accounts", [])
    if not isinstance(accounts, list) or not all(isinstance(a, str) and a for a in accounts):
        raise ConfigError(f"{where}: field 'accounts': must be a list of account aliases")
    limit = fields.get("requests_per_minute")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ConfigError(f"{where}: field 'requests_per_minute': must be a whole number, 1 or more")
    return Tenant(name, tuple(bytes.fromhex(h.lower()) for h in hashes), tuple(accounts), limit)
