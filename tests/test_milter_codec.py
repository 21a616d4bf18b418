"""Tests for rspamd_tx.protocols.milter_codec and milter_events."""

from __future__ import annotations

from typing import Callable

from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from rspamd_tx.protocols.milter_codec import (
    DEFAULT_MAX_MACROS, MilterConnection, MilterDecoder, MilterProtocolError,
    MilterUsageError, MtaDecoder, Stage, TRANSITIONS, negotiate,
)
from rspamd_tx.protocols.milter_events import (
    ACTION_CHGFROM, HTTP_PING_RESPONSE, MAX_PAYLOAD, NOREPLY_MASK, PROTO_NR_HDR,
    Abort, Accept, AddHeader, AddRecipient, AddRecipientWithArgs, BodyChunk,
    ChangeFrom, ChangeHeader, Command, Connect, ConnectionFail, Continue, Data,
    DeleteRecipient, Discard, EndOfHeaders, EndOfMessage, Header, Helo,
    HttpPing, InsertHeader, Macro, MailFrom, OptionNegotiation,
    OptionNegotiationReply, Progress, Quarantine, Quit, QuitNewConnection,
    RcptTo, Reject, ReplaceBody, ReplyCode, Response, ServerEvent, Skip, Tempfail,
    Unknown,
)
from tests.milter_frames import COMMAND_FRAMES, RESPONSE_FRAMES

FUZZ = settings(max_examples=300, deadline=None)
ROUND_TRIP = settings(max_examples=100, deadline=None)

POSTFIX_OFFER = OptionNegotiation(6, 0x1FF, 0x1FFFFF)


def raw(code: bytes, payload: bytes = b"") -> bytes:
    """A frame with a correct length field around any payload."""
    return (len(payload) + 1).to_bytes(4, "big") + code + payload


def decode_all(decoder: MilterDecoder | MtaDecoder, chunks: list[bytes]) -> list[object]:
    """Feed *chunks* one by one, draining events after each."""
    events: list[object] = []
    for chunk in chunks:
        decoder.feed(chunk)
        events.extend(decoder)
    return events


def negotiated() -> MilterConnection:
    """A connection that has received the Postfix offer and answered it."""
    connection = MilterConnection()
    connection.receive_data(POSTFIX_OFFER.encode())
    offer = connection.next_event()
    assert isinstance(offer, OptionNegotiation)
    connection.send(negotiate(offer))
    return connection


def feed_commands(connection: MilterConnection, *commands: Command) -> list[object]:
    """Send *commands* to *connection*; return the events it yields."""
    connection.receive_data(b"".join(command.encode() for command in commands))
    return list(connection)


class CommandTableTests(unittest.TestCase):
    """Every MTA command against its bytes."""

    def test_encode(self) -> None:
        """Each command encodes to its known frame."""
        for command, wire in COMMAND_FRAMES:
            self.assertEqual(command.encode(), wire, command)

    def test_decode(self) -> None:
        """Each known frame decodes to its command."""
        for command, wire in COMMAND_FRAMES:
            self.assertEqual(decode_all(MilterDecoder(), [wire]), [command], wire)

    def test_whole_conversation_in_one_read(self) -> None:
        """All frames arriving in one read decode in order."""
        wire = b"".join(frame for _, frame in COMMAND_FRAMES)
        self.assertEqual(decode_all(MilterDecoder(), [wire]),
                         [command for command, _ in COMMAND_FRAMES])

    def test_byte_by_byte(self) -> None:
        """Each frame fed one byte at a time decodes once, at its last byte."""
        for command, wire in COMMAND_FRAMES:
            decoder = MilterDecoder()
            for index in range(len(wire) - 1):
                decoder.feed(wire[index:index + 1])
                self.assertIsNone(decoder.next_event(), (command, index))
            decoder.feed(wire[-1:])
            self.assertEqual(decoder.next_event(), command)
            self.assertIsNone(decoder.next_event())

    def test_every_split_point(self) -> None:
        """Each frame split in two at every offset decodes to its command."""
        for command, wire in COMMAND_FRAMES:
            for cut in range(len(wire) + 1):
                events = decode_all(MilterDecoder(), [wire[:cut], wire[cut:]])
                self.assertEqual(events, [command], (command, cut))

    def test_split_across_frame_boundaries(self) -> None:
        """The conversation split at every offset still yields every command."""
        wire = b"".join(frame for _, frame in COMMAND_FRAMES)
        expected = [command for command, _ in COMMAND_FRAMES]
        for cut in range(len(wire) + 1):
            self.assertEqual(decode_all(MilterDecoder(), [wire[:cut], wire[cut:]]),
                             expected, cut)

    def test_frames_across_many_reads(self) -> None:
        """Body frames spanning several reads (headers split too) decode whole and in order."""
        chunks = [BodyChunk(bytes([65 + i]) * (1000 + i)) for i in range(5)]
        wire = b"".join(chunk.encode() for chunk in chunks)
        for size in (1, 3, 7, 333, 1004, 2500):
            decoder = MilterDecoder()
            events: list[ServerEvent] = []
            received = 0
            for start in range(0, len(wire), size):
                decoder.feed(wire[start:start + size])
                received = min(start + size, len(wire))
                events.extend(decoder)
                consumed = sum(5 + len(event.data) for event in events
                               if isinstance(event, BodyChunk))
                self.assertEqual(decoder.buffered, received - consumed, (size, received))
            self.assertEqual(events, chunks, size)

    def test_ignored_payloads(self) -> None:
        """Payload after A, N, Q, K and T is ignored, as Rspamd ignores it."""
        for code, command in ((b"A", Abort()), (b"N", EndOfHeaders()), (b"Q", Quit()),
                              (b"K", QuitNewConnection()), (b"T", Data())):
            self.assertEqual(decode_all(MilterDecoder(), [b"\x00\x00\x00\x03" + code + b"xy"]),
                             [command])

    def test_lenient_strings(self) -> None:
        """HELO, MAIL and unknown without their final NUL are taken as sent."""
        self.assertEqual(decode_all(MilterDecoder(), [b"\x00\x00\x00\x03Hab"]), [Helo(b"ab")])
        self.assertEqual(decode_all(MilterDecoder(), [b"\x00\x00\x00\x06M<a@b>"]),
                         [MailFrom(b"<a@b>")])
        self.assertEqual(decode_all(MilterDecoder(), [b"\x00\x00\x00\x04UXYZ"]),
                         [Unknown(b"XYZ")])

    def test_empty_macro(self) -> None:
        """An empty D payload is a macro command with no stage and no pairs."""
        self.assertEqual(decode_all(MilterDecoder(), [b"\x00\x00\x00\x01D"]), [Macro(b"")])

    def test_connect_ipv6_forms(self) -> None:
        """IPv6 connect addresses parse with or without prefix and brackets."""
        for text in (b"2001:db8::5", b"[2001:db8::5]", b"IPv6:2001:db8::5",
                     b"ipv6:[2001:db8::5]"):
            event = Connect(b"h", "6", 25, text)
            (decoded,) = decode_all(MilterDecoder(), [event.encode()])
            self.assertEqual(decoded, event)
            assert isinstance(decoded, Connect)
            self.assertEqual(str(decoded.ip_address), "2001:db8::5")

    def test_connect_ip_address(self) -> None:
        """A connect event exposes the parsed IPv4 address, None without one."""
        self.assertEqual(str(Connect(b"h", "4", 1, b"192.0.2.10").ip_address), "192.0.2.10")
        self.assertIsNone(Connect(b"h", "4", 1).ip_address)
        self.assertIsNone(Connect(b"h", "L", 0, b"/sock").ip_address)


class ResponseTableTests(unittest.TestCase):
    """Every filter response against its bytes."""

    def test_encode(self) -> None:
        """Each response encodes to its known frame."""
        for response, wire in RESPONSE_FRAMES:
            self.assertEqual(response.encode(), wire, response)

    def test_decode(self) -> None:
        """Each known frame decodes to its response on the MTA side."""
        for response, wire in RESPONSE_FRAMES:
            self.assertEqual(decode_all(MtaDecoder(), [wire]), [response], wire)

    def test_every_split_point(self) -> None:
        """Each response split at every offset and byte by byte decodes once."""
        for response, wire in RESPONSE_FRAMES:
            for cut in range(len(wire) + 1):
                self.assertEqual(decode_all(MtaDecoder(), [wire[:cut], wire[cut:]]),
                                 [response], (response, cut))
            self.assertEqual(
                decode_all(MtaDecoder(), [wire[i:i + 1] for i in range(len(wire))]),
                [response])

    def test_spec_add_header_sequence(self) -> None:
        """The observed add-header verdict of spec section 10 decodes in order."""
        wire = (b"\x00\x00\x00\x0dm\x00\x00\x00\x01X-Spam\0\0"
                b"\x00\x00\x00\x0dm\x00\x00\x00\x01X-Spam\0\0"
                b"\x00\x00\x00\x10m\x00\x00\x00\x01X-Spam\0Yes\0"
                b"\x00\x00\x00\x01a")
        self.assertEqual(decode_all(MtaDecoder(), [wire]),
                         [ChangeHeader(1, b"X-Spam", b""), ChangeHeader(1, b"X-Spam", b""),
                          ChangeHeader(1, b"X-Spam", b"Yes"), Accept()])

    def test_reply_code_text_verbatim(self) -> None:
        """Reply text is inserted verbatim: spaces and CRLF are not reformatted."""
        reply = ReplyCode(b"554", b"5.7.1", b"two  spaces\r\nand a line")
        self.assertEqual(reply.encode(),
                         b"\x00\x00\x00\x23y554 5.7.1 two  spaces\r\nand a line\0")

    def test_reply_code_without_text(self) -> None:
        """A reply code with only code and extended code decodes with empty text."""
        self.assertEqual(decode_all(MtaDecoder(), [b"\x00\x00\x00\x0by554 5.7.1\0"]),
                         [ReplyCode(b"554", b"5.7.1", b"")])


class EncodeValidationTests(unittest.TestCase):
    """Fields that cannot be put on the wire are refused when encoding."""

    def test_nul_in_string(self) -> None:
        """A NUL inside a NUL-terminated field raises ValueError."""
        for message in (AddHeader(b"X\0Y", b"v"), Helo(b"a\0b"), MailFrom(b"<a>", (b"A\0",)),
                        Quarantine(b"r\0"), Macro(b"C", ((b"n", b"v\0"),))):
            self.assertRaises(ValueError, message.encode)

    def test_bad_numbers(self) -> None:
        """Out-of-range integers and codes raise ValueError."""
        for message in (InsertHeader(-1, b"X", b"v"), ChangeHeader(2 ** 32, b"X", b"v"),
                        Connect(b"h", "4", 70000, b"192.0.2.1"), Connect(b"h", "X"),
                        ReplyCode(b"250", b"2.0.0", b"ok"), ReplyCode(b"554", b"", b"t"),
                        OptionNegotiation(2 ** 32, 0, 0)):
            self.assertRaises(ValueError, message.encode)


class MalformedInputTests(unittest.TestCase):
    """Malformed frames raise MilterProtocolError with a clear reason."""

    COMMANDS = [
        (b"\x00\x00\x00\x00A", "too short"),
        (raw(b"Z"), "Invalid command"),
        (raw(b"a"), "Invalid command"),
        (raw(b"O", b"\x00\x00\x00\x06\x00\x00\x00\x00"), "optneg"),
        (raw(b"C", b"h"), "no name"),
        (raw(b"C", b"h\0"), "no family"),
        (raw(b"C", b"h\0X"), "bad protocol"),
        (raw(b"C", b"h\x004\x01"), "no port"),
        (raw(b"C", b"h\x004\x00\x191.2.3.4"), "no zero terminated IP"),
        (raw(b"C", b"h\x004\x00\x191.2.3\0"), "bad IPv4"),
        (raw(b"C", b"h\x004\x00\x19\xff.2.3.4\0"), "bad IPv4"),
        (raw(b"C", b"h\x004\x00\x192001:db8::1\0"), "bad IPv4"),
        (raw(b"C", b"h\x006\x00\x19zz::\0"), "bad IPv6"),
        (raw(b"C", b"h\x006\x00\x19IPv6:\0"), "bad IPv6"),
        (raw(b"D", b"Cabc"), "name without value"),
        (raw(b"D", b"Cabc\0"), "name without value"),
        (raw(b"D", b"Cab\0cd"), "name without value"),
        (raw(b"L", b"Sub"), "no name"),
        (raw(b"L", b"Sub\0"), "bad value"),
        (raw(b"L", b"Sub\0va"), "bad value"),
    ]

    RESPONSES = [
        (raw(b"a", b"x"), "Accept"),
        (raw(b"Z"), "Invalid command"),
        (raw(b"y", b"554\0"), "extended code"),
        (raw(b"y", b"250 2.0.0 ok\0"), "SMTP code"),
        (raw(b"y", b"554 5.7.1"), "NUL-terminated"),
        (raw(b"h", b"X\0"), "add header"),
        (raw(b"i", b"\0\0"), "no index"),
        (raw(b"m", b"\0\0\0\x01X\0"), "change header"),
        (raw(b"O", b"\0\0\0\x06"), "optneg"),
        (raw(b"O", bytes(12) + b"\0\0\0"), "macro list"),
        (raw(b"O", bytes(12) + b"\0\0\0\x01x"), "macro list"),
        (raw(b"+", b"abc"), "add recipient"),
        (raw(b"-", b"a\0b\0"), "delete recipient"),
        (raw(b"e", b"a\0b\0c\0"), "change from"),
        (raw(b"q", b"a\0b"), "quarantine"),
    ]

    def test_commands(self) -> None:
        """Each malformed MTA command raises with its reason."""
        for wire, reason in self.COMMANDS:
            decoder = MilterDecoder()
            decoder.feed(wire)
            error = self.assertRaises(MilterProtocolError, decoder.next_event)
            self.assertIn(reason, error.reason, wire)

    def test_responses(self) -> None:
        """Each malformed filter response raises with its reason."""
        for wire, reason in self.RESPONSES:
            decoder = MtaDecoder()
            decoder.feed(wire)
            error = self.assertRaises(MilterProtocolError, decoder.next_event)
            self.assertIn(reason, error.reason, wire)

    def test_error_is_sticky(self) -> None:
        """After an error the decoder drops input and raises again."""
        decoder = MilterDecoder()
        decoder.feed(b"\x00\x00\x00\x01Z")
        first = self.assertRaises(MilterProtocolError, decoder.next_event)
        decoder.feed(Quit().encode())
        self.assertEqual(decoder.buffered, 0)
        second = self.assertRaises(MilterProtocolError, decoder.next_event)
        self.assertIs(first, second)

    def test_events_before_error_delivered(self) -> None:
        """Complete commands before a bad frame are delivered first."""
        decoder = MilterDecoder()
        decoder.feed(Helo(b"a").encode() + b"\x00\x00\x00\x01Z")
        self.assertEqual(decoder.next_event(), Helo(b"a"))
        self.assertRaises(MilterProtocolError, decoder.next_event)


class BoundsTests(unittest.TestCase):
    """Bounds are enforced before anything is allocated."""

    def test_oversized_length_refused_before_payload(self) -> None:
        """A length above the bound raises as soon as the header is in."""
        decoder = MilterDecoder()
        decoder.feed((MAX_PAYLOAD + 2).to_bytes(4, "big") + b"B")
        error = self.assertRaises(MilterProtocolError, decoder.next_event)
        self.assertEqual(error.reason, f"Command length is too big: {MAX_PAYLOAD + 1}")
        decoder.feed(b"x" * 1000)
        self.assertEqual(decoder.buffered, 0)

    def test_oversized_frame_not_buffered_by_feed(self) -> None:
        """feed() drops an oversized frame without waiting for next_event()."""
        decoder = MilterDecoder(max_frame=16)
        decoder.feed(b"\x00\x00\x01\x00B" + b"x" * 100)
        decoder.feed(b"x" * 100)
        self.assertEqual(decoder.buffered, 0)
        self.assertRaises(MilterProtocolError, decoder.next_event)

    def test_largest_frame_accepted(self) -> None:
        """A payload of exactly the bound (Rspamd: 131072 bytes) is accepted."""
        chunk = BodyChunk(b"x" * MAX_PAYLOAD)
        self.assertEqual(decode_all(MilterDecoder(), [chunk.encode()]), [chunk])

    def test_custom_frame_bound(self) -> None:
        """max_frame bounds the payload after the command byte."""
        decoder = MilterDecoder(max_frame=4)
        self.assertEqual(decode_all(decoder, [BodyChunk(b"1234").encode()]),
                         [BodyChunk(b"1234")])
        decoder.feed(BodyChunk(b"12345").encode())
        self.assertRaises(MilterProtocolError, decoder.next_event)

    def test_too_many_macros(self) -> None:
        """A D command with more pairs than max_macros is refused."""
        pairs = tuple((b"m%d" % i, b"v") for i in range(DEFAULT_MAX_MACROS + 1))
        decoder = MilterDecoder()
        decoder.feed(Macro(b"C", pairs).encode())
        error = self.assertRaises(MilterProtocolError, decoder.next_event)
        self.assertIn("more than", error.reason)
        self.assertEqual(decode_all(MilterDecoder(), [Macro(b"C", pairs[:-1]).encode()]),
                         [Macro(b"C", pairs[:-1])])

    def test_too_many_esmtp_args(self) -> None:
        """An M command with more strings than max_args is refused."""
        decoder = MilterDecoder(max_args=3)
        decoder.feed(MailFrom(b"<a@b>", (b"A", b"B", b"C")).encode())
        self.assertRaises(MilterProtocolError, decoder.next_event)

    def test_too_many_headers(self) -> None:
        """More headers in one message than max_headers are refused."""
        connection = MilterConnection(max_headers=2)
        connection.receive_data(POSTFIX_OFFER.encode())
        connection.send(negotiate(POSTFIX_OFFER)) if connection.next_event() else None
        header = Header(b"X", b"y")
        connection.receive_data(b"".join(c.encode() for c in (
            Connect(b"h", "U"), MailFrom(b"<a@b>"), RcptTo(b"<c@d>"), Data(),
            header, header, header)))
        self.assertEqual(connection.next_event(), Connect(b"h", "U"))
        for _ in range(5):
            connection.next_event()
        error = self.assertRaises(MilterProtocolError, connection.next_event)
        self.assertIn("too many headers", error.reason)

    def test_too_many_macro_names(self) -> None:
        """More distinct macro names per connection than allowed are refused."""
        connection = MilterConnection(max_macro_names=2)
        connection.receive_data(POSTFIX_OFFER.encode())
        self.assertEqual(connection.next_event(), POSTFIX_OFFER)
        connection.send(negotiate(POSTFIX_OFFER))
        connection.receive_data(Macro(b"C", ((b"a", b"1"), (b"A", b"2"))).encode()
                                + Macro(b"H", ((b"b", b"1"),)).encode()
                                + Macro(b"M", ((b"c", b"1"),)).encode())
        self.assertIsNotNone(connection.next_event())
        self.assertIsNotNone(connection.next_event())
        error = self.assertRaises(MilterProtocolError, connection.next_event)
        self.assertIn("too many macros", error.reason)

    def test_quit_new_connection_resets_macro_names(self) -> None:
        """K forgets the macro names counted for the previous SMTP connection."""
        connection = MilterConnection(max_macro_names=1)
        connection.receive_data(POSTFIX_OFFER.encode())
        connection.next_event()
        connection.send(negotiate(POSTFIX_OFFER))
        events = feed_commands(connection, Macro(b"C", ((b"a", b"1"),)), QuitNewConnection(),
                               Macro(b"C", ((b"b", b"1"),)))
        self.assertEqual(len(events), 3)

    def test_body_accounting(self) -> None:
        """body_size counts body bytes of the current message only."""
        connection = negotiated()
        feed_commands(connection, Connect(b"h", "U"), MailFrom(b"<a@b>"), RcptTo(b"<c@d>"),
                      Data(), EndOfHeaders(), BodyChunk(b"x" * 1000), BodyChunk(b"y" * 24))
        self.assertEqual(connection.body_size, 1024)
        feed_commands(connection, EndOfMessage())
        connection.send(Accept())
        self.assertEqual(connection.body_size, 0)


class HttpPingTests(unittest.TestCase):
    """Rspamd's HTTP health check on the milter port."""

    def test_ping(self) -> None:
        """GET /ping yields HttpPing, whose response is Rspamd's fixed reply."""
        decoder = MilterDecoder()
        decoder.feed(b"GET /ping HTTP/1.1\r\nHost: mx\r\n\r\n")
        event = decoder.next_event()
        self.assertEqual(event, HttpPing())
        self.assertEqual(HttpPing.response, HTTP_PING_RESPONSE)
        self.assertTrue(HTTP_PING_RESPONSE.endswith(b"Content-Length: 6\r\n"
                                                    b"Content-Type: text/plain\r\n\r\npong\r\n\0"))
        self.assertIsNone(decoder.next_event())

    def test_ping_split(self) -> None:
        """The request line may arrive in pieces; the event waits for its end."""
        decoder = MilterDecoder()
        for piece in (b"GE", b"T /pi", b"ng HTTP/1.0"):
            decoder.feed(piece)
            self.assertIsNone(decoder.next_event())
        decoder.feed(b"\r\n")
        self.assertEqual(decoder.next_event(), HttpPing())

    def test_ping_case_insensitive(self) -> None:
        """The /ping path is compared case-insensitively."""
        self.assertEqual(decode_all(MilterDecoder(), [b"GET /PiNg HTTP/1.1\r\n"]), [HttpPing()])

    def test_ping_through_connection(self) -> None:
        """MilterConnection passes the ping through without a stage change."""
        connection = MilterConnection()
        connection.receive_data(b"GET /ping HTTP/1.1\r\n\r\n")
        self.assertEqual(connection.next_event(), HttpPing())
        self.assertEqual(connection.stage, Stage.INIT)

    def test_other_requests_refused(self) -> None:
        """Other GET paths, POST and overlong lines raise."""
        for wire, reason in ((b"GET /status HTTP/1.1\r\n", "url: /status"),
                             (b"GET /ping?x=1 HTTP/1.1\r\n", "url: /ping?x=1"),
                             (b"POST /checkv2 HTTP/1.1\r\n", "POST"),
                             (b"GET /" + b"x" * 5000, "too long")):
            decoder = MilterDecoder()
            decoder.feed(wire)
            error = self.assertRaises(MilterProtocolError, decoder.next_event)
            self.assertIn(reason, error.reason)

    def test_request_line_bound_in_feed(self) -> None:
        """An HTTP line longer than max_http_line is dropped while it arrives."""
        decoder = MilterDecoder(max_http_line=16)
        decoder.feed(b"GET /" + b"x" * 100)
        decoder.feed(b"x" * 100)
        self.assertEqual(decoder.buffered, 0)
        self.assertRaises(MilterProtocolError, decoder.next_event)

    def test_mta_side_has_no_ping(self) -> None:
        """The MTA-side decoder treats GET as an oversized frame."""
        decoder = MtaDecoder(max_frame=1024)
        decoder.feed(b"GET /ping HTTP/1.1\r\n")
        error = self.assertRaises(MilterProtocolError, decoder.next_event)
        self.assertIn("too big", error.reason)


class NegotiationTests(unittest.TestCase):
    """Option negotiation exactly as Rspamd answers it."""

    def test_postfix_offer(self) -> None:
        """The observed Postfix offer gets the observed reply bytes."""
        self.assertEqual(negotiate(POSTFIX_OFFER).encode(),
                         bytes.fromhex("0000000d4f00000006000001ff000ff080"))

    def test_actions_ored(self) -> None:
        """Rspamd's six action bits are added; offered bits such as CHGFROM stay."""
        self.assertEqual(negotiate(OptionNegotiation(6, 0, 0)).actions, 0x3F)
        self.assertEqual(negotiate(OptionNegotiation(6, ACTION_CHGFROM, 0)).actions, 0x7F)

    def test_protocol_fixed(self) -> None:
        """The protocol word is fixed to the no-reply mask, whatever was offered."""
        for offered in (0, 0x1FFFFF, 0xFFFFFFFF, 0x400):
            reply = negotiate(OptionNegotiation(6, 0x1FF, offered))
            self.assertEqual(reply.protocol, NOREPLY_MASK)
            self.assertEqual(reply.protocol, 0x000FF080)

    def test_newer_version_answered_with_six(self) -> None:
        """An MTA offering a newer version is answered with version 6."""
        self.assertEqual(negotiate(OptionNegotiation(7, 0, 0)).version, 6)

    def test_old_version_refused(self) -> None:
        """Version 2 is refused by negotiate()."""
        error = self.assertRaises(MilterProtocolError, negotiate, OptionNegotiation(2, 0x1FF, 0))
        self.assertEqual(error.reason, "invalid protocol version: 2")

    def test_old_version_refused_by_connection(self) -> None:
        """A connection refuses a version-2 offer and stays failed."""
        connection = MilterConnection()
        connection.receive_data(OptionNegotiation(2, 0x1FF, 0).encode())
        self.assertRaises(MilterProtocolError, connection.next_event)
        self.assertRaises(MilterProtocolError, connection.next_event)

    def test_no_macros_requested(self) -> None:
        """Rspamd requests no macros in its reply."""
        self.assertEqual(negotiate(POSTFIX_OFFER).macros, ())


#: A sample of each command class, for driving the stage table.
SAMPLES: dict[type, Command] = {
    OptionNegotiation: POSTFIX_OFFER, Connect: Connect(b"h", "4", 25, b"192.0.2.1"),
    Helo: Helo(b"h"), MailFrom: MailFrom(b"<a@b>"), RcptTo: RcptTo(b"<c@d>"),
    Macro: Macro(b"C", ((b"i", b"Q1"),)), Header: Header(b"Subject", b"s"),
    EndOfHeaders: EndOfHeaders(), BodyChunk: BodyChunk(b"b"), EndOfMessage: EndOfMessage(),
    Abort: Abort(), Quit: Quit(), QuitNewConnection: QuitNewConnection(),
    Unknown: Unknown(b"XCMD"), Data: Data(),
}

#: Commands that lead from a fresh negotiated connection to each stage.
PATHS: dict[Stage, list[type]] = {
    Stage.OPTIONS: [],
    Stage.CONNECTED: [Connect],
    Stage.HELO: [Connect, Helo],
    Stage.MAIL: [Connect, Helo, MailFrom],
    Stage.RCPT: [Connect, Helo, MailFrom, RcptTo],
    Stage.DATA: [Connect, Helo, MailFrom, RcptTo, Data],
    Stage.HEADERS: [Connect, Helo, MailFrom, RcptTo, Data, Header],
    Stage.EOH: [Connect, Helo, MailFrom, RcptTo, Data, Header, EndOfHeaders],
    Stage.BODY: [Connect, Helo, MailFrom, RcptTo, Data, Header, EndOfHeaders, BodyChunk],
    Stage.EOM: [Connect, Helo, MailFrom, RcptTo, Data, Header, EndOfHeaders, BodyChunk,
                EndOfMessage],
    Stage.CLOSED: [Quit],
}

_ANYTIME = {Macro, Abort, QuitNewConnection, Quit}
#: Legal commands per stage, written out independently of TRANSITIONS.
LEGAL: dict[Stage, set[type]] = {
    Stage.INIT: {OptionNegotiation, Quit},
    Stage.OPTIONS: _ANYTIME | {Connect},
    Stage.CONNECTED: _ANYTIME | {Helo, MailFrom, Unknown},
    Stage.HELO: _ANYTIME | {Helo, MailFrom, Unknown},
    Stage.MAIL: _ANYTIME | {RcptTo, Unknown},
    Stage.RCPT: _ANYTIME | {RcptTo, Data, Unknown},
    Stage.DATA: _ANYTIME | {Header, EndOfHeaders},
    Stage.HEADERS: _ANYTIME | {Header, EndOfHeaders},
    Stage.EOH: _ANYTIME | {BodyChunk, EndOfMessage},
    Stage.BODY: _ANYTIME | {BodyChunk, EndOfMessage},
    Stage.EOM: {Abort, QuitNewConnection, Quit},
    Stage.CLOSED: set(),
}


def at_stage(stage: Stage) -> MilterConnection:
    """A connection driven to *stage* through legal commands."""
    if stage is Stage.INIT:
        return MilterConnection()
    connection = negotiated()
    feed_commands(connection, *(SAMPLES[kind] for kind in PATHS[stage]))
    assert connection.stage is stage, (connection.stage, stage)
    return connection


class StageTableTests(unittest.TestCase):
    """The command order the MTA must follow."""

    def test_two_messages(self) -> None:
        """A full conversation with two messages, an abort and K is legal."""
        connection = MilterConnection()
        connection.receive_data(b"".join(frame for _, frame in COMMAND_FRAMES[:1]))
        (offer,) = list(connection)
        self.assertEqual(connection.stage, Stage.OPTIONS)
        self.assertEqual(connection.reply_owed, offer)
        connection.send(negotiate(POSTFIX_OFFER))
        self.assertIsNone(connection.reply_owed)
        first = [command for command, _ in COMMAND_FRAMES[1:13]]
        self.assertEqual(feed_commands(connection, *first), first)
        self.assertEqual(connection.stage, Stage.EOM)
        self.assertEqual(connection.header_count, 2)
        connection.send(ChangeHeader(1, b"X-Spam", b""))
        connection.send(ChangeHeader(1, b"X-Spam", b"Yes"))
        connection.send(Accept())
        self.assertEqual((connection.stage, connection.messages), (Stage.HELO, 1))
        second: list[Command] = [
            Macro(b"M", ((b"i", b"Q2"),)), MailFrom(b"<x@y>"), RcptTo(b"<1@z>"),
            Abort(), MailFrom(b"<x@y>"), RcptTo(b"<1@z>"), RcptTo(b"<2@z>"),
            Unknown(b"XFOO"), Data(), EndOfHeaders(), EndOfMessage()]
        self.assertEqual(feed_commands(connection, *second), second)
        self.assertEqual(connection.send(ReplyCode(b"554", b"5.7.1", b"no")),
                         b"\x00\x00\x00\x0ey554 5.7.1 no\0")
        third: list[Command] = [QuitNewConnection(), Connect(b"h2", "U"), Helo(b"h2"), Quit()]
        self.assertEqual(feed_commands(connection, *third), third)
        self.assertEqual((connection.stage, connection.messages), (Stage.CLOSED, 2))

    def test_table_matches_legal_sets(self) -> None:
        """TRANSITIONS allows exactly the commands listed as legal here."""
        for stage in Stage:
            self.assertEqual(set(TRANSITIONS[stage]), LEGAL[stage], stage)

    def test_every_illegal_transition_raises(self) -> None:
        """Every command not legal at a stage raises MilterProtocolError."""
        for stage in Stage:
            for kind, sample in SAMPLES.items():
                if kind in LEGAL[stage]:
                    continue
                connection = at_stage(stage)
                if stage is Stage.EOM and kind is not OptionNegotiation:
                    connection.send(Progress())
                connection.receive_data(sample.encode())
                error = self.assertRaises(MilterProtocolError, connection.next_event)
                self.assertTrue(error.reason, (stage, kind))

    def test_every_legal_transition_accepted(self) -> None:
        """Every legal command at a stage is accepted and moves as the table says."""
        for stage in Stage:
            for kind in LEGAL[stage]:
                connection = at_stage(stage)
                connection.receive_data(SAMPLES[kind].encode())
                self.assertEqual(connection.next_event(), SAMPLES[kind], (stage, kind))
                self.assertEqual(connection.stage, TRANSITIONS[stage][kind], (stage, kind))

    def test_optneg_must_come_first(self) -> None:
        """A connect before negotiation is refused with a clear reason."""
        connection = MilterConnection()
        connection.receive_data(SAMPLES[Connect].encode())
        error = self.assertRaises(MilterProtocolError, connection.next_event)
        self.assertEqual(error.reason, "Connect out of order at stage init")

    def test_command_before_negotiation_reply(self) -> None:
        """The MTA may not send C before the negotiation reply was sent."""
        connection = MilterConnection()
        connection.receive_data(POSTFIX_OFFER.encode() + SAMPLES[Connect].encode())
        connection.next_event()
        error = self.assertRaises(MilterProtocolError, connection.next_event)
        self.assertIn("owed", error.reason)

    def test_abort_keeps_connection_stage(self) -> None:
        """A before HELO keeps the connected stage; inside a message returns to HELO."""
        self.assertEqual(feed_commands(at_stage(Stage.CONNECTED), Abort()), [Abort()])
        connection = at_stage(Stage.CONNECTED)
        feed_commands(connection, Abort())
        self.assertEqual(connection.stage, Stage.CONNECTED)
        connection = at_stage(Stage.BODY)
        feed_commands(connection, Abort())
        self.assertEqual((connection.stage, connection.body_size), (Stage.HELO, 0))

    def test_abort_during_verdict(self) -> None:
        """A while the verdict is owed drops the owed reply."""
        connection = at_stage(Stage.EOM)
        feed_commands(connection, Abort())
        self.assertIsNone(connection.reply_owed)
        self.assertRaises(MilterUsageError, connection.send, Accept())

    def test_failed_connection_stays_failed(self) -> None:
        """After an ordering error every call raises the same error."""
        connection = MilterConnection()
        connection.receive_data(Helo(b"x").encode())
        first = self.assertRaises(MilterProtocolError, connection.next_event)
        connection.receive_data(POSTFIX_OFFER.encode())
        self.assertIs(self.assertRaises(MilterProtocolError, connection.next_event), first)


class SendTests(unittest.TestCase):
    """Responses are sent only when the MTA waits for them."""

    MODIFICATIONS: list[Response] = [
        AddHeader(b"X", b"1"), InsertHeader(1, b"X", b"1"), ChangeHeader(1, b"X", b""),
        ReplaceBody(b"b"), ChangeFrom(b"<a@b>"), AddRecipient(b"<a@b>"),
        DeleteRecipient(b"<a@b>"), AddRecipientWithArgs(b"<a@b>", b"A=B"),
        Quarantine(b"q"), Progress()]
    VERDICTS: list[Response] = [Accept(), Continue(), Reject(), Tempfail(), Discard(),
                                ReplyCode(b"451", b"4.7.1", b"later"), ConnectionFail()]

    def test_modifications_during_verdict(self) -> None:
        """Modifications and progress are accepted while the verdict is owed."""
        connection = at_stage(Stage.EOM)
        for response in self.MODIFICATIONS:
            self.assertEqual(connection.send(response), response.encode())
        self.assertEqual(connection.stage, Stage.EOM)

    def test_modifications_outside_verdict(self) -> None:
        """Modifications outside the end-of-message reply are refused."""
        for stage in (Stage.OPTIONS, Stage.BODY, Stage.HELO):
            for response in self.MODIFICATIONS:
                self.assertRaises(MilterUsageError, at_stage(stage).send, response)

    def test_each_verdict_ends_message(self) -> None:
        """Every verdict ends the message and returns to the HELO stage."""
        for response in self.VERDICTS:
            connection = at_stage(Stage.EOM)
            connection.send(response)
            self.assertEqual((connection.stage, connection.messages), (Stage.HELO, 1))

    def test_verdict_without_question(self) -> None:
        """A verdict when nothing is owed is refused."""
        for response in self.VERDICTS:
            self.assertRaises(MilterUsageError, at_stage(Stage.RCPT).send, response)

    def test_negotiation_reply_once(self) -> None:
        """The negotiation reply answers one offer only."""
        connection = negotiated()
        self.assertRaises(MilterUsageError, connection.send, negotiate(POSTFIX_OFFER))

    def test_verdict_before_negotiation_reply(self) -> None:
        """A verdict cannot answer the negotiation offer."""
        connection = MilterConnection()
        connection.receive_data(POSTFIX_OFFER.encode())
        connection.next_event()
        self.assertRaises(MilterUsageError, connection.send, Accept())

    def test_replies_owed_without_no_reply_flags(self) -> None:
        """Without NR_HDR negotiated, each header waits for a reply."""
        connection = MilterConnection()
        connection.receive_data(POSTFIX_OFFER.encode())
        connection.next_event()
        connection.send(OptionNegotiationReply(6, 0x3F, NOREPLY_MASK & ~PROTO_NR_HDR))
        header = Header(b"X", b"1")
        feed_commands(connection, *(SAMPLES[kind] for kind in PATHS[Stage.DATA]))
        connection.receive_data(header.encode() + header.encode())
        self.assertEqual(connection.next_event(), header)
        self.assertEqual(connection.reply_owed, header)
        self.assertRaises(MilterProtocolError, connection.next_event)

    def test_continue_answers_stage(self) -> None:
        """Continue answers a stage reply and lets the next command in."""
        connection = MilterConnection()
        connection.receive_data(POSTFIX_OFFER.encode())
        connection.next_event()
        connection.send(OptionNegotiationReply(6, 0x3F, NOREPLY_MASK & ~PROTO_NR_HDR))
        feed_commands(connection, *(SAMPLES[kind] for kind in PATHS[Stage.DATA]))
        connection.receive_data(Header(b"X", b"1").encode() + EndOfHeaders().encode())
        connection.next_event()
        self.assertEqual(connection.send(Continue()), b"\x00\x00\x00\x01c")
        self.assertEqual(connection.next_event(), EndOfHeaders())
        self.assertEqual(connection.stage, Stage.EOH)

    def test_skip_answers_body_chunk(self) -> None:
        """Skip answers a body chunk when body chunks expect replies, not otherwise."""
        connection = MilterConnection()
        connection.receive_data(POSTFIX_OFFER.encode())
        connection.next_event()
        self.assertRaises(MilterUsageError, connection.send, Skip())
        connection.send(OptionNegotiationReply(6, 0x3F, 0))
        for kind in PATHS[Stage.BODY][:-1]:
            feed_commands(connection, SAMPLES[kind])
            if connection.reply_owed is not None:
                connection.send(Continue())
        feed_commands(connection, BodyChunk(b"x"))
        self.assertEqual(connection.send(Skip()), b"\x00\x00\x00\x01s")
        self.assertIsNone(connection.reply_owed)


# ---------------------------------------------------------------------------
# Property tests
# ---------------------------------------------------------------------------

cstr = st.binary(max_size=40).map(lambda value: value.replace(b"\0", b"."))
u32 = st.integers(0, 2 ** 32 - 1)
ipv4 = st.ip_addresses(v=4).map(lambda ip: str(ip).encode())
ipv6 = st.ip_addresses(v=6).map(lambda ip: str(ip).encode())

COMMANDS: st.SearchStrategy[Command] = st.one_of(
    st.builds(OptionNegotiation, u32, u32, u32),
    st.builds(Connect, cstr, st.just("U")),
    st.builds(Connect, cstr, st.just("L"), st.integers(0, 65535), st.none() | cstr),
    st.builds(Connect, cstr, st.just("4"), st.integers(0, 65535), st.none() | ipv4),
    st.builds(Connect, cstr, st.just("6"), st.integers(0, 65535), st.none() | ipv6),
    st.builds(Helo, cstr),
    st.builds(MailFrom, cstr, st.lists(cstr, max_size=5).map(tuple)),
    st.builds(RcptTo, cstr, st.lists(cstr, max_size=5).map(tuple)),
    st.builds(Macro, st.binary(min_size=1, max_size=1),
              st.lists(st.tuples(cstr, cstr), max_size=8).map(tuple)),
    st.builds(Header, cstr, st.binary(max_size=60)),
    st.builds(BodyChunk, st.binary(max_size=200)),
    st.builds(EndOfMessage, st.binary(max_size=20)),
    st.builds(Unknown, cstr),
    st.sampled_from([EndOfHeaders(), Abort(), Quit(), QuitNewConnection(), Data()]),
)

RESPONSES: st.SearchStrategy[Response] = st.one_of(
    st.sampled_from([Accept(), Continue(), Reject(), Tempfail(), Discard(), Progress(),
                     Skip(), ConnectionFail()]),
    st.builds(ReplyCode, st.from_regex(rb"\A[45][0-9]{2}\Z"),
              st.from_regex(rb"\A[245]\.[0-9]{1,3}\.[0-9]{1,3}\Z"), cstr),
    st.builds(AddHeader, cstr, cstr),
    st.builds(InsertHeader, u32, cstr, cstr),
    st.builds(ChangeHeader, u32, cstr, cstr),
    st.builds(ReplaceBody, st.binary(max_size=200)),
    st.builds(ChangeFrom, cstr, st.none() | cstr),
    st.builds(AddRecipient, cstr),
    st.builds(DeleteRecipient, cstr),
    st.builds(AddRecipientWithArgs, cstr, st.none() | cstr),
    st.builds(Quarantine, cstr),
    st.builds(OptionNegotiationReply, u32, u32, u32,
              st.lists(st.tuples(u32, cstr), max_size=4).map(tuple)),
)


class PropertyTests(unittest.TestCase):
    """Round trips and fuzzing."""

    @ROUND_TRIP
    @given(st.lists(COMMANDS, min_size=1, max_size=6), st.data())
    def test_command_round_trip(self, commands: list[Command], data: st.DataObject) -> None:
        """Encoded commands, cut anywhere, decode back to themselves."""
        wire = b"".join(command.encode() for command in commands)
        cut = data.draw(st.integers(0, len(wire)))
        self.assertEqual(decode_all(MilterDecoder(), [wire[:cut], wire[cut:]]), commands)

    @ROUND_TRIP
    @given(st.lists(RESPONSES, min_size=1, max_size=6), st.data())
    def test_response_round_trip(self, responses: list[Response], data: st.DataObject) -> None:
        """Encoded responses, cut anywhere, decode back to themselves."""
        wire = b"".join(response.encode() for response in responses)
        cut = data.draw(st.integers(0, len(wire)))
        self.assertEqual(decode_all(MtaDecoder(), [wire[:cut], wire[cut:]]), responses)

    def _fuzz(self, make: Callable[[], MilterDecoder | MtaDecoder], chunks: list[bytes]) -> None:
        """Decode *chunks*; only MilterProtocolError may escape, and every
        decoded event must re-encode to bytes that decode to itself."""
        decoder = make()
        events: list[object] = []
        try:
            for chunk in chunks:
                decoder.feed(chunk)
                events.extend(decoder)
        except MilterProtocolError as error:
            self.assertIsInstance(error.reason, str)
        for event in events:
            if isinstance(event, HttpPing):
                continue
            wire = event.encode()  # type: ignore[attr-defined]
            self.assertEqual(decode_all(make(), [wire]), [event])

    @FUZZ
    @given(st.lists(st.binary(max_size=64), max_size=8))
    def test_fuzz_server_decoder(self, chunks: list[bytes]) -> None:
        """Random bytes make the command decoder raise only MilterProtocolError."""
        self._fuzz(lambda: MilterDecoder(max_frame=1024), chunks)

    @FUZZ
    @given(st.sampled_from(b"OCHMRDLNBEAQKUT"), st.binary(max_size=80))
    def test_fuzz_command_payloads(self, code: int, payload: bytes) -> None:
        """Random payloads behind every valid command byte raise only MilterProtocolError."""
        self._fuzz(MilterDecoder,
                   [(len(payload) + 1).to_bytes(4, "big") + bytes([code]) + payload])

    @FUZZ
    @given(st.sampled_from(b"acrtdpsfyhimbe+-2qO"), st.binary(max_size=80))
    def test_fuzz_response_payloads(self, code: int, payload: bytes) -> None:
        """Random payloads behind every response byte raise only MilterProtocolError."""
        self._fuzz(MtaDecoder, [(len(payload) + 1).to_bytes(4, "big") + bytes([code]) + payload])

    @FUZZ
    @given(st.lists(st.binary(max_size=64), max_size=8))
    def test_fuzz_mta_decoder(self, chunks: list[bytes]) -> None:
        """Random bytes make the response decoder raise only MilterProtocolError."""
        self._fuzz(lambda: MtaDecoder(max_frame=1024), chunks)

    @FUZZ
    @given(st.lists(COMMANDS, max_size=12), st.lists(RESPONSES, max_size=4))
    def test_fuzz_connection(self, commands: list[Command], responses: list[Response]) -> None:
        """Random command sequences raise only MilterProtocolError; sends only MilterUsageError."""
        connection = MilterConnection()
        connection.receive_data(b"".join(command.encode() for command in commands))
        try:
            for event in connection:
                for response in responses:
                    try:
                        connection.send(response)
                    except MilterUsageError:
                        pass
                self.assertIsNotNone(event)
        except MilterProtocolError as error:
            self.assertIsInstance(error.reason, str)
