"""Settings read from the environment. This is the only module of ratequeue that reads ``os.environ``.

Every variable is optional; an empty value counts as unset (``FOO=`` in a compose file). A bad value
raises :class:`ConfigError` naming the variable and the reason, never echoing a secret.

Per-model limit overrides come from ``RATEQUEUE_MODEL_<NAME>_<FIELD>``, where NAME is the model name
upper-cased with every non-alphanumeric character replaced by ``_`` (see :func:`mangle_model_name`)
and FIELD one of RPM, TPM, CONTEXT_WINDOW, MAX_OUTPUT_TOKENS, CHARGE_RULE, CHARGE_RULE_PINNED, e.g.
``RATEQUEUE_MODEL_GPT_4O_MINI_TPM=2000000``. They are matched to models by ``config.models``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from ratequeue.config.apikey import read_api_key
from ratequeue.config.envreader import EnvReader, parse_int
from ratequeue.config.unknown import warn_unknown
from ratequeue.config.urls import DEFAULT_REDIS_URL, normalize_base_url, redact_url, shown_redis_url
from ratequeue.config.values import FrozenMap, Secret, account_fingerprint
from ratequeue.errors import ConfigError

__all__ = [
    "CHARGE_RULES",
    "DEFAULT_BASE_URL",
    "DEFAULT_REDIS_URL",
    "FrozenMap",
    "Secret",
    "Settings",
    "load_settings",
    "mangle_model_name",
    "normalize_base_url",
    "parse_int",
    "redact_url",
    "shown_redis_url",
]

DEFAULT_BASE_URL = "https://api.openai.com/v1"
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_OVERRIDE_PREFIX = "RATEQUEUE_MODEL_"
# FIELD suffix of an override variable -> (ModelSpec field, value kind)
_OVERRIDE_FIELDS = {  # the longer suffix first: ..._CHARGE_RULE_PINNED is not a CHARGE_RULE
    "CHARGE_RULE_PINNED": ("charge_rule_pinned", "flag"),
    "MAX_OUTPUT_TOKENS": ("max_output_tokens", "int"),
    "CONTEXT_WINDOW": ("context_window", "int"),
    "CHARGE_RULE": ("charge_rule", "rule"),
    "RPM": ("rpm", "int"),
    "TPM": ("tpm", "int"),
}
CHARGE_RULES = ("sum", "max")


def mangle_model_name(name: str) -> str:
    """A model name as it appears in an override variable: ``gpt-4.1-mini`` -> ``GPT_4_1_MINI``."""
    return re.sub(r"[^A-Z0-9]", "_", name.upper())


@dataclass(frozen=True, repr=False)
class Settings:
    """Everything ratequeue reads from the environment. Times are seconds, sizes bytes."""

    redis_url: str | None = None  # None: the CLI starts an embedded Redis
    # rediss:// certificates are verified (system CAs, or this file's); insecure skips it, warned.
    redis_ca_file: Path | None = None
    redis_tls_insecure: bool = False
    api_key: Secret | None = None
    organization: str | None = None
    project: str | None = None
    # The root that request paths such as "/v1/chat/completions" are appended to, no trailing slash.
    base_url: str = "https://api.openai.com"
    models_file: Path | None = None
    data_dir: Path = field(default_factory=lambda: Path.home() / ".local" / "share" / "ratequeue")
    burst_seconds: float = 5.0
    reserve_horizon_seconds: float = 2.0
    max_in_flight: int = 1024  # upstream calls in flight per worker process
    # The most calls in flight per worker process for one pair whose server sends no rate-limit
    # headers (a self-hosted one): the ceiling of its adaptive concurrency window (worker.concurrency).
    max_concurrency_per_model: int = 64
    chunk_size: int = 50
    worker_slots: int = 32
    connect_timeout: float = 10.0
    read_timeout: float = 600.0
    max_attempts: int = 6
    # A chunk message whose run fails (not a Redis error) this many times is dead-lettered.
    max_chunk_failures: int = 5
    job_deadline_seconds: float = 3600.0
    max_file_bytes: int = 200_000_000
    max_lines: int = 50_000
    max_line_bytes: int = 8 * 1024 * 1024  # one input line, without its newline
    metrics_port: int | None = None
    # The address the worker's /metrics binds: loopback unless asked (compose sets 0.0.0.0).
    metrics_host: str = "127.0.0.1"
    log_level: str = "INFO"
    visibility_timeout: float = 1800.0
    # A job that would wait longer than this for capacity or a retry is moved to the deferred set.
    defer_after_seconds: float = 10.0
    # A parked (account, model) (quota exhausted, key refused, or told to wait longer than
    # park_retry_after_seconds) sends at most one probe request per park_cooldown_seconds.
    park_cooldown_seconds: float = 60.0
    park_retry_after_seconds: float = 300.0
    # A park never lasts longer than this, whatever wait the server asked for (100000 s paused a model for 27.8 h).
    park_max_cooldown_seconds: float = 3600.0
    # Largest upstream answer kept, both as sent on the wire and once decompressed (a gzip bomb).
    max_response_bytes: int = 32 << 20
    # On SIGTERM, calls in flight get this long to finish; then they are cancelled and their chunks requeued.
    shutdown_grace_seconds: float = 10.0
    # Take the RPM/TPM the server announces in x-ratelimit-limit-* over the model table's.
    learn_limits: bool = True
    # Size each bucket's burst by the server's window, read off its remaining/reset headers (issue 11);
    # off: burst_seconds is kept, whatever the server shows.
    learn_window: bool = True
    # Follow the charge rule the server is seen to apply (the model table's is the starting
    # guess); off pins the configured rule, and a mismatch is only logged (once per change).
    learn_charge_rule: bool = True
    # The part of every model's limits ratequeue may spend (0 < x <= 1): headroom left for other
    # clients of the account. What they actually spend is followed anyway (worker.reconciler).
    max_share: float = 1.0
    # A batch and every key of it are deleted from Redis this long after it ends (completed,
    # failed, cancelled, expired); 7 days, like the results of hosted batch APIs. Set per batch
    # when it is submitted (the producer's value is stored with it).
    retention_seconds: float = 7 * 86400.0
    # mangled model name -> {ModelSpec field: value}; excluded from the hash (a mapping is unhashable)
    model_overrides: Mapping[str, Mapping[str, int | str]] = field(
        default_factory=lambda: FrozenMap({}), hash=False
    )
    # Where Prometheus reaches this worker's /metrics ("host:port"), carried by its heartbeat and
    # listed by the exporter's /sd/workers; unset: this host's name and metrics_port.
    metrics_advertise: str | None = None
    # The day's budget in USD (UTC day), published by the exporter as ratequeue_budget_usd; unset: none.
    daily_budget_usd: float | None = None
    # `ratequeue api`: the tenants file (bearer-token hashes, accounts), the largest uploaded file
    # (bytes, refused with 413 while it streams) and the largest JSON request body.
    api_tokens_file: Path | None = None
    api_max_upload_bytes: int = 200_000_000
    api_max_json_bytes: int = 1 << 20

    @property
    def account_id(self) -> str:
        """A short stable id of the account whose limits the buckets track; never reveals the key."""
        key = self.api_key.reveal() if self.api_key is not None else "anonymous"
        return account_fingerprint(key, self.organization, self.base_url)

    def __repr__(self) -> str:
        shown = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "redis_url" and value is not None:
                value = redact_url(value)
            shown.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(shown)})"


def _read_api_key(env: EnvReader) -> Secret | None:
    return read_api_key(env.text("OPENAI_API_KEY"), env.text("OPENAI_API_KEY_FILE"))


def _split_override(var: str) -> tuple[str, str, str]:
    """``RATEQUEUE_MODEL_GPT_4O_TPM`` -> (``GPT_4O``, ``tpm``, ``int``). Raises ConfigError."""
    rest = var[len(_OVERRIDE_PREFIX) :].upper()
    for suffix, (spec_field, kind) in _OVERRIDE_FIELDS.items():
        if rest.endswith("_" + suffix) and len(rest) > len(suffix) + 1:
            return rest[: -len(suffix) - 1], spec_field, kind
    allowed = ", ".join(sorted(_OVERRIDE_FIELDS))
    raise ConfigError(f"{var}: expected RATEQUEUE_MODEL_<NAME>_<FIELD> with FIELD one of {allowed}")


def _read_overrides(env: Mapping[str, str]) -> Mapping[str, Mapping[str, int | str]]:
    overrides: dict[str, dict[str, int | str]] = {}
    for var, raw in env.items():
        if not var.startswith(_OVERRIDE_PREFIX) or not raw.strip():
            continue
        name, spec_field, kind = _split_override(var)
        value: int | str
        if kind == "int":
            value = parse_int(var, raw.strip(), minimum=1)
        elif kind == "flag":
            value = EnvReader(env).flag(var, False)
        else:
            value = raw.strip().lower()
            if value not in CHARGE_RULES:
                raise ConfigError(f"{var}={raw!r}: must be one of {', '.join(CHARGE_RULES)}")
        overrides.setdefault(name, {})[spec_field] = value
    return FrozenMap({k: FrozenMap(v) for k, v in sorted(overrides.items())})


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Settings from `env` (default ``os.environ``). Raises ConfigError naming the bad variable."""
    e = EnvReader(os.environ if env is None else env)
    redis_url = e.text("RATEQUEUE_REDIS_URL")
    if redis_url is not None and urlsplit(redis_url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError("RATEQUEUE_REDIS_URL: must be a redis://, rediss:// or unix:// URL")
    models_file = e.text("RATEQUEUE_MODELS_FILE")
    data_dir = e.text("RATEQUEUE_DATA_DIR")
    log_level = (e.text("RATEQUEUE_LOG_LEVEL") or "INFO").upper()
    if log_level not in _LOG_LEVELS:
        raise ConfigError(f"RATEQUEUE_LOG_LEVEL={log_level!r}: must be one of {', '.join(_LOG_LEVELS)}")
    defaults = Settings()
    settings = Settings(
        redis_url=redis_url,
        redis_ca_file=Path(ca_file).expanduser() if (ca_file := e.text("RATEQUEUE_REDIS_CA_FILE")) else None,
        redis_tls_insecure=e.flag("RATEQUEUE_REDIS_TLS_INSECURE", False),
        api_key=_read_api_key(e),
        organization=e.text("OPENAI_ORG_ID") or e.text("OPENAI_ORGANIZATION"),
        project=e.text("OPENAI_PROJECT_ID"),
        base_url=normalize_base_url(e.text("OPENAI_BASE_URL") or DEFAULT_BASE_URL),
        models_file=Path(models_file).expanduser() if models_file else None,
        data_dir=Path(data_dir).expanduser() if data_dir else defaults.data_dir,
        burst_seconds=e.number("RATEQUEUE_BURST_SECONDS", defaults.burst_seconds),
        reserve_horizon_seconds=e.number(
            "RATEQUEUE_RESERVE_HORIZON", defaults.reserve_horizon_seconds, allow_zero=True
        ),
        max_in_flight=e.integer_default("RATEQUEUE_MAX_IN_FLIGHT", defaults.max_in_flight),
        max_concurrency_per_model=e.integer_default(
            "RATEQUEUE_MAX_CONCURRENCY_PER_MODEL", defaults.max_concurrency_per_model
        ),
        chunk_size=e.integer_default("RATEQUEUE_CHUNK_SIZE", defaults.chunk_size),
        worker_slots=e.integer_default("RATEQUEUE_WORKER_SLOTS", defaults.worker_slots),
        connect_timeout=e.number("RATEQUEUE_CONNECT_TIMEOUT", defaults.connect_timeout),
        read_timeout=e.number("RATEQUEUE_READ_TIMEOUT", defaults.read_timeout),
        max_attempts=e.integer_default("RATEQUEUE_MAX_ATTEMPTS", defaults.max_attempts),
        max_chunk_failures=e.integer_default("RATEQUEUE_MAX_CHUNK_FAILURES", defaults.max_chunk_failures),
        job_deadline_seconds=e.number("RATEQUEUE_JOB_DEADLINE", defaults.job_deadline_seconds),
        max_file_bytes=e.integer_default("RATEQUEUE_MAX_FILE_BYTES", defaults.max_file_bytes),
        max_lines=e.integer_default("RATEQUEUE_MAX_LINES", defaults.max_lines),
        max_line_bytes=e.integer_default("RATEQUEUE_MAX_LINE_BYTES", defaults.max_line_bytes),
        metrics_port=e.integer("RATEQUEUE_METRICS_PORT", None, minimum=1, maximum=65535),
        metrics_host=e.bind_address("RATEQUEUE_METRICS_HOST", defaults.metrics_host),
        log_level=log_level,
        visibility_timeout=e.number("RATEQUEUE_VISIBILITY_TIMEOUT", defaults.visibility_timeout),
        defer_after_seconds=e.number("RATEQUEUE_DEFER_AFTER", defaults.defer_after_seconds),
        park_cooldown_seconds=e.number("RATEQUEUE_PARK_COOLDOWN", defaults.park_cooldown_seconds),
        park_retry_after_seconds=e.number("RATEQUEUE_PARK_RETRY_AFTER", defaults.park_retry_after_seconds),
        park_max_cooldown_seconds=e.number("RATEQUEUE_PARK_MAX_COOLDOWN", defaults.park_max_cooldown_seconds),
        max_response_bytes=e.integer_default("RATEQUEUE_MAX_RESPONSE_BYTES", defaults.max_response_bytes),
        shutdown_grace_seconds=e.number("RATEQUEUE_SHUTDOWN_GRACE", defaults.shutdown_grace_seconds, allow_zero=True),
        learn_limits=e.flag("RATEQUEUE_LEARN_LIMITS", True),
        learn_window=e.flag("RATEQUEUE_LEARN_WINDOW", True),
        learn_charge_rule=e.flag("RATEQUEUE_LEARN_CHARGE_RULE", True),
        max_share=e.share("RATEQUEUE_MAX_SHARE", defaults.max_share),
        retention_seconds=e.number("RATEQUEUE_RETENTION_SECONDS", defaults.retention_seconds),
        model_overrides=_read_overrides(e.env),
        metrics_advertise=e.address("RATEQUEUE_METRICS_ADVERTISE"),
        daily_budget_usd=e.budget("RATEQUEUE_DAILY_BUDGET_USD"),
        api_tokens_file=Path(tokens).expanduser() if (tokens := e.text("RATEQUEUE_API_TOKENS_FILE")) else None,
        api_max_upload_bytes=e.integer_default("RATEQUEUE_API_MAX_UPLOAD_BYTES", defaults.api_max_upload_bytes),
        api_max_json_bytes=e.integer_default("RATEQUEUE_API_MAX_JSON_BYTES", defaults.api_max_json_bytes),
    )
    warn_unknown(e.env, e.read)
    # A task still running when the broker's visibility timeout ends is delivered again: a duplicate
    # upstream call. One upstream call can take the whole read timeout, so the timeout must exceed it.
    if settings.visibility_timeout <= settings.read_timeout:
        raise ConfigError(
            f"RATEQUEUE_VISIBILITY_TIMEOUT={settings.visibility_timeout:g} must exceed "
            f"RATEQUEUE_READ_TIMEOUT={settings.read_timeout:g}, or running tasks are redelivered"
        )
    if settings.defer_after_seconds >= settings.visibility_timeout:
        raise ConfigError(
            f"RATEQUEUE_DEFER_AFTER={settings.defer_after_seconds:g} must be below "
            f"RATEQUEUE_VISIBILITY_TIMEOUT={settings.visibility_timeout:g}"
        )
    return settings


def environment() -> Mapping[str, str]:
    """The process environment, for loaders that resolve the variables a configuration file names
    (an account's ``api_key_env``, config/accounts_load.py): this module stays the one reading it."""
    return os.environ


def debug_requested(env: Mapping[str, str] | None = None) -> bool:
    """``RATEQUEUE_DEBUG`` is on: the CLI shows tracebacks instead of one-line errors."""
    try:
        return EnvReader(os.environ if env is None else env).flag("RATEQUEUE_DEBUG", False)
    except ConfigError:
        return False
