"""Issue 10, finding 2: a wrong key or an unreachable upstream is said before any paid call.

`check_upstream` against a real HTTP server in the test process (servers without /v1/models,
a 401 without an error code) and the real simulator's GET /v1/models; the commands that call it
(`run`, `submit`) are tested as subprocesses in test_run_lifecycle.py.
"""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
from collections.abc import Iterator

import pytest

from ratequeue.config.settings import load_settings
from ratequeue.errors import UpstreamUnusableError
from ratequeue.producer.preflight import check_upstream, shown_url
from ratequeue.sim.process import start_sim

pytestmark = pytest.mark.integration  # real HTTP servers

KEY = "sk-preflight-0123456789abcdef"


@contextlib.contextmanager
def answering(status: int, body: bytes = b"") -> Iterator[str]:
    """An HTTP server answering every request with ``status`` and ``body``; yields its URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _settings(base_url: str, key: str = KEY):  # type: ignore[no-untyped-def]
    return load_settings({"OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": key})


@pytest.mark.parametrize("status", [404, 405, 429, 500])
def test_a_server_without_models_or_with_a_passing_error_is_not_refused(status: int) -> None:
    with answering(status, b'{"error": {"message": "nope", "code": null}}') as url:
        check_upstream(_settings(url))  # returns: the workers deal with these


def test_a_401_without_a_code_names_the_status_only() -> None:
    with answering(401, b"not json") as url, pytest.raises(UpstreamUnusableError) as caught:
        check_upstream(_settings(url))
    assert str(caught.value) == f"upstream {url}/v1 refused the API key (401); set OPENAI_API_KEY"


def test_a_401_with_no_key_set_says_none_is_set() -> None:
    with answering(401, b"not json") as url, pytest.raises(UpstreamUnusableError) as caught:
        check_upstream(load_settings({"OPENAI_BASE_URL": url}))
    assert str(caught.value) == (f"upstream {url}/v1 wants an API key (401) and none is set; "
                                 "set OPENAI_API_KEY or OPENAI_API_KEY_FILE")


def test_the_simulator_lists_models_for_the_right_key_and_refuses_a_wrong_one() -> None:
    with start_sim(["--api-key", KEY]) as sim:
        check_upstream(_settings(sim.url))
        assert sim.stats(timeline=False)["models_listed"] == 1
        with pytest.raises(UpstreamUnusableError) as caught:
            check_upstream(_settings(sim.url + "/v1/", "sk-wrong-0123456789abcdef"))
        stats = sim.stats(timeline=False)
    assert str(caught.value) == (f"upstream {sim.url}/v1 refused the API key (401 invalid_api_key); "
                                 "set OPENAI_API_KEY")
    assert stats["accepted_requests"] == 0  # nothing was charged


def test_an_unreachable_upstream_is_named_without_its_credentials() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UpstreamUnusableError) as caught:
        check_upstream(_settings(f"http://user:pw-secret@127.0.0.1:{port}/v1"), timeout=2)
    assert str(caught.value) == (f"cannot reach upstream http://127.0.0.1:{port}/v1 (connection refused); "
                                 "set OPENAI_BASE_URL")
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_the_shown_url_is_the_v1_root_without_userinfo() -> None:
    assert shown_url("https://u:p@proxy.example/openai") == "https://proxy.example/openai/v1"
