"""HTTP client for scanner upstreams (Rspamd normal workers or controllers).

:class:`ScannerClient` sends one request and returns the whole reply::

    client = ScannerClient(reactor)
    d = client.request(IPv4Address("TCP", "127.0.0.1", 11333), "POST", "/checkv2",
                       [("Host", "local"), ("Connection", "keep-alive")], message, timeout=8.0)
    # d fires with ScannerResponse(status, reason, headers, body)

Connections are kept per address in a small pool when both sides allow it:
the request did not say ``Connection: close`` and the reply
(:attr:`~rspamd_tx.protocols.http_codec.Response.keep_alive`) did not either.
Rspamd 3.4 answers every request with ``Connection: close``, so against it
every request uses a fresh connection.  A pooled connection that the scanner
closed while idle is detected when the request gets no reply byte at all; the
request is then sent once more on a new connection.

Failures errback with a :class:`ScannerError` subclass; each carries the
``status`` and ``reason`` Rspamd's proxy would answer its client (``408 IO
timeout``, ``500 IO write error: Connection refused``, ``400 HTTP parser
error: …``) and is retryable on another upstream.  The returned Deferred is
cancellable: cancelling aborts the connection (or the connection attempt) and
errbacks with :class:`twisted.internet.defer.CancelledError`.

The reactor is injected (``IReactorTCP``, ``IReactorUNIX``, ``IReactorTime``).
On a real reactor numeric TCP and unix addresses are connected with
:class:`SocketStream`, a lean socket transport on the reactor's descriptor
sets; :class:`StreamPort` serves listening sockets with it (the proxy's HTTP
listener uses it).  Timeouts of all requests share one timer
(:class:`~rspamd_tx.upstreams.balancer.Deadlines`).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from twisted.internet import error as twisted_error
from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IDelayedCall,
    IListeningPort,
    IProtocol,
    IProtocolFactory,
    IReadDescriptor,
    IReadWriteDescriptor,
    ITransport,
)
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from rspamd_tx.protocols.http_codec import (
    Data,
    EndOfMessage,
    Headers,
    HttpLimits,
    HttpProtocolError,
    HttpStatusError,
    Response,
    ResponseParser,
    encode_request_head,
    header_values,
)
from rspamd_tx.upstreams.balancer import Deadlines

__all__ = [
    "Address",
    "SocketStream",
    "StreamPort",
    "write_now",
    "BadReply",
    "ConnectError",
    "ScannerClient",
    "ScannerError",
    "ScannerResponse",
    "ScannerTimeout",
]

Address = IPv4Address | IPv6Address | UNIXAddress | tuple[str, int] | str
"""Where a scanner listens: a Twisted TCP address, ``(host, port)``, or a unix
socket as ``UNIXAddress`` or a path string."""

_PoolKey = tuple[str, str, int]

_log = Logger()


class ScannerError(HttpStatusError):
    """A request to a scanner failed; the balancer may retry elsewhere.

    Attributes:
        status: the status Rspamd's proxy answers its client for this failure.
        reason: the matching message (also the status line's reason phrase).
        retryable: always true: every failure here is the upstream's.
    """

    retryable = True


class ConnectError(ScannerError):
    """The connection could not be established (refused, unreachable …)."""


class ScannerTimeout(ScannerError):
    """No complete reply within the request timeout."""

    def __init__(self) -> None:
        super().__init__(408, "IO timeout")


class BadReply(ScannerError):
    """The scanner's reply was malformed, too large, or cut short."""


@dataclass(frozen=True)
class ScannerResponse:
    """A complete reply from a scanner.

    Attributes:
        status: HTTP status code.
        reason: reason phrase (Rspamd puts its error message there).
        headers: header fields in wire order, original case, duplicates kept.
        body: the whole body (de-chunked; not decompressed).
    """

    status: int
    reason: str
    headers: Headers
    body: bytes

    def get(self, name: str) -> str | None:
        """First value of header ``name`` (case-insensitive), or ``None``."""
        values = header_values(self.headers, name)
        return values[0] if values else None

    def get_all(self, name: str) -> list[str]:
        """All values of header ``name`` (case-insensitive), in wire order."""
        return header_values(self.headers, name)


def write_now(transport: Any, *parts: bytes) -> None:
    """Write ``parts`` in order to ``transport``, handing them to the kernel at once when possible.

    Twisted's socket transports buffer every write until the reactor's next
    turn, so whatever the caller does after writing (logging, accounting)
    would delay the bytes.  On a socket transport (a
    :class:`~twisted.internet.abstract.FileDescriptor`: plain TCP or unix,
    never a TLS wrapper) that is connected and has nothing buffered, the
    bytes are sent right away (several parts in one gathering ``sendmsg``,
    without joining them); what the socket does not take is buffered as
    usual.  A :class:`SocketStream` sends at once by itself.  Any other
    transport, or a socket error (left for the transport to report on its
    next write), falls back to ``transport.write``.  The bytes and their order
    on the wire are the same either way.
    """
    if type(transport) is SocketStream:
        # It sends at once by itself.
        transport.writeSequence(parts)
        return
    parts = tuple(part for part in parts if part)
    if not parts:
        return
    sock = getattr(transport, "socket", None)
    if (
        sock is None
        or not isinstance(transport, FileDescriptor)
        or not transport.connected
        or transport.disconnecting
        or transport._writeDisconnected
        or transport.dataBuffer
        or transport._tempDataBuffer
    ):
        for part in parts:
            transport.write(part)
        return
    try:
        sent = sock.send(parts[0]) if len(parts) == 1 else sock.sendmsg(parts)
    except BlockingIOError:
        sent = 0
    except OSError:
        for part in parts:
            transport.write(part)
        return
    for part in parts:
        if sent >= len(part):
            sent -= len(part)
            continue
        transport.write(part[sent:] if sent else part)
        sent = 0


#: What a stream socket reports when it goes away (shared, as Twisted's reactor shares them).
_DONE = Failure(twisted_error.ConnectionDone())
_LOST = Failure(twisted_error.ConnectionLost())
_ABORTED = Failure(twisted_error.ConnectionAborted())
#: ``SO_LINGER`` on, zero seconds: ``close()`` resets the connection.
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)
#: Most bytes taken from the kernel per read event by default (as Twisted's TCP transport).
_READ_SIZE = 65536
#: Errors of a non-blocking ``connect()`` that mean "not finished yet".
_CONNECT_PENDING = frozenset({errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY})


@implementer(ITransport, IReadWriteDescriptor)
class SocketStream:
    """A stream socket (TCP or unix) served straight from the reactor's descriptor sets.

    Twisted's socket transports suit every use; the proxy's connections are
    all alike -- one request, one reply, close -- and this transport does just
    that with fewer steps per connection and per event:

    * bytes written are handed to the kernel at once; what it does not take
      is kept and sent when the socket is writable again, in order;
    * :meth:`loseConnection` closes as soon as nothing is left to send (no
      reactor turn is spent on an empty buffer), :meth:`abortConnection`
      at once with a reset; either way the socket is closed right away and
      the protocol hears of it (:meth:`IProtocol.connectionLost`) on the
      reactor's next turn, as with Twisted's transports;
    * the peer closing, or a socket error, closes it too and the protocol
      hears ``ConnectionDone`` or ``ConnectionLost`` at once.

    Outgoing connections start with :meth:`dial`; accepted ones are made
    with the constructor (a connected non-blocking socket) and started with
    :meth:`attach`.  The reactor must be a real one (``IReactorFDSet`` and
    ``IReactorTime`` over sockets).

    Attributes:
        socket: the socket (closed once the connection is).
        protocol: the protocol it feeds, once attached.
        connected: attached and not closed.
        disconnecting: :meth:`loseConnection` was called and bytes are still waiting.
        bufferSize: most bytes taken from the kernel per read event (as
            Twisted's ``FileDescriptor.bufferSize``); a protocol expecting a
            large upload may raise it.
    """

    bufferSize = _READ_SIZE

    def __init__(
        self, reactor: Any, sock: socket.SocketType, peer: IAddress, host: IAddress | None = None
    ) -> None:
        self.reactor = reactor
        self.socket = sock
        self.protocol: IProtocol | None = None
        self.connected = False
        self.disconnecting = False
        self._fd = sock.fileno()
        self._peer = peer
        self._host = host
        self._pending: list[bytes] = []
        self._reading = False
        self._writing = False
        self._closed = False
        self._dial: tuple[Any, Callable[[SocketStream], None], Callable[[int], None]] | None = None

    # -- outgoing connections ------------------------------------------------

    @classmethod
    def dial(
        cls,
        reactor: Any,
        family: int,
        sockaddr: Any,
        peer: IAddress,
        connected: Callable[[SocketStream], None],
        failed: Callable[[int], None],
    ) -> SocketStream:
        """A stream about to connect to ``sockaddr``; :meth:`start_dial` connects it.

        Once connected ``connected(stream)`` is called (it should
        :meth:`attach` a protocol); if the connection cannot be made
        ``failed(errno)`` is, on a later reactor turn.  Neither is called
        after :meth:`stopConnecting`.
        """
        sock = socket.SocketType(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        stream = cls(reactor, sock, peer)
        stream._dial = (sockaddr, connected, failed)
        return stream

    def start_dial(self) -> None:
        """Start connecting; a connection that completes at once (loopback,
        unix sockets) is reported before this returns."""
        assert self._dial is not None
        sockaddr = self._dial[0]
        result = self.socket.connect_ex(sockaddr)
        if result in _CONNECT_PENDING:
            try:
                # On loopback the handshake is usually over already.
                self.socket.getpeername()
            except OSError:
                self._writing = True
                self.reactor.addWriter(self)
                return
        elif result not in (0, errno.EISCONN):
            self._dial_failed(result, later=True)
            return
        self._dialed()

    def stopConnecting(self) -> None:
        """Give up connecting; nothing is reported."""
        if self._dial is not None:
            self._dial = None
            self._close()

    def _dialed(self) -> None:
        assert self._dial is not None
        connected = self._dial[1]
        self._dial = None
        connected(self)

    def _dial_failed(self, code: int, later: bool = False) -> None:
        assert self._dial is not None
        failed = self._dial[2]
        self._dial = None
        self._close()
        if later:
            self.reactor.callLater(0, failed, code)
        else:
            failed(code)

    # -- the connection --------------------------------------------------------

    def attach(self, protocol: IProtocol) -> None:
        """Start reading and hand the connection to ``protocol`` (``makeConnection``)."""
        self.protocol = protocol
        self.connected = True
        self._reading = True
        self.reactor.addReader(self)
        protocol.makeConnection(self)

    def write(self, data: bytes) -> None:
        """Send ``data`` after what is already waiting; the kernel gets what it takes now."""
        if data:
            self.writeSequence((data,))

    def writeSequence(self, data: Iterable[bytes]) -> None:
        """Send the parts in order (one gathering send when nothing is waiting)."""
        if self._closed:
            return
        parts = [part for part in data if part]
        if not parts:
            return
        if self._pending:
            self._pending.extend(parts)
            return
        try:
            sent = self.socket.send(parts[0]) if len(parts) == 1 else self.socket.sendmsg(parts)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close()
            _notices(self.reactor).add(self, _LOST)
            return
        for part in parts:
            if sent >= len(part):
                sent -= len(part)
                continue
            self._pending.append(part[sent:] if sent else part)
            sent = 0
        if self._pending and not self._writing:
            self._writing = True
            self.reactor.addWriter(self)

    def loseConnection(self) -> None:
        """Close once every byte written has been sent."""
        if self._closed:
            return
        if self._pending:
            self.disconnecting = True
            return
        self._close()
        _notices(self.reactor).add(self, _DONE)

    def abortConnection(self) -> None:
        """Close at once with a reset, dropping what was not sent."""
        if self._closed:
            return
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
        except OSError:
            pass
        self._close()
        _notices(self.reactor).add(self, _ABORTED)

    def getPeer(self) -> IAddress:
        """The address of the other end."""
        return self._peer

    def getHost(self) -> IAddress:
        """The address of this end."""
        if self._host is None:
            self._host = _address_of(self.socket.family, self.socket.getsockname())
        return self._host

    def setTcpNoDelay(self, enabled: bool) -> None:
        """Turn Nagle's algorithm off (``True``) or on."""
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(enabled))

    # -- reactor callbacks -----------------------------------------------------

    def fileno(self) -> int:
        """The descriptor, -1 once closed."""
        return -1 if self._closed else self._fd

    def logPrefix(self) -> str:
        """What log lines of this connection's callbacks are prefixed with."""
        return "SocketStream"

    def doRead(self) -> None:
        """Hand what arrived to the protocol; the peer's close or an error closes."""
        try:
            data = self.socket.recv(self.bufferSize)
        except BlockingIOError:
            return
        except OSError:
            self._lost(_LOST)
            return
        if not data:
            self._lost(_DONE)
            return
        assert self.protocol is not None
        self.protocol.dataReceived(data)

    def doWrite(self) -> None:
        """Finish connecting, or send what is waiting (then close if asked to)."""
        if self._dial is not None:
            self._writing = False
            self.reactor.removeWriter(self)
            code = self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self._dial_failed(code)
            else:
                self._dialed()
            return
        pending = self._pending
        if not pending:
            self._writing = False
            self.reactor.removeWriter(self)
            return
        try:
            sent = self.socket.send(pending[0]) if len(pending) == 1 else self.socket.sendmsg(pending)
        except BlockingIOError:
            return
        except OSError:
            self._lost(_LOST)
            return
        while pending and sent >= len(pending[0]):
            sent -= len(pending.pop(0))
        if pending:
            if sent:
                pending[0] = pending[0][sent:]
            return
        self._writing = False
        self.reactor.removeWriter(self)
        if self.disconnecting:
            self._lost(_DONE)

    def connectionLost(self, reason: Failure) -> None:
        """The reactor dropped the descriptor (hang-up, error, shutdown) and no longer
        watches it: close and tell the protocol, or report the failed connection attempt."""
        self._reading = self._writing = False
        if self._dial is not None and not self._closed:
            try:
                code = self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            except OSError as exc:
                code = exc.errno or errno.ECONNREFUSED
            self._dial_failed(code or errno.ECONNREFUSED)
            return
        self._lost(reason)

    # -- closing -----------------------------------------------------------------

    def _close(self) -> None:
        """Stop watching the socket and close it (once)."""
        if self._closed:
            return
        if self._reading:
            self._reading = False
            self.reactor.removeReader(self)
        if self._writing:
            self._writing = False
            self.reactor.removeWriter(self)
        self._closed = True
        self._pending = []
        self.socket.close()

    def _lost(self, reason: Failure) -> None:
        """Close and tell the protocol now (the reactor is calling us)."""
        if self._closed:
            return
        self._close()
        self._notify(reason)

    def _notify(self, reason: Failure) -> None:
        if not self.connected:
            return
        self.connected = False
        self.disconnecting = False
        protocol, self.protocol = self.protocol, None
        if protocol is not None:
            protocol.connectionLost(reason)


#: Errors of ``accept()`` that only concern the connection being accepted.
_ACCEPT_SKIPPED = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR})
#: Seconds a port stops accepting after running out of descriptors or memory.
_ACCEPT_PAUSE = 0.1


@implementer(IListeningPort, IReadDescriptor)
class StreamPort:
    """Accepts connections on a listening stream socket; each is a :class:`SocketStream`.

    What :meth:`reactor.adoptStreamPort` does with Twisted's transports, for
    the proxy's listeners: up to :attr:`accepts_per_event` connections are
    accepted per readable event; each gets a protocol from the factory
    (``buildProtocol`` with the peer address) and, since a client usually
    sends its request right after connecting, is read from at once instead
    of a reactor turn later.  Running out of descriptors or memory pauses
    accepting for :data:`_ACCEPT_PAUSE` s (the pending connections wait in
    the kernel's backlog).

    Attributes:
        socket: the listening socket (a duplicate of the adopted descriptor).
        factory: builds the protocols.
        accepts_per_event: most connections accepted per readable event.
    """

    accepts_per_event = 100

    def __init__(self, reactor: Any, sock: socket.SocketType, factory: IProtocolFactory) -> None:
        self.reactor = reactor
        self.socket = sock
        self.factory = factory
        self._family = int(sock.family)
        self._fd = sock.fileno()
        self._host = _address_of(self._family, sock.getsockname())
        self._listening = False
        self._paused: IDelayedCall | None = None

    @classmethod
    def adopt(cls, reactor: Any, fileno: int, family: int, factory: IProtocolFactory) -> StreamPort:
        """Serve a duplicate of the listening descriptor ``fileno`` (the caller
        keeps its own); listening starts at once."""
        sock = socket.fromfd(fileno, family, socket.SOCK_STREAM)
        sock.setblocking(False)
        port = cls(reactor, sock, factory)
        port.startListening()
        return port

    def startListening(self) -> None:
        """Start the factory and accept connections."""
        if self._listening:
            return
        self._listening = True
        self.factory.doStart()
        self.reactor.addReader(self)

    def stopListening(self) -> Deferred[None]:
        """Stop accepting, close the socket and stop the factory (at once)."""
        if self._listening:
            self._listening = False
            if self._paused is not None:
                if self._paused.active():
                    self._paused.cancel()
                self._paused = None
            else:
                self.reactor.removeReader(self)
            self.socket.close()
            self.factory.doStop()
        return succeed(None)

    def getHost(self) -> IAddress:
        """The address listened on."""
        return self._host

    def fileno(self) -> int:
        """The listening descriptor, -1 once closed."""
        return self._fd if self._listening else -1

    def logPrefix(self) -> str:
        """What log lines of this port's callbacks are prefixed with."""
        return "StreamPort"

    def connectionLost(self, reason: Failure) -> None:
        """The reactor dropped the port (it is shutting down): stop listening."""
        self._listening = False
        self.socket.close()
        self.factory.doStop()

    def doRead(self) -> None:
        """Accept what is waiting and serve each connection."""
        family = self._family
        listener = self.socket
        factory = self.factory
        reactor = self.reactor
        for _ in range(self.accepts_per_event):
            try:
                fd, sockaddr = listener._accept()  # type: ignore[attr-defined]
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_SKIPPED:
                    continue
                _log.error("cannot accept connections on {port}: {error}", port=self._host, error=str(exc))
                self._pause()
                return
            sock = socket.SocketType(family, socket.SOCK_STREAM, 0, fd)
            sock.setblocking(False)
            stream: SocketStream | None = None
            try:
                peer = _address_of(family, sockaddr)
                protocol = factory.buildProtocol(peer)
                if protocol is None:
                    sock.close()
                    continue
                stream = SocketStream(reactor, sock, peer, self._host)
                stream.attach(protocol)
                if stream.connected:
                    stream.doRead()
            except Exception:
                # One connection's trouble must not stop the port: log it, drop that one.
                _log.failure("serving a new connection on {port} failed", port=self._host)
                if stream is None:
                    sock.close()
                else:
                    try:
                        stream._lost(Failure())
                    except Exception:
                        _log.failure("closing the failed connection on {port} failed", port=self._host)

    def _pause(self) -> None:
        self.reactor.removeReader(self)
        self._paused = self.reactor.callLater(_ACCEPT_PAUSE, self._resume)

    def _resume(self) -> None:
        self._paused = None
        if self._listening:
            self.reactor.addReader(self)


def adopt_stream_port(reactor: Any, fileno: int, family: int,
                      factory: IProtocolFactory) -> IListeningPort:
    """Serve ``factory`` on (a duplicate of) the listening descriptor ``fileno``.

    On a real reactor (a ``PosixReactorBase``) the port is a
    :class:`StreamPort`, whose connections cost less per request than
    Twisted's TCP transports; on any other the reactor's own
    ``adoptStreamPort``.
    """
    if isinstance(reactor, PosixReactorBase):
        return StreamPort.adopt(reactor, fileno, family, factory)
    port: IListeningPort = reactor.adoptStreamPort(fileno, family, factory)
    return port


class _LostNotices:
    """``connectionLost`` calls due on a reactor's next turn, all on one delayed call.

    A transport closed by its protocol tells the protocol on the next turn
    (as Twisted's transports do); many close in one turn under load, and one
    delayed call for all of them is much cheaper than one each.  They run in
    the order the connections closed.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.pending: list[tuple[SocketStream, Failure]] = []
        self.call: IDelayedCall | None = None

    def add(self, stream: SocketStream, reason: Failure) -> None:
        """Have ``stream`` tell its protocol about ``reason`` on the next turn."""
        self.pending.append((stream, reason))
        if self.call is None:
            self.call = self.reactor.callLater(0, self._run)

    def _run(self) -> None:
        self.call = None
        pending, self.pending = self.pending, []
        for stream, reason in pending:
            stream._notify(reason)


#: The notices of each reactor streams run on.
_NOTICES: dict[Any, _LostNotices] = {}


def _notices(reactor: Any) -> _LostNotices:
    notices = _NOTICES.get(reactor)
    if notices is None:
        notices = _NOTICES[reactor] = _LostNotices(reactor)
    return notices


def _address_of(family: int, sockaddr: Any) -> IAddress:
    """The Twisted address of a socket address of ``family``."""
    if family == socket.AF_INET:
        return IPv4Address("TCP", sockaddr[0], sockaddr[1])
    if family == socket.AF_INET6:
        host = sockaddr[0]
        if len(sockaddr) == 4 and sockaddr[3]:
            host = socket.getnameinfo(sockaddr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)[0]
        return IPv6Address("TCP", host, sockaddr[1])
    return UNIXAddress(sockaddr or None)


#: A socket family, the socket address to connect to and the peer address to show.
_DirectTarget = tuple[int, Any, IAddress]
#: Most pool keys whose direct target is remembered.
_DIRECT_TARGETS_KEPT = 1024


def _direct_target(key: _PoolKey) -> _DirectTarget | None:
    """The direct target of a numeric TCP or a unix pool key; ``None`` for a host name
    or a scoped IPv6 address (the reactor resolves those)."""
    kind, host, port = key
    if kind == "unix":
        return socket.AF_UNIX, host, UNIXAddress(os.fsencode(host))
    try:
        socket.inet_pton(socket.AF_INET, host)
    except OSError:
        pass
    else:
        return socket.AF_INET, (host, port), IPv4Address("TCP", host, port)
    try:
        socket.inet_pton(socket.AF_INET6, host)
    except OSError:
        return None
    return socket.AF_INET6, (host, port, 0, 0), IPv6Address("TCP", host, port)


def _asks_close(headers: Iterable[tuple[str, str]]) -> bool:
    """Whether a ``Connection`` header of ``headers`` has the ``close`` token."""
    for name, value in headers:
        if len(name) == 10 and name.lower() == "connection":
            if any(token.strip().lower() == "close" for token in value.split(",")):
                return True
    return False


def _pool_key(address: Address) -> _PoolKey:
    if isinstance(address, (IPv4Address, IPv6Address)):
        return ("tcp", address.host, address.port)
    if isinstance(address, UNIXAddress):
        name = address.name
        if name is None:
            raise ValueError("unix address without a path")
        return ("unix", os.fsdecode(name), 0)
    if isinstance(address, str):
        return ("unix", address, 0)
    if isinstance(address, tuple) and len(address) == 2:
        host, port = address
        return ("tcp", str(host), int(port))
    raise ValueError(f"unsupported scanner address {address!r}")


_REFUSED_REASONS: dict[type[BaseException], str] = {
    twisted_error.ConnectionRefusedError: os.strerror(errno.ECONNREFUSED),
    twisted_error.NoRouteError: os.strerror(errno.EHOSTUNREACH),
    twisted_error.TCPTimedOutError: os.strerror(errno.ETIMEDOUT),
    twisted_error.DNSLookupError: "Name or service not known",
}


def _connect_error(reason: Failure) -> ConnectError:
    value = reason.value
    os_error = getattr(value, "osError", None)
    if isinstance(os_error, int):
        text = os.strerror(os_error)
    else:
        text = next(
            (message for kind, message in _REFUSED_REASONS.items() if isinstance(value, kind)),
            str(value),
        )
    return ConnectError(500, f"IO write error: {text}")


def _parse_error(exc: HttpProtocolError) -> BadReply:
    if exc.status == 413:
        return BadReply(413, f"Request entity too large: {exc.reason}")
    if exc.reason.startswith("connection closed"):
        return BadReply(400, "IO read error: unexpected EOF")
    return BadReply(400, f"HTTP parser error: {exc.reason}")


class _ScannerConnection(Protocol):
    """One connection to a scanner; carries at most one request at a time."""

    def __init__(self, client: ScannerClient, key: _PoolKey) -> None:
        self.client = client
        self.key = key
        self.exchange: _Exchange | None = None
        self.closed = False
        self.idle_timer: Any = None
        self._closed_waiters: list[Deferred[None]] = []

    def connectionMade(self) -> None:
        transport: Any = self.transport
        set_no_delay = getattr(transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            # The request goes out in one write; never let Nagle hold its tail.
            try:
                set_no_delay(True)
            except OSError:
                pass
        self.client._connections.add(self)
        if self.exchange is not None:
            self.exchange.connection_made(self)
        else:
            # Its exchange ended (timeout, cancel) before the connection was up.
            self.close()

    def dataReceived(self, data: bytes) -> None:
        if self.exchange is None:
            # Bytes on an idle connection: the scanner is confused; drop it.
            self.close()
            return
        self.exchange.data_received(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        self.client._connection_closed(self)
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.connection_lost(reason)
        waiters, self._closed_waiters = self._closed_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def send(self, parts: tuple[bytes, ...]) -> None:
        """Write ``parts`` in order to the scanner (sent at once, see :func:`write_now`)."""
        write_now(self.transport, *parts)

    def close(self) -> None:
        """Close after pending writes are flushed (no-op before it is connected)."""
        transport: Any = self.transport
        if transport is not None:
            transport.loseConnection()

    def abort(self) -> None:
        """Drop the connection at once (no-op before it is connected)."""
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def when_closed(self) -> Deferred[None]:
        """A Deferred that fires once the connection is closed."""
        if self.closed:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._closed_waiters.append(waiter)
        return waiter


class _ConnectionFactory(ClientFactory):
    """Builds the connection for one exchange and reports connect failures."""

    noisy = False  # one per request: no "Starting factory" log lines

    def __init__(self, exchange: _Exchange) -> None:
        self.exchange = exchange

    def buildProtocol(self, addr: Any) -> _ScannerConnection:
        connection = _ScannerConnection(self.exchange.client, self.exchange.key)
        connection.factory = self
        self.exchange.connection_built(connection)
        return connection

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.exchange.connect_failed(reason)


class _Exchange:
    """One request: connection choice, sending, reply collection, timeout."""

    def __init__(
        self,
        client: ScannerClient,
        key: _PoolKey,
        payload: tuple[bytes, ...],
        reusable: bool,
        timeout: float,
    ) -> None:
        self.client = client
        self.key = key
        self.payload = payload
        self.reusable = reusable
        self.deferred: Deferred[ScannerResponse] = Deferred(self._cancel)
        self.finished = False
        self.connection: _ScannerConnection | None = None
        self.connector: Any = None
        self.reused = False
        self.parser = ResponseParser(client.reply_limits())
        self.got_bytes = False
        self.response: Response | None = None
        self.body: list[bytes] = []
        self.timeout = timeout
        client.deadlines.set(self, timeout, self._timed_out)

    # -- starting ----------------------------------------------------------

    def start(self) -> None:
        connection = self.client._take_idle(self.key)
        if connection is not None:
            self.reused = True
            self._send(connection)
        else:
            self._connect()

    def _connect(self) -> None:
        self.reused = False
        reactor = self.client.reactor
        direct = self.client._direct_target(self.key)
        if direct is not None:
            family, sockaddr, peer = direct
            stream = SocketStream.dial(reactor, family, sockaddr, peer, self._dialed, self._dial_failed)
            self.connector = stream
            stream.start_dial()
            return
        factory = _ConnectionFactory(self)
        kind, host, port = self.key
        # The exchange's own timer bounds connecting too (it stops the
        # connector), so the connector gets no timer of its own.
        if kind == "unix":
            self.connector = reactor.connectUNIX(host, factory, timeout=None)
        else:
            self.connector = reactor.connectTCP(host, port, factory, timeout=None)

    def connection_built(self, connection: _ScannerConnection) -> None:
        """The factory built the protocol for this exchange (not yet connected).

        A connection that completes after the exchange ended stays orphaned
        and closes itself once made.
        """
        if self.finished:
            return
        self.connection = connection
        connection.exchange = self
        self.connector = None

    def _dialed(self, stream: SocketStream) -> None:
        """The direct connection is up: give it its protocol, which sends the request."""
        connection = _ScannerConnection(self.client, self.key)
        self.connection_built(connection)
        stream.attach(connection)

    def _dial_failed(self, code: int) -> None:
        """The direct connection could not be made (``code``: the ``errno``)."""
        self.connector = None
        if not self.finished:
            self._fail(ConnectError(500, f"IO write error: {os.strerror(code)}"))

    def connection_made(self, connection: _ScannerConnection) -> None:
        """The new connection is up: send the request."""
        connection.send(self.payload)

    def _send(self, connection: _ScannerConnection) -> None:
        self.connection = connection
        connection.exchange = self
        connection.send(self.payload)

    # -- events from the connection ----------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.finished:
            return
        self.got_bytes = True
        try:
            events = self.parser.feed(data)
        except HttpProtocolError as exc:
            self._fail(_parse_error(exc))
            return
        self._handle(events)

    def connection_lost(self, reason: Failure) -> None:
        self.connection = None
        if self.finished:
            return
        if self.reused and not self.got_bytes:
            self._connect()
            return
        if self.response is not None or self.got_bytes:
            try:
                events = self.parser.feed_eof()
            except HttpProtocolError as exc:
                self._fail(_parse_error(exc))
                return
            self._handle(events)
            return
        if isinstance(reason.value, twisted_error.ConnectionDone):
            self._fail(BadReply(400, "IO read error: unexpected EOF"))
        else:
            message = getattr(reason.value, "osError", None)
            text = os.strerror(message) if isinstance(message, int) else reason.getErrorMessage()
            self._fail(BadReply(500, f"HTTP IO read error: {text}"))

    def connect_failed(self, reason: Failure) -> None:
        self.connector = None
        if not self.finished:
            self._fail(_connect_error(reason))

    def _handle(self, events: list[Any]) -> None:
        for event in events:
            if isinstance(event, Response):
                self.response = event
            elif isinstance(event, Data):
                self.body.append(event.chunk)
            elif isinstance(event, EndOfMessage):
                self._succeed()
                return

    # -- outcomes ----------------------------------------------------------

    def _settle(self) -> None:
        self.finished = True
        self.client.deadlines.cancel(self)

    def _succeed(self) -> None:
        assert self.response is not None
        self._settle()
        response = self.response
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.exchange = None
            if self.reusable and response.keep_alive:
                self.client._put_idle(connection)
            else:
                # The reply is complete and the connection is not kept: drop
                # it now rather than flush an empty buffer on the next turn.
                connection.abort()
        body = b"".join(self.body)
        self._release()
        self.deferred.callback(ScannerResponse(response.status, response.reason, response.headers, body))

    def _stop(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.exchange = None
            connection.abort()
        connector, self.connector = self.connector, None
        if connector is not None:
            connector.stopConnecting()

    def _fail(self, error: ScannerError) -> None:
        self._settle()
        self._stop()
        self._release()
        self.deferred.errback(error)

    def _release(self) -> None:
        """Drop the request and reply bytes of a finished exchange.

        The exchange stays reachable from the connection attempt's reference
        cycle (connector and transport point at each other, the connector
        holds the factory, the factory this exchange) until the garbage
        collector runs; without this a large message would live on until then.
        """
        self.payload = ()
        self.body = []
        self.response = None

    def _timed_out(self) -> None:
        if not self.finished:
            self._fail(ScannerTimeout())

    def _cancel(self, deferred: Deferred[ScannerResponse]) -> None:
        if not self.finished:
            self._settle()
            self._stop()
            self._release()


class ScannerClient:
    """Sends HTTP requests to scanners, keeping a pool of idle connections.

    Args:
        reactor: provides ``connectTCP``, ``connectUNIX`` and ``callLater``.
        max_idle_per_address: most idle connections kept per address; ``0``
            disables reuse.
        idle_timeout: seconds an idle connection is kept before it is closed.
        max_reply: largest reply body accepted, in bytes (a larger reply fails
            with :class:`BadReply` status 413).
        direct_sockets: connect numeric TCP and unix addresses with
            :class:`SocketStream` instead of ``connectTCP``/``connectUNIX``
            (default: when ``reactor`` is a real one, a ``PosixReactorBase``).
    """

    def __init__(
        self,
        reactor: Any,
        max_idle_per_address: int = 4,
        idle_timeout: float = 60.0,
        max_reply: int = 50 * 1024 * 1024,
        direct_sockets: bool | None = None,
    ) -> None:
        self.reactor = reactor
        self.max_idle_per_address = max_idle_per_address
        self.idle_timeout = idle_timeout
        self.max_reply = max_reply
        if direct_sockets is None:
            direct_sockets = isinstance(reactor, PosixReactorBase)
        self.direct_sockets = direct_sockets
        self._idle: dict[_PoolKey, list[_ScannerConnection]] = {}
        self._connections: set[_ScannerConnection] = set()
        self._reply_limits = HttpLimits(max_message=max_reply)
        self._direct_targets: dict[_PoolKey, _DirectTarget | None] = {}
        self.deadlines = Deadlines(reactor)

    def _direct_target(self, key: _PoolKey) -> _DirectTarget | None:
        """Where a :class:`SocketStream` connects for ``key``, or ``None`` to use the reactor's connect."""
        if not self.direct_sockets:
            return None
        try:
            return self._direct_targets[key]
        except KeyError:
            pass
        if len(self._direct_targets) >= _DIRECT_TARGETS_KEPT:
            self._direct_targets.clear()
        target = self._direct_targets[key] = _direct_target(key)
        return target

    def reply_limits(self) -> HttpLimits:
        """Parser bounds of a reply (``max_reply``), built once while it stays the same."""
        if self._reply_limits.max_message != self.max_reply:
            self._reply_limits = HttpLimits(max_message=self.max_reply)
        return self._reply_limits

    def request(
        self,
        address: Address,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: bytes = b"",
        timeout: float = 8.0,
    ) -> Deferred[ScannerResponse]:
        """Send one request and collect the reply.

        ``headers`` are sent in order; ``Content-Length`` is always set to the
        body length and ``Transfer-Encoding`` dropped.  The caller chooses
        ``Host`` and ``Connection``; ``Connection: close`` keeps the connection
        out of the pool.  ``timeout`` (seconds) covers connecting, sending and
        the whole reply.

        Returns a cancellable Deferred firing with :class:`ScannerResponse`
        for any HTTP status, or failing with :class:`ConnectError`,
        :class:`ScannerTimeout` or :class:`BadReply`.

        Raises:
            ValueError: the address, method, target or a header cannot be used.
        """
        key = _pool_key(address)
        header_list = headers if isinstance(headers, (list, tuple)) else list(headers)
        payload = (encode_request_head(method, target, header_list, len(body)), body)
        exchange = _Exchange(self, key, payload, not _asks_close(header_list), timeout)
        exchange.start()
        return exchange.deferred

    def idle_count(self, address: Address) -> int:
        """Number of idle pooled connections to ``address``."""
        return len(self._idle.get(_pool_key(address), []))

    def close(self) -> Deferred[None]:
        """Close idle connections and abort busy ones.

        Returns a Deferred that fires when every connection is closed.
        """
        waiting = [connection.when_closed() for connection in list(self._connections)]
        for connection in list(self._connections):
            if connection.exchange is None:
                connection.close()
            else:
                connection.abort()
        done: Deferred[None] = Deferred()
        remaining = len(waiting)
        if remaining == 0:
            done.callback(None)
            return done

        def one_closed(_: None) -> None:
            nonlocal remaining
            remaining -= 1
            if remaining == 0:
                done.callback(None)

        for waiter in waiting:
            waiter.addCallback(one_closed)
        return done

    # -- pool ----------------------------------------------------------------

    def _take_idle(self, key: _PoolKey) -> _ScannerConnection | None:
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            self._cancel_idle_timer(connection)
            if not connection.closed:
                return connection
        return None

    def _put_idle(self, connection: _ScannerConnection) -> None:
        idle = self._idle.setdefault(connection.key, [])
        if connection.closed:
            return
        if len(idle) >= self.max_idle_per_address:
            connection.close()
            return
        idle.append(connection)
        connection.idle_timer = self.reactor.callLater(
            self.idle_timeout, self._idle_expired, connection
        )

    def _idle_expired(self, connection: _ScannerConnection) -> None:
        connection.idle_timer = None
        self._remove_idle(connection)
        connection.close()

    def _cancel_idle_timer(self, connection: _ScannerConnection) -> None:
        timer, connection.idle_timer = connection.idle_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _remove_idle(self, connection: _ScannerConnection) -> None:
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)
            if not idle:
                del self._idle[connection.key]

    def _connection_closed(self, connection: _ScannerConnection) -> None:
        self._connections.discard(connection)
        self._cancel_idle_timer(connection)
        self._remove_idle(connection)
