"""Accounts, Azure deployments and routes: where a job's request goes, with which credentials, under
which limits and into which bucket. Read from the models file by ``config/accounts_load.py``.

The configuration (in ``RATEQUEUE_MODELS_FILE``, beside ``[models.*]``; README "Accounts and routes")::

    default_account = "openai"                # optional; the only account is the default anyway
    [accounts.openai]                         # the alias jobs name ("account": "openai")
    dialect = "openai"                        # openai (default) | azure | openai-compatible
    api_key_env = "OPENAI_API_KEY"            # or api_key_file = "/run/secrets/k", or bearer_token_file
    organization = "org-..."                  # openai only, like project
    [accounts.openai.models."gpt-4o-mini"]   # its own limits (its usage tier); the table's where absent
    rpm = 500
    tpm = 200000
    [accounts.azure-eu]
    dialect = "azure"
    base_url = "https://myres-eu.openai.azure.com"
    api_version = "2024-10-21"
    api_key_env = "AZURE_EU_KEY"              # or bearer_token_file (Entra ID), re-read when it changes
    [accounts.azure-eu.deployments.gpt-4o-mini]   # logical model -> deployment (azure only)
    deployment = "gpt4omini-eu"
    tpm = 200000                              # rpm: 6 per 1,000 TPM unless set; window_seconds: 1 unless set
    [accounts.gpu]
    dialect = "openai-compatible"             # any model name; no key needed
    base_url = "http://gpu1:8000"
    encoding = "cl100k_base"                  # tokenize = "server": count with the server's /tokenize
    max_concurrency = 64                      # ceiling of the adaptive concurrency window
    [routes]
    "gpt-4o-mini" = ["openai", "azure-eu"]    # entries: an alias, or {account = "gpu", model = "name there"}

Without ``[accounts]`` there is one implicit account, ``default``, built from the environment exactly
as before (OPENAI_BASE_URL, OPENAI_API_KEY[_FILE], OPENAI_ORG_ID, OPENAI_PROJECT_ID), whose bucket id
is ``Settings.account_id``: existing buckets keep their keys.

The API the worker and producer use (:class:`AccountTable`):

- ``account(name=None) -> Account``: a job's account (None: the default). ``Account.auth_headers()``
  gives its headers: ``authorization: Bearer`` (openai, openai-compatible, any bearer token), Azure's
  ``api-key``, or none; plus ``openai-organization`` / ``openai-project``. ``Account.unusable`` says why
  this process holds no credentials for it (a job of it is parked with that reason).
- ``routes_for(model, account=None) -> tuple[Route, ...]``: where a job may go: the ``[routes]`` entries of
  its model (only its account's when it names one), else its account's own route. Raises
  InvalidRequestError (field ``account`` or ``body.model``) or UnknownModelError.
- A :class:`Route` carries ``spec`` (the ModelSpec to count, price and limit with: on Azure the
  deployment's rpm/tpm; ``spec.limits_known`` False for a self-hosted model nothing describes),
  ``window_seconds`` (the most seconds of limit its bucket may hold), ``max_concurrency``,
  ``pair`` (bucket account id, bucket model; never the key), ``url(path)`` (``/v1/chat/completions`` ->
  the full URL; Azure ``/openai/deployments/{d}/chat/completions?api-version=...``) and ``target``
  (the model to put in the request body).
- ``all_routes()`` (every configured route, for metrics), ``secrets()`` (for redaction).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from urllib.parse import quote

from ratequeue.config.account_limits import AccountLimits
from ratequeue.config.apikey import Credential
from ratequeue.config.models import GENERIC_CONTEXT_WINDOW, GENERIC_ENCODING, ModelSpec, ModelTable, generic_spec
from ratequeue.config.urls import redact_url
from ratequeue.config.values import FrozenMap
from ratequeue.errors import InvalidRequestError

__all__ = ["DIALECTS", "IMPLICIT", "Account", "AccountTable", "Credential", "Deployment", "Route", "RouteEntry"]

DIALECTS = ("openai", "azure", "openai-compatible")
IMPLICIT = "default"  # the name of the account built from the environment when the file has no [accounts]
# OpenAI paths -> the operation under /openai/deployments/{deployment}/ (Azure's inference API).
_AZURE_OPERATIONS = {"/v1/chat/completions": "chat/completions", "/v1/completions": "completions",
                     "/v1/embeddings": "embeddings"}
_MAX_CACHED = 10_000  # routes_for results kept: model names come from user input


@dataclass(frozen=True, slots=True)
class Deployment:
    """An Azure deployment of a logical model, with the limits Azure enforces on it."""

    model: str  # the logical model (its key in the account's deployments table)
    name: str  # the deployment's name on the resource: the URL's {deployment} and the bucket's model
    tpm: int
    rpm: int  # 6 per 1,000 TPM unless configured (Azure's ratio for chat models)
    window_seconds: float  # Azure enforces over 1 s or 10 s: the bucket never holds more than this
    encoding: str | None = None  # for a model the table does not describe


@dataclass(frozen=True, repr=False)
class Account:
    """One set of credentials on one server. ``bucket_id`` names its buckets and never reveals a key."""

    name: str
    dialect: str
    base_url: str  # the root "/v1/..." (or Azure's "/openai/...") paths are appended to
    bucket_id: str
    credential: Credential | None = None
    organization: str | None = None
    project: str | None = None
    api_version: str | None = None  # azure
    deployments: Mapping[str, Deployment] = field(default_factory=lambda: FrozenMap({}), hash=False)
    encoding: str = GENERIC_ENCODING  # openai-compatible: counts the tokens of models the table lacks
    tokenize: str = "local"  # openai-compatible: "server" counts with the server's /tokenize
    max_concurrency: int | None = None  # openai-compatible: ceiling of the adaptive window
    context_window: int = GENERIC_CONTEXT_WINDOW  # openai-compatible: of models the table lacks
    # Why this process cannot send for it (its key's variable is unset here, load_account_table's
    # require_credentials=False). Its bucket_id is the senders' all the same: it never depends on the key.
    unusable: str | None = None
    implicit: bool = False  # built from the environment (no [accounts] table)
    # Its own limits per model (canonical name), e.g. of its usage tier; the table's where absent.
    limits: Mapping[str, AccountLimits] = field(default_factory=lambda: FrozenMap({}), hash=False)

    def auth_headers(self) -> dict[str, str]:
        """The headers that authenticate a request of this account (none without credentials). Ask
        per request, not once: a token file may have been renewed since (checked at most once a second)."""
        headers: dict[str, str] = {}
        if self.credential is not None and self.unusable is None:
            value = self.credential.value()
            headers[self.credential.header] = f"Bearer {value}" if self.credential.header == "authorization" else value
        if self.organization:
            headers["openai-organization"] = self.organization
        if self.project:
            headers["openai-project"] = self.project
        return headers

    def __repr__(self) -> str:
        shown = f"Account({self.name!r}, {self.dialect}, {redact_url(self.base_url)}, bucket {self.bucket_id}"
        shown += f", {self.credential!r}" if self.credential else ", no credentials"
        return shown + (f", unusable: {self.unusable})" if self.unusable else ")")


@dataclass(frozen=True, slots=True)
class RouteEntry:
    """One entry of a [routes] list: an account, and the model's name there (None: the same name)."""

    account: str
    model: str | None = None


@dataclass(frozen=True, slots=True)
class Route:
    """One way to serve a job: an account and the model (or Azure deployment) on it, with its limits."""

    account: Account
    model: str  # the logical model the job named
    target: str  # the model named in the request body; on Azure the deployment
    spec: ModelSpec  # counting, prices and limits (rpm/tpm are the deployment's on Azure)
    window_seconds: float | None = None  # the most seconds of limit the bucket may hold; None: the settings'
    max_concurrency: int | None = None  # the adaptive concurrency window's ceiling (openai-compatible)

    @property
    def pair(self) -> tuple[str, str]:
        """(account, model) of this route's bucket, parking and learned limits: the Azure deployment,
        else the canonical model name (snapshots share their model's bucket, as its limits)."""
        return self.account.bucket_id, self.target if self.account.dialect == "azure" else self.spec.name

    @property
    def name(self) -> str:
        """``account/target``: how status and logs show the route."""
        return f"{self.account.name}/{self.target}"

    def url(self, path: str) -> str:
        """The full URL of a request the job names by its OpenAI path (``/v1/chat/completions``).

        Azure: ``/openai/deployments/{deployment}/chat/completions?api-version=...`` (completions and
        embeddings alike); ``/v1/responses`` goes to ``/openai/responses`` with the deployment as the
        body's model. Raises InvalidRequestError for a path Azure has no deployment operation for.
        """
        path = "/" + path.split("?", 1)[0].strip("/")
        path = path if path.startswith("/v1/") else "/v1" + path
        account = self.account
        if account.dialect != "azure":
            return account.base_url + path
        version = f"?api-version={quote(account.api_version or '', safe='')}"
        if path == "/v1/responses":
            return f"{account.base_url}/openai/responses{version}"
        operation = _AZURE_OPERATIONS.get(path)
        if operation is None:
            raise InvalidRequestError("url", f"Azure deployments do not serve {path}", code="unsupported_endpoint")
        return f"{account.base_url}/openai/deployments/{quote(self.target, safe='')}/{operation}{version}"


class AccountTable:
    """The accounts of one configuration, the [routes] between them, and the model table they serve."""

    def __init__(
        self,
        accounts: Mapping[str, Account],
        table: ModelTable,
        routes: Mapping[str, tuple[RouteEntry, ...]] | None = None,
        default: str | None = None,
    ) -> None:
        self._accounts = dict(accounts)
        self.table = table
        self._routes = dict(routes or {})
        self._default = default if default is not None else (next(iter(accounts)) if len(accounts) == 1 else None)
        self._cache: dict[tuple[str, str | None], tuple[Route, ...]] = {}

    @property
    def implicit(self) -> bool:
        """No [accounts] table: the one account comes from the environment."""
        return any(a.implicit for a in self._accounts.values())

    def names(self) -> list[str]:
        """The accounts' aliases, sorted."""
        return sorted(self._accounts)

    def __iter__(self) -> Iterator[Account]:
        return (self._accounts[name] for name in self.names())

    def default_account(self) -> Account | None:
        """The account of a job that names none: ``default_account``, or the only one; None if neither."""
        return None if self._default is None else self._accounts[self._default]

    def account(self, name: str | None = None) -> Account:
        """The account `name` (None: the default). Raises InvalidRequestError (field ``account``)."""
        if name is None:
            found = self.default_account()
            if found is None:
                raise InvalidRequestError("account", f"several accounts are configured ({', '.join(self.names())}) "
                                          "and none is the default_account: name one", code="unknown_account")
            return found
        if name not in self._accounts:
            raise InvalidRequestError("account", f"unknown account {name!r} (configured: {', '.join(self.names())})",
                                      code="unknown_account")
        return self._accounts[name]

    def routes_for(self, model: str, account: str | None = None) -> tuple[Route, ...]:
        """The routes a job for `model` (of `account`, or of none) may take, first the preferred.

        Raises InvalidRequestError (unknown account, no deployment of the model) or UnknownModelError.
        """
        key = (model, account)
        found = self._cache.get(key)
        if found is None:
            found = self._routes_for(model, account)
            if len(self._cache) < _MAX_CACHED:
                self._cache[key] = found
        return found

    def _routes_for(self, model: str, account: str | None) -> tuple[Route, ...]:
        entries = self._routes.get(model)
        if entries is None and model in self.table:  # a snapshot or alias takes its model's routes
            entries = self._routes.get(self.table.resolve(model))
        if entries is not None:
            chosen = [e for e in entries if account is None or e.account == account]
            if chosen:
                return tuple(self.route(e.account, model, e.model) for e in chosen)
        return (self.route(self.account(account).name, model),)

    def route(self, account: str, model: str, target: str | None = None) -> Route:
        """The route of `model` on `account`, named `target` there (None: `model`).

        Raises InvalidRequestError or UnknownModelError (on an openai account, a model not in the table).
        """
        acct = self.account(account)
        target = target or model
        if acct.dialect == "azure":
            return self._azure_route(acct, model, target)
        if acct.dialect == "openai-compatible" and target not in self.table:
            spec = generic_spec(target, acct.encoding, context_window=acct.context_window)
        else:
            spec = self.table.get(target)
        own = acct.limits.get(spec.name)
        return Route(acct, model, target, own.applied(spec) if own else spec, max_concurrency=acct.max_concurrency)

    def _azure_route(self, acct: Account, model: str, target: str) -> Route:
        deployment = acct.deployments.get(target)
        if deployment is None and target in self.table:
            deployment = acct.deployments.get(self.table.resolve(target))
        if deployment is None:
            have = ", ".join(sorted(acct.deployments)) or "none"
            raise InvalidRequestError("body.model", f"account {acct.name!r} has no deployment of {target!r} "
                                      f"(deployments of: {have})", code="model_not_found")
        if target in self.table:
            spec = dataclasses.replace(self.table.get(target), rpm=deployment.rpm, tpm=deployment.tpm)
            if deployment.encoding:
                spec = dataclasses.replace(spec, encoding=deployment.encoding)
        else:
            spec = generic_spec(target, deployment.encoding or GENERIC_ENCODING, rpm=deployment.rpm, tpm=deployment.tpm)
        # Azure's charge rule is known (prompt + max output per choice, the rest of the context without
        # one: sim/azure.py, docs/openai-facts.md): pinned, so the worker charges it from the first request.
        spec = dataclasses.replace(spec, charge_rule="sum", charge_rule_pinned=True, missing_fills_context=True)
        return Route(acct, model, deployment.name, spec, window_seconds=deployment.window_seconds)

    def routed_models(self) -> tuple[str, ...]:
        """The models [routes] lists (those that may have several routes), for `status`."""
        return tuple(self._routes)

    def all_routes(self) -> tuple[Route, ...]:
        """Every route the configuration names: [routes] entries, Azure deployments, and each model of
        the table on each openai account (what a worker starts its metrics series with)."""
        found: dict[tuple[str, str], Route] = {}
        for model, entries in self._routes.items():
            for e in entries:
                route = self.route(e.account, model, e.model)
                found.setdefault((route.account.name, route.target), route)
        for acct in self:
            for dep in acct.deployments.values():
                found.setdefault((acct.name, dep.name), self._azure_route(acct, dep.model, dep.model))
            if acct.dialect == "openai":  # the models it may serve: the table's, as a worker serves today
                for name in self.table.names():
                    found.setdefault((acct.name, name), self.route(acct.name, name))
        return tuple(found[key] for key in sorted(found))

    def secrets(self) -> tuple[str, ...]:
        """Every credential's current value, for the redaction of upstream answers."""
        return tuple(a.credential.value() for a in self if a.credential is not None and a.unusable is None)
