"""Tests for :mod:`rspamd_tx.fuzzy.listeners`: UDP and TCP transports of the storage."""

from __future__ import annotations

import errno
import os
import socket
from ipaddress import ip_address, ip_network
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.trial import unittest

from rspamd_tx.config.workers import FuzzyOptions
from rspamd_tx.fuzzy.backend import CheckResult
from rspamd_tx.fuzzy.listeners import (
    MAX_PENDING_REPLIES,
    FuzzyDatagramProtocol,
    FuzzyStreamFactory,
    FuzzyStreamProtocol,
    parse_host,
)
from rspamd_tx.fuzzy.storage import FuzzyStorage
from rspamd_tx.protocols.fuzzy_codec import (
    Command,
    FuzzyStreamDecoder,
    FuzzyReply,
    decode_reply,
    encode_frame,
    encode_request,
)
from tests.test_fuzzy_storage import DIGEST, ListQueue, MemoryBackend, command

PEER = ("127.0.0.1", 40000)

reactor: Any = _reactor


class DatagramTransport:
    """Records what a datagram protocol sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def write(self, data: bytes, addr: Any) -> None:
        self.sent.append((data, addr))


def make_storage(backend: MemoryBackend, clock: Clock, **options: Any) -> FuzzyStorage:
    return FuzzyStorage(FuzzyOptions(**options), backend, ListQueue(), clock)


class ParseHostTests(unittest.TestCase):
    def test_addresses(self) -> None:
        """IPv4 and IPv6 hosts parse; a zone is dropped; names are not addresses."""
        self.assertEqual(parse_host("192.0.2.1"), ip_address("192.0.2.1"))
        self.assertEqual(parse_host("fe80::1%eth0"), ip_address("fe80::1"))
        self.assertIsNone(parse_host("localhost"))


class DatagramTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.backend = MemoryBackend()
        self.protocol = FuzzyDatagramProtocol(make_storage(self.backend, self.clock))
        self.transport = DatagramTransport()
        self.protocol.transport = self.transport  # type: ignore[assignment]

    def test_reply_to_sender(self) -> None:
        """A request datagram is answered to its sender."""
        self.protocol.datagramReceived(encode_request(command(tag=77)), PEER)
        [(data, addr)] = self.transport.sent
        self.assertEqual((decode_reply(data).tag, addr), (77, PEER))

    def test_invalid_not_answered(self) -> None:
        """An invalid datagram gets nothing."""
        self.protocol.datagramReceived(b"\x00" * 10, PEER)
        self.assertEqual(self.transport.sent, [])

    def test_unix_datagram_sender_is_local(self) -> None:
        """A sender on a unix datagram socket is a local client: it may write."""
        self.protocol.storage.reconfigure(FuzzyOptions(allow_update=(ip_network("127.0.0.2"),)))
        self.protocol.datagramReceived(encode_request(command(Command.WRITE)), "/run/client.sock")
        [(data, addr)] = self.transport.sent
        self.assertEqual((decode_reply(data).prob, addr), (1.0, "/run/client.sock"))

    def test_late_reply(self) -> None:
        """A reply from an asynchronous lookup is sent when it arrives."""
        self.backend.hold = True
        self.protocol.datagramReceived(encode_request(command()), PEER)
        self.assertEqual(self.transport.sent, [])
        self.backend.held[0].callback(CheckResult(5, 1, 1.0, 0, DIGEST))
        self.assertEqual(decode_reply(self.transport.sent[0][0]).value, 5)

    def test_late_reply_after_stop(self) -> None:
        """A reply arriving after the port stopped is dropped quietly."""
        self.backend.hold = True
        self.protocol.datagramReceived(encode_request(command()), PEER)
        self.protocol.transport = None
        self.backend.held[0].callback(CheckResult(5, 1, 1.0, 0, DIGEST))
        self.assertEqual(self.transport.sent, [])


class SocketTransport:
    """A datagram transport with a ``socket``: what a listening port looks like."""

    def __init__(self) -> None:
        self.socket = FakeSocket()

    def write(self, data: bytes, addr: Any) -> None:
        raise AssertionError("the reply should go straight to the socket")


class FakeSocket:
    """Records ``sendto`` calls; raises ``error`` (an errno) instead when set."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []
        self.error: int | None = None

    def sendto(self, data: bytes, addr: Any) -> int:
        if self.error is not None:
            raise OSError(self.error, os.strerror(self.error))
        self.sent.append((data, addr))
        return len(data)


class DirectSendTests(unittest.TestCase):
    """Replies written straight to the port's socket."""

    def setUp(self) -> None:
        self.protocol = FuzzyDatagramProtocol(make_storage(MemoryBackend(), Clock()))
        self.transport = SocketTransport()
        self.protocol.transport = self.transport  # type: ignore[assignment]

    def test_reply_sent_on_socket(self) -> None:
        """The reply goes to the sender through the socket's sendto."""
        self.protocol.datagramReceived(encode_request(command(tag=5)), PEER)
        [(data, addr)] = self.transport.socket.sent
        self.assertEqual((decode_reply(data).tag, addr), (5, PEER))

    def test_full_buffer_dropped_with_warning(self) -> None:
        """EAGAIN and ENOBUFS drop the reply with a warning naming the peer."""
        for code in (errno.EAGAIN, errno.ENOBUFS):
            self.transport.socket.error = code
            with capturedLogs() as logged:
                self.protocol.datagramReceived(encode_request(command()), PEER)
            [event] = logged
            self.assertEqual((event["log_level"].name, event["peer"], event["error"].errno),
                             ("warn", PEER, code))
        self.assertEqual(self.transport.socket.sent, [])

    def test_refused_dropped_silently(self) -> None:
        """ECONNREFUSED (an earlier reply's ICMP error) drops the reply without a log."""
        self.transport.socket.error = errno.ECONNREFUSED
        with capturedLogs() as logged:
            self.protocol.datagramReceived(encode_request(command()), PEER)
        self.assertEqual(logged, [])

    def test_late_reply_on_socket(self) -> None:
        """A reply from an asynchronous lookup also goes to the socket."""
        backend = MemoryBackend()
        backend.hold = True
        self.protocol.storage = make_storage(backend, Clock())
        self.protocol.datagramReceived(encode_request(command()), PEER)
        self.assertEqual(self.transport.socket.sent, [])
        backend.held[0].callback(CheckResult(5, 1, 1.0, 0, DIGEST))
        self.assertEqual(decode_reply(self.transport.socket.sent[0][0]).value, 5)


class _Client(DatagramProtocol):
    """Sends one datagram and fires ``reply`` with the decoded answer."""

    def __init__(self, datagram: bytes, server: Any) -> None:
        self.datagram = datagram
        self.server = server
        self.reply: Deferred[FuzzyReply] = Deferred()

    def startProtocol(self) -> None:
        assert self.transport is not None
        self.transport.write(self.datagram, self.server)

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.reply.callback(decode_reply(datagram))


class ListeningPortTests(unittest.TestCase):
    """Round trips through real ports of every kind the storage listens on; the
    replies go out through the port's socket."""

    def setUp(self) -> None:
        self.protocol = FuzzyDatagramProtocol(make_storage(MemoryBackend(), Clock()))

    @inlineCallbacks
    def round_trip(self, listen: Any, connect: Any) -> Any:
        port = listen(self.protocol)
        self.addCleanup(port.stopListening)
        port.write = self.fail  # replies must not take the port's checked write()
        client = _Client(encode_request(command(tag=31)), port.getHost())
        client_port = connect(client)
        self.addCleanup(client_port.stopListening)
        reply = yield client.reply
        self.assertEqual(reply.tag, 31)

    def _udp(self, host: str) -> Any:
        def listen(protocol: DatagramProtocol) -> Any:
            return reactor.listenUDP(0, protocol, interface=host)

        def connect(client: _Client) -> Any:
            client.server = (host, client.server.port)
            return reactor.listenUDP(0, client, interface=host)

        return self.round_trip(listen, connect)

    def test_udp_ipv4(self) -> Any:
        """An IPv4 UDP port answers."""
        return self._udp("127.0.0.1")

    def test_udp_ipv6(self) -> Any:
        """An IPv6 UDP port answers."""
        try:
            probe = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            probe.bind(("::1", 0))
            probe.close()
        except OSError:
            raise unittest.SkipTest("no IPv6 loopback")
        return self._udp("::1")

    def test_unix_datagram(self) -> Any:
        """A unix datagram port answers a client bound to its own path."""
        directory = self.mktemp()
        os.makedirs(directory)
        server_path = os.path.join(directory, "fuzzy.sock")

        def listen(protocol: DatagramProtocol) -> Any:
            return reactor.listenUNIXDatagram(server_path, protocol)

        def connect(client: _Client) -> Any:
            client.server = server_path
            return reactor.listenUNIXDatagram(os.path.join(directory, "client.sock"), client)

        return self.round_trip(listen, connect)


class StreamTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.backend = MemoryBackend()

    def connect(self, host: str = "127.0.0.1", timeout: float = 5.0,
                **options: Any) -> tuple[FuzzyStreamProtocol, StringTransport]:
        factory = FuzzyStreamFactory(make_storage(self.backend, self.clock, **options),
                                     self.clock, timeout)
        protocol = factory.buildProtocol(IPv4Address("TCP", host, 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40000))
        protocol.makeConnection(transport)
        return protocol, transport

    def replies(self, transport: StringTransport) -> list[int]:
        """Tags of the framed replies written so far."""
        frames = FuzzyStreamDecoder().feed(transport.value())
        return [decode_reply(frame).tag for frame in frames]

    def test_frame_answered(self) -> None:
        """A framed request gets a framed reply."""
        protocol, transport = self.connect()
        protocol.dataReceived(encode_frame(encode_request(command(tag=5))))
        self.assertEqual(self.replies(transport), [5])

    def test_pipelining_every_split(self) -> None:
        """Several frames cut at any byte boundary are all answered in order."""
        stream = b"".join(encode_frame(encode_request(command(tag=t))) for t in (1, 2, 3))
        for cut in range(1, len(stream)):
            protocol, transport = self.connect()
            protocol.dataReceived(stream[:cut])
            protocol.dataReceived(stream[cut:])
            self.assertEqual(self.replies(transport), [1, 2, 3], f"cut at {cut}")

    def test_replies_in_request_order(self) -> None:
        """Lookups finishing out of order are still answered in request order."""
        self.backend.hold = True
        protocol, transport = self.connect()
        protocol.dataReceived(encode_frame(encode_request(command(tag=1)))
                              + encode_frame(encode_request(command(tag=2))))
        self.backend.held[1].callback(CheckResult())
        self.assertEqual(self.replies(transport), [])
        self.backend.held[0].callback(CheckResult())
        self.assertEqual(self.replies(transport), [1, 2])

    def test_invalid_payload_keeps_connection(self) -> None:
        """An invalid payload gets no reply frame; later frames are still served."""
        protocol, transport = self.connect()
        protocol.dataReceived(encode_frame(b"\x01" * 20)
                              + encode_frame(encode_request(command(tag=9))))
        self.assertEqual((self.replies(transport), transport.disconnecting), ([9], False))

    def test_zero_length_closes(self) -> None:
        """A zero-length frame closes the connection."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"\x00\x00")
        self.assertTrue(transport.disconnecting)

    def test_oversized_frame_closes(self) -> None:
        """A frame longer than 8192 bytes closes the connection before it arrives."""
        protocol, transport = self.connect()
        protocol.dataReceived((8193).to_bytes(2, "little"))
        self.assertTrue(transport.disconnecting)

    def test_idle_timeout(self) -> None:
        """A connection idle for ``tcp_timeout`` seconds is closed; input resets the timer."""
        protocol, transport = self.connect(timeout=5.0)
        self.clock.advance(4.0)
        protocol.dataReceived(b"\x4c")
        self.clock.advance(4.0)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1.0)
        self.assertTrue(transport.disconnecting)

    def test_blocked_source_closed(self) -> None:
        """A connection from a blocked source is closed at once."""
        _, transport = self.connect(host="192.0.2.7", blocked=(ip_network("192.0.2.0/24"),))
        self.assertTrue(transport.disconnecting)

    def test_backpressure(self) -> None:
        """Too many unanswered requests pause reading until replies are written."""
        self.backend.hold = True
        protocol, transport = self.connect()
        frame = encode_frame(encode_request(command()))
        protocol.dataReceived(frame * MAX_PENDING_REPLIES)
        self.assertEqual(transport.producerState, "paused")
        for held in self.backend.held:
            held.callback(CheckResult())
        self.assertEqual(transport.producerState, "producing")

    def test_lost_connection_drops_late_replies(self) -> None:
        """A reply finishing after the connection is gone is not written."""
        self.backend.hold = True
        protocol, transport = self.connect()
        protocol.dataReceived(encode_frame(encode_request(command())))
        transport.clear()
        protocol.connectionLost()
        self.backend.held[0].callback(CheckResult())
        self.assertEqual(transport.value(), b"")

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.binary(max_size=400), max_size=6))
    def test_random_stream_never_raises(self, chunks: list[bytes]) -> None:
        """Any byte stream is served or closes the connection; nothing raises."""
        protocol, transport = self.connect()
        for chunk in chunks:
            protocol.dataReceived(chunk)
        frames = FuzzyStreamDecoder().feed(transport.value())
        self.assertTrue(all(len(frame) in (16, 96) for frame in frames))
