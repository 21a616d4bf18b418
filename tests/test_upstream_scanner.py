"""Tests for rspamd_tx.proxy.upstream_scanner: routing, request/reply transformation, retries."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import zstandard
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from rspamd_tx.config import ucl
from rspamd_tx.config.tree import UclObject
from rspamd_tx.config.workers import GlobalOptions, ProxyOptions, check_config
from rspamd_tx.proxy.scanning import FailureClass, IScanner, ScanFailure, ScanReply, ScanRequest
from rspamd_tx.protocols.httpcrypt import decrypt_request, encrypt_reply
from rspamd_tx.protocols.keypair import Keypair, PublicKey
from rspamd_tx.proxy.upstream_scanner import HealthSettings, UpstreamScanner, address_is_local
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
    """What is sent to the upstream (spec §4.3), with ``send_client_ip`` on."""

    config = "send_client_ip = yes; " + TWO_BLOCKS

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


class ClientIpDefaultTests(ScannerTestCase):
    """Like Rspamd 3.4's proxy, no IP header is added unless send_client_ip asks for it."""

    def test_no_ip_added_by_default(self) -> None:
        """A request with a known client address but no IP header goes out without one."""
        self.assertFalse(self.options.send_client_ip)
        self.scan()
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
      remote {
        default = yes; hosts = "192.0.2.10"; settings_id = "strict"; keepalive = yes;
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
                ("Host", "192.0.2.10"),
                ("Connection", "keep-alive"),
                ("Rcpt", "a@b"),
                ("Settings-ID", "strict"),
                ("MTA-Name", "edge"),
                ("User-Agent", "rspamd-tx/0.1.0"),
                ("Content-Type", "application/octet-stream"),
                ("Compression", "zstd"),
            ],
        )

    def test_compression(self) -> None:
        """With compression the body travels as one zstd frame with its content size."""
        self.scan(ScanRequest(headers=((b"Content-Type", b"text/plain"),), body=b"message body"))
        call = self.client.calls[0]
        self.assertEqual(zstandard.ZstdDecompressor().decompress(call.body), b"message body")
        self.assertEqual(
            [value for name, value in call.headers if name.lower() == "content-type"],
            ["application/octet-stream"],
        )

    def test_client_compressed_body_untouched(self) -> None:
        """A body the client compressed already is forwarded as it came."""
        frame = zstandard.ZstdCompressor().compress(b"m")
        self.scan(ScanRequest(headers=((b"Compression", b"zstd"),), body=frame))
        call = self.client.calls[0]
        self.assertEqual(call.body, frame)
        self.assertEqual([v for n, v in call.headers if n == "Compression"], ["zstd"])

    def test_empty_body_not_compressed(self) -> None:
        """An empty body stays empty, without compression headers."""
        self.scan(ScanRequest(headers=(), body=b""))
        call = self.client.calls[0]
        self.assertEqual(call.body, b"")
        self.assertNotIn("Compression", [name for name, _ in call.headers])


class LocalCompressionTests(ScannerTestCase):
    """Local upstreams never get compressed bodies (spec §4.3)."""

    config = """
    upstream {
      loop { default = yes; hosts = "127.0.0.1"; compression = yes; }
      forced { hosts = "192.0.2.10"; compression = yes; local = yes; }
      v6 { hosts = "[fe80::1]:11333"; compression = yes; }
    }
    """

    def test_loopback_not_compressed(self) -> None:
        """A loopback upstream gets the body as it came."""
        self.scan(ScanRequest(headers=(), body=b"message body"))
        self.assertEqual(self.client.calls[0].body, b"message body")

    def test_local_option_not_compressed(self) -> None:
        """local = true turns compression off for any address."""
        self.scan(ScanRequest(headers=(), body=b"message body", route=b"forced"))
        self.assertEqual(self.client.calls[0].body, b"message body")

    def test_link_local_v6_not_compressed(self) -> None:
        """An fe80::/10 upstream is local."""
        self.scan(ScanRequest(headers=(), body=b"message body", route=b"v6"))
        self.assertEqual(self.client.calls[0].body, b"message body")


class AddressLocalityTests(unittest.TestCase):
    """address_is_local follows rspamd_inet_address_is_local."""

    def test_table(self) -> None:
        """Unix paths, 127/8, ::1, fe80::/10 and fec0::/10 are local; others are not."""
        table = [
            ("/run/rspamd.sock", True),
            (UNIXAddress("/run/rspamd.sock"), True),
            (IPv4Address("TCP", "127.0.0.1", 11333), True),
            (IPv4Address("TCP", "127.3.4.5", 11333), True),
            (IPv4Address("TCP", "192.0.2.1", 11333), False),
            (IPv6Address("TCP", "::1", 11333), True),
            (IPv6Address("TCP", "fe80::1%lo", 11333), True),
            (IPv6Address("TCP", "fec0::1", 11333), True),
            (IPv6Address("TCP", "2001:db8::1", 11333), False),
            (("10.0.0.1", 11333), False),
            (("scanner.example", 11333), False),
        ]
        self.assertEqual([(a, address_is_local(a)) for a, _ in table], table)


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
        """A reply that claims zstd but is not is a bad reply: retried, then 500."""
        seen = self.scan()
        for index in range(5):
            self.client.calls[index].deferred.callback(
                ScannerResponse(200, "OK", (("Compression", "zstd"),), b"not zstd")
            )
            self.clock.advance(0)
        self.assertEqual(len(self.client.calls), 5)
        [failure] = seen
        self.assertEqual(failure.value.kind, FailureClass.BAD_REPLY)
        self.assertEqual(failure.value.status, 500)
        self.assertTrue(failure.value.reason.startswith("cannot decompress reply"))

    def test_bad_zstd_reply_retried_elsewhere(self) -> None:
        """After a reply that does not decompress, the next upstream's reply is relayed."""
        seen = self.scan()
        self.client.calls[0].deferred.callback(
            ScannerResponse(200, "OK", (("Compression", "zstd"),), b"not zstd")
        )
        self.clock.advance(0)
        self.client.calls[1].deferred.callback(JSON_REPLY)
        [reply] = seen
        self.assertEqual(reply.result(), {"action": "reject"})
        self.assertNotEqual(self.client.calls[0].address, self.client.calls[1].address)

    def test_zstd_bomb_refused(self) -> None:
        """A zstd reply inflating past max_message fails without being inflated whole."""
        self.scanner.options = proxy_options("max_retries = 1; max_message = 1000; " + TWO_BLOCKS)
        body = zstandard.ZstdCompressor().compress(b"x" * 100000)
        [failure] = self.scan_and_answer(ScannerResponse(200, "OK", (("Compression", "zstd"),), body))
        self.assertIn("more than the bound of 1000", failure.value.reason)

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


SCANNER_KEYPAIR = Keypair.generate()


def encrypted_reply(request: Call, status: int, reason: str, headers: Any, body: bytes) -> ScannerResponse:
    """What a scanner holding SCANNER_KEYPAIR answers to the encrypted ``request``."""
    opened = decrypt_request(request.headers, request.body, SCANNER_KEYPAIR)
    raw = encrypt_reply(
        status, reason, headers, body, opened.nm, server="rspamd/3.4",
        date="Mon, 23 Nov 2026 17:00:00 GMT", content_type="application/json",
    )
    _, outer_body = raw.split(b"\r\n\r\n", 1)
    return ScannerResponse(200, "OK", (("Content-Type", "application/octet-stream"),), outer_body)


class EncryptionTests(ScannerTestCase):
    """Blocks with a backend key speak HTTPCrypt (httpcrypt.md §5)."""

    config = (
        "max_retries = 2; upstream { enc { default = yes; hosts = \"192.0.2.10,192.0.2.11\";"
        f" key = \"{PublicKey(SCANNER_KEYPAIR.public_key).encode()}\";"
        " compression = yes; settings_id = \"sid1\"; } }"
    )

    def test_outer_request(self) -> None:
        """The request goes out as POST /post with the Key header and the upstream as Host."""
        self.scan()
        call = self.client.calls[0]
        self.assertEqual((call.method, call.target), ("POST", "/post"))
        names = [name for name, _ in call.headers]
        self.assertEqual(names, ["Connection", "Host", "Content-Length", "Content-Type", "Key"])
        self.assertEqual(dict(call.headers)["Host"], call.address.host)
        self.assertNotIn(b"msg", call.body)

    def test_inner_request(self) -> None:
        """The scanner decrypts the client's request, transformed and compressed, inside."""
        self.scan(
            ScanRequest(headers=((b"Settings-ID", b"lax"), (b"Rcpt", b"a@b")), body=b"message body")
        )
        call = self.client.calls[0]
        inner = decrypt_request(call.headers, call.body, SCANNER_KEYPAIR)
        self.assertEqual((inner.method, inner.target), ("POST", "/checkv2"))
        self.assertEqual(inner.get("Settings-ID"), "sid1")
        self.assertEqual(inner.get("Rcpt"), "a@b")
        self.assertEqual(inner.get("Compression"), "zstd")
        self.assertEqual(inner.get("Content-Type"), "application/octet-stream")
        self.assertIsNone(inner.get("Host"))
        self.assertEqual(zstandard.ZstdDecompressor().decompress(inner.body), b"message body")

    def test_reply_decrypted_and_decompressed(self) -> None:
        """The encrypted, compressed reply is relayed in clear, without compression headers."""
        seen = self.scan()
        call = self.client.calls[0]
        body = zstandard.ZstdCompressor(write_content_size=False).compress(b'{"action":"reject"}')
        call.deferred.callback(
            encrypted_reply(call, 200, "OK", [("Compression", "zstd"), ("Message-Offset", "19")], body)
        )
        [reply] = seen
        self.assertEqual(reply.result(), {"action": "reject"})
        self.assertEqual(reply.content_type(), b"application/json")
        self.assertEqual(
            [name for name, _ in reply.headers], [b"Content-Type", b"Message-Offset"]
        )

    def test_undecryptable_reply_retried(self) -> None:
        """A reply that does not decrypt is a bad reply and the scan moves on."""
        seen = self.scan()
        self.client.calls[0].deferred.callback(JSON_REPLY)
        self.clock.advance(0)
        call = self.client.calls[1]
        call.deferred.callback(encrypted_reply(call, 200, "OK", [], b"{}"))
        [reply] = seen
        self.assertEqual(reply.body, b"{}")
        self.assertEqual(reply.tried, (self.client.calls[0].address.host, call.address.host))

    def test_undecryptable_replies_fail(self) -> None:
        """When no attempt decrypts, the scan fails as a bad reply."""
        seen = self.scan()
        for index in range(2):
            self.client.calls[index].deferred.callback(JSON_REPLY)
            self.clock.advance(0)
        [failure] = seen
        self.assertEqual(failure.value.kind, FailureClass.BAD_REPLY)
        self.assertTrue(failure.value.reason.startswith("cannot decrypt reply"))

    def test_client_keypair_reused(self) -> None:
        """Until the first rotation each request gets a fresh client key; afterwards one is shared."""
        for _ in range(2):
            self.scan()
        first, second = (dict(call.headers)["Key"] for call in self.client.calls)
        self.assertNotEqual(first.split("=")[1], second.split("=")[1])
        self.clock.advance(241)
        for _ in range(2):
            self.scan()
        third, fourth = (dict(call.headers)["Key"] for call in self.client.calls[-2:])
        self.assertEqual(third, fourth)


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
