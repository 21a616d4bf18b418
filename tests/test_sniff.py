"""Tests for rspamd_tx.protocols.sniff: guessing a connection's protocol."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from rspamd_tx.protocols.sniff import SNIFF_LIMIT, Kind, classify

# What real clients send first.
MILTER_OPTNEG = struct.pack(">I", 13) + b"O" + struct.pack(">III", 6, 0x1FF, 0x1FFFFF)
TLS_CLIENT_HELLO = bytes.fromhex("160301020001") + b"\x00" * 20

FIRST_BYTES: list[tuple[str, bytes, Kind]] = [
    ("rspamc checkv2", b"POST /checkv2 HTTP/1.0\r\nContent-Length: 21\r\n", Kind.HTTP),
    ("health check", b"GET /ping HTTP/1.1\r\n\r\n", Kind.HTTP),
    ("OPTIONS *", b"OPTIONS * HTTP/1.1\r\n\r\n", Kind.HTTP),
    ("absolute target", b"GET http://example.com/ HTTP/1.1\r\n", Kind.HTTP),
    ("Exim variant=rspamd", b"CHECK RSPAMC/1.3\r\nContent-length: 82\r\n", Kind.LEGACY),
    ("spamc symbols", b"SYMBOLS SPAMC/1.2\r\n", Kind.LEGACY),
    ("spamc process", b"PROCESS SPAMC/1.5\r\nContent-length: 5\r\n", Kind.LEGACY),
    ("spamc ping", b"PING SPAMC/1.5\r\n\r\n", Kind.LEGACY),
    ("spamc report_ifspam", b"REPORT_IFSPAM SPAMC/1.5\r\n", Kind.LEGACY),
    ("milter option negotiation", MILTER_OPTNEG, Kind.MILTER),
    ("TLS ClientHello", TLS_CLIENT_HELLO, Kind.TLS),
    ("SMTP greeting", b"EHLO mx.example.com\r\n", Kind.UNKNOWN),
    ("lower-case method", b"get / HTTP/1.1\r\n", Kind.UNKNOWN),
    ("REPORT with a strange target", b"REPORT foo HTTP/1.1\r\n", Kind.UNKNOWN),
    ("binary noise", b"\x01\x02\x03\x04\x05", Kind.UNKNOWN),
    ("zero-length milter frame", b"\x00\x00\x00\x00O", Kind.UNKNOWN),
    ("oversized milter frame", struct.pack(">I", 131074) + b"B", Kind.UNKNOWN),
    ("unknown milter command", struct.pack(">I", 5) + b"Z", Kind.UNKNOWN),
    ("SSLv3-like record with bad version", b"\x16\x02\x00", Kind.UNKNOWN),
    ("method too long", b"A" * 20, Kind.UNKNOWN),
]


class ClassifyTests(unittest.TestCase):
    """classify() on what real clients send."""

    def test_table(self) -> None:
        """Each client's first bytes are classified as expected."""
        for description, data, kind in FIRST_BYTES:
            self.assertEqual(classify(data), kind, description)

    def test_prefixes_undecided_or_consistent(self) -> None:
        """Every prefix of a table entry is either undecided or already the final answer."""
        for description, data, kind in FIRST_BYTES:
            for end in range(len(data) + 1):
                self.assertIn(classify(data[:end]), (None, kind), f"{description}[:{end}]")

    def test_empty_needs_more(self) -> None:
        """No bytes: undecided."""
        self.assertIsNone(classify(b""))

    def test_short_prefixes_need_more(self) -> None:
        """A method without its target, or a partial milter header, is undecided."""
        for data in (b"POST", b"CHECK", b"PING SPA", b"GET ", b"\x00\x00\x00", b"\x16\x03"):
            self.assertIsNone(classify(data), data)

    def test_decides_within_limit(self) -> None:
        """With SNIFF_LIMIT bytes available the answer is never None."""
        data = b"PING" + b" " * (SNIFF_LIMIT - 8) + b"SPAMC/1.5"
        self.assertEqual(classify(data[:SNIFF_LIMIT]), Kind.UNKNOWN)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=2 * SNIFF_LIMIT))
    def test_fuzz_never_raises(self, data: bytes) -> None:
        """Random bytes give a Kind or None, and never None at SNIFF_LIMIT bytes."""
        result = classify(data)
        self.assertTrue(result is None or isinstance(result, Kind))
        if len(data) >= SNIFF_LIMIT:
            self.assertIsNotNone(result)
