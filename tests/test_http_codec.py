"""Tests for rspamd_tx.protocols.http_codec: requests, replies, bounds, encoders."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.trial import unittest

import rspamd_tx
from rspamd_tx.protocols.http_codec import (
    Data,
    EndOfMessage,
    Event,
    HttpLimits,
    HttpProtocolError,
    LegacyInfo,
    LegacyVariant,
    Request,
    RequestParser,
    Response,
    ResponseParser,
    encode_legacy_reply,
    encode_request,
    encode_request_head,
    encode_response,
    header_value,
    header_values,
)
from tests.peers.rspamd import rspamc

MESSAGE = b"Subject: test\r\n\r\nHello\r\n"

# rspamc 3.4 with most options set (http-protocol.md section 8).
RSPAMC_HEADERS = (
    ("Content-Length", str(len(MESSAGE))),
    ("Connection", "close"),
    ("Content-Type", "text/plain"),
    ("User-Agent", "rspamc"),
    ("Flags", "body_block,pass_all"),
    ("Filename", "stdin"),
    ("Accept", "application/msgpack"),
    ("Ip", "192.0.2.1"),
    ("From", "sender@example.com"),
    ("User", "bob"),
    ("Rcpt", "one@example.net"),
    ("Rcpt", "two@example.net"),
    ("Deliver-To", "one@example.net"),
    ("Helo", "mx.example.com"),
    ("Hostname", "mx.example.com"),
    ("Password", "secret"),
    ("Raw", "yes"),
    ("URL-Format", "extended"),
    ("Queue-Id", "4ABCDEF"),
    ("Log-Tag", "tag1"),
    ("Settings", '{"actions": {"reject": 100}}'),
    ("Compression", "zstd"),
    ("X-Custom", "value with  spaces"),
)


def _wire(start: str, headers: Sequence[tuple[str, str]], body: bytes = b"") -> bytes:
    lines = [start] + [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


EXIM_HEADERS = (
    ("Content-length", str(len(MESSAGE))),
    ("Queue-Id", "1q2w3e-000abc-Ab"),
    ("From", "<sender@example.com>"),
    ("Recipient-Number", "2"),
    ("Rcpt", "<one@example.net>"),
    ("Rcpt", "<two@example.net>"),
    ("Helo", "mx.example.com"),
    ("Hostname", "mx.example.com"),
    ("IP", "192.0.2.1"),
    ("User", "bob"),
)

SPAMC_HEADERS = (("Content-length", str(len(MESSAGE))), ("User", "bob"))

# (description, wire bytes, expected events with the body merged into one Data)
REQUEST_TABLE: list[tuple[str, bytes, list[Event]]] = [
    (
        "rspamc 3.4 checkv2 with every option",
        _wire("POST /checkv2 HTTP/1.0", RSPAMC_HEADERS, MESSAGE),
        [Request("POST", "/checkv2", "1.0", RSPAMC_HEADERS), Data(MESSAGE), EndOfMessage()],
    ),
    (
        "GET with a body, as the proxy sends to local scanners",
        _wire(
            "GET /checkv2 HTTP/1.1",
            (("Host", "local"), ("Content-Length", str(len(MESSAGE)))),
            MESSAGE,
        ),
        [
            Request(
                "GET", "/checkv2", "1.1", (("Host", "local"), ("Content-Length", str(len(MESSAGE))))
            ),
            Data(MESSAGE),
            EndOfMessage(),
        ],
    ),
    (
        "chunked body with an extension and a trailer",
        (
            b"POST /symbols HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;name=x\r\nHello\r\n7\r\n, world\r\n0\r\nX-Trailer: 1\r\n\r\n"
        ),
        [
            Request("POST", "/symbols", "1.1", (("Transfer-Encoding", "chunked"),)),
            Data(b"Hello, world"),
            EndOfMessage(),
        ],
    ),
    (
        "ping without a body",
        b"GET /ping HTTP/1.1\r\nConnection: close\r\n\r\n",
        [Request("GET", "/ping", "1.1", (("Connection", "close"),)), EndOfMessage()],
    ),
    (
        "query string kept in the target, bare LF line endings accepted",
        b"POST /check?From=a@b HTTP/1.0\nContent-Length: 3\n\nabc",
        [
            Request("POST", "/check?From=a@b", "1.0", (("Content-Length", "3"),)),
            Data(b"abc"),
            EndOfMessage(),
        ],
    ),
    (
        "Exim variant=rspamd CHECK RSPAMC/1.3",
        _wire("CHECK RSPAMC/1.3", EXIM_HEADERS, MESSAGE),
        [
            Request(
                "CHECK",
                "",
                "1.0",
                EXIM_HEADERS,
                LegacyInfo(LegacyVariant.RSPAMC, "CHECK", "RSPAMC/1.3"),
            ),
            Data(MESSAGE),
            EndOfMessage(),
        ],
    ),
    (
        "SYMBOLS RSPAMC/1.1",
        _wire("SYMBOLS RSPAMC/1.1", (("Content-length", str(len(MESSAGE))),), MESSAGE),
        [
            Request(
                "SYMBOLS",
                "",
                "1.0",
                (("Content-length", str(len(MESSAGE))),),
                LegacyInfo(LegacyVariant.RSPAMC, "SYMBOLS", "RSPAMC/1.1"),
            ),
            Data(MESSAGE),
            EndOfMessage(),
        ],
    ),
    (
        "spamc -c: CHECK SPAMC/1.5",
        _wire("CHECK SPAMC/1.5", SPAMC_HEADERS, MESSAGE),
        [
            Request(
                "CHECK",
                "",
                "1.0",
                SPAMC_HEADERS,
                LegacyInfo(LegacyVariant.SPAMC, "CHECK", "SPAMC/1.5"),
            ),
            Data(MESSAGE),
            EndOfMessage(),
        ],
    ),
    (
        "spamc -y: SYMBOLS SPAMC/1.2",
        _wire("SYMBOLS SPAMC/1.2", SPAMC_HEADERS, MESSAGE),
        [
            Request(
                "SYMBOLS",
                "",
                "1.0",
                SPAMC_HEADERS,
                LegacyInfo(LegacyVariant.SPAMC, "SYMBOLS", "SPAMC/1.2"),
            ),
            Data(MESSAGE),
            EndOfMessage(),
        ],
    ),
    (
        "legacy request without Content-length has an empty body",
        b"CHECK RSPAMC/1.3\r\nFrom: a@example.com\r\n\r\n",
        [
            Request(
                "CHECK",
                "",
                "1.0",
                (("From", "a@example.com"),),
                LegacyInfo(LegacyVariant.RSPAMC, "CHECK", "RSPAMC/1.3"),
            ),
            EndOfMessage(),
        ],
    ),
    (
        "legacy request with a chunked body (Rspamd accepts it)",
        b"CHECK RSPAMC/1.3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        [
            Request(
                "CHECK",
                "",
                "1.0",
                (("Transfer-Encoding", "chunked"),),
                LegacyInfo(LegacyVariant.RSPAMC, "CHECK", "RSPAMC/1.3"),
            ),
            Data(b"hello"),
            EndOfMessage(),
        ],
    ),
    (
        "two keep-alive requests on one connection",
        b"POST /checkv2 HTTP/1.1\r\nContent-Length: 2\r\n\r\nab" + b"GET /ping HTTP/1.1\r\n\r\n",
        [
            Request("POST", "/checkv2", "1.1", (("Content-Length", "2"),)),
            Data(b"ab"),
            EndOfMessage(),
            Request("GET", "/ping", "1.1", ()),
            EndOfMessage(),
        ],
    ),
]

RESPONSE_TABLE: list[tuple[str, bytes, list[Event]]] = [
    (
        "Rspamd 3.4 checkv2 reply with Content-Length and Connection: close",
        (
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nServer: rspamd/3.4\r\n"
            b"Date: Mon, 23 Nov 2026 17:00:00 GMT\r\nContent-Length: 15\r\n"
            b'Content-Type: application/json\r\n\r\n{"score":15.0}\n'
        ),
        [
            Response(
                200,
                "OK",
                (
                    ("Connection", "close"),
                    ("Server", "rspamd/3.4"),
                    ("Date", "Mon, 23 Nov 2026 17:00:00 GMT"),
                    ("Content-Length", "15"),
                    ("Content-Type", "application/json"),
                ),
                "1.1",
                False,
            ),
            Data(b'{"score":15.0}\n'),
            EndOfMessage(),
        ],
    ),
    (
        "chunked keep-alive reply",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\npong\r\n2\r\n\r\n\r\n0\r\n\r\n",
        [
            Response(200, "OK", (("Transfer-Encoding", "chunked"),), "1.1", True),
            Data(b"pong\r\n"),
            EndOfMessage(),
        ],
    ),
    (
        "error reply with the message as reason phrase",
        b"HTTP/1.1 500 invalid command\r\nContent-Length: 0\r\n\r\n",
        [
            Response(500, "invalid command", (("Content-Length", "0"),), "1.1", True),
            EndOfMessage(),
        ],
    ),
    (
        "interim 100 reply skipped",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
        [Response(204, "No Content", (), "1.1", True), EndOfMessage()],
    ),
]


def _merge(events: Sequence[Event]) -> list[Event]:
    """Join adjacent Data events so differently split inputs compare equal."""
    merged: list[Event] = []
    for event in events:
        if isinstance(event, Data) and merged and isinstance(merged[-1], Data):
            merged[-1] = Data(merged[-1].chunk + event.chunk)
        else:
            merged.append(event)
    return merged


def _parse_requests(pieces: Sequence[bytes]) -> list[Event]:
    parser = RequestParser()
    events: list[Event] = []
    for piece in pieces:
        events.extend(parser.feed(piece))
    events.extend(parser.feed_eof())
    return _merge(events)


def _parse_response(pieces: Sequence[bytes], eof: bool = False) -> list[Event]:
    parser = ResponseParser()
    events: list[Event] = []
    for piece in pieces:
        events.extend(parser.feed(piece))
    if eof:
        events.extend(parser.feed_eof())
    return _merge(events)


class PurityTests(unittest.TestCase):
    """The codec modules do no I/O."""

    def test_no_twisted_internet(self) -> None:
        """Importing the codec, legacy reply and sniff modules loads nothing from twisted.internet."""
        probe = (
            "import sys\n"
            "import rspamd_tx.protocols.http_codec, rspamd_tx.protocols.legacy_reply\n"
            "import rspamd_tx.protocols.sniff\n"
            "print(sorted(m for m in sys.modules if m.startswith('twisted.internet')))\n"
        )
        root = os.path.dirname(os.path.dirname(os.path.abspath(rspamd_tx.__file__)))
        result = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=root
        )
        self.assertEqual(result.stdout.strip(), "[]")


class RequestTableTests(unittest.TestCase):
    """Every request in the table parses to its events, however it is split."""

    def test_whole(self) -> None:
        """Each request fed in one piece gives the expected events."""
        for description, wire, expected in REQUEST_TABLE:
            self.assertEqual(_parse_requests([wire]), expected, description)

    def test_every_split_point(self) -> None:
        """Each request split in two at every offset gives the same events."""
        for description, wire, expected in REQUEST_TABLE:
            for offset in range(len(wire) + 1):
                self.assertEqual(
                    _parse_requests([wire[:offset], wire[offset:]]),
                    expected,
                    f"{description} split at {offset}",
                )

    def test_byte_by_byte(self) -> None:
        """Each request fed one byte at a time gives the same events."""
        for description, wire, expected in REQUEST_TABLE:
            pieces = [wire[i : i + 1] for i in range(len(wire))]
            self.assertEqual(_parse_requests(pieces), expected, description)


class RequestBehaviourTests(unittest.TestCase):
    """Request semantics beyond the table."""

    def test_duplicate_headers_kept_in_order(self) -> None:
        """Several Rcpt headers keep their order and case; lookups are case-insensitive."""
        events = RequestParser().feed(
            b"POST /checkv2 HTTP/1.1\r\nRcpt: a@x\r\nrcpt: b@x\r\nRCPT: c@x\r\n\r\n"
        )
        request = events[0]
        assert isinstance(request, Request)
        self.assertEqual(request.get_all("Rcpt"), ["a@x", "b@x", "c@x"])
        self.assertEqual([name for name, _ in request.headers], ["Rcpt", "rcpt", "RCPT"])
        self.assertEqual(request.get("RcPt"), "a@x")
        self.assertIsNone(request.get("From"))

    def test_keep_alive_rules(self) -> None:
        """HTTP/1.1 persists unless close; HTTP/1.0 only with keep-alive; legacy never."""
        cases = [
            (b"GET / HTTP/1.1\r\n\r\n", True),
            (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", False),
            (b"GET / HTTP/1.0\r\n\r\n", False),
            (b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", True),
            (b"CHECK RSPAMC/1.3\r\nConnection: keep-alive\r\n\r\n", False),
        ]
        for wire, keep_alive in cases:
            request = RequestParser().feed(wire)[0]
            assert isinstance(request, Request)
            self.assertEqual(request.keep_alive, keep_alive, wire)

    def test_bytes_after_final_request_ignored(self) -> None:
        """After a request that closes the connection, further bytes produce nothing."""
        parser = RequestParser()
        events = parser.feed(b"GET /ping HTTP/1.0\r\n\r\nGARBAGE\r\n")
        self.assertEqual(len(events), 2)
        self.assertEqual(parser.feed(b"more garbage"), [])
        self.assertEqual(parser.feed_eof(), [])

    def test_body_streamed_before_complete(self) -> None:
        """Body bytes are delivered as they arrive, before the message is complete."""
        parser = RequestParser()
        events = parser.feed(b"POST /checkv2 HTTP/1.1\r\nContent-Length: 10\r\n\r\nabcd")
        self.assertEqual(events[1:], [Data(b"abcd")])
        self.assertEqual(parser.feed(b"efghij"), [Data(b"efghij"), EndOfMessage()])

    def test_blank_lines_before_request_skipped(self) -> None:
        """Empty lines before a request line are ignored."""
        events = RequestParser().feed(b"\r\n\r\nGET /ping HTTP/1.1\r\n\r\n")
        self.assertEqual(events, [Request("GET", "/ping", "1.1", ()), EndOfMessage()])

    def test_clean_eof_between_requests(self) -> None:
        """Closing between keep-alive requests is not an error."""
        parser = RequestParser()
        parser.feed(b"GET /ping HTTP/1.1\r\n\r\n")
        self.assertEqual(parser.feed_eof(), [])

    def test_content_length_over_max_message_rejected_before_body(self) -> None:
        """A Content-Length over max_message fails with 413 before any body byte."""
        parser = RequestParser(HttpLimits(max_message=100))
        with self.assertRaises(HttpProtocolError) as caught:
            parser.feed(b"POST /checkv2 HTTP/1.1\r\nContent-Length: 101\r\n\r\n")
        self.assertEqual(caught.exception.status, 413)

    def test_content_length_at_max_message_accepted(self) -> None:
        """A body exactly max_message long is accepted."""
        parser = RequestParser(HttpLimits(max_message=4))
        events = parser.feed(b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\nabcd")
        self.assertEqual(events[1:], [Data(b"abcd"), EndOfMessage()])


def _error_of(
    wire: bytes, limits: HttpLimits | None = None, eof: bool = False
) -> HttpProtocolError:
    parser = RequestParser(limits)
    try:
        parser.feed(wire)
        if eof:
            parser.feed_eof()
    except HttpProtocolError as exc:
        return exc
    raise AssertionError(f"no error for {wire!r}")


class RequestErrorTests(unittest.TestCase):
    """Malformed requests and bound violations raise HttpProtocolError with a status."""

    SMALL = HttpLimits(max_message=16, max_header_count=3, max_line=40, max_header_section=120)

    def test_error_table(self) -> None:
        """Each malformed input fails with its status."""
        cases: list[tuple[str, bytes, int]] = [
            ("no version", b"GET /ping\r\n\r\n", 400),
            ("HTTP/2", b"GET / HTTP/2.0\r\n\r\n", 505),
            ("space in target", b"GET /a b HTTP/1.1\r\n\r\n", 400),
            ("lower-case legacy verb", b"symbols RSPAMC/1.3\r\n\r\n", 400),
            ("legacy token not S or R", b"CHECK FOO/1.0\r\n\r\n", 400),
            ("legacy verb without token", b"CHECK \r\n\r\n", 400),
            ("spamd PROCESS", b"PROCESS SPAMC/1.5\r\nContent-length: 1\r\n\r\nx", 400),
            ("spamd PING", b"PING SPAMC/1.5\r\n\r\n", 400),
            ("header without colon", b"GET / HTTP/1.1\r\nBroken\r\n\r\n", 400),
            ("space before colon", b"GET / HTTP/1.1\r\nName : v\r\n\r\n", 400),
            ("folded header", b"GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n", 400),
            ("NUL in value", b"GET / HTTP/1.1\r\nA: b\x00c\r\n\r\n", 400),
            ("bad Content-Length", b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
            (
                "conflicting Content-Length",
                b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                400,
            ),
            ("gzip transfer coding", b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
            (
                "bad chunk size",
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                400,
            ),
            (
                "chunk data not followed by CRLF",
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n",
                400,
            ),
        ]
        for description, wire, status in cases:
            self.assertEqual(_error_of(wire).status, status, description)

    def test_too_many_headers(self) -> None:
        """More header lines than max_header_count fail with 431."""
        wire = b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n"
        self.assertEqual(_error_of(wire, self.SMALL).status, 431)

    def test_line_too_long_without_newline(self) -> None:
        """A line over max_line fails with 431 even before its end arrives."""
        self.assertEqual(_error_of(b"GET /" + b"a" * 60, self.SMALL).status, 431)

    def test_header_line_too_long(self) -> None:
        """A complete header line over max_line fails with 431."""
        wire = b"GET / HTTP/1.1\r\nX: " + b"v" * 50 + b"\r\n\r\n"
        self.assertEqual(_error_of(wire, self.SMALL).status, 431)

    def test_header_section_too_large(self) -> None:
        """A header block over max_header_section fails with 431."""
        wire = b"GET / HTTP/1.1\r\n" + b"X: " + b"v" * 35 + b"\r\n" + b"Y: " + b"v" * 35 + b"\r\n"
        wire += b"Z: " + b"v" * 35 + b"\r\n\r\n"
        self.assertEqual(_error_of(wire, self.SMALL).status, 431)

    def test_chunked_body_over_max_message(self) -> None:
        """Chunks adding up to more than max_message fail with 413."""
        wire = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        wire += b"a\r\n0123456789\r\n7\r\n"
        self.assertEqual(_error_of(wire, self.SMALL).status, 413)

    def test_huge_chunk_size_rejected(self) -> None:
        """A chunk size beyond any bound fails with 413 before data arrives."""
        wire = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n"
        self.assertEqual(_error_of(wire).status, 413)

    def test_eof_inside_body(self) -> None:
        """Closing in the middle of a body fails with 400."""
        wire = b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc"
        self.assertEqual(_error_of(wire, eof=True).status, 400)

    def test_eof_inside_headers(self) -> None:
        """Closing in the middle of the header block fails with 400."""
        self.assertEqual(_error_of(b"GET / HTTP/1.1\r\nA: b\r\n", eof=True).status, 400)

    def test_parser_unusable_after_error(self) -> None:
        """Feeding a failed parser raises again."""
        parser = RequestParser()
        self.assertRaises(HttpProtocolError, parser.feed, b"BAD\r\n")
        self.assertRaises(HttpProtocolError, parser.feed, b"GET / HTTP/1.1\r\n\r\n")


class ResponseParserTests(unittest.TestCase):
    """Client-side reply parsing."""

    def test_table_every_split_point(self) -> None:
        """Each reply split in two at every offset gives the expected events."""
        for description, wire, expected in RESPONSE_TABLE:
            for offset in range(len(wire) + 1):
                self.assertEqual(
                    _parse_response([wire[:offset], wire[offset:]]),
                    expected,
                    f"{description} split at {offset}",
                )

    def test_close_delimited(self) -> None:
        """A reply without length ends at the end of the connection and is not reusable."""
        wire = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npong\r\n"
        for offset in range(len(wire) + 1):
            events = _parse_response([wire[:offset], wire[offset:]], eof=True)
            self.assertEqual(
                events,
                [
                    Response(200, "OK", (("Content-Type", "text/plain"),), "1.1", False),
                    Data(b"pong\r\n"),
                    EndOfMessage(),
                ],
            )

    def test_http10_not_kept_alive(self) -> None:
        """An HTTP/1.0 reply without keep-alive closes the connection."""
        response = ResponseParser().feed(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")[0]
        assert isinstance(response, Response)
        self.assertFalse(response.keep_alive)

    def test_reason_may_be_absent(self) -> None:
        """A status line without reason phrase parses with an empty reason."""
        response = ResponseParser().feed(b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n")[0]
        assert isinstance(response, Response)
        self.assertEqual((response.status, response.reason), (200, ""))

    def test_reply_over_bound(self) -> None:
        """A reply body over max_message fails with 413."""
        parser = ResponseParser(HttpLimits(max_message=4))
        with self.assertRaises(HttpProtocolError) as caught:
            parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
        self.assertEqual(caught.exception.status, 413)

    def test_close_delimited_over_bound(self) -> None:
        """A close-delimited body over max_message fails with 413."""
        parser = ResponseParser(HttpLimits(max_message=4))
        parser.feed(b"HTTP/1.1 200 OK\r\n\r\nabcd")
        with self.assertRaises(HttpProtocolError) as caught:
            parser.feed(b"e")
        self.assertEqual(caught.exception.status, 413)

    def test_eof_without_reply(self) -> None:
        """A connection closed before any byte is a 502 error."""
        with self.assertRaises(HttpProtocolError) as caught:
            ResponseParser().feed_eof()
        self.assertEqual(caught.exception.status, 502)

    def test_eof_inside_reply(self) -> None:
        """A connection closed before Content-Length bytes arrived is a 502 error."""
        parser = ResponseParser()
        parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc")
        self.assertRaises(HttpProtocolError, parser.feed_eof)

    def test_bad_status_line(self) -> None:
        """Something that is not a status line is a 502 error."""
        for wire in (b"RSPAMD/1.3 0 EX_OK\r\n", b"HTTP/1.1 20 OK\r\n", b"HTTP/2.0 200 OK\r\n"):
            with self.assertRaises(HttpProtocolError) as caught:
                ResponseParser().feed(wire)
            self.assertEqual(caught.exception.status, 502, wire)

    def test_switching_protocols_rejected(self) -> None:
        """A 101 reply is a 502 error."""
        self.assertRaises(
            HttpProtocolError, ResponseParser().feed, b"HTTP/1.1 101 Switching\r\n\r\n"
        )

    def test_bytes_after_reply_ignored(self) -> None:
        """Bytes after a complete reply produce no events."""
        parser = ResponseParser()
        parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(parser.feed(b"junk"), [])
        self.assertEqual(parser.feed_eof(), [])


class EncoderTests(unittest.TestCase):
    """Request, response and legacy reply encoders."""

    def test_encode_request_appends_content_length(self) -> None:
        """Without a Content-Length header one is appended with the body length."""
        wire = encode_request("POST", "/checkv2", [("Host", "local"), ("Rcpt", "a")], b"abc")
        self.assertEqual(
            wire,
            b"POST /checkv2 HTTP/1.1\r\nHost: local\r\nRcpt: a\r\nContent-Length: 3\r\n\r\nabc",
        )

    def test_encode_request_fixes_content_length_in_place(self) -> None:
        """A supplied Content-Length keeps its position but gets the true value."""
        wire = encode_request(
            "GET",
            "/checkv2",
            [("Content-Length", "99"), ("Transfer-Encoding", "chunked"), ("A", "b")],
            version="1.0",
        )
        self.assertEqual(wire, b"GET /checkv2 HTTP/1.0\r\nContent-Length: 0\r\nA: b\r\n\r\n")

    def test_encode_request_head_is_the_request_without_body(self) -> None:
        """encode_request_head for a body's length is exactly what precedes that body."""
        headers = [("Host", "local"), ("Content-Length", "1"), ("Rcpt", "a")]
        head = encode_request_head("POST", "/checkv2", headers, len(MESSAGE))
        self.assertEqual(head + MESSAGE, encode_request("POST", "/checkv2", headers, MESSAGE))

    def test_encode_request_round_trip(self) -> None:
        """An encoded rspamc-like request parses back to the same headers and body."""
        headers = [h for h in RSPAMC_HEADERS if h[0] != "Content-Length"]
        events = RequestParser().feed(encode_request("POST", "/checkv2", headers, MESSAGE))
        request = events[0]
        assert isinstance(request, Request)
        self.assertEqual(list(request.headers[:-1]), headers)
        self.assertEqual(request.headers[-1], ("Content-Length", str(len(MESSAGE))))
        self.assertEqual(events[1:], [Data(MESSAGE), EndOfMessage()])

    def test_encode_request_rejects_injection(self) -> None:
        """CR/LF in a header value, spaces in the target or a bad name raise ValueError."""
        self.assertRaises(ValueError, encode_request, "POST", "/x", [("A", "b\r\nC: d")])
        self.assertRaises(ValueError, encode_request, "POST", "/x y", [])
        self.assertRaises(ValueError, encode_request, "POST", "/x", [("A B", "c")])
        self.assertRaises(ValueError, encode_request, "PO ST", "/x", [])

    def test_encode_response_rspamd_order(self) -> None:
        """Headers keep the caller's order with the true Content-Length in its slot."""
        wire = encode_response(
            200,
            "OK",
            [
                ("Connection", "close"),
                ("Server", "rspamd/3.4"),
                ("Date", "Mon, 23 Nov 2026 17:00:00 GMT"),
                ("Content-Length", ""),
                ("Content-Type", "text/plain"),
            ],
            b"pong\r\n",
        )
        self.assertEqual(
            wire,
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nServer: rspamd/3.4\r\n"
            b"Date: Mon, 23 Nov 2026 17:00:00 GMT\r\nContent-Length: 6\r\n"
            b"Content-Type: text/plain\r\n\r\npong\r\n",
        )

    def test_encode_response_error_reason(self) -> None:
        """An error reply carries the message as reason phrase and parses back."""
        wire = encode_response(500, "invalid command", [("Connection", "close")], b"{}")
        events = ResponseParser().feed(wire)
        self.assertEqual(
            events,
            [
                Response(
                    500,
                    "invalid command",
                    (("Connection", "close"), ("Content-Length", "2")),
                    "1.1",
                    False,
                ),
                Data(b"{}"),
                EndOfMessage(),
            ],
        )

    def test_encode_response_rejects_bad_status(self) -> None:
        """A status outside 100-999 or a reason with CR/LF raises ValueError."""
        self.assertRaises(ValueError, encode_response, 99, "x", [])
        self.assertRaises(ValueError, encode_response, 200, "O\r\nK", [])

    def test_legacy_rspamc_status_line(self) -> None:
        """An RSPAMC reply is RSPAMD/1.3 0 EX_OK followed directly by the body."""
        body = b"Metric: default; False; 0.00 / 15.00 / 0.0\r\n"
        self.assertEqual(
            encode_legacy_reply(LegacyVariant.RSPAMC, body), b"RSPAMD/1.3 0 EX_OK\r\n" + body
        )

    def test_legacy_spamc_content_length_counts_symbol_line(self) -> None:
        """SPAMC Content-length counts the bytes after the blank line."""
        body = b"Spam: False ; 4.50 / 15.00\r\n\r\nRDNS_NONE,R_SPF_DNSFAIL\r\n"
        self.assertEqual(
            encode_legacy_reply(LegacyVariant.SPAMC, body),
            b"SPAMD/1.1 0 EX_OK\r\nContent-length: 25\r\n" + body,
        )

    def test_legacy_spamc_content_length_without_symbols(self) -> None:
        """With no symbol line SPAMC Content-length is the whole body length."""
        body = b"Spam: False ; 0.00 / 15.00\r\n\r\n"
        self.assertEqual(
            encode_legacy_reply(LegacyVariant.SPAMC, body),
            b"SPAMD/1.1 0 EX_OK\r\nContent-length: 30\r\n" + body,
        )

    def test_header_helpers(self) -> None:
        """header_value/header_values look names up case-insensitively."""
        headers = (("Rcpt", "a"), ("RCPT", "b"), ("From", "c"))
        self.assertEqual(header_values(headers, "rcpt"), ["a", "b"])
        self.assertEqual(header_value(headers, "FROM"), "c")
        self.assertIsNone(header_value(headers, "Ip"))


_VALID_REQUESTS = [wire for _, wire, _ in REQUEST_TABLE]
_VALID_RESPONSES = [wire for _, wire, _ in RESPONSE_TABLE]


def _mutated(corpus: list[bytes]) -> st.SearchStrategy[bytes]:
    """A valid message with a random slice replaced by random bytes."""

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        wire = draw(st.sampled_from(corpus))
        start = draw(st.integers(0, len(wire)))
        end = draw(st.integers(start, len(wire)))
        return wire[:start] + draw(st.binary(max_size=40)) + wire[end:]

    return build()


def _feed_all(parser: RequestParser | ResponseParser, data: bytes, cuts: list[int]) -> None:
    previous = 0
    for cut in sorted(c % (len(data) + 1) for c in cuts) + [len(data)]:
        parser.feed(data[previous:cut])
        previous = cut
    parser.feed_eof()


FUZZ_LIMITS = HttpLimits(max_message=64, max_header_count=8, max_line=64, max_header_section=256)


_names = st.from_regex(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,12}", fullmatch=True).filter(
    lambda name: name.lower() not in ("content-length", "transfer-encoding")
)
_values = st.text(
    alphabet=st.characters(min_codepoint=1, max_codepoint=255, blacklist_characters="\r\n"),
    max_size=20,
).map(lambda value: value.strip(" \t"))
_header_lists = st.lists(st.tuples(_names, _values), max_size=6)


class RoundTripTests(unittest.TestCase):
    """Whatever the encoders write, the parsers read back unchanged."""

    @settings(max_examples=200, deadline=None)
    @given(
        st.from_regex(r"[A-Z]{1,8}", fullmatch=True),
        st.from_regex(r"/[!-~]{0,20}", fullmatch=True),
        _header_lists,
        st.binary(max_size=100),
        st.integers(0, 10_000),
    )
    def test_request(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes, cut: int
    ) -> None:
        """encode_request output parses to the same request, split anywhere."""
        wire = encode_request(method, target, headers, body)
        cut %= len(wire) + 1
        parser = RequestParser()
        events = _merge(parser.feed(wire[:cut]) + parser.feed(wire[cut:]))
        expected_headers = tuple(headers) + (("Content-Length", str(len(body))),)
        expected: list[Event] = [Request(method, target, "1.1", expected_headers)]
        expected += [Data(body)] if body else []
        self.assertEqual(events, expected + [EndOfMessage()])

    @settings(max_examples=200, deadline=None)
    @given(
        st.integers(200, 599).filter(lambda status: status not in (204, 304)),
        st.from_regex(r"[A-Za-z ]{0,20}", fullmatch=True),
        _header_lists,
        st.binary(max_size=100),
        st.integers(0, 10_000),
    )
    def test_response(
        self, status: int, reason: str, headers: list[tuple[str, str]], body: bytes, cut: int
    ) -> None:
        """encode_response output parses to the same reply, split anywhere."""
        wire = encode_response(status, reason, headers, body)
        cut %= len(wire) + 1
        parser = ResponseParser()
        events = _merge(parser.feed(wire[:cut]) + parser.feed(wire[cut:]))
        response = events[0]
        assert isinstance(response, Response)
        self.assertEqual((response.status, response.reason), (status, reason))
        self.assertEqual(response.headers, tuple(headers) + (("Content-Length", str(len(body))),))
        self.assertEqual(events[1:], ([Data(body)] if body else []) + [EndOfMessage()])


class FuzzTests(unittest.TestCase):
    """Random input never raises anything but HttpProtocolError."""

    @settings(max_examples=300, deadline=None)
    @given(
        st.one_of(st.binary(max_size=300), _mutated(_VALID_REQUESTS)),
        st.lists(st.integers(0, 10_000), max_size=4),
        st.booleans(),
    )
    def test_request_parser(self, data: bytes, cuts: list[int], small: bool) -> None:
        """RequestParser raises only HttpProtocolError on any input."""
        try:
            _feed_all(RequestParser(FUZZ_LIMITS if small else None), data, cuts)
        except HttpProtocolError:
            pass

    @settings(max_examples=300, deadline=None)
    @given(
        st.one_of(st.binary(max_size=300), _mutated(_VALID_RESPONSES)),
        st.lists(st.integers(0, 10_000), max_size=4),
        st.booleans(),
    )
    def test_response_parser(self, data: bytes, cuts: list[int], small: bool) -> None:
        """ResponseParser raises only HttpProtocolError on any input."""
        try:
            _feed_all(ResponseParser(FUZZ_LIMITS if small else None), data, cuts)
        except HttpProtocolError:
            pass


def _outcome(parser: RequestParser | ResponseParser, pieces: Sequence[bytes]) -> list[Event] | int:
    """The events a parser gives for ``pieces`` (then end of input), or the status
    of the error that stopped it (events of a ``feed`` that raises are lost, so
    those before an error depend on how the input was split)."""
    events: list[Event] = []
    try:
        for piece in pieces:
            events.extend(parser.feed(piece))
        events.extend(parser.feed_eof())
    except HttpProtocolError as exc:
        return exc.status
    return _merge(events)


@st.composite
def _crafted_heads(draw: st.DrawFn, start_lines: Sequence[bytes]) -> bytes:
    """A message start with header lines of token-ish names, odd blanks and
    characters, CRLF or bare LF endings, then a few body bytes."""
    line_names = st.sampled_from(
        [b"Host", b"Rcpt", b"Content-Length", b"content-length", b"Connection",
         b"Transfer-Encoding", b"X-A", b"Bad Name", b"", b"N\x00", b"\xe9t\xe9"]
    )
    values = st.sampled_from(
        [b"3", b" 3 ", b"\t5", b"close", b"keep-alive, close", b"chunked", b"a:b", b"",
         b"x\ry", b"nul\x00", b"\xff\xfe", b"  spaced  value \t"]
    )
    endings = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n"])
    head = draw(st.sampled_from(start_lines)) + draw(endings)
    for _ in range(draw(st.integers(0, 6))):
        line = draw(line_names) + draw(st.sampled_from([b":", b": ", b" :", b""])) + draw(values)
        if draw(st.booleans()) and draw(st.booleans()):
            line = b" " + line
        head += line + draw(endings)
    return head + draw(endings) + draw(st.binary(max_size=12))


class DirectPathTests(unittest.TestCase):
    """A message start that arrives whole is parsed in one pass: the outcome is
    always the one of the line-by-line parser (bytes fed one at a time)."""

    @settings(max_examples=400, deadline=None)
    @given(
        st.one_of(
            _mutated(_VALID_REQUESTS),
            _crafted_heads([b"POST /checkv2 HTTP/1.1", b"GET /ping HTTP/1.0", b"CHECK RSPAMC/1.3",
                            b"PROCESS SPAMC/1.5", b"POST /a b HTTP/1.1", b"GET / HTTP/2.0"]),
        ),
        st.booleans(),
    )
    def test_request_whole_like_byte_by_byte(self, wire: bytes, small: bool) -> None:
        """Requests: same events and same error status whole or byte by byte."""
        limits = FUZZ_LIMITS if small else None
        whole = _outcome(RequestParser(limits), [wire])
        slow = _outcome(RequestParser(limits), [wire[i : i + 1] for i in range(len(wire))])
        self.assertEqual(whole, slow)

    @settings(max_examples=400, deadline=None)
    @given(
        st.one_of(
            _mutated(_VALID_RESPONSES),
            _crafted_heads([b"HTTP/1.1 200 OK", b"HTTP/1.0 500 invalid command", b"HTTP/1.1 100 Continue",
                            b"HTTP/1.1 204 No Content", b"HTTP/3.0 200 OK", b"HTTP/1.1 2000"]),
        ),
        st.booleans(),
    )
    def test_response_whole_like_byte_by_byte(self, wire: bytes, small: bool) -> None:
        """Replies: same events and same error status whole or byte by byte."""
        limits = FUZZ_LIMITS if small else None
        whole = _outcome(ResponseParser(limits), [wire])
        slow = _outcome(ResponseParser(limits), [wire[i : i + 1] for i in range(len(wire))])
        self.assertEqual(whole, slow)

    def test_body_passed_on_without_copies(self) -> None:
        """Body pieces arriving on their own are handed on as they are."""
        parser = RequestParser()
        parser.feed(b"POST /checkv2 HTTP/1.1\r\nContent-Length: 8\r\n\r\nab")
        piece = b"cdefgh"
        [data, end] = parser.feed(piece)
        assert isinstance(data, Data)
        self.assertIs(data.chunk, piece)
        self.assertEqual(end, EndOfMessage())

    def test_pipelined_requests_after_whole_head(self) -> None:
        """A keep-alive request parsed whole is followed by the next one in the same piece."""
        wire = (
            b"POST /checkv2 HTTP/1.1\r\nContent-Length: 2\r\n\r\nab"
            b"GET /ping HTTP/1.1\r\nConnection: close\r\n\r\nignored"
        )
        self.assertEqual(
            _parse_requests([wire]),
            [
                Request("POST", "/checkv2", "1.1", (("Content-Length", "2"),)),
                Data(b"ab"),
                EndOfMessage(),
                Request("GET", "/ping", "1.1", (("Connection", "close"),)),
                EndOfMessage(),
            ],
        )

    def test_interim_reply_then_reply(self) -> None:
        """A 100 Continue and the reply in one piece: only the reply is reported."""
        wire = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        events = _parse_response([wire])
        self.assertEqual([type(e) for e in events], [Response, Data, EndOfMessage])


class _CaptureServer(Protocol):
    """Parses one request with RequestParser and answers like Rspamd 3.4 would."""

    def connectionMade(self) -> None:
        self.parser = RequestParser()
        self.events: list[Event] = []

    def dataReceived(self, data: bytes) -> None:
        events = self.parser.feed(data)
        self.events.extend(events)
        if any(isinstance(event, EndOfMessage) for event in events):
            assert self.transport is not None
            body = (
                b'{"is_skipped":true,"score":15.0,"required_score":15.0,"action":"reject",'
                b'"symbols":{"GTUBE":{"name":"GTUBE","score":0.0}},"messages":{},'
                b'"message-id":"undef","time_real":0.0}'
            )
            self.transport.write(
                encode_response(
                    200, "OK", [("Connection", "close"), ("Content-Type", "application/json")], body
                )
            )
            self.transport.loseConnection()
            self.factory.captured.callback(_merge(self.events))


class _CaptureFactory(ServerFactory):
    """Builds capture servers; ``captured`` fires with the first request's events."""

    protocol = _CaptureServer

    def __init__(self) -> None:
        self.captured: Deferred[list[Event]] = Deferred()


class RealRspamcTests(unittest.TestCase):
    """What the real rspamc 3.4 sends parses as expected."""

    skip = None if shutil.which("rspamc") else "rspamc is not installed"
    timeout = 60

    @inlineCallbacks
    def test_rspamc_symbols_request(self) -> Any:
        """rspamc with envelope options sends a request with every header and repeated Rcpt."""
        from twisted.internet import reactor

        factory = _CaptureFactory()
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        address = port.getHost()
        assert isinstance(address, IPv4Address)
        path = self.mktemp()
        with open(path, "wb") as message:
            message.write(MESSAGE)
        code, out, _ = yield rspamc(
            reactor,
            [
                "-h",
                f"127.0.0.1:{address.port}",
                "-t",
                "10",
                "-i",
                "192.0.2.1",
                "-F",
                "s@example.com",
                "-r",
                "a@example.net",
                "-r",
                "b@example.net",
                "-u",
                "bob",
                "--helo",
                "mx.example.com",
                "--hostname",
                "mx.example.com",
                "-d",
                "a@example.net",
                "-p",
                "--header",
                "X-Custom=v1",
                "symbols",
                path,
            ],
        )
        request, data, end = yield factory.captured
        self.assertEqual(code, 0)
        self.assertIn(b"Action: reject", out)
        self.assertEqual(
            (request.method, request.target, request.version), ("POST", "/checkv2", "1.0")
        )
        self.assertIsNone(request.legacy)
        self.assertFalse(request.keep_alive)
        self.assertEqual(request.get_all("Rcpt"), ["a@example.net", "b@example.net"])
        expected = {
            "Content-Length": str(len(MESSAGE)),
            "User-Agent": "rspamc",
            "Ip": "192.0.2.1",
            "From": "s@example.com",
            "User": "bob",
            "Helo": "mx.example.com",
            "Hostname": "mx.example.com",
            "Deliver-To": "a@example.net",
            "X-Custom": "v1",
        }
        for name, value in expected.items():
            self.assertEqual(request.get(name), value, name)
        self.assertIn("pass_all", request.get("Flags") or "")
        self.assertEqual((data, end), (Data(MESSAGE), EndOfMessage()))
