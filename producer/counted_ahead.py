"""Reading a Batch file one block ahead when servers count its prompts (``tokenize = "server"``,
ratequeue/tokens/server.py): the lines of a block are asked for together, and the next block's
counting overlaps the checking and storing of this one."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import orjson

from ratequeue.config.accounts import AccountTable, Route
from ratequeue.errors import InvalidRequestError, UnknownModelError
from ratequeue.tokens.server import counted_by_server

__all__ = ["PREFETCH_BYTES", "PREFETCH_LINES", "blocks", "server_asks"]

# Lines whose server counts are asked for together, and the most bytes they may hold (two blocks are
# held at once).
PREFETCH_LINES, PREFETCH_BYTES = 512, 16 << 20
Item = TypeVar("Item")


def server_asks(raws: Iterable[bytes], accounts: AccountTable,
                account: str | None) -> list[tuple[Route, str, Mapping[str, Any]]]:
    """(route, url, body) of each line whose prompt its server counts; a line that does not parse or
    resolve is skipped (its check rejects it, naming the line)."""
    asks: list[tuple[Route, str, Mapping[str, Any]]] = []
    for raw in raws:
        try:
            request = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(request, dict):
            continue
        body, url, named = request.get("body"), request.get("url"), request.get("account", account)
        if not isinstance(body, dict) or not isinstance(body.get("model"), str) or not isinstance(url, str):
            continue
        if not isinstance(named, str | None):
            continue
        try:
            route = accounts.routes_for(body["model"], named or None)[0]  # the first, as the check takes
        except (InvalidRequestError, UnknownModelError):
            continue
        if counted_by_server(route):
            asks.append((route, url, body))
    return asks


def blocks(items: Iterable[Item], size_of: Callable[[Item], int]) -> Iterator[list[Item]]:
    """`items` in lists of PREFETCH_LINES, or fewer holding PREFETCH_BYTES (``size_of(item)``)."""
    block: list[Item] = []
    size = 0
    for item in items:
        block.append(item)
        size += size_of(item)
        if len(block) >= PREFETCH_LINES or size >= PREFETCH_BYTES:
            yield block
            block, size = [], 0
    if block:
        yield block
