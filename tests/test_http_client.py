"""Tests for rspamd_tx.upstreams.http_client: the scanner HTTP client and its pool."""

from __future__ import annotations

import json
import socket
from typing import Any, TypeVar

from twisted.internet import error as twisted_error
from twisted.internet import tcp
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorUNIX
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from rspamd_tx.protocols.http_codec import (
    Data,
    EndOfMessage,
    Request,
    RequestParser,
    encode_response,
)
from rspamd_tx.upstreams.http_client import (
    BadReply,
    ConnectError,
    ScannerClient,
    ScannerError,
    ScannerResponse,
    ScannerTimeout,
    StreamPort,
    write_now,
)
from tests.helpers.messages import GTUBE_MESSAGE
from tests.peers.rspamd import skip_unless_rspamd, start_rspamd

_E = TypeVar("_E", bound=BaseException)

SCANNER = IPv4Address("TCP", "127.0.0.1", 11333)
CLOSE_REPLY = encode_response(
    200,
    "OK",
    [("Connection", "close"), ("Content-Type", "application/json")],
    b'{"action":"reject"}',
)
KEEP_REPLY = encode_response(200, "OK", [("Connection", "keep-alive")], b"pong\r\n")


def _accept(reactor: MemoryReactorClock, index: int = -1) -> tuple[Any, StringTransport]:
    """Complete the pending TCP connection attempt number ``index``."""
    host, port, factory, _timeout, _bind = reactor.tcpClients[index]
    protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    assert protocol is not None
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def _result(deferred: Deferred[Any]) -> list[Any]:
    """Collect what a Deferred fired with (a value or a Failure)."""
    seen: list[Any] = []
    deferred.addBoth(seen.append)
    return seen


def _socket_transport(test: unittest.TestCase, send_buffer: int | None = None) -> tuple[Any, socket.socket]:
    """A connected TCP-style transport over a socket pair, and the peer socket."""
    ours, peer = socket.socketpair()
    if send_buffer is not None:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    ours.setblocking(False)
    peer.setblocking(False)
    transport = tcp.Connection(ours, Protocol(), MemoryReactorClock())
    transport.connected = True
    test.addCleanup(ours.close)
    test.addCleanup(peer.close)
    return transport, peer


def _drain(peer: socket.socket) -> bytes:
    """Everything the peer socket can read right now."""
    received = bytearray()
    while True:
        try:
            chunk = peer.recv(1 << 20)
        except BlockingIOError:
            return bytes(received)
        if not chunk:
            return bytes(received)
        received += chunk


class WriteNowTests(unittest.TestCase):
    """write_now: bytes leave at once on an idle socket transport, in order."""

    def test_sent_before_the_reactor_runs(self) -> None:
        """On an idle socket transport the parts reach the peer at once; nothing is buffered."""
        transport, peer = _socket_transport(self)
        write_now(transport, b"head\r\n", b"body")
        self.assertEqual(_drain(peer), b"head\r\nbody")
        self.assertEqual(transport._tempDataBuffer, [])

    def test_after_buffered_bytes_keeps_order(self) -> None:
        """With bytes already buffered, the parts are queued behind them, not sent first."""
        transport, peer = _socket_transport(self)
        transport.write(b"first")
        write_now(transport, b"second", b"third")
        self.assertEqual(_drain(peer), b"")
        self.assertEqual(b"".join(transport._tempDataBuffer), b"firstsecondthird")

    def test_rest_buffered_when_socket_full(self) -> None:
        """What the socket does not take is buffered and follows in order."""
        transport, peer = _socket_transport(self, send_buffer=4096)
        body = bytes(range(256)) * 8192
        write_now(transport, b"head", body)
        received = bytearray(_drain(peer))
        self.assertLess(len(received), 4 + len(body))
        while len(received) < 4 + len(body):
            transport.doWrite()
            received += _drain(peer)
        self.assertEqual(bytes(received), b"head" + body)

    def test_other_transports_get_plain_writes(self) -> None:
        """A transport that is not a socket gets the parts through write(), empty parts skipped."""
        transport = StringTransport()
        write_now(transport, b"a", b"", b"bc")
        self.assertEqual(transport.value(), b"abc")


class RequestTests(unittest.TestCase):
    """One request on a fresh connection."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.client = ScannerClient(self.reactor, max_idle_per_address=1, idle_timeout=30)

    def test_request_bytes(self) -> None:
        """The request is written with headers in order and the true Content-Length."""
        self.client.request(
            SCANNER, "POST", "/checkv2", [("Host", "local"), ("Rcpt", "a@x")], b"msg"
        )
        self.assertEqual(self.reactor.tcpClients[0][:2], ("127.0.0.1", 11333))
        _, transport = _accept(self.reactor)
        self.assertEqual(
            transport.value(),
            b"POST /checkv2 HTTP/1.1\r\nHost: local\r\nRcpt: a@x\r\nContent-Length: 3\r\n\r\nmsg",
        )

    def test_reply_delivered(self) -> None:
        """A complete reply fires the Deferred with status, headers and body."""
        seen = _result(self.client.request(SCANNER, "POST", "/checkv2", [], b"msg"))
        protocol, _ = _accept(self.reactor)
        protocol.dataReceived(CLOSE_REPLY[:30])
        self.assertEqual(seen, [])
        protocol.dataReceived(CLOSE_REPLY[30:])
        [response] = seen
        self.assertIsInstance(response, ScannerResponse)
        self.assertEqual((response.status, response.reason), (200, "OK"))
        self.assertEqual(response.get("content-type"), "application/json")
        self.assertEqual(response.body, b'{"action":"reject"}')

    def test_finished_exchange_keeps_no_message(self) -> None:
        """After the reply the connection's factory no longer holds the request or reply bytes."""
        seen = _result(self.client.request(SCANNER, "POST", "/checkv2", [("Connection", "close")], b"m" * 4096))
        protocol, _ = _accept(self.reactor)
        protocol.dataReceived(CLOSE_REPLY)
        self.assertEqual(seen[0].body, b'{"action":"reject"}')
        factory: Any = self.reactor.tcpClients[0][2]
        exchange = factory.exchange
        self.assertEqual((exchange.payload, exchange.body, exchange.response), ((), [], None))

    def test_chunked_reply_joined(self) -> None:
        """A chunked reply body is delivered de-chunked."""
        seen = _result(self.client.request(SCANNER, "GET", "/ping", []))
        protocol, _ = _accept(self.reactor)
        protocol.dataReceived(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\npo\r\n4\r\nng\r\n\r\n0\r\n\r\n"
        )
        self.assertEqual(seen[0].body, b"pong\r\n")

    def test_close_delimited_reply(self) -> None:
        """A reply without length completes when the scanner closes."""
        seen = _result(self.client.request(SCANNER, "GET", "/ping", []))
        protocol, _ = _accept(self.reactor)
        protocol.dataReceived(b"HTTP/1.0 200 OK\r\n\r\npong")
        self.assertEqual(seen, [])
        protocol.connectionLost(Failure(twisted_error.ConnectionDone()))
        self.assertEqual(seen[0].body, b"pong")

    def test_error_status_is_a_reply(self) -> None:
        """A 5xx reply is delivered as a response, not a failure."""
        seen = _result(self.client.request(SCANNER, "POST", "/learnspam", []))
        protocol, _ = _accept(self.reactor)
        protocol.dataReceived(encode_response(500, "invalid command", [("Connection", "close")]))
        self.assertEqual((seen[0].status, seen[0].reason), (500, "invalid command"))

    def test_unix_socket(self) -> None:
        """A path string connects over a unix socket."""
        self.client.request("/run/rspamd/normal.sock", "GET", "/ping", [], timeout=3)
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertEqual(self.reactor.unixClients[0][0], "/run/rspamd/normal.sock")

    def test_unix_address(self) -> None:
        """A UNIXAddress connects over a unix socket."""
        self.client.request(UNIXAddress(b"/run/rspamd/normal.sock"), "GET", "/ping", [])
        self.assertEqual(self.reactor.unixClients[0][0], "/run/rspamd/normal.sock")

    def test_ipv6_address(self) -> None:
        """An IPv6Address connects to its literal host."""
        self.client.request(IPv6Address("TCP", "::1", 11333), "GET", "/ping", [])
        self.assertEqual(self.reactor.tcpClients[0][:2], ("::1", 11333))

    def test_bad_address_rejected(self) -> None:
        """An address of an unknown kind raises ValueError."""
        self.assertRaises(ValueError, self.client.request, 11333, "GET", "/ping", [])


class FailureTests(unittest.TestCase):
    """Errors, timeouts and cancellation."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.client = ScannerClient(self.reactor, max_reply=64)

    def _failure(self, seen: list[Any], kind: type[_E]) -> _E:
        self.assertEqual(len(seen), 1)
        failure = seen[0]
        self.assertIsInstance(failure, Failure)
        error = failure.value
        assert isinstance(error, kind)
        return error

    def test_connection_refused(self) -> None:
        """A refused connection fails with ConnectError 500 'IO write error: Connection refused'."""
        seen = _result(self.client.request(SCANNER, "GET", "/ping", []))
        connector = self.reactor.connectors[0]
        self.reactor.tcpClients[0][2].clientConnectionFailed(
            connector, Failure(twisted_error.ConnectionRefusedError())
        )
        error = self._failure(seen, ConnectError)
        self.assertEqual(str(error), "500 IO write error: Connection refused")
        self.assertTrue(error.retryable)

    def test_timeout_while_connecting(self) -> None:
        """No connection within the timeout fails with ScannerTimeout and stops connecting."""
        seen = _result(self.client.request(SCANNER, "GET", "/ping", [], timeout=2.0))
        self.reactor.advance(1.9)
        self.assertEqual(seen, [])
        self.reactor.advance(0.1)
        error = self._failure(seen, ScannerTimeout)
        self.assertEqual((error.status, error.reason), (408, "IO timeout"))
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)

    def test_late_connection_after_timeout_closed(self) -> None:
        """A connection completing after the request timed out is closed unused."""
        seen = _result(self.client.request(SCANNER, "GET", "/ping", [], timeout=1.0))
        self.reactor.advance(1.0)
        self._failure(seen, ScannerTimeout)
        _, transport = _accept(self.reactor)
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)

    def test_timeout_waiting_for_reply(self) -> None:
        """No complete reply within the timeout fails with ScannerTimeout and aborts."""
        seen = _result(self.client.request(SCANNER, "GET", "/ping", [], timeout=5.0))
        protocol, transport = _accept(self.reactor)
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")
        self.reactor.advance(5.0)
        self._failure(seen, ScannerTimeout)
        self.assertTrue(transport.disconnected)

    def test_timer_cancelled_after_reply(self) -> None:
        """A completed request leaves no pending timeout."""
        seen = _result(self.client.request(SCANNER, "GET", "/ping", [], timeout=5.0))
        protocol, _ = _accept(self.reactor)
        protocol.dataReceived(CLOSE_REPLY)
        self.assertIsInstance(seen[0], ScannerResponse)
        self.assertEqual([call for call in self.reactor.getDelayedCalls() if call.active()], [])

    def test_cancel_aborts_connection(self) -> None:
        """Cancelling the Deferred aborts the connection and fails with CancelledError."""
        deferred = self.client.request(SCANNER, "GET", "/ping", [])
        seen = _result(deferred)
        _, transport = _accept(self.reactor)
        deferred.cancel()
        self._failure(seen, CancelledError)
        self.assertTrue(transport.disconnected)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_cancel_while_connecting(self) -> None:
        """Cancelling before the connection is up stops the connection attempt."""
        deferred = self.client.request(SCANNER, "GET", "/ping", [])
        seen = _result(deferred)
        deferred.cancel()
        self._failure(seen, CancelledError)
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)

    def test_malformed_reply(self) -> None:
        """A reply that is not HTTP fails with BadReply 400."""
        seen = _result(self.client.request(SCANNER, "GET", "/ping", []))
        protocol, transport = _accept(self.reactor)
        protocol.dataReceived(b"RSPAMD/1.3 0 EX_OK\r\n")
        error = self._failure(seen, BadReply)
        self.assertEqual(error.status, 400)
        self.assertTrue(error.reason.startswith("HTTP parser error"))
        self.assertTrue(transport.disconnected)

    def test_reply_too_large(self) -> None:
        """A reply body over max_reply fails with BadReply 413."""
        seen = _result(self.client.request(SCANNER, "GET", "/ping", []))
        protocol, _ = _accept(self.reactor)
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 65\r\n\r\n")
        self.assertEqual(self._failure(seen, BadReply).status, 413)

    def test_closed_inside_reply(self) -> None:
        """A connection closed before the reply ends fails with BadReply (unexpected EOF)."""
        seen = _result(self.client.request(SCANNER, "GET", "/ping", []))
        protocol, _ = _accept(self.reactor)
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        protocol.connectionLost(Failure(twisted_error.ConnectionDone()))
        error = self._failure(seen, BadReply)
        self.assertEqual(str(error), "400 IO read error: unexpected EOF")

    def test_closed_without_reply(self) -> None:
        """A clean close before any reply byte fails with BadReply (unexpected EOF)."""
        seen = _result(self.client.request(SCANNER, "GET", "/ping", []))
        protocol, _ = _accept(self.reactor)
        protocol.connectionLost(Failure(twisted_error.ConnectionDone()))
        self.assertEqual(str(self._failure(seen, BadReply)), "400 IO read error: unexpected EOF")

    def test_client_close_aborts_busy_connection(self) -> None:
        """close() aborts a connection waiting for its reply; the request fails."""
        seen = _result(self.client.request(SCANNER, "GET", "/ping", []))
        protocol, transport = _accept(self.reactor)
        closed = _result(self.client.close())
        self.assertTrue(transport.disconnected)
        protocol.connectionLost(Failure(twisted_error.ConnectionAborted()))
        self._failure(seen, BadReply)
        self.assertEqual(closed, [None])

    def test_reset_without_reply(self) -> None:
        """A reset before any reply byte fails with BadReply 500 'HTTP IO read error'."""
        seen = _result(self.client.request(SCANNER, "GET", "/ping", []))
        protocol, _ = _accept(self.reactor)
        protocol.connectionLost(Failure(twisted_error.ConnectionLost()))
        error = self._failure(seen, BadReply)
        self.assertEqual(error.status, 500)
        self.assertTrue(error.reason.startswith("HTTP IO read error"))

    def test_errors_share_a_base(self) -> None:
        """Every client error is a retryable ScannerError."""
        for kind in (ConnectError, BadReply):
            self.assertTrue(issubclass(kind, ScannerError))
        self.assertTrue(ScannerTimeout().retryable)


class PoolTests(unittest.TestCase):
    """Connection reuse and its limits."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.client = ScannerClient(self.reactor, max_idle_per_address=1, idle_timeout=30)

    def _keep_alive_exchange(self) -> tuple[Any, StringTransport]:
        seen = _result(self.client.request(SCANNER, "GET", "/ping", []))
        protocol, transport = _accept(self.reactor)
        protocol.dataReceived(KEEP_REPLY)
        self.assertEqual(seen[0].body, b"pong\r\n")
        return protocol, transport

    def test_keep_alive_connection_reused(self) -> None:
        """After a keep-alive reply the next request uses the same connection."""
        protocol, transport = self._keep_alive_exchange()
        self.assertEqual(self.client.idle_count(SCANNER), 1)
        transport.clear()
        seen = _result(self.client.request(SCANNER, "POST", "/checkv2", [], b"x"))
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertTrue(transport.value().startswith(b"POST /checkv2 HTTP/1.1\r\n"))
        self.assertEqual(self.client.idle_count(SCANNER), 0)
        protocol.dataReceived(KEEP_REPLY)
        self.assertEqual(seen[0].status, 200)

    def test_connection_close_reply_honoured(self) -> None:
        """A Connection: close reply (Rspamd 3.4) closes the connection; the next request reconnects."""
        seen = _result(self.client.request(SCANNER, "GET", "/ping", []))
        protocol, transport = _accept(self.reactor)
        protocol.dataReceived(CLOSE_REPLY)
        self.assertEqual(seen[0].status, 200)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.client.idle_count(SCANNER), 0)
        self.client.request(SCANNER, "GET", "/ping", [])
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_connection_close_request_not_pooled(self) -> None:
        """A request sent with Connection: close never returns its connection to the pool."""
        self.client.request(SCANNER, "GET", "/ping", [("Connection", "close")])
        protocol, transport = _accept(self.reactor)
        protocol.dataReceived(KEEP_REPLY)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.client.idle_count(SCANNER), 0)

    def test_idle_bound(self) -> None:
        """Idle connections beyond max_idle_per_address are closed."""
        self.client.request(SCANNER, "GET", "/ping", [])
        self.client.request(SCANNER, "GET", "/ping", [])
        first, first_transport = _accept(self.reactor, 0)
        second, second_transport = _accept(self.reactor, 1)
        first.dataReceived(KEEP_REPLY)
        second.dataReceived(KEEP_REPLY)
        self.assertEqual(self.client.idle_count(SCANNER), 1)
        self.assertFalse(first_transport.disconnecting)
        self.assertTrue(second_transport.disconnecting)

    def test_idle_timeout(self) -> None:
        """An idle connection is closed after idle_timeout seconds."""
        _, transport = self._keep_alive_exchange()
        self.reactor.advance(29)
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.client.idle_count(SCANNER), 0)

    def test_closed_idle_connection_dropped(self) -> None:
        """An idle connection closed by the scanner leaves the pool."""
        protocol, _ = self._keep_alive_exchange()
        protocol.connectionLost(Failure(twisted_error.ConnectionDone()))
        self.assertEqual(self.client.idle_count(SCANNER), 0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_stale_connection_retried_once(self) -> None:
        """A reused connection closed before any reply byte is replaced by a new one."""
        protocol, _ = self._keep_alive_exchange()
        seen = _result(self.client.request(SCANNER, "POST", "/checkv2", [], b"msg"))
        protocol.connectionLost(Failure(twisted_error.ConnectionDone()))
        self.assertEqual(seen, [])
        self.assertEqual(len(self.reactor.tcpClients), 2)
        fresh, transport = _accept(self.reactor)
        self.assertTrue(transport.value().endswith(b"\r\n\r\nmsg"))
        fresh.dataReceived(CLOSE_REPLY)
        self.assertEqual(seen[0].status, 200)

    def test_unexpected_bytes_on_idle_connection(self) -> None:
        """Bytes arriving on an idle connection close it."""
        protocol, transport = self._keep_alive_exchange()
        protocol.dataReceived(b"junk")
        self.assertTrue(transport.disconnecting)

    def test_close_closes_idle_connections(self) -> None:
        """close() closes pooled connections and fires when they are gone."""
        protocol, transport = self._keep_alive_exchange()
        seen = _result(self.client.close())
        self.assertTrue(transport.disconnecting)
        self.assertEqual(seen, [])
        protocol.connectionLost(Failure(twisted_error.ConnectionDone()))
        self.assertEqual(seen, [None])


class _TinyScanner(Protocol):
    """A minimal HTTP server answering every request with a fixed reply."""

    def connectionMade(self) -> None:
        self.parser = RequestParser()
        self.factory.connections += 1

    def dataReceived(self, data: bytes) -> None:
        for event in self.parser.feed(data):
            if isinstance(event, Request):
                self.request = event
                self.body = b""
            elif isinstance(event, EndOfMessage):
                assert self.transport is not None
                headers = [("Connection", "close" if self.factory.close else "keep-alive")]
                body = f"{self.request.method} {self.request.target} {self.body!r}".encode()
                self.transport.write(encode_response(200, "OK", headers, body))
                if self.factory.close:
                    self.transport.loseConnection()
            elif isinstance(event, Data):
                self.body += event.chunk


class _TinyScannerFactory(ServerFactory):
    protocol = _TinyScanner

    def __init__(self, close: bool) -> None:
        self.close = close
        self.connections = 0


class LoopbackTests(unittest.TestCase):
    """Against a real Twisted server on loopback."""

    def _serve(self, close: bool) -> tuple[_TinyScannerFactory, int]:
        from twisted.internet import reactor

        factory = _TinyScannerFactory(close)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        address = port.getHost()
        assert isinstance(address, IPv4Address)
        return factory, address.port

    def _client(self) -> ScannerClient:
        from twisted.internet import reactor

        client = ScannerClient(reactor, idle_timeout=5)
        self.addCleanup(client.close)
        return client

    @inlineCallbacks
    def test_keep_alive_reuses_one_connection(self) -> Any:
        """Two sequential requests to a keep-alive server share one TCP connection."""
        factory, port = self._serve(close=False)
        client = self._client()
        address = IPv4Address("TCP", "127.0.0.1", port)
        first = yield client.request(address, "POST", "/checkv2", [("Host", "local")], b"one", 5)
        second = yield client.request(address, "GET", "/checkv2", [], b"two", 5)
        self.assertEqual(first.body, b"POST /checkv2 b'one'")
        self.assertEqual(second.body, b"GET /checkv2 b'two'")
        self.assertEqual(factory.connections, 1)

    @inlineCallbacks
    def test_connection_close_server(self) -> Any:
        """Against a server that closes after each reply every request connects anew."""
        factory, port = self._serve(close=True)
        client = self._client()
        for body in (b"a", b"b"):
            reply = yield client.request(("127.0.0.1", port), "POST", "/checkv2", [], body, 5)
            self.assertEqual(reply.body, b"POST /checkv2 " + repr(body).encode())
        self.assertEqual(factory.connections, 2)

    @inlineCallbacks
    def test_unix_socket(self) -> Any:
        """Requests travel over a unix socket given as a path."""
        from twisted.internet import reactor

        path = self.mktemp()
        factory = _TinyScannerFactory(close=True)
        port = IReactorUNIX(reactor).listenUNIX(path, factory)
        self.addCleanup(port.stopListening)
        reply = yield self._client().request(path, "GET", "/ping", [], timeout=5)
        self.assertEqual(reply.body, b"GET /ping b''")

    @inlineCallbacks
    def test_refused(self) -> Any:
        """Connecting to a closed port fails with ConnectError."""
        from twisted.internet import reactor

        factory = _TinyScannerFactory(close=True)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        address = port.getHost()
        assert isinstance(address, IPv4Address)
        number = address.port
        yield port.stopListening()
        with self.assertRaises(ConnectError) as caught:
            yield self._client().request(("127.0.0.1", number), "GET", "/ping", [], timeout=5)
        self.assertEqual(caught.exception.reason, "IO write error: Connection refused")


class TwistedTransportLoopbackTests(LoopbackTests):
    """The loopback tests with the reactor's own TCP and unix transports."""

    def _client(self) -> ScannerClient:
        from twisted.internet import reactor

        client = ScannerClient(reactor, idle_timeout=5, direct_sockets=False)
        self.addCleanup(client.close)
        return client


class DirectSocketChoiceTests(unittest.TestCase):
    """When the client connects with SocketStream."""

    def test_real_reactor_only(self) -> None:
        """Direct sockets by default on a real reactor, never on a fake one."""
        from twisted.internet import reactor

        self.assertTrue(ScannerClient(reactor).direct_sockets)
        self.assertFalse(ScannerClient(MemoryReactorClock()).direct_sockets)

    def test_host_names_left_to_the_reactor(self) -> None:
        """Numeric and unix addresses are dialled directly; names and scoped IPv6 are not."""
        from twisted.internet import reactor

        client = ScannerClient(reactor)
        self.assertIsNotNone(client._direct_target(("tcp", "127.0.0.1", 1)))
        self.assertIsNotNone(client._direct_target(("tcp", "::1", 1)))
        self.assertIsNotNone(client._direct_target(("unix", "/run/x.sock", 0)))
        self.assertIsNone(client._direct_target(("tcp", "localhost", 1)))
        self.assertIsNone(client._direct_target(("tcp", "fe80::1%lo", 1)))

    @inlineCallbacks
    def test_host_name_connects(self) -> Any:
        """A request to a host name goes through the reactor's connectTCP and works."""
        from twisted.internet import reactor

        factory = _TinyScannerFactory(close=True)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        address = port.getHost()
        assert isinstance(address, IPv4Address)
        client = ScannerClient(reactor)
        self.addCleanup(client.close)
        reply = yield client.request(("localhost", address.port), "GET", "/ping", [], timeout=5)
        self.assertEqual(reply.body, b"GET /ping b''")


class _Recorder(Protocol):
    """Server side of StreamPort tests: records events; ``factory.answer`` reacts to data."""

    def connectionMade(self) -> None:
        self.received = b""
        self.lost: list[Failure] = []
        self.factory.made.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.factory.answer(self, data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.append(reason)


class _RecorderFactory(ServerFactory):
    protocol = _Recorder

    def __init__(self, answer: Any = None) -> None:
        self.made: list[_Recorder] = []
        self.answer = answer or (lambda protocol, data: None)
        self.refuse = False

    def buildProtocol(self, addr: Any) -> Any:
        if self.refuse:
            return None
        return ServerFactory.buildProtocol(self, addr)


class _Collector(Protocol):
    """Client side: sends ``request`` once connected, collects the reply until closed."""

    def __init__(self, request: bytes, half_close: bool = False) -> None:
        self.request = request
        self.half_close = half_close
        self.received = b""
        self.reason: Failure | None = None
        self.done: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)
        if self.half_close:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason
        self.done.callback(None)


class StreamPortTests(unittest.TestCase):
    """StreamPort and SocketStream serving real loopback connections."""

    def _serve(self, factory: _RecorderFactory) -> tuple[StreamPort, int]:
        from twisted.internet import reactor

        listening = socket.socket()
        listening.bind(("127.0.0.1", 0))
        listening.listen(16)
        port = StreamPort.adopt(reactor, listening.fileno(), socket.AF_INET, factory)
        listening.close()  # the port serves its own duplicate
        self.addCleanup(port.stopListening)
        address = port.getHost()
        assert isinstance(address, IPv4Address)
        return port, address.port

    def _connect(self, number: int, request: bytes, half_close: bool = False) -> _Collector:
        from twisted.internet import reactor
        from twisted.internet.protocol import ClientCreator

        collector = _Collector(request, half_close)
        ClientCreator(reactor, lambda: collector).connectTCP("127.0.0.1", number)
        return collector

    @inlineCallbacks
    def test_large_reply_then_close(self) -> Any:
        """A reply far larger than the socket buffers arrives whole; the close waits for it
        and the protocol hears of it on a later turn, once."""
        payload = bytes(range(256)) * 16384
        notified_at_once: list[int] = []

        def answer(protocol: _Recorder, data: bytes) -> None:
            if protocol.received.endswith(b"go"):
                assert protocol.transport is not None
                write_now(protocol.transport, b"head:", payload)
                protocol.transport.loseConnection()
                notified_at_once.append(len(protocol.lost))

        factory = _RecorderFactory(answer)
        _, number = self._serve(factory)
        collector = self._connect(number, b"go")
        yield collector.done
        assert collector.reason is not None
        self.assertTrue(collector.reason.check(twisted_error.ConnectionDone))
        self.assertEqual(collector.received, b"head:" + payload)
        [server] = factory.made
        self.assertEqual(notified_at_once, [0])
        self.assertEqual(len(server.lost), 1)
        self.assertTrue(server.lost[0].check(twisted_error.ConnectionDone))

    @inlineCallbacks
    def test_addresses(self) -> Any:
        """The transport knows both ends."""

        def answer(protocol: _Recorder, data: bytes) -> None:
            assert protocol.transport is not None
            peer = protocol.transport.getPeer()
            host = protocol.transport.getHost()
            assert isinstance(peer, IPv4Address) and isinstance(host, IPv4Address)
            protocol.transport.write(f"{peer.host} {host.host}:{host.port}".encode())
            protocol.transport.loseConnection()

        _, number = self._serve(_RecorderFactory(answer))
        collector = self._connect(number, b"x")
        yield collector.done
        self.assertEqual(collector.received, f"127.0.0.1 127.0.0.1:{number}".encode())

    @inlineCallbacks
    def test_peer_close_reported(self) -> Any:
        """A client closing its side: the protocol gets its bytes, then ConnectionDone."""
        factory = _RecorderFactory()
        _, number = self._serve(factory)
        collector = self._connect(number, b"bye", half_close=True)
        yield collector.done
        while not factory.made or not factory.made[0].lost:
            yield deferLater(self._reactor(), 0.01, lambda: None)
        [server] = factory.made
        self.assertEqual(server.received, b"bye")
        self.assertTrue(server.lost[0].check(twisted_error.ConnectionDone))

    @inlineCallbacks
    def test_abort(self) -> Any:
        """abortConnection resets the connection; the protocol hears ConnectionAborted later."""

        def answer(protocol: _Recorder, data: bytes) -> None:
            assert protocol.transport is not None
            protocol.transport.abortConnection()  # type: ignore[attr-defined]
            self.assertEqual(protocol.lost, [])

        factory = _RecorderFactory(answer)
        _, number = self._serve(factory)
        collector = self._connect(number, b"x")
        yield collector.done
        assert collector.reason is not None
        self.assertFalse(collector.reason.check(twisted_error.ConnectionDone))
        yield deferLater(self._reactor(), 0, lambda: None)
        self.assertTrue(factory.made[0].lost[0].check(twisted_error.ConnectionAborted))

    @inlineCallbacks
    def test_refused_by_factory(self) -> Any:
        """A connection the factory builds no protocol for is closed at once."""
        factory = _RecorderFactory()
        factory.refuse = True
        _, number = self._serve(factory)
        collector = self._connect(number, b"x")
        yield collector.done
        self.assertEqual((collector.received, factory.made), (b"", []))

    @inlineCallbacks
    def test_failing_protocol_does_not_stop_the_port(self) -> Any:
        """A protocol raising while it starts is logged and its connection dropped; the
        port goes on serving."""
        calls: list[int] = []

        def answer(protocol: _Recorder, data: bytes) -> None:
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("broken")
            assert protocol.transport is not None
            protocol.transport.write(b"fine")
            protocol.transport.loseConnection()

        _, number = self._serve(_RecorderFactory(answer))
        first = self._connect(number, b"x")
        yield first.done
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        second = self._connect(number, b"y")
        yield second.done
        self.assertEqual((first.received, second.received), (b"", b"fine"))

    @inlineCallbacks
    def test_stop_listening(self) -> Any:
        """Stopping closes the socket and stops the factory; connections are then refused."""
        factory = _RecorderFactory()
        port, number = self._serve(factory)
        self.assertEqual(factory.numPorts, 1)
        yield port.stopListening()
        self.assertEqual((factory.numPorts, port.fileno()), (0, -1))
        with self.assertRaises(twisted_error.ConnectionRefusedError):
            from twisted.internet import reactor
            from twisted.internet.protocol import ClientCreator

            yield ClientCreator(reactor, Protocol).connectTCP("127.0.0.1", number)

    def _reactor(self) -> Any:
        from twisted.internet import reactor

        return reactor


class RealRspamdTests(unittest.TestCase):
    """Against a real Rspamd 3.4 normal worker (run inside ``unshare -n``)."""

    skip = skip_unless_rspamd()
    timeout = 300

    @inlineCallbacks
    def test_gtube_rejected(self) -> Any:
        """POST /checkv2 with GTUBE gets action reject; the 3.4 Connection: close is honoured."""
        from twisted.internet import reactor

        peer = yield start_rspamd(reactor, workers=("normal",), wait_hyperscan=False)
        self.addCleanup(peer.stop)
        client = ScannerClient(reactor)
        self.addCleanup(client.close)
        address = IPv4Address("TCP", "127.0.0.1", peer.ports["normal"])
        reply = yield client.request(
            address,
            "POST",
            "/checkv2",
            [
                ("Host", "local"),
                ("Connection", "keep-alive"),
                ("From", "sender@example.com"),
                ("Rcpt", "rcpt@example.net"),
            ],
            GTUBE_MESSAGE,
            timeout=30,
        )
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.get("Connection"), "close")
        result = json.loads(reply.body)
        self.assertEqual(result["action"], "reject")
        self.assertEqual(result["messages"], {"smtp_message": "Gtube pattern"})
        self.assertEqual(client.idle_count(address), 0)
