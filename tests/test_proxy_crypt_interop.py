"""Interop: our proxy (HTTP mode, in-process) encrypting and compressing to real Rspamd 3.4 scanners.

The default upstream block has ``key`` = the public key of a keypair we gave a
real normal worker and ``compression = yes``; a mirror block points at a
second real normal worker (its own keypair, compressed too) and a compare
script logs what master and mirror answered.  Loopback upstreams are local,
which turns compression off (spec §4.3), so these tests treat them as remote
(``RequestSender.is_local``) to exercise compression against the real
scanners.  The peers have different configs, so tests/peers/rspamd.py gives
each its own hyperscan cache subdirectory.  Run inside ``unshare -n`` as CI does.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from rspamd_tx.config import ucl
from rspamd_tx.config.tree import UclObject
from rspamd_tx.config.workers import check_config
from rspamd_tx.protocols import compression
from rspamd_tx.protocols.keypair import Keypair, PublicKey
from rspamd_tx.proxy import upstream_scanner
from rspamd_tx.proxy.server import ProxyWorker, build_worker

from tests.peers.rspamd import RspamdPeer, rspamc, skip_unless_rspamd, start_rspamd

GTUBE = (
    b"From: spammer@example.com\r\nTo: victim@example.org\r\nSubject: test\r\n"
    b"Message-ID: <gtube-crypt@example.com>\r\n\r\n"
    b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X\r\n"
)

COMPARE_SCRIPT = """
return function(results, log_tag)
  local log = require "rspamd_logger"
  local mirror = results.second
  if type(mirror) == 'table' then
    log.infox("compare %1: master=%2 mirror=%3", log_tag, results.master.action, mirror.action)
  else
    log.infox("compare %1: master=%2 mirror error=%3", log_tag, results.master.action, mirror)
  end
end
"""


def public(keypair: Keypair) -> str:
    return PublicKey(keypair.public_key).encode()


class CryptInteropTests(unittest.TestCase):
    """Encrypted, compressed upstream and mirror against real Rspamd normal workers."""

    skip = skip_unless_rspamd()
    timeout = 300

    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.compressed: list[int] = []

        def counting_compress(body: bytes, level: int = compression.DEFAULT_LEVEL) -> bytes:
            self.compressed.append(len(body))
            return compression.compress(body, level)

        self.patch(upstream_scanner, "compress", counting_compress)

    @inlineCallbacks
    def start_peer(self, keypair: Keypair) -> Any:
        peer: RspamdPeer = yield start_rspamd(
            reactor, workers=("normal",), worker_options={"normal": keypair.to_ucl()},
            wait_hyperscan=False,
        )
        self.addCleanup(peer.stop)
        return peer

    @inlineCallbacks
    def start(self, mirror: bool) -> Any:
        """Start the scanner(s) and our proxy; return (master peer, mirror peer or None, proxy port)."""
        master_keys, mirror_keys = Keypair.generate(), Keypair.generate()
        starting = [self.start_peer(master_keys)]
        if mirror:
            starting.append(self.start_peer(mirror_keys))
        started = yield DeferredList(starting, fireOnOneErrback=True, consumeErrors=True)
        peers = [peer for _, peer in started]
        extra = ""
        if mirror:
            extra = (
                f'mirror {{ second {{ hosts = "{peers[1].address("normal")}";'
                f' key = "{public(mirror_keys)}"; compression = yes; }} }}'
                f"script =<<EOD\n{COMPARE_SCRIPT}\nEOD;\n"
            )
        text = (
            'worker "rspamd_proxy" { milter = no; timeout = 20s;'
            f' upstream {{ scan {{ default = yes; hosts = "{peers[0].address("normal")}";'
            f' key = "{public(master_keys)}"; compression = yes; }} }} {extra} }}'
        )
        config, diagnostics = check_config(UclObject(ucl.loads(text)))
        errors = [d for d in diagnostics if d.severity == "error"]
        self.assertEqual(errors, [])
        builder: ProxyWorker = build_worker(config, config.workers[0], reactor)
        builder.scanner.sender.is_local = lambda address: False
        for service in builder.services():
            service.startService()
            self.addCleanup(service.stopService)
        port = reactor.listenTCP(0, builder.stream_factory(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return peers[0], peers[1] if mirror else None, port.getHost().port

    @inlineCallbacks
    def rspamc_gtube(self, port: int) -> Any:
        handle, path = tempfile.mkstemp(suffix=".eml")
        os.write(handle, GTUBE)
        os.close(handle)
        self.addCleanup(os.unlink, path)
        code, out, err = yield rspamc(
            reactor, ["-h", f"127.0.0.1:{port}", "-t", "30", "-i", "192.0.2.1", "--json", "symbols", path]
        )
        self.assertEqual(code, 0, err)
        return json.loads(out)

    @inlineCallbacks
    def wait_for(self, condition: Any, what: str, bound: float = 30.0) -> Any:
        """Poll ``condition()`` every 0.2 s until true, at most ``bound`` seconds."""
        for _ in range(int(bound / 0.2)):
            if condition():
                return
            yield task.deferLater(reactor, 0.2, lambda: None)
        self.fail(f"timed out waiting for {what}")

    def log_lines(self) -> list[str]:
        return [formatEvent(event) for event in self.events]

    @inlineCallbacks
    def test_encrypted_compressed_upstream(self) -> Any:
        """rspamc through our proxy, encrypting and compressing to the scanner, gets GTUBE reject."""
        peer, _, port = yield self.start(mirror=False)
        result = yield self.rspamc_gtube(port)
        self.assertEqual(result["action"], "reject")
        self.assertIn("GTUBE", result["symbols"])
        self.assertEqual(self.compressed, [len(GTUBE)])
        self.assertIn("<gtube-crypt@example.com>", peer.read_log())

    @inlineCallbacks
    def test_mirror_receives_copy(self) -> Any:
        """The mirror (another real scanner, encrypted and compressed) scans the copy;
        the compare script logs both verdicts; the client gets the master's."""
        master, mirror, port = yield self.start(mirror=True)
        assert mirror is not None
        result = yield self.rspamc_gtube(port)
        self.assertEqual(result["action"], "reject")
        yield self.wait_for(
            lambda: any("compare" in line and "mirror=" in line for line in self.log_lines()),
            "the compare script",
        )
        [line] = [line for line in self.log_lines() if line.startswith("compare ")]
        self.assertTrue(line.endswith("master=reject mirror=reject"), line)
        self.assertIn("<gtube-crypt@example.com>", mirror.read_log())
        self.assertIn("<gtube-crypt@example.com>", master.read_log())
        self.assertEqual(len(self.compressed), 2)
