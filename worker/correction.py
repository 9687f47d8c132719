"""What one answer says about the shared bucket: the correction the runner hands to the reconciler.

Pure arithmetic over an answer (``Sent``), kept apart from the runner so each rule has its reason
beside it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ratequeue.worker.attempt import Sent
from ratequeue.worker.policy import Reason


@dataclass(frozen=True)
class Correction:
    """``token_delta`` tokens back to the bucket; ``refused``/``answered``: the answer counts towards
    the share's cut (reconcile.lua); ``charged``: (requests, tokens) the server charged for it."""

    token_delta: int
    refused: int
    answered: int
    charged: tuple[int, int]


def token_correction(sent: Sent, counted_prompt: int) -> int:
    """Tokens to give back (negative: to take) for what the server charged differently from us."""
    # A 429 is not refunded, although the server charged it no tokens: it proves our bucket
    # held more than the server's by at least about `charge`, and keeping the charge pays
    # that back. Refunding it kept a hidden debt (from requests the server priced higher than
    # we did) alive for ever: every send after the refund drew another 429.
    # Except "Request too large": the server refused it before weighing it against its bucket,
    # so it says nothing about ours, and a charge kept (perhaps larger than the whole bucket)
    # was a debt that held every request behind it for minutes (issue 10).
    if sent.verdict.kind is Reason.REQUEST_TOO_LARGE:
        return sent.charge
    usage = sent.usage
    if usage is not None and usage.prompt_tokens and sent.rule.combine == "sum":
        # Under the sum rule the server charged its own prompt count plus the same reserved
        # output, so the difference of the prompt counts is exactly what we over/under-charged.
        return counted_prompt - usage.prompt_tokens
    return 0


def correction(
    sent: Sent, counted_prompt: int, waited: float, horizon: float, share_cut_at: float
) -> Correction | None:
    """The correction of one answer, or None when it says nothing (no delta, no fresh reading).

    ``waited``: seconds its acquire took; ``horizon``: the reservation horizon; ``share_cut_at``:
    monotonic time of the pair's last share cut.
    """
    token_delta = token_correction(sent, counted_prompt)
    headers = sent.headers
    # A rate-limit 429 despite our bucket's grant: other clients spend on the account (or
    # the server's window is shorter); the shared share of the limits is cut (reconcile.lua).
    # Without any header, the per-process throttle (worker.learned) reacts instead.
    # Only answers to requests reserved at the share now in force count: a cut must not be cut
    # again by the 429s of requests granted before it (a round trip can last seconds). A
    # reservation is made after the acquire began and at most one horizon before the send.
    reserved_after = time.monotonic() - sent.resp.elapsed - min(waited, horizon)
    counted = reserved_after >= share_cut_at and not headers.empty
    if token_delta == 0 and not counted and headers.remaining_tokens is None and headers.remaining_requests is None:
        return None
    return Correction(
        token_delta=token_delta,
        refused=int(counted and sent.verdict.kind.rate_limited),
        answered=int(counted),
        # What the server charged for it (a 429: nothing), stale or not: reconcile.lua tells
        # whether the fall of the server's rooms is all ours (alone) or another client's too.
        charged=(0, 0) if headers.empty or sent.verdict.kind.rate_limited else (1, sent.charge - token_delta),
    )
