"""URLs in the settings: the API root requests are sent to, and Redis URLs as they may be shown
(password redacted)."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from ratequeue.errors import ConfigError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"  # what every command but run/demo uses when none is set


def redact_url(url: str) -> str:
    """`url` with any password replaced by ``***`` (redis://:pw@host -> redis://:***@host)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = (parts.username or "") + ":***"
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc[-1]}"))


def normalize_base_url(raw: str, var: str = "OPENAI_BASE_URL") -> str:
    """The API root that ``/v1/...`` paths are appended to.

    Rule: trailing slashes are stripped, then one trailing ``/v1`` segment. So
    ``https://api.openai.com/v1/``, ``https://api.openai.com/v1`` and ``https://api.openai.com``
    all give ``https://api.openai.com``; ``https://x.openai.azure.com/openai/v1`` gives
    ``https://x.openai.azure.com/openai``. Raises ConfigError for a URL that is not http(s).
    """
    parts = urlsplit(raw.strip())
    # The value is not echoed: a base URL may carry credentials (https://user:pw@proxy).
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{var}: must be an http:// or https:// URL with a host")
    if parts.query or parts.fragment:
        raise ConfigError(f"{var}: must not have a query string or fragment")
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def shown_redis_url(url: str | None) -> str:
    """The Redis URL in use as it may be shown: ``url`` or the default, password redacted."""
    return redact_url(url or DEFAULT_REDIS_URL)
