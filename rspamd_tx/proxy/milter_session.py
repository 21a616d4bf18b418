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
from collections.abc import Iterable
from typing import IO

from rspamd_tx.protocols.milter_events import (
    FAMILY_INET,
    FAMILY_INET6,
    FAMILY_UNIX,
    Abort,
    BodyChunk,
    Command,
    Connect,
    EndOfHeaders,
    Header,
    Helo,
    Macro,
    MailFrom,
    QuitNewConnection,
    RcptTo,
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


class MessageBuffer:
    """The reconstructed message, bounded and spilled to disk past a threshold.

    Bytes are kept in memory up to ``spill_threshold``; the first append that
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
        self._memory = bytearray()
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
        if self._file is None and self.size > self.spill_threshold:
            self._file = tempfile.TemporaryFile(dir=self.spill_dir)
            self._file.write(self._memory)
            self._memory = bytearray()
        if self._file is not None:
            self._file.write(data)
        else:
            self._memory += data

    def getvalue(self) -> bytes:
        """The stored message (at most ``max_size`` bytes); empty once oversize."""
        if self._file is None:
            return bytes(self._memory)
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
        self._memory = bytearray()
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

    def handle(self, command: Command) -> None:
        """Apply the effect of one MTA command on the session.

        ``O``, ``E`` and ``Q`` leave the state alone (the listener acts on them);
        ``T`` and ``U`` are ignored, as Rspamd does.
        """
        if isinstance(command, Macro):
            for name, value in command.macros:
                self._macros[name.lower()] = value
        elif isinstance(command, Connect):
            self._connect(command)
        elif isinstance(command, Helo):
            self.helo = command.name
        elif isinstance(command, MailFrom):
            self.sender = command.address
            self.sender_args = command.esmtp_args
        elif isinstance(command, RcptTo):
            if command.address:
                self.recipients.append((command.address, command.esmtp_args))
        elif isinstance(command, Header):
            self._header(command)
        elif isinstance(command, EndOfHeaders):
            self.message.append(b"\r\n")
        elif isinstance(command, BodyChunk):
            self.message.append(command.data)
        elif isinstance(command, Abort):
            self.reset_message()
        elif isinstance(command, QuitNewConnection):
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
            self.ip = parse_ip(command.family, command.address)
            port = command.port or 0
            if self.ip.version == 4:
                self.address = f"{self.ip}:{port}".encode("ascii")
            else:
                self.address = f"[{self.ip}]:{port}".encode("ascii")

    def _header(self, command: Header) -> None:
        folded = command.name.lower()
        self._occurrences[folded] = self._occurrences.get(folded, 0) + 1
        self._header_count += 1
        self.message.append(command.name + b": " + command.value + b"\r\n")

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
        return self.macro(b"{i}", b"i")

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
        for header, names in (
            (b"Queue-ID", (b"{i}", b"i")),
            (b"User-Agent", (b"{v}", b"v")),
            (b"TLS-Cipher", (b"{cipher}",)),
            (b"TLS-Version", (b"{tls_version}",)),
            (b"User", (b"{auth_authen}",)),
            (b"Mailer", (b"{rcpt_mailer}",)),
        ):
            value = self.macro(*names)
            if value is not None:
                yield header, value
        issuer = self.macro(b"{cert_issuer}")
        if issuer is not None:
            yield b"TLS-Cert-Issuer", issuer
            if client_ca_name is not None and issuer == client_ca_name.encode("utf-8"):
                subject = self.macro(b"{cert_subject}")
                if subject is not None:
                    yield b"User", subject
        if not self.hostname:
            client_name = self.macro(b"{client_name}")
            if client_name is not None and client_name != _UNKNOWN:
                yield b"Hostname", client_name
        mta_name = self.macro(b"{daemon_name}", b"{j}", b"j")
        if mta_name is not None:
            yield b"MTA-Name", mta_name

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
