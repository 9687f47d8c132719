"""Deferred work re-priced when the share grows back (issue 11, ``worker.backlog.reprice`` and
``worker.reschedule``): work deferred during a deep cut came back on schedules priced at the cut
share after the share was whole again, leaving the bucket idle between chunks. The deferred set
is the real Redis."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest
import redis
import redis.asyncio as aioredis

from ratequeue.jobstore import keys
from ratequeue.worker.backlog import Backlog, job_ref
from ratequeue.worker.limiter import BucketLimits
from ratequeue.worker.reschedule import Rescheduler

WHOLE = BucketLimits(600, 60_000, 5.0)  # 10 requests a second
CUT = replace(WHOLE, share=0.25)


def test_a_share_given_back_brings_the_schedule_forward() -> None:
    backlog = Backlog()
    refs = [job_ref("b", f"j{n}") for n in range(3)]
    backlog.schedule("k", CUT, [100] * 25, 1.0)  # 25 jobs booked: 10 s at a quarter of the limits
    first = backlog.schedule("k", CUT, [100] * 25, 1.0, refs[:1])
    second = backlog.schedule("k", CUT, [100] * 25, 1.0, refs[1:2])
    assert (first, second) == (pytest.approx(10, abs=0.1), pytest.approx(20, abs=0.1))
    assert backlog.reprice("k", replace(WHOLE, share=0.27)) == {}  # a few percent: not worth a write
    moved = backlog.reprice("k", WHOLE)  # four times faster: each wait from now is a quarter
    assert moved[refs[1]] == pytest.approx(second / 4, abs=0.1)
    assert moved[refs[0]] == pytest.approx(first / 4, abs=0.1)
    assert backlog.reprice("k", WHOLE) == {}  # priced at these limits now
    # New work books behind the schedule as re-priced (at a quarter of its old end).
    assert backlog.schedule("k", WHOLE, [100] * 5, 1.0, refs[2:]) == pytest.approx((second + 10) / 4, abs=0.1)
    assert sorted(backlog.recall("k")) == sorted(refs)


def test_repricing_moves_the_deferred_set_earlier_never_later(rclient: redis.Redis, redis_url: str) -> None:
    backlog = Backlog()
    early, late, gone = job_ref("b", "early"), job_ref("b", "late"), job_ref("b", "gone")
    now_ms = int(time.time() * 1000)
    backlog.schedule("k", CUT, [100] * 50, 1.0)  # 50 jobs booked ahead: 20 s at a quarter
    assert backlog.schedule("k", CUT, [100] * 5, 1.0, [late]) == pytest.approx(20, abs=0.1)
    backlog.schedule("k", CUT, [100] * 5, 1.0, [early, gone])
    # `early` was deferred again meanwhile (another reason, sooner); `gone` moved back to the queue.
    rclient.zadd(keys.deferred_jobs(), {late: now_ms + 20_000, early: now_ms + 1_000})

    async def reprice() -> None:
        client = aioredis.Redis.from_url(redis_url)
        # The speed-up alone: the work booked ahead here has no members (catch_up would see it gone).
        await Rescheduler(backlog, client).reprice("k", WHOLE, catch_up=False)
        await client.aclose()

    asyncio.run(reprice())
    due = dict(rclient.zrange(keys.deferred_jobs(), 0, -1, withscores=True))
    assert due[late.encode()] == pytest.approx(now_ms + 20_000 / 4, abs=300)
    assert due[early.encode()] == now_ms + 1_000  # never later than it was
    assert gone.encode() not in due  # not brought back into the set


def test_work_that_fits_in_what_the_bucket_holds_waits_for_nobody() -> None:
    """Priced at the refill rate alone, the work behind a 60 s server window's opening allowance
    was deferred in chunks every 2 s while the server reported 35 s of limit left."""
    backlog = Backlog()
    with backlog.waiting("k", WHOLE, 100), backlog.waiting("k", WHOLE, 100):
        backlog.admit("k", WHOLE, {job_ref("b", f"w{n}"): 100 for n in range(98)})  # 100 waiting: 10 s
        assert backlog.ahead("k")[0] == pytest.approx(10)
        backlog.credit("k", WHOLE, requests=80, tokens=8_000)  # the bucket holds 8 s of the limits
        assert backlog.ahead("k")[0] == pytest.approx(2)
        assert backlog.defer_for("k", WHOLE, 100, patience=3.0) is None
        backlog.credit("k", WHOLE, requests=-20, tokens=8_000)  # in debt: no credit, no more
        assert backlog.ahead("k")[0] == pytest.approx(10)


def test_work_deferred_behind_a_queue_sent_sooner_than_priced_comes_back_at_its_turn(
    rclient: redis.Redis, redis_url: str
) -> None:
    """Work is booked behind the queue waiting here, priced at the refill rate. When that queue is
    sent sooner (from what the bucket held: a 60 s server window's room), the schedule comes forward
    to the queue's turn: 100 jobs booked behind 900 at the opening came back at t=27-29 s while
    everything ahead of them was sent by t=9 s (issue 11, 60 s window, max rule: 2.6 times the minimum)."""
    backlog = Backlog()
    first, second = job_ref("b", "first"), job_ref("b", "second")
    queued = {job_ref("b", f"w{n}"): 100 for n in range(200)}  # 200 waiting here: 20 s of the limits
    backlog.admit("k", WHOLE, queued)
    assert backlog.schedule("k", WHOLE, [100] * 50, 10.0, [first]) == pytest.approx(18, abs=0.1)
    assert backlog.schedule("k", WHOLE, [100] * 50, 10.0, [second]) == pytest.approx(23, abs=0.1)
    now_ms = int(time.time() * 1000)
    rclient.zadd(keys.deferred_jobs(), {first: now_ms + 18_000, second: now_ms + 23_000})

    async def answers_flushed() -> None:  # what each flush of the bucket's corrections does
        client = aioredis.Redis.from_url(redis_url)
        await Rescheduler(backlog, client).reprice("k", WHOLE)
        await client.aclose()

    asyncio.run(answers_flushed())  # the queue still waits: the schedule holds
    due = dict(rclient.zrange(keys.deferred_jobs(), 0, -1, withscores=True))
    assert due[first.encode()] == pytest.approx(now_ms + 18_000, abs=50)
    backlog.release(list(queued)[:180])  # 180 of them sent at once: 2 s of work left here
    asyncio.run(answers_flushed())
    due = dict(rclient.zrange(keys.deferred_jobs(), 0, -1, withscores=True))
    # Due at its turn (2 s of work less the 2 s lead: now), the next one its 5 s of work later.
    assert due[first.encode()] == pytest.approx(now_ms, abs=300)
    assert due[second.encode()] == pytest.approx(now_ms + 5_000, abs=300)


def test_work_deferred_while_the_share_is_the_openings_guess_is_priced_at_the_whole_limits() -> None:
    """A batch started in a route's opening (the share at half until the server's readings show
    nobody else spends) was booked at half speed, then brought forward when the share came back:
    route by route, a second apart, so the chunks chosen in between all went to the route repriced
    first (two routes of 3,000 RPM: one idle for 5 s). Priced at the whole limits from the start,
    nothing is left to bring forward."""
    backlog = Backlog()
    guessed = replace(WHOLE, share=0.5, priced_share=1.0)
    refs = [job_ref("b", f"j{n}") for n in range(2)]
    first = backlog.schedule("k", guessed, [100] * 50, 1.0, refs[:1])
    second = backlog.schedule("k", guessed, [100] * 50, 1.0, refs[1:])
    assert (first, second) == (0.0, pytest.approx(5, abs=0.1))  # 50 jobs at 10 a second, not 5
    assert backlog.reprice("k", WHOLE) == {}
    # A share cut on evidence (another client seen) still prices the schedule.
    backlog.schedule("cut", CUT, [100] * 10, 1.0)
    assert backlog.schedule("cut", CUT, [100] * 10, 1.0, refs[:1]) == pytest.approx(4, abs=0.1)
