"""zstd bodies: compression, bounded decompression and the compression headers
(httpcrypt.md §6)."""

from __future__ import annotations

import tracemalloc

import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from rspamd_tx.protocols import compression
from rspamd_tx.protocols.compression import CompressionError

MESSAGE = (
    b"From: sender@example.com\r\nTo: rcpt@example.net\r\nSubject: test\r\n\r\n"
    + b"Hello, this line repeats to make the body compressible.\r\n" * 200
)


def streaming_frame(data: bytes, chunks: int = 1) -> bytes:
    """A zstd frame without content size, as a scanner compresses its reply."""
    compressor = zstandard.ZstdCompressor(level=1).compressobj()
    step = max(1, len(data) // chunks)
    pieces = [compressor.compress(data[i : i + step]) for i in range(0, len(data), step)]
    return b"".join(pieces) + compressor.flush()


def rle_frame(descriptor: int, window: int | None, extra: bytes, size: int = 10) -> bytes:
    """A hand-made frame: header fields as given, then one last RLE block of ``size`` bytes 'A'."""
    header = compression.ZSTD_MAGIC + bytes([descriptor])
    if window is not None:
        header += bytes([window])
    block = (1 | (1 << 1) | (size << 3)).to_bytes(3, "little") + b"A"
    return header + extra + block


class CompressTests(unittest.TestCase):
    """What a client sends with ``Compression: zstd``."""

    def test_round_trip(self) -> None:
        """A compressed body decompresses to itself."""
        for body in (b"x", MESSAGE, bytes(range(256)) * 50):
            self.assertEqual(compression.decompress(compression.compress(body), len(body)), body)

    def test_one_frame_with_content_size(self) -> None:
        """The body becomes one frame starting with the zstd magic that declares its size."""
        frame = compression.compress(MESSAGE)
        self.assertTrue(compression.looks_compressed(frame))
        self.assertEqual(compression.declared_size(frame), len(MESSAGE))
        self.assertLess(len(frame), len(MESSAGE) // 10)

    def test_bad_level(self) -> None:
        """A level zstd does not accept is a CompressionError."""
        self.assertRaises(CompressionError, compression.compress, MESSAGE, 10**9)

    def test_looks_compressed(self) -> None:
        """Only data starting with 28 b5 2f fd looks compressed (rspamc's autodetection)."""
        self.assertTrue(compression.looks_compressed(b"\x28\xb5\x2f\xfd..."))
        for body in (b"", b"\x28\xb5\x2f", b"From: a@b\r\n", b"\xfd\x2f\xb5\x28"):
            self.assertFalse(compression.looks_compressed(body), body)


class DecompressTests(unittest.TestCase):
    """What a scanner or proxy does with a zstd body."""

    def test_streaming_frame(self) -> None:
        """A frame without content size (a scanner's reply) decompresses."""
        frame = streaming_frame(MESSAGE, chunks=7)
        self.assertIsNone(compression.declared_size(frame))
        self.assertEqual(compression.decompress(frame, len(MESSAGE)), MESSAGE)

    def test_concatenated_frames(self) -> None:
        """Several frames decompress to the concatenation of their contents."""
        data = (
            compression.compress(b"first ")
            + streaming_frame(b"second ")
            + compression.compress(b"third")
        )
        self.assertEqual(compression.decompress(data, 100), b"first second third")

    def test_skippable_frame(self) -> None:
        """A skippable frame contributes nothing."""
        skippable = b"\x5a\x2a\x4d\x18" + (3).to_bytes(4, "little") + b"xyz"
        data = skippable + compression.compress(b"body")
        self.assertEqual(compression.decompress(data, 4), b"body")

    def test_empty(self) -> None:
        """An empty body stays empty, as with Rspamd."""
        self.assertEqual(compression.decompress(b"", 0), b"")

    def test_exactly_at_bound(self) -> None:
        """A body of exactly max_size bytes is accepted, with or without declared size."""
        for frame in (compression.compress(MESSAGE), streaming_frame(MESSAGE)):
            self.assertEqual(compression.decompress(frame, len(MESSAGE)), MESSAGE)

    def test_one_byte_over_bound(self) -> None:
        """One byte more than max_size is refused, with or without declared size."""
        for frame in (compression.compress(MESSAGE), streaming_frame(MESSAGE)):
            self.assertRaises(CompressionError, compression.decompress, frame, len(MESSAGE) - 1)

    def test_declared_size_refused_before_inflating(self) -> None:
        """A frame declaring 2**40 bytes is refused on its header alone: the
        (corrupt) block after it is never looked at by the decoder."""
        frame = rle_frame(0xE0, None, (2**40).to_bytes(8, "little"))
        corrupt = frame[:-1] + b"\xff"
        for data in (frame, corrupt):
            with self.assertRaises(CompressionError) as caught:
                compression.decompress(data, 1024 * 1024)
            self.assertIn("declares", str(caught.exception))

    def test_bomb_refused_within_bound(self) -> None:
        """A 1 GiB streaming bomb (about 32 KiB compressed) is refused against a
        1 MiB bound without allocating much more than the bound."""
        compressor = zstandard.ZstdCompressor(level=3).compressobj()
        zeros = bytes(1 << 20)
        bomb = b"".join(compressor.compress(zeros) for _ in range(1024)) + compressor.flush()
        self.assertLess(len(bomb), 64 * 1024)
        tracemalloc.start()
        try:
            with self.assertRaises(CompressionError) as caught:
                compression.decompress(bomb, 1 << 20)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertIn("larger than", str(caught.exception))
        self.assertLess(peak, 4 << 20)

    def test_huge_window_refused(self) -> None:
        """A frame asking for a 1 GiB decoding window is refused against a small
        bound; the same frame with a 1 MiB window decodes."""
        huge = rle_frame(0x00, 20 << 3, b"")
        self.assertRaises(CompressionError, compression.decompress, huge, 1024)
        self.assertEqual(compression.decompress(rle_frame(0x00, 10 << 3, b""), 1024), b"A" * 10)

    def test_dictionary_frame_refused(self) -> None:
        """A frame that needs a dictionary cannot be decoded (dictionaries are
        unsupported); the same frame without a dictionary id decodes."""
        with_dictionary = rle_frame(0x21, None, bytes([123, 10]))
        self.assertRaises(CompressionError, compression.decompress, with_dictionary, 1024)
        without = rle_frame(0x20, None, bytes([10]))
        self.assertEqual(compression.decompress(without, 1024), b"A" * 10)

    def test_malformed(self) -> None:
        """Truncated, corrupt or padded data is refused."""
        good = compression.compress(MESSAGE)
        cases = {
            "not zstd": b"From: a@b\r\n\r\nbody",
            "truncated header": good[:5],
            "truncated block": good[:-3],
            "trailing bytes": good + b"\x00",
            "second frame truncated": good + good[:10],
            "reserved bit": rle_frame(0x28, None, bytes([10])),
            "reserved block type": (
                compression.ZSTD_MAGIC + b"\x20\x0a" + (1 | (3 << 1)).to_bytes(3, "little")
            ),
            "block over 128 KiB": (
                compression.ZSTD_MAGIC + b"\x00\x58"
                + (1 | ((128 * 1024 + 1) << 3)).to_bytes(3, "little")
            ),
            "corrupt content": good[:20] + bytes(len(good) - 20),
        }
        for name, data in cases.items():
            self.assertRaises(CompressionError, compression.decompress, data, 10**6)

    def test_negative_bound(self) -> None:
        """A negative bound is a CompressionError."""
        self.assertRaises(CompressionError, compression.decompress, compression.compress(b"x"), -1)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=200), st.integers(min_value=0, max_value=1 << 20))
    def test_fuzz_random(self, data: bytes, bound: int) -> None:
        """Random bytes, with or without the zstd magic, raise only CompressionError."""
        for candidate in (data, compression.ZSTD_MAGIC + data):
            try:
                out = compression.decompress(candidate, bound)
            except CompressionError:
                continue
            self.assertLessEqual(len(out), bound)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(min_size=1, max_size=2000), st.data())
    def test_fuzz_mutated_frames(self, body: bytes, data: st.DataObject) -> None:
        """Valid frames with bytes changed or cut raise only CompressionError."""
        frame = bytearray(
            data.draw(st.sampled_from([compression.compress(body), streaming_frame(body, 3)]))
        )
        for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
            position = data.draw(st.integers(min_value=0, max_value=len(frame) - 1))
            frame[position] = data.draw(st.integers(min_value=0, max_value=255))
        cut = data.draw(st.integers(min_value=0, max_value=len(frame)))
        bound = data.draw(st.integers(min_value=0, max_value=4 * len(body)))
        try:
            out = compression.decompress(bytes(frame[:cut]), bound)
        except CompressionError:
            return
        self.assertLessEqual(len(out), bound)


class HeaderTests(unittest.TestCase):
    """Which headers announce a zstd body."""

    def test_request_is_compressed(self) -> None:
        """Compression decides when present, else Content-Encoding; zstd in any case."""
        table = [
            ([], False),
            ([("Content-Type", "text/plain")], False),
            ([("Compression", "zstd")], True),
            ([("compression", "ZSTD")], True),
            ([("Content-Encoding", "zstd")], True),
            ([("Compression", "zstd"), ("Content-Encoding", "zstd")], True),
        ]
        for headers, expected in table:
            self.assertEqual(compression.request_is_compressed(headers), expected, headers)

    def test_request_invalid_method(self) -> None:
        """Another method is 'Invalid compression method', even when Content-Encoding says zstd."""
        for headers in (
            [("Compression", "gzip")],
            [("Compression", "identity"), ("Content-Encoding", "zstd")],
            [("Content-Encoding", "br")],
        ):
            with self.assertRaises(CompressionError) as caught:
                compression.request_is_compressed(headers)
            self.assertEqual(str(caught.exception), "Invalid compression method")

    def test_request_dictionary_refused(self) -> None:
        """A compressed request naming a dictionary is refused as Rspamd without one does."""
        with self.assertRaises(CompressionError) as caught:
            compression.request_is_compressed(
                [("Compression", "zstd"), ("Dictionary", "4294967295")]
            )
        self.assertEqual(str(caught.exception), "Unknown dictionary, undefined locally")

    def test_reply_is_compressed(self) -> None:
        """A reply is zstd when Compression or Content-Encoding says zstd."""
        table = [
            ([], False),
            ([("Compression", "zstd")], True),
            ([("Content-Encoding", " Zstd ")], True),
            ([("Compression", "gzip")], False),
            ([("Content-Type", "application/json")], False),
        ]
        for headers, expected in table:
            self.assertEqual(compression.reply_is_compressed(headers), expected, headers)

    def test_request_headers_added_by_proxy(self) -> None:
        """Rspamd 3.4's proxy announces its compressed request with Compression: zstd only."""
        self.assertEqual(compression.REQUEST_COMPRESSION_HEADERS, (("Compression", "zstd"),))
        self.assertTrue(compression.request_is_compressed(compression.REQUEST_COMPRESSION_HEADERS))

    def test_without_compression_headers(self) -> None:
        """Decompressed messages lose Compression, Content-Encoding and Dictionary, nothing else."""
        headers = [
            ("Content-Type", "application/json"),
            ("compression", "zstd"),
            ("Content-Encoding", "zstd"),
            ("Dictionary", "1"),
            ("Message-Offset", "12"),
        ]
        self.assertEqual(
            compression.without_compression_headers(headers),
            (("Content-Type", "application/json"), ("Message-Offset", "12")),
        )
