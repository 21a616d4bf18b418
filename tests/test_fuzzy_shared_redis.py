"""Our fuzzy storage and Rspamd 3.4's own sharing one real redis-server.

Rspamd's storage (worker ``fuzzy``, ``backend = redis``) and ours (in-process,
``backend = redis``) point at the same Redis with the default prefix.  Hashes
are learned with WRITE datagrams sent to one storage (our codec acting as the
client) and looked up with CHECK datagrams at the other.  Rspamd 3.4 has no
PING: only WRITE, DEL and CHECK are sent to it.

Run inside a private network namespace, as CI does::

    unshare -n sh -c 'ip link set lo up && .venv/bin/trial tests.test_fuzzy_shared_redis'
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer, task
from twisted.trial import unittest

from rspamd_tx.config.bind import parse_bind_lines
from rspamd_tx.fuzzy.server import FuzzyWorker, build_worker
from rspamd_tx.protocols.fuzzy_codec import Command, FuzzyReply
from rspamd_tx.runtime import WorkerService, bound_sockets
from tests.peers.redis import RedisPeer, skip_unless_redis, start_redis
from tests.peers.rspamd import RspamdPeer, skip_unless_rspamd, start_rspamd
from tests.test_fuzzy_worker import command, fuzzy_config, listening_port, reactor, udp_exchange

SHINGLES = tuple((i * 0x9E3779B97F4A7C15 + 12345) % 2**64 for i in range(32))
SYNC = 1.0
"""Flush period of Rspamd's storage (it waits 1 to 1.5 × this)."""


class SharedRedisTests(unittest.TestCase):
    """A hash learned through either storage is found through the other."""

    skip = skip_unless_redis() or skip_unless_rspamd()
    timeout = 180

    @defer.inlineCallbacks
    def start(self) -> Any:
        """Start Redis, Rspamd's storage and ours on it."""
        self.redis: RedisPeer = yield start_redis(reactor)
        self.addCleanup(self.redis.stop)
        self.rspamd: RspamdPeer = yield start_rspamd(
            reactor, workers=("fuzzy",),
            worker_options={"fuzzy": (
                f'backend = "redis"; servers = "{self.redis.address}"; '
                f'allow_update = ["127.0.0.1"]; sync = {SYNC}s; expire = 1d;')})
        self.addCleanup(self.rspamd.stop)
        dbdir = os.path.abspath(self.mktemp())
        os.makedirs(dbdir)
        config, worker = fuzzy_config(
            f'bind_socket = "127.0.0.1:0"; dbdir = "{dbdir}"; backend = "redis"; '
            f'servers = "{self.redis.address}"; allow_update = "127.0.0.1"; '
            f'sync = 0.2s; expire = 1d;')
        service = WorkerService(config, worker, build_worker, reactor,
                                bound_sockets(parse_bind_lines(worker.common.bind_socket)))
        service.startService()
        self.addCleanup(service.stopService)
        assert isinstance(service.builder, FuzzyWorker)
        self.ours = service.builder
        started = yield self.ours.lifecycle.ready
        self.assertTrue(started)
        self.our_port = listening_port(service)
        self.their_port = self.rspamd.ports["fuzzy"]

    @defer.inlineCallbacks
    def check_until_found(self, port: int, digest: bytes, **fields: Any) -> Any:
        """CHECK at ``port`` (bounded polling) until it hits; fires with the reply."""
        reply: FuzzyReply | None = None
        for _ in range(100):
            reply = yield udp_exchange(port, command(digest=digest, **fields))
            if reply.prob > 0.5:
                return reply
            yield task.deferLater(reactor, 0.1, lambda: None)
        self.fail(f"not found at port {port}: {reply}")

    @defer.inlineCallbacks
    def test_ours_to_theirs(self) -> Any:
        """A shingle WRITE stored by us is found by Rspamd, exactly and by shingles."""
        yield self.start()
        digest = bytes(range(64))
        ack = yield udp_exchange(self.our_port, command(Command.WRITE, digest=digest, flag=1,
                                                        value=7, shingles=SHINGLES))
        self.assertEqual(ack.prob, 1.0)
        yield self.ours.drain()
        exact = yield self.check_until_found(self.their_port, digest)
        self.assertEqual((exact.value, exact.flag, exact.prob), (7, 1, 1.0))
        other = bytes(range(100, 164))
        fuzzy = yield self.check_until_found(self.their_port, other, shingles=SHINGLES)
        self.assertEqual((fuzzy.value, fuzzy.digest, fuzzy.prob), (7, digest, 31 / 32))

    @defer.inlineCallbacks
    def test_theirs_to_ours(self) -> Any:
        """A WRITE stored by Rspamd is found by us with the same weight, flag and time."""
        yield self.start()
        digest = bytes(range(1, 65))
        ack = yield udp_exchange(self.their_port, command(Command.WRITE, digest=digest, flag=2,
                                                          value=5, shingles=SHINGLES))
        self.assertEqual(ack.prob, 1.0)
        ours = yield self.check_until_found(self.our_port, digest)
        theirs = yield udp_exchange(self.their_port, command(digest=digest))
        self.assertEqual((ours.value, ours.flag, ours.prob), (5, 2, 1.0))
        self.assertEqual(ours.ts, theirs.ts)
        shingle_hit = yield self.check_until_found(self.our_port, bytes(64), shingles=SHINGLES)
        self.assertEqual((shingle_hit.digest, shingle_hit.prob), (digest, 31 / 32))

    @defer.inlineCallbacks
    def test_learn_through_both_adds_up(self) -> Any:
        """Learning the same hash through both storages sums the weights, as Rspamd does."""
        yield self.start()
        digest = bytes(range(2, 66))
        write = command(Command.WRITE, digest=digest, flag=1, value=3)
        yield udp_exchange(self.their_port, write)
        yield self.check_until_found(self.our_port, digest)
        yield udp_exchange(self.our_port, write)
        yield self.ours.drain()
        theirs = yield udp_exchange(self.their_port, command(digest=digest))
        self.assertEqual(theirs.value, 6)

    @defer.inlineCallbacks
    def test_delete_through_ours(self) -> Any:
        """A DEL stored by us removes a hash Rspamd learned."""
        yield self.start()
        digest = bytes(range(3, 67))
        yield udp_exchange(self.their_port, command(Command.WRITE, digest=digest, flag=1,
                                                    value=1))
        yield self.check_until_found(self.our_port, digest)
        yield udp_exchange(self.our_port, command(Command.DEL, digest=digest, flag=1))
        yield self.ours.drain()
        theirs = yield udp_exchange(self.their_port, command(digest=digest))
        self.assertEqual((theirs.value, theirs.prob), (0, 0.0))
