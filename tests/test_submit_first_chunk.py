"""Submission streams: the first chunk goes on the queue before the rest of a large input is read."""

from __future__ import annotations

from collections.abc import Iterator

import redis

from ratequeue.jobstore.jobs import StoredJob
from ratequeue.producer.submit import Submitter


def test_the_first_chunk_is_published_before_a_whole_block_is_read(rclient: redis.Redis) -> None:
    """Jobs are stored in blocks of 500 lines, one transaction each, and chunks go out as blocks are
    stored. The first chunk waited for the first 500 lines to be read and counted (0.2-0.45 s of a
    1,500-job submission): on a server that forgives a whole minute, that is wall time the opening
    allowance cannot make up (issue 11, 60 s window; 5% of the minimum is 0.6 s there)."""
    read = 0
    published_after: list[int] = []

    def lines() -> Iterator[StoredJob]:
        nonlocal read
        body = {"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
        for n in range(1_000):
            read += 1
            yield StoredJob(f"c-{n}", n + 1, "/v1/chat/completions", body, "gpt-4o-mini", 20, 15, 5)

    submitter = Submitter(rclient, lambda _batch, _ids: published_after.append(read), chunk_size=50, block=500)
    report = submitter.add(submitter.create_batch("default"), lines())
    assert (report.jobs, report.chunks) == (1_000, 20)
    assert published_after[0] == 50  # the first chunk's lines, no more
    assert published_after[1:3] == [550, 550]  # then blocks of 500 as before
