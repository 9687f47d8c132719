"""The shared share of a bucket (reconcile.lua, issue 11), driven directly on the real Redis: cut
by 429s and by the fall of the server's room, given back when it shows room, the opening claim of a
deployment that may not be alone, and the memory of a cut."""

from __future__ import annotations

import time
import uuid
from dataclasses import replace

import pytest
import redis

from ratequeue.jobstore.keys import bucket_key
from ratequeue.worker.limiter import BucketLimits, SyncLimiter

LIMITS_AT_HALF = BucketLimits(600, 60_000, 1.0, share=0.5)  # 10 requests/s, spent at half


def test_429s_cut_the_shared_share_to_what_the_server_accepted(redis_url: str) -> None:
    """reconcile.lua directly: a window with 5 refusals of 10 answers halves the share, once."""
    limiter = SyncLimiter(redis.Redis.from_url(redis_url))
    key = bucket_key(uuid.uuid4().hex[:12], "gpt-test")
    full = BucketLimits(600, 60_000, 1.0)
    assert limiter.reconcile(key, full, refused=5, answered=10).share == 1.0
    time.sleep(0.3)  # a window with 4 refusals or more closes after a quarter of a second
    assert limiter.reconcile(key, full).share == pytest.approx(0.5)
    # The 429s of the next window's first moments do not cut it again at once.
    assert limiter.reconcile(key, LIMITS_AT_HALF, refused=3, answered=3).share == pytest.approx(0.5)


def test_the_share_comes_back_when_the_server_reports_room(redis_url: str) -> None:
    limiter = SyncLimiter(redis.Redis.from_url(redis_url))
    key = bucket_key(uuid.uuid4().hex[:12], "gpt-test")
    limiter.reconcile(key, BucketLimits(600, 60_000, 1.0), refused=5, answered=5)
    time.sleep(0.3)  # the server reported none left: the share is cut to half
    assert limiter.reconcile(key, BucketLimits(600, 60_000, 1.0), remaining_requests=0).share == pytest.approx(0.5)
    time.sleep(1.05)  # the other client stopped: a full minute of requests left at the server
    assert limiter.reconcile(key, LIMITS_AT_HALF, answered=5, remaining_requests=600).share == 1.0


def _cut_to_half(limiter: SyncLimiter, key: str, limits: BucketLimits) -> float:
    """A share below 1 (not an opening): a window of 429s, closed a second later."""
    limiter.reconcile(key, limits, refused=1, answered=1)
    time.sleep(1.05)
    return limiter.reconcile(key, limits).share


def test_a_draining_server_bucket_slows_ratequeue_before_any_429(redis_url: str) -> None:
    """From near the buffer, the fall of what the server reports left is the account's overspend
    (another client's onset): the share is cut by half of it, per window."""
    limiter = SyncLimiter(redis.Redis.from_url(redis_url))
    key = bucket_key(uuid.uuid4().hex[:12], "gpt-test")
    full = BucketLimits(600, 60_000, 5.0)  # a bucket of 50: it lives on for seconds
    share = _cut_to_half(limiter, key, full)
    for left in (40, 22):  # 4 s, then 2.2 s of the limit left at the server: windows of a second
        share = limiter.reconcile(key, replace(full, share=share), answered=1, remaining_requests=left).share
        time.sleep(1.05)
    # 1.6 s left: below the buffer (2 s, at most half the 4 s seen), 0.6 s less in about a second.
    cut = limiter.reconcile(key, replace(full, share=share), answered=1, remaining_requests=16).share
    assert cut == pytest.approx(share * (1 - 0.6 / 1.07 / 2), abs=0.015)


def test_a_deployment_alone_doubles_its_claim_on_the_servers_room(redis_url: str) -> None:
    """The opening claims 40% of the server's remaining (10 s of limit here). After the opening's
    own window (partial: it holds, whatever it shows), a window in which the
    server's rooms fell by what our own answers were charged (nobody else spends) doubles the claim
    and gives the level that part of the room above the buffer, and the share back; a fall our
    answers do not explain (another client), or no spending of ours to compare with, does not.
    The token room binds: counted in requests, our spending hardly showed (issue 11, 60 s window)."""
    limiter = SyncLimiter(redis.Redis.from_url(redis_url))
    full = BucketLimits(600, 60_000, 20.0)  # 10 requests, 1,000 tokens a second; a bucket of 20 s
    results = {}
    # (what our answers were charged, the server's token room after the window)
    # (10 s, less 4 s of ours, plus 1.05 s of refill: 7 s)
    cases = {"alone": ((4, 4_000), 7_000), "another client": ((0, 0), 6_000), "no evidence": ((0, 0), 10_000)}
    for name, (charged, tokens_left) in cases.items():
        key = bucket_key(uuid.uuid4().hex[:12], "gpt-test")
        opening = limiter.reconcile(key, full, remaining_tokens=10_000)  # the token room: 10 s
        assert opening.share == 0.5 and opening.tokens == pytest.approx(4_000, abs=50)
        time.sleep(1.05)
        half = replace(full, share=opening.share)
        # The opening's window is partial (the front of its answers: our first few charges, the
        # room as it was): it looks alone, and changes nothing.
        front = limiter.reconcile(key, half, charged=(1, 1_000), remaining_tokens=10_000)
        assert front.share == 0.5 and front.tokens <= 4_000
        time.sleep(1.05)
        results[name] = limiter.reconcile(key, half, charged=charged, remaining_tokens=tokens_left)
    alone = results["alone"]
    # claim 80%: 40% + 40% of the room above the 2 s buffer (7 s left): 5,600 tokens; share back to 1
    assert alone.share == 1.0 and alone.tokens == pytest.approx(0.8 * 7_000, abs=50)
    other = results["another client"]
    assert other.share < 1.0 and other.tokens == pytest.approx(0.4 * 6_000, abs=50)
    assert results["no evidence"].tokens == pytest.approx(0.4 * 10_000, abs=50)


def test_a_draining_server_bucket_from_high_up_is_a_burst_a_tenth(redis_url: str) -> None:
    """From high up, the fall is mostly a burst being spent (an opening), not a pace: a tenth."""
    limiter = SyncLimiter(redis.Redis.from_url(redis_url))
    key = bucket_key(uuid.uuid4().hex[:12], "gpt-test")
    full = BucketLimits(600, 60_000, 10.0)
    share = _cut_to_half(limiter, key, full)
    for left in (90, 90):  # 9 s left
        share = limiter.reconcile(key, replace(full, share=share), answered=1, remaining_requests=left).share
        time.sleep(1.05)
    cut = limiter.reconcile(key, replace(full, share=share), answered=1, remaining_requests=15).share
    assert cut == pytest.approx(share * 0.9)


def test_an_opening_claims_part_of_what_the_server_reports(redis_url: str) -> None:
    """The first answer that reports a remaining: another deployment may be opening on the same
    key, reading the same figure. The bucket's level takes 40% of it, the share starts at half."""
    limiter = SyncLimiter(redis.Redis.from_url(redis_url))
    key = bucket_key(uuid.uuid4().hex[:12], "gpt-test")
    levels = limiter.reconcile(key, BucketLimits(600, 60_000, 10.0), remaining_requests=100, remaining_tokens=20_000)
    assert levels.share == 0.5
    assert levels.requests == pytest.approx(40, abs=0.5) and levels.tokens == pytest.approx(8_000, abs=50)
    # Without any remaining figure nothing is known of other clients: the full limits.
    other = bucket_key(uuid.uuid4().hex[:12], "gpt-test")
    assert limiter.reconcile(other, BucketLimits(600, 60_000, 10.0), answered=1).share == 1.0


def test_a_cut_share_outlives_an_idle_bucket(redis_url: str) -> None:
    """A deployment idle for seconds after a cut (its jobs deferred) came back at the full limits
    into another client's spending: the bucket hash, and the share in it, expired once full."""
    limiter = SyncLimiter(redis.Redis.from_url(redis_url))
    key = bucket_key(uuid.uuid4().hex[:12], "gpt-test")
    # 50 requests below a bucket of 100: the hash lives on for 6 s, through the window of 429s.
    limiter.reconcile(key, BucketLimits(600, 60_000, 10.0), request_delta=-50, refused=3, answered=10)
    time.sleep(1.05)
    small = BucketLimits(600, 60_000, 1.0)  # 10 requests, full again within a second
    assert limiter.reconcile(key, small).share == pytest.approx(0.65)  # 30% refused: 5% below the rest
    time.sleep(2.5)  # the bucket would be full and its hash gone
    assert limiter.reconcile(key, replace(small, share=0.65)).share == pytest.approx(0.66, abs=0.005)


def test_a_share_holds_while_the_servers_room_stays_below_the_buffer(redis_url: str) -> None:
    """A room that stays low but does not fall: every client of the account together spends the
    limit (it would rise otherwise), and growing only probes for 429s (measured without
    Retry-After: two deployments and a foreign client at the edge, 1-3 429s a second for 20 s).
    The share holds there, and grows again once the room rises above the buffer."""
    limiter = SyncLimiter(redis.Redis.from_url(redis_url))
    key = bucket_key(uuid.uuid4().hex[:12], "gpt-test")
    full = BucketLimits(600, 60_000, 10.0)  # 10 requests a second, a bucket of 100
    share = _cut_to_half(limiter, key, full)
    for left in (40, 10, 10, 10):  # 4 s seen (a buffer of 2 s), then 1 s left, flat
        share = limiter.reconcile(key, replace(full, share=share), answered=1, remaining_requests=left).share
        time.sleep(1.05)
    held = limiter.reconcile(key, replace(full, share=share), answered=1, remaining_requests=10).share
    assert held == pytest.approx(share)
    time.sleep(1.05)  # the room rose to 4 s: grown by the room above the buffer, spread over 6 s
    grown = limiter.reconcile(key, replace(full, share=held), answered=1, remaining_requests=40).share
    assert grown == pytest.approx(held + 2 / 6 * 1.05, abs=0.02)


def test_a_deployment_alone_two_windows_in_a_row_doubles_its_share(redis_url: str) -> None:
    """An opening that spent the server's room leaves it below the buffer: grown by the room, the
    share crept up by 1% a second (a lone deployment on a 60 s server window spent half the
    limits for most of its run). The second window in a row that shows us alone doubles it; the
    first does not (another deployment may have sent nothing for a second: its jobs deferred)."""
    limiter = SyncLimiter(redis.Redis.from_url(redis_url))
    key = bucket_key(uuid.uuid4().hex[:12], "gpt-test")
    full = BucketLimits(600, 60_000, 20.0)  # 10 requests, 1,000 tokens a second
    assert limiter.reconcile(key, full, remaining_tokens=10_000).share == 0.5  # the opening: 10 s
    time.sleep(1.05)
    limiter.reconcile(key, replace(full, share=0.5), remaining_tokens=10_000)  # the opening's partial window
    time.sleep(1.05)
    # Our opening drained the token room to 2 s (10 s, less 9 s of ours, plus the refill).
    share = limiter.reconcile(key, replace(full, share=0.5), charged=(9, 9_000), remaining_tokens=2_050).share
    assert share == pytest.approx(0.51, abs=0.005)
    time.sleep(1.05)
    doubled = limiter.reconcile(key, replace(full, share=share), charged=(1, 1_000), remaining_tokens=2_100).share
    assert doubled == 1.0  # twice 0.51


def test_no_gift_once_the_claim_is_whole(redis_url: str) -> None:
    """A gift (the room above the buffer, given to the level) is for the room the claim held back
    while it climbed. Once the claim is whole, our level refills as the server's room does; a gift
    then, sized by readings that predate what was in flight, spent it twice (60 s window: 14
    requests sent at once from a level refilled while idle, 12 429s)."""
    limiter = SyncLimiter(redis.Redis.from_url(redis_url))
    key = bucket_key(uuid.uuid4().hex[:12], "gpt-test")
    full = BucketLimits(600, 60_000, 60.0)  # 1,000 tokens a second; a bucket of 60 s
    share = limiter.reconcile(key, full, remaining_tokens=60_000).share  # the opening: claim 0.4
    room = 60_000
    # The opening's partial window, then two windows alone: the claim climbs to 0.8, then 1.
    for spent in (0, 20_000, 20_000, 1_000):
        time.sleep(1.05)
        room += 1_050 - spent
        levels = limiter.reconcile(key, replace(full, share=share), token_delta=-spent,
                                   charged=(spent // 1_000, spent), remaining_tokens=room)
        share = levels.share
    time.sleep(1.05)
    # 13,000 tokens reserved and answered; the readings of these answers do not show them yet.
    room += 1_050
    after = limiter.reconcile(key, replace(full, share=share), token_delta=-13_000, charged=(13, 13_000),
                              remaining_tokens=room)
    assert after.tokens == pytest.approx(levels.tokens - 13_000 + 1_050, abs=100)


def test_the_room_is_grown_into_in_proportion_to_our_spending(redis_url: str) -> None:
    """When another client stops, every deployment on the key sees the same room rise; each grew
    into all of it, and together they went back to twice the limit. Each now grows by its part of
    what the window shows spent (ours / (ours + others))."""
    limiter = SyncLimiter(redis.Redis.from_url(redis_url))
    full = BucketLimits(600, 60_000, 10.0)  # 10 requests a second, a bucket of 100
    grown = {}
    for name, ours in {"all of it": 4, "half of it": 2}.items():
        key = bucket_key(uuid.uuid4().hex[:12], "gpt-test")
        share = _cut_to_half(limiter, key, full)
        time.sleep(1.05)  # a window that reads 3 s of limit left (growing by 1%: no trend yet)
        share = limiter.reconcile(key, replace(full, share=share), answered=1, remaining_requests=30).share
        time.sleep(1.05)
        # 3.65 s left now: 0.4 s of limit spent in the window (plus 1.05 s of refill), all by us,
        # or half by us and half by another client.
        after = limiter.reconcile(key, replace(full, share=share), answered=ours, charged=(ours, 0),
                                  remaining_requests=36.5).share
        grown[name] = after - share
    assert grown["all of it"] == pytest.approx((3.65 - 2) / 6 * 1.05, abs=0.02)
    assert grown["half of it"] == pytest.approx(grown["all of it"] / 2, abs=0.02)


def test_a_worker_a_flush_behind_reads_the_servers_room_at_its_own_share(redis_url: str) -> None:
    """The server's room is read in seconds of the full limits, which reconcile.lua recovers from
    the worker's limits and the share they were spent at. A worker that had not flushed since the
    share doubled sent limits at the old half share, read as the new whole one: the room looked
    twice as large (73.8 s on a 60 s server) and the gift sized by it drew 206-228 429s at once
    (issue 11, 60 s window, sum rule, 2 of 3 runs)."""
    limiter = SyncLimiter(redis.Redis.from_url(redis_url))
    full = BucketLimits(600, 60_000, 60.0)  # 1,000 tokens a second; a bucket of 60 s
    after = {}
    for worker_share in (1.0, 0.5):  # in step with the bucket's share, or a flush behind it
        key = bucket_key(uuid.uuid4().hex[:12], "gpt-test")
        share = limiter.reconcile(key, full, remaining_tokens=60_000).share  # the opening: claim 0.4
        room = 60_000
        for spent in (0, 20_000):  # the opening's partial window, then one alone: share 1, claim 0.8
            time.sleep(1.05)
            room += 1_050 - spent
            share = limiter.reconcile(key, replace(full, share=share), token_delta=-spent,
                                      charged=(spent // 1_000, spent), remaining_tokens=room).share
        assert share == 1.0
        time.sleep(1.05)  # a window alone again: the claim climbs to 1, and a gift follows the room
        room += 1_050 - 5_000  # 20,000 tokens reserved since, 5,000 of them answered and in the reading
        after[worker_share] = limiter.reconcile(key, replace(full, share=worker_share), token_delta=-20_000,
                                                charged=(5, 5_000), remaining_tokens=room)
        seen = float(redis.Redis.from_url(redis_url).hget(key, "fl") or 0)
        assert seen == pytest.approx(room / 1_000, abs=0.01)  # seconds of the full limits
    # The worker behind refills its level at its own (half) rate for the window: less, never more.
    assert after[0.5].tokens <= after[1.0].tokens + 50


def test_the_openings_share_is_a_guess_until_a_window_shows_another_client(redis_url: str) -> None:
    """The opening's half share is a precaution, not a reading: the workers price deferred work at
    the whole limits while it lasts (worker.backlog). A window with a 429 ends the guess."""
    limiter = SyncLimiter(redis.Redis.from_url(redis_url))
    key = bucket_key(uuid.uuid4().hex[:12], "gpt-test")
    full = BucketLimits(600, 60_000, 10.0)
    opening = limiter.reconcile(key, full, remaining_requests=100, answered=1)
    assert opening.share == 0.5 and opening.guessed
    assert limiter.reconcile(key, LIMITS_AT_HALF, refused=4, answered=4).guessed  # its window still open
    time.sleep(0.3)  # a window with 4 refusals closes after a quarter of a second
    assert not limiter.reconcile(key, LIMITS_AT_HALF, answered=1, remaining_requests=50).guessed
