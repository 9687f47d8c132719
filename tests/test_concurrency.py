"""The adaptive concurrency window (worker.concurrency), on its own: a simulated server of fixed
capacity answers it, with latency flat up to its capacity and queueing beyond; which pairs get a
window; the per-pair cap it keeps in FairInFlight; the overload verdict of the policy."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from ratequeue.config.models import generic_spec, load_model_table
from ratequeue.config.settings import Settings
from ratequeue.worker.concurrency import AdaptiveWindow, ConcurrencyWindows
from ratequeue.worker.inflight import FairInFlight
from ratequeue.worker.policy import Reason, Verdict, classify
from ratequeue.worker.upstream import UpstreamResponse

pytestmark = pytest.mark.unit

SERVICE = 0.2  # seconds a request takes once in service


def drive(window: AdaptiveWindow, capacity: int, queue: int, rounds: int) -> tuple[list[int], int]:
    """Run the window against a server serving ``capacity`` at once with ``queue`` places behind:
    each round trip, ``window.size`` requests are in flight; those past capacity wait in the queue
    (latency grows as Little's law says), those past the queue are refused. Returns the window's
    size after each round trip and the refusals."""
    sizes, refused = [], 0
    for _ in range(rounds):
        n = window.size
        served = min(n, capacity + queue)
        latency = SERVICE * max(1.0, served / capacity)
        for i in range(n):
            if i < served:
                window.answered(latency, n)
            else:
                refused += 1
                window.refused(n)
        sizes.append(window.size)
    return sizes, refused


def test_the_window_opens_to_the_servers_capacity_and_stays_there() -> None:
    window = AdaptiveWindow(maximum=64)
    assert window.size == 4
    sizes, refused = drive(window, capacity=8, queue=4, rounds=120)
    assert refused == 0
    assert max(sizes) <= 12  # never past what the server serves and queues
    # Full, with at most 2 queued, for ever: a base probed again before it ages out does not creep.
    assert all(8 <= s <= 10 for s in sizes[5:]), sizes


def test_a_large_server_is_reached_by_slow_start_then_held_under_its_queue() -> None:
    window = AdaptiveWindow(maximum=256)
    sizes, refused = drive(window, capacity=64, queue=32, rounds=120)
    assert refused == 0
    assert sizes.index(next(s for s in sizes if s >= 64)) <= 8, sizes  # x1.5 per measured round
    assert all(58 <= s <= 80 for s in sizes[10:]), sizes  # the probe: a round at 64 / 1.1


def test_the_configured_maximum_bounds_it() -> None:
    sizes, _ = drive(AdaptiveWindow(maximum=6), capacity=64, queue=0, rounds=20)
    assert max(sizes) == 6 and sizes[-1] == 6


def test_refusals_cut_it_by_30_percent_once_per_round() -> None:
    window = AdaptiveWindow(maximum=64, initial=20)
    assert window.refused(20) and window.size == 14
    for _ in range(5):  # the other refusals of requests sent before the cut
        window.refused(20)
    assert window.size == 14
    for _ in range(14):  # a whole round after the cut (the window not used: no growth)
        window.answered(SERVICE, 5)
    assert window.refused(14) and window.size == 9  # the next refusal counts again
    sizes = []
    for _ in range(34):  # rounds without any queue
        for _ in range(window.size):
            window.answered(SERVICE, window.size)
        sizes.append(window.size)
    # Never past 90% of the 13 calls in flight that drew the last refusal, until 30 rounds in a row
    # show no queue at all (the other workers that shared the server have left).
    assert sizes[:29] == [10] + [11] * 28 and sizes[-1] > 11, sizes
    assert not window.slow_start


def test_a_latency_rise_cuts_it_to_what_the_server_serves_without_queueing() -> None:
    window = AdaptiveWindow(maximum=64, initial=16)
    for _ in range(16):
        window.answered(SERVICE, 16)  # the base: flat; slow start grows it by half
    assert window.size == 24
    for _ in range(24):  # 24 in flight, latency x1.5: 16 served at once, 8 queued
        window.answered(1.5 * SERVICE, 24)
    assert window.size == 16 and not window.slow_start


def test_a_window_not_used_does_not_grow() -> None:
    window = AdaptiveWindow(maximum=64)
    for _ in range(40):
        window.answered(SERVICE, 1)  # one call at a time: nothing is learned about more
    assert window.size == 4


def test_two_processes_windows_share_the_server_without_refusals() -> None:
    a, b = AdaptiveWindow(maximum=64), AdaptiveWindow(maximum=64)
    capacity, queue, refused, totals = 8, 4, 0, []
    for _ in range(120):
        total = a.size + b.size
        served = min(total, capacity + queue)
        latency = SERVICE * max(1.0, served / capacity)
        for window, n in ((a, a.size), (b, b.size)):
            for _ in range(n):
                if served > 0:
                    served -= 1
                    window.answered(latency, n)
                else:
                    refused += 1
                    window.refused(n)
        totals.append(a.size + b.size)
    assert all(8 <= t <= 12 for t in totals[20:]), totals
    assert refused <= 4  # the opening's overshoot at most


def _response(status: int, body: object, **headers: str) -> UpstreamResponse:
    return UpstreamResponse(status, body, headers, elapsed=SERVICE)


def test_which_pairs_get_a_window_and_the_cap_it_keeps() -> None:
    places = FairInFlight(1024)
    windows = ConcurrencyWindows(Settings().max_concurrency_per_model, places)
    known = load_model_table(Settings()).get("gpt-4o-mini")
    ok: dict[str, str] = {}
    # A known model: bound after 3 answers without x-ratelimit-*, not before.
    assert not windows.answered("a:gpt-4o-mini", known, "a", 200, ok, SERVICE, 1)
    assert not windows.answered("a:gpt-4o-mini", known, "a", 0, ok, SERVICE, 1)  # a transport failure: no answer
    assert not windows.answered("a:gpt-4o-mini", known, "a", 200, ok, SERVICE, 1)
    assert windows.answered("a:gpt-4o-mini", known, "a", 200, ok, SERVICE, 1)
    assert windows.size("a:gpt-4o-mini") == 4 and places._caps["a:gpt-4o-mini"] == 4
    # One answer with a rate-limit header (even Azure's -1) ends it for good.
    assert not windows.answered("a:gpt-4o-mini", known, "a", 200, {"x-ratelimit-limit-tokens": "-1"}, SERVICE, 1)
    assert windows.size("a:gpt-4o-mini") is None and "a:gpt-4o-mini" not in places._caps
    for _ in range(5):
        assert not windows.answered("a:gpt-4o-mini", known, "a", 503, ok, SERVICE, 1)
    # A model with no known limits is windowed from its first call.
    unknown = generic_spec("llama3.1:8b", "cl100k_base")
    assert windows.bound("a:llama3.1:8b", unknown)
    windows.before_send("a:llama3.1:8b", unknown, "a")
    assert places._caps["a:llama3.1:8b"] == 4
    assert windows.answered("a:llama3.1:8b", unknown, "a", 503, ok, SERVICE, 4)
    assert places._caps["a:llama3.1:8b"] == 2  # 4 x 0.7
    # The ceiling is the setting, within max_in_flight.
    assert ConcurrencyWindows(64, FairInFlight(10)).maximum == 10


def test_a_concurrency_bound_servers_503_and_overload_429_are_a_pace_signal() -> None:
    ollama = _response(503, {"error": "server busy, please try again.  maximum pending requests exceeded"})
    tgi = _response(429, {"error": "Model is overloaded", "error_type": "overloaded"})
    openai_429 = _response(429, {"error": {"type": "requests", "code": "rate_limit_exceeded", "message": "slow"}})
    for resp in (ollama, tgi):
        got = classify(resp, concurrency_bound=True)
        assert (got.verdict, got.kind, got.kind.rate_limited) == (Verdict.RETRY, Reason.OVERLOADED, False)
    assert classify(openai_429, concurrency_bound=True).kind is Reason.RATE_LIMIT_REQUESTS
    # Unchanged for a server with rate limits.
    assert classify(ollama).kind is Reason.SERVER_ERROR
    assert classify(tgi).kind is Reason.RATE_LIMIT_TOKENS
    waited = classify(dataclasses.replace(ollama, headers={"retry-after": "2"}), concurrency_bound=True)
    assert waited.retry_after == 2.0
    parked = classify(dataclasses.replace(ollama, headers={"retry-after": "900"}), park_after=300,
                      concurrency_bound=True)
    assert parked.verdict is Verdict.PARK


def test_a_pair_at_its_cap_waits_while_other_pairs_take_the_free_places() -> None:
    async def main() -> list[str]:
        places = FairInFlight(10)
        places.set_cap("hosted", 2)
        got: list[str] = []
        release = asyncio.Event()

        async def hold(pair: str) -> None:
            async with places.slot(pair, 1.0):
                got.append(pair)
                await release.wait()

        tasks = [asyncio.create_task(hold("hosted")) for _ in range(4)]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(hold("other")))  # behind the capped pair's waiting calls
        await asyncio.sleep(0)
        assert sorted(got) == ["hosted", "hosted", "other"]
        places.set_cap("hosted", 3)  # a grown window lets a waiting call in at once
        await asyncio.sleep(0)
        assert got.count("hosted") == 3
        places.set_cap("hosted", None)
        await asyncio.sleep(0)
        assert got.count("hosted") == 4
        release.set()
        await asyncio.gather(*tasks)
        assert places.in_flight("hosted") == 0
        return got

    asyncio.run(main())


def test_an_accounts_max_concurrency_caps_its_pairs_window_under_the_workers() -> None:
    places = FairInFlight(1024)
    windows = ConcurrencyWindows(64, places)
    unknown = generic_spec("llama3.1:8b", "cl100k_base")
    windows.before_send("gpu:llama3.1:8b", unknown, "gpu", ceiling=3)  # max_concurrency = 3 in the models file
    windows.before_send("big:llama3.1:8b", unknown, "big", ceiling=500)  # above the worker's 64: 64
    assert places._caps["gpu:llama3.1:8b"] == 3
    for _ in range(200):
        windows.answered("gpu:llama3.1:8b", unknown, "gpu", 200, {}, SERVICE, places._caps["gpu:llama3.1:8b"])
        windows.answered("big:llama3.1:8b", unknown, "big", 200, {}, SERVICE, places._caps["big:llama3.1:8b"])
    assert windows.size("gpu:llama3.1:8b") == 3 and windows.size("big:llama3.1:8b") == 64
