"""Interoperability of our fuzzy storage with real Rspamd 3.4 clients.

Our storage runs in-process (sqlite in a temporary directory, short
``sync``) on a free loopback port; a real Rspamd normal worker and controller
get a ``fuzzy_check`` rule pointing at it.  ``rspamc fuzzy_add``/``fuzzy_del``
through the controller learn and unlearn a message, ``rspamc symbols``
through the normal worker must then show (or not show) the rule's symbol with
the score Rspamd derives from the stored weight.

Run inside a private network namespace, as CI does::

    unshare -n sh -c 'ip link set lo up && .venv/bin/trial tests.test_fuzzy_interop'
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

from twisted.internet import defer, task
from twisted.trial import unittest

from rspamd_tx.config.bind import parse_bind_lines
from rspamd_tx.fuzzy.server import FuzzyWorker, build_worker
from rspamd_tx.fuzzy.storage import key_label
from rspamd_tx.protocols.keypair import Keypair
from rspamd_tx.runtime import WorkerService, bound_sockets
from tests.peers.rspamd import RspamdPeer, rspamc, skip_unless_rspamd, start_rspamd
from tests.test_fuzzy_worker import fuzzy_config, keypair_ucl, listening_port, reactor

WORDS = " ".join(f"interoperability{i:02d}x saladword{i}q" for i in range(60))
MESSAGE = f"""\
From: sender@example.com
To: rcpt@example.com
Subject: fuzzy interop
Message-ID: <interop-1@example.com>
Date: Mon, 23 Nov 2026 12:00:00 +0000
MIME-Version: 1.0
Content-Type: text/plain; charset=utf-8

{WORDS}
""".encode()

DENIED_SCORE = 12.0
"""Score of FUZZY_DENIED in Rspamd's shipped ``scores.d/fuzzy_group.conf``."""
MAX_SCORE = 20.0
WEIGHT = 10
SYMBOL_LINE = re.compile(rb"Symbol: FUZZY_DENIED \((?P<score>[0-9.]+)\)\[(?P<options>[^\]]*)\]")


def rule(port: int, extra: str = "") -> str:
    """An ``override.d/fuzzy_check.conf`` with one learnable rule at our storage."""
    return f"""
rule "rspamd-tx" {{
  servers = "127.0.0.1:{port}";
  symbol = "FUZZY_UNKNOWN";
  max_score = {MAX_SCORE};
  read_only = false;
  skip_unknown = true;
  timeout = 2s;
  retransmits = 1;
  {extra}
  fuzzy_map = {{
    FUZZY_DENIED {{ max_score = {MAX_SCORE}; flag = 1; }}
  }}
}}
"""


class RealClientTests(unittest.TestCase):
    """``rspamc`` through a real Rspamd 3.4 against our storage."""

    skip = skip_unless_rspamd()
    timeout = 300

    @defer.inlineCallbacks
    def start_storage(self, options: str) -> Any:
        """Run our storage with ``options``; fires with its port."""
        dbdir = os.path.abspath(self.mktemp())
        os.makedirs(dbdir)
        config, worker = fuzzy_config(
            f'bind_socket = "127.0.0.1:0"; dbdir = "{dbdir}"; sync = 0.2s; {options}')
        service = WorkerService(config, worker, build_worker, reactor,
                                bound_sockets(parse_bind_lines(worker.common.bind_socket)))
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        builder = service.builder
        assert isinstance(builder, FuzzyWorker)
        started = yield builder.lifecycle.ready
        self.assertTrue(started)
        self.storage = builder
        return listening_port(service)

    @defer.inlineCallbacks
    def start_peer(self, port: int, extra: str = "") -> Any:
        peer: RspamdPeer = yield start_rspamd(
            reactor, workers=("normal", "controller"),
            override={"fuzzy_check.conf": rule(port, extra)})
        self.addCleanup(peer.stop)
        self.message = os.path.abspath(self.mktemp())
        with open(self.message, "wb") as handle:
            handle.write(MESSAGE)
        return peer

    @defer.inlineCallbacks
    def wait_stored(self, count: int) -> Any:
        """Poll our backend (bounded) until it holds ``count`` hashes."""
        for _ in range(100):
            stored = yield self.storage.backend.count()
            if stored == count and self.storage.queue.depth == 0:
                return
            yield task.deferLater(reactor, 0.1, lambda: None)
        self.fail(f"the storage holds {stored} hashes, not {count}")

    @defer.inlineCallbacks
    def fuzzy_symbol(self, peer: RspamdPeer) -> Any:
        """``rspamc symbols`` of the message: the FUZZY_DENIED match, or None."""
        code, out, err = yield rspamc(
            reactor, ["-t", "20", "-h", peer.address("normal"), "symbols", self.message])
        self.assertEqual(code, 0, err)
        return SYMBOL_LINE.search(out)

    @defer.inlineCallbacks
    def learn(self, peer: RspamdPeer, action: str) -> Any:
        code, out, err = yield rspamc(
            reactor, ["-t", "20", "-h", peer.address("controller"), action,
                      "-f", "1", "-w", str(WEIGHT), self.message])
        return code, out + err

    def assert_denied(self, match: Any) -> None:
        """The symbol carries flag 1, prob 1.00 and the score of weight 10."""
        self.assertIsNotNone(match, "FUZZY_DENIED missing")
        expected = DENIED_SCORE * math.tanh(math.e * WEIGHT / MAX_SCORE)
        self.assertAlmostEqual(float(match.group("score")), expected, places=2)
        self.assertRegex(match.group("options"), rb"^1:[0-9a-f]{10}:1\.00:txt$")

    @defer.inlineCallbacks
    def test_learn_check_unlearn(self) -> Any:
        """fuzzy_add makes the message hit with the stored weight; fuzzy_del removes it."""
        port = yield self.start_storage('allow_update = "127.0.0.1";')
        peer = yield self.start_peer(port)
        self.assertIsNone((yield self.fuzzy_symbol(peer)))
        code, out = yield self.learn(peer, "fuzzy_add")
        self.assertEqual(code, 0, out)
        self.assertIn(b"success = true", out)
        yield self.wait_stored(1)
        self.assert_denied((yield self.fuzzy_symbol(peer)))
        code, out = yield self.learn(peer, "fuzzy_del")
        self.assertEqual(code, 0, out)
        yield self.wait_stored(0)
        self.assertIsNone((yield self.fuzzy_symbol(peer)))

    @defer.inlineCallbacks
    def test_write_outside_allow_update_refused(self) -> Any:
        """A learn from an address outside ``allow_update`` is refused with 403 and not stored."""
        port = yield self.start_storage('allow_update = "127.0.0.2";')
        peer = yield self.start_peer(port)
        code, out = yield self.learn(peer, "fuzzy_add")
        self.assertNotIn(b"success = true", out)
        self.assertIn(b"403", out)
        stats = self.storage.statistics()
        self.assertGreaterEqual(stats["keys"]["unkeyed"]["ips"]["127.0.0.1"]["errors"], 1)
        self.assertEqual(self.storage.queue.depth, 0)
        yield self.wait_stored(0)
        self.assertIsNone((yield self.fuzzy_symbol(peer)))

    @defer.inlineCallbacks
    def learn_and_check_encrypted(self, keypair: Keypair, storage_options: str) -> Any:
        """Learn and check through a rule whose ``encryption_key`` is ``keypair``'s, against
        a storage refusing plaintext; fires with the storage's per-key statistics."""
        port = yield self.start_storage(
            f'allow_update = "127.0.0.1"; encrypted_only = true; {storage_options}')
        peer = yield self.start_peer(port, f'encryption_key = "{keypair.public.encode()}";')
        code, out = yield self.learn(peer, "fuzzy_add")
        self.assertEqual(code, 0, out)
        yield self.wait_stored(1)
        self.assert_denied((yield self.fuzzy_symbol(peer)))
        return self.storage.statistics()["keys"]

    @defer.inlineCallbacks
    def test_encrypted(self) -> Any:
        """With our keypair as the rule's ``encryption_key`` learning and checking work
        while the storage refuses plaintext."""
        keypair = Keypair.generate()
        keys = yield self.learn_and_check_encrypted(keypair, keypair_ucl(keypair))
        self.assertNotIn("unkeyed", keys)
        self.assertGreaterEqual(sum(k["matched"] for k in keys.values()), 1)

    @defer.inlineCallbacks
    def test_encrypted_with_dynamic_key(self) -> Any:
        """A storage with no ``keypair`` of its own serves a key from ``dynamic_keys_map``:
        learning and checking through it work with that key as the rule's ``encryption_key``."""
        keypair = Keypair.generate()
        key_map = os.path.abspath(self.mktemp())
        with open(key_map, "w", encoding="utf-8") as handle:
            handle.write(f"[ {{ {keypair_ucl(keypair)} }} ]\n")
        keys = yield self.learn_and_check_encrypted(keypair, f'dynamic_keys_map = "{key_map}";')
        self.assertEqual(list(keys), [key_label(keypair)])
