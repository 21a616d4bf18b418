"""Milter v6 frames as bytes on the wire, paired with their decoded events.

The byte strings are written out by hand: those marked *observed* in
``/work/shared/spec/milter.md`` were captured from a real Rspamd 3.4 proxy
talking to an MTA; the others follow the Sendmail milter protocol layout.
Shared by the codec tests and anything else that needs known-good frames.
"""

from __future__ import annotations

from rspamd_tx.protocols.milter_events import (
    Abort, Accept, AddHeader, AddRecipient, AddRecipientWithArgs, BodyChunk,
    ChangeFrom, ChangeHeader, Command, Connect, ConnectionFail, Continue, Data,
    DeleteRecipient, Discard, EndOfHeaders, EndOfMessage, Header, Helo,
    InsertHeader, Macro, MailFrom, OptionNegotiation, OptionNegotiationReply,
    Progress, Quarantine, Quit, QuitNewConnection, RcptTo, Reject, ReplaceBody,
    ReplyCode, Response, Skip, Tempfail, Unknown,
)

#: (command, frame) for every MTA command; the first thirteen are the
#: complete example conversation of spec section 10, in order.
COMMAND_FRAMES: list[tuple[Command, bytes]] = [
    (OptionNegotiation(6, 0x1FF, 0x1FFFFF),
     bytes.fromhex("0000000d4f" "00000006" "000001ff" "001fffff")),
    (Macro(b"C", ((b"j", b"mx.example.org"), (b"{daemon_name}", b"mx.example.org"))),
     b"\x00\x00\x00\x30DCj\0mx.example.org\0{daemon_name}\0mx.example.org\0"),
    (Connect(b"client.example.net", "4", 45678, b"192.0.2.10"),
     b"\x00\x00\x00\x22Cclient.example.net\x004\xb2\x6e192.0.2.10\0"),
    (Helo(b"client.example.net"),
     b"\x00\x00\x00\x14Hclient.example.net\0"),
    (Macro(b"M", ((b"i", b"ABCDEF1234"),)),
     b"\x00\x00\x00\x0fDMi\0ABCDEF1234\0"),
    (MailFrom(b"<sender@example.net>", (b"SIZE=123",)),
     b"\x00\x00\x00\x1fM<sender@example.net>\0SIZE=123\0"),
    (RcptTo(b"<rcpt@example.org>"),
     b"\x00\x00\x00\x14R<rcpt@example.org>\0"),
    (Data(), b"\x00\x00\x00\x01T"),
    (Header(b"Subject", b"hello"), b"\x00\x00\x00\x0fLSubject\0hello\0"),
    (Header(b"X-Spam", b"yes"), b"\x00\x00\x00\x0cLX-Spam\0yes\0"),
    (EndOfHeaders(), b"\x00\x00\x00\x01N"),
    (BodyChunk(b"Hello world\r\n"), b"\x00\x00\x00\x0eBHello world\r\n"),
    (EndOfMessage(), b"\x00\x00\x00\x01E"),
    (Abort(), b"\x00\x00\x00\x01A"),
    (Quit(), b"\x00\x00\x00\x01Q"),
    (QuitNewConnection(), b"\x00\x00\x00\x01K"),
    (Unknown(b"XFOO bar"), b"\x00\x00\x00\x0aUXFOO bar\0"),
    (Connect(b"unknown", "U"), b"\x00\x00\x00\x0aCunknown\0U"),
    (Connect(b"[2001:db8::5]", "6", 25, b"IPv6:2001:db8::5"),
     b"\x00\x00\x00\x23C[2001:db8::5]\x006\x00\x19IPv6:2001:db8::5\0"),
    (Connect(b"localhost", "L", 0, b"/run/smtp.sock"),
     b"\x00\x00\x00\x1dClocalhost\0L\x00\x00/run/smtp.sock\0"),
    (Connect(b"host", "4", 587), b"\x00\x00\x00\x09Chost\x004\x02\x4b"),
    (RcptTo(b"<b@example.org>", (b"NOTIFY=NEVER", b"ORCPT=rfc822;b@example.org")),
     b"\x00\x00\x00\x39R<b@example.org>\0NOTIFY=NEVER\0ORCPT=rfc822;b@example.org\0"),
    (EndOfMessage(b"tail"), b"\x00\x00\x00\x05Etail"),
]

#: (response, frame) for every filter response.
RESPONSE_FRAMES: list[tuple[Response, bytes]] = [
    (OptionNegotiationReply(6, 0x1FF, 0x000FF080),
     bytes.fromhex("0000000d4f" "00000006" "000001ff" "000ff080")),
    (AddHeader(b"X-Test", b"1"), bytes.fromhex("0000000a68582d5465737400" "3100")),
    (InsertHeader(0, b"X-B", b"b0"),
     bytes.fromhex("0000000c69" "00000000" "582d4200" "623000")),
    (ChangeHeader(1, b"X-Spam", b""),
     bytes.fromhex("0000000d6d" "00000001" "582d5370616d00" "00")),
    (ChangeHeader(1, b"X-Spam", b"Yes"), b"\x00\x00\x00\x10m\x00\x00\x00\x01X-Spam\0Yes\0"),
    (ChangeFrom(b"<new@example.net>"), b"\x00\x00\x00\x13e<new@example.net>\0"),
    (ReplyCode(b"554", b"5.7.1", b"Gtube pattern"),
     b"\x00\x00\x00\x19y554 5.7.1 Gtube pattern\0"),
    (ReplyCode(b"451", b"4.7.1", b"Try again later"),
     b"\x00\x00\x00\x1by451 4.7.1 Try again later\0"),
    (ReplyCode(b"554", b"5.7.1", b"Spam message rejected"),
     b"\x00\x00\x00\x21y554 5.7.1 Spam message rejected\0"),
    (Discard(), b"\x00\x00\x00\x01d"),
    (Tempfail(), b"\x00\x00\x00\x01t"),
    (Accept(), b"\x00\x00\x00\x01a"),
    (Continue(), b"\x00\x00\x00\x01c"),
    (Reject(), b"\x00\x00\x00\x01r"),
    (Progress(), b"\x00\x00\x00\x01p"),
    (Skip(), b"\x00\x00\x00\x01s"),
    (ConnectionFail(), b"\x00\x00\x00\x01f"),
    (ReplaceBody(b"new body\r\n"), b"\x00\x00\x00\x0bbnew body\r\n"),
    (ChangeFrom(b"<a@b>", b"SIZE=10"), b"\x00\x00\x00\x0fe<a@b>\0SIZE=10\0"),
    (AddRecipient(b"<x@y>"), b"\x00\x00\x00\x07+<x@y>\0"),
    (DeleteRecipient(b"<x@y>"), b"\x00\x00\x00\x07-<x@y>\0"),
    (AddRecipientWithArgs(b"<x@y>", b"NOTIFY=NEVER"),
     b"\x00\x00\x00\x142<x@y>\0NOTIFY=NEVER\0"),
    (AddRecipientWithArgs(b"<x@y>"), b"\x00\x00\x00\x072<x@y>\0"),
    (Quarantine(b"Spam message quarantined"),
     b"\x00\x00\x00\x1aqSpam message quarantined\0"),
    (OptionNegotiationReply(6, 0x3F, 0x000FF080, ((2, b"{auth_authen} i"),)),
     bytes.fromhex("000000214f" "00000006" "0000003f" "000ff080" "00000002")
     + b"{auth_authen} i\0"),
]
