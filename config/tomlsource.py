"""A TOML file as the source of configuration errors: the line of every key and table, and the
errors of one file collected and reported together.

tomllib returns plain dicts with no positions (CPython declined to add them, python/cpython#115516)
and tomlkit keeps none either (python-poetry/tomlkit#55, open since 2019), so the lines are found
here, without a new dependency. The text has already been parsed by tomllib, so it is valid TOML:
a small scanner skips strings, comments and the inside of arrays and inline tables to find where
each statement starts; each statement's table header or key is then parsed by tomllib itself (as a
fragment), so quoting, escapes and dotted keys follow TOML's own rules. A value inside an inline
table or an array has no line of its own: it is given the line of its nearest located parent.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Iterator, Mapping
from typing import Any

from ratequeue.errors import ConfigError

__all__ = ["INTEGER", "NUMBER", "STRING", "TABLE", "KeyPath", "Problems", "check_fields", "dotted", "key_lines",
           "kind_of", "typed"]

KeyPath = tuple[str, ...]
_BARE = re.compile(r"[A-Za-z0-9_-]+")  # fullmatch: "$" would also match before a final line end
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
# The kinds of value a field may need (check_fields, typed); each is also how an error names it.
STRING, INTEGER, NUMBER, TABLE = "a string", "a positive integer", "a positive number", "a table"
# A field whose name says it holds a secret gets its own error: the secret is never asked for here.
_SECRET_FIELDS = frozenset({"api_key", "apikey", "api-key", "key", "token", "bearer_token", "secret", "password"})


def _string_end(text: str, i: int) -> int:
    """The index just past the string that starts at `i` (any of TOML's four string forms)."""
    quote = text[i]
    if text.startswith(quote * 3, i):
        j = i + 3
        while True:
            k = text.index(quote * 3, j)
            if quote == '"' and _escaped(text, k):
                j = k + 1
                continue
            run = 3  # a closing delimiter may follow up to two quotes of the content: """a"""""
            while run < 5 and text.startswith(quote, k + run):
                run += 1
            return k + run
    j = i + 1
    while text[j] != quote:
        j += 2 if quote == '"' and text[j] == "\\" else 1
    return j + 1


def _escaped(text: str, k: int) -> bool:
    """Whether the character at `k` follows an odd number of backslashes."""
    n = 0
    while k - n - 1 >= 0 and text[k - n - 1] == "\\":
        n += 1
    return n % 2 == 1


def _statements(text: str) -> Iterator[tuple[int, str]]:
    """(1-based line, text from its first character to the end of its line) of each statement."""
    depth, i, line, at_start = 0, 0, 1, True
    while i < len(text):
        c = text[i]
        if c == "\n":
            line, at_start, i = line + 1, depth == 0, i + 1
            continue
        if c in " \t\r":
            i += 1
            continue
        if c == "#":
            end = text.find("\n", i)
            i = len(text) if end < 0 else end
            continue
        if at_start:
            at_start = False
            end = text.find("\n", i)
            yield line, text[i : len(text) if end < 0 else end]
        if c in "\"'":
            end = _string_end(text, i)
            line += text.count("\n", i, end)
            i = end
            continue
        depth += 1 if c in "[{" else -1 if c in "]}" else 0
        i += 1


def _key_end(statement: str) -> int:
    """The index of the ``=`` that ends the key of a ``key = value`` statement."""
    i = 0
    while statement[i] != "=":
        i = _string_end(statement, i) if statement[i] in "\"'" else i + 1
    return i


def _path(doc: dict[str, Any]) -> KeyPath:
    """The keys of the single chain of one-entry tables in `doc` (``{"a": {"b": 0}}`` -> ("a", "b"))."""
    path: list[str] = []
    node: Any = doc
    while isinstance(node, dict) and len(node) == 1:
        key, node = next(iter(node.items()))
        path.append(key)
        if isinstance(node, list) and node:  # [[array.of.tables]]
            node = node[-1]
    return tuple(path)


def key_lines(text: str) -> dict[KeyPath, int]:
    """Every table header and key of the TOML document `text` -> the line it is written on (1-based).

    A key written in several places (an array of tables) keeps its first line.
    """
    lines: dict[KeyPath, int] = {}
    table: KeyPath = ()
    for line, statement in _statements(text):
        try:
            if statement.startswith("["):
                table = _path(tomllib.loads(statement))
                path = table
            else:
                path = table + _path(tomllib.loads(statement[: _key_end(statement)] + "= 0"))
        except (tomllib.TOMLDecodeError, ValueError, IndexError):
            continue  # not a statement after all: a position is a help, never a failure
        lines.setdefault(path, line)
    return lines


def dotted(path: KeyPath) -> str:
    """`path` as TOML writes it: ``accounts.azure-eu.deployments."gpt-4.1"``."""
    return ".".join(p if _BARE.fullmatch(p) else _quoted(p) for p in path)


def _quoted(key: str) -> str:
    """`key` as a TOML basic string: a control character escaped, so that an error stays on one line."""
    escaped = "".join(_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if c < " " or c == "\x7f" else c) for c in key)
    return f'"{escaped}"'


class Problems:
    """The errors found in one file, each with its line and field, raised together by ``check()``."""

    def __init__(self, source: str, text: str) -> None:
        self.source = source
        self._lines = key_lines(text)
        self._found: list[tuple[int, str]] = []

    def line(self, path: KeyPath) -> int:
        """The line of `path`; else of its first sub-key written out (``[a.b.c]`` for a.b); else of
        its nearest located parent; 0 when none is (the top of the file)."""
        if path in self._lines:
            return self._lines[path]
        below = [line for key, line in self._lines.items() if key[: len(path)] == path]
        if below:
            return min(below)
        for end in range(len(path) - 1, 0, -1):
            if path[:end] in self._lines:
                return self._lines[path[:end]]
        return 0

    def add(self, path: KeyPath, reason: str) -> None:
        """Record that the field at `path` is wrong for `reason` (which must not hold a secret)."""
        self._found.append((self.line(path), f"{dotted(path)}: {reason}"))

    def __len__(self) -> int:
        return len(self._found)

    def check(self) -> None:
        """Raise ConfigError listing every recorded problem in line order, each as ``file:line: field: reason``."""
        if not self._found:
            return
        shown = [f"{self.source}:{line}: {what}" if line else f"{self.source}: {what}"
                 for line, what in sorted(self._found, key=lambda found: found[0])]
        if len(shown) == 1:
            raise ConfigError(shown[0])
        raise ConfigError(f"{len(shown)} errors in {self.source}:\n  " + "\n  ".join(shown))


def kind_of(value: Any) -> str:
    """A value as an error may show it: its TOML type, never itself (it may be a secret)."""
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
             dict: "a table"}
    return names.get(type(value), type(value).__name__)


def typed(value: Any, kind: str) -> bool:
    """Whether `value` is of `kind` (STRING is non-blank; INTEGER and NUMBER are > 0; else TABLE)."""
    if kind == STRING:
        return isinstance(value, str) and bool(value.strip())
    if kind == INTEGER:
        return type(value) is int and value >= 1
    if kind == NUMBER:
        return type(value) in (int, float) and math.isfinite(value) and value > 0
    return isinstance(value, dict)


def check_fields(p: Problems, path: KeyPath, fields: Mapping[str, Any], kinds: Mapping[str, str]) -> None:
    """Record in `p` each field of the table at `path` that `kinds` (field -> kind) lacks or that is not of its kind."""
    for key, value in fields.items():
        if key not in kinds:
            if key.lower() in _SECRET_FIELDS:
                p.add((*path, key), "unknown field; a secret is never written in this file: name its variable "
                      "(api_key_env) or file (api_key_file, bearer_token_file)")
            else:
                p.add((*path, key), f"unknown field (known: {', '.join(sorted(kinds))})")
        elif not typed(value, kinds[key]):
            p.add((*path, key), f"must be {kinds[key]}, got {kind_of(value)}")
