"""Rspamd's HTTP scan protocol and the legacy RSPAMC/SPAMC text protocol.

A pure, incremental codec: bytes go in through ``feed``/``feed_eof`` and typed
events come out; the encoders turn arguments into bytes.  Nothing here does I/O.

Server side (what clients send Rspamd, http-protocol.md §1, §8, §9):

* :class:`RequestParser` parses HTTP/1.0 and HTTP/1.1 requests with any method
  and target (``GET`` with a body is legal), ``Content-Length`` or chunked
  bodies, several requests on a keep-alive connection, and the legacy request
  lines ``CHECK``/``SYMBOLS`` followed by an ``RSPAMC/…`` or ``SPAMC/…`` token.
  Events: :class:`Request`, then zero or more :class:`Data`, then
  :class:`EndOfMessage`.
* :func:`encode_response` writes an HTTP reply with a correct
  ``Content-Length``; :func:`encode_legacy_reply` writes the reply to a legacy
  request (status line ``RSPAMD/1.3 0 EX_OK`` or ``SPAMD/1.1 0 EX_OK`` plus its
  ``Content-length`` line, then the body, with no header block).

Client side (what a proxy sends a scanner, upstreams-and-proxy.md §4.3):

* :func:`encode_request` writes a request with a correct ``Content-Length``.
* :class:`ResponseParser` parses a reply framed by ``Content-Length``, chunked
  encoding or the end of the connection.  Events: :class:`Response`, zero or
  more :class:`Data`, :class:`EndOfMessage`.

Headers are kept as ``(name, value)`` pairs in wire order, with their original
case and duplicates (rspamc and Exim send one ``Rcpt`` header per recipient).
Names and values are decoded as ISO-8859-1 so every byte survives a round trip.

Every bound (line length, header count, header section size, body size, chunk
size) is checked before the data is kept.  The only exception the parsers raise
is :class:`HttpProtocolError`; after one the parser is unusable.  Rspamd itself
answers none of these errors (it closes the connection, http-protocol.md §7):
the status carried by the error is what an HTTP server would answer and what a
listener logs.
"""

from __future__ import annotations

import enum
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

__all__ = [
    "Data",
    "EndOfMessage",
    "Event",
    "Headers",
    "HttpLimits",
    "HttpProtocolError",
    "HttpStatusError",
    "LegacyInfo",
    "LegacyVariant",
    "Request",
    "RequestParser",
    "Response",
    "ResponseParser",
    "encode_legacy_reply",
    "encode_request",
    "encode_request_head",
    "encode_response",
    "encode_response_head",
    "header_value",
    "header_values",
]

Headers = tuple[tuple[str, str], ...]
"""Header fields as ``(name, value)`` pairs in wire order."""

DEFAULT_MAX_MESSAGE = 50 * 1024 * 1024
"""Rspamd's default ``max_message`` (50 MiB)."""


class HttpStatusError(Exception):
    """A failure that maps to the HTTP status a proxy answers for it.

    Attributes:
        status: the HTTP status code.
        reason: a short human-readable explanation (the reason phrase).
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"


class HttpProtocolError(HttpStatusError):
    """The peer broke the protocol or a bound.

    Attributes:
        status: the HTTP status an HTTP server would answer (400 malformed,
            413 body too large, 431 header section too large, 501 unsupported
            transfer coding, 505 unsupported version, 502 for a broken reply
            seen by the client side).
        reason: a short human-readable explanation, suitable for logs.
    """


@dataclass(frozen=True)
class HttpLimits:
    """Bounds applied by the parsers.

    Attributes:
        max_message: largest body accepted, in bytes (Rspamd's ``max_message``
            on the server side; the largest reply on the client side).
        max_header_count: most header lines in one message (trailers count).
        max_line: longest start line, header line or chunk-size line, in bytes
            without its line ending.
        max_header_section: most bytes of start line plus header lines.
    """

    max_message: int = DEFAULT_MAX_MESSAGE
    max_header_count: int = 4096
    max_line: int = 65536
    max_header_section: int = 1024 * 1024


def header_values(headers: Iterable[tuple[str, str]], name: str) -> list[str]:
    """All values of header ``name`` (case-insensitive), in wire order."""
    wanted = name.lower()
    return [value for key, value in headers if key.lower() == wanted]


def header_value(headers: Iterable[tuple[str, str]], name: str) -> str | None:
    """The first value of header ``name`` (case-insensitive), or ``None``."""
    wanted = name.lower()
    for key, value in headers:
        if key.lower() == wanted:
            return value
    return None


def _persistent(version: str, connection: Iterable[str]) -> bool:
    """Whether a message of HTTP ``version`` with these ``Connection`` values keeps the connection:
    HTTP/1.1 unless a ``close`` token, HTTP/1.0 with ``keep-alive`` and without ``close``."""
    keep_alive = False
    for value in connection:
        for token in value.split(","):
            token = token.strip().lower()
            if token == "close":
                return False
            if token == "keep-alive":
                keep_alive = True
    return version == "1.1" or keep_alive


#: Header fields that decide the framing of a body and the connection's fate.
_FRAMING_FIELDS = frozenset({"transfer-encoding", "content-length", "connection"})


@dataclass
class _FramingFields:
    """The values of the :data:`_FRAMING_FIELDS` of one header block, in wire order."""

    transfer_encoding: list[str]
    content_length: list[str]
    connection: list[str]

    def add(self, lower: str, value: str) -> None:
        """Note ``value`` of the field named ``lower`` (lower case) if it is a framing field."""
        if lower in _FRAMING_FIELDS:
            if lower == "connection":
                self.connection.append(value)
            elif lower == "content-length":
                self.content_length.append(value)
            else:
                self.transfer_encoding.append(value)


def _framing_fields(headers: Headers) -> _FramingFields:
    """Collect the framing fields of ``headers`` in one pass."""
    fields = _FramingFields([], [], [])
    for name, value in headers:
        fields.add(name.lower(), value)
    return fields


class LegacyVariant(enum.Enum):
    """The two legacy text dialects (http-protocol.md §9.1)."""

    RSPAMC = "rspamc"
    """Old rspamc clients and Exim's ``variant=rspamd``; reply ``RSPAMD/1.3``."""
    SPAMC = "spamc"
    """SpamAssassin's spamc; reply ``SPAMD/1.1``."""


@dataclass(frozen=True)
class LegacyInfo:
    """How a legacy request line was spelt.

    Attributes:
        variant: the dialect, chosen by the first letter of the protocol token
            (``S`` spamc, ``R`` rspamc), as Rspamd does.
        command: ``CHECK`` or ``SYMBOLS`` (both mean a full scan).
        protocol: the rest of the request line, e.g. ``RSPAMC/1.3``.
    """

    variant: LegacyVariant
    command: str
    protocol: str


class _HeaderLookup:
    """Header lookups of a message start (:class:`Request`, :class:`Response`)."""

    headers: Headers

    def get(self, name: str) -> str | None:
        """First value of header ``name`` (case-insensitive), or ``None``."""
        return header_value(self.headers, name)

    def get_all(self, name: str) -> list[str]:
        """All values of header ``name`` (case-insensitive), in wire order."""
        return header_values(self.headers, name)


@dataclass(frozen=True)
class Request(_HeaderLookup):
    """Start of a request.

    Attributes:
        method: the method as sent (``POST``, ``GET``, … or the legacy command).
        target: the request target (``/checkv2``, ``/ping?x=1``…); ``""`` for
            legacy requests, which carry no URL.
        version: ``"1.0"`` or ``"1.1"``; ``"1.0"`` for legacy requests.
        headers: header fields in wire order, original case, duplicates kept.
        legacy: set for RSPAMC/SPAMC requests, ``None`` for HTTP.
    """

    method: str
    target: str
    version: str
    headers: Headers
    legacy: LegacyInfo | None = None

    @property
    def keep_alive(self) -> bool:
        """Whether the client lets the connection carry another request.

        HTTP/1.1 unless ``Connection: close``; HTTP/1.0 only with
        ``Connection: keep-alive``; never for legacy requests.
        """
        return self.legacy is None and _persistent(self.version, header_values(self.headers, "Connection"))


@dataclass(frozen=True)
class Response(_HeaderLookup):
    """Start of a reply.

    Attributes:
        status: the three-digit status code.
        reason: the reason phrase (Rspamd puts error messages here).
        headers: header fields in wire order, original case, duplicates kept.
        version: ``"1.0"`` or ``"1.1"``.
        keep_alive: whether the connection may carry another request after
            this reply: false for ``Connection: close`` (Rspamd 3.4 always
            sends it), for HTTP/1.0 without ``keep-alive`` and for replies
            whose body ends at the end of the connection.
    """

    status: int
    reason: str
    headers: Headers
    version: str = "1.1"
    keep_alive: bool = False


@dataclass(frozen=True)
class Data:
    """A piece of the body, in order; pieces are never empty."""

    chunk: bytes


@dataclass(frozen=True)
class EndOfMessage:
    """The body is complete."""


Event = Request | Response | Data | EndOfMessage

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_REQUEST_LINE = re.compile(
    rb"(?P<method>[!#$%&'*+\-.^_`|~0-9A-Za-z]+) +(?P<target>[^\x00-\x20\x7f]+) +"
    rb"HTTP/(?P<major>[0-9])\.(?P<minor>[0-9])"
)
_STATUS_LINE = re.compile(
    rb"HTTP/(?P<major>[0-9])\.(?P<minor>[0-9]) (?P<status>[0-9]{3})(?: (?P<reason>[^\x00\r\n]*))?"
)
_LEGACY_COMMANDS = frozenset({b"CHECK", b"SYMBOLS"})
_OTHER_SPAMD_VERBS = frozenset(
    {b"PROCESS", b"REPORT", b"REPORT_IFSPAM", b"SKIP", b"PING", b"TELL", b"HEADERS"}
)
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\x00]*)?")
_CONTENT_LENGTH = re.compile(rb"[0-9]{1,20}")
#: Header names already seen to be tokens, with their lower-case form.
_HEADER_NAMES: dict[str, str] = {}
#: Most names :data:`_HEADER_NAMES` keeps.
_HEADER_NAMES_KEPT = 4096
_TOKEN_TEXT = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _learn_header_name(name: str) -> str | None:
    """The lower-case form of a header name that is a token (remembered), else ``None``."""
    if not _TOKEN_TEXT.fullmatch(name):
        return None
    lower = name.lower()
    if len(_HEADER_NAMES) < _HEADER_NAMES_KEPT:
        _HEADER_NAMES[name] = lower
    return lower


class _State(enum.Enum):
    START = "start"
    HEADERS = "headers"
    BODY = "body"
    CHUNK_SIZE = "chunk-size"
    CHUNK_DATA = "chunk-data"
    CHUNK_END = "chunk-end"
    TRAILERS = "trailers"
    UNTIL_CLOSE = "until-close"
    DONE = "done"
    FAILED = "failed"


@dataclass
class _Framing:
    """How the body of the message being parsed is delimited."""

    chunked: bool = False
    length: int = 0
    until_close: bool = False


class _MessageParser(ABC):
    """Shared machinery: line splitting, header block, body framing."""

    _error_status = 400
    _oversize_status = 431

    def __init__(self, limits: HttpLimits | None = None) -> None:
        self.limits = limits if limits is not None else HttpLimits()
        self._buffer = bytearray()
        self._state = _State.START
        self._section_bytes = 0
        self._header_lines: list[bytes] = []
        self._remaining = 0
        self._body_bytes = 0

    # -- helpers -----------------------------------------------------------

    def _fail(self, status: int, reason: str) -> HttpProtocolError:
        self._state = _State.FAILED
        self._buffer.clear()
        return HttpProtocolError(status, reason)

    def _take_line(self) -> bytes | None:
        """Remove and return one line without its ending, or None if incomplete."""
        end = self._buffer.find(b"\n")
        limit = self.limits.max_line
        if end < 0:
            if len(self._buffer) > limit + 1:
                raise self._fail(self._oversize_status, "line too long")
            if (
                self._in_head()
                and self._section_bytes + len(self._buffer) > self.limits.max_header_section
            ):
                raise self._fail(self._oversize_status, "header section too large")
            return None
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > limit:
            raise self._fail(self._oversize_status, "line too long")
        if self._in_head():
            self._section_bytes += end + 1
            if self._section_bytes > self.limits.max_header_section:
                raise self._fail(self._oversize_status, "header section too large")
        return line

    def _in_head(self) -> bool:
        return self._state in (_State.START, _State.HEADERS, _State.TRAILERS)

    def _parse_headers(self, lines: Sequence[bytes]) -> Headers:
        fields: list[tuple[str, str]] = []
        for line in lines:
            name, colon, value = line.partition(b":")
            if not colon or not _TOKEN.fullmatch(name):
                raise self._fail(self._error_status, "malformed header line")
            value = value.strip(b" \t")
            if b"\x00" in value or b"\r" in value:
                raise self._fail(self._error_status, "invalid character in header value")
            fields.append((name.decode("latin-1"), value.decode("latin-1")))
        return tuple(fields)

    def _collect_header(self, line: bytes) -> bool:
        """Store one header line; return True when the header block ended."""
        if not line:
            return True
        if line[:1] in (b" ", b"\t"):
            raise self._fail(self._error_status, "obsolete header folding")
        if len(self._header_lines) >= self.limits.max_header_count:
            raise self._fail(self._oversize_status, "too many header lines")
        self._header_lines.append(line)
        return False

    def _framing(self, fields: _FramingFields, allow_close: bool) -> _Framing:
        encodings = fields.transfer_encoding
        if encodings:
            codings = [c.strip().lower() for v in encodings for c in v.split(",") if c.strip()]
            if codings != ["chunked"]:
                raise self._fail(501, "unsupported transfer encoding")
            return _Framing(chunked=True)
        lengths = fields.content_length
        if lengths:
            text = lengths[0].strip()
            if len(lengths) > 1 and any(value.strip() != text for value in lengths):
                raise self._fail(self._error_status, "conflicting Content-Length")
            raw = text.encode("latin-1")
            if not _CONTENT_LENGTH.fullmatch(raw):
                raise self._fail(self._error_status, "invalid Content-Length")
            length = int(raw)
            if length > self.limits.max_message:
                raise self._fail(413, "body larger than max_message")
            return _Framing(length=length)
        return _Framing(until_close=allow_close)

    def _start_body(self, framing: _Framing, events: list[Event]) -> None:
        self._body_bytes = 0
        if framing.chunked:
            self._state = _State.CHUNK_SIZE
        elif framing.until_close:
            self._state = _State.UNTIL_CLOSE
        elif framing.length:
            self._remaining = framing.length
            self._state = _State.BODY
        else:
            self._finish(events)

    def _count_body(self, size: int) -> None:
        self._body_bytes += size
        if self._body_bytes > self.limits.max_message:
            raise self._fail(413, "body larger than max_message")

    def _finish(self, events: list[Event]) -> None:
        events.append(EndOfMessage())
        self._message_done()

    def _message_done(self) -> None:
        self._state = _State.DONE

    def _begin_message(self) -> None:
        self._section_bytes = 0
        self._header_lines = []

    # -- the state machine -------------------------------------------------

    def feed(self, data: bytes) -> list[Event]:
        """Consume ``data`` and return the events it completes, in order.

        Raises:
            HttpProtocolError: the input is malformed or exceeds a bound; the
                parser must not be used afterwards.
        """
        if self._state is _State.FAILED:
            raise HttpProtocolError(self._error_status, "parser already failed")
        if self._state is _State.DONE:
            return []
        events: list[Event] = []
        if not self._buffer and type(data) is bytes:
            data = self._consume_direct(data, events)
        if data and self._wants_input():
            self._buffer += data
            while self._step(events):
                pass
        return events

    def _wants_input(self) -> bool:
        """Whether further bytes belong to a message (after the last one they are ignored)."""
        return self._state is not _State.DONE

    def _consume_direct(self, data: bytes, events: list[Event]) -> bytes:
        """Consume a message start and body bytes straight from ``data`` (nothing buffered).

        The usual case -- a whole header block with CRLF line ends, then body
        bytes -- is handled without copying ``data`` into the line buffer:
        a complete, well-formed head is parsed in one pass and body bytes
        become :class:`Data` as they are.  Returns what is left for the
        line-by-line machinery, which handles everything else (partial heads,
        bare LF, chunked bodies, any malformed input) and reports errors.
        """
        while self._state is _State.START:
            rest = self._head_direct(data, events)
            if rest is None:
                return data
            data = rest
        if self._state is _State.BODY and data:
            remaining = self._remaining
            if len(data) < remaining:
                self._remaining = remaining - len(data)
                events.append(Data(data))
                return b""
            events.append(Data(data if len(data) == remaining else data[:remaining]))
            self._remaining = 0
            self._finish(events)
            return data[remaining:]
        return data

    def _head_direct(self, data: bytes, events: list[Event]) -> bytes | None:
        """Parse a message start that ``data`` holds whole; the bytes after it, or
        ``None`` (nothing consumed) when the line-by-line parser must decide.

        Only a head within every bound, whose start line has no CR or LF of its
        own and whose header lines are all CRLF-terminated, well-formed and
        unfolded is taken here; the result is then exactly what the line-by-line
        parser produces for it.
        """
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return None
        limits = self.limits
        size = end + 4
        if size > limits.max_line or size > limits.max_header_section:
            return None
        first = data.find(b"\r\n")
        line = data[:first]
        if not line or b"\n" in line or b"\r" in line:
            return None
        headers: list[tuple[str, str]] = []
        fields = _FramingFields([], [], [])
        if first < end:
            block = data[first + 2 : end].decode("latin-1")
            breaks = block.count("\r\n")
            # No CR or LF but the line breaks, no NUL anywhere.
            if block.count("\r") != breaks or block.count("\n") != breaks or "\x00" in block:
                return None
            if breaks >= limits.max_header_count:
                return None
            names = _HEADER_NAMES
            for text in block.split("\r\n"):
                name, colon, value = text.partition(":")
                if not colon:
                    return None
                lower = names.get(name)
                if lower is None:
                    lower = _learn_header_name(name)
                    if lower is None:
                        return None
                value = value.strip(" \t")
                fields.add(lower, value)
                headers.append((name, value))
        self._start_line(line, events)
        self._headers_complete(tuple(headers), events, fields)
        return data[size:]

    def _step(self, events: list[Event]) -> bool:
        """Advance once; return False when more input is needed."""
        handler = self._STEPS.get(self._state)
        return handler(self, events) if handler is not None else False

    def _step_start(self, events: list[Event]) -> bool:
        line = self._take_line()
        if line is None:
            return False
        return self._start_line(line, events)

    def _step_headers(self, events: list[Event]) -> bool:
        # Every buffered header line in one pass: the checks of _take_line
        # and _collect_header, in the same order, without removing each line
        # from the buffer separately.
        buffer = self._buffer
        limits = self.limits
        max_line = limits.max_line
        max_section = limits.max_header_section
        max_count = limits.max_header_count
        lines = self._header_lines
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                del buffer[:start]
                if len(buffer) > max_line + 1:
                    raise self._fail(self._oversize_status, "line too long")
                if self._section_bytes + len(buffer) > max_section:
                    raise self._fail(self._oversize_status, "header section too large")
                return False
            line = bytes(buffer[start:end])
            self._section_bytes += end + 1 - start
            start = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > max_line:
                raise self._fail(self._oversize_status, "line too long")
            if self._section_bytes > max_section:
                raise self._fail(self._oversize_status, "header section too large")
            if not line:
                del buffer[:start]
                self._headers_complete(self._parse_headers(lines), events)
                return True
            if line[:1] in (b" ", b"\t"):
                raise self._fail(self._error_status, "obsolete header folding")
            if len(lines) >= max_count:
                raise self._fail(self._oversize_status, "too many header lines")
            lines.append(line)

    def _take_body(self, events: list[Event]) -> bool:
        """Emit up to ``_remaining`` buffered body bytes; False if none are buffered."""
        if not self._buffer:
            return False
        size = min(self._remaining, len(self._buffer))
        if size == len(self._buffer):
            events.append(Data(bytes(self._buffer)))
            self._buffer.clear()
        else:
            with memoryview(self._buffer) as view:
                events.append(Data(view[:size].tobytes()))
            del self._buffer[:size]
        self._remaining -= size
        return True

    def _step_body(self, events: list[Event]) -> bool:
        if not self._take_body(events):
            return False
        if self._remaining == 0:
            self._finish(events)
        return True

    def _step_chunk_size(self, events: list[Event]) -> bool:
        line = self._take_line()
        if line is None:
            return False
        match = _CHUNK_SIZE.fullmatch(line)
        if match is None:
            raise self._fail(self._error_status, "invalid chunk size line")
        size = int(match.group(1), 16)
        if size == 0:
            self._state = _State.TRAILERS
            self._begin_message()
            return True
        self._count_body(size)
        self._remaining = size
        self._state = _State.CHUNK_DATA
        return True

    def _step_chunk_data(self, events: list[Event]) -> bool:
        if not self._take_body(events):
            return False
        if self._remaining == 0:
            self._state = _State.CHUNK_END
        return True

    def _step_chunk_end(self, events: list[Event]) -> bool:
        line = self._take_line()
        if line is None:
            return False
        if line:
            raise self._fail(self._error_status, "chunk data not followed by CRLF")
        self._state = _State.CHUNK_SIZE
        return True

    def _step_trailers(self, events: list[Event]) -> bool:
        line = self._take_line()
        if line is None:
            return False
        if self._collect_header(line):
            self._parse_headers(self._header_lines)
            self._finish(events)
        return True

    def _step_until_close(self, events: list[Event]) -> bool:
        if self._buffer:
            self._count_body(len(self._buffer))
            events.append(Data(bytes(self._buffer)))
            self._buffer.clear()
        return False

    _STEPS: ClassVar[dict[_State, Callable[[_MessageParser, list[Event]], bool]]] = {
        _State.START: _step_start,
        _State.HEADERS: _step_headers,
        _State.BODY: _step_body,
        _State.CHUNK_SIZE: _step_chunk_size,
        _State.CHUNK_DATA: _step_chunk_data,
        _State.CHUNK_END: _step_chunk_end,
        _State.TRAILERS: _step_trailers,
        _State.UNTIL_CLOSE: _step_until_close,
    }
    """What each state does with buffered input; DONE and FAILED consume nothing."""

    @abstractmethod
    def _start_line(self, line: bytes, events: list[Event]) -> bool:
        """Handle the first line of a message; return True to keep stepping."""

    @abstractmethod
    def _headers_complete(
        self, headers: Headers, events: list[Event], fields: _FramingFields | None = None
    ) -> None:
        """Emit the message-start event and set up body framing (``fields``: the
        framing fields of ``headers`` when the caller collected them already)."""


class RequestParser(_MessageParser):
    """Incremental parser for requests a client sends Rspamd.

    Usage: call :meth:`feed` with each piece of received data and handle the
    returned events; call :meth:`feed_eof` when the peer closed its side.

    After a request that keeps the connection open (:attr:`Request.keep_alive`)
    the parser goes on with the next request on the connection; after any other
    request, further bytes are ignored (the server closes after replying).
    Blank lines before a request line are skipped.  Requests without
    ``Content-Length`` or ``Transfer-Encoding`` have an empty body.  Legacy
    requests may use either framing, as with Rspamd.  Other spamd verbs
    (``PROCESS``, ``REPORT``, ``PING`` …) fail with 400: Rspamd closes the
    connection on them without a reply.
    """

    def __init__(self, limits: HttpLimits | None = None) -> None:
        super().__init__(limits)
        self._pending: tuple[bytes, str, str, LegacyInfo | None] | None = None
        self._keep_alive = False

    def _start_line(self, line: bytes, events: list[Event]) -> bool:
        if not line:
            return True
        self._pending = self._parse_request_line(line)
        self._state = _State.HEADERS
        return True

    def _parse_request_line(self, line: bytes) -> tuple[bytes, str, str, LegacyInfo | None]:
        method, space, rest = line.partition(b" ")
        if space and method in _LEGACY_COMMANDS:
            protocol = rest.lstrip(b" ")
            if protocol[:1] == b"S":
                variant = LegacyVariant.SPAMC
            elif protocol[:1] == b"R":
                variant = LegacyVariant.RSPAMC
            else:
                raise self._fail(400, "invalid legacy protocol token")
            info = LegacyInfo(variant, method.decode("ascii"), protocol.decode("latin-1"))
            return method, "", "1.0", info
        if (
            space
            and method in _OTHER_SPAMD_VERBS
            and rest.lstrip(b" ")[:6] in (b"SPAMC/", b"RSPAMC")
        ):
            raise self._fail(400, f"unsupported legacy command {method.decode('ascii')}")
        match = _REQUEST_LINE.fullmatch(line)
        if match is None:
            raise self._fail(400, "malformed request line")
        if match.group("major") != b"1":
            raise self._fail(505, "unsupported HTTP version")
        version = "1.1" if match.group("minor") != b"0" else "1.0"
        return match.group("method"), match.group("target").decode("latin-1"), version, None

    def _headers_complete(
        self, headers: Headers, events: list[Event], fields: _FramingFields | None = None
    ) -> None:
        assert self._pending is not None
        method, target, version, legacy = self._pending
        self._pending = None
        request = Request(method.decode("ascii"), target, version, headers, legacy)
        if fields is None:
            fields = _framing_fields(headers)
        self._keep_alive = legacy is None and _persistent(version, fields.connection)
        framing = self._framing(fields, allow_close=False)
        events.append(request)
        self._start_body(framing, events)

    def _message_done(self) -> None:
        if self._keep_alive:
            self._state = _State.START
            self._begin_message()
        else:
            self._state = _State.DONE
            self._buffer.clear()

    def feed_eof(self) -> list[Event]:
        """The client closed its side.

        Returns no events.  Raises :class:`HttpProtocolError` (400) when the
        connection closed in the middle of a request; a close between requests
        (nothing buffered but blank lines) is clean.
        """
        if self._state is _State.DONE:
            return []
        if self._state is _State.START and not self._buffer.strip(b"\r\n"):
            return []
        raise self._fail(400, "connection closed inside a request")


class ResponseParser(_MessageParser):
    """Incremental parser for one reply from a scanner.

    ``Content-Length``, chunked and close-delimited bodies are understood;
    ``1xx`` interim replies are skipped; ``204`` and ``304`` have no body.
    ``limits.max_message`` bounds the reply body.  The parser handles one
    reply: bytes after it are ignored.  Errors carry status 502 (a bad reply),
    or 413 for a body over the bound.
    """

    _error_status = 502
    _oversize_status = 502

    def __init__(self, limits: HttpLimits | None = None) -> None:
        super().__init__(limits)
        self._status_line: tuple[int, str, str] | None = None
        self._seen_any = False

    def feed(self, data: bytes) -> list[Event]:
        """Consume ``data`` and return the events it completes, in order.

        Raises:
            HttpProtocolError: the reply is malformed or exceeds a bound; the
                parser must not be used afterwards.
        """
        if data:
            self._seen_any = True
        return super().feed(data)

    def _start_line(self, line: bytes, events: list[Event]) -> bool:
        match = _STATUS_LINE.fullmatch(line)
        if match is None:
            raise self._fail(502, "malformed status line")
        if match.group("major") != b"1":
            raise self._fail(502, "unsupported HTTP version in reply")
        version = "1.1" if match.group("minor") != b"0" else "1.0"
        reason = (match.group("reason") or b"").decode("latin-1")
        self._status_line = (int(match.group("status")), reason, version)
        self._state = _State.HEADERS
        return True

    def _headers_complete(
        self, headers: Headers, events: list[Event], fields: _FramingFields | None = None
    ) -> None:
        assert self._status_line is not None
        status, reason, version = self._status_line
        self._status_line = None
        if status == 101:
            raise self._fail(502, "unexpected protocol switch")
        if 100 <= status < 200:
            self._state = _State.START
            self._begin_message()
            return
        if fields is None:
            fields = _framing_fields(headers)
        if status in (204, 304):
            framing = _Framing()
        else:
            framing = self._framing(fields, allow_close=True)
        keep_alive = _persistent(version, fields.connection) and not framing.until_close
        events.append(Response(status, reason, headers, version, keep_alive))
        self._start_body(framing, events)

    def feed_eof(self) -> list[Event]:
        """The scanner closed the connection.

        Returns ``[EndOfMessage()]`` when that ends a close-delimited body, no
        events when the reply was already complete.  Raises
        :class:`HttpProtocolError` (502) when the reply is incomplete or absent.
        """
        if self._state is _State.DONE:
            return []
        if self._state is _State.UNTIL_CLOSE:
            events: list[Event] = []
            self._finish(events)
            return events
        if self._state is _State.FAILED:
            raise HttpProtocolError(502, "parser already failed")
        if not self._seen_any:
            raise self._fail(502, "connection closed without a reply")
        raise self._fail(502, "connection closed inside the reply")


# -- encoders ---------------------------------------------------------------

_HEADER_VALUE_FORBIDDEN = re.compile(r"[\x00\r\n]")
_TARGET_FORBIDDEN = re.compile(rb"[\x00-\x20\x7f]")
#: Names the encoders handle themselves (the body is always sent whole).
_LENGTH_FIELDS = ("transfer-encoding", "content-length")


def _check_header_fields(headers: Iterable[tuple[str, str]]) -> None:
    """Raise ``ValueError`` for the first header with a bad name or value, in order."""
    for name, value in headers:
        if not _TOKEN.fullmatch(name.encode("latin-1")):
            raise ValueError(f"invalid header name {name!r}")
        if _HEADER_VALUE_FORBIDDEN.search(value):
            raise ValueError(f"invalid header value for {name!r}")


def _encode_headers(headers: Iterable[tuple[str, str]], length: int | None) -> bytes:
    """Header block with ``Content-Length`` forced to ``length``.

    A caller-supplied ``Content-Length`` keeps its position but gets the true
    value (later duplicates are dropped); otherwise it is appended.  Any
    ``Transfer-Encoding`` is dropped since the body is sent whole.  Raises
    ``ValueError`` for a name that is not a token or a value with NUL, CR or LF.
    """
    if not isinstance(headers, (list, tuple)):
        headers = tuple(headers)
    lines: list[str] = []
    length_written = length is None
    names = _HEADER_NAMES
    for name, value in headers:
        lower = names.get(name)
        if lower is None:
            lower = _learn_header_name(name)
            if lower is None:
                _check_header_fields(headers)
                raise ValueError(f"invalid header name {name!r}")
        if lower in _LENGTH_FIELDS:
            if lower == "transfer-encoding" or length_written:
                continue
            value = str(length)
            length_written = True
        lines.append(f"{name}: {value}\r\n")
    text = "".join(lines)
    count = len(lines)
    # Every line brings exactly one CR and one LF: any other is in a value.
    if text.count("\n") != count or text.count("\r") != count or "\x00" in text:
        _check_header_fields(headers)
    if not length_written:
        text += f"Content-Length: {length}\r\n"
    return (text + "\r\n").encode("latin-1")


def encode_request(
    method: str,
    target: str,
    headers: Iterable[tuple[str, str]],
    body: bytes = b"",
    version: str = "1.1",
) -> bytes:
    """Bytes of an HTTP request: request line, headers, ``Content-Length``, body.

    ``Content-Length`` is always sent (``0`` for an empty body), as Rspamd's
    own client does.  Raises ``ValueError`` for a method, target or header that
    cannot be written (control characters, spaces in the target).
    """
    return encode_request_head(method, target, headers, len(body), version) + body


def encode_request_head(
    method: str,
    target: str,
    headers: Iterable[tuple[str, str]],
    length: int,
    version: str = "1.1",
) -> bytes:
    """The bytes :func:`encode_request` puts before a body of ``length`` bytes.

    Lets a sender pass a large body to the transport as it is, after the
    head, instead of copying it into one buffer.  Raises ``ValueError`` as
    :func:`encode_request` does.
    """
    raw_method = method.encode("ascii")
    raw_target = target.encode("latin-1")
    if not _TOKEN.fullmatch(raw_method):
        raise ValueError(f"invalid method {method!r}")
    if not raw_target or _TARGET_FORBIDDEN.search(raw_target):
        raise ValueError(f"invalid target {target!r}")
    if version not in ("1.0", "1.1"):
        raise ValueError(f"unsupported version {version!r}")
    start = raw_method + b" " + raw_target + b" HTTP/" + version.encode("ascii") + b"\r\n"
    return start + _encode_headers(headers, length)


def encode_response(
    status: int,
    reason: str,
    headers: Iterable[tuple[str, str]],
    body: bytes = b"",
) -> bytes:
    """Bytes of an HTTP/1.1 reply: status line, headers, ``Content-Length``, body.

    Rspamd's replies start with ``Connection: close``, ``Server``, ``Date``;
    pass them first to reproduce that order.  Raises ``ValueError`` for a status
    outside 100–999 or a reason/header with control characters.
    """
    return encode_response_head(status, reason, headers, len(body)) + body


def encode_response_head(
    status: int,
    reason: str,
    headers: Iterable[tuple[str, str]],
    length: int,
) -> bytes:
    """The bytes :func:`encode_response` puts before a body of ``length`` bytes.

    Lets a server hand a body to the transport as it is, after the head,
    instead of copying it into one buffer.  Raises ``ValueError`` as
    :func:`encode_response` does.
    """
    if not 100 <= status <= 999:
        raise ValueError(f"invalid status {status}")
    if _HEADER_VALUE_FORBIDDEN.search(reason):
        raise ValueError(f"invalid reason {reason!r}")
    start = f"HTTP/1.1 {status} {reason}\r\n".encode("latin-1")
    return start + _encode_headers(headers, length)


def _spamc_content_length(body: bytes) -> int:
    """Rspamd's spamc ``Content-length``: bytes after the first blank line.

    When the body has no blank line, or nothing follows it, the whole body
    length is used (an Rspamd quirk, http-protocol.md §9.2).
    """
    for separator in (b"\r\n\r\n", b"\n\n"):
        position = body.find(separator)
        if position >= 0:
            after = position + len(separator)
            return len(body) - after if after < len(body) else len(body)
    return len(body)


def encode_legacy_reply(variant: LegacyVariant, body: bytes) -> bytes:
    """Bytes of a reply to a legacy request: status line(s), then ``body``.

    RSPAMC: ``RSPAMD/1.3 0 EX_OK\\r\\n`` immediately followed by the body.
    SPAMC: ``SPAMD/1.1 0 EX_OK\\r\\nContent-length: N\\r\\n`` then the body, N
    computed as Rspamd does.  There is no header block; the server closes the
    connection afterwards.  ``body`` comes from :mod:`rspamd_tx.protocols.legacy_reply`.
    """
    if variant is LegacyVariant.SPAMC:
        length = _spamc_content_length(body)
        return (
            b"SPAMD/1.1 0 EX_OK\r\nContent-length: " + str(length).encode("ascii") + b"\r\n" + body
        )
    return b"RSPAMD/1.3 0 EX_OK\r\n" + body
