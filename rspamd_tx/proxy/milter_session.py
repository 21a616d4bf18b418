"""The state of one milter connection and the scan request built from it.

A :class:`MilterSession` lives on one :class:`~rspamd_tx.proxy.milter_listener.MilterProtocol`
and keeps what Rspamd's milter layer keeps (milter.md §3–§5):

* **connection state**, kept across messages: the ``C`` hostname and address,
  the HELO name, the macro table (one per connection, later values replace
  earlier ones, looked up case-insensitively) and the sticky
  :class:`~rspamd_tx.proxy.milter_reply.ConnectionFlags`;
* **message state**, cleared by ``A``, by the end of a message and by ``K``:
  sender, recipients, their ESMTP args, the header occurrence table and
  counter, and the reconstructed message (``name: value\\r\\n`` per header,
  ``\\r\\n`` at end of headers, body chunks verbatim) in a
  :class:`MessageBuffer`;
* ``K`` also clears the client's address and hostname and the macro table;
  the HELO name survives it, as in Rspamd.

:meth:`MilterSession.scan_request` maps all of it to the Rspamd protocol
headers exactly as ``rspamd_milter_to_http`` does, plus the 3.14
``X-Rspamd-Mail-Esmtp-Args``/``X-Rspamd-Rcpt-Esmtp-Args`` headers.
"""

from __future__ import annotations

import ipaddress
import tempfile
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import IO, Any

from rspamd_tx.protocols.milter_events import (
    FAMILY_INET,
    FAMILY_INET6,
    FAMILY_UNIX,
    Abort,
    BodyChunk,
    Connect,
    EndOfHeaders,
    Header,
    Helo,
    Macro,
    MailFrom,
    QuitNewConnection,
    RcptTo,
    ServerEvent,
    parse_ip,
)
from rspamd_tx.proxy.milter_reply import ConnectionFlags, ReceivedHeaders
from rspamd_tx.proxy.scanning import ScanRequest

__all__ = ["DEFAULT_SPILL_THRESHOLD", "FLAGS", "MessageBuffer", "MilterSession"]

#: Message bytes kept in memory before the buffer moves to a temporary file.
DEFAULT_SPILL_THRESHOLD = 1024 * 1024
#: The ``Flags`` header of every milter scan.
FLAGS = b"milter,body_block"

_UNKNOWN = b"unknown"

#: Macros (lower case, first defined wins) sent as Rspamd protocol headers, in order.
_QUEUE_ID = (b"{i}", b"i")
_MACRO_HEADERS: tuple[tuple[bytes, tuple[bytes, ...]], ...] = (
    (b"Queue-ID", _QUEUE_ID),
    (b"User-Agent", (b"{v}", b"v")),
    (b"TLS-Cipher", (b"{cipher}",)),
    (b"TLS-Version", (b"{tls_version}",)),
    (b"User", (b"{auth_authen}",)),
    (b"Mailer", (b"{rcpt_mailer}",)),
)
_MTA_NAME = (b"{daemon_name}", b"{j}", b"j")


@lru_cache(maxsize=1024)
def _client_ip(
    family: str, address: bytes
) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, bytes]:
    """The client IP of a ``C`` address and its text before ``:port`` in the ``IP``
    header (IPv6 in brackets).  Cached: an MTA's clients come back."""
    ip = parse_ip(family, address)
    host = str(ip).encode("ascii")
    return ip, host if ip.version == 4 else b"[" + host + b"]"


class MessageBuffer:
    """The reconstructed message, bounded and spilled to disk past a threshold.

    Bytes are kept in memory up to ``spill_threshold``, as the pieces that
    were appended (joined once, by :meth:`getvalue`); the first append that
    would pass it moves everything to an anonymous temporary file (in
    ``spill_dir``, default the system's).  Past ``max_size`` nothing more is
    stored: :attr:`oversize` turns true and :attr:`size` keeps counting.

    Attributes:
        size: bytes appended, stored or not.
        oversize: more than ``max_size`` bytes were appended.
    """

    def __init__(
        self, max_size: int, spill_threshold: int = DEFAULT_SPILL_THRESHOLD, spill_dir: str | None = None
    ) -> None:
        self.max_size = max_size
        self.spill_threshold = spill_threshold
        self.spill_dir = spill_dir
        self.size = 0
        self.oversize = False
        self._parts: list[bytes] = []
        self._file: IO[bytes] | None = None

    @property
    def spilled(self) -> bool:
        """Whether the message lives in a temporary file."""
        return self._file is not None

    def append(self, data: bytes) -> None:
        """Add ``data``; only counted once the message is over ``max_size``."""
        self.size += len(data)
        if self.oversize:
            return
        if self.size > self.max_size:
            self.oversize = True
            self._drop()
            return
        if self._file is not None:
            self._file.write(data)
            return
        self._parts.append(data)
        if self.size > self.spill_threshold:
            self._file = tempfile.TemporaryFile(dir=self.spill_dir)
            self._file.writelines(self._parts)
            self._parts = []

    def getvalue(self) -> bytes:
        """The stored message (at most ``max_size`` bytes); empty once oversize.

        In memory the pieces are joined on the first call and kept joined,
        so the message is copied once and held once.
        """
        if self._file is None:
            parts = self._parts
            if len(parts) == 1:
                return parts[0]
            value = b"".join(parts)
            self._parts = [value] if value else []
            return value
        self._file.seek(0)
        data = self._file.read()
        self._file.seek(0, 2)
        return data

    def clear(self) -> None:
        """Forget the message and remove any temporary file."""
        self._drop()
        self.size = 0
        self.oversize = False

    def _drop(self) -> None:
        self._parts = []
        if self._file is not None:
            self._file.close()
            self._file = None


class MilterSession:
    """What one milter connection knows: connection data, macros, the current message.

    Args:
        max_message: the largest message kept (``max_message`` of the proxy).
        flags: the connection's sticky reply flags (initial values from the
            proxy options).
        spill_threshold: message bytes kept in memory before spilling to disk.
        spill_dir: directory of spilled messages (``None``: the system's).

    Attributes:
        hostname: the ``C`` hostname (empty: none).
        family: the ``C`` address family, ``None`` before ``C``.
        address: the client address text as the ``IP`` header shows it, if known.
        ip: the client IP, if the family is ``4``/``6`` and an address came.
        helo: the HELO name (empty: none).
        flags: the sticky reply flags.
        sender: the raw ``MAIL FROM`` address, ``None`` before ``M``.
        sender_args: its ESMTP args.
        recipients: ``(raw address, ESMTP args)`` per ``RCPT TO``.
        message: the reconstructed message.
    """

    def __init__(
        self,
        max_message: int,
        flags: ConnectionFlags,
        *,
        spill_threshold: int = DEFAULT_SPILL_THRESHOLD,
        spill_dir: str | None = None,
    ) -> None:
        self.flags = flags
        self.hostname = b""
        self.family: str | None = None
        self.address: bytes | None = None
        self.ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
        self.helo = b""
        self._macros: dict[bytes, bytes] = {}
        self.sender: bytes | None = None
        self.sender_args: tuple[bytes, ...] = ()
        self.recipients: list[tuple[bytes, tuple[bytes, ...]]] = []
        self._occurrences: dict[bytes, int] = {}
        self._header_count = 0
        self.message = MessageBuffer(max_message, spill_threshold, spill_dir)

    # -- commands ---------------------------------------------------------------

    def handle(self, command: ServerEvent) -> None:
        """Apply the effect of one MTA command on the session.

        ``O``, ``E`` and ``Q`` (and the HTTP ping) leave the state alone (the
        listener acts on them); ``T`` and ``U`` are ignored, as Rspamd does.
        """
        handler = _HANDLERS.get(type(command))
        if handler is not None:
            handler(self, command)

    def _macro(self, command: Macro) -> None:
        macros = self._macros
        for name, value in command.macros:
            macros[name.lower()] = value

    def _helo(self, command: Helo) -> None:
        self.helo = command.name

    def _mail_from(self, command: MailFrom) -> None:
        self.sender = command.address
        self.sender_args = command.esmtp_args

    def _rcpt_to(self, command: RcptTo) -> None:
        if command.address:
            self.recipients.append((command.address, command.esmtp_args))

    def _end_of_headers(self, command: EndOfHeaders) -> None:
        self.message.append(b"\r\n")

    def _body_chunk(self, command: BodyChunk) -> None:
        self.message.append(command.data)

    def _abort(self, command: Abort) -> None:
        self.reset_message()

    def _quit_new_connection(self, command: QuitNewConnection) -> None:
        self.reset_message()
        self.hostname = b""
        self.family = None
        self.address = None
        self.ip = None
        self._macros.clear()

    def _connect(self, command: Connect) -> None:
        self.hostname = command.hostname
        self.family = command.family
        self.address = None
        self.ip = None
        if command.address is None:
            return
        if command.family == FAMILY_UNIX:
            self.address = command.address
        elif command.family in (FAMILY_INET, FAMILY_INET6):
            self.ip, host = _client_ip(command.family, command.address)
            self.address = b"%s:%d" % (host, command.port or 0)

    def _header(self, command: Header) -> None:
        name = command.name
        folded = name.lower()
        occurrences = self._occurrences
        occurrences[folded] = occurrences.get(folded, 0) + 1
        self._header_count += 1
        self.message.append(name + b": " + command.value + b"\r\n")

    def reset_message(self) -> None:
        """Forget the current message (as ``A`` does); connection data stays."""
        self.sender = None
        self.sender_args = ()
        self.recipients = []
        self._occurrences = {}
        self._header_count = 0
        self.message.clear()

    def close(self) -> None:
        """Release the message buffer (the connection is gone)."""
        self.message.clear()

    # -- lookups ----------------------------------------------------------------

    def macro(self, *names: bytes) -> bytes | None:
        """The value of the first defined macro among ``names`` (case-insensitive)."""
        for name in names:
            value = self._macros.get(name.lower())
            if value is not None:
                return value
        return None

    @property
    def queue_id(self) -> bytes | None:
        """The MTA's queue id (``{i}``, then ``i``)."""
        return self._first_macro(_QUEUE_ID)

    def received_headers(self) -> ReceivedHeaders:
        """The header occurrences and counter of the current message."""
        return ReceivedHeaders(dict(self._occurrences), self._header_count)

    # -- the scan request -------------------------------------------------------

    def request_headers(self, client_ca_name: str | None = None) -> list[tuple[bytes, bytes]]:
        """The Rspamd protocol headers of the current message (milter.md §4–§5).

        ``client_ca_name``: when ``{cert_issuer}`` equals it byte for byte,
        ``{cert_subject}`` is also sent as ``User``.
        """
        headers: list[tuple[bytes, bytes]] = []
        add = headers.append
        if self.hostname and self.hostname != _UNKNOWN:
            add((b"Hostname", self.hostname))
        if self.helo:
            add((b"Helo", self.helo))
        if self.sender is not None:
            add((b"From", self.sender))
        for address, _ in self.recipients:
            add((b"Rcpt", address))
        if self.address is not None:
            add((b"IP", self.address))
        headers.extend(self._macro_headers(client_ca_name))
        add((b"Flags", FLAGS))
        headers.extend((b"X-Rspamd-Mail-Esmtp-Args", arg) for arg in self.sender_args)
        for index, (_, args) in enumerate(self.recipients):
            headers.extend(
                (b"X-Rspamd-Rcpt-Esmtp-Args", b"%d:%s" % (index, arg)) for arg in args
            )
        return headers

    def _macro_headers(self, client_ca_name: str | None) -> Iterable[tuple[bytes, bytes]]:
        first = self._first_macro
        for header, names in _MACRO_HEADERS:
            value = first(names)
            if value is not None:
                yield header, value
        issuer = first((b"{cert_issuer}",))
        if issuer is not None:
            yield b"TLS-Cert-Issuer", issuer
            if client_ca_name is not None and issuer == client_ca_name.encode("utf-8"):
                subject = first((b"{cert_subject}",))
                if subject is not None:
                    yield b"User", subject
        if not self.hostname:
            client_name = first((b"{client_name}",))
            if client_name is not None and client_name != _UNKNOWN:
                yield b"Hostname", client_name
        mta_name = first(_MTA_NAME)
        if mta_name is not None:
            yield b"MTA-Name", mta_name

    def _first_macro(self, names: tuple[bytes, ...]) -> bytes | None:
        """As :meth:`macro` for names already in lower case."""
        macros = self._macros
        for name in names:
            value = macros.get(name)
            if value is not None:
                return value
        return None

    def scan_request(self, log_tag: str, client_ca_name: str | None = None) -> ScanRequest:
        """The scan of the current message (``POST /checkv2``, default upstream).

        The client IP is the ``hash:`` balancing key; ``client_address`` is the
        ``IP`` header's text (``None`` when the MTA sent no address).
        """
        return ScanRequest(
            headers=tuple(self.request_headers(client_ca_name)),
            body=self.message.getvalue(),
            method=b"POST",
            target=b"/checkv2",
            route=None,
            hash_key=self.ip.packed if self.ip is not None else None,
            log_tag=log_tag,
            client_address=self.address.decode("utf-8", "replace") if self.address is not None else None,
        )


#: The session's handler of each command kind; kinds missing here leave it alone.
_HANDLERS: dict[type, Callable[[MilterSession, Any], None]] = {
    Macro: MilterSession._macro,
    Connect: MilterSession._connect,
    Helo: MilterSession._helo,
    MailFrom: MilterSession._mail_from,
    RcptTo: MilterSession._rcpt_to,
    Header: MilterSession._header,
    EndOfHeaders: MilterSession._end_of_headers,
    BodyChunk: MilterSession._body_chunk,
    Abort: MilterSession._abort,
    QuitNewConnection: MilterSession._quit_new_connection,
}
