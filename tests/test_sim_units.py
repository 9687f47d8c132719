"""Unit tests of the simulator's pure parts: durations, buckets, config, token counting, output."""

from __future__ import annotations

import math

import pytest
import tiktoken

from ratequeue.sim import catalog
from ratequeue.sim.buckets import Bucket
from ratequeue.sim.config import ConfigError, ModelSpec, SimConfig, mask_key, parse_model_spec
from ratequeue.sim.durations import ceil_ms, format_duration, format_wait
from ratequeue.sim.plan import RequestInvalid, plan_request
from ratequeue.sim.responses import Filler, choose_output
from ratequeue.sim.tokens import PromptCounter, seed_tiktoken_cache

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def counter() -> PromptCounter:
    c = PromptCounter()
    c.preload()
    return c


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (1, "1s"),
        (0.02, "20ms"),
        (17.28, "17.28s"),
        (360, "6m0s"),
        (3723.5, "1h2m3.5s"),
        (3600, "1h0m0s"),
        (0.0015, "1.5ms"),
        (0.0000015, "1.5µs"),
        (59.999, "59.999s"),
        (61.25, "1m1.25s"),
    ],
)
def test_format_duration_matches_go(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_format_wait_rounds_up_to_milliseconds() -> None:
    assert format_wait(1.2) == "1.2s"
    assert format_wait(0.34) == "340ms"
    assert format_wait(0.3400001) == "341ms"
    assert format_wait(0.0000001) == "1ms"
    assert format_wait(360) == "6m0s"
    assert format_wait(0) == "0s"
    assert ceil_ms(0.1 * 3) == 300  # float noise must not add a millisecond


def test_bucket_refills_continuously_and_reports_like_openai() -> None:
    bucket = Bucket(30_000, 60, now=0.0)
    assert bucket.capacity == 30_000 and bucket.rate == 500
    assert bucket.take(29_000)
    assert bucket.remaining == 1_000 and bucket.used == 29_000
    assert bucket.reset_seconds == pytest.approx(58.0)
    assert not bucket.take(1_500)
    # The facts document's 429: Limit 30000, Used 29000, Requested 1500 -> try again in 1s.
    assert bucket.wait_for(1_500) == pytest.approx(1.0)
    bucket.refill(1.0)
    assert bucket.remaining == 1_500 and bucket.take(1_500)
    bucket.refill(1_000.0)
    assert bucket.level == bucket.capacity  # never above capacity


def test_bucket_burst_seconds_shrinks_capacity_not_rate() -> None:
    bucket = Bucket(60_000, 1, now=0.0)
    assert bucket.capacity == 1_000 and bucket.rate == 1_000


def test_bucket_reconfigure_keeps_usage() -> None:
    bucket = Bucket(30_000, 60, now=0.0)
    bucket.take(29_000)
    bucket.reconfigure(60_000, 60, now=0.0)
    assert bucket.remaining == 31_000 and bucket.limit == 60_000


def test_parse_model_spec_and_fine_tune_names() -> None:
    name, spec = parse_model_spec("gpt-4o:rpm=500:tpm=30000:context=128000:max_output=16384")
    assert name == "gpt-4o"
    assert spec == ModelSpec(rpm=500, tpm=30_000, context=128_000, max_output=16_384)
    name, spec = parse_model_spec("ft:gpt-4o-mini:acme::abc123:tpm=1000")
    assert name == "ft:gpt-4o-mini:acme::abc123" and spec.tpm == 1000
    with pytest.raises(ConfigError, match="unknown model field"):
        parse_model_spec("gpt-4o:rpn=5")
    with pytest.raises(ConfigError, match="rpm"):
        parse_model_spec("gpt-4o:rpm=zero")


def test_limits_resolution_and_strict_models() -> None:
    config = SimConfig(rpm=100, tpm=1_000).updated({"models": ["gpt-4o-mini:tpm=5000"]})
    limits = config.limits_for("gpt-4o-mini")
    assert limits is not None
    assert (limits.rpm, limits.tpm, limits.encoding) == (100, 5_000, "o200k_base")
    assert (limits.input_price, limits.output_price) == (0.15, 0.60)
    other = config.limits_for("gpt-3.5-turbo")
    assert other is not None and other.encoding == "cl100k_base" and other.tpm == 1_000
    strict = config.updated({"strict_models": True})
    assert strict.limits_for("gpt-3.5-turbo") is None
    assert strict.limits_for("gpt-4o-mini") is not None
    assert config.updated({"models": None}).models == {}


def test_bucket_borrows_past_a_short_window_only_when_full() -> None:
    bucket = Bucket(60_000, 10, now=0.0)  # Azure's 10 s window: 10,000 tokens
    assert not bucket.take(12_000) and bucket.take(12_000, borrow=True)  # full: passes, in debt
    assert bucket.remaining == 0 and bucket.wait_for(12_000, borrow=True) == pytest.approx(12.0)
    bucket.refill(1.0)
    assert not bucket.take(500, borrow=True)  # still repaying


def test_deployment_limits_derive_rpm_and_take_the_window() -> None:
    config = SimConfig(tpm=50_000).updated({
        "dialect": "azure", "azure_window": 1, "daily_quota_tokens": 900,
        "deployments": ["eu:model=gpt-4o:tpm=20000", "us:model=gpt-4o:tpm=20000:rpm=500:daily=50"],
    })
    eu, us = config.limits_for("eu"), config.limits_for("us")
    assert eu is not None and us is not None and config.limits_for("gpt-4o") is None  # deployments, not models
    assert (eu.rpm, eu.burst_seconds, eu.served, eu.daily_tokens, eu.encoding) == (120, 1.0, "gpt-4o", 900,
                                                                                    "o200k_base")
    assert (us.rpm, us.daily_tokens) == (500, 50)
    anything = SimConfig(tpm=10_000).updated({"dialect": "azure"}).limits_for("gpt-4o-mini")
    assert anything is not None and (anything.rpm, anything.burst_seconds) == (60, 10.0)
    with pytest.raises(ConfigError, match="only a deployment"):
        parse_model_spec("gpt-4o:model=gpt-4o-mini")
    with pytest.raises(ConfigError, match="azure_window"):
        config.updated({"azure_window": 5})
    with pytest.raises(ConfigError, match="dialect"):
        config.updated({"dialect": "bedrock"})


def test_config_update_validates_everything_or_nothing() -> None:
    config = SimConfig()
    with pytest.raises(ConfigError):
        config.updated({"fail_rate": 2})
    with pytest.raises(ConfigError):
        config.updated({"charge_rule": "min"})
    with pytest.raises(ConfigError):
        config.updated({"nonsense": 1})
    with pytest.raises(ConfigError):
        config.updated({"rpm": True})
    assert config.updated({"retry_after": "false"}).retry_after is False


def test_mask_key_never_shows_the_secret() -> None:
    assert mask_key("sk-proj-0123456789abcd") == "sk-...abcd"
    assert mask_key("short") == "***"


def test_catalog_prefix_matching() -> None:
    assert catalog.price_per_m("gpt-4o-mini-2024-07-18") == (0.15, 0.60)
    assert catalog.price_per_m("gpt-4o-2024-08-06") == (2.50, 10.00)
    assert catalog.price_per_m("ft:gpt-4o-mini:org::x") == (0.15, 0.60)
    assert catalog.price_per_m("mystery") == catalog.DEFAULT_PRICE_PER_M
    assert catalog.encoding_for("o3-mini") == "o200k_base"
    assert catalog.encoding_for("gpt-4") == "cl100k_base"


def test_chat_count_follows_openai_formula(counter: PromptCounter) -> None:
    seed_tiktoken_cache()
    enc = tiktoken.get_encoding("o200k_base")
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "name": "ann", "content": "Hello <|endoftext|> there"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Describe"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 10_000}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": 1}'}},
            ],
        },
    ]
    strings = [
        "system",
        "You are terse.",
        "user",
        "ann",
        "Hello <|endoftext|> there",
        "user",
        "Describe",
        "assistant",
        "lookup",
        '{"q": 1}',
    ]
    expected = sum(len(enc.encode_ordinary(s)) for s in strings) + 3 * 4 + 1 + 3
    prompt = counter.count("chat", {"messages": messages}, "o200k_base", "tiktoken")
    assert prompt.tokens == expected


def test_chars_estimate_and_embedding_inputs(counter: PromptCounter) -> None:
    body = {"messages": [{"role": "user", "content": "x" * 396}]}
    assert counter.count("chat", body, "o200k_base", "chars").tokens == math.ceil(400 / 4)
    tokens_input = counter.count("embeddings", {"input": [[1, 2, 3], [4, 5]]}, "cl100k_base", "tiktoken")
    assert tokens_input == (5, 3, 2)
    assert counter.count("embeddings", {"input": [1, 2, 3]}, "cl100k_base", "tiktoken") == (3, 3, 1)
    # Odd but valid-looking input must never raise.
    assert counter.count("chat", {"messages": [None, 5, {"content": {"x": "y"}}]}, "o200k_base", "tiktoken")


@pytest.mark.parametrize("encoding", ["o200k_base", "cl100k_base"])
def test_filler_words_are_one_token_each(encoding: str) -> None:
    seed_tiktoken_cache()
    enc = tiktoken.get_encoding(encoding)
    filler = Filler(words=50)
    for n in (0, 1, 7, 300, 10_000):
        assert len(enc.encode_ordinary(filler.text(n))) == n


def test_output_sizes_are_deterministic_and_bounded() -> None:
    sizes = [choose_output(7, b"prompt", i, 1000, 4096) for i in range(200)]
    assert sizes == [choose_output(7, b"prompt", i, 1000, 4096) for i in range(200)]
    assert all(200 <= s.tokens <= 1000 for s in sizes)
    assert sizes != [choose_output(8, b"prompt", i, 1000, 4096) for i in range(200)]
    free = [choose_output(1, b"p", i, None, 4096).tokens for i in range(200)]
    assert min(free) >= 100 and max(free) <= 300
    assert choose_output(1, b"p", 0, None, 50).tokens == 50


def test_charge_rules_and_context(counter: PromptCounter) -> None:
    limits = SimConfig(context=1_000).limits_for("gpt-4o")
    assert limits is not None
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "n": 3}
    p_sum = plan_request("chat", body, limits, SimConfig(), counter)
    p_max = plan_request("chat", body, limits, SimConfig(charge_rule="max"), counter)
    assert p_sum.charge == p_sum.prompt.tokens + 300
    assert p_max.charge == 300
    no_max = plan_request("chat", {"messages": body["messages"]}, limits, SimConfig(), counter)
    assert no_max.charge == no_max.prompt.tokens + limits.max_output
    with pytest.raises(RequestInvalid) as info:
        plan_request("chat", {**body, "max_tokens": 999}, limits, SimConfig(), counter)
    assert info.value.status == 400 and info.value.body["error"]["code"] == "context_length_exceeded"
