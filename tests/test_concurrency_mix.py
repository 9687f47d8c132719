"""The adaptive concurrency window (worker.concurrency) when output lengths vary, as they do in every
real batch: the simulator's outputs are 20-100% of max_tokens, and a server's latency is its base
plus a time per output token. A round's quickest answer then depends on the round's mix, not only
on a queue."""

from __future__ import annotations

import random
import statistics

import pytest

from ratequeue.worker.concurrency import AdaptiveWindow

pytestmark = pytest.mark.unit

CAPACITY, QUEUE = 32, 16


def drive_mixed(window: AdaptiveWindow, rounds: int, seed: int) -> tuple[list[int], int, int]:
    """Each round trip, ``window.size`` requests against a server serving CAPACITY at once, QUEUE
    more waiting in line (each queued request delays every answer by its share of a service time,
    Little's law) and refusing the rest; an answer takes 100 ms plus 10 ms per output token, its
    output 20-100 of max_tokens 100 (sim/responses.py's choose_output). Returns the window's size
    after each round trip, the requests and the refusals."""
    rng, sizes, sent, refused = random.Random(seed), [], 0, 0
    for _ in range(rounds):
        n = window.size
        served = min(n, CAPACITY + QUEUE)
        wait = max(0, served - CAPACITY) / CAPACITY * 0.7  # 0.7 s: the mean time in service
        for i in range(n):
            if i < served:
                window.answered(0.1 + 0.01 * rng.randint(20, 100) + wait, n)
            else:
                refused += 1
                window.refused(n)
        sizes.append(window.size)
        sent += n
    return sizes, sent, refused


def test_the_window_opens_as_fast_whatever_the_output_lengths() -> None:
    """It was judged on its round's quickest answer against the quickest of 30 rounds, far lower
    whenever lengths vary: slow start ended on the mix, and 90% of capacity took a median 23 round
    trips (6-65), against 6 with flat latency."""
    opened = []
    for seed in range(20):
        sizes, _, _ = drive_mixed(AdaptiveWindow(maximum=64), rounds=80, seed=seed)
        opened.append(next((i for i, size in enumerate(sizes) if size >= 0.9 * CAPACITY), 80))
    assert statistics.median(opened) <= 8 and sum(trips <= 10 for trips in opened) >= 15, opened


def test_with_varying_lengths_a_queue_still_stops_it_short_of_refusals() -> None:
    for seed in range(10):
        sizes, sent, refused = drive_mixed(AdaptiveWindow(maximum=64), rounds=120, seed=seed)
        steady = sizes[40:]
        assert refused <= 0.001 * sent, (refused, sent)
        assert max(steady) <= CAPACITY + QUEUE + 1 and statistics.mean(steady) >= CAPACITY, steady


@pytest.mark.xfail(strict=True, reason=(
    "not fixed (h-review's report): the base is the quickest answer of 30 rounds, so a few answers far "
    "quicker than the rest (5% of 50 ms among 0.8-1.2 s) set it, and every round without one of them "
    "looks queued; the mix gap (the median of each round's two quickest) does not see them"))
def test_a_few_very_short_answers_do_not_hold_the_window_down() -> None:
    rng, window, sizes = random.Random(1), AdaptiveWindow(maximum=64), []
    for _ in range(200):  # a server with room for every call: no queue at all
        n = window.size
        for _ in range(n):
            window.answered(0.05 if rng.random() < 0.05 else rng.uniform(0.8, 1.2), n)
        sizes.append(window.size)
    assert statistics.mean(sizes[20:]) >= 32, sizes
