"""Milter protocol v6 codec: frame decoders, negotiation and the stage table.

Pure: bytes in, typed events out (:mod:`rspamd_tx.protocols.milter_events`),
events in, bytes out.  Nothing here does I/O.

* :class:`MilterDecoder` -- incremental decoder of MTA commands, used by the
  filter (server) side; also recognises Rspamd's HTTP ``GET /ping`` hack.
* :class:`MtaDecoder` -- incremental decoder of filter responses, used by the
  MTA side (tests play the MTA with it).
* :func:`negotiate` -- the reply Rspamd gives to an option negotiation.
* :class:`MilterConnection` -- the server's per-connection protocol state: it
  decodes, checks every command against :data:`TRANSITIONS`, enforces bounds,
  accounts body bytes and checks that responses are sent only when the MTA
  waits for one.

Every decoding or ordering problem raises :class:`MilterProtocolError`; after
that the decoder (and the connection) stays failed and the server must close
the socket without writing a reply, as Rspamd does.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from functools import lru_cache
from typing import Callable, Generic, Iterator, Mapping, TypeVar

from rspamd_tx.protocols.milter_events import (
    ACTIONS_MASK, FAMILY_INET, FAMILY_INET6, FAMILY_UNIX, FAMILY_UNKNOWN,
    MAX_PAYLOAD, NOREPLY_MASK, PROTO_NR_BODY, PROTO_NR_CONN, PROTO_NR_DATA,
    PROTO_NR_EOH, PROTO_NR_HDR, PROTO_NR_HELO, PROTO_NR_MAIL, PROTO_NR_RCPT,
    PROTO_NR_UNKN, PROTOCOL_VERSION,
    Abort, Accept, AddHeader, AddRecipient, AddRecipientWithArgs, BodyChunk,
    ChangeFrom, ChangeHeader, Command, Connect, ConnectionFail, Continue, Data,
    DeleteRecipient, Discard, EndOfHeaders, EndOfMessage, Header, Helo,
    HttpPing, InsertHeader, Macro, MailFrom, OptionNegotiation,
    OptionNegotiationReply, Progress, Quarantine, Quit, QuitNewConnection,
    RcptTo, Reject, ReplaceBody, ReplyCode, Response, ServerEvent, Skip,
    Tempfail, Unknown, parse_ip,
)

__all__ = [
    "MilterProtocolError", "MilterUsageError", "MilterDecoder", "MtaDecoder",
    "MilterConnection", "Stage", "TRANSITIONS", "negotiate",
    "DEFAULT_MAX_MACROS", "DEFAULT_MAX_ARGS", "DEFAULT_MAX_MACRO_NAMES",
    "DEFAULT_MAX_HEADERS", "DEFAULT_MAX_HTTP_LINE", "DEFAULT_MAX_RESPONSE",
]

#: Most macro pairs accepted in one ``D`` command.
DEFAULT_MAX_MACROS = 256
#: Most strings (address plus ESMTP args) accepted in one ``M``/``R``.
DEFAULT_MAX_ARGS = 64
#: Most distinct macro names kept per connection (until ``K``).
DEFAULT_MAX_MACRO_NAMES = 1024
#: Most headers accepted per message.
DEFAULT_MAX_HEADERS = 10000
#: Longest HTTP request line read for the ``GET /ping`` health check.
DEFAULT_MAX_HTTP_LINE = 4096
#: Default payload bound of :class:`MtaDecoder`: Rspamd sends a replaced
#: body as one ``b`` frame, so the MTA side must accept big frames.
DEFAULT_MAX_RESPONSE = 64 * 1024 * 1024

_HEAD = struct.Struct(">IB")
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")


class MilterProtocolError(Exception):
    """The peer broke the milter protocol; ``reason`` says how.

    The only exception the decoders and :class:`MilterConnection` raise for
    anything received.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MilterUsageError(RuntimeError):
    """The local side tried to send a response the MTA is not waiting for."""


# ---------------------------------------------------------------------------
# Payload helpers
# ---------------------------------------------------------------------------


def _strings(payload: bytes, limit: int, what: str) -> list[bytes]:
    """Split NUL-terminated strings; an unterminated last string is kept.

    The count is checked against *limit* before splitting.
    """
    if not payload:
        return []
    count = payload.count(b"\0") + (payload[-1] != 0)
    if count > limit:
        raise MilterProtocolError(f"invalid {what} command (more than {limit} strings)")
    if payload[-1] == 0:
        payload = payload[:-1]
    return payload.split(b"\0")


def _exact_cstrings(payload: bytes, count: int, what: str) -> list[bytes]:
    """Return exactly *count* NUL-terminated strings filling *payload*."""
    if not payload.endswith(b"\0") or payload.count(b"\0") != count:
        raise MilterProtocolError(
            f"invalid {what} reply (expected {count} NUL-terminated strings)")
    return payload[:-1].split(b"\0")


def _one_or_two_cstrings(payload: bytes, what: str) -> tuple[bytes, bytes | None]:
    if not payload.endswith(b"\0") or payload.count(b"\0") not in (1, 2):
        raise MilterProtocolError(f"invalid {what} reply (expected address and optional args)")
    parts = payload[:-1].split(b"\0")
    return parts[0], (parts[1] if len(parts) == 2 else None)


# ---------------------------------------------------------------------------
# Command parsers (MTA -> filter)
# ---------------------------------------------------------------------------


def _parse_optneg(payload: bytes) -> OptionNegotiation:
    if len(payload) != 12:
        raise MilterProtocolError(f"invalid optneg command ({len(payload)} bytes, need 12)")
    version, actions, protocol = struct.unpack(">III", payload)
    return OptionNegotiation(version, actions, protocol)


def _parse_connect(payload: bytes) -> Connect:
    zero = payload.find(b"\0")
    if zero < 0:
        raise MilterProtocolError("invalid connect command (no name)")
    hostname = payload[:zero]
    rest = payload[zero + 1:]
    if not rest:
        raise MilterProtocolError("invalid connect command (no family)")
    family = chr(rest[0])
    if family == FAMILY_UNKNOWN:
        return Connect(hostname, family)
    if family not in (FAMILY_UNIX, FAMILY_INET, FAMILY_INET6):
        raise MilterProtocolError(f"invalid connect command (bad protocol: {family!r})")
    if len(rest) < 3:
        raise MilterProtocolError("invalid connect command (no port)")
    (port,) = _U16.unpack(rest[1:3])
    tail = rest[3:]
    if not tail:
        return Connect(hostname, family, port)
    zero = tail.find(b"\0")
    if zero < 0:
        raise MilterProtocolError("invalid connect command (no zero terminated IP)")
    address = tail[:zero]
    if family != FAMILY_UNIX:
        try:
            parse_ip(family, address)
        except (ValueError, UnicodeDecodeError):
            kind = "IPv4" if family == FAMILY_INET else "IPv6"
            raise MilterProtocolError(
                f"invalid connect command (bad {kind}: {address!r})") from None
    return Connect(hostname, family, port, address)


def _first_string(payload: bytes) -> bytes:
    """The C string at the start of *payload*; all of it if unterminated."""
    return payload.split(b"\0", 1)[0]


def _parse_helo(payload: bytes) -> Helo:
    return Helo(_first_string(payload))


def _parse_header(payload: bytes) -> Header:
    zero = payload.find(b"\0")
    if zero < 0:
        raise MilterProtocolError("invalid header command (no name)")
    rest = payload[zero + 1:]
    if not rest.endswith(b"\0"):
        raise MilterProtocolError("invalid header command (bad value)")
    return Header(payload[:zero], rest[:-1])


def _parse_unknown(payload: bytes) -> Unknown:
    return Unknown(_first_string(payload))


def _envelope_parser(cls: type[MailFrom] | type[RcptTo], what: str,
                     max_args: int) -> Callable[[bytes], MailFrom | RcptTo]:
    def parse(payload: bytes) -> MailFrom | RcptTo:
        parts = _strings(payload, max_args, what)
        if not parts:
            return cls(b"")
        return cls(parts[0], tuple(parts[1:]))
    return parse


def _macro_parser(max_macros: int) -> Callable[[bytes], Macro]:
    def parse(payload: bytes) -> Macro:
        stage, body = payload[:1], payload[1:]
        if not body:
            return Macro(stage)
        if not body.endswith(b"\0") or body.count(b"\0") % 2:
            raise MilterProtocolError("invalid macro command (name without value)")
        if body.count(b"\0") // 2 > max_macros:
            raise MilterProtocolError(
                f"invalid macro command (more than {max_macros} macros)")
        parts = body[:-1].split(b"\0")
        return Macro(stage, tuple(zip(parts[0::2], parts[1::2])))
    return parse


# ---------------------------------------------------------------------------
# Response parsers (filter -> MTA)
# ---------------------------------------------------------------------------


def _bare(cls: type[Accept] | type[Continue] | type[Reject] | type[Tempfail]
          | type[Discard] | type[Progress] | type[Skip] | type[ConnectionFail]
          ) -> Callable[[bytes], Response]:
    def parse(payload: bytes) -> Response:
        if payload:
            raise MilterProtocolError(
                f"invalid {cls.__name__} reply ({len(payload)} unexpected bytes)")
        return cls()
    return parse


def _parse_replycode(payload: bytes) -> ReplyCode:
    (text,) = _exact_cstrings(payload, 1, "reply code")
    parts = text.split(b" ", 2)
    code = parts[0]
    if not (len(code) == 3 and code.isdigit() and code[:1] in (b"4", b"5")):
        raise MilterProtocolError(f"invalid reply code reply (bad SMTP code {code!r})")
    if len(parts) < 2 or not parts[1]:
        raise MilterProtocolError("invalid reply code reply (no extended code)")
    return ReplyCode(code, parts[1], parts[2] if len(parts) == 3 else b"")


def _parse_addheader(payload: bytes) -> AddHeader:
    name, value = _exact_cstrings(payload, 2, "add header")
    return AddHeader(name, value)


def _indexed_header(cls: type[InsertHeader] | type[ChangeHeader], what: str
                    ) -> Callable[[bytes], InsertHeader | ChangeHeader]:
    def parse(payload: bytes) -> InsertHeader | ChangeHeader:
        if len(payload) < 4:
            raise MilterProtocolError(f"invalid {what} reply (no index)")
        (index,) = _U32.unpack(payload[:4])
        name, value = _exact_cstrings(payload[4:], 2, what)
        return cls(index, name, value)
    return parse


def _parse_changefrom(payload: bytes) -> ChangeFrom:
    return ChangeFrom(*_one_or_two_cstrings(payload, "change from"))


def _parse_addrcpt_par(payload: bytes) -> AddRecipientWithArgs:
    return AddRecipientWithArgs(*_one_or_two_cstrings(payload, "add recipient"))


def _parse_addrcpt(payload: bytes) -> AddRecipient:
    (address,) = _exact_cstrings(payload, 1, "add recipient")
    return AddRecipient(address)


def _parse_delrcpt(payload: bytes) -> DeleteRecipient:
    (address,) = _exact_cstrings(payload, 1, "delete recipient")
    return DeleteRecipient(address)


def _parse_quarantine(payload: bytes) -> Quarantine:
    (reason,) = _exact_cstrings(payload, 1, "quarantine")
    return Quarantine(reason)


def _parse_optneg_reply(payload: bytes) -> OptionNegotiationReply:
    if len(payload) < 12:
        raise MilterProtocolError(f"invalid optneg reply ({len(payload)} bytes, need 12)")
    version, actions, protocol = struct.unpack(">III", payload[:12])
    rest = payload[12:]
    macros: list[tuple[int, bytes]] = []
    while rest:
        zero = rest.find(b"\0", 4)
        if len(rest) < 5 or zero < 0:
            raise MilterProtocolError("invalid optneg reply (truncated macro list)")
        (stage,) = _U32.unpack(rest[:4])
        macros.append((stage, rest[4:zero]))
        rest = rest[zero + 1:]
    return OptionNegotiationReply(version, actions, protocol, tuple(macros))


_RESPONSE_PARSERS: Mapping[int, Callable[[bytes], Response]] = {
    ord(cls.code): _bare(cls)
    for cls in (Accept, Continue, Reject, Tempfail, Discard, Progress, Skip,
                ConnectionFail)
} | {
    ord(ReplyCode.code): _parse_replycode,
    ord(AddHeader.code): _parse_addheader,
    ord(InsertHeader.code): _indexed_header(InsertHeader, "insert header"),
    ord(ChangeHeader.code): _indexed_header(ChangeHeader, "change header"),
    ord(ReplaceBody.code): ReplaceBody,
    ord(ChangeFrom.code): _parse_changefrom,
    ord(AddRecipient.code): _parse_addrcpt,
    ord(DeleteRecipient.code): _parse_delrcpt,
    ord(AddRecipientWithArgs.code): _parse_addrcpt_par,
    ord(Quarantine.code): _parse_quarantine,
    ord(OptionNegotiationReply.code): _parse_optneg_reply,
}


# ---------------------------------------------------------------------------
# Framing
# ---------------------------------------------------------------------------

_E = TypeVar("_E")


class _FrameDecoder(Generic[_E]):
    """Incremental framing shared by both directions.

    Subclasses supply the parser table; the server side also enables the
    HTTP health-check hack.  ``max_frame`` bounds the payload (the bytes
    after the command byte) and is checked as soon as the 5-byte frame
    header has arrived, before any of the payload is waited for.

    Received pieces are kept as they came (no growing buffer): a payload
    lying inside one piece is sliced out of it, one spanning several pieces
    is joined from views of them, so every payload byte is copied once.
    """

    _parsers: Mapping[int, Callable[[bytes], _E]]

    def __init__(self, max_frame: int, max_http_line: int = DEFAULT_MAX_HTTP_LINE) -> None:
        self.max_frame = max_frame
        self.max_http_line = max_http_line
        #: The oldest received piece not wholly consumed, read from ``_pos``.
        self._data = b""
        self._pos = 0
        #: Pieces received after ``_data``, in order.
        self._more: deque[bytes] = deque()
        #: Unconsumed bytes in ``_data`` and ``_more``.
        self._size = 0
        self._head: tuple[int, int] | None = None
        self._error: MilterProtocolError | None = None
        self._finished = False

    @property
    def buffered(self) -> int:
        """Bytes received and not yet turned into events."""
        return self._size

    def feed(self, data: bytes) -> None:
        """Add received bytes.  Never raises; bytes after an error are dropped.

        Call :meth:`next_event` until it returns ``None`` after each feed.
        """
        if self._error is not None or self._finished or not data:
            return
        if self._size:
            self._more.append(data)
        else:
            self._data = data
            self._pos = 0
        self._size += len(data)
        if self._head is None:
            self._check_head()

    def next_event(self) -> _E | None:
        """Return the next complete event, or ``None`` if more bytes are needed.

        Raises :class:`MilterProtocolError` on malformed input; the decoder
        then stays failed and raises the same error on every later call.
        """
        if self._error is not None:
            raise self._error
        if self._finished:
            return None
        head = self._head
        if head is None:
            if self._size >= 5:
                self._check_head()
                if self._error is not None:
                    raise self._error
                head = self._head
            if head is None:
                return self._no_frame()
        code, size = head
        count = 5 + size
        if self._size < count:
            return None
        self._head = None
        pos = self._pos
        data = self._data
        if pos + count < len(data):
            # The whole frame lies inside the current piece (the usual case).
            self._pos = pos + count
            self._size -= count
            payload = data[pos + 5:pos + count]
        else:
            payload = self._take(count, 5)
        try:
            return self._parsers[code](payload)
        except MilterProtocolError as error:
            raise self._fail(error.reason) from None

    def _no_frame(self) -> _E | None:
        """What :meth:`next_event` returns when no frame header is buffered.

        ``None`` (wait for more bytes); the server side answers its HTTP
        health check here.
        """
        return None

    def __iter__(self) -> Iterator[_E]:
        """Yield every complete event currently buffered."""
        while (event := self.next_event()) is not None:
            yield event

    def _take(self, count: int, skip: int) -> bytes:
        """Consume ``count`` buffered bytes reaching at least to the end of the
        current piece; return them without the first ``skip``."""
        data, pos = self._data, self._pos
        end = pos + count
        self._size -= count
        if end == len(data):
            self._data = self._more.popleft() if self._more else b""
            self._pos = 0
            return data[pos + skip:]
        # The frame runs into later pieces: join views of its parts.
        parts: list[memoryview] = [memoryview(data)[pos:]]
        wanted = end - len(data)
        more = self._more
        while True:
            piece = more.popleft()
            if len(piece) > wanted:
                parts.append(memoryview(piece)[:wanted])
                self._data, self._pos = piece, wanted
                break
            parts.append(memoryview(piece))
            wanted -= len(piece)
            if not wanted:
                self._data = more.popleft() if more else b""
                self._pos = 0
                break
        while skip:
            # Drop the skipped bytes (a frame header may straddle pieces too).
            first = parts[0]
            if len(first) > skip:
                parts[0] = first[skip:]
                break
            skip -= len(first)
            del parts[0]
        return b"".join(parts)

    def _peek(self, count: int) -> bytes:
        """The first ``count`` buffered bytes (at most what is buffered), not consumed."""
        data, pos = self._data, self._pos
        if pos + count <= len(data):
            return data[pos:pos + count]
        head = data[pos:]
        for piece in self._more:
            if len(head) >= count:
                break
            head += piece[:count - len(head)]
        return head

    def _contiguous(self) -> bytes:
        """Merge everything buffered into ``_data`` (from 0) and return it."""
        if self._pos or self._more:
            self._data = b"".join((memoryview(self._data)[self._pos:], *self._more))
            self._pos = 0
            self._more.clear()
        return self._data

    def _fail(self, reason: str) -> MilterProtocolError:
        """Enter the failed state; return the error to raise."""
        self._error = MilterProtocolError(reason)
        self._data = b""
        self._pos = self._size = 0
        self._more.clear()
        return self._error

    def _check_head(self) -> None:
        """Validate the frame header at the start of the buffer, once."""
        if self._head is not None or self._error is not None:
            return
        if self._size < 5:
            return
        data, pos = self._data, self._pos
        if pos + 5 <= len(data):
            length, code = _HEAD.unpack_from(data, pos)
        else:
            length, code = _HEAD.unpack(self._peek(5))
        if length == 0:
            self._fail("Command length is too short")
            return
        size = length - 1
        if size > self.max_frame:
            self._oversize(size)
            return
        if code not in self._parsers:
            self._fail(f"Invalid command: {chr(code)!r}")
            return
        self._head = (code, size)

    def _oversize(self, size: int) -> None:
        """React to a length field above ``max_frame`` (nothing buffered yet)."""
        self._fail(f"Command length is too big: {size}")


@lru_cache(maxsize=None)
def _command_parsers(max_macros: int, max_args: int) -> Mapping[int, Callable[[bytes], ServerEvent]]:
    """The command parser table for these bounds (shared by every decoder using them)."""
    abort, quit_, quit_new, data, end_of_headers = (
        Abort(), Quit(), QuitNewConnection(), Data(), EndOfHeaders())
    return {
        ord(b"O"): _parse_optneg,
        ord(b"C"): _parse_connect,
        ord(b"H"): _parse_helo,
        ord(b"M"): _envelope_parser(MailFrom, "mail", max_args),
        ord(b"R"): _envelope_parser(RcptTo, "rcpt", max_args),
        ord(b"D"): _macro_parser(max_macros),
        ord(b"L"): _parse_header,
        ord(b"N"): lambda payload: end_of_headers,
        ord(b"B"): BodyChunk,
        ord(b"E"): EndOfMessage,
        ord(b"A"): lambda payload: abort,
        ord(b"Q"): lambda payload: quit_,
        ord(b"K"): lambda payload: quit_new,
        ord(b"U"): _parse_unknown,
        ord(b"T"): lambda payload: data,
    }


class MilterDecoder(_FrameDecoder[ServerEvent]):
    """Decode MTA commands into :data:`~milter_events.Command` events.

    ``max_frame`` bounds the payload of one command (Rspamd: 131072 bytes);
    ``max_macros`` the pairs in one ``D``; ``max_args`` the strings of one
    ``M``/``R``.  Payload bytes that Rspamd ignores (after ``A``, ``N``,
    ``Q``, ``K``, ``T``; after a connect address) are ignored here too.
    Strings are read as C strings: ``H`` and ``U`` keep what precedes the
    first NUL (all of it if unterminated), an unterminated last string of
    ``M``/``R`` is kept as sent.  A header value is everything between the
    name's NUL and the final NUL.

    A buffer starting with ``GET`` whose length field is oversized is read as
    an HTTP request line: ``GET /ping`` (path case-insensitive) yields
    :class:`~milter_events.HttpPing` and ends decoding; any other request
    raises :class:`MilterProtocolError`.
    """

    def __init__(self, max_frame: int = MAX_PAYLOAD, *,
                 max_macros: int = DEFAULT_MAX_MACROS,
                 max_args: int = DEFAULT_MAX_ARGS,
                 max_http_line: int = DEFAULT_MAX_HTTP_LINE) -> None:
        super().__init__(max_frame, max_http_line)
        self._http = False
        self._parsers = _command_parsers(max_macros, max_args)

    def feed(self, data: bytes) -> None:
        """As :meth:`_FrameDecoder.feed`; an HTTP request line is bounded here."""
        super().feed(data)
        if (self._http and self._error is None and self._http_line_end() < 0
                and self._size > self.max_http_line):
            self._fail("HTTP request line too long in milter mode")

    def _no_frame(self) -> ServerEvent | None:
        """The HTTP ping event once its request line is complete (HTTP mode)."""
        if self._http:
            return self._http_event()
        return None

    def _oversize(self, size: int) -> None:
        # An HTTP request line reads as a huge length: "GET " = 0x47455420.
        start = self._peek(4)
        if start.startswith(b"GET"):
            self._http = True
        elif start.startswith(b"POST"):
            self._fail("HTTP POST request is not supported in milter mode")
        else:
            super()._oversize(size)

    def _http_line_end(self) -> int:
        return self._contiguous().find(b"\n", 0, self.max_http_line + 1)

    def _http_event(self) -> HttpPing | None:
        end = self._http_line_end()
        if end < 0:
            return None
        line = self._contiguous()[:end].rstrip(b"\r")
        words = line.split(b" ")
        url = words[1] if len(words) >= 2 and words[0] == b"GET" else b""
        if url.lower() == b"/ping":
            self._finished = True
            self._data = b""
            self._pos = self._size = 0
            return HttpPing()
        raise self._fail("HTTP GET request is not supported in milter mode, url: "
                         + url.decode("latin-1"))


class MtaDecoder(_FrameDecoder[Response]):
    """Decode filter responses (the MTA's side of the conversation).

    Strict: payloads must have exactly the shape their reply code defines.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_RESPONSE) -> None:
        super().__init__(max_frame)
        self._parsers = _RESPONSE_PARSERS


# ---------------------------------------------------------------------------
# Negotiation
# ---------------------------------------------------------------------------


def negotiate(offer: OptionNegotiation) -> OptionNegotiationReply:
    """Answer *offer* as Rspamd does.

    Version 6 is required (older versions raise :class:`MilterProtocolError`;
    newer ones are answered with 6).  Rspamd's action flags are ORed into the
    MTA's; the protocol word is fixed to "no reply before end-of-message"
    whatever the MTA offered.  No macros are requested.
    """
    if offer.version < PROTOCOL_VERSION:
        raise MilterProtocolError(f"invalid protocol version: {offer.version}")
    return OptionNegotiationReply(PROTOCOL_VERSION, offer.actions | ACTIONS_MASK,
                                  NOREPLY_MASK)


# ---------------------------------------------------------------------------
# Stage table
# ---------------------------------------------------------------------------


class Stage(enum.Enum):
    """Where the MTA is in its conversation, named after the last command."""

    INIT = "init"            #: nothing received; ``O`` must come first
    OPTIONS = "options"      #: negotiated; waiting for ``C``
    CONNECTED = "connected"  #: ``C`` seen
    HELO = "helo"            #: ``H`` seen, or a message ended or was aborted
    MAIL = "mail"            #: ``M`` seen
    RCPT = "rcpt"            #: at least one ``R`` seen
    DATA = "data"            #: ``T`` seen
    HEADERS = "headers"      #: at least one ``L`` seen
    EOH = "eoh"              #: ``N`` seen
    BODY = "body"            #: at least one ``B`` seen
    EOM = "eom"              #: ``E`` seen; the verdict is owed
    CLOSED = "closed"        #: ``Q`` seen; nothing more may arrive


def _with_common(stage: Stage, moves: dict[type, Stage]) -> dict[type, Stage]:
    """Add what is legal at every stage after negotiation.

    Macros may precede any command, ``A`` ends a message (keeping connection
    data), ``K`` starts over with a new SMTP connection, ``Q`` ends it all.
    """
    after_abort = stage if stage in (Stage.OPTIONS, Stage.CONNECTED) else Stage.HELO
    common: dict[type, Stage] = {Macro: stage, Abort: after_abort,
                                 QuitNewConnection: Stage.OPTIONS, Quit: Stage.CLOSED}
    return common | moves


#: ``TRANSITIONS[stage][command class]`` is the stage after that command;
#: a command missing from its stage's row is out of order.
TRANSITIONS: Mapping[Stage, Mapping[type, Stage]] = {
    Stage.INIT: {OptionNegotiation: Stage.OPTIONS, Quit: Stage.CLOSED},
    Stage.OPTIONS: _with_common(Stage.OPTIONS, {Connect: Stage.CONNECTED}),
    Stage.CONNECTED: _with_common(Stage.CONNECTED, {
        Helo: Stage.HELO, MailFrom: Stage.MAIL, Unknown: Stage.CONNECTED}),
    Stage.HELO: _with_common(Stage.HELO, {
        Helo: Stage.HELO, MailFrom: Stage.MAIL, Unknown: Stage.HELO}),
    Stage.MAIL: _with_common(Stage.MAIL, {RcptTo: Stage.RCPT, Unknown: Stage.MAIL}),
    Stage.RCPT: _with_common(Stage.RCPT, {
        RcptTo: Stage.RCPT, Data: Stage.DATA, Unknown: Stage.RCPT}),
    Stage.DATA: _with_common(Stage.DATA, {
        Header: Stage.HEADERS, EndOfHeaders: Stage.EOH}),
    Stage.HEADERS: _with_common(Stage.HEADERS, {
        Header: Stage.HEADERS, EndOfHeaders: Stage.EOH}),
    Stage.EOH: _with_common(Stage.EOH, {
        BodyChunk: Stage.BODY, EndOfMessage: Stage.EOM}),
    Stage.BODY: _with_common(Stage.BODY, {
        BodyChunk: Stage.BODY, EndOfMessage: Stage.EOM}),
    Stage.EOM: {Abort: Stage.HELO, QuitNewConnection: Stage.OPTIONS,
                Quit: Stage.CLOSED},
    Stage.CLOSED: {},
}

#: Commands the MTA waits on a reply for unless this protocol flag was
#: negotiated.  ``O`` and ``E`` are always answered; ``D``, ``A``, ``K``,
#: ``Q`` never are.
_NO_REPLY_FLAG: Mapping[type, int] = {
    Connect: PROTO_NR_CONN, Helo: PROTO_NR_HELO, MailFrom: PROTO_NR_MAIL,
    RcptTo: PROTO_NR_RCPT, Data: PROTO_NR_DATA, Unknown: PROTO_NR_UNKN,
    Header: PROTO_NR_HDR, EndOfHeaders: PROTO_NR_EOH, BodyChunk: PROTO_NR_BODY,
}
_ALWAYS_ANSWERED = (OptionNegotiation, EndOfMessage)
#: Commands that settle any owed reply (and may come while one is owed).
_SETTLING = frozenset({Abort, Quit, QuitNewConnection})
_MODIFICATIONS = (AddHeader, InsertHeader, ChangeHeader, ReplaceBody, ChangeFrom,
                  AddRecipient, DeleteRecipient, AddRecipientWithArgs, Quarantine,
                  Progress)
_VERDICTS = (Accept, Continue, Reject, Tempfail, Discard, ReplyCode, ConnectionFail)

_Row = dict[type, tuple[Stage, "_Row"]]


def _rows() -> dict[Stage, _Row]:
    """:data:`TRANSITIONS` linked up: each move carries the next stage's row,
    so following the table needs no lookup keyed by stage."""
    rows: dict[Stage, _Row] = {stage: {} for stage in Stage}
    for stage, moves in TRANSITIONS.items():
        rows[stage].update((kind, (following, rows[following]))
                           for kind, following in moves.items())
    return rows


_ROWS = _rows()


@lru_cache(maxsize=None)
def _owing(protocol: int) -> frozenset[type]:
    """The commands that owe a reply under the negotiated ``protocol`` word."""
    return frozenset(_ALWAYS_ANSWERED) | {
        kind for kind, flag in _NO_REPLY_FLAG.items() if not protocol & flag}


class MilterConnection:
    """Server-side protocol state of one milter connection.

    Feed received bytes with :meth:`receive_data`, drain events with
    :meth:`next_event`, and turn every response into bytes with :meth:`send`
    (which checks the MTA is waiting for it).  Several messages may follow
    each other; ``K`` starts over at :attr:`Stage.OPTIONS`.

    Bounds: ``max_headers`` per message and ``max_macro_names`` distinct macro
    names per connection (reset by ``K``), in addition to the decoder's
    ``max_frame``, ``max_macros`` and ``max_args``.  A header is never larger
    than one frame.  Body bytes are not kept: :attr:`body_size` counts them
    so the session can decide when to spill to disk.

    Replies are owed for ``O``, ``E`` and every stage whose no-reply flag
    the sent negotiation reply lacks (Rspamd's reply sets them all).  A
    verdict answering such an earlier stage only settles the reply; the
    stage table does not model an MTA abandoning a transaction after a
    rejection there.

    Attributes:
        stage: the current :class:`Stage`.
        offer: the MTA's :class:`OptionNegotiation`, once received.
        negotiated: the :class:`OptionNegotiationReply` sent, once sent.
        body_size: body bytes received for the current message.
        header_count: headers received for the current message.
        messages: end-of-message commands answered on this connection.
    """

    def __init__(self, *, max_frame: int = MAX_PAYLOAD,
                 max_macros: int = DEFAULT_MAX_MACROS,
                 max_args: int = DEFAULT_MAX_ARGS,
                 max_macro_names: int = DEFAULT_MAX_MACRO_NAMES,
                 max_headers: int = DEFAULT_MAX_HEADERS) -> None:
        self._decoder = MilterDecoder(max_frame, max_macros=max_macros, max_args=max_args)
        self.max_macro_names = max_macro_names
        self.max_headers = max_headers
        self._stage = Stage.INIT
        self._row = _ROWS[Stage.INIT]
        self.offer: OptionNegotiation | None = None
        self._negotiated: OptionNegotiationReply | None = None
        self._owing = _owing(0)
        self.body_size = 0
        self.header_count = 0
        self.messages = 0
        self._macro_names: set[bytes] = set()
        self._owed: Command | None = None
        self._error: MilterProtocolError | None = None

    @property
    def stage(self) -> Stage:
        """The current :class:`Stage`."""
        return self._stage

    @stage.setter
    def stage(self, stage: Stage) -> None:
        self._stage = stage
        self._row = _ROWS[stage]

    @property
    def negotiated(self) -> OptionNegotiationReply | None:
        """The :class:`OptionNegotiationReply` sent, once sent."""
        return self._negotiated

    @negotiated.setter
    def negotiated(self, reply: OptionNegotiationReply | None) -> None:
        self._negotiated = reply
        self._owing = _owing(reply.protocol if reply is not None else 0)

    @property
    def reply_owed(self) -> Command | None:
        """The command the MTA is waiting on a reply to, if any."""
        return self._owed

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the MTA.  Never raises."""
        self._decoder.feed(data)

    def next_event(self) -> ServerEvent | None:
        """Return the next command, checked against the stage table.

        Returns ``None`` when more bytes are needed.  Raises
        :class:`MilterProtocolError` for malformed input, an out-of-order
        command, a command while a reply is owed, a protocol version below 6
        or an exceeded bound; the connection then stays failed.
        """
        if self._error is not None:
            raise self._error
        try:
            event = self._decoder.next_event()
            if event is not None and not isinstance(event, HttpPing):
                self._advance(event)
        except MilterProtocolError as error:
            self._error = error
            raise
        return event

    def __iter__(self) -> Iterator[ServerEvent]:
        """Yield every complete, valid event currently buffered.

        Each event is checked when it is reached, so what the consumer does
        with one (answering a negotiation, say) counts for the next.
        """
        decoder = self._decoder
        advance = self._advance
        while True:
            if self._error is not None:
                raise self._error
            try:
                event = decoder.next_event()
                if event is None:
                    return
                if not isinstance(event, HttpPing):
                    advance(event)
            except MilterProtocolError as error:
                self._error = error
                raise
            yield event

    def _advance(self, event: Command) -> None:
        kind = type(event)
        if self._owed is not None and kind not in _SETTLING:
            raise MilterProtocolError(
                f"{kind.__name__} received while a reply to "
                f"{type(self._owed).__name__} is owed")
        move = self._row.get(kind)
        if move is None:
            raise MilterProtocolError(
                f"{kind.__name__} out of order at stage {self._stage.value}")
        if kind is Header:
            if self.header_count >= self.max_headers:
                raise MilterProtocolError(f"too many headers (limit {self.max_headers})")
            self.header_count += 1
        elif isinstance(event, BodyChunk):
            self.body_size += len(event.data)
        elif isinstance(event, Macro):
            self._count_macros(event)
        elif isinstance(event, (MailFrom, Abort)):
            self._reset_message()
        elif isinstance(event, OptionNegotiation):
            if event.version < PROTOCOL_VERSION:
                raise MilterProtocolError(f"invalid protocol version: {event.version}")
            self.offer = event
        elif isinstance(event, QuitNewConnection):
            self._reset_message()
            self._macro_names.clear()
        if kind in _SETTLING:
            self._owed = None
        elif kind in self._owing:
            self._owed = event
        self._stage, self._row = move

    def _count_macros(self, event: Macro) -> None:
        names = self._macro_names
        for name, _ in event.macros:
            folded = name.lower()
            if folded not in names:
                if len(names) >= self.max_macro_names:
                    raise MilterProtocolError(
                        f"too many macros (limit {self.max_macro_names})")
                names.add(folded)

    def _reset_message(self) -> None:
        self.body_size = 0
        self.header_count = 0

    def send(self, response: Response) -> bytes:
        """Return the bytes of *response* after checking it is due now.

        The negotiation reply answers ``O``; modifications, quarantine and
        progress belong to the end-of-message verdict; ``s`` answers a body
        chunk; accept/continue/reject/tempfail/discard/reply-code/connection-
        fail end whichever reply is owed.  Ending the end-of-message reply
        finishes the message and returns to :attr:`Stage.HELO`.

        Raises :class:`MilterUsageError` if the MTA is not waiting for it.
        """
        owed = self._owed
        if isinstance(response, _VERDICTS):
            if owed is None or isinstance(owed, OptionNegotiation):
                raise MilterUsageError(f"{type(response).__name__} while no verdict is owed")
            self._owed = None
            if isinstance(owed, EndOfMessage):
                self.messages += 1
                self._reset_message()
                self.stage = Stage.HELO
        elif isinstance(response, OptionNegotiationReply):
            if not isinstance(owed, OptionNegotiation):
                raise MilterUsageError("negotiation reply without an offer to answer")
            self.negotiated = response
            self._owed = None
        elif isinstance(response, _MODIFICATIONS):
            if not isinstance(owed, EndOfMessage):
                raise MilterUsageError(
                    f"{type(response).__name__} outside the end-of-message reply")
        elif isinstance(response, Skip):
            if not isinstance(owed, BodyChunk):
                raise MilterUsageError("skip is only a reply to a body chunk")
            self._owed = None
        else:
            raise MilterUsageError(f"not a milter response: {response!r}")
        return response.encode()
