"""The layers of the model table (built-in file, user file, environment overrides), read and merged
field by field, each value remembering where it came from so that an error can name it."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ratequeue.config.settings import mangle_model_name
from ratequeue.config.tomlsource import Problems
from ratequeue.errors import ConfigError

# field -> (value, source, path): where each value came from, so errors can name it
Fields = dict[str, tuple[Any, str, str]]


# Top-level keys of a models file; accounts, routes and default_account are read by config/accounts_load.py.
TOP_LEVEL = ("replace", "defaults", "models", "accounts", "routes", "default_account")


def read_table_file(path: Path) -> str:
    """The text of the user's models file. Raises ConfigError naming it."""
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: a BOM (Windows editors) is no TOML
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{path}: cannot read the model table: {reason}") from exc


def read_toml(text: str, source: str) -> dict[str, Any]:
    """The document `text` of the file `source`. Raises ConfigError naming the line and field of what
    is wrong with its top level (all of it at once)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from exc
    p = Problems(source, text)
    for key in doc:
        if key not in TOP_LEVEL:
            p.add((key,), f"unknown top-level key (expected {', '.join(TOP_LEVEL)})")
    if not isinstance(doc.get("replace", False), bool):
        p.add(("replace",), "must be true or false")
    for key in ("defaults", "models"):
        if not isinstance(doc.get(key, {}), dict):
            p.add((key,), "must be a table")
    for name, table in doc.get("models", {}).items() if isinstance(doc.get("models"), dict) else ():
        if not isinstance(table, dict):
            p.add(("models", name), "must be a table")
    p.check()
    return doc


def merge_layers(
    layers: list[tuple[dict[str, Any], str]], texts: Mapping[str, str] | None = None
) -> tuple[Fields, dict[str, Fields], dict[str, str]]:
    """(defaults, fields of each model, where each model's table is), each value with its source: a
    file's source names the line when `texts` (source -> its text) has the file."""
    at = {source: Problems(source, text) for source, text in (texts or {}).items()}

    def where(source: str, *path: str) -> str:
        line = at[source].line(path) if source in at else 0
        return f"{source}:{line}" if line else source

    defaults: Fields = {}
    models: dict[str, Fields] = {}
    tables: dict[str, str] = {}
    for doc, source in layers:
        for key, value in doc.get("defaults", {}).items():
            defaults[key] = (value, where(source, "defaults", key), f"defaults.{key}")
        for name, table in doc.get("models", {}).items():
            fields = models.setdefault(name, {})
            tables[name] = where(source, "models", name)
            for key, value in table.items():
                fields[key] = (value, where(source, "models", name, key), f'models."{name}".{key}')
    return defaults, models, tables


def apply_overrides(models: dict[str, Fields], overrides: Mapping[str, Mapping[str, int | str]]) -> None:
    by_mangled: dict[str, list[str]] = {}
    for name in models:
        by_mangled.setdefault(mangle_model_name(name), []).append(name)
    for mangled, fields in overrides.items():
        for key, value in fields.items():
            var = f"RATEQUEUE_MODEL_{mangled}_{key.upper()}"
            names = by_mangled.get(mangled, [])
            if len(names) != 1:
                reason = f"matches models {names}" if names else "matches no model in the table"
                raise ConfigError(f"{var}: {reason} (NAME is the model name upper-cased, '-' and '.' as '_')")
            models[names[0]][key] = (value, f"environment variable {var}", f'models."{names[0]}".{key}')
