"""The check before the first paid call: does the upstream take our API key at all?

`ratequeue run` and `submit` make one cheap authenticated request, ``GET {base_url}/v1/models``,
per distinct (base URL, key) the batch will use (one: the settings carry one of each). Without
it a refused key only shows as workers parking the pair, and a user sees ``0 req/min ETA ?``.
"""

from __future__ import annotations

import errno
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson

from ratequeue.config.accounts import Account, AccountTable
from ratequeue.config.settings import Settings
from ratequeue.config.urls import redact_url
from ratequeue.errors import InvalidRequestError, UpstreamUnusableError, UsageError

REFUSED_STATUSES = frozenset({401, 403})
DEFAULT_TIMEOUT = 5.0  # seconds; the check is one small GET, a server slower than this is not "reachable"


def shown_url(base_url: str) -> str:
    """The API root as users write it (``…/v1``), without any credentials a proxy URL may carry."""
    parts = urlsplit(base_url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path + "/v1", "", ""))


def _error_code(response: httpx.Response) -> str | None:
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) and code.isidentifier() else None


def _why_unreachable(exc: httpx.TransportError, timeout: float) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer within {timeout:g} s"
    cause: BaseException | None = exc
    while cause is not None:  # httpx wraps the OSError that says what happened
        if isinstance(cause, ConnectionRefusedError) or getattr(cause, "errno", None) == errno.ECONNREFUSED:
            return "connection refused"
        cause = cause.__cause__ or cause.__context__
    text = str(exc).lower()
    if "name or service not known" in text or "nodename nor servname" in text or "name resolution" in text:
        return "host name not found"
    return "connection refused" if "refused" in text else type(exc).__name__


def check_upstream(settings: Settings, timeout: float = DEFAULT_TIMEOUT) -> None:
    """One ``GET /v1/models`` with the settings' key; returns when the key is not refused.

    A server without that endpoint (404, 405), or one that answers with another error (429,
    5xx: the workers retry those), passes. Raises ``UpstreamUnusableError`` with a one-line
    message when the key is refused (401, 403) or the server cannot be reached; the message
    never holds the key.
    """
    headers = {"accept": "application/json"}
    if settings.api_key is not None:
        headers["authorization"] = f"Bearer {settings.api_key.reveal()}"
    if settings.organization:
        headers["openai-organization"] = settings.organization
    if settings.project:
        headers["openai-project"] = settings.project
    _check(settings.base_url + "/v1/models", shown_url(settings.base_url), headers, timeout, "set OPENAI_BASE_URL",
           None if settings.api_key is not None else "set OPENAI_API_KEY or OPENAI_API_KEY_FILE", "set OPENAI_API_KEY")


def check_account(account: Account, timeout: float = DEFAULT_TIMEOUT) -> None:
    """``check_upstream`` for an account of the models file's ``[accounts]`` (its URL, its key).

    An account whose key this process does not hold (``unusable``) is not checked: the workers
    that hold it send its jobs, and a submitter needs no key.
    """
    if account.unusable is not None:
        return
    if account.dialect == "azure":
        url = f"{account.base_url}/openai/models?api-version={account.api_version}"
        where = redact_url(account.base_url) + "/openai"
    else:
        url, where = account.base_url + "/v1/models", shown_url(account.base_url)
    hint = f"check accounts.{account.name} in RATEQUEUE_MODELS_FILE"
    no_key = None if account.credential is not None else f"{hint}: it names no key"
    _check(url, f"{where} (account {account.name})", {"accept": "application/json", **account.auth_headers()},
           timeout, hint, no_key, hint)


def _check(url: str, where: str, headers: dict[str, str], timeout: float, fix_url: str, no_key: str | None,
           fix_key: str) -> None:
    """GET `url`; raises UpstreamUnusableError when it cannot be reached or refuses the key
    (`no_key`: what to do when none was sent, None if one was)."""
    try:
        response = httpx.get(url, headers=headers, timeout=timeout)
    except httpx.TransportError as exc:
        raise UpstreamUnusableError(
            f"cannot reach upstream {where} ({_why_unreachable(exc, timeout)}); {fix_url}"
        ) from None  # the chained httpx error repeats the URL, credentials and all
    if response.status_code in REFUSED_STATUSES:
        code = _error_code(response)
        status = f"{response.status_code} {code}" if code else str(response.status_code)
        if no_key is not None:
            raise UpstreamUnusableError(f"upstream {where} wants an API key ({status}) and none is set; {no_key}")
        raise UpstreamUnusableError(f"upstream {where} refused the API key ({status}); {fix_key}")


def check_batch_upstream(settings: Settings, accounts: AccountTable, account: str | None = None) -> None:
    """The check of the upstream a batch's jobs go to: the environment's without [accounts], else
    its account's (`account`, or the default; none is checked when lines name their own)."""
    if accounts.implicit:
        check_upstream(settings)
        return
    try:
        found = accounts.default_account() if account is None else accounts.account(account)
    except InvalidRequestError as exc:
        raise UsageError(str(exc)) from None
    if found is not None:
        check_account(found)
