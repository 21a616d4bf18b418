"""Value objects of the Sendmail milter protocol, version 6.

Every wire message is a frozen dataclass whose command (or reply) byte is the
class constant ``code`` and whose ``encode()`` returns the complete frame:
a 4-byte big-endian length (command byte plus payload), the code byte and the
payload.  Commands travel from the MTA to the filter, responses from the
filter to the MTA.  Parsing lives in :mod:`rspamd_tx.protocols.milter_codec`;
this module only builds bytes and names constants.

``encode()`` raises :class:`ValueError` when a field cannot be represented on
the wire (a NUL byte inside a NUL-terminated string, an integer out of its
range); values produced by the decoders always encode.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar, Union

__all__ = [
    "PROTOCOL_VERSION", "MAX_PAYLOAD", "ACTIONS_MASK", "NOREPLY_MASK",
    "ACTION_ADDHDRS", "ACTION_CHGBODY", "ACTION_ADDRCPT", "ACTION_DELRCPT",
    "ACTION_CHGHDRS", "ACTION_QUARANTINE", "ACTION_CHGFROM",
    "ACTION_ADDRCPT_PAR", "ACTION_SETSYMLIST",
    "PROTO_NOCONNECT", "PROTO_NOHELO", "PROTO_NOMAIL", "PROTO_NORCPT",
    "PROTO_NOBODY", "PROTO_NOHDRS", "PROTO_NOEOH", "PROTO_NR_HDR",
    "PROTO_NOUNKNOWN", "PROTO_NODATA", "PROTO_SKIP", "PROTO_RCPT_REJ",
    "PROTO_NR_CONN", "PROTO_NR_HELO", "PROTO_NR_MAIL", "PROTO_NR_RCPT",
    "PROTO_NR_DATA", "PROTO_NR_UNKN", "PROTO_NR_EOH", "PROTO_NR_BODY",
    "PROTO_HDR_LEADSPC",
    "MACRO_STAGE_CONNECT", "MACRO_STAGE_HELO", "MACRO_STAGE_MAIL",
    "MACRO_STAGE_RCPT", "MACRO_STAGE_DATA", "MACRO_STAGE_EOM",
    "MACRO_STAGE_EOH",
    "FAMILY_UNKNOWN", "FAMILY_UNIX", "FAMILY_INET", "FAMILY_INET6",
    "HTTP_PING_RESPONSE",
    "frame", "parse_ip",
    "Command", "Response", "ServerEvent",
    "OptionNegotiation", "Connect", "Helo", "MailFrom", "RcptTo", "Macro",
    "Header", "EndOfHeaders", "BodyChunk", "EndOfMessage", "Abort", "Quit",
    "QuitNewConnection", "Unknown", "Data", "HttpPing",
    "Accept", "Continue", "Reject", "Tempfail", "Discard", "ReplyCode",
    "AddHeader", "InsertHeader", "ChangeHeader", "ReplaceBody", "ChangeFrom",
    "AddRecipient", "DeleteRecipient", "AddRecipientWithArgs", "Quarantine",
    "Progress", "Skip", "ConnectionFail", "OptionNegotiationReply",
]

#: The only protocol version Rspamd speaks; older MTAs are refused.
PROTOCOL_VERSION = 6
#: Largest payload (bytes after the command byte) Rspamd accepts: 2 x 64 KiB.
MAX_PAYLOAD = 131072

# Action flags (filter capabilities offered at negotiation).
ACTION_ADDHDRS = 0x01
ACTION_CHGBODY = 0x02
ACTION_ADDRCPT = 0x04
ACTION_DELRCPT = 0x08
ACTION_CHGHDRS = 0x10
ACTION_QUARANTINE = 0x20
ACTION_CHGFROM = 0x40
ACTION_ADDRCPT_PAR = 0x80
ACTION_SETSYMLIST = 0x100
#: The actions Rspamd ORs into the MTA's offer.
ACTIONS_MASK = (ACTION_ADDHDRS | ACTION_CHGBODY | ACTION_ADDRCPT
                | ACTION_DELRCPT | ACTION_CHGHDRS | ACTION_QUARANTINE)

# Protocol flags (stages the filter skips or does not answer).
PROTO_NOCONNECT = 0x01
PROTO_NOHELO = 0x02
PROTO_NOMAIL = 0x04
PROTO_NORCPT = 0x08
PROTO_NOBODY = 0x10
PROTO_NOHDRS = 0x20
PROTO_NOEOH = 0x40
PROTO_NR_HDR = 0x80
PROTO_NOUNKNOWN = 0x100
PROTO_NODATA = 0x200
PROTO_SKIP = 0x400
PROTO_RCPT_REJ = 0x800
PROTO_NR_CONN = 0x1000
PROTO_NR_HELO = 0x2000
PROTO_NR_MAIL = 0x4000
PROTO_NR_RCPT = 0x8000
PROTO_NR_DATA = 0x10000
PROTO_NR_UNKN = 0x20000
PROTO_NR_EOH = 0x40000
PROTO_NR_BODY = 0x80000
PROTO_HDR_LEADSPC = 0x100000
#: The fixed protocol word Rspamd answers with: no reply before end-of-message.
NOREPLY_MASK = (PROTO_NR_HDR | PROTO_NR_CONN | PROTO_NR_HELO | PROTO_NR_MAIL
                | PROTO_NR_RCPT | PROTO_NR_DATA | PROTO_NR_UNKN | PROTO_NR_EOH
                | PROTO_NR_BODY)

# Stage numbers used by the macro lists of a negotiation reply (SMFIM_*).
MACRO_STAGE_CONNECT = 0
MACRO_STAGE_HELO = 1
MACRO_STAGE_MAIL = 2
MACRO_STAGE_RCPT = 3
MACRO_STAGE_DATA = 4
MACRO_STAGE_EOM = 5
MACRO_STAGE_EOH = 6

# Address families of the connect command.
FAMILY_UNKNOWN = "U"
FAMILY_UNIX = "L"
FAMILY_INET = "4"
FAMILY_INET6 = "6"
_FAMILIES = frozenset({FAMILY_UNKNOWN, FAMILY_UNIX, FAMILY_INET, FAMILY_INET6})

#: What Rspamd writes (then closes) when a health checker sends
#: ``GET /ping`` to the milter port; the trailing NUL is part of it.
HTTP_PING_RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Connection: close\r\n"
    b"Server: rspamd/2.7 (milter mode)\r\n"
    b"Content-Length: 6\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"pong\r\n\0"
)

_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_U32_MAX = 0xFFFFFFFF


def frame(code: bytes, payload: bytes = b"") -> bytes:
    """Return one milter frame: length, *code* (one byte) and *payload*.

    Raises ``ValueError`` if *code* is not one byte or the frame length does
    not fit the 32-bit length field.
    """
    if len(code) != 1:
        raise ValueError(f"milter code must be one byte, got {code!r}")
    size = len(payload) + 1
    if size > _U32_MAX:
        raise ValueError("milter frame too long for its length field")
    return _U32.pack(size) + code + payload


def _cstr(value: bytes, what: str) -> bytes:
    """Return *value* NUL-terminated; ``ValueError`` if it holds a NUL."""
    if b"\0" in value:
        raise ValueError(f"{what} must not contain NUL: {value!r}")
    return value + b"\0"


def _u32(value: int, what: str) -> bytes:
    if not 0 <= value <= _U32_MAX:
        raise ValueError(f"{what} out of unsigned 32-bit range: {value}")
    return _U32.pack(value)


def _negotiation_words(version: int, actions: int, protocol: int) -> bytes:
    """The three 32-bit words that open both sides' ``O`` payload."""
    return (_u32(version, "version") + _u32(actions, "actions")
            + _u32(protocol, "protocol"))


# Shapes shared by several messages: each subclass sets only ``code`` (and
# its docstring), so equal payloads of different messages stay unequal.


@dataclass(frozen=True)
class _Bare:
    """A message without payload."""

    code: ClassVar[bytes] = b""

    def encode(self) -> bytes:
        return frame(self.code)


@dataclass(frozen=True)
class _RawPayload:
    """A message whose payload is ``data``, raw bytes."""

    code: ClassVar[bytes] = b""
    data: bytes

    def encode(self) -> bytes:
        return frame(self.code, self.data)


@dataclass(frozen=True)
class _EnvelopeAddress:
    """An envelope address as sent, then each ESMTP argument, NUL-terminated."""

    code: ClassVar[bytes] = b""
    address: bytes
    esmtp_args: tuple[bytes, ...] = ()

    def encode(self) -> bytes:
        payload = _cstr(self.address, "address")
        for arg in self.esmtp_args:
            payload += _cstr(arg, "ESMTP argument")
        return frame(self.code, payload)


@dataclass(frozen=True)
class _Recipient:
    """One NUL-terminated envelope address."""

    code: ClassVar[bytes] = b""
    address: bytes

    def encode(self) -> bytes:
        return frame(self.code, _cstr(self.address, "address"))


@dataclass(frozen=True)
class _AddressWithArgs:
    """An address and, when ``args`` is not None, one string of ESMTP args."""

    code: ClassVar[bytes] = b""
    address: bytes
    args: bytes | None = None

    def encode(self) -> bytes:
        payload = _cstr(self.address, "address")
        if self.args is not None:
            payload += _cstr(self.args, "ESMTP arguments")
        return frame(self.code, payload)


@dataclass(frozen=True)
class _IndexedHeader:
    """A header ``index``, ``name`` and ``value``."""

    code: ClassVar[bytes] = b""
    index: int
    name: bytes
    value: bytes

    def encode(self) -> bytes:
        return frame(self.code, _u32(self.index, "header index")
                     + _cstr(self.name, "header name")
                     + _cstr(self.value, "header value"))


# ---------------------------------------------------------------------------
# Commands: MTA -> filter
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class OptionNegotiation:
    """``O``: the MTA's offer -- protocol version, action and protocol flags."""

    code: ClassVar[bytes] = b"O"
    version: int
    actions: int
    protocol: int

    def encode(self) -> bytes:
        return frame(self.code, _negotiation_words(
            self.version, self.actions, self.protocol))


@dataclass(frozen=True)
class Connect:
    """``C``: SMTP client connection information.

    ``family`` is one of ``"U"`` (unknown: no port, no address follow),
    ``"L"`` (unix socket path), ``"4"`` or ``"6"``.  ``port`` is ``None``
    for ``"U"``; ``address`` is ``None`` when the MTA sent none (the payload
    ended right after the port).  ``address`` is the text as received (an
    IPv6 address may carry an ``IPv6:`` prefix and brackets); see
    :attr:`ip_address` for the parsed form.
    """

    code: ClassVar[bytes] = b"C"
    hostname: bytes
    family: str
    port: int | None = None
    address: bytes | None = None

    def encode(self) -> bytes:
        if self.family not in _FAMILIES:
            raise ValueError(f"unknown connect family {self.family!r}")
        payload = _cstr(self.hostname, "hostname") + self.family.encode()
        if self.family == FAMILY_UNKNOWN:
            if self.port is not None or self.address is not None:
                raise ValueError("family U carries no port or address")
            return frame(self.code, payload)
        if self.port is None or not 0 <= self.port <= 0xFFFF:
            raise ValueError(f"connect port must be 0..65535: {self.port}")
        payload += _U16.pack(self.port)
        if self.address is not None:
            payload += _cstr(self.address, "address")
        return frame(self.code, payload)

    @property
    def ip_address(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """The client IP for families ``4``/``6`` with an address, else None.

        Only meaningful for events produced by the decoder, which has already
        checked that the address parses.
        """
        if self.address is None or self.family not in (FAMILY_INET, FAMILY_INET6):
            return None
        return parse_ip(self.family, self.address)


@lru_cache(maxsize=1024)
def parse_ip(family: str, address: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Parse a connect address the way Rspamd does; ``ValueError`` if bad.

    For family ``6`` a leading ``IPv6:`` (any case) is removed and brackets
    are optional.  Results are cached (the decoder checks an address and the
    session uses it).
    """
    text = address.decode("ascii")
    if family == FAMILY_INET:
        return ipaddress.IPv4Address(text)
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return ipaddress.IPv6Address(text)


@dataclass(frozen=True)
class Helo:
    """``H``: the HELO/EHLO argument."""

    code: ClassVar[bytes] = b"H"
    name: bytes

    def encode(self) -> bytes:
        return frame(self.code, _cstr(self.name, "helo"))


@dataclass(frozen=True)
class MailFrom(_EnvelopeAddress):
    """``M``: envelope sender as sent (e.g. ``b"<a@b>"``) and ESMTP args."""

    code: ClassVar[bytes] = b"M"


@dataclass(frozen=True)
class RcptTo(_EnvelopeAddress):
    """``R``: one envelope recipient as sent and its ESMTP args."""

    code: ClassVar[bytes] = b"R"


@dataclass(frozen=True)
class Macro:
    """``D``: macro definitions for the stage whose command byte is ``stage``.

    ``stage`` is one byte (``b"C"``, ``b"M"``, ...) or empty when the MTA sent
    an empty payload; Rspamd ignores it and keeps one table per connection.
    ``macros`` are ``(name, value)`` pairs in wire order.
    """

    code: ClassVar[bytes] = b"D"
    stage: bytes
    macros: tuple[tuple[bytes, bytes], ...] = ()

    def encode(self) -> bytes:
        if len(self.stage) > 1 or (not self.stage and self.macros):
            raise ValueError(f"macro stage must be one byte: {self.stage!r}")
        payload = self.stage
        for name, value in self.macros:
            payload += _cstr(name, "macro name") + _cstr(value, "macro value")
        return frame(self.code, payload)


@dataclass(frozen=True)
class Header:
    """``L``: one header; ``value`` is used exactly as received."""

    code: ClassVar[bytes] = b"L"
    name: bytes
    value: bytes

    def encode(self) -> bytes:
        return frame(self.code, _cstr(self.name, "header name") + self.value + b"\0")


@dataclass(frozen=True)
class BodyChunk(_RawPayload):
    """``B``: a chunk of the message body (raw bytes)."""

    code: ClassVar[bytes] = b"B"


@dataclass(frozen=True)
class EndOfMessage(_RawPayload):
    """``E``: end of body; asks for the verdict.

    ``data`` holds a final body chunk some MTAs attach to this command
    (Postfix and Sendmail send none; Rspamd ignores it).
    """

    code: ClassVar[bytes] = b"E"
    data: bytes = b""


@dataclass(frozen=True)
class Unknown:
    """``U``: an SMTP command the MTA did not recognise (as sent)."""

    code: ClassVar[bytes] = b"U"
    command: bytes

    def encode(self) -> bytes:
        return frame(self.code, _cstr(self.command, "unknown command"))


@dataclass(frozen=True)
class EndOfHeaders(_Bare):
    """``N``: end of the header block."""

    code: ClassVar[bytes] = b"N"


@dataclass(frozen=True)
class Abort(_Bare):
    """``A``: abort the current message; connection data is kept."""

    code: ClassVar[bytes] = b"A"


@dataclass(frozen=True)
class Quit(_Bare):
    """``Q``: the MTA closes the milter conversation."""

    code: ClassVar[bytes] = b"Q"


@dataclass(frozen=True)
class QuitNewConnection(_Bare):
    """``K``: this SMTP connection ends, a new one follows on this socket."""

    code: ClassVar[bytes] = b"K"


@dataclass(frozen=True)
class Data(_Bare):
    """``T``: the SMTP DATA command."""

    code: ClassVar[bytes] = b"T"


@dataclass(frozen=True)
class HttpPing:
    """Not a milter command: a health checker sent ``GET /ping`` to the port.

    The server writes :data:`HTTP_PING_RESPONSE` and closes the connection;
    the decoder yields nothing after this event.
    """

    response: ClassVar[bytes] = HTTP_PING_RESPONSE


Command = Union[OptionNegotiation, Connect, Helo, MailFrom, RcptTo, Macro,
                Header, EndOfHeaders, BodyChunk, EndOfMessage, Abort, Quit,
                QuitNewConnection, Unknown, Data]
#: Everything the server-side decoder yields.
ServerEvent = Union[Command, HttpPing]


# ---------------------------------------------------------------------------
# Responses: filter -> MTA
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Accept(_Bare):
    """``a``: accept the message (or connection) without further filtering."""

    code: ClassVar[bytes] = b"a"


@dataclass(frozen=True)
class Continue(_Bare):
    """``c``: go on to the next stage."""

    code: ClassVar[bytes] = b"c"


@dataclass(frozen=True)
class Reject(_Bare):
    """``r``: reject with the MTA's default 5xx reply."""

    code: ClassVar[bytes] = b"r"


@dataclass(frozen=True)
class Tempfail(_Bare):
    """``t``: temporary failure with the MTA's default 4xx reply."""

    code: ClassVar[bytes] = b"t"


@dataclass(frozen=True)
class Discard(_Bare):
    """``d``: accept, then silently drop the message."""

    code: ClassVar[bytes] = b"d"


@dataclass(frozen=True)
class Progress(_Bare):
    """``p``: still working; resets the MTA's end-of-message timeout."""

    code: ClassVar[bytes] = b"p"


@dataclass(frozen=True)
class Skip(_Bare):
    """``s``: send no more body chunks for this message."""

    code: ClassVar[bytes] = b"s"


@dataclass(frozen=True)
class ConnectionFail(_Bare):
    """``f``: make the MTA fail the SMTP connection."""

    code: ClassVar[bytes] = b"f"


@dataclass(frozen=True)
class ReplyCode:
    """``y``: a full SMTP reply, ``code SP xcode SP text NUL``.

    Rspamd builds it as ``"%s %s %s"`` of the three parts with the text
    inserted verbatim (no multi-line handling), e.g.
    ``ReplyCode(b"554", b"5.7.1", b"Spam message rejected")``.
    ``code`` is three digits starting with 4 or 5; ``xcode`` holds no space.
    """

    code: ClassVar[bytes] = b"y"
    smtp_code: bytes
    xcode: bytes
    text: bytes

    def encode(self) -> bytes:
        if not _is_smtp_code(self.smtp_code):
            raise ValueError(f"SMTP reply code must be 4xx or 5xx: {self.smtp_code!r}")
        if not self.xcode or b" " in self.xcode:
            raise ValueError(f"extended code must be one non-empty word: {self.xcode!r}")
        return frame(self.code, _cstr(b" ".join((self.smtp_code, self.xcode, self.text)),
                                      "reply text"))


def _is_smtp_code(value: bytes) -> bool:
    return len(value) == 3 and value[:1] in (b"4", b"5") and value.isdigit()


@dataclass(frozen=True)
class AddHeader:
    """``h``: append a header."""

    code: ClassVar[bytes] = b"h"
    name: bytes
    value: bytes

    def encode(self) -> bytes:
        return frame(self.code, _cstr(self.name, "header name")
                     + _cstr(self.value, "header value"))


@dataclass(frozen=True)
class InsertHeader(_IndexedHeader):
    """``i``: insert a header at ``index`` (0 = before all headers)."""

    code: ClassVar[bytes] = b"i"


@dataclass(frozen=True)
class ChangeHeader(_IndexedHeader):
    """``m``: change the ``index``-th (1-based) header ``name``.

    An empty ``value`` deletes that occurrence.
    """

    code: ClassVar[bytes] = b"m"


@dataclass(frozen=True)
class ReplaceBody(_RawPayload):
    """``b``: (a chunk of) the replacement body, raw bytes."""

    code: ClassVar[bytes] = b"b"


@dataclass(frozen=True)
class ChangeFrom(_AddressWithArgs):
    """``e``: replace the envelope sender; ``args`` are its ESMTP args."""

    code: ClassVar[bytes] = b"e"


@dataclass(frozen=True)
class AddRecipient(_Recipient):
    """``+``: add an envelope recipient."""

    code: ClassVar[bytes] = b"+"


@dataclass(frozen=True)
class DeleteRecipient(_Recipient):
    """``-``: remove an envelope recipient."""

    code: ClassVar[bytes] = b"-"


@dataclass(frozen=True)
class AddRecipientWithArgs(_AddressWithArgs):
    """``2``: add an envelope recipient with ESMTP args."""

    code: ClassVar[bytes] = b"2"


@dataclass(frozen=True)
class Quarantine:
    """``q``: put the message on hold with ``reason``."""

    code: ClassVar[bytes] = b"q"
    reason: bytes

    def encode(self) -> bytes:
        return frame(self.code, _cstr(self.reason, "quarantine reason"))


@dataclass(frozen=True)
class OptionNegotiationReply:
    """``O`` from the filter: version, actions, protocol flags.

    ``macros`` are optional per-stage macro requests (``SMFIM_*`` stage
    number, space-separated macro names), appended after the three words;
    Rspamd sends none.
    """

    code: ClassVar[bytes] = b"O"
    version: int
    actions: int
    protocol: int
    macros: tuple[tuple[int, bytes], ...] = ()

    def encode(self) -> bytes:
        payload = _negotiation_words(self.version, self.actions, self.protocol)
        for stage, names in self.macros:
            payload += _u32(stage, "macro stage") + _cstr(names, "macro list")
        return frame(self.code, payload)


Response = Union[Accept, Continue, Reject, Tempfail, Discard, Progress, Skip,
                 ConnectionFail, ReplyCode, AddHeader, InsertHeader, ChangeHeader,
                 ReplaceBody, ChangeFrom, AddRecipient, DeleteRecipient,
                 AddRecipientWithArgs, Quarantine, OptionNegotiationReply]
