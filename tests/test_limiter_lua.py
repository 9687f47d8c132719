"""Every limiter Lua script, called directly against the real Redis (no Python wrapper).

Limits used unless a test says otherwise: rpm 6000, tpm 60000, burst 1 s, so the request bucket
holds 100 and refills 100/s, the token bucket holds 1000 and refills 1000/s.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.commands.core import Script

from ratequeue.jobstore.keys import bucket_key
from ratequeue.jobstore.scripts import lua_source
from tests.conftest import wait_until

RPM, TPM, BURST = 6000, 60000, 1.0
RATE_R, RATE_T = 100.0, 1000.0
CAP_R, CAP_T = 100.0, 1000.0

pytestmark = pytest.mark.timeout(30)
Scripts = dict[str, Script]


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def key(r: redis.Redis) -> Iterator[str]:
    k = bucket_key(uuid.uuid4().hex[:12], "gpt-test")
    yield k
    r.delete(k)


@pytest.fixture
def scripts(r: redis.Redis) -> Scripts:
    names = ("reserve", "reconcile", "set_not_before", "peek")
    return {n: r.register_script(lua_source(n, "ratequeue.worker")) for n in names}


def reserve(
    s: Scripts, key: str, costs: list[int], horizon: float = 2.0, rpm: float = RPM, burst: float = BURST
) -> tuple[int, int, list[int]]:
    """(now_us, retry_in_us, waits_us)."""
    raw = s["reserve"](keys=[key], args=[rpm, TPM, burst, round(horizon * 1e6), *costs])
    return int(raw[0]), int(raw[1]), [int(w) for w in raw[2:]]


def peek(s: Scripts, key: str) -> list[Any]:
    raw = s["peek"](keys=[key], args=[RPM, TPM, BURST])
    return [int(raw[0]), float(raw[1]), float(raw[2]), int(raw[3]), float(raw[4]), float(raw[5])]


def reconcile(
    s: Scripts, key: str, dt: float = 0, dr: float = 0, rem_t: float = -1, rem_r: float = -1
) -> list[Any]:
    raw = s["reconcile"](keys=[key], args=[RPM, TPM, BURST, dt, dr, rem_t, rem_r])
    return [int(raw[0]), float(raw[1]), float(raw[2]), int(raw[3]), float(raw[4]), float(raw[5])]


def stored(r: redis.Redis, key: str) -> dict[str, float]:
    return {k: float(v) for k, v in r.hgetall(key).items()}


def test_missing_bucket_is_full_and_peek_writes_nothing(r: redis.Redis, key: str, scripts: Scripts) -> None:
    now_us, lr, lt, nb, cap_r, cap_t = peek(scripts, key)
    assert (lr, lt, nb, cap_r, cap_t) == (CAP_R, CAP_T, 0, CAP_R, CAP_T)
    assert abs(now_us / 1e6 - time.time()) < 5
    assert not r.exists(key)


def test_refill_arithmetic_and_cap(r: redis.Redis, key: str, scripts: Scripts) -> None:
    seconds, micros = r.time()  # one reading: seconds and micros of two could straddle a second
    now_us = int(seconds) * 1_000_000 + int(micros)
    ts = now_us - 500_000
    r.hset(key, mapping={"rl": 10, "rt": ts, "tl": -200, "tt": ts})
    peek_us, lr, lt, *_ = peek(scripts, key)
    elapsed = (peek_us - ts) / 1e6
    assert lr == pytest.approx(10 + RATE_R * elapsed, abs=1e-6)
    assert lt == pytest.approx(-200 + RATE_T * elapsed, abs=1e-6)
    assert 0.5 <= elapsed < 5  # the refill is exact (above); this only checks ts was in the past
    assert stored(r, key) == {"rl": 10, "rt": ts, "tl": -200, "tt": ts}  # peek did not write

    r.hset(key, mapping={"rt": now_us - 10_000_000, "tt": now_us - 10_000_000})  # long idle: full, no more
    assert peek(scripts, key)[1:3] == [CAP_R, CAP_T]


def test_reserve_debits_now_and_goes_into_debt(r: redis.Redis, key: str, scripts: Scripts) -> None:
    now1, retry, waits = reserve(scripts, key, [1000])
    assert (retry, waits) == (-1, [0])
    assert stored(r, key) == {"rl": 99, "rt": now1, "tl": 0, "tt": now1, "bw": BURST}  # bw: sized by BURST

    now2, retry, waits = reserve(scripts, key, [500])
    elapsed = (now2 - now1) / 1e6
    assert retry == -1
    assert waits[0] == math.ceil((500 - RATE_T * elapsed) / RATE_T * 1e6)  # exactly the missing tokens
    assert stored(r, key)["tl"] == pytest.approx(RATE_T * elapsed - 500)  # debt

    now3, _, waits3 = reserve(scripts, key, [500])
    # A later caller waits behind the debt: its send time is 0.5 s after the previous one.
    assert (now3 + waits3[0]) - (now2 + waits[0]) == pytest.approx(500_000, abs=2)


def test_request_bucket_limits_count(key: str, scripts: Scripts) -> None:
    # rpm 60, burst 2 s: two requests at once, then one a second.
    _, retry, waits = reserve(scripts, key, [0, 0, 0, 0], rpm=60, burst=2, horizon=5)
    assert retry == -1
    assert waits[:2] == [0, 0]
    assert waits[2] == pytest.approx(1_000_000, abs=1_000)
    assert waits[3] == pytest.approx(2_000_000, abs=1_000)


def test_request_bucket_below_one_request_still_grants(key: str, scripts: Scripts) -> None:
    # rpm 6, burst 1 s: the bucket holds 0.1 request; the first is granted when it can be scheduled.
    _, retry, waits = reserve(scripts, key, [0, 0], rpm=6, horizon=1)
    assert waits == [9_000_000]
    assert retry == pytest.approx(10_000_000, abs=10)  # the second: 19 s away, 9 s "horizon"


def test_horizon_refusal_does_not_debit_and_retry_in_is_exact(
    r: redis.Redis, key: str, scripts: Scripts
) -> None:
    reserve(scripts, key, [1000])
    before = stored(r, key)
    now, retry, waits = reserve(scripts, key, [500], horizon=0.2)
    assert waits == []
    elapsed = (now - before["tt"]) / 1e6
    assert retry == math.ceil(((500 - RATE_T * elapsed) / RATE_T - 0.2) * 1e6)  # ~0.3 s
    assert stored(r, key) == before  # refused: nothing written

    time.sleep(retry / 1e6)  # a loaded machine sleeps longer: the wait below is computed, not assumed
    now2, retry2, waits2 = reserve(scripts, key, [500], horizon=0.2)
    assert retry2 == -1
    elapsed2 = (now2 - before["tt"]) / 1e6
    assert elapsed2 >= elapsed + retry / 1e6  # not asked before retry_in said
    assert waits2[0] == max(0, math.ceil((500 - RATE_T * elapsed2) / RATE_T * 1e6))  # the missing tokens
    assert waits2[0] <= 200_000  # granted at (or, late, within) the horizon's edge


def test_large_request_granted_when_bucket_can_schedule_it(key: str, scripts: Scripts) -> None:
    # 1500 tokens > capacity 1000 but <= 60000 TPM: granted from a full bucket despite a 0.2 s horizon.
    _, retry, waits = reserve(scripts, key, [1500], horizon=0.2)
    assert (retry, waits) == (-1, [500_000])


def test_large_request_refused_from_partial_bucket(key: str, scripts: Scripts) -> None:
    reserve(scripts, key, [100])
    _, retry, waits = reserve(scripts, key, [1500], horizon=0.2)
    assert waits == []
    assert 95_000 <= retry <= 100_000  # 0.6 s needed, 0.5 s allowed for this size


def test_batch_grants_fifo_prefix(r: redis.Redis, key: str, scripts: Scripts) -> None:
    # Levels 1000 -> 400 -> 100; 500 would wait 0.4 s > 0.3 s; the 100 behind it must not jump the queue.
    _, retry, waits = reserve(scripts, key, [600, 300, 500, 100], horizon=0.3)
    assert waits == [0, 0]
    assert retry == pytest.approx(100_000, abs=1)  # µs, rounded up
    assert stored(r, key)["tl"] == 100
    assert stored(r, key)["rl"] == 98


def test_batch_waits_are_in_order(key: str, scripts: Scripts) -> None:
    # 1000 + 2 s x 1000 tokens fit the horizon: 7 of 8 x 400, each 0.4 s after the one before.
    _, retry, waits = reserve(scripts, key, [400] * 8, horizon=2.0)
    assert waits[:2] == [0, 0]
    assert waits[2:] == pytest.approx([200_000, 600_000, 1_000_000, 1_400_000, 1_800_000], abs=1)
    assert retry == pytest.approx(200_000, abs=1)


def test_not_before_is_honoured(r: redis.Redis, key: str, scripts: Scripts) -> None:
    nb = int(scripts["set_not_before"](keys=[key], args=[300]))
    now, retry, waits = reserve(scripts, key, [10], horizon=1)
    assert now + waits[0] >= nb * 1000
    assert now + waits[0] - nb * 1000 < 1000
    _, retry, waits = reserve(scripts, key, [10], horizon=0.1)
    assert waits == []
    assert 150_000 < retry <= 200_000
    assert peek(scripts, key)[3] == nb


def test_not_before_never_shortened(r: redis.Redis, key: str, scripts: Scripts) -> None:
    nb = int(scripts["set_not_before"](keys=[key], args=[5000]))
    assert int(scripts["set_not_before"](keys=[key], args=[100])) == nb
    assert int(r.hget(key, "nb")) == nb
    assert 5000 < r.pttl(key) <= 6000  # kept alive past nb
    later = int(scripts["set_not_before"](keys=[key], args=[8000]))
    assert later > nb


def test_refill_during_not_before_is_not_banked(key: str, scripts: Scripts) -> None:
    # Full bucket, sending paused 0.5 s: refill beyond capacity in the pause is lost, so at most
    # capacity + rate * w tokens may go in any window after it.
    scripts["set_not_before"](keys=[key], args=[500])
    now, _, waits = reserve(scripts, key, [1000, 600, 400], horizon=3)
    sends = [now + w for w in waits]
    assert sends[1] - sends[0] >= 600_000 - 2_000
    assert sends[2] - sends[0] >= 1_000_000 - 2_000


def test_reconcile_refund_charge_and_capacity(r: redis.Redis, key: str, scripts: Scripts) -> None:
    reserve(scripts, key, [800])
    t0 = stored(r, key)["tt"]
    now, lr, lt, nb, cap_r, cap_t = reconcile(scripts, key, dt=300, dr=1)
    refill = RATE_T * (now - t0) / 1e6
    assert lt == pytest.approx(200 + 300 + refill)
    assert lr == CAP_R  # 99 + refill + 1, capped
    assert (nb, cap_r, cap_t) == (0, CAP_R, CAP_T)
    assert stored(r, key)["tl"] == pytest.approx(lt)

    now2, _, lt2, *_ = reconcile(scripts, key, dt=-900)
    assert lt2 == pytest.approx(lt + RATE_T * (now2 - now) / 1e6 - 900)
    assert lt2 < 0  # an extra charge can create debt
    assert reconcile(scripts, key, dt=10_000)[2] == CAP_T  # a refund never overfills


def test_reconcile_lowers_to_server_remaining_but_never_raises(
    r: redis.Redis, key: str, scripts: Scripts
) -> None:
    # Lowered to 40% of it: another deployment unaware of this one may read the same figure.
    _, lr, lt, *_ = reconcile(scripts, key, rem_t=250, rem_r=5)
    assert (lr, lt) == (2, 100)
    now = stored(r, key)["tt"]
    now2, lr2, lt2, *_ = reconcile(scripts, key, rem_t=900, rem_r=90)
    elapsed = (now2 - now) / 1e6
    assert lt2 == pytest.approx(100 + RATE_T * elapsed)  # not raised to 900, nor to 40% of it
    assert lr2 == pytest.approx(2 + RATE_R * elapsed)
    _, _, lt3, *_ = reconcile(scripts, key, dt=100, rem_t=0)
    assert lt3 == 0  # the clamp applies after the refund


def test_expiry_matches_refill_time(r: redis.Redis, key: str, scripts: Scripts) -> None:
    # Expiry times are compared with Redis's clock at the reservation, not with a PTTL read some
    # unknown time later: they hold however slow the machine is.
    now_us, *_ = reserve(scripts, key, [1000])  # empty: full again in 1 s, + 1 s margin
    assert int(r.execute_command("PEXPIRETIME", key)) - now_us / 1000 == pytest.approx(2000, abs=2)
    # A correction keeps the hash 10 min at least: it holds the share of the limits other clients
    # leave (reconcile.lua), which an idle deployment must not forget once its bucket is full.
    reconciled_us, *_ = reconcile(scripts, key, dt=500)
    assert int(r.execute_command("PEXPIRETIME", key)) - reconciled_us / 1000 == pytest.approx(600_000, abs=2)


def test_idle_bucket_vanishes(r: redis.Redis, key: str, scripts: Scripts) -> None:
    reserve(scripts, key, [50], burst=0.05)  # capacity 50, full again after 0.05 s
    assert 0 < r.pttl(key) <= 1050  # refill time + 1 s margin
    wait_until(lambda: not r.exists(key), 10, "the idle bucket to expire")


def test_bad_cost_rejected_without_writing(r: redis.Redis, key: str, scripts: Scripts) -> None:
    with pytest.raises(redis.ResponseError, match="outside"):
        reserve(scripts, key, [10, TPM + 1])
    with pytest.raises(redis.ResponseError, match="outside"):
        reserve(scripts, key, [-1])
    assert not r.exists(key)
