"""Recorded-frames comparison: the same milter sessions through real ``rspamd_proxy`` and through ours.

A real Rspamd 3.4 runs a normal worker and its ``rspamd_proxy`` in milter mode
in front of it; our proxy worker (built by :func:`rspamd_tx.proxy.server.build_worker`
with ``milter = yes``, so the runtime's own wiring is what runs) listens in
process in front of the same normal worker.  An MTA played with our MTA-side
codec (:class:`~rspamd_tx.protocols.milter_codec.MtaDecoder`) sends identical
conversations to both; the milter reply frames must be byte-identical.

Nothing is normalised: the scanner sees the same message, envelope, client
address and macros from both proxies, and its modules are deterministic here
(network modules off; the ``regexp`` rules below pick each action by subject;
``milter_headers`` adds and removes headers; its ``x-spamd-result`` routine is
left out because it lists symbols in hash order).  Two things could differ and are
kept out of these sessions on purpose: ``p`` progress frames (ours only, sent
after 10 s of scanning; scans here take milliseconds) and quarantine with an
``smtp_message`` (3.4 sends ``q``, 3.9+ and ours do not).  One difference is
deliberate and has its own test: with every upstream down Rspamd closes the
milter connection where it means to send ``t``; ours sends ``t``.

:class:`RequestVsRspamdTests` compares the other side too: the scan request
each proxy sends for the same session to a recording scanner.  Headers and
body are identical except for the method (3.4 sends ``GET`` with the body to a
loopback upstream, ours ``POST``), ``X-Rspamd-Mail-Esmtp-Args`` (ours, as
Rspamd 3.14 does) and ``Log-Tag`` (added by our upstream scanner, as Rspamd
3.12+ does; left out of the comparison).

Run inside ``unshare -n`` as CI does.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.python.failure import Failure
from twisted.trial import unittest

from rspamd_tx.config import ucl
from rspamd_tx.config.tree import UclObject
from rspamd_tx.config.workers import check_config
from rspamd_tx.protocols.milter_codec import MtaDecoder
from rspamd_tx.protocols.milter_events import (
    Accept, BodyChunk, ChangeHeader, Command, Connect, Data, Discard, EndOfHeaders,
    EndOfMessage, Header, Helo, Macro, MailFrom, OptionNegotiation, OptionNegotiationReply,
    Quit, QuitNewConnection, RcptTo, Reject, ReplyCode, Tempfail,
)
from rspamd_tx.proxy.milter_listener import MilterFactory
from rspamd_tx.proxy.server import ProxyWorker, build_worker

from tests.peers.rspamd import DEFAULT_HS_CACHE, RspamdPeer, skip_unless_rspamd, start_rspamd

GTUBE_BODY = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X\r\n"

#: Scanner rules choosing the action by subject (actions: add header 6, rewrite 8, reject 15);
#: received X-Spam headers add SPAM_FLAG (5), so tx-add-header with X-Spam is add header.
REGEXP_RULES = """
TX_ADD_HEADER { re = "Subject=/tx-add-header/H"; score = 1.5; description = "test"; }
TX_REWRITE { re = "Subject=/tx-rewrite/H"; score = 9.0; description = "test"; }
TX_REJECT { re = "Subject=/tx-reject/H"; score = 20.0; description = "test"; }
TX_GREYLIST { re = "Subject=/tx-greylist/H"; score = 5.0; description = "test"; }
"""
ACTIONS = "reject = 15; add_header = 6; rewrite_subject = 8; greylist = 4;\n"
MILTER_HEADERS = """
use = ["x-rspamd-server", "x-rspamd-queue-id", "x-spam-level", "x-spam-status", "remove-spam-flag"];
skip_local = false;
skip_authenticated = false;
"""

FINAL = (Accept, Discard, ReplyCode, Tempfail, Reject)


def use_private_hs_cache(case: unittest.TestCase, name: str) -> None:
    """Give the Rspamd that ``case`` starts its own hyperscan cache directory ``name``.

    Rspamd's hs_helper deletes every cached database of the shared cache
    directory that its own configuration does not use; a test adding regexp
    rules would therefore wipe (and be wiped by) Rspamds started elsewhere with
    the stock rules.  A subdirectory of the shared cache is invisible to them.
    """
    base = os.environ.get("RSPAMD_TX_HS_CACHE", DEFAULT_HS_CACHE)
    case.patch(os, "environ", {**os.environ, "RSPAMD_TX_HS_CACHE": os.path.join(base, name)})


def connection_start(queue_id: bytes) -> list[Command]:
    """Macros, connect and HELO as Postfix sends them."""
    return [
        Macro(b"C", ((b"j", b"mx.example.org"), (b"{daemon_name}", b"mx.example.org"),
                     (b"v", b"Postfix 3.7"))),
        Connect(b"client.example.net", "4", 45678, b"192.0.2.10"),
        Macro(b"H", ((b"{tls_version}", b"TLSv1.3"), (b"{cipher}", b"TLS_AES_256_GCM_SHA384"))),
        Helo(b"client.example.net"),
        Macro(b"M", ((b"i", queue_id), (b"{auth_authen}", b""))),
    ]


def message(subject: bytes, body: bytes, extra_headers: Sequence[tuple[bytes, bytes]] = ()) -> list[Command]:
    """One message: envelope, headers, body (without the final E)."""
    headers = [
        (b"From", b"Sender <sender@example.net>"), (b"To", b"<rcpt@example.org>"),
        (b"Subject", subject), (b"Date", b"Mon, 23 Nov 2026 10:00:00 +0000"),
        (b"Message-ID", b"<" + subject.replace(b" ", b".") + b"@example.net>"),
        *extra_headers,
    ]
    return [
        MailFrom(b"<sender@example.net>", (b"SIZE=500",)),
        RcptTo(b"<rcpt@example.org>"),
        Data(),
        *(Header(name, value) for name, value in headers),
        EndOfHeaders(),
        BodyChunk(body),
    ]


HAM_BODY = b"Hi,\r\n\r\nshall we have lunch tomorrow at noon?\r\n\r\nSender\r\n"

#: name -> messages of one connection.
SESSIONS: dict[str, list[list[Command]]] = {
    "gtube": [message(b"test", GTUBE_BODY)],
    "ham": [message(b"Lunch tomorrow", HAM_BODY)],
    "add_header": [message(b"tx-add-header offer", HAM_BODY, [(b"X-Spam", b"yes"), (b"X-Spam", b"maybe")])],
    "rewrite_subject": [message(b"tx-rewrite offer", HAM_BODY)],
    "reject_by_score": [message(b"tx-reject offer", HAM_BODY)],
    "greylist": [message(b"tx-greylist offer", HAM_BODY)],
    "three_messages": [message(b"Lunch tomorrow", HAM_BODY), message(b"test", GTUBE_BODY),
                       message(b"tx-add-header again", HAM_BODY, [(b"X-Spam", b"yes")])],
}


class MtaPlayer(protocol.Protocol):
    """Plays the MTA: negotiates, sends each message and collects its replies, then quits.

    ``done`` fires with one list per exchange: the negotiation reply, then the
    replies to each end of message (up to and including the final disposition);
    a close before a final disposition ends the list with ``"closed"``.
    """

    def __init__(self, messages: list[list[Command]], queue_id: bytes, new_connection: bool) -> None:
        self.messages = list(messages)
        self.queue_id = queue_id
        self.new_connection = new_connection
        self.decoder = MtaDecoder()
        self.exchanges: list[list[Any]] = [[]]
        self.done: defer.Deferred[list[list[Any]]] = defer.Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(OptionNegotiation(6, 0x1FF, 0x1FFFFF).encode())

    def dataReceived(self, data: bytes) -> None:
        self.decoder.feed(data)
        for reply in self.decoder:
            current = self.exchanges[-1]
            current.append(reply)
            if len(self.exchanges) == 1 or isinstance(reply, FINAL):
                self._next()

    def _next(self) -> None:
        assert self.transport is not None
        if not self.messages:
            self.transport.write(Quit().encode())
            return
        commands = self.messages.pop(0)
        if len(self.exchanges) == 1:
            commands = connection_start(self.queue_id) + commands
        elif self.new_connection:
            commands = [QuitNewConnection()] + connection_start(self.queue_id) + commands
        self.exchanges.append([])
        self.transport.write(b"".join(c.encode() for c in [*commands, EndOfMessage()]))

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        last = self.exchanges[-1]
        unanswered = len(self.exchanges) > 1 and not (last and isinstance(last[-1], FINAL))
        if unanswered or self.messages:
            last.append("closed")
        self.done.callback(self.exchanges)


@defer.inlineCallbacks
def play(port: int, messages: list[list[Command]], new_connection: bool = False) -> Any:
    """Run one milter connection against ``127.0.0.1:port``; the replies per exchange."""
    player = MtaPlayer(messages, b"4A1B2C3D4E", new_connection)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10)
    yield connectProtocol(endpoint, player)
    exchanges = yield player.done
    return exchanges


def our_proxy(normal: str) -> tuple[Any, Any]:
    """The checked config and worker of our proxy in milter mode in front of ``normal``."""
    text = (
        'worker "rspamd_proxy" { milter = yes; timeout = 30s;'
        f' upstream {{ local {{ default = yes; hosts = "{normal}"; }} }} }}'
    )
    config, diagnostics = check_config(UclObject(ucl.loads(text)))
    errors = [d for d in diagnostics if d.severity == "error"]
    assert not errors, errors
    return config, config.workers[0]


def frame_bytes(exchanges: list[list[Any]]) -> list[bytes]:
    """Every exchange as the raw bytes on the wire."""
    return [b"".join(r.encode() if not isinstance(r, str) else b"<closed>" for r in e)
            for e in exchanges]


class FramesVsRspamdTests(unittest.TestCase):
    """Identical milter reply frames from Rspamd's proxy and ours."""

    skip = skip_unless_rspamd()
    timeout = 300

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        use_private_hs_cache(self, "milter-frames")
        peer: RspamdPeer = yield start_rspamd(
            reactor,
            workers=("normal", "proxy"),
            local={"actions.conf": ACTIONS, "regexp.conf": REGEXP_RULES,
                   "milter_headers.conf": MILTER_HEADERS},
            worker_options={"proxy": (
                "milter = yes; timeout = 30s;\n"
                'upstream "local" { default = yes; hosts = "127.0.0.1:@NORMAL_PORT@"; }\n')},
        )
        self.addCleanup(peer.stop)
        self.peer = peer
        config, worker = our_proxy(peer.address("normal"))
        builder: ProxyWorker = build_worker(config, worker, reactor)
        self.assertIsInstance(builder.stream_factory(), MilterFactory)
        for service in builder.services():
            service.startService()
            self.addCleanup(service.stopService)
        port = reactor.listenTCP(0, builder.stream_factory(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.ours = port.getHost().port

    @defer.inlineCallbacks
    def compare(self, name: str, new_connection: bool = False) -> Any:
        """Play session ``name`` through both proxies; assert identical frames; return them."""
        theirs = yield play(self.peer.ports["proxy"], SESSIONS[name], new_connection)
        ours = yield play(self.ours, SESSIONS[name], new_connection)
        self.assertEqual(ours, theirs, f"{name}\n{self.peer.log_tail(20)}")
        self.assertEqual(frame_bytes(ours), frame_bytes(theirs))
        return ours

    @defer.inlineCallbacks
    def test_gtube(self) -> Any:
        """GTUBE: 554 5.7.1 Gtube pattern from both."""
        exchanges = yield self.compare("gtube")
        self.assertEqual(exchanges[1], [ReplyCode(b"554", b"5.7.1", b"Gtube pattern")])

    @defer.inlineCallbacks
    def test_ham(self) -> Any:
        """A ham: milter_headers' header changes and a, identical."""
        exchanges = yield self.compare("ham")
        self.assertIsInstance(exchanges[1][-1], Accept)

    @defer.inlineCallbacks
    def test_add_header(self) -> Any:
        """add header with two received X-Spam headers: identical removals and X-Spam: Yes."""
        exchanges = yield self.compare("add_header")
        self.assertEqual(exchanges[1][-2:], [ChangeHeader(1, b"X-Spam", b"Yes"), Accept()])

    @defer.inlineCallbacks
    def test_rewrite_subject(self) -> Any:
        """rewrite subject: identical Subject change."""
        yield self.compare("rewrite_subject")

    @defer.inlineCallbacks
    def test_reject_by_score(self) -> Any:
        """reject by score: identical 554 reply."""
        exchanges = yield self.compare("reject_by_score")
        self.assertIsInstance(exchanges[1][-1], ReplyCode)

    @defer.inlineCallbacks
    def test_greylist(self) -> Any:
        """greylist score: identical reply."""
        yield self.compare("greylist")

    @defer.inlineCallbacks
    def test_three_messages_one_connection(self) -> Any:
        """Three messages on one connection: identical replies to each."""
        exchanges = yield self.compare("three_messages")
        self.assertEqual(len(exchanges), 4)

    @defer.inlineCallbacks
    def test_quit_new_connection(self) -> Any:
        """Three SMTP sessions separated by K on one milter connection: identical replies."""
        exchanges = yield self.compare("three_messages", new_connection=True)
        self.assertEqual(len(exchanges), 4)


class UpstreamDownTests(unittest.TestCase):
    """The one documented difference: every upstream down."""

    skip = skip_unless_rspamd()
    timeout = 120

    @defer.inlineCallbacks
    def test_every_upstream_down(self) -> Any:
        """Rspamd means to answer t but closes the connection first (milter.md §8); ours sends t.

        Postfix treats both as ``milter_default_action`` (default tempfail), so
        the SMTP client sees a 4xx either way; ours makes the configured failure
        policy possible.
        """
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            dead = f"127.0.0.1:{probe.getsockname()[1]}"
        peer: RspamdPeer = yield start_rspamd(
            reactor, workers=("proxy",), wait_hyperscan=False,
            worker_options={"proxy": (
                "milter = yes; timeout = 5s;\n"
                f'upstream "local" {{ default = yes; hosts = "{dead}"; }}\n')},
        )
        self.addCleanup(peer.stop)
        config, worker = our_proxy(dead)
        builder: ProxyWorker = build_worker(config, worker, reactor)
        for service in builder.services():
            service.startService()
            self.addCleanup(service.stopService)
        port = reactor.listenTCP(0, builder.stream_factory(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        theirs = yield play(peer.ports["proxy"], SESSIONS["ham"])
        ours = yield play(port.getHost().port, SESSIONS["ham"])
        negotiated = [OptionNegotiationReply(6, 0x1FF, 0x000FF080)]
        self.assertEqual(theirs, [negotiated, ["closed"]])
        self.assertEqual(ours, [negotiated, [Tempfail()]])


class RecordingScanner(protocol.Protocol):
    """A scanner stand-in: records one raw HTTP request and answers a fixed JSON result."""

    factory: RecordingScannerFactory

    def __init__(self) -> None:
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        head, separator, body = self.buffer.partition(b"\r\n\r\n")
        if not separator:
            return
        lines = head.split(b"\r\n")
        headers = [tuple(part.strip() for part in line.split(b":", 1)) for line in lines[1:]]
        length = int(dict((n.lower(), v) for n, v in headers).get(b"content-length", b"0"))
        if len(body) < length:
            return
        self.factory.requests.append((lines[0], headers, body[:length]))
        reply = b'{"action": "no action", "score": 0.0}'
        self.transport.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(reply), reply))
        self.transport.loseConnection()


class RecordingScannerFactory(protocol.ServerFactory):
    protocol = RecordingScanner

    def __init__(self) -> None:
        self.requests: list[tuple[bytes, list[Any], bytes]] = []


class RequestVsRspamdTests(unittest.TestCase):
    """What each proxy asks its scanner for the same milter session (milter.md §4–§5)."""

    skip = skip_unless_rspamd()
    timeout = 120

    @defer.inlineCallbacks
    def test_same_scan_request(self) -> Any:
        """Same headers and body; only the method (3.4: GET to a local upstream), our
        3.14-style ESMTP-args headers and the upstream scanner's 3.12-style Log-Tag differ."""
        recorder = RecordingScannerFactory()
        listening = reactor.listenTCP(0, recorder, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        upstream = f"127.0.0.1:{listening.getHost().port}"
        peer: RspamdPeer = yield start_rspamd(
            reactor, workers=("proxy",), wait_hyperscan=False,
            worker_options={"proxy": (
                "milter = yes; timeout = 5s;\n"
                f'upstream "local" {{ default = yes; hosts = "{upstream}"; }}\n')},
        )
        self.addCleanup(peer.stop)
        config, worker = our_proxy(upstream)
        builder: ProxyWorker = build_worker(config, worker, reactor)
        for service in builder.services():
            service.startService()
            self.addCleanup(service.stopService)
        port = reactor.listenTCP(0, builder.stream_factory(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        theirs = yield play(peer.ports["proxy"], SESSIONS["ham"])
        ours = yield play(port.getHost().port, SESSIONS["ham"])
        self.assertEqual(theirs, ours)
        scans = [request for request in recorder.requests if b" /checkv2 " in request[0]]
        (their_line, their_headers, their_body), (our_line, our_headers, our_body) = scans
        self.assertEqual((their_line, our_line), (b"GET /checkv2 HTTP/1.1", b"POST /checkv2 HTTP/1.1"))
        self.assertEqual(our_body, their_body)
        ours_only = [(b"x-rspamd-mail-esmtp-args", b"SIZE=500")]
        our_headers = [(n, v) for n, v in our_headers if n.lower() != b"log-tag"]
        self.assertEqual(sorted((n.lower(), v) for n, v in our_headers),
                         sorted([(n.lower(), v) for n, v in their_headers] + ours_only))
