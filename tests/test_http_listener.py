"""Tests for rspamd_tx.proxy.http_listener: endpoints, relaying, legacy, sniffing, bounds."""

from __future__ import annotations

import dataclasses
import json
import socket
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.application.service import MultiService
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.protocol import ClientCreator, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.trial import unittest
from zope.interface import implementer

from rspamd_tx.config import ucl
from rspamd_tx.config.tree import UclObject
from rspamd_tx.config.workers import Config, ProxyOptions, WorkerConfig, check_config
from rspamd_tx.metrics import MetricsService, ProxyMetrics
from rspamd_tx.protocols.http_codec import (
    Data,
    EndOfMessage,
    HttpLimits,
    Response,
    ResponseParser,
)
from rspamd_tx.proxy import server
from rspamd_tx.proxy.failure_policy import FailurePolicyTable
from rspamd_tx.proxy.http_listener import HttpListenerFactory, HttpProxyProtocol, hash_key
from rspamd_tx.proxy.milter_listener import MilterFactory
from rspamd_tx.proxy.scanning import (
    FailureAction,
    FailureClass,
    IScanner,
    ScanFailure,
    ScanReply,
    ScanRequest,
)
from rspamd_tx.upstreams.balancer import UpstreamState

CLIENT = IPv4Address("TCP", "192.0.2.5", 40000)
DATE = b"Date: Thu, 01 Jan 1970 00:00:00 GMT\r\n"
JSON_RESULT = (
    b'{"is_skipped":false,"score":4.5,"required_score":15.0,"action":"add header",'
    b'"symbols":{"ARC_NA":{"name":"ARC_NA","score":0.0},"R_X":{"name":"R_X","score":4.5}},'
    b'"messages":{"smtp_message":"hello"},"message-id":"t1@example.com"}'
)
MESSAGE = b"Subject: hi\r\n\r\nbody\r\n"


def proxy_options(text: str = "") -> ProxyOptions:
    """The checked options of a proxy worker whose body is the UCL ``text``."""
    tree = UclObject(worker=UclObject(rspamd_proxy=ucl.loads(text)))
    config, diagnostics = check_config(tree)
    errors = [d for d in diagnostics if d.severity == "error"]
    assert not errors, errors
    options = config.workers[0].options
    assert isinstance(options, ProxyOptions)
    return options


@implementer(IScanner)
class FakeScanner:
    """Records scan requests; the test fires each Deferred."""

    name = "fake"

    def __init__(self) -> None:
        self.requests: list[ScanRequest] = []
        self.deferreds: list[Deferred[ScanReply]] = []
        self.cancelled = 0

    def scan(self, request: ScanRequest) -> Deferred[ScanReply]:
        self.requests.append(request)

        def cancel(_: Deferred[ScanReply]) -> None:
            self.cancelled += 1

        d: Deferred[ScanReply] = Deferred(cancel)
        self.deferreds.append(d)
        return d


def json_reply(body: bytes = JSON_RESULT, **kwargs: Any) -> ScanReply:
    """A scanner reply carrying ``body`` as JSON."""
    values: dict[str, Any] = {
        "status": 200,
        "reason": b"OK",
        "headers": ((b"Content-Type", b"application/json"),),
        "body": body,
        "upstream": "127.0.0.1:11333",
        "tried": ("127.0.0.1:11333",),
    }
    values.update(kwargs)
    return ScanReply(**values)


def parse_reply(data: bytes) -> tuple[Response, bytes]:
    """Parse an HTTP reply written by the listener."""
    parser = ResponseParser()
    events = parser.feed(data) + parser.feed_eof()
    response = next(e for e in events if isinstance(e, Response))
    body = b"".join(e.chunk for e in events if isinstance(e, Data))
    assert any(isinstance(e, EndOfMessage) for e in events)
    return response, body


class ListenerTestCase(unittest.TestCase):
    """A listener over a fake scanner, a clock and a string transport."""

    config = ""

    def setUp(self) -> None:
        self.clock = Clock()
        self.scanner = FakeScanner()
        self.metrics = ProxyMetrics()
        self.options = proxy_options(self.config)
        self.factory = HttpListenerFactory(
            self.scanner,
            self.options,
            FailurePolicyTable.from_options(self.options.failure_policy),
            self.clock,
            metrics=self.metrics,
            limits=HttpLimits(max_header_count=8),
        )
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def connect(self, peer: Any = CLIENT) -> tuple[HttpProxyProtocol, StringTransport]:
        protocol = self.factory.buildProtocol(peer)
        assert isinstance(protocol, HttpProxyProtocol)
        transport = StringTransport(peerAddress=peer)
        protocol.makeConnection(transport)
        return protocol, transport

    def send(self, data: bytes, peer: Any = CLIENT) -> tuple[HttpProxyProtocol, StringTransport]:
        protocol, transport = self.connect(peer)
        protocol.dataReceived(data)
        return protocol, transport

    def log_text(self) -> str:
        return "\n".join(formatEvent(event) for event in self.events)

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


def checkv2(headers: bytes = b"", body: bytes = MESSAGE, method: bytes = b"POST", target: bytes = b"/checkv2") -> bytes:
    return (
        method + b" " + target + b" HTTP/1.1\r\n" + headers
        + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


class PingTests(ListenerTestCase):
    """``/ping`` is answered locally."""

    def test_pong(self) -> None:
        """GET /ping gets Rspamd's pong reply and the connection closes; nothing is scanned."""
        _, transport = self.send(b"GET /ping HTTP/1.0\r\n\r\n")
        self.assertEqual(
            transport.value(),
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nServer: rspamd-tx/0.1.0\r\n" + DATE
            + b"Content-Length: 6\r\nContent-Type: text/plain\r\n\r\npong\r\n",
        )
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.scanner.requests, [])
        self.assertEqual(self.sample("rspamd_tx_proxy_requests_total", outcome="local"), 1.0)

    def test_ping_case_and_query(self) -> None:
        """The path matches without case, leading slash or query string."""
        _, transport = self.send(b"GET PING?x=1 HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertTrue(transport.value().endswith(b"pong\r\n"))


class RelayTests(ListenerTestCase):
    """Scan requests relayed to the scanner and its replies relayed back."""

    def test_headers_relayed_unchanged(self) -> None:
        """Every header goes to the scanner in order and case, several Rcpt included."""
        headers = (
            b"Host: Other\r\nRcpt: a@example.com\r\nFROM: s@example.org\r\n"
            b"rcpt: b@example.com\r\nConnection: close\r\n"
        )
        self.send(checkv2(headers))
        [request] = self.scanner.requests
        self.assertEqual(
            request.headers,
            (
                (b"Host", b"Other"),
                (b"Rcpt", b"a@example.com"),
                (b"FROM", b"s@example.org"),
                (b"rcpt", b"b@example.com"),
                (b"Connection", b"close"),
                (b"Content-Length", str(len(MESSAGE)).encode()),
            ),
        )
        self.assertEqual(request.body, MESSAGE)
        self.assertEqual((request.method, request.target), (b"POST", b"/checkv2"))
        self.assertEqual(request.route, b"Other")
        self.assertEqual(request.client_address, "192.0.2.5:40000")
        self.assertEqual(request.hash_key, bytes([192, 0, 2, 5]))

    def test_get_with_body(self) -> None:
        """GET /checkv2 with a body is a scan of that body."""
        self.send(checkv2(method=b"GET"))
        [request] = self.scanner.requests
        self.assertEqual((request.method, request.body), (b"GET", MESSAGE))

    def test_check_and_symbols(self) -> None:
        """/check and /symbols are relayed with their URL."""
        for target in (b"/check", b"/symbols?Queue-ID=1"):
            self.send(checkv2(target=target))
        self.assertEqual([r.target for r in self.scanner.requests], [b"/check", b"/symbols?Queue-ID=1"])

    def test_byte_split_request(self) -> None:
        """A request arriving one byte at a time gives the same scan."""
        data = checkv2(b"Rcpt: a@b\r\n")
        protocol, _ = self.connect()
        for index in range(len(data)):
            protocol.dataReceived(data[index:index + 1])
        [request] = self.scanner.requests
        self.assertEqual(request.headers[0], (b"Rcpt", b"a@b"))
        self.assertEqual(request.body, MESSAGE)

    def test_reply_byte_exact(self) -> None:
        """Status, reason, Content-Type, other headers and body come back as the scanner sent them."""
        _, transport = self.send(checkv2())
        self.scanner.deferreds[0].callback(
            json_reply(headers=((b"Content-Type", b"application/json"), (b"Message-Offset", b"7")))
        )
        self.assertEqual(
            transport.value(),
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nServer: rspamd-tx/0.1.0\r\n" + DATE
            + b"Content-Length: " + str(len(JSON_RESULT)).encode()
            + b"\r\nContent-Type: application/json\r\nMessage-Offset: 7\r\n\r\n" + JSON_RESULT,
        )
        self.assertTrue(transport.disconnecting)

    def test_msgpack_reply_content_type(self) -> None:
        """A msgpack reply keeps its content type and bytes."""
        _, transport = self.send(checkv2(b"Accept: application/msgpack\r\n"))
        self.scanner.deferreds[0].callback(
            json_reply(headers=((b"Content-Type", b"application/msgpack"),), body=b"\x81\xa1a\x01")
        )
        response, body = parse_reply(transport.value())
        self.assertEqual(response.get("Content-Type"), "application/msgpack")
        self.assertEqual(body, b"\x81\xa1a\x01")

    def test_scanner_error_status_relayed(self) -> None:
        """A scanner's error reply (500 invalid command) is relayed with its reason."""
        _, transport = self.send(checkv2(target=b"/learnspam"))
        self.scanner.deferreds[0].callback(
            json_reply(status=500, reason=b"invalid command", body=b'{"error":"invalid command"}')
        )
        response, body = parse_reply(transport.value())
        self.assertEqual((response.status, response.reason), (500, "invalid command"))
        self.assertEqual(body, b'{"error":"invalid command"}')

    def test_request_log_line(self) -> None:
        """One line names the tag, client, upstreams tried, action, score and status."""
        protocol, _ = self.send(checkv2())
        self.scanner.deferreds[0].callback(json_reply(tried=("a:1", "b:2"), upstream="b:2"))
        lines = [formatEvent(e) for e in self.events if e.get("log_tag") == protocol.tag]
        self.assertEqual(len([line for line in lines if "upstreams" in line]), 1)
        line = next(line for line in lines if "upstreams" in line)
        for part in ("192.0.2.5:40000", "[a:1, b:2]", "action add header", "score 4.5", "status 200"):
            self.assertIn(part, line)

    def test_metrics(self) -> None:
        """A relayed scan counts as scanned with its retries; in-flight goes up then down."""
        self.send(checkv2())
        self.assertEqual(self.sample("rspamd_tx_proxy_requests_in_flight"), 1.0)
        self.scanner.deferreds[0].callback(json_reply(tried=("a", "a")))
        self.assertEqual(self.sample("rspamd_tx_proxy_requests_in_flight"), 0.0)
        self.assertEqual(self.sample("rspamd_tx_proxy_requests_total", outcome="scanned"), 1.0)

    def test_client_gone_cancels_scan(self) -> None:
        """A client that disconnects during the scan cancels it."""
        protocol, transport = self.send(checkv2())
        protocol.connectionLost()
        self.assertEqual(self.scanner.cancelled, 1)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.sample("rspamd_tx_proxy_requests_total", outcome="aborted"), 1.0)
        self.assertEqual(self.sample("rspamd_tx_proxy_requests_in_flight"), 0.0)

    def test_ipv6_client(self) -> None:
        """An IPv6 client's address is bracketed and its hash key is 16 bytes."""
        peer = IPv6Address("TCP", "::1", 5000)
        self.send(checkv2(), peer=peer)
        [request] = self.scanner.requests
        self.assertEqual(request.client_address, "[::1]:5000")
        self.assertEqual(hash_key(peer), bytes(15) + b"\x01")

    def test_drain(self) -> None:
        """drain() fires once every connection has closed."""
        protocol, _ = self.send(checkv2())
        drained: list[None] = []
        self.factory.drain().addCallback(drained.append)
        self.assertEqual(drained, [])
        protocol.connectionLost()
        self.assertEqual(drained, [None])


class LegacyTests(ListenerTestCase):
    """RSPAMC and SPAMC requests on the same port."""

    def test_rspamc_check(self) -> None:
        """CHECK RSPAMC/1.3 is scanned as /checkv2 and answered in RSPAMC text."""
        body = MESSAGE
        _, transport = self.send(
            b"CHECK RSPAMC/1.3\r\nContent-length: " + str(len(body)).encode()
            + b"\r\nRcpt: a@b\r\nRcpt: c@d\r\nQueue-Id: Q1\r\n\r\n" + body
        )
        [request] = self.scanner.requests
        self.assertEqual((request.method, request.target, request.route), (b"POST", b"/checkv2", None))
        self.assertEqual([v for n, v in request.headers if n == b"Rcpt"], [b"a@b", b"c@d"])
        self.scanner.deferreds[0].callback(json_reply())
        self.assertEqual(
            transport.value(),
            b"RSPAMD/1.3 0 EX_OK\r\n"
            b"Metric: default; False; 4.50 / 15.00 / 0.0\r\n"
            b"Action: add header\r\n"
            b"Symbol: ARC_NA(0.00)\r\n"
            b"Symbol: R_X(4.50)\r\n"
            b"Message: hello\r\n"
            b"Message-ID: t1@example.com\r\n",
        )
        self.assertTrue(transport.disconnecting)

    def test_spamc_symbols(self) -> None:
        """SYMBOLS SPAMC/1.2 is answered in SPAMC text."""
        _, transport = self.send(b"SYMBOLS SPAMC/1.2\r\nContent-length: 4\r\n\r\nbody")
        self.assertEqual(self.scanner.requests[0].body, b"body")
        self.scanner.deferreds[0].callback(json_reply())
        self.assertEqual(
            transport.value(),
            b"SPAMD/1.1 0 EX_OK\r\nContent-length: 12\r\n"
            b"Spam: False ; 4.50 / 15.00\r\n\r\nARC_NA,R_X\r\n",
        )

    def test_rspamc_symbols(self) -> None:
        """SYMBOLS RSPAMC/1.3 is the same scan as CHECK."""
        self.send(b"SYMBOLS RSPAMC/1.3\r\n\r\n")
        self.assertEqual(self.scanner.requests[0].target, b"/checkv2")

    def test_non_json_reply_relayed(self) -> None:
        """A legacy client gets a non-JSON scanner reply relayed as HTTP."""
        _, transport = self.send(b"CHECK RSPAMC/1.3\r\n\r\n")
        self.scanner.deferreds[0].callback(
            json_reply(headers=((b"Content-Type", b"text/plain"),), body=b"oops")
        )
        response, body = parse_reply(transport.value())
        self.assertEqual((response.status, body), (200, b"oops"))

    def test_other_spamd_verb_closed_silently(self) -> None:
        """PROCESS SPAMC/1.2 is closed without a reply, as Rspamd does."""
        _, transport = self.send(b"PROCESS SPAMC/1.2\r\n\r\n")
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.scanner.requests, [])

    def test_policy_verdict_in_legacy(self) -> None:
        """A failed scan under a non-tempfail policy is a converted verdict."""
        self.factory.update(self.options, FailurePolicyTable({FailureClass.TIMEOUT: FailureAction.ACCEPT}))
        _, transport = self.send(b"CHECK RSPAMC/1.3\r\n\r\n")
        self.scanner.deferreds[0].errback(ScanFailure(FailureClass.TIMEOUT, 408, "IO timeout"))
        self.assertTrue(transport.value().startswith(b"RSPAMD/1.3 0 EX_OK\r\nMetric: default; False; 0.00"))
        self.assertIn(b"Action: no action\r\n", transport.value())


class RefusedRequestTests(ListenerTestCase):
    """Requests that are not relayed."""

    def test_encrypted_request_closed(self) -> None:
        """An HTTPCrypt request (Key header) is closed without a reply and not scanned."""
        _, transport = self.send(checkv2(b"Key: abcdef=\r\n"))
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.scanner.requests, [])

    def test_local_file_header_refused(self) -> None:
        """A File header (scan a file on the scanner host) gets 403 and is not relayed."""
        for headers, target in ((b"File: /etc/shadow\r\n", b"/checkv2"), (b"", b"/checkv2?path=/etc/shadow")):
            _, transport = self.send(checkv2(headers, target=target))
            response, _ = parse_reply(transport.value())
            self.assertEqual(response.status, 403)
        self.assertEqual(self.scanner.requests, [])


class FuzzTests(ListenerTestCase):
    """Arbitrary bytes from a client never break the listener."""

    @settings(max_examples=200, deadline=None)
    @given(
        data=st.one_of(
            st.binary(max_size=300),
            st.builds(lambda tail: checkv2() + tail, st.binary(max_size=40)),
            st.builds(lambda head: head + b" /checkv2 HTTP/1.1\r\n\r\n", st.binary(max_size=20)),
        ),
        cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=5),
    )
    def test_random_input(self, data: bytes, cuts: list[int]) -> None:
        """Any bytes, split anywhere: no exception; the connection either waits, scans, or is closed."""
        before = len(self.scanner.requests)
        protocol, transport = self.connect()
        points = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
        for start, end in zip(points, points[1:]):
            protocol.dataReceived(data[start:end])
        self.clock.advance(self.options.timeout + 1)
        scanning = len(self.scanner.requests) == before + 1
        self.assertTrue(transport.disconnecting or scanning)
        protocol.connectionLost()


_json_text = st.text(alphabet=st.sampled_from(list('ab{}[],:" \\\u00e9\n')), max_size=8)
_json_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False), _json_text
)


@st.composite
def _scan_results(draw: st.DrawFn) -> dict[str, Any]:
    """/checkv2-like objects: scalars and nested values in any order, keys maybe missing."""
    members: list[tuple[str, Any]] = []
    if draw(st.booleans()):
        members.append(("score", draw(st.one_of(st.floats(-100, 100), st.integers(-100, 100), _json_scalar))))
    if draw(st.booleans()):
        members.append(("action", draw(st.one_of(st.sampled_from(["no action", "reject"]), _json_scalar))))
    for name in draw(st.lists(st.sampled_from(["is_skipped", "required_score", "message-id", "x"]), max_size=3)):
        members.append((name, draw(_json_scalar)))
    nested = {draw(_json_text): {"score": draw(_json_scalar), "options": [draw(_json_text)]}}
    members.append(("symbols", nested))
    if draw(st.booleans()):
        members.append(("milter", {"action": draw(_json_text)}))
    return dict(draw(st.permutations(members)))


class VerdictTextTests(unittest.TestCase):
    """ScanReply.verdict_text: the log line's action and score, without parsing all of a reply."""

    def test_rspamd_reply_read_without_full_parse(self) -> None:
        """An Rspamd-shaped reply gives its action and score; the body is not parsed whole."""
        reply = json_reply()
        self.assertEqual(reply.verdict_text(), ("add header", "4.5"))
        self.assertEqual(reply._parsed, [])

    @settings(max_examples=300, deadline=None)
    @given(_scan_results(), st.booleans())
    def test_same_as_full_parse(self, result: dict[str, Any], spaced: bool) -> None:
        """For any JSON object the text is what the parsed object says."""
        body = json.dumps(result, indent=1 if spaced else None, ensure_ascii=False).encode("utf-8")
        expected = (str(result.get("action", "-")), str(result.get("score", "-")))
        self.assertEqual(json_reply(body=body).verdict_text(), expected)

    def test_not_an_object(self) -> None:
        """A body that is no JSON object gives dashes."""
        for body in (b"oops", b"[1, 2]", b"", b'{"action": "reject", '):
            self.assertEqual(json_reply(body=body).verdict_text(), ("-", "-"), body)

    def test_msgpack(self) -> None:
        """A msgpack reply is decoded as such."""
        reply = json_reply(
            headers=((b"Content-Type", b"application/msgpack"),),
            body=b"\x82\xa6action\xa6reject\xa5score\xcb@\x1e\x00\x00\x00\x00\x00\x00",
        )
        self.assertEqual(reply.verdict_text(), ("reject", "7.5"))


class SniffTests(ListenerTestCase):
    """The wrong protocol at the HTTP port."""

    def test_milter_at_http_port(self) -> None:
        """Milter bytes are logged as the mistake they are and the connection closed without reply."""
        _, transport = self.send(b"\x00\x00\x00\x0dO\x00\x00\x00\x06\x00\x00\x01\xff\x00\x1f\xff\xff")
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)
        self.assertIn("milter protocol sent to the HTTP port", self.log_text())
        self.assertIn("192.0.2.5:40000", self.log_text())
        self.assertEqual(self.sample("rspamd_tx_proxy_requests_total", outcome="rejected"), 1.0)

    def test_milter_bytes_one_at_a_time(self) -> None:
        """Sniffing waits for enough bytes before deciding."""
        protocol, transport = self.connect()
        for byte in b"\x00\x00\x00\x0dO":
            self.assertFalse(transport.disconnecting)
            protocol.dataReceived(bytes([byte]))
        self.assertTrue(transport.disconnecting)

    def test_tls_at_http_port(self) -> None:
        """A TLS ClientHello is logged and closed without reply."""
        _, transport = self.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        self.assertEqual(transport.value(), b"")
        self.assertIn("TLS handshake", self.log_text())


class BoundsTests(ListenerTestCase):
    """Bounds on requests and the idle timeout."""

    config = "max_message = 100; timeout = 30s;"

    def test_oversize_default_413(self) -> None:
        """A Content-Length over max_message gets 413 before the body is read."""
        _, transport = self.send(b"POST /checkv2 HTTP/1.1\r\nContent-Length: 101\r\n\r\n")
        response, body = parse_reply(transport.value())
        self.assertEqual((response.status, response.reason, body), (413, "Request entity too large", b""))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.scanner.requests, [])
        self.assertIn("192.0.2.5:40000", self.log_text())

    def test_oversize_policy_accept(self) -> None:
        """With oversize = accept an oversized message gets a no-action verdict."""
        self.factory.update(self.options, FailurePolicyTable({FailureClass.OVERSIZE: FailureAction.ACCEPT}))
        _, transport = self.send(checkv2(body=b"x" * 101))
        response, body = parse_reply(transport.value())
        self.assertEqual(response.status, 200)
        self.assertEqual(json.loads(body)["action"], "no action")

    def test_chunked_oversize(self) -> None:
        """A chunked body growing past max_message is refused too."""
        _, transport = self.send(
            b"POST /checkv2 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n65\r\n" + b"x" * 101 + b"\r\n"
        )
        self.assertEqual(parse_reply(transport.value())[0].status, 413)

    def test_too_many_headers(self) -> None:
        """More header lines than allowed get 431."""
        headers = b"".join(b"Rcpt: r%d@x\r\n" % i for i in range(9))
        _, transport = self.send(checkv2(headers))
        response, _ = parse_reply(transport.value())
        self.assertEqual(response.status, 431)
        self.assertEqual(response.reason, "HTTP parser error: too many header lines")

    def test_malformed_request(self) -> None:
        """A malformed request line gets 400 HTTP parser error."""
        _, transport = self.send(b"POST /a b c HTTP/1.1\r\n\r\n")
        self.assertEqual(parse_reply(transport.value())[0].status, 400)

    def test_idle_timeout(self) -> None:
        """A client silent for the worker timeout gets 408 IO timeout, logged with its address."""
        protocol, transport = self.send(b"POST /checkv2 HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
        self.clock.advance(29)
        self.assertEqual(transport.value(), b"")
        protocol.dataReceived(b"de")
        self.clock.advance(29)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(1)
        response, _ = parse_reply(transport.value())
        self.assertEqual((response.status, response.reason), (408, "IO timeout"))
        self.assertIn("192.0.2.5:40000", self.log_text())

    def test_no_timeout_while_scanning(self) -> None:
        """The idle timer stops once the request is complete."""
        _, transport = self.send(checkv2(body=b"short"))
        self.clock.advance(300)
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.disconnecting)


class FailureTests(ListenerTestCase):
    """Failed scans and the failure policy."""

    def test_tempfail_is_rspamd_error_reply(self) -> None:
        """By default a failure is Rspamd's error reply: its status and reason, empty text/plain."""
        _, transport = self.send(checkv2())
        self.scanner.deferreds[0].errback(
            ScanFailure(FailureClass.BAD_REPLY, 500, "IO write error: Connection refused", ("a", "b"))
        )
        self.assertEqual(
            transport.value(),
            b"HTTP/1.1 500 IO write error: Connection refused\r\nConnection: close\r\n"
            b"Server: rspamd-tx/0.1.0\r\n" + DATE
            + b"Content-Length: 0\r\nContent-Type: text/plain\r\n\r\n",
        )
        self.assertEqual(self.sample("rspamd_tx_proxy_requests_total", outcome="failed"), 1.0)

    def test_backend_not_found(self) -> None:
        """No backend gives 404 Backend not found."""
        _, transport = self.send(checkv2())
        self.scanner.deferreds[0].errback(ScanFailure(FailureClass.NO_UPSTREAM, 404, "Backend not found"))
        self.assertEqual(parse_reply(transport.value())[0].reason, "Backend not found")

    def test_policy_reject(self) -> None:
        """With timeout = reject a timed-out scan gets a reject verdict as JSON."""
        self.factory.update(self.options, FailurePolicyTable({FailureClass.TIMEOUT: FailureAction.REJECT}))
        _, transport = self.send(checkv2())
        self.scanner.deferreds[0].errback(ScanFailure(FailureClass.TIMEOUT, 408, "IO timeout"))
        response, body = parse_reply(transport.value())
        self.assertEqual((response.status, response.get("Content-Type")), (200, "application/json"))
        self.assertEqual(json.loads(body)["action"], "reject")
        self.assertEqual(self.sample("rspamd_tx_proxy_requests_total", outcome="policy"), 1.0)

    def test_unexpected_scanner_error(self) -> None:
        """A scanner raising something else is a 500 and is logged."""
        _, transport = self.send(checkv2())
        self.scanner.deferreds[0].errback(RuntimeError("boom"))
        self.assertEqual(parse_reply(transport.value())[0].status, 500)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


@implementer(IScanner)
class CannedScanner:
    """Answers every scan at once with :func:`json_reply`."""

    name = "canned"

    def __init__(self) -> None:
        self.requests: list[ScanRequest] = []

    def scan(self, request: ScanRequest) -> Deferred[ScanReply]:
        self.requests.append(request)
        return succeed(json_reply())


class _Client(Protocol):
    """Sends a request, collects the reply until the server closes."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""
        self.done: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done.callback(None)


class AdoptedPortTests(unittest.TestCase):
    """HttpListenerFactory.adopt_stream_port: the listener on a listening descriptor."""

    def factory(self, clock: Any) -> tuple[HttpListenerFactory, CannedScanner]:
        scanner = CannedScanner()
        options = proxy_options()
        return HttpListenerFactory(scanner, options, FailurePolicyTable(), clock), scanner

    @inlineCallbacks
    def test_real_reactor_scan(self) -> Any:
        """On a real reactor a client's scan is relayed and answered over loopback."""
        from twisted.internet import reactor

        factory, scanner = self.factory(reactor)
        listening = socket.socket()
        listening.bind(("127.0.0.1", 0))
        listening.listen(16)
        port = factory.adopt_stream_port(reactor, listening.fileno(), socket.AF_INET)
        listening.close()
        self.addCleanup(port.stopListening)
        address = port.getHost()
        assert isinstance(address, IPv4Address)
        client = _Client(checkv2(b"Rcpt: a@b\r\n"))
        yield ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", address.port)
        yield client.done
        response, body = parse_reply(client.received)
        self.assertEqual((response.status, body), (200, JSON_RESULT))
        [request] = scanner.requests
        self.assertEqual(request.headers[0], (b"Rcpt", b"a@b"))
        self.assertTrue(request.client_address and request.client_address.startswith("127.0.0.1:"))
        yield factory.drain()

    def test_other_reactor(self) -> None:
        """Any other reactor adopts the descriptor itself."""
        reactor = MemoryReactorClock()
        factory, _ = self.factory(reactor)
        factory.adopt_stream_port(reactor, 7, socket.AF_INET)
        self.assertEqual(reactor.adoptedPorts, [(7, socket.AF_INET, factory)])


def worker_config(text: str) -> tuple[Config, WorkerConfig]:
    """A checked configuration holding one proxy worker whose body is ``text``."""
    config, diagnostics = check_config(UclObject(worker=UclObject(rspamd_proxy=ucl.loads(text))))
    errors = [d for d in diagnostics if d.severity == "error"]
    assert not errors, errors
    return config, config.workers[0]


TWO_UPSTREAMS = 'upstream { local { default = yes; hosts = "127.0.0.1:11333,127.0.0.2:11333"; } }'


class ProxyWorkerTests(unittest.TestCase):
    """build_worker: the listener it serves, its services and reloads."""

    def build(self, text: str) -> server.ProxyWorker:
        config, worker = worker_config(text)
        return server.build_worker(config, worker, Clock())

    def test_http_mode(self) -> None:
        """milter = no serves the HTTP listener over the upstream scanner."""
        builder = self.build("milter = no; " + TWO_UPSTREAMS)
        factory = builder.stream_factory()
        self.assertIsInstance(factory, HttpListenerFactory)
        assert isinstance(factory, HttpListenerFactory)
        self.assertIs(factory.scanner, builder.scanner)
        self.assertIsNone(builder.datagram_protocol())

    def test_services(self) -> None:
        """Services: the scanner, one health checker per block, the metrics endpoint when configured."""
        builder = self.build('metrics = "127.0.0.1:0"; ' + TWO_UPSTREAMS)
        scanner_service, health, metrics = builder.services()
        self.assertIsInstance(scanner_service, server.ScannerService)
        self.assertIsInstance(health, MultiService)
        self.assertEqual(len(list(health)), 1)
        self.assertIsInstance(metrics, MetricsService)
        self.assertEqual(len(self.build(TWO_UPSTREAMS).services()), 2)

    def test_milter_mode(self) -> None:
        """milter = yes serves the milter listener, with the scanner, policy and the actions
        the configuration registers."""
        config, worker = worker_config("milter = yes; " + TWO_UPSTREAMS)
        config = dataclasses.replace(config, actions=config.actions | {"discard"})
        builder = server.build_worker(config, worker, Clock())
        factory = builder.stream_factory()
        assert isinstance(factory, MilterFactory)
        self.assertIs(factory.scanner, builder.scanner)
        self.assertIs(factory.policy, builder.policy)
        self.assertIn("discard", factory.actions)

    def test_reconfigure_keeps_upstream_state(self) -> None:
        """A reload swaps the upstream list keeping state, adds blocks and their health checks,
        and gives the listener the new options and policy."""
        builder = self.build(TWO_UPSTREAMS)
        balancer = builder.scanner.balancers()["local"]
        balancer.mark_down(balancer.get("127.0.0.1:11333"), "test")
        config, worker = worker_config(
            'failure_policy { timeout = "accept"; } upstream {'
            ' local { default = yes; hosts = "127.0.0.1:11333,127.0.0.3:11333"; }'
            ' other { hosts = "127.0.0.4"; } }'
        )
        builder.reconfigure(config, worker)
        self.assertIs(builder.scanner.balancers()["local"], balancer)
        self.assertEqual(balancer.get("127.0.0.1:11333").state, UpstreamState.DOWN)
        self.assertEqual([u.name for u in balancer.upstreams], ["127.0.0.1:11333", "127.0.0.3:11333"])
        health = builder.services()[1]
        self.assertEqual(len(list(health)), 2)
        factory = builder.stream_factory()
        assert isinstance(factory, HttpListenerFactory)
        self.assertEqual(factory.policy.action_for(FailureClass.TIMEOUT), FailureAction.ACCEPT)
        registry = builder.metrics.registry
        gone = {"block": "local", "upstream": "127.0.0.2:11333", "state": "alive"}
        new = {"block": "other", "upstream": "127.0.0.4", "state": "alive"}
        self.assertIsNone(registry.get_sample_value("rspamd_tx_proxy_upstream_state", gone))
        self.assertEqual(registry.get_sample_value("rspamd_tx_proxy_upstream_state", new), 1.0)

    def test_metrics_follow_upstream_state(self) -> None:
        """The worker's metrics show upstream states changed by the balancer."""
        builder = self.build(TWO_UPSTREAMS)
        balancer = builder.scanner.balancers()["local"]
        labels = {"block": "local", "upstream": "127.0.0.2:11333", "state": "down"}
        self.assertEqual(builder.metrics.registry.get_sample_value("rspamd_tx_proxy_upstream_state", labels), 0.0)
        balancer.mark_down(balancer.get("127.0.0.2:11333"), "test")
        self.assertEqual(builder.metrics.registry.get_sample_value("rspamd_tx_proxy_upstream_state", labels), 1.0)

    def test_defaults_without_configuration(self) -> None:
        """Without a configuration the worker answers /ping and has no backend."""
        builder = server.build_worker(None, None, Clock())
        factory = builder.stream_factory()
        protocol = factory.buildProtocol(CLIENT)
        transport = StringTransport(peerAddress=CLIENT)
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET /ping HTTP/1.0\r\n\r\n")
        self.assertTrue(transport.value().endswith(b"\r\n\r\npong\r\n"))
