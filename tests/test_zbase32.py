"""Rspamd's LSB-first zbase32: vectors from the specs, round trips, decoder fuzzing."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from rspamd_tx.protocols import zbase32

# (raw bytes, Rspamd base32) from httpcrypt.md §3, §8 and
# fuzzy-client-and-controller.md §9-10.
VECTORS = [
    (b"", ""),
    (bytes.fromhex("9fbea16713"), "9wxd4upn"),
    (b"hello", "em3ags7p"),
    (bytes(32), "y" * 52),
    (bytes(range(10)), "yeyroboyfobqyrrb"),
    (b"rspamd", "15hyzoiprd"),
    (
        bytes.fromhex("8f40c5adb68f25624ae5b214ea767a6ec94d829d3d7b5e1ad1ba6f3e2138285f"),
        "xrokhs4sxcjrgfih1ffwq5jxqm15rbsu736hfpr4475huoy8e3zy",
    ),
    (bytes(range(32)), "yeyroboyfobqyrrbkanaogabxyrnbjcnwefctmyd3ogsbqwd6a8y"),
    (
        bytes.fromhex("d89e3bad79437dbed9f843418304f460ff05c7fe81fe4a9577a804cb9367ff66"),
        "as8zusgxdk9h5cd9dkogeno6y59mod59bw9iwk6qefbshj6c9z3y",
    ),
]


class EncodeTests(unittest.TestCase):
    """Encoding matches the strings Rspamd prints."""

    def test_vectors(self) -> None:
        """Every spec vector encodes to Rspamd's text."""
        for raw, text in VECTORS:
            self.assertEqual(zbase32.encode(raw), text, raw.hex())

    def test_lengths(self) -> None:
        """8, 20, 32 and 64 bytes give 13, 32, 52 and 103 characters."""
        for size, chars in ((8, 13), (20, 32), (32, 52), (64, 103)):
            self.assertEqual(len(zbase32.encode(bytes(size))), chars)
            self.assertEqual(zbase32.encoded_length(size), chars)

    def test_short_id_is_prefix(self) -> None:
        """The base32 of the first 5 bytes is the first 8 characters of the whole."""
        data = bytes((i * 37) % 256 for i in range(64))
        self.assertEqual(zbase32.encode(data[:5]), zbase32.encode(data)[:8])


class DecodeTests(unittest.TestCase):
    """Decoding accepts what Rspamd accepts and nothing else."""

    def test_vectors(self) -> None:
        """Every spec vector decodes back to its bytes."""
        for raw, text in VECTORS:
            self.assertEqual(zbase32.decode(text), raw, text)

    def test_bytes_input(self) -> None:
        """ASCII bytes are accepted like str."""
        self.assertEqual(zbase32.decode(b"em3ags7p"), b"hello")

    def test_expected_length(self) -> None:
        """``expected_length`` rejects a key of another size."""
        self.assertEqual(len(zbase32.decode("y" * 52, expected_length=32)), 32)
        self.assertRaises(zbase32.Base32Error, zbase32.decode, "y" * 40, 32)
        self.assertRaises(zbase32.Base32Error, zbase32.decode, "y" * 53, 32)

    def test_final_partial_group_flushed(self) -> None:
        """Like Rspamd, leftover bits are flushed as one byte: 51 chars give 32 bytes."""
        self.assertEqual(zbase32.decode("y" * 51), bytes(32))

    def test_rejects_non_alphabet(self) -> None:
        """Upper case, padding, whitespace, 'l', 'v', '2' and non-ASCII are refused."""
        for text in ("EM3AGS7P", "em3ags7p=", "em3 ags7p", "l", "v", "2", "0", "é", b"\xff"):
            self.assertRaises(zbase32.Base32Error, zbase32.decode, text)

    def test_error_is_value_error(self) -> None:
        """Base32Error is a ValueError for callers that catch broadly."""
        self.assertTrue(issubclass(zbase32.Base32Error, ValueError))

    def test_single_character(self) -> None:
        """A lone character flushes one byte, as Rspamd's decoder does."""
        self.assertEqual(zbase32.decode("b"), b"\x01")

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=96))
    def test_round_trip(self, data: bytes) -> None:
        """decode(encode(x)) == x for every length."""
        self.assertEqual(zbase32.decode(zbase32.encode(data)), data)

    @settings(max_examples=300, deadline=None)
    @given(st.one_of(st.text(max_size=120), st.binary(max_size=120)))
    def test_fuzz_only_declared_error(self, text: str | bytes) -> None:
        """Arbitrary input decodes or raises Base32Error, nothing else."""
        try:
            decoded = zbase32.decode(text)
        except zbase32.Base32Error:
            return
        self.assertLessEqual(len(decoded), len(text) * 5 // 8 + 1)
