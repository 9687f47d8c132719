"""`ratequeue demo`: real-looking documents through the whole pipeline.

With no OPENAI_API_KEY it starts the simulator at fixed limits and reports how much of the limit
the run used, and how many 429s it drew; with a key it runs the same sample against the API.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console

from ratequeue.config.settings import load_settings
from ratequeue.producer.model_progress import capped_share
from ratequeue.producer.runner import print_summary, run_file

DEMO_MODEL = "gpt-4o-mini"
DEMO_RPM = 1500
DEMO_TPM = 150_000
_TASKS = (
    ("Summarise this {kind} in two sentences.", 120),
    ("Classify the sentiment of this {kind} as positive, negative or mixed, and give one reason.", 60),
    ("List the people, organisations, places and amounts mentioned in this {kind} as JSON.", 200),
    ("Write a one-line title for this {kind}.", 30),
)


def sample_documents() -> list[dict[str, str]]:
    text = (resources.files("ratequeue.producer") / "samples" / "documents.jsonl").read_text(encoding="utf-8")
    return [orjson.loads(line) for line in text.splitlines() if line.strip()]


def write_sample_batch(path: Path, jobs: int, seed: int = 7, model: str = DEMO_MODEL) -> None:
    """A Batch-format JSONL of ``jobs`` chat requests over the sample documents."""
    rng = random.Random(seed)
    docs = sample_documents()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        for n in range(jobs):
            doc = docs[n % len(docs)]
            task, max_tokens = _TASKS[rng.randrange(len(_TASKS))]
            body = {
                "model": model,
                "messages": [
                    {"role": "system", "content": "You are a careful analyst. Answer concisely."},
                    {"role": "user", "content": f"{task.format(kind=doc['kind'])}\n\n{doc['text']}"},
                ],
                "max_tokens": max_tokens,
            }
            line = {"custom_id": f"doc-{n + 1}", "method": "POST", "url": "/v1/chat/completions", "body": body}
            out.write(orjson.dumps(line) + b"\n")


def steady_utilisation(
    timeline: Sequence[Mapping[str, Any]], rpm: float, tpm: float, trim: int = 2, trim_end: int | None = None
) -> dict[str, float]:
    """Share of the RPM and TPM limits used per second over the steady state.

    The steady state is the span between the first and last second with accepted requests,
    less ``trim`` seconds at the start (the opening burst, which a full bucket may spend at once)
    and ``trim_end`` (default ``trim``) at the end (the closing tail). ``binding`` is the larger
    of the two shares: the limit that decides the pace.
    """
    busy = [row for row in timeline if row.get("requests_ok", 0) > 0]
    if not busy:
        return {"requests": 0.0, "tokens": 0.0, "binding": 0.0, "seconds": 0.0}
    first, last = busy[0]["t"], busy[-1]["t"]
    lo, hi = first + trim, last - (trim if trim_end is None else trim_end)
    if hi <= lo:
        lo, hi = first, last
    rows = [row for row in timeline if lo <= row["t"] <= hi]
    seconds = hi - lo + 1
    req = sum(row.get("requests_ok", 0) for row in rows) / (seconds * rpm / 60)
    tok = sum(row.get("tokens_charged_ok", 0) for row in rows) / (seconds * tpm / 60)
    return {"requests": req, "tokens": tok, "binding": max(req, tok), "seconds": float(seconds)}


def fresh_demo_dir(root: Path) -> Path:
    """A new directory per demo under ``root/demos``: two demos at once never share Redis or logs,
    and a demo has nothing worth continuing (its simulator starts afresh each time)."""
    (root / "demos").mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=root / "demos"))


def run_demo(jobs: int, output: Path, workers: int, console: Console) -> None:
    settings = load_settings()
    data_dir = fresh_demo_dir(settings.data_dir)
    input_path = data_dir / "demo-input.jsonl"
    write_sample_batch(input_path, jobs)
    console.print(f"demo input: {input_path} ({jobs} requests over {len(sample_documents())} documents)")
    options: dict[str, Any] = {"workers": workers, "console": console, "data_dir": data_dir,
                               "resume_hint": "ratequeue demo (each demo starts afresh)"}
    if settings.api_key is not None:
        console.print(f"OPENAI_API_KEY is set: running against {settings.base_url}")
        print_summary(run_file(input_path, output, **options), console)
        return
    from ratequeue.sim.process import start_sim

    args = ["--rpm", str(DEMO_RPM), "--tpm", str(DEMO_TPM), "--latency-ms", "300", "--per-token-ms", "3"]
    with start_sim(args) as sim:
        console.print(f"no OPENAI_API_KEY: simulator at {sim.url} with {DEMO_RPM} RPM / {DEMO_TPM:,} TPM")
        env = {
            "OPENAI_BASE_URL": sim.url,
            "OPENAI_API_KEY": "sk-demo-simulator",
            "RATEQUEUE_MODEL_GPT_4O_MINI_RPM": str(DEMO_RPM),
            "RATEQUEUE_MODEL_GPT_4O_MINI_TPM": str(DEMO_TPM),
        }
        summary = run_file(input_path, output, extra_env=env, **options)
        stats = sim.stats()
    print_summary(summary, console)
    use = steady_utilisation(stats["timeline"], DEMO_RPM, DEMO_TPM)
    r429 = sum(stats["r429"].values())
    console.print(
        f"limit use over the steady state ({use['seconds']:.0f} s): {limit_use('requests', use['requests'], 'RPM')}, "
        f"{limit_use('tokens', use['tokens'], 'TPM')}; 429 answers: {r429}\noutput: {output.resolve()}"
    )


def limit_use(what: str, share: float, limit: str) -> str:
    """"tokens at the TPM limit (100%; ...)" or "requests 64% of RPM": never above 100%, which
    would read as over the limit; more was the bucket's saved capacity (``capped_share``)."""
    shown, over = capped_share(share)
    if over:
        return f"{what} at the {limit} limit ({shown}; the first seconds spent the bucket's saved capacity)"
    return f"{what} at the {limit} limit ({shown})" if shown == "100%" else f"{what} {shown} of {limit}"
