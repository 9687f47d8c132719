"""`tokenize = "server"` (issue 13, part 2): an openai-compatible account's prompts are counted by its
server's vLLM-style ``POST /tokenize`` at submit, not with a local encoding; the server's
``max_model_len`` fails a line that cannot fit before anything runs; a server without /tokenize, an
unreachable one, or one answering something else falls back to the local encoding with one warning
naming the account and the reason, and the batch is still queued whole.

The simulator counts ``--prompt-estimate chars`` (characters / 4, for /tokenize and usage alike), which
tells its counts apart from cl100k's for the texts used here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis

from ratequeue.config.models import generic_spec
from ratequeue.config.settings import load_settings
from ratequeue.jobstore import keys
from ratequeue.jobstore.jobs import StoredJob
from ratequeue.producer.api import Client
from ratequeue.sim.process import SimHandle, start_sim
from ratequeue.tokens.estimate import estimate_request
from tests.conftest import ROOT

pytestmark = [pytest.mark.timeout(60), pytest.mark.e2e]  # the simulator and the CLI run as subprocesses

MODEL = "llama3.1:8b"
CONTEXT = 512  # the simulator's max_model_len for MODEL


@pytest.fixture(scope="module")
def sim() -> Iterator[SimHandle]:
    with start_sim(["--dialect", "openai-compatible", "--prompt-estimate", "chars",
                    "--model", f"{MODEL}:context={CONTEXT}"]) as handle:
        yield handle


@pytest.fixture
def server(sim: SimHandle) -> SimHandle:
    sim.configure(tokenize=True, tokenize_answer="vllm")
    sim.reset()
    return sim


def _env(redis_url: str, tmp_path: Path, base_url: str) -> dict[str, str]:
    models = tmp_path / "models.toml"
    models.write_text(f'[accounts.gpu]\ndialect = "openai-compatible"\nbase_url = "{base_url}/v1"\n'
                      'tokenize = "server"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RATEQUEUE_", "OPENAI_"))}
    env.update(RATEQUEUE_REDIS_URL=redis_url, RATEQUEUE_MODELS_FILE=str(models), PYTHONPATH=str(ROOT))
    return env


def _chat(i: int, text: str, max_tokens: int = 16) -> dict[str, Any]:
    return {"custom_id": f"c-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "max_tokens": max_tokens, "messages": [{"role": "user", "content": text}]}}


def _texts(n: int) -> list[str]:
    # Long runs of one letter: cl100k packs them several characters a token, chars/4 does not.
    return [("abcdefghij"[i % 10] * 8 + " ") * (20 + i) for i in range(n)]


def _stored(rclient: redis.Redis, batch_id: str) -> dict[str, StoredJob]:
    raw = rclient.hgetall(keys.batch_jobs(batch_id))
    return {cid.decode(): StoredJob.loads(cid.decode(), value) for cid, value in raw.items()}


def _local(request: dict[str, Any]) -> int:
    return estimate_request(request["url"], request["body"], generic_spec(MODEL)).prompt_tokens


def _server_count(sim: SimHandle, payload: dict[str, Any]) -> int:
    answer = httpx.post(f"{sim.url}/tokenize", json=payload, timeout=10).json()
    return int(answer["count"])


def test_prompts_are_counted_by_the_server_once_per_distinct_request(
        server: SimHandle, redis_url: str, rclient: redis.Redis, tmp_path: Path) -> None:
    texts = _texts(12)
    lines = [_chat(i, text) for i, text in enumerate(texts)]
    lines += [_chat(100 + i, texts[0]) for i in range(5)]  # the same request again: asked once
    lines.append({"custom_id": "p-1", "method": "POST", "url": "/v1/completions",
                  "body": {"model": MODEL, "max_tokens": 4, "prompt": [texts[1], texts[2] + "!"]}})
    lines.append({"custom_id": "e-1", "method": "POST", "url": "/v1/embeddings",
                  "body": {"model": MODEL, "input": texts[3] + "?"}})
    client = Client(load_settings(_env(redis_url, tmp_path, server.url)))
    report = client.submit_batch(lines)
    assert (report.jobs, report.errors) == (len(lines), 0)
    asked = server.stats(timeline=False)["tokenized"]
    assert asked == 12 + 2 + 1  # 12 distinct chats, two completion prompts, one embedding input

    stored = _stored(rclient, report.batch_id)
    for line in lines[:17]:
        by_server = _server_count(server, {"model": MODEL, "messages": line["body"]["messages"]})
        assert stored[line["custom_id"]].prompt_tokens == by_server != _local(line), line["custom_id"]
    prompts = [_server_count(server, {"model": MODEL, "prompt": p}) for p in lines[17]["body"]["prompt"]]
    assert stored["p-1"].prompt_tokens == sum(prompts) != _local(lines[17])
    assert stored["e-1"].prompt_tokens == _server_count(server, {"model": MODEL, "prompt": texts[3] + "?"})
    assert stored["e-1"].charge == stored["e-1"].prompt_tokens
    # The charge the progress counters add up is the server-counted one.
    charged = int(rclient.hget(keys.batch_models(report.batch_id), f"charge:{MODEL}") or 0)
    assert charged == sum(job.charge for job in stored.values())


def test_a_prompt_longer_than_the_servers_max_model_len_or_malformed_fails_its_line_at_submit(
        server: SimHandle, redis_url: str, rclient: redis.Redis, tmp_path: Path) -> None:
    lines = [_chat(0, "short question"), _chat(1, "y" * 4 * (CONTEXT + 10)), _chat(2, "z" * 4 * (CONTEXT - 20), 64)]
    bad = _chat(3, "")
    bad["body"]["messages"][0]["content"] = 5  # counted by the server all the same: still refused here
    client = Client(load_settings(_env(redis_url, tmp_path, server.url)))
    report = client.submit_batch([*lines, bad])
    assert (report.jobs, report.errors) == (1, 3)
    errors = {e["custom_id"]: e["error"] for e in client.iter_results(report.batch_id, errors=True)}
    assert set(errors) == {"c-1", "c-2", "c-3"}
    assert errors["c-3"]["message"] == ("line 4: body.messages[0].content: must be a string, null or a list of "
                                        "content parts")
    assert errors["c-1"]["code"] == errors["c-2"]["code"] == "context_length_exceeded"
    assert errors["c-1"]["message"].startswith("line 2: body: the prompt plus max_tokens=16 of ")
    assert f"max_model_len of {CONTEXT}" in errors["c-1"]["message"]
    assert "max_tokens=64" in errors["c-2"]["message"] and f"max_model_len of {CONTEXT}" in errors["c-2"]["message"]


def _submit_cli(env: dict[str, str], tmp_path: Path, lines: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    return subprocess.run([sys.executable, "-m", "ratequeue.producer.cli", "submit", "--no-check", str(path)],
                          env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("case", "reason"), [
    ("no-endpoint", "has no /tokenize (404)"),
    ("unreachable", "unreachable"),
    ("not-json", "not JSON"),
    ("no-count", 'no integer "count"'),
])
def test_a_server_that_cannot_count_falls_back_to_the_local_encoding_with_one_warning(
        case: str, reason: str, server: SimHandle, redis_url: str, rclient: redis.Redis, tmp_path: Path) -> None:
    if case == "no-endpoint":
        server.configure(tokenize=False)
    elif case in ("not-json", "no-count"):
        server.configure(tokenize_answer=case)
    base = "http://127.0.0.1:9" if case == "unreachable" else server.url  # port 9: refused
    lines = [_chat(i, text) for i, text in enumerate(_texts(30))]
    done = _submit_cli(_env(redis_url, tmp_path, base), tmp_path, lines)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, done.stderr
    assert "account gpu" in warnings[0] and reason in warnings[0] and "cl100k_base" in warnings[0], warnings
    batch_id = done.stdout.strip().splitlines()[-1]
    stored = _stored(rclient, batch_id)
    assert len(stored) == 30
    assert all(stored[line["custom_id"]].prompt_tokens == _local(line) for line in lines)
    if case != "unreachable":  # asked once, then the account counts locally for the rest of the batch
        assert server.stats(timeline=False)["tokenized"] == (0 if case == "no-endpoint" else 1)


def test_a_request_the_server_refuses_to_count_is_counted_locally_and_the_others_by_the_server(
        server: SimHandle, redis_url: str, rclient: redis.Redis, tmp_path: Path) -> None:
    server.configure(strict_models=True)  # vLLM's 404 "The model `x` does not exist." for any other model
    try:
        lines = [_chat(i, text) for i, text in enumerate(_texts(6))]
        lines[3]["body"]["model"] = "not-loaded"
        done = _submit_cli(_env(redis_url, tmp_path, server.url), tmp_path, lines)
    finally:
        server.configure(strict_models=False)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "account gpu" in warnings[0], done.stderr
    assert "refused to count a request (404: The model `not-loaded` does not exist.)" in warnings[0]
    stored = _stored(rclient, done.stdout.strip().splitlines()[-1])
    assert stored["c-3"].prompt_tokens == _local(lines[3])
    for line in lines[:3] + lines[4:]:
        by_server = _server_count(server, {"model": MODEL, "messages": line["body"]["messages"]})
        assert stored[line["custom_id"]].prompt_tokens == by_server, line["custom_id"]


def test_a_batch_runs_with_the_servers_counts_which_match_the_usage_it_reports(
        server: SimHandle, redis_url: str, rclient: redis.Redis, tmp_path: Path,
        start_worker: Callable[[dict[str, str]], subprocess.Popen[bytes]]) -> None:
    env = _env(redis_url, tmp_path, server.url)
    start_worker({**env, "RATEQUEUE_DATA_DIR": str(tmp_path / "data"), "RATEQUEUE_LOG_LEVEL": "WARNING"})
    client = Client(load_settings(env))
    lines = [_chat(i, text, max_tokens=8) for i, text in enumerate(_texts(20))]
    batch = client.wait(client.submit_batch(lines).batch_id, timeout=40, poll=0.2)
    assert batch["request_counts"]["completed"] == 20, batch
    stored = _stored(rclient, batch["id"])
    for result in client.iter_results(batch["id"]):
        usage = result["response"]["body"]["usage"]
        assert stored[result["custom_id"]].prompt_tokens == usage["prompt_tokens"], result["custom_id"]


def test_a_request_repeated_in_the_next_block_of_lines_is_not_asked_again(
        server: SimHandle, redis_url: str, tmp_path: Path) -> None:
    # Blocks of 512 lines are counted one ahead: the second block is asked for before the first's
    # answers are in, and must not ask again what the first is asking.
    first = [_chat(i, f"question number {i}") for i in range(512)]
    again = [{**_chat(1000 + i, ""), "body": first[i]["body"]} for i in range(100)]
    client = Client(load_settings(_env(redis_url, tmp_path, server.url)))
    report = client.submit_batch([*first, *again])
    assert (report.jobs, report.errors) == (612, 0)
    assert server.stats(timeline=False)["tokenized"] == 512
