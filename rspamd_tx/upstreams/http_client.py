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
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from twisted.internet import error as twisted_error
from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConnector
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.python.failure import Failure

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

__all__ = [
    "Address",
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
    usual.  Any other transport, or a socket error (left for the transport to
    report on its next write), falls back to ``transport.write``.  The bytes
    and their order on the wire are the same either way.
    """
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
        self.timer: Any = client.reactor.callLater(timeout, self._timed_out)
        self.timeout = timeout

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
        factory = _ConnectionFactory(self)
        reactor = self.client.reactor
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
        if self.timer.active():
            self.timer.cancel()

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
    """

    def __init__(
        self,
        reactor: Any,
        max_idle_per_address: int = 4,
        idle_timeout: float = 60.0,
        max_reply: int = 50 * 1024 * 1024,
    ) -> None:
        self.reactor = reactor
        self.max_idle_per_address = max_idle_per_address
        self.idle_timeout = idle_timeout
        self.max_reply = max_reply
        self._idle: dict[_PoolKey, list[_ScannerConnection]] = {}
        self._connections: set[_ScannerConnection] = set()
        self._reply_limits = HttpLimits(max_message=max_reply)

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
        header_list = list(headers)
        payload = (encode_request_head(method, target, header_list, len(body)), body)
        tokens = {
            token.strip().lower()
            for value in header_values(header_list, "Connection")
            for token in value.split(",")
        }
        exchange = _Exchange(self, key, payload, "close" not in tokens, timeout)
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
