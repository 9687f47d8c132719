"""TLS for every Redis connection (Celery's broker and redis-py's clients): verified by default.

A ``rediss://`` URL means TLS with the server's certificate checked against the system CAs, or
against ``RATEQUEUE_REDIS_CA_FILE`` when set, and its name against the URL's host. kombu, left to
itself, connects to a plain ``rediss://`` broker without checking anything (it only logs a
warning), so the broker gets these options explicitly (Celery's ``broker_use_ssl``).

Skipping the checks takes an explicit opt-out, ``RATEQUEUE_REDIS_TLS_INSECURE=1`` or
``ssl_cert_reqs=none`` in the URL's query, and is logged as a warning.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ratequeue.config.settings import Settings

__all__ = ["broker_use_ssl", "redis_options", "tls_options"]

log = logging.getLogger(__name__)
_warned: set[str] = set()
_INSECURE_VALUES = ("none", "cert_none")


def tls_options(settings: Settings) -> dict[str, Any] | None:
    """The TLS options (redis-py's and kombu's names) of ``settings.redis_url``; None without TLS."""
    url = settings.redis_url or ""
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        return None
    asked = parse_qs(parts.query).get("ssl_cert_reqs", [""])[-1].lower()
    if settings.redis_tls_insecure or asked in _INSECURE_VALUES:
        if parts.netloc not in _warned:  # once per process and host, not per client made
            _warned.add(parts.netloc)
            log.warning(
                "Redis TLS certificate checks are off (%s): anyone on the path can read and change the "
                "queue and the stored results", "RATEQUEUE_REDIS_TLS_INSECURE" if settings.redis_tls_insecure
                else "ssl_cert_reqs=none in RATEQUEUE_REDIS_URL",
            )
        return {"ssl_cert_reqs": ssl.CERT_NONE, "ssl_check_hostname": False}
    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True}
    if settings.redis_ca_file is not None:
        options["ssl_ca_certs"] = str(settings.redis_ca_file)
    return options


def broker_use_ssl(settings: Settings) -> dict[str, Any] | None:
    """Celery's ``broker_use_ssl`` for ``settings``: None (no TLS) unless the URL is rediss://."""
    return tls_options(settings)


def redis_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``redis.Redis.from_url`` (and the asyncio pool's) of ``settings``."""
    return tls_options(settings) or {}
