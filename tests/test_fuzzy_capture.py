"""Real Rspamd 3.4 as a fuzzy client: its datagrams decode with our codec.

Rspamd runs with a ``fuzzy_check`` rule whose server is a UDP port this test
listens on.  ``rspamc symbols`` makes the scanner send CHECK commands and
``rspamc fuzzy_add`` makes the controller send WRITE commands; the recorder
answers each with :func:`encode_reply` so Rspamd accepts the replies.

Set ``RSPAMD_TX_FUZZY_CAPTURE_DIR`` to a directory to save the captured
datagrams there (this is how ``tests/data/fuzzy/`` was made).
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer, protocol, reactor, task
from twisted.trial import unittest

from rspamd_tx.protocols import fuzzy_codec as fc
from rspamd_tx.protocols.keypair import Keypair
from tests.peers.rspamd import RspamdPeer, rspamc, skip_unless_rspamd, start_rspamd

SERVER_KEYPAIR = Keypair.from_secret(bytes(range(0x10, 0x30)))
"""The storage key of the encrypted rule (the protocol spec's test key)."""
CLIENT_KEYPAIR = Keypair.from_secret(bytes(range(0x40, 0x60)))
"""Our client key towards the real storage (the protocol spec's client test key)."""
STORED_DIGEST = bytes(range(64, 128))
"""The digest written to and found in the real storage."""


def save_capture(name: str, data: bytes) -> None:
    """Write ``data`` to ``$RSPAMD_TX_FUZZY_CAPTURE_DIR/name`` when that is set."""
    target = os.environ.get("RSPAMD_TX_FUZZY_CAPTURE_DIR")
    if target:
        with open(os.path.join(target, name), "wb") as handle:
            handle.write(data)


MESSAGE = (
    b"From: Alice Example <alice@example.org>\r\n"
    b"To: bob@example.com\r\n"
    b"Subject: quarterly garden report\r\n"
    b"Message-ID: <fuzzy-capture-1@example.org>\r\n"
    b"Date: Mon, 23 Nov 2026 12:00:00 +0000\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    + b" ".join(
        f"tomatoes{n} cucumbers grow slowly beside the northern fence while gardeners wait".encode()
        for n in range(40)
    )
    + b"\r\n"
)


def _rule(port: int, encrypted: bool) -> str:
    key = f'encryption_key = "{SERVER_KEYPAIR.public.encode()}";' if encrypted else ""
    return f"""
min_bytes = 0;
timeout = 2s;
retransmits = 1;
rule "capture" {{
  servers = "127.0.0.1:{port}";
  algorithm = "mumhash";
  symbol = "FUZZY_CAPTURE";
  mime_types = ["*"];
  max_score = 20.0;
  read_only = no;
  skip_unknown = yes;
  min_length = 16;
  {key}
  fuzzy_map = {{
    FUZZY_CAPTURE_DENIED {{ max_score = 20.0; flag = 1; }}
  }}
}}
"""


class Recorder(protocol.DatagramProtocol):
    """Records every datagram and answers it like a storage that knows nothing.

    CHECK gets a miss, WRITE/DEL an acceptance (``prob`` 1.0, request flag).
    """

    def __init__(self) -> None:
        self.datagrams: list[bytes] = []
        self.requests: list[fc.FuzzyRequest] = []

    def datagramReceived(self, data: bytes, addr: Any) -> None:  # noqa: N802 (Twisted API)
        self.datagrams.append(data)
        request = fc.decode_request(data, lambda key_id: SERVER_KEYPAIR)
        self.requests.append(request)
        command = request.command
        if command.command == fc.Command.CHECK:
            reply = fc.FuzzyReply(0, 0, command.tag, 0.0)
        else:
            reply = fc.FuzzyReply(0, command.flag, command.tag, 1.0, command.digest)
        assert self.transport is not None
        self.transport.write(fc.encode_reply(request, reply), addr)


class FuzzyCaptureTests(unittest.TestCase):
    """Datagrams from real Rspamd decode to the commands it was asked to send."""

    skip = skip_unless_rspamd()
    timeout = 240

    @defer.inlineCallbacks
    def start(self, encrypted: bool) -> Any:
        self.recorder = Recorder()
        port = reactor.listenUDP(0, self.recorder, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        peer: RspamdPeer = yield start_rspamd(
            reactor,
            workers=("normal", "controller"),
            override={"fuzzy_check.conf": _rule(port.getHost().port, encrypted)},
        )
        self.addCleanup(peer.stop)
        self.peer = peer
        message = self.mktemp()
        with open(message, "wb") as handle:
            handle.write(MESSAGE)
        os.chmod(message, 0o644)
        self.message = message
        return peer

    def save(self, name: str) -> None:
        """Save the captured datagrams when asked to (see module docstring)."""
        for index, datagram in enumerate(self.recorder.datagrams):
            save_capture(f"{name}-{index}.bin", datagram)

    @defer.inlineCallbacks
    def scan(self) -> Any:
        code, out, err = yield rspamc(
            reactor, ["-t", "20", "-h", self.peer.address("normal"), "symbols", self.message]
        )
        self.assertEqual(code, 0, (out, err))
        return out

    @defer.inlineCallbacks
    def learn(self) -> Any:
        code, out, err = yield rspamc(
            reactor,
            ["-t", "20", "-h", self.peer.address("controller"),
             "fuzzy_add", "-f", "1", "-w", "10", self.message],
        )  # fmt: skip
        self.assertEqual(code, 0, (out, err))
        return out

    def assert_commands(self, command: int, flag: int, value: int, encrypted: bool) -> None:
        requests = self.recorder.requests
        self.assertTrue(requests, "Rspamd sent no fuzzy datagram")
        for request in requests:
            self.assertEqual(request.encrypted, encrypted)
            self.assertEqual(request.command.version, 4)
            self.assertEqual(request.epoch, fc.Epoch.EPOCH11)
            self.assertEqual(request.command.command, command)
            self.assertEqual(request.command.flag, flag)
            self.assertEqual(request.command.value, value)
            self.assertEqual(len(request.command.digest), fc.DIGEST_SIZE)
        shingled = [r for r in requests if r.command.shingles]
        self.assertTrue(shingled, "the text part was not sent with shingles")
        for request in shingled:
            self.assertEqual(request.command.shingles_count, fc.SHINGLE_COUNT)
            self.assertEqual(len(request.command.shingles), fc.SHINGLE_COUNT)

    @defer.inlineCallbacks
    def test_plain_check(self) -> Any:
        """A scan sends version 4 CHECK commands (flag 0, value 0) with 32 shingles."""
        yield self.start(encrypted=False)
        yield self.scan()
        self.save("plain-check")
        self.assert_commands(fc.Command.CHECK, 0, 0, encrypted=False)

    @defer.inlineCallbacks
    def test_plain_write(self) -> Any:
        """``fuzzy_add -f 1 -w 10`` sends WRITE commands with flag 1 and value 10."""
        yield self.start(encrypted=False)
        out = yield self.learn()
        self.save("plain-write")
        self.assert_commands(fc.Command.WRITE, 1, 10, encrypted=False)
        self.assertIn(b"success", out.lower())

    @defer.inlineCallbacks
    def test_encrypted_check(self) -> Any:
        """With ``encryption_key`` the CHECK commands arrive encrypted to our key."""
        yield self.start(encrypted=True)
        out = yield self.scan()
        self.save("encrypted-check")
        self.assert_commands(fc.Command.CHECK, 0, 0, encrypted=True)
        for request in self.recorder.requests:
            assert request.encryption is not None
            self.assertEqual(request.encryption.key_id, SERVER_KEYPAIR.fuzzy_key_id)
        self.assertNotIn(b"FUZZY_CAPTURE", out)

    @defer.inlineCallbacks
    def test_encrypted_write(self) -> Any:
        """Encrypted WRITE commands decrypt, and Rspamd accepts our encrypted replies."""
        yield self.start(encrypted=True)
        out = yield self.learn()
        self.save("encrypted-write")
        self.assert_commands(fc.Command.WRITE, 1, 10, encrypted=True)
        self.assertIn(b"success", out.lower())


class Client(protocol.DatagramProtocol):
    """A minimal fuzzy client: one datagram out, the reply with the same tag back."""

    def __init__(self) -> None:
        self.waiting: dict[int, defer.Deferred[bytes]] = {}

    def datagramReceived(self, data: bytes, addr: Any) -> None:  # noqa: N802 (Twisted API)
        for tag, waiter in list(self.waiting.items()):
            del self.waiting[tag]
            waiter.callback(data)

    def ask(self, datagram: bytes, tag: int, port: int, timeout: float = 2.0) -> Any:
        """Send ``datagram``; fire with the reply bytes (or None after ``timeout``)."""
        waiter: defer.Deferred[bytes] = defer.Deferred()
        self.waiting[tag] = waiter
        assert self.transport is not None
        self.transport.write(datagram, ("127.0.0.1", port))
        timer = reactor.callLater(timeout, self._expire, tag)
        waiter.addBoth(lambda result: (timer.cancel() if timer.active() else None, result)[1])
        return waiter

    def _expire(self, tag: int) -> None:
        waiter = self.waiting.pop(tag, None)
        if waiter is not None:
            waiter.callback(None)


class RealStorageTests(unittest.TestCase):
    """Our client-side codec against a real Rspamd 3.4 fuzzy storage (sqlite)."""

    skip = skip_unless_rspamd()
    timeout = 120

    @defer.inlineCallbacks
    def start(self) -> Any:
        options = (
            'backend = "sqlite";\n'
            'hashfile = "@DIR@/db/fuzzy.db";\n'
            'allow_update = ["127.0.0.1"];\n'
            "sync = 1s;\n" + SERVER_KEYPAIR.to_ucl()
        )
        peer: RspamdPeer = yield start_rspamd(
            reactor, workers=("fuzzy",), worker_options={"fuzzy": options}
        )
        self.addCleanup(peer.stop)
        self.port = peer.ports["fuzzy"]
        self.client = Client()
        listener = reactor.listenUDP(0, self.client, interface="127.0.0.1")
        self.addCleanup(listener.stopListening)
        return peer

    @defer.inlineCallbacks
    def exchange(
        self, command: fc.FuzzyCommand, encryption: fc.ClientEncryption | None, name: str
    ) -> Any:
        raw = yield self.client.ask(fc.encode_request(command, encryption), command.tag, self.port)
        self.assertIsNotNone(raw, "the storage did not answer")
        reply = fc.decode_reply(raw, encryption.nm if encryption else None)
        if reply.prob > 0.5:
            save_capture(name, raw)
        return reply

    @defer.inlineCallbacks
    def write_then_check(self, encryption: fc.ClientEncryption | None, prefix: str) -> Any:
        write = fc.FuzzyCommand(4, fc.Command.WRITE, 11, STORED_DIGEST, flag=3, value=7)
        accepted = yield self.exchange(write, encryption, f"{prefix}-write-reply.bin")
        self.assertEqual((accepted.tag, accepted.prob, accepted.flag), (11, 1.0, 3))
        check = fc.FuzzyCommand(4, fc.Command.CHECK, 12, STORED_DIGEST)
        for _attempt in range(40):  # the storage flushes writes every `sync` (1 s)
            found = yield self.exchange(check, encryption, f"{prefix}-check-hit-reply.bin")
            if found.prob > 0.5:
                return found
            yield task.deferLater(reactor, 0.25, lambda: None)
        self.fail("the written digest was never found")

    @defer.inlineCallbacks
    def test_plain_write_then_check(self) -> Any:
        """A plaintext WRITE is stored and a CHECK then reports value 7, flag 3, prob 1."""
        yield self.start()
        found = yield self.write_then_check(None, "storage-plain")
        self.assertEqual((found.value, found.flag, found.tag, found.prob), (7, 3, 12, 1.0))
        self.assertEqual((found.digest, found.ts), (STORED_DIGEST, 0))

    @defer.inlineCallbacks
    def test_encrypted_write_then_check(self) -> Any:
        """Encrypted requests to the storage's keypair get encrypted replies we decrypt."""
        yield self.start()
        encryption = fc.ClientEncryption(SERVER_KEYPAIR.public_key, CLIENT_KEYPAIR)
        found = yield self.write_then_check(encryption, "storage-encrypted")
        self.assertEqual((found.value, found.flag, found.tag, found.prob), (7, 3, 12, 1.0))

    @defer.inlineCallbacks
    def test_version3_reply_is_16_bytes(self) -> Any:
        """Rspamd answers a version 3 command with the 16-byte v1 reply."""
        yield self.start()
        command = fc.FuzzyCommand(3, fc.Command.CHECK, 21, bytes(64))
        raw = yield self.client.ask(fc.encode_request(command), 21, self.port)
        self.assertEqual(len(raw), 16)
        self.assertEqual(fc.decode_reply(raw).tag, 21)

    @defer.inlineCallbacks
    def test_stat_reply(self) -> Any:
        """STAT is answered with prob 1.0 in a 96-byte reply."""
        yield self.start()
        command = fc.FuzzyCommand(4, fc.Command.STAT, 31, bytes(64))
        raw = yield self.client.ask(fc.encode_request(command), 31, self.port)
        self.assertEqual(len(raw), 96)
        self.assertEqual(fc.decode_reply(raw).prob, 1.0)
