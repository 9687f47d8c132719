"""Reading the API key from ``OPENAI_API_KEY`` or from the file ``OPENAI_API_KEY_FILE`` names.

Errors and warnings name the variable or the file, never the key.
"""

from __future__ import annotations

import logging
import stat
from pathlib import Path

from ratequeue.config.values import Secret
from ratequeue.errors import ConfigError

__all__ = ["read_api_key"]

log = logging.getLogger(__name__)


def read_api_key(direct: str | None, key_file: str | None) -> Secret | None:
    """The key from `direct` (OPENAI_API_KEY) or the file `key_file`; None when neither is set.

    Raises ConfigError for both set, an unreadable or empty file, or a key with whitespace. A key
    file that the group or others may read is still used, with a warning: refusing it would stop
    a running deployment over a chmod, but the key has leaked to every local account.
    """
    if direct is not None and key_file is not None:
        raise ConfigError("OPENAI_API_KEY and OPENAI_API_KEY_FILE are both set: set only one")
    source, value = "OPENAI_API_KEY", direct
    if key_file is not None:
        path = Path(key_file).expanduser()
        source = f"OPENAI_API_KEY_FILE={path}"
        try:
            value = path.read_text(encoding="utf-8").strip()
            mode = stat.S_IMODE(path.stat().st_mode)
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(f"{source}: cannot read the key file: {reason}") from None
        if not value:
            raise ConfigError(f"{source}: the key file is empty")
        if mode & 0o077:
            log.warning("%s: the key file has mode %04o: other users can read the key (chmod 600 it)", source, mode)
    if value is None:
        return None
    # A key goes into an Authorization header: whitespace inside it is a paste error, never valid.
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ConfigError(f"{source}: the key contains whitespace or control characters")
    return Secret(value)
