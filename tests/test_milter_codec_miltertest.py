"""The milter codec against a real MTA-side peer: OpenDKIM's ``miltertest``.

A minimal Twisted protocol moves bytes between the socket and
:class:`MilterConnection`; the Lua script in ``tests/data/milter/codec.lua``
drives a two-message conversation and checks the replies it decoded.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Generator

from twisted.internet import defer, protocol, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IListeningPort
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from rspamd_tx.protocols.milter_codec import MilterConnection, MilterProtocolError, negotiate
from rspamd_tx.protocols.milter_events import (
    Accept, AddHeader, AddRecipient, BodyChunk, ChangeHeader, Connect, Data,
    DeleteRecipient, EndOfHeaders, EndOfMessage, Header, Helo, HTTP_PING_RESPONSE,
    HttpPing, InsertHeader, Macro, MailFrom, OptionNegotiation, Quarantine, Quit,
    RcptTo, ReplaceBody, ReplyCode, Response, ServerEvent,
)

SCRIPTS = os.path.join(os.path.dirname(__file__), "data", "milter")
SCRIPT = os.path.join(SCRIPTS, "codec.lua")
OLD_VERSION_SCRIPT = os.path.join(SCRIPTS, "old_version.lua")

#: The verdict for each end-of-message, in order.
VERDICTS: list[list[Response]] = [
    [AddHeader(b"X-Spam", b"Yes"), InsertHeader(0, b"X-B", b"b0"),
     ChangeHeader(1, b"Subject", b"[SPAM] hello"), ChangeHeader(1, b"X-Old", b""),
     AddRecipient(b"<added@example.org>"), DeleteRecipient(b"<rcpt@example.org>"),
     ReplaceBody(b"new body\r\n"), Quarantine(b"held for review"), Accept()],
    [ReplyCode(b"554", b"5.7.1", b"Gtube pattern")],
]


def port_number(port: IListeningPort) -> int:
    """The TCP port ``port`` listens on."""
    address = port.getHost()
    assert isinstance(address, IPv4Address)
    return address.port


class RecordingMilter(protocol.Protocol):
    """Answers as the test dictates and records every event it decodes."""

    @property
    def shared(self) -> RecordingMilterFactory:
        """The factory holding the test's record."""
        assert isinstance(self.factory, RecordingMilterFactory)
        return self.factory

    def connectionMade(self) -> None:
        self.milter = MilterConnection()

    def dataReceived(self, data: bytes) -> None:
        self.milter.receive_data(data)
        try:
            for event in self.milter:
                self.shared.events.append(event)
                self._answer(event)
        except MilterProtocolError as error:
            self.shared.errors.append(error.reason)
            assert self.transport is not None
            self.transport.loseConnection()

    def _answer(self, event: ServerEvent) -> None:
        assert self.transport is not None
        if isinstance(event, HttpPing):
            self.transport.write(event.response)
            self.transport.loseConnection()
        elif isinstance(event, OptionNegotiation):
            self.transport.write(self.milter.send(negotiate(event)))
        elif isinstance(event, EndOfMessage):
            for response in self.shared.verdicts.pop(0):
                self.transport.write(self.milter.send(response))
        elif isinstance(event, Quit):
            self.transport.loseConnection()

    def connectionLost(self, reason: object = None) -> None:
        self.shared.closed.callback(None)


class RecordingMilterFactory(protocol.ServerFactory):
    """Shared record of one test's conversations."""

    protocol = RecordingMilter

    def __init__(self, verdicts: list[list[Response]]) -> None:
        self.verdicts = list(verdicts)
        self.events: list[ServerEvent] = []
        self.errors: list[str] = []
        self.closed: defer.Deferred[None] = defer.Deferred()


class MiltertestTests(unittest.TestCase):
    """miltertest (the MTA side) talks to the codec."""

    timeout = 60

    def setUp(self) -> None:
        if shutil.which("miltertest") is None:
            raise unittest.SkipTest("miltertest is not installed")
        self.factory = RecordingMilterFactory(VERDICTS)
        port: IListeningPort = reactor.listenTCP(
            0, self.factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.port = port_number(port)

    @defer.inlineCallbacks
    def test_two_messages(self) -> Generator[defer.Deferred[Any], Any, None]:
        """miltertest's frames decode in order and it accepts every reply."""
        result = yield self._run_script()
        out, err, code = result
        yield self.factory.closed
        self.assertEqual((code, self.factory.errors), (0, []), (out, err))
        self.assertIn(b"codec script done", out)
        expected = [
            OptionNegotiation(6, 0x1FF, 0x1FFFFF),
            Macro(b"C", ((b"j", b"mx.example.org"), (b"{daemon_name}", b"mx.example.org"))),
            Connect(b"client.example.net", "4", 12345, b"192.0.2.10"),  # miltertest's port
            Helo(b"client.example.net"),
            Macro(b"M", ((b"i", b"ABCDEF1234"),)),
            MailFrom(b"<sender@example.net>", (b"SIZE=123",)),
            RcptTo(b"<rcpt@example.org>"), Data(),
            Header(b"Subject", b"hello"), Header(b"X-Spam", b"yes"), EndOfHeaders(),
            BodyChunk(b"Hello world\r\n"), EndOfMessage(),
            MailFrom(b"<second@example.net>"), RcptTo(b"<rcpt2@example.org>"), Data(),
            Header(b"Subject", b"GTUBE"), EndOfHeaders(), BodyChunk(b"spam\r\n"),
            EndOfMessage(), Quit(),
        ]
        self.assertEqual(self.factory.events, expected)

    @defer.inlineCallbacks
    def test_script_detects_wrong_verdict(self) -> Generator[defer.Deferred[Any], Any, None]:
        """The script fails when the decoded header differs from what it expects."""
        self.factory.verdicts = [[AddHeader(b"X-Spam", b"No"), Accept()]]
        result = yield self._run_script()
        out, err, code = result
        yield self.factory.closed
        self.assertNotEqual(code, 0)
        self.assertIn(b"check failed: X-Spam added", out)

    @defer.inlineCallbacks
    def test_old_version_refused(self) -> Generator[defer.Deferred[Any], Any, None]:
        """An MTA offering version 2 sees the connection closed without reply."""
        result = yield self._run_script(OLD_VERSION_SCRIPT)
        out, err, code = result
        yield self.factory.closed
        self.assertEqual(code, 0, (out, err))
        self.assertIn(b"refused: ", out)
        self.assertEqual(self.factory.events, [])
        self.assertEqual(self.factory.errors, ["invalid protocol version: 2"])

    def _run_script(self, script: str = SCRIPT) -> defer.Deferred[tuple[bytes, bytes, int]]:
        output: defer.Deferred[tuple[bytes, bytes, int]] = getProcessOutputAndValue(
            shutil.which("miltertest") or "miltertest",
            ["-D", f"port={self.port}", "-s", script], env=dict(os.environ))
        return output


class HttpPingTests(unittest.TestCase):
    """The HTTP health check over a real socket."""

    timeout = 30

    @defer.inlineCallbacks
    def test_ping(self) -> Generator[defer.Deferred[Any], Any, None]:
        """A client sending GET /ping reads Rspamd's fixed pong and a close."""
        factory = RecordingMilterFactory([])
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        received = yield _http_get(port_number(port), b"GET /ping HTTP/1.1\r\n\r\n")
        self.assertEqual(received, HTTP_PING_RESPONSE)
        self.assertEqual(factory.events, [HttpPing()])


class _Collect(protocol.Protocol):
    def __init__(self, request: bytes, done: defer.Deferred[bytes]) -> None:
        self.request = request
        self.done = done
        self.data = b""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: object = None) -> None:
        self.done.callback(self.data)


def _http_get(port: int, request: bytes) -> defer.Deferred[bytes]:
    done: defer.Deferred[bytes] = defer.Deferred()
    protocol.ClientCreator(reactor, _Collect, request, done).connectTCP("127.0.0.1", port)
    return done
