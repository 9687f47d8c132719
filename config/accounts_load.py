"""Reading ``[accounts]``, ``[routes]`` and ``default_account`` of the models file into an
:class:`~ratequeue.config.accounts.AccountTable` (the format is in config/accounts.py's docstring).

Every error of the file is reported at once, each as ``file:line: field: reason`` (config/tomlsource.py),
and none shows a secret: keys are named by variable or file, and a value that may be one is described
by its type, never echoed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ratequeue.config.account_limits import read_account_limits
from ratequeue.config.accounts import DIALECTS, IMPLICIT, Account, AccountTable, Deployment, RouteEntry
from ratequeue.config.apikey import Credential, TokenFile, checked_secret, looks_like_a_key, read_secret_file
from ratequeue.config.model_layers import read_table_file, read_toml
from ratequeue.config.models import GENERIC_CONTEXT_WINDOW, SUPPORTED_ENCODINGS, ModelTable, load_model_table
from ratequeue.config.settings import DEFAULT_BASE_URL, Settings, environment
from ratequeue.config.tomlsource import (
    INTEGER,
    NUMBER,
    STRING,
    TABLE,
    KeyPath,
    Problems,
    check_fields,
    dotted,
    kind_of,
    typed,
)
from ratequeue.config.urls import normalize_base_url
from ratequeue.config.values import FrozenMap, account_fingerprint
from ratequeue.errors import ConfigError, InvalidRequestError, UnknownModelError

__all__ = ["implicit_table", "load_account_table"]

_STR, _INT, _NUM, _TABLE = STRING, INTEGER, NUMBER, TABLE
_COMPATIBLE = ("openai-compatible",)
# field -> (kind, the dialects it is allowed for)
_ACCOUNT_FIELDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "dialect": (_STR, DIALECTS), "base_url": (_STR, DIALECTS),
    "api_key_env": (_STR, DIALECTS), "api_key_file": (_STR, DIALECTS), "bearer_token_file": (_STR, DIALECTS),
    "organization": (_STR, ("openai",)), "project": (_STR, ("openai",)),
    "api_version": (_STR, ("azure",)), "deployments": (_TABLE, ("azure",)),
    "encoding": (_STR, _COMPATIBLE), "tokenize": (_STR, _COMPATIBLE), "max_concurrency": (_INT, _COMPATIBLE),
    "context_window": (_INT, _COMPATIBLE), "models": (_TABLE, ("openai", *_COMPATIBLE)),
}  # fmt: skip
_CREDENTIALS = ("api_key_env", "api_key_file", "bearer_token_file")
_DEPLOYMENT_FIELDS = {"deployment": _STR, "tpm": _INT, "rpm": _INT, "window_seconds": _NUM, "encoding": _STR}
_TOKENIZE = ("local", "server")
_AZURE_RPM_PER_1000_TPM = 6  # Azure's quota ratio for chat models (learn.microsoft.com, "Manage quota")
_AZURE_WINDOW = 1.0  # Azure enforces over 1 s or 10 s: a 1 s bucket fits both and, refilled continuously, loses no rate
# fullmatch, never "^...$": "$" also matches before a final line break ("mini\n" in a URL path)
_ALIAS = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # also Azure's rule for deployment names
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def implicit_table(settings: Settings, table: ModelTable) -> AccountTable:
    """The one account of a configuration without [accounts]: today's, from the environment."""
    credential = Credential("authorization", "OPENAI_API_KEY", secret=settings.api_key) if settings.api_key else None
    account = Account(IMPLICIT, "openai", settings.base_url, settings.account_id, credential,
                      settings.organization, settings.project, implicit=True)
    return AccountTable({IMPLICIT: account}, table)


def load_account_table(
    settings: Settings,
    table: ModelTable | None = None,
    env: Mapping[str, str] | None = None,
    *,
    require_credentials: bool = True,
) -> AccountTable:
    """The accounts and routes of ``settings.models_file`` (the implicit account when it has none).

    `table` defaults to ``load_model_table(settings)``; `env` (default: the process's environment)
    holds the variables ``api_key_env`` names. With `require_credentials` False, an account whose key
    cannot be read here is kept with ``unusable`` set to the reason (a worker holding no key for an
    account refuses its jobs and serves the others); otherwise that is an error like any other.
    Raises ConfigError listing every problem of the file, each with its line and field.
    """
    table = load_model_table(settings) if table is None else table
    if settings.models_file is None:
        return implicit_table(settings, table)
    source = str(settings.models_file)
    text = read_table_file(settings.models_file)
    doc = read_toml(text, source)
    problems = Problems(source, text)
    if "accounts" not in doc:
        for key in ("routes", "default_account"):
            if key in doc:
                problems.add((key,), "needs an [accounts] table")
        problems.check()
        return implicit_table(settings, table)
    reader = _Reader(problems, environment() if env is None else env, require_credentials, table)
    accounts, failed = reader.accounts(doc["accounts"])
    routes = _routes(problems, doc.get("routes", {}), set(accounts), failed)
    default = doc.get("default_account")
    if default is not None and not typed(default, STRING):
        problems.add(("default_account",), f"must be an account alias, got {kind_of(default)}")
        default = None
    if default is not None and default not in accounts and default not in failed:
        problems.add(("default_account",), f"names no account (accounts: {', '.join(sorted({*accounts, *failed}))})")
        default = None
    result = AccountTable(accounts, table, routes, default if default in accounts else None)
    for model, entries in routes.items():  # each entry must resolve: a deployment, a model the table has
        for i, entry in enumerate(entries, 1):
            try:
                result.route(entry.account, model, entry.model)
            except (InvalidRequestError, UnknownModelError) as exc:
                problems.add(("routes", model), f"entry {i} ({entry.account}): {exc}")
    problems.check()
    return result


class _Reader:
    """Reads the [accounts.*] tables, recording every problem in `problems`."""

    def __init__(self, problems: Problems, env: Mapping[str, str], require_credentials: bool,
                 table: ModelTable) -> None:
        self.p = problems
        self.table = table
        self.env = env
        self.require = require_credentials

    def accounts(self, raw: Any) -> tuple[dict[str, Account], set[str]]:
        """(accounts read, aliases of those with an error)."""
        if not isinstance(raw, dict) or not raw:
            self.p.add(("accounts",), "must hold at least one [accounts.<alias>] table")
            return {}, set()
        accounts: dict[str, Account] = {}
        for name, fields in raw.items():
            before = len(self.p)
            account = self.account(name, fields)
            if account is not None and len(self.p) == before:
                accounts[name] = account
        return accounts, set(raw) - set(accounts)

    def account(self, name: str, fields: Any) -> Account | None:
        p, path = self.p, ("accounts", name)
        if not _ALIAS.fullmatch(name):
            p.add(path, "an account alias is letters, digits, '.', '-' and '_', starting with a letter or digit")
        if not isinstance(fields, dict):
            p.add(path, f"must be a table, got {kind_of(fields)}")
            return None
        check_fields(p, path, fields, {k: kind for k, (kind, _) in _ACCOUNT_FIELDS.items()})
        dialect = fields.get("dialect", "openai")
        if dialect not in DIALECTS:
            if isinstance(dialect, str):
                p.add((*path, "dialect"), f"must be one of {', '.join(DIALECTS)}, got {dialect!r}")
            return None
        for key in fields:
            allowed = _ACCOUNT_FIELDS.get(key, (None, DIALECTS))[1]
            if dialect not in allowed:
                hint = " (an azure deployment's limits are under deployments)" if key == "models" else ""
                p.add((*path, key), f"only for {' or '.join(allowed)} accounts, not {dialect}{hint}")
        if dialect != "openai" and "base_url" not in fields:
            p.add(path, f"an {dialect} account needs base_url")  # azure or openai-compatible
        if dialect == "azure" and "api_version" not in fields:
            p.add(path, 'an azure account needs api_version (e.g. "2024-10-21")')
        given = [key for key in _CREDENTIALS if key in fields]
        if len(given) > 1:
            p.add((*path, given[1]), f"set only one of {', '.join(given)}")
        if dialect == "azure" and not given:
            p.add(path, "an azure account needs api_key_env, api_key_file or bearer_token_file")
        if fields.get("encoding", "cl100k_base") not in SUPPORTED_ENCODINGS:
            p.add((*path, "encoding"), f"must be one of {', '.join(sorted(SUPPORTED_ENCODINGS))}")
        if fields.get("tokenize", "local") not in _TOKENIZE:
            p.add((*path, "tokenize"), f"must be one of {', '.join(_TOKENIZE)}")
        base_url = self.base_url(path, fields.get("base_url", DEFAULT_BASE_URL), dialect)
        deployments = self.deployments(path, fields.get("deployments", {}))
        limits = read_account_limits(p, path, fields.get("models", {}) if dialect != "azure" else {}, self.table,
                                     any_name=dialect == "openai-compatible")
        credential, unusable = self.credential(path, fields, given[0] if len(given) == 1 else None, dialect)
        org = fields.get("organization")
        # The bucket id is read off the file alone, never the key's value: a submitter or `status` without
        # the key names the bucket the workers that hold it use (and a rotated key keeps its bucket).
        # An organization keys it (all its keys share its limits), else where the key comes from
        # ("api_key_env:OPENAI_KEY_A": two aliases of one variable share a bucket); no key: the server.
        source = f"{given[0]}:{fields[given[0]]}" if len(given) == 1 and typed(fields[given[0]], _STR) else "anonymous"
        # Azure: the resource alone, whatever the key: its limits belong to its deployments.
        bucket_id = account_fingerprint("", None, base_url) if dialect == "azure" else account_fingerprint(
            source, org, base_url)
        return Account(
            name, dialect, base_url, bucket_id, credential, org, fields.get("project"), fields.get("api_version"),
            FrozenMap(deployments), fields.get("encoding", "cl100k_base"), fields.get("tokenize", "local"),
            fields.get("max_concurrency", 64 if dialect == "openai-compatible" else None),
            fields.get("context_window", GENERIC_CONTEXT_WINDOW), unusable, limits=FrozenMap(limits),
        )

    def base_url(self, path: KeyPath, raw: Any, dialect: str) -> str:
        if not isinstance(raw, str):
            return ""
        try:
            url = normalize_base_url(raw, var="base_url")
        except ConfigError as exc:
            self.p.add((*path, "base_url"), str(exc).removeprefix("base_url: "))
            return ""
        # Azure's paths start with /openai: a base URL given with it must not get it twice.
        return url.removesuffix("/openai") if dialect == "azure" else url

    def credential(self, path: KeyPath, fields: Mapping[str, Any], key: str | None,
                   dialect: str) -> tuple[Credential | None, str | None]:
        """(the credential, None) or, when it cannot be read and need not be, (None, the reason)."""
        if key is None or not typed(fields[key], _STR):
            return None, None
        value = fields[key]
        header = "api-key" if dialect == "azure" and key != "bearer_token_file" else "authorization"
        if key == "api_key_env" and not _ENV_NAME.fullmatch(value):
            self.p.add((*path, key), "must name an environment variable (letters, digits and _), not hold the key")
            return None, None
        thing = "variable" if key == "api_key_env" else "file"
        named = value in self.env if thing == "variable" else Path(value).expanduser().exists()
        try:
            # The key pasted in its name's place: the errors below would show it ("the variable <key> ...").
            if looks_like_a_key(value) and not named:
                raise ConfigError(f"names no {thing} and looks like a key: name the {thing} that holds the key")
            if key == "api_key_env":
                secret = self.env.get(value, "").strip()
                if not secret:
                    raise ConfigError(f"the variable {value} is not set")
                return Credential(header, f"${value}", secret=checked_secret(secret, f"${value}")), None
            file = Path(value).expanduser()
            if key == "bearer_token_file":
                return Credential(header, f"token file {file}", token_file=TokenFile(file, str(file))), None
            return Credential(header, f"file {file}", secret=checked_secret(read_secret_file(file, str(file)),
                                                                               str(file))), None
        except ConfigError as exc:
            if self.require:
                self.p.add((*path, key), str(exc))
                return None, None
            return None, f"{self.p.source}:{self.p.line((*path, key))}: {dotted((*path, key))}: {exc}"

    def deployments(self, path: KeyPath, raw: Any) -> dict[str, Deployment]:
        found: dict[str, Deployment] = {}
        if not isinstance(raw, dict):
            return found
        by_name: dict[str, str] = {}
        for model, fields in raw.items():
            dpath = (*path, "deployments", model)
            if not isinstance(fields, dict):
                self.p.add(dpath, f'must be a table (deployment = "...", tpm = ...), got {kind_of(fields)}')
                continue
            before = len(self.p)
            check_fields(self.p, dpath, fields, _DEPLOYMENT_FIELDS)
            for key in ("deployment", "tpm"):
                if key not in fields:
                    self.p.add(dpath, f"missing field {key}")
            name, window = fields.get("deployment"), fields.get("window_seconds", _AZURE_WINDOW)
            if isinstance(name, str) and not _ALIAS.fullmatch(name):
                self.p.add((*dpath, "deployment"), "an Azure deployment name is letters, digits, '.', '-' and '_'")
            elif isinstance(name, str) and name in by_name:
                self.p.add((*dpath, "deployment"), f"{name!r} is already the deployment of {by_name[name]!r}")
            if typed(window, _NUM) and window > 60:
                self.p.add((*dpath, "window_seconds"), "must be at most 60 (Azure enforces over 1 s or 10 s)")
            if fields.get("encoding", "cl100k_base") not in SUPPORTED_ENCODINGS:
                self.p.add((*dpath, "encoding"), f"must be one of {', '.join(sorted(SUPPORTED_ENCODINGS))}")
            if len(self.p) > before:
                continue
            tpm = fields["tpm"]
            rpm = fields.get("rpm", max(1, tpm * _AZURE_RPM_PER_1000_TPM // 1000))
            by_name[fields["deployment"]] = model
            found[model] = Deployment(model, fields["deployment"], tpm, rpm, float(window), fields.get("encoding"))
        return found


def _routes(p: Problems, raw: Any, known: set[str], failed: set[str]) -> dict[str, tuple[RouteEntry, ...]]:
    """model -> its route entries, each naming a known account once."""
    if not isinstance(raw, dict):
        p.add(("routes",), f"must be a table (model = [account, ...]), got {kind_of(raw)}")
        return {}
    routes: dict[str, tuple[RouteEntry, ...]] = {}
    for model, entries in raw.items():
        rpath = ("routes", model)
        if not isinstance(entries, list) or not entries:
            p.add(rpath, 'must be a non-empty array: ["alias", {account = "alias", model = "its name there"}]')
            continue
        kept: list[RouteEntry] = []
        for i, entry in enumerate(entries, 1):
            if isinstance(entry, dict) and set(entry) <= {"account", "model"} and all(
                    typed(v, _STR) for v in entry.values()) and "account" in entry:
                found = RouteEntry(entry["account"], entry.get("model"))
            elif typed(entry, _STR):
                found = RouteEntry(entry)
            else:
                p.add(rpath, f'entry {i}: must be an account alias or {{account = "...", model = "..."}}')
                continue
            if found.account not in known:
                if found.account not in failed:  # an account with errors of its own is not "unknown"
                    p.add(rpath, f"entry {i}: unknown account {found.account!r} "
                          f"(accounts: {', '.join(sorted(known | failed)) or 'none'})")
            elif any(e.account == found.account and (e.model or model) == (found.model or model) for e in kept):
                p.add(rpath, f"entry {i}: {found.account} is listed twice")
            else:
                kept.append(found)
        routes[model] = tuple(kept)
    return routes
