"""`ratequeue estimate FILE` (issue 14, cost control): tokens, list-price cost (with the cached-input
price where it applies) and the minimum wall time the limits allow, read before anything is sent:
no Redis, no upstream. Through the real command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ratequeue.config.models import load_model_table
from ratequeue.config.settings import load_settings
from ratequeue.producer.estimate import cacheable_tokens
from ratequeue.tokens.estimate import estimate_request
from tests.conftest import ROOT

RATEQUEUE = [sys.executable, "-c", "from ratequeue.producer.cli import entry; entry()"]
ROUTES = """\
default_account = "tier-a"

[accounts.tier-a]
api_key_env = "KEY_A"

[accounts.tier-b]
base_url = "http://tier-b.example.test"
api_key_env = "KEY_B"

[accounts.gpu]
dialect = "openai-compatible"
base_url = "http://gpu1:8000"

[routes]
"gpt-4o-mini" = [{ account = "tier-a" }, { account = "tier-b" }]
"""


def chat(custom_id: str, text: str, model: str = "gpt-4o-mini", **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": text}], **body}}


def estimate(tmp_path: Path, lines: list[Any], *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    source = tmp_path / "input.jsonl"
    source.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("RATEQUEUE_", "OPENAI_"))}
    # Nothing listens there: the estimate must not need Redis (nor the upstream, also unreachable).
    environment.update(RATEQUEUE_REDIS_URL="redis://127.0.0.1:1/0", OPENAI_BASE_URL="http://127.0.0.1:1",
                       PYTHONPATH=str(ROOT), **env)
    return subprocess.run([*RATEQUEUE, "estimate", str(source), *args], capture_output=True, text=True,
                          env=environment, timeout=60)


def test_tokens_cost_range_and_minimum_time_match_what_submit_would_reserve(tmp_path: Path) -> None:
    spec = load_model_table(load_settings({})).get("gpt-4o-mini")
    lines = [chat(f"r{i}", "summarise this ticket please " * 10, max_tokens=100) for i in range(600)]
    done = estimate(tmp_path, lines, "--json")
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    one = estimate_request("/v1/chat/completions", lines[0]["body"], spec)
    (model,) = found["models"]
    assert (model["model"], model["jobs"], found["rejected_lines"]) == ("gpt-4o-mini", 600, 0)
    assert model["prompt_tokens"] == 600 * one.prompt_tokens
    assert model["output_tokens_max"] == 600 * 100
    assert model["rate_limit_charge"] == 600 * one.charge
    assert found["cost_usd_min"] == pytest.approx(600 * spec.cost_usd(one.prompt_tokens), abs=1e-6)
    assert found["cost_usd_max"] == pytest.approx(600 * spec.cost_usd(one.prompt_tokens, 0, 100), abs=1e-6)
    # 600 requests at the configured RPM vs their charge at the TPM: the larger is the floor.
    assert model["min_seconds"] == pytest.approx(max(600 / spec.rpm, 600 * one.charge / spec.tpm) * 60)
    assert model["binding_limit"] == ("requests" if 600 / spec.rpm >= 600 * one.charge / spec.tpm else "tokens")
    # Short prompts are never served from OpenAI's prompt cache: no cheaper figure for them.
    assert model["cached_input_usd"] == pytest.approx(model["input_usd"], abs=1e-9)


def test_long_prompts_show_the_cached_input_price_in_128_token_steps(tmp_path: Path) -> None:
    assert [cacheable_tokens(n) for n in (1023, 1024, 1151, 1152, 5000)] == [0, 1024, 1024, 1152, 4992]
    spec = load_model_table(load_settings({})).get("gpt-4o-mini")
    assert spec.cached_input_per_1m < spec.input_per_1m
    line = chat("long", "word " * 3000, max_tokens=10)
    prompt = estimate_request("/v1/chat/completions", line["body"], spec).prompt_tokens
    found = json.loads(estimate(tmp_path, [line], "--json").stdout)
    assert found["models"][0]["cached_input_usd"] == pytest.approx(
        spec.cost_usd(prompt, cached_tokens=cacheable_tokens(prompt)), abs=1e-6)
    assert found["models"][0]["cached_input_usd"] < found["models"][0]["input_usd"]


def test_routes_sum_their_limits_and_a_self_hosted_model_has_no_floor(tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text(ROUTES)
    spec = load_model_table(load_settings({})).get("gpt-4o-mini")
    lines = [chat(f"r{i}", "hi", max_tokens=5) for i in range(300)]
    lines += [{**chat(f"g{i}", "hi", model="llama3.1:8b"), "account": "gpu"} for i in range(10)]
    done = estimate(tmp_path, lines, "--json", RATEQUEUE_MODELS_FILE=str(models))
    assert done.returncode == 0, done.stderr
    by_model = {m["model"]: m for m in json.loads(done.stdout)["models"]}
    assert by_model["gpt-4o-mini"]["rpm"] == 2 * spec.rpm  # two routes of the same limits
    assert by_model["gpt-4o-mini"]["min_seconds"] == pytest.approx(300 / (2 * spec.rpm) * 60)
    assert by_model["llama3.1:8b"]["min_seconds"] is None
    text = estimate(tmp_path, lines, RATEQUEUE_MODELS_FILE=str(models)).stdout
    assert "llama3.1:8b: 10 jobs" in text and "no limits configured: the server sets the pace" in text


def test_the_share_kept_for_other_traffic_lengthens_the_minimum(tmp_path: Path) -> None:
    lines = [chat(f"r{i}", "hi", max_tokens=5) for i in range(100)]
    whole = json.loads(estimate(tmp_path, lines, "--json").stdout)["min_seconds"]
    part = json.loads(estimate(tmp_path, lines, "--json", RATEQUEUE_MAX_SHARE="0.5").stdout)["min_seconds"]
    assert part == pytest.approx(2 * whole)


def test_rejected_lines_are_named_by_line_and_field_and_the_rest_is_estimated(tmp_path: Path) -> None:
    lines: list[Any] = [chat("ok", "hi", max_tokens=5), "not json", chat("bad", "hi", model="no-such-model"),
                        chat("ok2", "hi", max_tokens=5)]
    done = estimate(tmp_path, lines)
    assert done.returncode == 1
    assert "2 jobs, 2 lines rejected" in done.stdout
    assert "rejected: line 2: not valid JSON" in done.stdout
    assert "rejected: line 3: body.model: unknown model 'no-such-model'" in done.stdout
    found = json.loads(estimate(tmp_path, lines, "--json").stdout)
    assert [(e["line"], e["param"]) for e in found["errors"]] == [(2, None), (3, "body.model")]


def test_an_unknown_account_is_a_usage_error(tmp_path: Path) -> None:
    done = estimate(tmp_path, [chat("ok", "hi")], "--account", "nope")
    assert done.returncode == 2
    assert "unknown account 'nope'" in done.stderr and "Traceback" not in done.stderr
