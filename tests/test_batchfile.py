"""Batch input validation: every bad line gets an error naming line, field and reason; the rest run."""

from __future__ import annotations

import io
import time
import tracemalloc
from pathlib import Path

import orjson
import pytest

from ratequeue.config.models import load_model_table
from ratequeue.config.settings import load_settings
from ratequeue.jobstore.jobs import StoredJob
from ratequeue.producer.batchfile import Limits, LineError, LineValidator, read_lines


@pytest.fixture(scope="module")
def validator() -> LineValidator:
    return LineValidator(load_model_table(load_settings({})))


def _line(
    custom_id: object = "a", url: str = "/v1/chat/completions", body: object = None, **extra: object
) -> bytes:
    if body is None:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 20}
    req: dict[str, object] = {"method": "POST", "url": url, "body": body, **extra}
    if custom_id is not None:
        req["custom_id"] = custom_id
    return orjson.dumps(req) + b"\n"


def _run(
    validator: LineValidator, lines: list[bytes], limits: Limits | None = None
) -> list[StoredJob | LineError]:
    return list(read_lines(lines, validator, limits))


def test_valid_line_becomes_a_job_with_its_charge(validator: LineValidator) -> None:
    [job] = _run(validator, [_line("doc-1")])
    assert isinstance(job, StoredJob)
    assert (job.custom_id, job.line, job.model, job.url) == (
        "doc-1",
        1,
        "gpt-4o-mini",
        "/v1/chat/completions",
    )
    assert job.prompt_tokens > 0
    assert job.charge == job.prompt_tokens + 20  # the default "sum" rule


def test_every_bad_line_names_line_field_and_reason_and_good_lines_survive(validator: LineValidator) -> None:
    big = "word " * 140_000
    lines = [
        _line("ok-1"),
        b"{not json\n",
        _line(None),
        _line("ok-1"),
        _line("m", body={"model": "gpt-9-ultra", "messages": [{"role": "user", "content": "x"}]}),
        _line("u", url="/v1/images/generations"),
        _line("meth", method="GET"),
        _line(
            "ctx",
            body={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": big}], "max_tokens": 5},
        ),
        _line("ok-2"),
        b"\n",
        b"[1, 2]\n",
    ]
    out = _run(validator, lines)
    jobs = [o for o in out if isinstance(o, StoredJob)]
    errors = {o.line: o for o in out if isinstance(o, LineError)}
    assert [j.custom_id for j in jobs] == ["ok-1", "ok-2"]
    assert errors[2].code == "invalid_json" and "line 2" in errors[2].message
    assert errors[3].param == "custom_id" and "missing" in errors[3].message
    assert errors[4].code == "duplicate_custom_id" and "line 1" in errors[4].message
    assert errors[5].code == "model_not_found" and errors[5].param == "body.model" and errors[5].keyed
    assert errors[6].param == "url" and "/v1/images/generations" in errors[6].message
    assert errors[7].param == "method"
    assert errors[8].code == "context_length_exceeded" and "line 8" in errors[8].message
    assert errors[11].code == "invalid_json"
    assert 10 not in errors  # blank lines are skipped, not errors


def test_request_larger_than_tpm_fails_at_once(validator: LineValidator) -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16_000, "n": 2}
    [err] = _run(validator, [_line("big", body=body)])
    assert isinstance(err, LineError)
    assert err.code == "request_too_large" and "TPM" in err.message


def test_embeddings_on_a_chat_model_is_rejected(validator: LineValidator) -> None:
    body = {"model": "gpt-4o-mini", "input": "hello"}
    [err] = _run(validator, [_line("e", url="/v1/embeddings", body=body)])
    assert isinstance(err, LineError) and err.param == "url"


def test_line_and_byte_limits_reject_only_the_lines_past_them(validator: LineValidator) -> None:
    lines = [_line(f"id-{n}") for n in range(5)]
    out = _run(validator, lines, Limits(max_bytes=10_000_000, max_lines=3))
    assert [type(o).__name__ for o in out] == ["StoredJob"] * 3 + ["LineError"] * 2
    assert all(o.code == "too_many_lines" for o in out[3:] if isinstance(o, LineError))
    size = len(lines[0])
    out = _run(validator, lines, Limits(max_bytes=size * 2, max_lines=100))
    assert [type(o).__name__ for o in out] == ["StoredJob"] * 2 + ["LineError"] * 3
    assert "bytes" in out[2].message  # type: ignore[union-attr]


def test_stream_true_is_rejected_at_submit(validator: LineValidator) -> None:
    # A streamed answer cannot be stored as a Batch output line (OpenAI's Batch API refuses it too).
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}
    off = {**body, "stream": False}
    err, job = _run(validator, [_line("s", body=body), _line("f", body=off)])
    assert isinstance(err, LineError) and isinstance(job, StoredJob)
    assert (err.code, err.param, err.custom_id, err.keyed) == ("invalid_request", "body.stream", "s", True)
    assert "line 1" in err.message and "stream" in err.message and "not supported" in err.message


def test_a_line_over_the_line_limit_is_rejected_and_the_others_run(validator: LineValidator) -> None:
    big = _line("big", body={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * 5000}]})
    lines = [_line("a"), big, _line("b")]
    limits = Limits(max_line_bytes=4096)
    for source in (lines, io.BytesIO(b"".join(lines))):  # a list of lines, and a file read in pieces
        out = list(read_lines(source, validator, limits))
        assert [type(o).__name__ for o in out] == ["StoredJob", "LineError", "StoredJob"]
        err = out[1]
        assert isinstance(err, LineError) and err.code == "line_too_large" and err.line == 2
        assert str(len(big) - 1) in err.message and "4096" in err.message and "RATEQUEUE_MAX_LINE_BYTES" in err.message


def test_a_line_of_exactly_the_limit_is_accepted_with_or_without_its_newline(validator: LineValidator) -> None:
    line = _line("a")
    limits = Limits(max_line_bytes=len(line) - 1)  # the newline does not count
    for data in (line, line.rstrip(b"\n")):
        [job] = list(read_lines(io.BytesIO(data), validator, limits))
        assert isinstance(job, StoredJob)
    [err] = list(read_lines(io.BytesIO(line), validator, Limits(max_line_bytes=len(line) - 2)))
    assert isinstance(err, LineError) and err.code == "line_too_large"


def test_a_100_mb_line_is_skipped_fast_in_bounded_memory(validator: LineValidator, tmp_path: Path) -> None:
    path = tmp_path / "huge.jsonl"
    with path.open("wb") as f:
        f.write(_line("before"))
        f.write(b'{"custom_id": "huge", "body": {"x": "')
        block = b"y" * (1 << 20)
        for _ in range(100):
            f.write(block)
        f.write(b'"}}\n')
        f.write(_line("after"))
    tracemalloc.start()
    started = time.perf_counter()
    with path.open("rb") as stream:
        out = list(read_lines(stream, validator, Limits(max_bytes=1 << 30)))
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"100 MB line: {elapsed:.3f} s, peak traced memory {peak / 1e6:.1f} MB")
    assert [type(o).__name__ for o in out] == ["StoredJob", "LineError", "StoredJob"]
    assert isinstance(out[1], LineError) and out[1].line == 2 and out[1].code == "line_too_large"
    assert elapsed < 3.0
    assert peak < 24 * 1024 * 1024
