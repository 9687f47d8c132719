"""Reading secrets: the API key from ``OPENAI_API_KEY`` or the file ``OPENAI_API_KEY_FILE`` names, an
account's key from the variable or file its configuration names (config/accounts_load.py), and a
bearer token from a file that something else renews (:class:`TokenFile`).

Errors and warnings name the variable, the file or the configuration field, never the secret.
"""

from __future__ import annotations

import logging
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from ratequeue.config.values import Secret
from ratequeue.errors import ConfigError

__all__ = ["Credential", "TokenFile", "checked_secret", "looks_like_a_key", "read_api_key", "read_secret_file"]

log = logging.getLogger(__name__)

# A key's random part: 20 letters and digits in a row (Azure's 32 hex digits, an sk- key's tail, each
# segment of a JWT). Names of variables and files split their words with _ - . / well before that.
_KEY_RUN = re.compile(r"[A-Za-z0-9]{20,}")


def looks_like_a_key(text: str) -> bool:
    """Could `text`, written where the name of a variable or file belongs, be the key itself?"""
    return any(re.search(r"\d", run) and re.search(r"[A-Za-z]", run) for run in _KEY_RUN.findall(text))


def read_secret_file(path: Path, source: str) -> str:
    """The stripped text of the secret file `path`; `source` names it in errors and warnings.

    Raises ConfigError for an unreadable or empty file. A file that the group or others may read
    is still used, with a warning: refusing it would stop a running deployment over a chmod, but
    the secret has leaked to every local account.
    """
    try:
        value = path.read_text(encoding="utf-8-sig").strip()  # -sig: a BOM (PowerShell 5) is no part of the key
        mode = stat.S_IMODE(path.stat().st_mode)
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{source}: cannot read the key file: {reason}") from None
    if not value:
        raise ConfigError(f"{source}: the key file is empty")
    if mode & 0o077:
        log.warning("%s: the key file has mode %04o: other users can read the key (chmod 600 it)", source, mode)
    return value


def checked_secret(value: str, source: str) -> Secret:
    """`value` as a Secret. Raises ConfigError (naming `source`) for whitespace or control characters:
    a key goes into a header, where whitespace is a paste error, never valid."""
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ConfigError(f"{source}: the key contains whitespace or control characters")
    return Secret(value)


def read_api_key(direct: str | None, key_file: str | None) -> Secret | None:
    """The key from `direct` (OPENAI_API_KEY) or the file `key_file`; None when neither is set.

    Raises ConfigError for both set, an unreadable or empty file, or a key with whitespace.
    """
    if direct is not None and key_file is not None:
        raise ConfigError("OPENAI_API_KEY and OPENAI_API_KEY_FILE are both set: set only one")
    if key_file is not None:
        path = Path(key_file).expanduser()
        source = f"OPENAI_API_KEY_FILE={path}"
        return checked_secret(read_secret_file(path, source), source)
    return None if direct is None else checked_secret(direct, "OPENAI_API_KEY")


class TokenFile:
    """A bearer token kept in a file that something else renews (e.g. a sidecar writing an Entra ID
    access token for Azure OpenAI; not workload identity's federated token file, which must first be
    exchanged for one): read at start, then read again whenever the file changes, looked at most
    once per `check_seconds`. A renewal that cannot be read keeps the last good token, with a warning: the
    old token may still be valid, and a failed call says so anyway.
    """

    def __init__(self, path: Path, source: str, check_seconds: float = 1.0) -> None:
        self.path = path
        self.source = source
        self._check_seconds = check_seconds
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._secret = self._read()  # raises ConfigError: a token that cannot be read at start is a setup error

    def _read(self) -> Secret:
        st = self.path.stat() if self.path.exists() else None
        secret = checked_secret(read_secret_file(self.path, self.source), self.source)
        self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino) if st else None
        return secret

    def current(self) -> Secret:
        """The token, read again if the file changed since it was last read."""
        now = time.monotonic()
        if now - self._checked < self._check_seconds:
            return self._secret
        self._checked = now
        try:
            st = self.path.stat()
            if (st.st_mtime_ns, st.st_size, st.st_ino) != self._stamp:
                self._secret = self._read()
        except (OSError, ConfigError) as exc:
            log.warning("%s: cannot read the renewed token, keeping the last one: %s", self.source,
                        exc.strerror if isinstance(exc, OSError) else exc)
        return self._secret

    def __repr__(self) -> str:
        return f"TokenFile({self.source!r})"


@dataclass(frozen=True, repr=False)
class Credential:
    """An account's secret: a key read once at load, or a bearer token file re-read when it changes."""

    header: str  # "authorization" (sent as Bearer) or "api-key" (Azure)
    source: str  # where the secret comes from, as it may be shown: "$AZURE_EU_KEY", "file /run/secrets/k"
    secret: Secret | None = None
    token_file: TokenFile | None = None

    def value(self) -> str:
        """The secret itself (the token file's current content)."""
        current = self.token_file.current() if self.token_file is not None else self.secret
        assert current is not None, "a Credential holds a secret or a token file"
        return current.reveal()

    def __repr__(self) -> str:
        return f"Credential({self.header} from {self.source})"
