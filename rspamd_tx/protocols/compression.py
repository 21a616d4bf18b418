"""zstd bodies of Rspamd's HTTP protocol: compression, bounded decompression, headers.

Who compresses what (httpcrypt.md §6):

* a client (``rspamc -z``, a proxy ``upstream``/``mirror`` with
  ``compression = yes``) compresses a **request** body into one zstd frame
  (level 1, content size in the frame header) and says so with
  ``Compression: zstd``; Rspamd 3.11+ also sends ``Content-Encoding: zstd``.
  The proxy does this only when the client did not compress already;
* a scanner decompresses a request body when ``Compression`` (or, when that
  header is absent, ``Content-Encoding``) is ``zstd`` in any case; any other
  value is the error ``Invalid compression method``.  A ``Dictionary`` header
  asks for a zstd dictionary, which is not supported (Rspamd answers
  ``Unknown dictionary, undefined locally`` when it has none);
* a scanner answers a compressed request with a compressed **reply** (one
  streaming frame, no content size) and ``Compression: zstd``; the proxy
  decompresses it and drops both compression headers before relaying it.

Encryption (:mod:`rspamd_tx.protocols.httpcrypt`) applies to the whole inner
message after compression.

:func:`decompress` never holds more than its ``max_size`` bound of output
(plus one write step): before inflating anything it walks the frame and block
headers, refusing at once a frame whose declared content size passes the bound,
a truncated frame or trailing garbage; while inflating it stops as soon as the
output passes the bound.  The zstd window the decoder may allocate is capped
too.  Every failure is a :class:`CompressionError`.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import TYPE_CHECKING

import zstandard

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

__all__ = [
    "COMPRESSION_HEADER",
    "CONTENT_ENCODING_HEADER",
    "DEFAULT_LEVEL",
    "DICTIONARY_HEADER",
    "REQUEST_COMPRESSION_HEADERS",
    "ZSTD",
    "ZSTD_MAGIC",
    "CompressionError",
    "compress",
    "declared_size",
    "decompress",
    "looks_compressed",
    "reply_is_compressed",
    "request_is_compressed",
    "without_compression_headers",
]

ZSTD = "zstd"
"""The only compression method Rspamd knows."""
COMPRESSION_HEADER = "Compression"
"""Rspamd's own header naming the body's compression."""
CONTENT_ENCODING_HEADER = "Content-Encoding"
"""The standard header Rspamd 3.11+ also reads and writes."""
DICTIONARY_HEADER = "Dictionary"
"""Names a zstd dictionary by id; unsupported."""
REQUEST_COMPRESSION_HEADERS: tuple[tuple[str, str], ...] = ((COMPRESSION_HEADER, ZSTD),)
"""What Rspamd 3.4's proxy adds to a request whose body it compressed."""
DEFAULT_LEVEL = 1
"""The level Rspamd compresses with."""
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
"""First four bytes of a zstd frame (``rspamc`` detects compressed input by them)."""

_SKIPPABLE_MAGIC_HIGH = b"\x2a\x4d\x18"
"""Bytes 1..3 of a skippable frame's magic (byte 0 is 0x50..0x5f)."""
_MAX_BLOCK = 128 * 1024
"""Largest block content a zstd frame may carry (Block_Maximum_Size)."""
_MIN_WINDOW = 8 * 1024 * 1024
"""Smallest decoder window cap: room for any frame made at levels up to 19."""
_MAX_WINDOW = 1 << 31
"""Largest decoder window cap (zstd's ZSTD_WINDOWLOG_MAX_64)."""
_WRITE_STEP = 64 * 1024
"""Bytes of output the decoder hands over per step."""
_BODY_HEADERS = frozenset(
    name.lower() for name in (COMPRESSION_HEADER, CONTENT_ENCODING_HEADER, DICTIONARY_HEADER)
)
"""Headers that describe a compressed body."""


class CompressionError(ValueError):
    """A body that cannot be (de)compressed: corrupt or truncated zstd data,
    output past the size bound, an unknown method or a dictionary request."""


def _header_values(headers: Iterable[tuple[str, str]], name: str) -> list[str]:
    wanted = name.lower()
    return [value for key, value in headers if key.lower() == wanted]


def compress(body: bytes, level: int = DEFAULT_LEVEL) -> bytes:
    """One zstd frame holding ``body``, with its content size in the header.

    This is what Rspamd's proxy and ``rspamc -z`` send (level 1 by default).
    Raises :class:`CompressionError` for a level zstd does not accept.
    """
    try:
        return zstandard.ZstdCompressor(level=level).compress(body)
    except (zstandard.ZstdError, ValueError, OverflowError, TypeError) as exc:
        raise CompressionError(f"cannot compress: {exc}") from None


def looks_compressed(body: bytes) -> bool:
    """Whether ``body`` starts with the zstd frame magic."""
    return body[:4] == ZSTD_MAGIC


class _Frames:
    """Walks the frame and block headers of zstd data without inflating it."""

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.position = 0

    def take(self, size: int, what: str) -> memoryview:
        end = self.position + size
        if end > len(self.data):
            raise CompressionError(f"truncated zstd data: {what} cut short")
        piece = self.data[self.position : end]
        self.position = end
        return piece

    def frame(self) -> int | None:
        """Check one frame; return its declared content size (``None`` if absent)."""
        magic = bytes(self.take(4, "frame magic"))
        if magic[1:] == _SKIPPABLE_MAGIC_HIGH and 0x50 <= magic[0] <= 0x5F:
            size = int.from_bytes(self.take(4, "skippable frame size"), "little")
            self.take(size, "skippable frame")
            return 0
        if magic != ZSTD_MAGIC:
            raise CompressionError("not zstd data (bad frame magic)")
        descriptor = self.take(1, "frame header")[0]
        if descriptor & 0x08:
            raise CompressionError("corrupt zstd frame header (reserved bit set)")
        single_segment = bool(descriptor & 0x20)
        dictionary_size = (0, 1, 2, 4)[descriptor & 0x03]
        size_flag = descriptor >> 6
        content_size_bytes = (1 if single_segment else 0, 2, 4, 8)[size_flag]
        if not single_segment:
            self.take(1, "window descriptor")
        self.take(dictionary_size, "dictionary id")
        declared: int | None = None
        if content_size_bytes:
            declared = int.from_bytes(self.take(content_size_bytes, "content size"), "little")
            if content_size_bytes == 2:
                declared += 256
        while True:
            header = int.from_bytes(self.take(3, "block header"), "little")
            last = header & 1
            kind = (header >> 1) & 3
            size = header >> 3
            if kind == 3:
                raise CompressionError("corrupt zstd block (reserved block type)")
            if size > _MAX_BLOCK:
                raise CompressionError("corrupt zstd block (block larger than 128 KiB)")
            self.take(1 if kind == 1 else size, "block")
            if last:
                break
        if descriptor & 0x04:
            self.take(4, "content checksum")
        return declared


def declared_size(data: bytes) -> int | None:
    """Sum of the content sizes the frames of ``data`` declare.

    ``None`` when some frame does not declare its size (a streaming frame, as
    scanners send replies).  Raises :class:`CompressionError` unless ``data``
    is a sequence of complete, well-formed zstd frames (block contents are not
    checked here).
    """
    frames = _Frames(memoryview(data))
    total: int | None = 0
    while frames.position < len(frames.data):
        size = frames.frame()
        total = None if size is None or total is None else total + size
    return total


class _BoundedSink(io.BytesIO):
    """Collects decoder output; raises :class:`CompressionError` past the bound."""

    def __init__(self, max_size: int) -> None:
        super().__init__()
        self.max_size = max_size

    def write(self, chunk: ReadableBuffer, /) -> int:
        if self.tell() + memoryview(chunk).nbytes > self.max_size:
            raise CompressionError(f"decompressed body larger than {self.max_size} bytes")
        return super().write(chunk)


def _window_cap(max_size: int) -> int:
    cap = _MIN_WINDOW
    while cap < max_size and cap < _MAX_WINDOW:
        cap <<= 1
    return cap


def decompress(data: bytes, max_size: int) -> bytes:
    """Inflate zstd ``data`` (one or more frames) to at most ``max_size`` bytes.

    An empty ``data`` gives an empty body, as with Rspamd.  Raises
    :class:`CompressionError` when a frame declares more than ``max_size``
    bytes (before inflating anything), when the output passes ``max_size``
    (as soon as it does), for truncated or corrupt data, trailing bytes that
    are not a frame, or a frame that needs a dictionary or a window larger
    than ``max(max_size, 8 MiB)``.  ``max_size`` must not be negative.
    """
    if max_size < 0:
        raise CompressionError("negative size bound")
    if not data:
        return b""
    declared = declared_size(data)
    if declared is not None and declared > max_size:
        raise CompressionError(
            f"zstd frame declares {declared} bytes, more than the bound of {max_size}"
        )
    sink = _BoundedSink(max_size)
    try:
        decompressor = zstandard.ZstdDecompressor(max_window_size=_window_cap(max_size))
        with decompressor.stream_writer(sink, write_size=_WRITE_STEP, closefd=False) as writer:
            writer.write(data)
    except zstandard.ZstdError as exc:
        raise CompressionError(f"corrupt zstd data: {exc}") from None
    return sink.getvalue()


def _method(headers: Iterable[tuple[str, str]]) -> str | None:
    """The compression a message announces: ``Compression``, else ``Content-Encoding``."""
    headers = list(headers)
    for name in (COMPRESSION_HEADER, CONTENT_ENCODING_HEADER):
        values = _header_values(headers, name)
        if values:
            return values[0].strip()
    return None


def request_is_compressed(headers: Iterable[tuple[str, str]]) -> bool:
    """Whether a request body is zstd, by the scanner's rule.

    ``Compression`` decides when present, else ``Content-Encoding``; ``zstd``
    in any case means compressed; no header means plain.  Raises
    :class:`CompressionError` for any other method (``Invalid compression
    method``) and for a compressed body that names a ``Dictionary``.
    """
    headers = list(headers)
    method = _method(headers)
    if method is None:
        return False
    if method.lower() != ZSTD:
        raise CompressionError("Invalid compression method")
    if _header_values(headers, DICTIONARY_HEADER):
        raise CompressionError("Unknown dictionary, undefined locally")
    return True


def reply_is_compressed(headers: Iterable[tuple[str, str]]) -> bool:
    """Whether a scanner's reply body is zstd (``Compression`` or
    ``Content-Encoding`` equal to ``zstd``, any case)."""
    return any(
        value.strip().lower() == ZSTD
        for name in (COMPRESSION_HEADER, CONTENT_ENCODING_HEADER)
        for value in _header_values(headers, name)
    )


def without_compression_headers(
    headers: Iterable[tuple[str, str]],
) -> tuple[tuple[str, str], ...]:
    """``headers`` without ``Compression``, ``Content-Encoding`` and ``Dictionary``:
    what a message carries once its body is decompressed."""
    return tuple((name, value) for name, value in headers if name.lower() not in _BODY_HEADERS)
