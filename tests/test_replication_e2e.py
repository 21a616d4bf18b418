"""Replication end to end on loopback: one master, two slaves, real TCP, real backends.

Everything runs in-process on the test reactor; the storages use SQLite files
in temporary directories, or real redis-servers (one per storage).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.task import deferLater
from twisted.trial import unittest

from rspamd_tx.fuzzy import replication as rp
from rspamd_tx.fuzzy.backend import IFuzzyBackend, Update, UpdateKind
from rspamd_tx.fuzzy.sqlite_backend import SqliteFuzzyBackend
from rspamd_tx.fuzzy.update_queue import SPOOL_NAME, UpdateQueue
from rspamd_tx.protocols.keypair import Keypair
from tests.peers.redis import skip_unless_redis, start_redis

reactor: Any = _reactor
MASTER_KEYPAIR = Keypair.generate()
LOOPBACK = "127.0.0.1"

BackendFactory = Callable[[str], Deferred[IFuzzyBackend]]


def learned(n: int, value: int = 1) -> Update:
    digest = hashlib.blake2b(f"message {n}".encode()).digest()
    return Update(UpdateKind.ADD, digest, 1, value, tuple(range(n, n + 32)))


@inlineCallbacks
def poll(condition: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> Any:
    """Fire once ``condition()`` (a bool or a Deferred of one) is true; fail after ``timeout``."""
    waited = 0.0
    while True:
        if (yield condition()):
            return None
        if waited >= timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        yield deferLater(reactor, interval, lambda: None)
        waited += interval


@inlineCallbacks
def sqlite_backend(directory: str) -> Any:
    backend = SqliteFuzzyBackend(os.path.join(directory, "fuzzy.db"), reactor=reactor)
    yield backend.start()
    return backend


def redis_backend(address: str) -> BackendFactory:
    def make(directory: str) -> Deferred[IFuzzyBackend]:
        from rspamd_tx.fuzzy.redis_backend import RedisFuzzyBackend

        return succeed(RedisFuzzyBackend(reactor=reactor, clock=reactor, servers=address,
                                         timeout=1.0))
    return make


class SlaveStorage:
    """A slave storage's backend and replication listener, restartable on the same files."""

    def __init__(self, directory: str, make_backend: BackendFactory) -> None:
        self.directory = directory
        self.make_backend = make_backend
        os.makedirs(directory, exist_ok=True)
        self.backend: IFuzzyBackend | None = None
        self.slave: rp.ReplicationSlave | None = None
        self.port = 0

    @property
    def address(self) -> rp.SlaveAddress:
        return rp.SlaveAddress(LOOPBACK, self.port)

    @inlineCallbacks
    def start(self) -> Any:
        """Open the backend and listen for the master (the same port after a restart)."""
        self.backend = yield self.make_backend(self.directory)
        self.slave = rp.ReplicationSlave(
            self.backend, masters=(ipaddress.ip_network(LOOPBACK),),
            master_key=MASTER_KEYPAIR.public_key,
            state=rp.SlaveState(os.path.join(self.directory, "replication.state")),
            clock=reactor, reactor=reactor, bind_line=f"{LOOPBACK}:{self.port}",
            timeout=5.0, registry=CollectorRegistry())
        self.slave.startService()
        self.port = self.slave.ports[0].getHost().port

    @inlineCallbacks
    def stop(self) -> Any:
        if self.slave is not None and self.slave.running:
            yield self.slave.stopService()
        if self.backend is not None:
            backend, self.backend = self.backend, None
            yield backend.close()


class ReplicationSetup:
    """A master storage (backend + replication master) and two slave storages."""

    def __init__(self, test: unittest.TestCase, make_backend: Callable[[int], BackendFactory],
                 log_size: int = 1000) -> None:
        self.test = test
        self.log_size = log_size
        self.root = test.mktemp()
        self.make_backend = make_backend
        self.slaves = [SlaveStorage(os.path.join(self.root, f"slave{i}"), make_backend(i + 1))
                       for i in range(2)]
        self.backend: IFuzzyBackend | None = None
        self.master: rp.ReplicationMaster | None = None

    @inlineCallbacks
    def start(self) -> Any:
        for storage in self.slaves:
            yield storage.start()
            self.test.addCleanup(storage.stop)
        directory = os.path.join(self.root, "master")
        os.makedirs(directory)
        self.backend = yield self.make_backend(0)(directory)
        self.test.addCleanup(self.backend.close)
        self.master = rp.ReplicationMaster(
            MASTER_KEYPAIR, [storage.address for storage in self.slaves],
            rp.ReplicationLog(self.log_size, os.path.join(directory, "replication.log")),
            clock=reactor, connect=rp.hostname_endpoints(reactor, 5.0),
            scanner=self.backend if hasattr(self.backend, "scan") else None,
            timeout=5.0, initial_delay=0.05, max_delay=0.5, registry=CollectorRegistry())
        self.master.startService()
        self.test.addCleanup(self.master.stopService)

    @inlineCallbacks
    def write(self, *updates: Update) -> Any:
        """Store a batch on the master and hand it to replication, as a queue flush does."""
        assert self.backend is not None and self.master is not None
        revision = yield self.backend.apply(list(updates))
        self.master.publish(list(updates), revision)

    def converged(self) -> bool:
        """Whether every slave acknowledged the master's last revision."""
        assert self.master is not None
        head = self.master.log.head
        return all(link.connected and link.acked == head
                   for link in self.master.links.values())

    @inlineCallbacks
    def weights(self, backend: IFuzzyBackend, updates: Sequence[Update]) -> Any:
        """The stored weight of each digest of ``updates`` on ``backend`` (0 when missing)."""
        out = []
        for update in updates:
            result = yield backend.check(update.digest, None)
            out.append(result.value)
        return out


class SqliteReplicationTests(unittest.TestCase):
    """A master and two slaves with SQLite backends on loopback."""

    @inlineCallbacks
    def setUp(self) -> Any:
        self.setup = ReplicationSetup(self, lambda index: sqlite_backend, log_size=5)
        yield self.setup.start()

    @inlineCallbacks
    def counts(self) -> Any:
        """Stored hashes on the master, then on each slave."""
        counts = []
        for backend in [self.setup.backend] + [s.backend for s in self.setup.slaves]:
            assert backend is not None
            counts.append((yield backend.count()))
        return counts

    @inlineCallbacks
    def test_write_reaches_both_slaves(self) -> Any:
        """A hash learned on the master is found on both slaves with its weight and shingles."""
        update = learned(1, 7)
        yield self.setup.write(update)
        yield poll(self.setup.converged)
        for storage in self.setup.slaves:
            assert storage.backend is not None
            result = yield storage.backend.check(update.digest, None)
            self.assertEqual((result.value, result.flag, result.prob), (7, 1, 1.0))
            shingle_hit = yield storage.backend.check(bytes(64), update.shingles)
            self.assertEqual(shingle_hit.digest, update.digest)

    @inlineCallbacks
    def test_restarted_slave_converges(self) -> Any:
        """A slave stopped while writes continue reaches the master's count after restart.

        It resumes from its saved revision: the master's log still covers it.
        """
        for n in range(5):
            yield self.setup.write(learned(n))
        yield poll(self.setup.converged)
        away = self.setup.slaves[1]
        assert self.setup.master is not None
        link = self.setup.master.links[str(away.address)]
        resyncs = link.resyncs
        yield away.stop()
        for n in range(5, 8):
            yield self.setup.write(learned(n), learned(n - 5, 2))
        yield self.setup.write(*[learned(n) for n in range(8, 25)],
                               *[learned(n, 2) for n in range(3, 20)])
        yield away.start()
        yield poll(self.setup.converged)
        counts = yield self.counts()
        self.assertEqual(counts, [25, 25, 25])
        self.assertEqual(link.resyncs, resyncs)
        assert away.backend is not None
        weights = yield self.setup.weights(away.backend, [learned(n) for n in range(25)])
        self.assertEqual(weights, [3] * 20 + [1] * 5)


    @inlineCallbacks
    def test_slave_beyond_log_resynced(self) -> Any:
        """A slave away for longer than the master's log is copied in full and converges.

        Hashes deleted on the master meanwhile disappear from it too.
        """
        for n in range(10):
            yield self.setup.write(learned(n))
        yield poll(self.setup.converged)
        away = self.setup.slaves[0]
        assert self.setup.master is not None
        link = self.setup.master.links[str(away.address)]
        resyncs = link.resyncs
        yield away.stop()
        for n in range(10, 30):
            yield self.setup.write(learned(n), learned(n - 10, 4))
        yield self.setup.write(*[Update(UpdateKind.DEL, learned(n).digest, 1) for n in range(5)])
        yield away.start()
        yield poll(self.setup.converged)
        self.assertEqual(link.resyncs, resyncs + 1)
        counts = yield self.counts()
        self.assertEqual(counts, [25, 25, 25])
        assert away.backend is not None
        weights = yield self.setup.weights(away.backend, [learned(n) for n in range(30)])
        self.assertEqual(weights, [0] * 5 + [5] * 15 + [1] * 10)


class RedisReplicationTests(unittest.TestCase):
    """A master and two slaves, each storage on its own real redis-server."""

    skip = skip_unless_redis()

    @inlineCallbacks
    def setUp(self) -> Any:
        self.redis = []
        for _ in range(3):
            peer = yield start_redis(reactor)
            self.addCleanup(peer.stop)
            self.redis.append(peer)
        self.setup = ReplicationSetup(self, lambda index: redis_backend(self.redis[index].address))
        yield self.setup.start()

    @inlineCallbacks
    def test_master_redis_killed_under_load(self) -> Any:
        """Redis of the master killed and restarted while hashes are learned: none is lost.

        The update queue keeps the updates while Redis is down and stores them
        once it is back; every stored batch is replicated, so both slaves end
        with every learned hash, and the master's (restarted, empty) Redis
        with every hash learned from the kill on.
        """
        assert self.setup.backend is not None and self.setup.master is not None
        queue = UpdateQueue(self.setup.backend, clock=reactor, sync=0.05,
                            spool_path=os.path.join(self.setup.root, "master", SPOOL_NAME),
                            retry_initial=0.05, retry_max=0.5)
        queue.add_flush_hook(self.setup.master.publish)
        queue.startService()
        self.addCleanup(queue.stopService)
        updates = [learned(n) for n in range(160)]
        killed_at, restarted_at = 30, 130
        kept_while_down = 0
        for index, update in enumerate(updates):
            if index == killed_at:
                yield self.redis[0].kill()
            if index == restarted_at:
                kept_while_down = queue.depth
                yield self.redis[0].start()
            queue.push(update)
            yield deferLater(reactor, 0.02, lambda: None)
        self.assertGreaterEqual(kept_while_down, restarted_at - killed_at)
        yield poll(lambda: queue.depth == 0 and self.setup.converged(), timeout=30.0)
        for storage in self.setup.slaves:
            assert storage.backend is not None
            weights = yield self.setup.weights(storage.backend, updates)
            self.assertEqual(weights, [1] * len(updates))
        weights = yield self.setup.weights(self.setup.backend, updates[killed_at:])
        self.assertEqual(weights, [1] * (len(updates) - killed_at))

    @inlineCallbacks
    def test_write_reaches_both_slaves(self) -> Any:
        """Batches learned on the master's Redis are found in both slaves' Redis."""
        updates = [learned(n, n + 1) for n in range(10)]
        for update in updates:
            yield self.setup.write(update)
        yield poll(self.setup.converged)
        for storage in self.setup.slaves:
            assert storage.backend is not None
            weights = yield self.setup.weights(storage.backend, updates)
            self.assertEqual(weights, [n + 1 for n in range(10)])


@inlineCallbacks
def scanned(backend: Any) -> Any:
    """Every hash ``backend.scan`` lists, as ``(digest, flag, weight)`` in digest order."""
    hashes: list[tuple[bytes, int, int]] = []
    cursor = None
    while True:
        page = yield backend.scan(cursor, 100)
        if not page:
            return hashes
        hashes += [(update.digest, update.flag, update.value) for update in page]
        cursor = page[-1].digest


class RedisResyncTests(unittest.TestCase):
    """A master on Redis whose log is too short for a slave that was away; slaves on Redis."""

    skip = skip_unless_redis()

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        self.redis = []
        for _ in range(3):
            peer = yield start_redis(reactor)
            self.addCleanup(peer.stop)
            self.redis.append(peer)
        self.setup = ReplicationSetup(self, lambda index: redis_backend(self.redis[index].address),
                                      log_size=5)
        yield self.setup.start()

    @inlineCallbacks
    def test_slave_beyond_log_resynced_from_redis(self) -> Any:
        """A slave away for longer than the log is copied in full from the master's Redis.

        The copy is read in pages of 7 hashes; hashes deleted on the master
        meanwhile are pruned from the slave's Redis, so both slaves end with
        exactly the master's hashes, flags and weights.
        """
        for n in range(10):
            yield self.setup.write(learned(n))
        yield poll(self.setup.converged)
        away = self.setup.slaves[0]
        assert self.setup.master is not None and self.setup.backend is not None
        self.setup.master.resync_chunk = 7
        link = self.setup.master.links[str(away.address)]
        resyncs = link.resyncs
        yield away.stop()
        for n in range(10, 30):
            yield self.setup.write(learned(n), learned(n - 10, 4))
        yield self.setup.write(*[Update(UpdateKind.DEL, learned(n).digest, 1) for n in range(5)])
        yield away.start()
        yield poll(self.setup.converged)
        self.assertEqual(link.resyncs, resyncs + 1)
        assert away.backend is not None
        weights = yield self.setup.weights(away.backend, [learned(n) for n in range(30)])
        self.assertEqual(weights, [0] * 5 + [5] * 15 + [1] * 10)
        on_master = yield scanned(self.setup.backend)
        self.assertEqual(len(on_master), 25)
        for storage in self.setup.slaves:
            on_slave = yield scanned(storage.backend)
            self.assertEqual(on_slave, on_master)
