"""Progress per model (issue 10, findings 2 and 10): the ETA from each model's binding limit, the
per-model counters kept at submit and settle, and the lines the live display prints."""

from __future__ import annotations

import io
import time

import orjson
import pytest
import redis
from rich.console import Console

from ratequeue.config.models import load_model_table
from ratequeue.config.settings import load_settings
from ratequeue.jobstore import keys
from ratequeue.jobstore.batches import BatchStore
from ratequeue.jobstore.codec import text
from ratequeue.jobstore.jobs import StoredJob
from ratequeue.producer.api import Client
from ratequeue.producer.demo import limit_use
from ratequeue.producer.model_progress import (
    ModelCounts,
    ModelLimits,
    Pause,
    batch_eta,
    limit_eta,
    model_eta,
    model_limits,
    pause_words,
)
from ratequeue.producer.progress import ProgressView, follow

CONFIGURED = ModelLimits(rpm=600, tpm=60_000, source="configured")


# -- the ETA arithmetic ----------------------------------------------------------------------------


@pytest.mark.unit
def test_the_eta_is_set_by_the_binding_limit() -> None:
    # 300 jobs of 400 tokens: 120,000 tokens at 60,000 TPM take 120 s; 300 requests at 600 RPM 30 s.
    tokens_bound = ModelCounts(total=300, charge=120_000)
    assert limit_eta(tokens_bound, CONFIGURED) == (120.0, "TPM")
    # the same jobs at 40 tokens each: requests bind (30 s), tokens would take 12 s
    requests_bound = ModelCounts(total=300, charge=12_000)
    assert limit_eta(requests_bound, CONFIGURED) == (30.0, "RPM")


@pytest.mark.unit
def test_the_eta_counts_only_what_is_left() -> None:
    half = ModelCounts(total=300, completed=140, failed=10, in_flight=20, charge=120_000, charge_done=60_000)
    assert (half.remaining, half.waiting, half.remaining_tokens) == (150, 130, 60_000)
    assert limit_eta(half, CONFIGURED) == (60.0, "TPM")  # jobs in flight count as remaining (see limit_eta)
    assert limit_eta(ModelCounts(total=5, completed=5, charge=100, charge_done=100), CONFIGURED)[0] == 0.0


@pytest.mark.unit
def test_the_batch_eta_is_its_slowest_models_and_unknown_while_one_is_paused() -> None:
    mini = ModelCounts(total=100, charge=30_000)  # 30 s at 60,000 TPM
    big = ModelCounts(total=100, charge=30_000)  # 90 s at its own 20,000 TPM
    etas = {"gpt-4o-mini": limit_eta(mini, CONFIGURED)[0],
            "gpt-4o": limit_eta(big, ModelLimits(rpm=500, tpm=20_000, source="learned"))[0]}
    assert etas == {"gpt-4o-mini": 30.0, "gpt-4o": 90.0}
    assert batch_eta(etas) == 90.0  # separate limits run side by side: not 30 + 90
    paused = ModelCounts(total=10, paused=Pause("invalid_api_key", "upstream refused the key (401)"))
    assert model_eta(paused, CONFIGURED) == (None, "paused")
    assert batch_eta({**etas, "gpt-4.1": None}) is None
    assert batch_eta({}) == 0.0


@pytest.mark.unit
def test_a_measured_rate_slower_than_the_limits_wins_a_faster_one_does_not() -> None:
    left = ModelCounts(total=200, completed=100, charge=40_000, charge_done=20_000)  # 20 s at the limits
    assert model_eta(left, CONFIGURED, measured_rpm=150, measured_seconds=10) == (40.0, "measured")
    # the opening burst: a full bucket spent at once measures far above the limit; the limit holds
    assert model_eta(left, CONFIGURED, measured_rpm=3000, measured_seconds=10) == (20.0, "TPM")
    # too short a measurement is not trusted
    assert model_eta(left, CONFIGURED, measured_rpm=150, measured_seconds=2) == (20.0, "TPM")
    # no limits known (a model missing from the table): the measured rate alone
    assert model_eta(left, None, measured_rpm=600, measured_seconds=10) == (10.0, "measured")
    assert model_eta(left, None) == (None, "measured")


@pytest.mark.unit
def test_parked_reasons_read_as_words() -> None:
    assert pause_words("invalid_api_key", "Incorrect API key provided", 60) == "upstream refused the key (401)"
    assert pause_words("insufficient_quota", "", 60) == "quota exhausted (429 insufficient_quota)"
    message = "the server asked to wait 900 s: slow down"  # as worker/settle.py writes it
    assert pause_words("long_retry_after", message, 300) == "server asked to wait 900 s"
    assert pause_words("long_retry_after", "", 300) == "server asked to wait 300 s"


# -- the lines shown --------------------------------------------------------------------------------


def _batch(models: dict[str, ModelCounts], status: str = "in_progress") -> dict[str, object]:
    total = sum(c.total for c in models.values())
    completed = sum(c.completed for c in models.values())
    failed = sum(c.failed for c in models.values())
    return {"id": "batch_x", "status": status, "request_counts": {"total": total, "completed": completed,
                                                                     "failed": failed},
            "models": {m: c.as_json() for m, c in models.items()}}


@pytest.mark.unit
def test_the_display_says_why_a_model_is_paused() -> None:
    view = ProgressView(lambda model: CONFIGURED)
    paused = ModelCounts(total=40, charge=4000, paused=Pause("invalid_api_key", "upstream refused the key (401)"))
    head, line = view.update(_batch({"gpt-4o-mini": paused}), now=0.0)
    assert line == "gpt-4o-mini: paused, upstream refused the key (401) · 0 done · 0 in flight · 40 waiting"
    assert head == "batch_x: 0/40 done, 0 failed, ETA ?"
    assert view.paused == {"gpt-4o-mini"}


@pytest.mark.unit
def test_the_display_caps_the_share_of_a_limit_and_explains_the_burst() -> None:
    view = ProgressView(lambda model: ModelLimits(rpm=6000, tpm=60_000, source="learned"))
    view.update(_batch({"gpt-4o-mini": ModelCounts(total=300, charge=90_000)}), now=0.0)
    # 5 s of bucket (5,000 tokens) plus 2 s of refill spent in 2 s: 225% of TPM measured
    burst = ModelCounts(total=300, completed=50, in_flight=10, charge=90_000, charge_done=15_000)
    _, line = view.update(_batch({"gpt-4o-mini": burst}), now=2.0)
    assert "450,000 tok/min (100% of TPM; burst: the bucket's saved capacity)" in line
    assert "1,500 req/min (25% of RPM)" in line
    assert "50 done · 10 in flight · 240 waiting" in line
    assert line.endswith("ETA 1m15s (at TPM)")  # 75,000 tokens left at 60,000 TPM, not the burst's pace


@pytest.mark.unit
def test_the_batch_line_names_the_model_that_sets_the_eta() -> None:
    limits = {"gpt-4o-mini": CONFIGURED, "gpt-4o": ModelLimits(rpm=500, tpm=20_000, source="configured")}
    view = ProgressView(limits.get)
    batch = _batch({"gpt-4o-mini": ModelCounts(total=100, charge=30_000),
                    "gpt-4o": ModelCounts(total=100, charge=30_000)})
    head, *lines = view.update(batch, now=0.0)
    assert head == "batch_x: 0/200 done, 0 failed, ETA 1m30s (set by gpt-4o)"
    assert [line.split(":")[0] for line in lines] == ["gpt-4o-mini", "gpt-4o"]
    final, *_ = view.update(_batch({"gpt-4o-mini": ModelCounts(total=1, completed=1)}, "completed"), now=1.0)
    assert final.endswith("ETA 0s")
    unknown = {"id": "batch_x", "status": "in_progress", "request_counts": {"total": 9, "completed": 0, "failed": 0}}
    assert view.update(unknown, now=2.0) == ["batch_x: 0/9 done, 0 failed, ETA ?"]  # no counters: no guess


@pytest.mark.unit
def test_the_demos_limit_use_never_reads_over_the_limit() -> None:
    assert limit_use("tokens", 1.006, "TPM") == (
        "tokens at the TPM limit (100%; the first seconds spent the bucket's saved capacity)")
    assert limit_use("tokens", 0.998, "TPM") == "tokens at the TPM limit (100%)"
    assert limit_use("requests", 0.64, "RPM") == "requests 64% of RPM"


# -- the counters in Redis -----------------------------------------------------------------------------


def _client(redis_url: str) -> Client:
    return Client(load_settings({"RATEQUEUE_REDIS_URL": redis_url}), publish=lambda batch_id, ids: None)


def _line(cid: str, model: str = "gpt-4o-mini", max_tokens: int = 50) -> dict[str, object]:
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": f"say {cid}"}], "max_tokens": max_tokens}}


def _outcome(cid: str, kind: str = "result") -> list[str | int]:
    return [cid, kind, orjson.dumps({"custom_id": cid}).decode(), 3, 2, 0, "0"]


def _charges(r: redis.Redis, batch_id: str) -> dict[str, int]:
    jobs = r.hgetall(keys.batch_jobs(batch_id))
    return {text(cid): StoredJob.loads(text(cid), raw).charge for cid, raw in jobs.items()}


def test_counters_per_model_are_kept_at_submit_and_as_outcomes_are_stored(redis_url: str) -> None:
    client = _client(redis_url)
    lines = [_line(f"m{i}") for i in range(4)] + [_line(f"o{i}", "gpt-4o", 200) for i in range(2)]
    lines.append({"custom_id": "bad", "method": "POST", "url": "/v1/nowhere", "body": {}})  # rejected at submit
    report = client.submit_batch(lines)
    charges = _charges(client.redis, report.batch_id)
    mini = sum(charges[f"m{i}"] for i in range(4))
    models = client.status(report.batch_id)["models"]
    assert models == {
        "gpt-4o": {"total": 2, "completed": 0, "failed": 0, "in_flight": 0, "tokens": charges["o0"] + charges["o1"],
                   "remaining_tokens": charges["o0"] + charges["o1"], "paused": None},
        "gpt-4o-mini": {"total": 4, "completed": 0, "failed": 0, "in_flight": 0, "tokens": mini,
                        "remaining_tokens": mini, "paused": None},
    }
    store = BatchStore(client.redis)
    # m0 is leased by a live run: in flight until its outcome is stored, which drops the lease
    now_ms = int(time.time() * 1000)
    client.redis.hset(keys.batch_claims(report.batch_id), mapping={"m0": f"run~1 {now_ms + 60_000}",
                                                                     "m1": f"dead~2 {now_ms - 1}"})
    assert client.status(report.batch_id)["models"]["gpt-4o-mini"]["in_flight"] == 1  # m1's lease expired
    assert store.store_outcomes(report.batch_id, _outcome("m0") + _outcome("m1", "error") + _outcome("o0")) == [1] * 3
    assert store.store_outcomes(report.batch_id, _outcome("m0")) == [0]  # a redelivered copy counts nothing
    models = client.status(report.batch_id)["models"]
    assert models["gpt-4o-mini"] | {"tokens": 0} == {
        "total": 4, "completed": 1, "failed": 1, "in_flight": 0, "tokens": 0,
        "remaining_tokens": charges["m2"] + charges["m3"], "paused": None}
    assert (models["gpt-4o"]["completed"], models["gpt-4o"]["remaining_tokens"]) == (1, charges["o1"])
    assert not client.redis.hexists(keys.batch_claims(report.batch_id), "m0")
    store.store_outcomes(report.batch_id, _outcome("m2") + _outcome("m3") + _outcome("o1", "error"))
    batch = client.status(report.batch_id)
    # at the end the per-model counts add up to the batch's (less the line rejected at submit)
    assert batch["status"] == "completed"
    per_model = batch["models"].values()
    assert sum(m["completed"] for m in per_model) == batch["request_counts"]["completed"] == 4
    assert sum(m["failed"] for m in per_model) + 1 == batch["request_counts"]["failed"] == 3
    assert sum(m["total"] for m in per_model) + 1 == batch["request_counts"]["total"] == 7
    assert all(m["remaining_tokens"] == 0 for m in per_model)
    # the counters expire with the batch, and go when it is deleted
    assert client.redis.pttl(keys.batch_models(report.batch_id)) > 0
    client.delete(report.batch_id)
    assert not client.redis.exists(keys.batch_models(report.batch_id))


def test_a_batch_submitted_before_the_counters_gets_no_per_model_counts(redis_url: str) -> None:
    client = _client(redis_url)
    report = client.submit_batch([_line("m0"), _line("m1")])
    client.redis.delete(keys.batch_models(report.batch_id))  # as an older version stored it
    BatchStore(client.redis).store_outcomes(report.batch_id, _outcome("m0"))  # an upgraded worker counts it
    assert client.status(report.batch_id)["models"] == {}  # not "1 done of 0"


def test_in_flight_of_several_models_is_read_from_the_leased_jobs(redis_url: str) -> None:
    client = _client(redis_url)
    report = client.submit_batch([_line("m0"), _line("m1"), _line("o0", "gpt-4o")])
    lease = f"run~1 {int(time.time() * 1000) + 60_000}"
    client.redis.hset(keys.batch_claims(report.batch_id), mapping={"m0": lease, "m1": lease, "o0": lease})
    models = client.status(report.batch_id)["models"]
    assert (models["gpt-4o-mini"]["in_flight"], models["gpt-4o"]["in_flight"]) == (2, 1)


def test_a_parked_pair_shows_as_paused_in_the_status(redis_url: str) -> None:
    client = _client(redis_url)
    report = client.submit_batch([_line("m0")])
    record = {"reason": "invalid_api_key", "message": "Incorrect API key provided: sk-abc...wxyz", "since": 1.0,
              "cooldown": 60.0}
    field = keys.pair_field(client.settings.account_id, "gpt-4o-mini")
    client.redis.hset(keys.parked_pairs(), field, orjson.dumps(record))
    paused = client.status(report.batch_id)["models"]["gpt-4o-mini"]["paused"]
    assert paused == {"reason": "invalid_api_key", "message": "upstream refused the key (401)"}


def test_limits_are_the_learned_ones_when_the_workers_learned_them(redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    table = load_model_table(load_settings({}))
    configured = table.get("gpt-4o-mini")
    assert model_limits(r, table, "default", "gpt-4o-mini") == ModelLimits(configured.rpm, configured.tpm,
                                                                            "configured")
    r.hset(keys.learned_limits(), keys.pair_field("default", "gpt-4o-mini"),
           orjson.dumps({"rpm": 500, "tpm": 20_000, "at": 1.0}))
    assert model_limits(r, table, "default", "gpt-4o-mini") == ModelLimits(500, 20_000, "learned")
    assert model_limits(r, table, "other-account", "gpt-4o-mini").source == "configured"  # type: ignore[union-attr]
    assert model_limits(r, table, "default", "no-such-model") is None


@pytest.mark.unit
def test_follow_redraws_on_a_terminal_and_prints_lines_to_a_log() -> None:
    mini = {"gpt-4o-mini": ModelCounts(total=2, charge=200)}
    states = [_batch(mini), _batch({"gpt-4o-mini": ModelCounts(total=2, completed=2, charge=200, charge_done=200)},
                                   "completed")]
    for terminal in (True, False):
        out = io.StringIO()
        console = Console(file=out, force_terminal=terminal, width=200)
        final = follow(iter(states).__next__, console, poll=0, limits_of=lambda model: CONFIGURED)
        assert final["status"] == "completed"
        shown = out.getvalue()
        assert "gpt-4o-mini: 2 done · 0 in flight · 0 waiting" in shown
        assert ("\x1b[" in shown) is terminal  # redrawn in place only on a terminal
        if not terminal:  # a log gets the first poll and the last
            assert shown.count("batch_x: ") == 2 and "batch_x: 2/2 done, 0 failed, ETA 0s" in shown
