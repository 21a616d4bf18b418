"""Interop: our proxy (HTTP mode, in-process) in front of a real Rspamd 3.4 normal worker.

``rspamc`` through our proxy must give the same action and symbols as
``rspamc`` straight to Rspamd (JSON compared minus time fields), and a legacy
``CHECK RSPAMC/1.3`` request through our proxy must get the reply Exim's
parser expects.  Network modules are off (tests/peers/rspamd.py) so scans are
deterministic.  Run inside ``unshare -n`` as CI does.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from rspamd_tx.config import ucl
from rspamd_tx.config.tree import UclObject
from rspamd_tx.config.workers import check_config
from rspamd_tx.proxy.server import ProxyWorker, build_worker

from tests.helpers.net import http_get, raw_exchange
from tests.peers.rspamd import RspamdPeer, free_port, rspamc, skip_unless_rspamd, start_rspamd

GTUBE = (
    b"From: spammer@example.com\r\nTo: victim@example.org\r\nSubject: test\r\n"
    b"Message-ID: <gtube@example.com>\r\n\r\n"
    b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X\r\n"
)
HAM = (
    b"From: Alice <alice@example.com>\r\nTo: Bob <bob@example.org>\r\n"
    b"Subject: Lunch tomorrow\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <ham1@example.com>\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
    b"Hi Bob,\r\n\r\nshall we have lunch tomorrow at noon? See https://example.net/menu\r\n\r\nAlice\r\n"
)
MULTIPART = (
    b"From: Carol <carol@example.com>\r\nTo: Dan <dan@example.org>\r\n"
    b"Subject: Report\r\nDate: Mon, 23 Nov 2026 11:00:00 +0000\r\n"
    b"Message-ID: <multi1@example.com>\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
    b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nThe report is attached.\r\n"
    b"--b1\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<html><body><p>The report</p></body></html>\r\n"
    b"--b1\r\nContent-Type: application/octet-stream\r\n"
    b'Content-Disposition: attachment; filename="report.bin"\r\n'
    b"Content-Transfer-Encoding: base64\r\n\r\nAAECAwQFBgcICQ==\r\n--b1--\r\n"
)
TIME_FIELDS = ("time_real", "time_virtual", "scan_time")
EXIM_REPLY = re.compile(
    rb"^RSPAMD/1\.3 0 EX_OK\r\nMetric: default; (True|False); (-?[0-9]+\.[0-9]{2}) / "
    rb"(-?[0-9]+\.[0-9]{2}) / 0\.0\r\n(?:Action: ([^\r\n]*)\r\n)?"
)


def proxy_config(upstream: str, extra: str = "") -> tuple[Any, Any]:
    """The checked config and worker of a proxy in HTTP mode in front of ``upstream``."""
    text = (
        'worker "rspamd_proxy" { milter = no; timeout = 20s;'
        f' upstream {{ local {{ default = yes; hosts = "{upstream}"; }} }} {extra} }}'
    )
    tree = UclObject(ucl.loads(text))
    config, diagnostics = check_config(tree)
    errors = [d for d in diagnostics if d.severity == "error"]
    assert not errors, errors
    return config, config.workers[0]


def without_time(result: dict[str, Any]) -> dict[str, Any]:
    """A scan result minus its time fields."""
    return {key: value for key, value in result.items() if key not in TIME_FIELDS}


class ProxyInteropTests(unittest.TestCase):
    """Our proxy in front of a real Rspamd normal worker."""

    skip = skip_unless_rspamd()
    timeout = 300

    @inlineCallbacks
    def start(self, by_name: bool = False) -> Any:
        """Start Rspamd and our proxy in front of it; return (peer, proxy port).

        With ``by_name`` the upstream is written ``localhost:PORT`` (resolved at start).
        """
        peer: RspamdPeer = yield start_rspamd(reactor, workers=("normal",), wait_hyperscan=False)
        self.addCleanup(peer.stop)
        upstream = peer.address("normal")
        if by_name:
            upstream = upstream.replace("127.0.0.1", "localhost")
        config, worker = proxy_config(upstream)
        builder: ProxyWorker = build_worker(config, worker, reactor)
        for service in builder.services():
            service.startService()
            self.addCleanup(service.stopService)
        port = reactor.listenTCP(0, builder.stream_factory(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return peer, port.getHost().port

    def message_file(self, data: bytes) -> str:
        handle, path = tempfile.mkstemp(suffix=".eml")
        os.write(handle, data)
        os.close(handle)
        self.addCleanup(os.unlink, path)
        return path

    @inlineCallbacks
    def scan(self, address: str, path: str) -> Any:
        code, out, err = yield rspamc(
            reactor, ["-h", address, "-t", "30", "-i", "192.0.2.1", "--json", "symbols", path]
        )
        self.assertEqual(code, 0, err)
        return json.loads(out)

    @inlineCallbacks
    def test_rspamc_same_as_direct(self) -> Any:
        """GTUBE (reject), a ham and a multipart message: same JSON through our proxy as direct."""
        peer, port = yield self.start()
        verdicts = []
        for message in (GTUBE, HAM, MULTIPART):
            path = self.message_file(message)
            direct = yield self.scan(peer.address("normal"), path)
            proxied = yield self.scan(f"127.0.0.1:{port}", path)
            self.assertEqual(without_time(proxied), without_time(direct))
            self.assertTrue(proxied["symbols"])
            verdicts.append(proxied["action"])
        self.assertEqual(verdicts[0], "reject")
        self.assertNotEqual(verdicts[1], "reject")

    @inlineCallbacks
    def test_legacy_rspamc_for_exim(self) -> Any:
        """CHECK RSPAMC/1.3 through our proxy gets the Metric/Action reply Exim parses,
        with the same lines as Rspamd itself answers."""
        peer, port = yield self.start()
        request = (
            b"CHECK RSPAMC/1.3\r\nContent-length: " + str(len(GTUBE)).encode()
            + b"\r\nQueue-Id: 1ABCDE-000001-XY\r\nFrom: <spammer@example.com>\r\n"
            b"Recipient-Number: 2\r\nRcpt: <victim@example.org>\r\nRcpt: <other@example.org>\r\n"
            b"Helo: mail.example.com\r\nIP: 192.0.2.1\r\n\r\n" + GTUBE
        )
        proxied = yield raw_exchange(reactor, "127.0.0.1", port, request, timeout=30)
        match = EXIM_REPLY.match(proxied)
        self.assertIsNotNone(match, proxied)
        assert match is not None
        word, score, threshold, action = match.groups()
        self.assertEqual(action, b"reject")
        self.assertGreaterEqual(float(score), float(threshold))
        host, rspamd_port = peer.address("normal").split(":")
        direct = yield raw_exchange(reactor, host, int(rspamd_port), request, timeout=30)
        self.assertEqual(sorted(proxied.split(b"\r\n")), sorted(direct.split(b"\r\n")))

    @inlineCallbacks
    def test_legacy_spamc(self) -> Any:
        """SYMBOLS SPAMC/1.2 through our proxy gets the same reply as from Rspamd."""
        peer, port = yield self.start()
        request = b"SYMBOLS SPAMC/1.2\r\nContent-length: " + str(len(HAM)).encode() + b"\r\n\r\n" + HAM
        proxied = yield raw_exchange(reactor, "127.0.0.1", port, request, timeout=30)
        host, rspamd_port = peer.address("normal").split(":")
        direct = yield raw_exchange(reactor, host, int(rspamd_port), request, timeout=30)
        proxied_head, _, proxied_symbols = proxied.partition(b"\r\n\r\n")
        direct_head, _, direct_symbols = direct.partition(b"\r\n\r\n")
        self.assertEqual(proxied_head, direct_head)
        self.assertEqual(
            sorted(proxied_symbols.strip().split(b",")), sorted(direct_symbols.strip().split(b","))
        )

    @inlineCallbacks
    def test_ping_and_unknown_command(self) -> Any:
        """/ping is answered by the proxy; an unknown command gets the scanner's 500 invalid
        command, through an upstream written as a host name."""
        _, port = yield self.start(by_name=True)
        status, body = yield http_get(reactor, "127.0.0.1", port, "/ping")
        self.assertEqual((status, body), (200, b"pong\r\n"))
        reply = yield raw_exchange(
            reactor, "127.0.0.1", port, b"POST /learnspam HTTP/1.0\r\nContent-Length: 0\r\n\r\n", timeout=30
        )
        self.assertTrue(reply.startswith(b"HTTP/1.1 500 invalid command\r\n"), reply)


def split_reply(reply: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """Status line, headers (lower-case names, minus Date/Server), body of an HTTP reply."""
    head, _, body = reply.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(b":")
        if name.lower() not in (b"date", b"server"):
            headers[name.lower()] = value.strip()
    return status, headers, body


class SameAsRspamdProxyTests(unittest.TestCase):
    """Our proxy and Rspamd's own rspamd_proxy (HTTP mode) answer alike."""

    skip = skip_unless_rspamd()
    timeout = 300

    @inlineCallbacks
    def start(self, rspamd_workers: tuple[str, ...], upstream: str | None = None,
              proxy_options: str = "") -> Any:
        """Rspamd (with its proxy) and ours in front of the same upstream; return (peer, our port)."""
        options = {"proxy": proxy_options} if proxy_options else None
        peer: RspamdPeer = yield start_rspamd(
            reactor, workers=rspamd_workers, worker_options=options, wait_hyperscan=False
        )
        self.addCleanup(peer.stop)
        config, worker = proxy_config(upstream or peer.address("normal"))
        builder: ProxyWorker = build_worker(config, worker, reactor)
        for service in builder.services():
            service.startService()
            self.addCleanup(service.stopService)
        port = reactor.listenTCP(0, builder.stream_factory(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return peer, port.getHost().port

    @inlineCallbacks
    def exchange_both(self, peer: RspamdPeer, port: int, request: bytes) -> Any:
        ours = yield raw_exchange(reactor, "127.0.0.1", port, request, timeout=60)
        host, theirs_port = peer.address("proxy").split(":")
        theirs = yield raw_exchange(reactor, host, int(theirs_port), request, timeout=60)
        return ours, theirs

    @inlineCallbacks
    def test_replies_match(self) -> Any:
        """checkv2 (JSON minus time), legacy RSPAMC and SPAMC (byte for byte) and an
        unknown command: the same answer from both proxies."""
        peer, port = yield self.start(("normal", "proxy"))
        checkv2 = (
            b"POST /checkv2 HTTP/1.0\r\nContent-Length: " + str(len(HAM)).encode()
            + b"\r\nIP: 192.0.2.1\r\nRcpt: a@example.org\r\nRcpt: b@example.org\r\n"
            b"From: alice@example.com\r\n\r\n" + HAM
        )
        ours, theirs = yield self.exchange_both(peer, port, checkv2)
        our_status, our_headers, our_body = split_reply(ours)
        their_status, their_headers, their_body = split_reply(theirs)
        self.assertEqual(our_status, their_status)
        self.assertEqual(list(our_headers), list(their_headers))
        self.assertEqual(our_headers.get(b"content-type"), their_headers.get(b"content-type"))
        self.assertEqual(without_time(json.loads(our_body)), without_time(json.loads(their_body)))
        for legacy in (
            b"CHECK RSPAMC/1.3\r\nContent-length: " + str(len(GTUBE)).encode()
            + b"\r\nIP: 192.0.2.1\r\n\r\n" + GTUBE,
            b"SYMBOLS SPAMC/1.2\r\nContent-length: " + str(len(MULTIPART)).encode()
            + b"\r\nIP: 192.0.2.1\r\n\r\n" + MULTIPART,
        ):
            ours, theirs = yield self.exchange_both(peer, port, legacy)
            self.assertEqual(ours, theirs)
        ours, theirs = yield self.exchange_both(
            peer, port, b"POST /learnspam HTTP/1.0\r\nContent-Length: 0\r\n\r\n"
        )
        self.assertEqual(split_reply(ours)[0], split_reply(theirs)[0])
        self.assertEqual(split_reply(ours)[2], split_reply(theirs)[2])

    @inlineCallbacks
    def test_dead_upstream_error_matches(self) -> Any:
        """With the only upstream refusing connections both answer 500 IO write error."""
        closed = free_port()
        upstream = f"127.0.0.1:{closed}"
        peer, port = yield self.start(
            ("proxy",), upstream,
            f'milter = no; upstream "local" {{ default = yes; hosts = "{upstream}"; }}',
        )
        request = b"POST /checkv2 HTTP/1.0\r\nContent-Length: 4\r\n\r\nbody"
        ours, theirs = yield self.exchange_both(peer, port, request)
        self.assertEqual(split_reply(ours)[0], split_reply(theirs)[0])
        self.assertEqual(split_reply(ours)[0], b"HTTP/1.1 500 IO write error: Connection refused")
        self.assertEqual(split_reply(ours)[2], split_reply(theirs)[2])
