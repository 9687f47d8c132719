"""Reading an upstream response body within a size limit, on the wire and once decompressed.

Why not ``httpx.Response.aread()``: it keeps whatever the server sends, and httpx's gzip decoder
inflates each received chunk whole (a 16 KiB chunk of a gzip bomb is ~16 MiB), so a ~1 MB
bomb took a worker to 2.1 GB and a 100 MB answer was stored whole. Here the raw bytes are
counted as they arrive and inflated with ``max_length``, so no more than ``limit`` + one
chunk is ever held, whatever the compression ratio.
"""

from __future__ import annotations

import zlib

import httpx

__all__ = ["ACCEPT_ENCODING", "BodyTooLarge", "UnsupportedEncoding", "read_bounded"]

# What the client asks for: both are inflated in bounded memory below; anything else is refused.
ACCEPT_ENCODING = "gzip, deflate"


class BodyTooLarge(Exception):
    """The body (compressed or decompressed) exceeded the limit; ``limit`` is in bytes."""

    def __init__(self, limit: int, where: str) -> None:
        super().__init__(f"larger than {limit} bytes ({where})")
        self.limit = limit


class UnsupportedEncoding(Exception):
    """The server used a Content-Encoding the client did not ask for."""


class _Inflater:
    """Incremental gzip/deflate decoding that never returns more than asked for."""

    def __init__(self, encoding: str) -> None:
        self._raw_fallback = encoding == "deflate"  # "deflate" is zlib-wrapped, or raw from some servers
        # 32 + MAX_WBITS: accept a gzip or a zlib header, whichever the stream starts with.
        self._d = zlib.decompressobj(32 + zlib.MAX_WBITS)
        self._started = False

    def feed(self, data: bytes, room: int) -> bytes:
        """Decoded bytes of ``data``, at most ``room + 1`` of them (one more than fits means too large).

        Raises ``zlib.error`` on a corrupt stream.
        """
        try:
            out = self._d.decompress(data, room + 1)
        except zlib.error:
            if not (self._raw_fallback and not self._started):
                raise
            self._raw_fallback = False
            self._d = zlib.decompressobj(-zlib.MAX_WBITS)
            out = self._d.decompress(data, room + 1)
        self._started = True
        return out


def _inflater(headers: httpx.Headers) -> _Inflater | None:
    encoding = headers.get("content-encoding", "").strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding in ("gzip", "x-gzip", "deflate"):
        return _Inflater(encoding)
    raise UnsupportedEncoding(f"content-encoding {encoding!r} was not asked for")


async def read_bounded(resp: httpx.Response, limit: int) -> bytes:
    """The whole decoded body of ``resp``, reading at most ``limit`` bytes off the wire and
    keeping at most ``limit`` decoded bytes (plus one network chunk) in memory.

    Raises ``BodyTooLarge`` (before reading anything when Content-Length already says so),
    ``UnsupportedEncoding``, ``zlib.error`` on a corrupt compressed body, and httpx's transport
    errors as they come.
    """
    length = resp.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise BodyTooLarge(limit, f"Content-Length {length}")
    if resp.is_stream_consumed:
        # A response built whole in memory (httpx.Response(content=...), as httpx.MockTransport
        # returns) was read, and decoded, by its constructor: there is no stream left to count.
        body = resp.content
        if len(body) > limit:
            raise BodyTooLarge(limit, "decompressed")
        return body
    inflater = _inflater(resp.headers)
    parts: list[bytes] = []
    wire = kept = 0
    async for raw in resp.aiter_raw():
        wire += len(raw)
        if wire > limit:
            raise BodyTooLarge(limit, "on the wire")
        piece = raw if inflater is None else inflater.feed(raw, limit - kept)
        kept += len(piece)
        if kept > limit:
            raise BodyTooLarge(limit, "decompressed")
        if piece:
            parts.append(piece)
    return b"".join(parts)
