"""Tests for rspamd_tx.proxy.upstream_scanner: routing, request/reply transformation, retries."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import zstandard
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from rspamd_tx.config import ucl
from rspamd_tx.config.tree import UclObject
from rspamd_tx.config.workers import GlobalOptions, ProxyOptions, check_config
from rspamd_tx.proxy.scanning import FailureClass, IScanner, ScanFailure, ScanReply, ScanRequest
from rspamd_tx.proxy.upstream_scanner import HealthSettings, UpstreamScanner
from rspamd_tx.upstreams.balancer import AttemptOutcome, UpstreamState
from rspamd_tx.upstreams.http_client import (
    BadReply,
    ConnectError,
    ScannerClient,
    ScannerResponse,
    ScannerTimeout,
)


def proxy_options(text: str) -> ProxyOptions:
    """The checked options of a proxy worker whose body is the UCL ``text``."""
    tree = UclObject(worker=UclObject(rspamd_proxy=ucl.loads(text)))
    config, diagnostics = check_config(tree)
    errors = [d for d in diagnostics if d.severity == "error"]
    assert not errors, errors
    options = config.workers[0].options
    assert isinstance(options, ProxyOptions)
    return options


@dataclass
class Call:
    """One request the fake client was asked to send."""

    address: Any
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    timeout: float
    deferred: Deferred[ScannerResponse] = field(default_factory=Deferred)


class FakeClient:
    """Records requests; the test fires each one's Deferred."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.closed = False

    def request(
        self,
        address: Any,
        method: str,
        target: str,
        headers: Any,
        body: bytes = b"",
        timeout: float = 8.0,
    ) -> Deferred[ScannerResponse]:
        call = Call(address, method, target, list(headers), body, timeout)
        self.calls.append(call)
        return call.deferred

    def close(self) -> Deferred[None]:
        self.closed = True
        d: Deferred[None] = Deferred()
        d.callback(None)
        return d


JSON_REPLY = ScannerResponse(
    200,
    "OK",
    (
        ("Connection", "close"),
        ("Server", "rspamd/3.4"),
        ("Date", "Mon, 23 Nov 2026 17:00:00 GMT"),
        ("Content-Length", "19"),
        ("Content-Type", "application/json"),
        ("Message-Offset", "19"),
    ),
    b'{"action":"reject"}',
)

TWO_BLOCKS = """
upstream {
  local { default = yes; hosts = "127.0.0.1:11333,127.0.0.2:11333"; }
  Other { hosts = "127.0.0.3:11400"; timeout = 3s; }
}
"""

REQUEST = ScanRequest(
    headers=(
        (b"Content-Length", b"3"),
        (b"Connection", b"close"),
        (b"Host", b"ignored.example"),
        (b"Rcpt", b"a@example.com"),
        (b"Keep-Alive", b"300"),
        (b"Rcpt", b"b@example.com"),
        (b"Key", b"abc"),
        (b"Transfer-Encoding", b"chunked"),
        (b"From", b"s@example.org"),
    ),
    body=b"msg",
    client_address="192.0.2.1:4000",
)


def collect(d: Deferred[Any]) -> list[Any]:
    """What ``d`` fired with (a value or a Failure)."""
    seen: list[Any] = []
    d.addBoth(seen.append)
    return seen


class ScannerTestCase(unittest.TestCase):
    """Sets up a scanner over a fake client with a fake clock."""

    config = TWO_BLOCKS

    def setUp(self) -> None:
        self.clock = Clock()
        self.client = FakeClient()
        self.options = proxy_options(self.config)
        self.scanner = UpstreamScanner(
            self.options, GlobalOptions(), self.clock, client=self.client  # type: ignore[arg-type]
        )

    def scan(self, request: ScanRequest = REQUEST) -> list[Any]:
        seen = collect(self.scanner.scan(request))
        self.clock.advance(0)
        return seen


class RoutingTests(ScannerTestCase):
    """Which block a request goes to."""

    def test_provides_interface(self) -> None:
        """The scanner is an IScanner."""
        self.assertTrue(IScanner.providedBy(self.scanner))

    def test_default_block_without_route(self) -> None:
        """Without a Host the default block's upstreams are used."""
        self.scan()
        self.assertIn(self.client.calls[0].address.host, ("127.0.0.1", "127.0.0.2"))

    def test_route_matches_case_insensitively(self) -> None:
        """A Host naming a block in another case selects that block."""
        self.scan(ScanRequest(headers=(), body=b"m", route=b"oTHER"))
        self.assertEqual(self.client.calls[0].address, IPv4Address("TCP", "127.0.0.3", 11400))

    def test_block_timeout(self) -> None:
        """Each attempt is bounded by the block's own timeout."""
        self.scan(ScanRequest(headers=(), body=b"m", route=b"other"))
        self.assertEqual(self.client.calls[0].timeout, 3.0)

    def test_unknown_route_falls_back_to_default(self) -> None:
        """A Host naming no block goes to the default block."""
        self.scan(ScanRequest(headers=(), body=b"m", route=b"nowhere"))
        self.assertIn(self.client.calls[0].address.host, ("127.0.0.1", "127.0.0.2"))


class NoDefaultTests(ScannerTestCase):
    """Without a default block."""

    config = 'upstream { named { hosts = "127.0.0.1"; } }'

    def test_backend_not_found(self) -> None:
        """No match and no default: 404 Backend not found, nothing sent."""
        [failure] = self.scan()
        self.assertIsInstance(failure, Failure)
        self.assertEqual(
            failure.value, ScanFailure(FailureClass.NO_UPSTREAM, 404, "Backend not found")
        )
        self.assertEqual(self.client.calls, [])


class RequestTransformTests(ScannerTestCase):
    """What is sent to the upstream (spec §4.3)."""

    def test_headers(self) -> None:
        """Host is the upstream name, hop-by-hop headers go, Rcpt order is kept, UA and IP added."""
        self.scan()
        call = self.client.calls[0]
        upstream = f"{call.address.host}:11333"
        self.assertEqual(
            call.headers,
            [
                ("Host", upstream),
                ("Connection", "close"),
                ("Rcpt", "a@example.com"),
                ("Rcpt", "b@example.com"),
                ("From", "s@example.org"),
                ("User-Agent", "rspamd-tx/0.1.0"),
                ("IP", "192.0.2.1:4000"),
            ],
        )

    def test_method_target_body(self) -> None:
        """The body goes inline with POST to the client's URL."""
        self.scan(ScanRequest(headers=(), body=b"message", method=b"GET", target=b"/symbols?x=1"))
        call = self.client.calls[0]
        self.assertEqual((call.method, call.target, call.body), ("POST", "/symbols?x=1", b"message"))

    def test_client_user_agent_and_ip_kept(self) -> None:
        """A client's own User-Agent and IP are forwarded unchanged and not duplicated."""
        self.scan(
            ScanRequest(
                headers=((b"User-Agent", b"rspamc"), (b"Ip", b"198.51.100.7")),
                body=b"m",
                client_address="127.0.0.1:5555",
            )
        )
        self.assertEqual(
            self.client.calls[0].headers[2:], [("User-Agent", "rspamc"), ("Ip", "198.51.100.7")]
        )

    def test_no_ip_without_client_address(self) -> None:
        """Without a known client address no IP header is invented."""
        self.scan(ScanRequest(headers=(), body=b"m"))
        self.assertNotIn("IP", [name for name, _ in self.client.calls[0].headers])


class LogTagTests(ScannerTestCase):
    """Log-Tag per log_tag_type."""

    config = 'log_tag_type = "queue_id"; upstream { local { default = yes; hosts = "127.0.0.1"; }'\
        ' other { hosts = "127.0.0.2"; log_tag_type = "none"; } }'

    def log_tag(self, request: ScanRequest) -> str | None:
        self.client.calls.clear()
        self.scan(request)
        values = [v for n, v in self.client.calls[0].headers if n == "Log-Tag"]
        return values[0] if values else None

    def test_queue_id_type(self) -> None:
        """queue_id sends the client's Queue-ID, else the session tag."""
        self.assertEqual(self.log_tag(ScanRequest(headers=((b"Queue-Id", b"Q1"),), body=b"", log_tag="abc")), "Q1")
        self.assertEqual(self.log_tag(ScanRequest(headers=(), body=b"", log_tag="abc")), "abc")

    def test_block_none_type(self) -> None:
        """A block's log_tag_type = none sends no Log-Tag."""
        self.assertIsNone(self.log_tag(ScanRequest(headers=(), body=b"", log_tag="abc", route=b"other")))

    def test_client_log_tag_kept(self) -> None:
        """A client's own Log-Tag is relayed, not duplicated."""
        request = ScanRequest(headers=((b"Log-Tag", b"mine"),), body=b"", log_tag="abc")
        self.assertEqual(self.log_tag(request), "mine")


class BlockHeaderTests(ScannerTestCase):
    """Block options that change the request."""

    config = """
    upstream {
      local {
        default = yes; hosts = "127.0.0.1"; settings_id = "strict"; keepalive = yes;
        extra_headers { "MTA-Name" = "edge"; }
        compression = yes;
      }
    }
    """

    def test_settings_extra_headers_keepalive(self) -> None:
        """settings_id and extra_headers replace the client's; keepalive asks for keep-alive."""
        self.scan(
            ScanRequest(
                headers=((b"Settings-ID", b"lax"), (b"mta-name", b"client"), (b"Rcpt", b"a@b")),
                body=b"m",
            )
        )
        self.assertEqual(
            self.client.calls[0].headers,
            [
                ("Host", "127.0.0.1"),
                ("Connection", "keep-alive"),
                ("Rcpt", "a@b"),
                ("Settings-ID", "strict"),
                ("MTA-Name", "edge"),
                ("User-Agent", "rspamd-tx/0.1.0"),
                ("Compression", "zstd"),
            ],
        )

    def test_compression(self) -> None:
        """With compression the body travels as a zstd frame."""
        self.scan(ScanRequest(headers=(), body=b"message body"))
        body = self.client.calls[0].body
        self.assertEqual(zstandard.ZstdDecompressor().decompress(body), b"message body")


class ReplyTransformTests(ScannerTestCase):
    """What comes back (spec §4.4)."""

    def test_reply_headers(self) -> None:
        """Regenerated headers are dropped, others kept in order, status and body relayed."""
        [reply] = self.scan_and_answer(JSON_REPLY)
        self.assertIsInstance(reply, ScanReply)
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.reason, b"OK")
        self.assertEqual(
            reply.headers,
            ((b"Content-Type", b"application/json"), (b"Message-Offset", b"19")),
        )
        self.assertEqual(reply.result(), {"action": "reject"})
        self.assertEqual(reply.upstream, f"{self.client.calls[0].address.host}:11333")
        self.assertEqual(reply.tried, (reply.upstream,))

    def test_zstd_reply_decompressed(self) -> None:
        """A zstd reply is decompressed and its compression headers dropped."""
        body = zstandard.ZstdCompressor().compress(b'{"score":1.0}')
        [reply] = self.scan_and_answer(
            ScannerResponse(
                200,
                "OK",
                (("Content-Type", "application/json"), ("Compression", "zstd"), ("Content-Encoding", "zstd")),
                body,
            )
        )
        self.assertEqual(reply.body, b'{"score":1.0}')
        self.assertEqual(reply.headers, ((b"Content-Type", b"application/json"),))

    def test_bad_zstd_reply(self) -> None:
        """A reply that claims zstd but is not fails as a bad reply."""
        [failure] = self.scan_and_answer(
            ScannerResponse(200, "OK", (("Compression", "zstd"),), b"not zstd")
        )
        self.assertEqual(failure.value.kind, FailureClass.BAD_REPLY)
        self.assertEqual(failure.value.status, 500)

    def test_zstd_bomb_refused(self) -> None:
        """A zstd reply inflating past max_message fails without being inflated whole."""
        self.scanner.options = proxy_options("max_message = 1000; " + TWO_BLOCKS)
        body = zstandard.ZstdCompressor().compress(b"x" * 100000)
        [failure] = self.scan_and_answer(ScannerResponse(200, "OK", (("Compression", "zstd"),), body))
        self.assertEqual(failure.value.reason, "decompressed reply too large")

    def test_http_error_relayed_not_retried(self) -> None:
        """A scanner's 500 reply is a reply: relayed, no second attempt."""
        [reply] = self.scan_and_answer(
            ScannerResponse(500, "invalid command", (("Content-Type", "application/json"),), b"{}")
        )
        self.assertEqual((reply.status, reply.reason), (500, b"invalid command"))
        self.assertEqual(len(self.client.calls), 1)

    def scan_and_answer(self, response: ScannerResponse) -> list[Any]:
        seen = self.scan()
        self.client.calls[0].deferred.callback(response)
        return seen


class RetryTests(ScannerTestCase):
    """Retries through the balancer (spec §4.2)."""

    config = 'max_retries = 3; upstream { local { default = yes; hosts = "127.0.0.1,127.0.0.2"; } }'

    def test_retry_on_other_upstream(self) -> None:
        """A refused connection is retried on the other upstream; tried lists both."""
        seen = self.scan()
        first = self.client.calls[0]
        first.deferred.errback(ConnectError(500, "IO write error: Connection refused"))
        self.clock.advance(0)
        second = self.client.calls[1]
        self.assertNotEqual(first.address, second.address)
        self.assertEqual(second.headers[0], ("Host", second.address.host))
        second.deferred.callback(JSON_REPLY)
        [reply] = seen
        self.assertEqual(reply.tried, (first.address.host, second.address.host))
        self.assertEqual(reply.upstream, second.address.host)

    def test_attempts_exhausted(self) -> None:
        """After max_retries failures the last error is the answer."""
        seen = self.scan()
        for index in range(3):
            self.client.calls[index].deferred.errback(
                ConnectError(500, "IO write error: Connection refused")
            )
            self.clock.advance(0)
        self.assertEqual(len(self.client.calls), 3)
        [failure] = seen
        self.assertEqual(failure.value.kind, FailureClass.BAD_REPLY)
        self.assertEqual(
            (failure.value.status, failure.value.reason), (500, "IO write error: Connection refused")
        )
        self.assertEqual(len(failure.value.tried), 3)

    def test_timeouts_are_timeout_class(self) -> None:
        """When the last attempt timed out the failure is 408 IO timeout, class timeout."""
        seen = self.scan()
        for index in range(3):
            self.client.calls[index].deferred.errback(ScannerTimeout())
            self.clock.advance(0)
        [failure] = seen
        self.assertEqual(failure.value.kind, FailureClass.TIMEOUT)
        self.assertEqual((failure.value.status, failure.value.reason), (408, "IO timeout"))

    def test_bad_reply_class(self) -> None:
        """A malformed reply is retried and, in the end, a bad reply."""
        seen = self.scan()
        for index in range(3):
            self.client.calls[index].deferred.errback(BadReply(400, "IO read error: unexpected EOF"))
            self.clock.advance(0)
        [failure] = seen
        self.assertEqual(failure.value.kind, FailureClass.BAD_REPLY)
        self.assertEqual(failure.value.status, 400)

    def test_overall_timeout(self) -> None:
        """A scan that never gets an answer ends with 408 IO timeout."""
        seen = self.scan()
        self.clock.advance(120 * 3 + 1)
        [failure] = seen
        self.assertEqual(failure.value, ScanFailure(FailureClass.TIMEOUT, 408, "IO timeout", failure.value.tried))

    def test_cancel_abandons_attempt(self) -> None:
        """Cancelling the scan cancels the request in flight."""
        d = self.scanner.scan(REQUEST)
        self.clock.advance(0)
        cancelled = collect(self.client.calls[0].deferred)
        d.addErrback(lambda f: None)
        d.cancel()
        self.assertEqual(len(cancelled), 1)


class UnsupportedBlockTests(ScannerTestCase):
    """Blocks the scanner does not serve."""

    config = (
        'upstream { enc { default = yes; hosts = "127.0.0.1";'
        ' key = "kbhx7epiyugwfuiqqkdxmz3u45g4s6anc8bc8cpewkxfd9o5sxpy"; } }'
    )

    def test_encrypted_block_never_sent_in_clear(self) -> None:
        """A block with a backend key fails the scan without sending anything."""
        [failure] = self.scan()
        self.assertEqual(failure.value.status, 501)
        self.assertEqual(self.client.calls, [])


class ObserverAndUpdateTests(ScannerTestCase):
    """Observer hooks and reconfiguration."""

    def test_observer_sees_attempts(self) -> None:
        """Observers get the block name and each attempt outcome."""
        events: list[tuple[str, Any]] = []
        self.scanner.add_observer(lambda block, event: events.append((block, event)))
        self.scan()
        self.client.calls[0].deferred.callback(JSON_REPLY)
        [(block, event)] = events
        self.assertEqual(block, "local")
        self.assertIsInstance(event, AttemptOutcome)
        self.assertTrue(event.ok)

    def test_update_keeps_upstream_state(self) -> None:
        """A reload keeping an upstream keeps its state; new blocks appear, removed ones go."""
        balancer = self.scanner.balancers()["local"]
        balancer.mark_down(balancer.get("127.0.0.1:11333"), "test")
        self.scanner.update(
            proxy_options(
                'upstream { local { default = yes; hosts = "127.0.0.1:11333,127.0.0.9"; }'
                ' third { hosts = "127.0.0.4"; } }'
            )
        )
        self.assertIs(self.scanner.balancers()["local"], balancer)
        self.assertEqual(
            balancer.states(),
            {"127.0.0.1:11333": UpstreamState.DOWN, "127.0.0.9": UpstreamState.ALIVE},
        )
        self.assertEqual(sorted(self.scanner.balancers()), ["local", "third"])

    def test_stop_closes_client(self) -> None:
        """Stopping closes the client's connections."""
        self.scanner.stop()
        self.assertTrue(self.client.closed)


class HealthTests(unittest.TestCase):
    """Health checks with the real client on a memory reactor."""

    def test_probe_is_ping(self) -> None:
        """Each health probe is a GET /ping to the upstream."""
        reactor = MemoryReactorClock()
        scanner = UpstreamScanner(
            proxy_options('upstream { local { default = yes; hosts = "127.0.0.1:11999"; } }'),
            GlobalOptions(),
            reactor,
            client=ScannerClient(reactor),
            health=HealthSettings(interval=5.0),
        )
        [checker] = scanner.health_checkers()
        checker.startService()
        self.addCleanup(checker.stopService)
        host, port, factory, _timeout, _bind = reactor.tcpClients[0]
        self.assertEqual((host, port), ("127.0.0.1", 11999))
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertTrue(transport.value().startswith(b"GET /ping HTTP/1.1\r\n"))


class ResolutionTests(unittest.TestCase):
    """Upstreams written as host names."""

    def test_scan_waits_for_initial_resolution(self) -> None:
        """A scan arriving before the names are resolved waits for them instead of failing."""
        clock = Clock()
        client = FakeClient()
        lookups: list[Deferred[list[Any]]] = []

        def resolver(entry: Any) -> Deferred[list[Any]]:
            lookups.append(Deferred())
            return lookups[-1]

        scanner = UpstreamScanner(
            proxy_options('upstream { local { default = yes; hosts = "scanner.example:11400"; } }'),
            GlobalOptions(),
            clock,
            client=client,  # type: ignore[arg-type]
            resolver=resolver,
        )
        scanner.start()
        seen = collect(scanner.scan(REQUEST))
        clock.advance(0)
        self.assertEqual((client.calls, seen), ([], []))
        lookups[0].callback([IPv4Address("TCP", "192.0.2.10", 11400)])
        clock.advance(0)
        [call] = client.calls
        self.assertEqual(call.address, IPv4Address("TCP", "192.0.2.10", 11400))
        self.assertEqual(call.headers[0], ("Host", "scanner.example:11400"))
        call.deferred.callback(JSON_REPLY)
        self.assertIsInstance(seen[0], ScanReply)
        scanner.stop()
