"""A real `ratequeue api` process for the HTTP API's tests: two tenants, a free port, the test's
Redis database; the tokens are known to the tests only as plain text, the server only as hashes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import ROOT, wait_until

TOKENS = {"alpha": "rq-test-alpha-5f2b9c", "beta": "rq-test-beta-8d1e04", "limited": "rq-test-limited-77a3"}
LIMITED_RPM = 3  # the "limited" tenant's requests per minute


@dataclass
class ApiServer:
    url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def headers(self, tenant: str = "alpha") -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKENS[tenant]}"}


def write_tokens(path: Path) -> Path:
    tenants: dict[str, dict[str, object]] = {
        name: {"token_sha256": hashlib.sha256(token.encode()).hexdigest()} for name, token in TOKENS.items()
    }
    tenants["limited"]["requests_per_minute"] = LIMITED_RPM
    path.write_text(json.dumps({"tenants": tenants}))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def api_server(env: dict[str, str], tmp_path: Path, timeout: float = 20) -> Iterator[ApiServer]:
    """Start `ratequeue api` with ``env`` (RATEQUEUE_API_TOKENS_FILE among it) and wait until
    /health answers; stopped (SIGTERM, then SIGKILL) after."""
    port = free_port()
    log = tmp_path / f"api-{port}.log"
    with log.open("ab") as out:
        process = subprocess.Popen([sys.executable, "-m", "ratequeue.producer.cli", "api", "--port", str(port)],
                                   env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    server = ApiServer(f"http://127.0.0.1:{port}", process, log)

    def healthy() -> bool:
        assert process.poll() is None, f"ratequeue api exited: {log.read_text()}"
        try:
            return httpx.get(f"{server.url}/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(healthy, timeout, "ratequeue api to answer /health", poll=0.1, explain=log.read_text)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
