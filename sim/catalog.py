"""Built-in facts about model names: BPE encoding, price, embedding size.

Names are matched by their longest known prefix, so dated snapshots (``gpt-4o-mini-2024-07-18``) and
fine-tunes (``ft:gpt-4o-mini:org::id``) inherit from their base model.
"""

from __future__ import annotations

# USD per 1M tokens (input, output), OpenAI's list prices of 2025.
PRICES_PER_M: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "chatgpt-4o": (5.00, 15.00),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-5-nano": (0.05, 0.40),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5": (1.25, 10.00),
    "gpt-4-turbo": (10.00, 30.00),
    "gpt-4": (30.00, 60.00),
    "gpt-3.5-turbo": (0.50, 1.50),
    "o1-mini": (1.10, 4.40),
    "o1": (15.00, 60.00),
    "o3-mini": (1.10, 4.40),
    "o3": (2.00, 8.00),
    "o4-mini": (1.10, 4.40),
    "text-embedding-3-small": (0.02, 0.0),
    "text-embedding-3-large": (0.13, 0.0),
    "text-embedding-ada-002": (0.10, 0.0),
    "davinci-002": (2.00, 2.00),
    "babbage-002": (0.40, 0.40),
}
DEFAULT_PRICE_PER_M: tuple[float, float] = (1.00, 4.00)

_O200K_PREFIXES = ("gpt-4o", "chatgpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4")

_EMBEDDING_DIMS: dict[str, int] = {
    "text-embedding-3-large": 3072,
    "text-embedding-3-small": 1536,
    "text-embedding-ada-002": 1536,
}
DEFAULT_EMBEDDING_DIM = 1536

_BY_LENGTH = sorted(PRICES_PER_M, key=len, reverse=True)


def base_name(model: str) -> str:
    """Strip a fine-tune wrapper: ``ft:gpt-4o-mini:org::id`` -> ``gpt-4o-mini``."""
    if model.startswith("ft:"):
        return model.split(":", 2)[1]
    return model


def price_per_m(model: str) -> tuple[float, float]:
    """USD per 1M (input, output) tokens for ``model``; unknown models get ``DEFAULT_PRICE_PER_M``."""
    name = base_name(model)
    for known in _BY_LENGTH:
        if name.startswith(known):
            return PRICES_PER_M[known]
    return DEFAULT_PRICE_PER_M


def encoding_for(model: str) -> str:
    """The tiktoken encoding of ``model``: o200k_base for the 4o/4.1/o-series, else cl100k_base."""
    return "o200k_base" if base_name(model).startswith(_O200K_PREFIXES) else "cl100k_base"


def embedding_dim(model: str) -> int:
    """Default vector size of an embedding model."""
    name = base_name(model)
    for known, dim in _EMBEDDING_DIMS.items():
        if name.startswith(known):
            return dim
    return DEFAULT_EMBEDDING_DIM
