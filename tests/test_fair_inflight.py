"""Fair in-flight calls (issue 11): when ``max_in_flight`` places are short, each one that frees
goes to the waiting pair with the fewest calls in flight per unit of its rate (worker.inflight)."""

from __future__ import annotations

import asyncio

import pytest

from ratequeue.worker.inflight import FairInFlight


async def _hold(places: FairInFlight, pair: str, rate: float, release: asyncio.Event, got: list[str]) -> None:
    async with places.slot(pair, rate):
        got.append(pair)
        await release.wait()


def test_places_that_free_are_divided_by_rate_among_the_pairs_waiting() -> None:
    async def main() -> tuple[int, int, list[str]]:
        places = FairInFlight(6)
        got: list[str] = []
        first = asyncio.Event()  # the 6 calls of the slow pair that took every place first
        holders = [asyncio.create_task(_hold(places, "slow", 2.0, first, got)) for _ in range(6)]
        await asyncio.sleep(0)
        later = asyncio.Event()
        # 10 more calls of each pair wait; the fast pair's limits allow 5 times the slow one's calls.
        waiting = [asyncio.create_task(_hold(places, pair, rate, later, got))
                   for _ in range(10) for pair, rate in (("slow", 2.0), ("fast", 10.0))]
        await asyncio.sleep(0)
        assert got == ["slow"] * 6
        first.set()  # the first 6 end: their places go to the waiting pairs by rate
        await asyncio.gather(*holders)
        await asyncio.sleep(0)
        counts = places.in_flight("slow"), places.in_flight("fast")
        order = got[6:]
        later.set()
        await asyncio.gather(*waiting)
        return *counts, order

    slow, fast, order = asyncio.run(main())
    # First come, first served would give the slow pair 3 of the 6 (its calls queued first in turn);
    # by rate the fast pair gets 5 for the slow pair's 1.
    assert (slow, fast) == (1, 5), order
    assert order[0] == "fast"


def test_a_caller_cancelled_while_waiting_or_just_granted_leaves_no_place_taken() -> None:
    async def main() -> None:
        places = FairInFlight(1)
        never = asyncio.Event()
        got: list[str] = []
        async with places.slot("a", 1.0):
            gave_up = asyncio.create_task(_hold(places, "b", 1.0, never, got))
            granted = asyncio.create_task(_hold(places, "c", 1.0, never, got))
            await asyncio.sleep(0)
            gave_up.cancel()  # cancelled while waiting
            await asyncio.sleep(0)
        granted.cancel()  # its place was just given to it (the block above ended), before it ran
        for task in (gave_up, granted):
            with pytest.raises(asyncio.CancelledError):
                await task
        assert got == [] and all(places.in_flight(p) == 0 for p in "abc")
        async with places.slot("d", 1.0):  # the place is free again
            assert places.in_flight("d") == 1

    asyncio.run(main())


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="limit must be >= 1"):
        FairInFlight(0)
