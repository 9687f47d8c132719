"""Reading Batch-format JSONL input: every line becomes a job or an error that names the line,
the field and the reason. One bad line never sinks the batch; no upstream call is made for a
request that can be known to fail (bad JSON, unknown model, context overflow, too large for TPM).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from ratequeue.config.accounts import AccountTable
from ratequeue.config.accounts_load import implicit_table
from ratequeue.config.models import ModelTable
from ratequeue.config.settings import Settings
from ratequeue.errors import InvalidRequestError, RequestTooLargeError, UnknownModelError
from ratequeue.jobstore.jobs import StoredJob
from ratequeue.producer.counted_ahead import blocks, server_asks
from ratequeue.tokens.estimate import estimate_request
from ratequeue.tokens.server import Asked, ServerCounts, counted_by_server

SUPPORTED_URLS = frozenset({"/v1/chat/completions", "/v1/embeddings", "/v1/responses", "/v1/completions"})
MAX_CUSTOM_ID = 512


@dataclass(frozen=True)
class LineError:
    """An input line that cannot run.

    ``custom_id`` labels the error line (None when the line has no usable one); ``keyed`` says the
    custom_id was accepted as this line's own, so its error is stored under it (a duplicate's or
    an over-limit line's is not: it is kept by line number instead).
    """

    line: int
    custom_id: str | None
    code: str
    message: str
    param: str | None = None
    keyed: bool = False


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 200_000_000
    max_lines: int = 50_000
    # One line's bytes, without its newline; a longer one is skipped unread (see _bounded_lines).
    max_line_bytes: int = 8 * 1024 * 1024


_SKIP_PIECE = 1 << 20  # bytes read at a time while skipping an over-long line


class LineValidator:
    """Turns one request object into a ``StoredJob`` or raises ``InvalidRequestError``.

    A job's account is the line's own top-level ``"account"``, else `account` (the batch's), else
    the table's default; its model is checked on that account's route (``routes_for``): any name
    on an openai-compatible account, a deployment of it on an Azure one, else the model table's.
    """

    def __init__(self, table: ModelTable | AccountTable, account: str | None = None,
                 counts: ServerCounts | None = None) -> None:
        """`counts`: where the prompts of ``tokenize = "server"`` accounts are counted (None: locally)."""
        # A bare model table is the configuration without [accounts] (its one implicit account).
        self.accounts = table if isinstance(table, AccountTable) else implicit_table(Settings(), table)
        self.table = self.accounts.table
        self.account = account
        self.counts = counts

    def start_counting(self, raws: Iterable[bytes]) -> Asked | None:
        """Have the servers start counting the requests of these lines (``job`` finds the counts once
        ``finish_counting`` has them); a line that does not parse or resolve is left to ``job``."""
        if self.counts is None:
            return None
        return self.counts.start(server_asks(raws, self.accounts, self.account))

    def finish_counting(self, asked: Asked | None) -> None:
        if self.counts is not None and asked is not None:
            self.counts.finish(asked)

    def job(self, line: int, custom_id: str, request: dict[str, Any]) -> StoredJob:
        method = request.get("method", "POST")
        if not isinstance(method, str) or method.upper() != "POST":
            raise InvalidRequestError("method", f"unsupported method {method!r}: only POST is supported")
        url = request.get("url")
        if not isinstance(url, str) or url not in SUPPORTED_URLS:
            supported = ", ".join(sorted(SUPPORTED_URLS))
            raise InvalidRequestError("url", f"unsupported url {url!r}: expected one of {supported}")
        body = request.get("body")
        if not isinstance(body, dict):
            raise InvalidRequestError("body", "must be a JSON object")
        if body.get("stream"):
            # A streamed answer is a series of events, not one response body: it cannot be stored
            # as a Batch output line (OpenAI's Batch API refuses it as well).
            raise InvalidRequestError("body.stream", "streaming is not supported in batches: remove it or set false")
        account = request.get("account", self.account)
        if account is not None and (not isinstance(account, str) or not account):
            raise InvalidRequestError("account", f"must be an account alias (a string), got {account!r}",
                                      code="unknown_account")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequestError("body.model", "missing or not a string")
        try:
            # The first route: choosing among several is the worker's (it resolves the job again).
            routes = self.accounts.routes_for(model, account)
            route = routes[0]
        except UnknownModelError as exc:
            raise InvalidRequestError("body.model", str(exc), code="model_not_found") from exc
        spec = route.spec
        if url not in spec.endpoints:
            raise InvalidRequestError(
                "url", f"model {model!r} does not serve {url} (it serves {', '.join(spec.endpoints)})"
            )
        route.url(url)  # raises for a path the account's server has no operation for (Azure)
        counted = self.counts.lookup(route, url, body) if self.counts and counted_by_server(route) else None
        estimate = estimate_request(url, body, spec, counted)
        if estimate.charge > spec.tpm:
            err = RequestTooLargeError(estimate.charge, spec.tpm, spec.name)
            if estimate.output_defaulted:
                hint = (f"; with no max_tokens/max_completion_tokens it reserves the model's maximum output "
                        f"({spec.max_output_tokens}): set one")
                raise InvalidRequestError(err.field, err.reason + hint, err.code) from err
            raise err
        # Stored under the logical model the line named (canonical for a table model: snapshots share
        # its counters), which the worker resolves to the same route; None for the implicit account,
        # and for a job that named no account of a model with several routes: any of them may serve it.
        stored_model = self.table.resolve(route.model) if route.model in self.table else route.model
        free = route.account.implicit or (account is None and len(routes) > 1)
        return StoredJob(
            custom_id, line, url, body, stored_model, estimate.charge, estimate.prompt_tokens,
            estimate.output_tokens, None if free else route.account.name,
        )


def has_content(path: str | Path, block: int = 1 << 16) -> bool:
    """True when the file holds anything but whitespace (read until the first such byte): an empty
    input is said before anything else is checked or started."""
    with open(path, "rb") as stream:
        while data := stream.read(block):
            if data.strip():
                return True
    return False


def read_lines(
    stream: BinaryIO | Iterable[bytes], validator: LineValidator, limits: Limits | None = None
) -> Iterator[StoredJob | LineError]:
    """Yield, for every input line in order, its job or its error. Blank lines are skipped.

    Lines past ``limits.max_lines`` or past ``limits.max_bytes``, and lines longer than
    ``limits.max_line_bytes``, get an error each (the rest of the file is still read, so every
    line is accounted for).
    """
    seen: dict[str, int] = {}
    checked = _checked_lines(stream, limits or Limits())
    if validator.counts is None:
        for item in checked:
            yield item if isinstance(item, LineError) else _parse_line(*item, validator, seen)
        return
    # One block ahead: the servers count the next block while this one is checked and stored.
    ahead: tuple[list[LineError | tuple[int, bytes]], Asked | None] | None = None
    for block in blocks(checked, lambda line: 0 if isinstance(line, LineError) else len(line[1])):
        asked = validator.start_counting(line[1] for line in block if not isinstance(line, LineError))
        if ahead is not None:
            yield from _checked_block(*ahead, validator, seen)
        ahead = block, asked
    if ahead is not None:
        yield from _checked_block(*ahead, validator, seen)


def _checked_block(block: list[LineError | tuple[int, bytes]], asked: Asked | None, validator: LineValidator,
                   seen: dict[str, int]) -> Iterator[StoredJob | LineError]:
    validator.finish_counting(asked)
    for line in block:
        yield line if isinstance(line, LineError) else _parse_line(*line, validator, seen)


def _checked_lines(stream: BinaryIO | Iterable[bytes], limits: Limits) -> Iterator[LineError | tuple[int, bytes]]:
    """(number, line) of every line within the limits, in order; a LineError for each beyond them."""
    offset = 0
    counted = 0
    for number, (raw, size, content) in enumerate(_bounded_lines(stream, limits.max_line_bytes), start=1):
        offset += size
        if raw is not None and not raw.strip():
            continue
        counted += 1
        if counted > limits.max_lines:
            yield LineError(number, _peek_custom_id(raw), "too_many_lines",
                            f"line {number}: the batch exceeds the limit of {limits.max_lines} lines "
                            "(raise RATEQUEUE_MAX_LINES)")
            continue
        if offset > limits.max_bytes:
            yield LineError(number, _peek_custom_id(raw), "file_too_large",
                            f"line {number}: the batch exceeds the limit of {limits.max_bytes} bytes "
                            "(raise RATEQUEUE_MAX_FILE_BYTES)")
            continue
        if raw is None:
            yield LineError(number, None, "line_too_large",
                            f"line {number}: {content} bytes exceeds the limit of "
                            f"{limits.max_line_bytes} bytes per line (raise RATEQUEUE_MAX_LINE_BYTES)")
            continue
        yield number, raw


def _bounded_lines(stream: BinaryIO | Iterable[bytes], max_line: int) -> Iterator[tuple[bytes | None, int, int]]:
    """(line, its size, its size without the newline) for every line; None for the line when it
    is longer than `max_line` bytes without its newline.

    A stream that has ``readline`` is read in bounded pieces: an over-long line is skipped
    ``_SKIP_PIECE`` bytes at a time, never held whole (a 100 MB line once took 5 GB and 98 s to
    reject). Lines of another iterable are already in memory and only measured.
    """
    readline = getattr(stream, "readline", None)
    if readline is None:
        for raw in stream:
            content = len(raw) - raw.endswith(b"\n")
            yield (raw if content <= max_line else None), len(raw), content
        return
    while True:
        raw = readline(max_line + 1)  # +1: the newline of a line of exactly max_line bytes
        if not raw:
            return
        if raw.endswith(b"\n") or len(raw) <= max_line:
            yield raw, len(raw), len(raw) - raw.endswith(b"\n")
            continue
        size = len(raw)
        while not raw.endswith(b"\n"):  # skip the rest of the line
            raw = readline(_SKIP_PIECE)
            if not raw:
                break
            size += len(raw)
        yield None, size, size - raw.endswith(b"\n")


def _parse_line(number: int, raw: bytes, validator: LineValidator, seen: dict[str, int]) -> StoredJob | LineError:
    try:
        request = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return LineError(number, None, "invalid_json", f"line {number}: not valid JSON ({exc})")
    if not isinstance(request, dict):
        return LineError(number, None, "invalid_json", f"line {number}: must be a JSON object")
    custom_id = request.get("custom_id")
    problem = _custom_id_problem(custom_id)
    if problem:
        return LineError(number, None, "invalid_custom_id", f"line {number}: custom_id {problem}", "custom_id")
    assert isinstance(custom_id, str)
    if custom_id in seen:
        return LineError(
            number, None, "duplicate_custom_id",
            f"line {number}: custom_id {custom_id!r} already used on line {seen[custom_id]}", "custom_id",
        )
    seen[custom_id] = number
    try:
        return validator.job(number, custom_id, request)
    except InvalidRequestError as exc:
        message = f"line {number}: {exc.field}: {exc.reason}"
        return LineError(number, custom_id, exc.code, message, exc.field, keyed=True)


def _custom_id_problem(custom_id: object) -> str | None:
    if custom_id is None:
        return "is missing"
    if not isinstance(custom_id, str) or not custom_id:
        return "must be a non-empty string"
    if len(custom_id) > MAX_CUSTOM_ID:
        return f"is longer than {MAX_CUSTOM_ID} characters"
    if any(ord(ch) < 32 for ch in custom_id):
        return "must not contain control characters"
    return None


def _peek_custom_id(raw: bytes | None) -> str | None:
    """The custom_id of a line we will not run, if it parses; used only to label its error."""
    if raw is None:  # too long to have been read
        return None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    cid = value.get("custom_id") if isinstance(value, dict) else None
    return cid if isinstance(cid, str) and _custom_id_problem(cid) is None else None
