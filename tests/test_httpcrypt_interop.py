"""Interop: HTTPCrypt and zstd bodies against a real Rspamd 3.4.

Client side: a real normal worker configured with a keypair we generated gets
requests encrypted by :mod:`rspamd_tx.protocols.httpcrypt` (sent with
:class:`~rspamd_tx.upstreams.http_client.ScannerClient`), plain and
zstd-compressed, and its encrypted replies are opened.  A request encrypted to
another key is refused.

Server side: the real ``rspamc --key`` (with and without ``-z``), and a real
Rspamd proxy whose ``upstream`` has ``key`` and ``compression``, talk to a
small listener that opens their request with :func:`decrypt_request` and
answers with :func:`encrypt_reply`.

Network modules are off (tests/peers/rspamd.py).  Run inside ``unshare -n`` as
CI does.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.python.failure import Failure
from twisted.trial import unittest

from rspamd_tx.protocols import compression
from rspamd_tx.protocols.http_codec import Data, EndOfMessage, Request, RequestParser
from rspamd_tx.protocols.httpcrypt import (
    ENCRYPTED_CONTENT_TYPE,
    DecryptedRequest,
    HttpCryptError,
    decrypt_request,
    encrypt_reply,
    encrypt_request,
)
from rspamd_tx.protocols.keypair import Keypair
from rspamd_tx.upstreams.http_client import BadReply, ScannerClient, ScannerResponse

from tests.helpers.messages import GTUBE_MESSAGE
from tests.peers.rspamd import RspamdPeer, rspamc, skip_unless_rspamd, start_rspamd

MAX_REPLY = 10 * 1024 * 1024


class EncryptedToRspamdTests(unittest.TestCase):
    """Our HTTPCrypt client against a real Rspamd normal worker with a keypair."""

    skip = skip_unless_rspamd()
    timeout = 300

    @inlineCallbacks
    def start(self) -> Any:
        """Start Rspamd whose normal worker has a fresh keypair; return (peer, keypair)."""
        keypair = Keypair.generate()
        peer: RspamdPeer = yield start_rspamd(
            reactor,
            workers=("normal",),
            worker_options={"normal": keypair.to_ucl()},
            wait_hyperscan=False,
        )
        self.addCleanup(peer.stop)
        return peer, keypair

    def client(self) -> ScannerClient:
        client = ScannerClient(reactor, max_idle_per_address=0)
        self.addCleanup(client.close)
        return client

    @inlineCallbacks
    def test_encrypted_gtube_rejected(self) -> Any:
        """An encrypted POST /checkv2 with GTUBE gets an encrypted 200 whose inner
        JSON reply says reject."""
        peer, keypair = yield self.start()
        request = encrypt_request(
            "POST", "/checkv2", [("IP", "192.0.2.1")], GTUBE_MESSAGE, keypair.public,
            host="scan",
        )
        response: ScannerResponse = yield self.client().request(
            ("127.0.0.1", peer.ports["normal"]),
            request.method, request.target, request.headers, request.body, timeout=30,
        )
        self.assertEqual(
            (response.status, response.get("Content-Type")), (200, ENCRYPTED_CONTENT_TYPE)
        )
        reply = request.decrypt_reply(response.status, response.headers, response.body)
        self.assertEqual((reply.status, reply.get("Content-Type")), (200, "application/json"))
        self.assertEqual(json.loads(reply.body)["action"], "reject")

    @inlineCallbacks
    def test_encrypted_ping(self) -> Any:
        """An encrypted bodiless request (sent as inner GET /ping) gets the inner
        reply Rspamd formats: 200 OK, Connection, Server, Date, text/plain 'pong'."""
        peer, keypair = yield self.start()
        request = encrypt_request("GET", "/ping", [], b"", keypair.public, host="scan")
        response: ScannerResponse = yield self.client().request(
            ("127.0.0.1", peer.ports["normal"]),
            request.method, request.target, request.headers, request.body, timeout=30,
        )
        reply = request.decrypt_reply(response.status, response.headers, response.body)
        self.assertEqual((reply.status, reply.reason, reply.body), (200, "OK", b"pong\r\n"))
        self.assertEqual(
            [name for name, _ in reply.headers],
            ["Connection", "Server", "Date", "Content-Length", "Content-Type"],
        )
        self.assertEqual(
            (reply.get("Connection"), reply.get("Content-Type")), ("close", "text/plain")
        )
        self.assertTrue((reply.get("Server") or "").startswith("rspamd/"))

    @inlineCallbacks
    def test_encrypted_compressed_gtube_rejected(self) -> Any:
        """A zstd-compressed, encrypted GTUBE scan gets a zstd inner reply
        (``Compression: zstd``) that decompresses to a reject."""
        peer, keypair = yield self.start()
        request = encrypt_request(
            "POST", "/checkv2",
            [("IP", "192.0.2.1"), *compression.REQUEST_COMPRESSION_HEADERS],
            compression.compress(GTUBE_MESSAGE), keypair.public,
            host="scan", content_type="application/octet-stream",
        )
        response: ScannerResponse = yield self.client().request(
            ("127.0.0.1", peer.ports["normal"]),
            request.method, request.target, request.headers, request.body, timeout=30,
        )
        reply = request.decrypt_reply(response.status, response.headers, response.body)
        self.assertEqual(reply.status, 200)
        self.assertTrue(compression.reply_is_compressed(reply.headers))
        result = json.loads(compression.decompress(reply.body, MAX_REPLY))
        self.assertEqual(result["action"], "reject")

    @inlineCallbacks
    def test_wrong_key_refused(self) -> Any:
        """A request encrypted to another server key gets no reply at all: Rspamd
        closes the connection, which the client reports as 400 unexpected EOF."""
        peer, _ = yield self.start()
        other = Keypair.generate()
        request = encrypt_request(
            "POST", "/checkv2", [], GTUBE_MESSAGE, other.public, host="scan"
        )
        failure = yield self.assertFailure(
            self.client().request(
                ("127.0.0.1", peer.ports["normal"]),
                request.method, request.target, request.headers, request.body, timeout=30,
            ),
            BadReply,
        )
        self.assertEqual((failure.status, failure.reason), (400, "IO read error: unexpected EOF"))

    @inlineCallbacks
    def test_scanner_without_keypair(self) -> Any:
        """A scanner without a keypair ignores Key and answers the outer POST /post in
        clear with 500; opening that reply fails naming the outer status."""
        peer: RspamdPeer = yield start_rspamd(reactor, workers=("normal",), wait_hyperscan=False)
        self.addCleanup(peer.stop)
        request = encrypt_request(
            "POST", "/checkv2", [], GTUBE_MESSAGE, Keypair.generate().public, host="scan"
        )
        response: ScannerResponse = yield self.client().request(
            ("127.0.0.1", peer.ports["normal"]),
            request.method, request.target, request.headers, request.body, timeout=30,
        )
        self.assertEqual(response.status, 500, response.reason)
        with self.assertRaises(HttpCryptError) as caught:
            request.decrypt_reply(response.status, response.headers, response.body)
        self.assertIn(f"outer status {response.status}", str(caught.exception))


class _EncryptedScanner(Protocol):
    """Answers one encrypted request with a fixed scan result, as a scanner would."""

    def __init__(self, factory: _ScannerFactory) -> None:
        self.factory = factory
        self.parser = RequestParser()
        self.outer: Request | None = None
        self.body = bytearray()

    def dataReceived(self, data: bytes) -> None:
        for event in self.parser.feed(data):
            if isinstance(event, Request):
                self.outer = event
            elif isinstance(event, Data):
                self.body += event.chunk
            elif isinstance(event, EndOfMessage):
                self.answer()

    def answer(self) -> None:
        assert self.transport is not None and self.outer is not None
        inner = decrypt_request(self.outer.headers, bytes(self.body), self.factory.keypair)
        self.factory.outer.append(self.outer)
        self.factory.seen.append(inner)
        result = json.dumps(
            {"action": "reject", "score": 1000.0, "required_score": 15.0, "is_skipped": False,
             "symbols": {}, "message-id": "gtube@example.com"}
        ).encode()
        headers: list[tuple[str, str]] = []
        if compression.request_is_compressed(inner.headers):
            result = compression.compress(result)
            headers.append((compression.COMPRESSION_HEADER, compression.ZSTD))
        self.transport.write(
            encrypt_reply(
                200, "OK", headers, result, inner.nm,
                server="rspamd/3.4", date="Mon, 23 Nov 2026 18:00:00 GMT",
                content_type="application/json",
            )
        )
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(Exception("closed"))) -> None:
        self.factory.closed.append(reason)


class _ScannerFactory(ServerFactory):
    def __init__(self, keypair: Keypair) -> None:
        self.keypair = keypair
        self.outer: list[Request] = []
        self.seen: list[DecryptedRequest] = []
        self.closed: list[Failure] = []

    def buildProtocol(self, addr: Any) -> _EncryptedScanner:
        return _EncryptedScanner(self)


class RspamcToOurServerTests(unittest.TestCase):
    """The real ``rspamc --key`` against our server side."""

    skip = skip_unless_rspamd()
    timeout = 60

    def listen(self) -> tuple[_ScannerFactory, int]:
        factory = _ScannerFactory(Keypair.generate())
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        address = port.getHost()
        assert isinstance(address, IPv4Address)
        return factory, address.port

    def message_file(self) -> str:
        handle, path = tempfile.mkstemp(suffix=".eml")
        os.write(handle, GTUBE_MESSAGE)
        os.close(handle)
        self.addCleanup(os.unlink, path)
        return path

    @inlineCallbacks
    def scan(self, extra: list[str]) -> Any:
        factory, port = self.listen()
        done: Deferred[tuple[int, bytes, bytes]] = rspamc(
            reactor,
            ["-h", f"127.0.0.1:{port}", "-t", "20", "--key", factory.keypair.public.encode(),
             *extra, "--json", "symbols", self.message_file()],
        )
        code, out, err = yield done
        return factory, code, out, err

    @inlineCallbacks
    def test_rspamc_request_decrypted_and_answered(self) -> Any:
        """rspamc's encrypted /checkv2 opens to its GTUBE message, and rspamc
        prints the result our encrypted reply carried."""
        factory, code, out, err = yield self.scan([])
        self.assertEqual(code, 0, err)
        [inner] = factory.seen
        self.assertEqual((inner.method, inner.target), ("POST", "/checkv2"))
        self.assertEqual(inner.body, GTUBE_MESSAGE)
        self.assertEqual(json.loads(out)["action"], "reject")

    @inlineCallbacks
    def test_rspamc_compressed_request(self) -> Any:
        """With -z, rspamc's inner request says ``Compression: zstd`` and its body
        decompresses to the message; rspamc reads our compressed reply."""
        factory, code, out, err = yield self.scan(["-z"])
        self.assertEqual(code, 0, err)
        [inner] = factory.seen
        self.assertTrue(compression.request_is_compressed(inner.headers))
        self.assertEqual(compression.decompress(inner.body, MAX_REPLY), GTUBE_MESSAGE)
        self.assertEqual(json.loads(out)["action"], "reject")


class RspamdProxyToOurServerTests(unittest.TestCase):
    """A real Rspamd proxy whose upstream has ``key`` (and ``compression``) set
    encrypts to our server side, and relays our encrypted reply."""

    skip = skip_unless_rspamd()
    timeout = 300

    @inlineCallbacks
    def test_proxy_upstream_with_key(self) -> Any:
        """Rspamd's proxy sends POST /post with our short id in Key; the inner
        request is its /checkv2 with the message; the client gets our verdict."""
        factory = _ScannerFactory(Keypair.generate())
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        address = port.getHost()
        assert isinstance(address, IPv4Address)
        options = (
            "milter = no;\n"
            f'upstream "scan" {{ default = yes; hosts = "127.0.0.1:{address.port}";'
            f' key = "{factory.keypair.public.encode()}"; compression = yes; }}\n'
        )
        peer: RspamdPeer = yield start_rspamd(
            reactor, workers=("proxy",), worker_options={"proxy": options}, wait_hyperscan=False
        )
        self.addCleanup(peer.stop)
        client = ScannerClient(reactor, max_idle_per_address=0)
        self.addCleanup(client.close)
        response: ScannerResponse = yield client.request(
            ("127.0.0.1", peer.ports["proxy"]), "POST", "/checkv2",
            [("IP", "192.0.2.1")], GTUBE_MESSAGE, timeout=30,
        )
        self.assertEqual(response.status, 200, response.reason)
        self.assertEqual(json.loads(response.body)["action"], "reject")
        [outer] = factory.outer
        [inner] = factory.seen
        self.assertEqual((outer.method, outer.target), ("POST", "/post"))
        self.assertEqual(outer.get("Content-Type"), ENCRYPTED_CONTENT_TYPE)
        key_id = (outer.get("Key") or "").split("=")[0]
        self.assertEqual(key_id, factory.keypair.id_string[:8])
        self.assertEqual((inner.method, inner.target), ("POST", "/checkv2"))
        self.assertEqual(inner.get("IP"), "192.0.2.1")
        # 127.0.0.1 is a local upstream: Rspamd compresses only for remote ones.
        self.assertFalse(compression.request_is_compressed(inner.headers))
        self.assertEqual(inner.body, GTUBE_MESSAGE)
