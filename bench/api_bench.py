"""What the HTTP API costs on top of a direct submit (issue 14): the same Batch file, uploaded
with the official openai SDK and made a batch through ``ratequeue api``, against
``Client.submit_batch`` of the file on disk. No worker runs: the jobs are queued, not sent.

Figures: upload time (and MB/s), POST /v1/batches time, direct submit time, the Redis memory the
stored upload takes, the time of one GET /v1/batches/{id}, and the API server's peak RSS (the
upload is spooled to a temporary file by the multipart parser, not held in memory).

    .venv/bin/python bench/api_bench.py --jobs 10000 [--redis-url redis://127.0.0.1:PORT/14]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import redis
from common import BENCH_REDIS_URL, ROOT, mixed_workload, peak_rss_mb, write_jsonl

from ratequeue.config.settings import load_settings
from ratequeue.producer.api import Client

TOKEN = "bench-token-0123456789"
POLLS = 200  # GET /v1/batches/{id}, one after another: what a polling client costs


def _serve(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "ratequeue.producer.cli", "api", "--port", str(port)], env=env,
                            cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"ratequeue api did not start: {log.read_text()}")
        time.sleep(0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--port", type=int, default=18081)
    ap.add_argument("--redis-url", default=BENCH_REDIS_URL)
    args = ap.parse_args()

    store = redis.Redis.from_url(args.redis_url)
    store.flushdb()
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "prompts.jsonl"
        write_jsonl(source, mixed_workload(args.jobs))
        size = source.stat().st_size
        tenants = Path(tmp) / "tenants.json"
        digest = hashlib.sha256(TOKEN.encode()).hexdigest()
        tenants.write_text(json.dumps({"tenants": {"bench": {"token_sha256": digest}}}))
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "RATEQUEUE_REDIS_URL": args.redis_url,
               "RATEQUEUE_API_TOKENS_FILE": str(tenants), "OPENAI_API_KEY": "sk-bench-000000000000"}
        server = _serve(env, args.port, Path(tmp) / "api.log")
        try:
            sdk = openai.OpenAI(api_key=TOKEN, base_url=f"http://127.0.0.1:{args.port}/v1", max_retries=0,
                                timeout=600)
            idle_rss = peak_rss_mb(server.pid)
            before = int(store.info("memory")["used_memory"])
            start = time.perf_counter()
            with source.open("rb") as stream:
                upload = sdk.files.create(file=("prompts.jsonl", stream), purpose="batch")
            uploaded = time.perf_counter() - start
            stored = int(store.info("memory")["used_memory"]) - before
            start = time.perf_counter()
            batch = sdk.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                       completion_window="24h")
            created = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(POLLS):
                sdk.batches.retrieve(batch.id)
            poll_ms = (time.perf_counter() - start) / POLLS * 1000
            rss = peak_rss_mb(server.pid)
        finally:
            server.terminate()
            server.wait(10)
        client = Client(load_settings(env))
        start = time.perf_counter()
        report = client.submit_batch(source)
        direct = time.perf_counter() - start
    print(f"{args.jobs} jobs, {size / 1e6:.1f} MB file; batch {batch.request_counts.total} / direct {report.jobs} jobs")
    print(f"upload (SDK -> ratequeue api -> Redis): {uploaded:.2f} s ({size / 1e6 / uploaded:.1f} MB/s); "
          f"stored upload takes {stored / 1e6:.1f} MB of Redis memory")
    print(f"POST /v1/batches: {created:.2f} s; Client.submit_batch(path): {direct:.2f} s "
          f"(upload + create = {(uploaded + created) / direct:.2f}x the direct submit)")
    print(f"GET /v1/batches/{{id}} (one client, {POLLS} in a row): {poll_ms:.1f} ms each")
    print(f"API server peak RSS: {rss:.0f} MB ({idle_rss:.0f} MB after start)")
    store.flushdb()


if __name__ == "__main__":
    main()
