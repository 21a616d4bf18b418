"""Fuzzy storage replication: master and slaves over in-memory transports with a task.Clock."""

from __future__ import annotations

import hashlib
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.test import iosim
from twisted.trial import unittest
from zope.interface import implementer

from rspamd_tx.config import ucl
from rspamd_tx.config.schema import HostRef, MapRef
from rspamd_tx.config.tree import ConfigError, Location, UclObject
from rspamd_tx.config.workers import FuzzyOptions, check_config
from rspamd_tx.fuzzy import replication as rp
from rspamd_tx.fuzzy.backend import (
    MISS,
    BackendUnavailable,
    CheckResult,
    IFuzzyBackend,
    Update,
    UpdateKind,
)
from rspamd_tx.fuzzy.update_queue import UpdateQueue
from rspamd_tx.protocols import replication_codec as rc
from rspamd_tx.protocols.keypair import Keypair

MASTER_IP = "192.0.2.1"
MASTER_KEYPAIR = Keypair.from_secret(bytes(range(1, 33)))
OTHER_KEYPAIR = Keypair.from_secret(bytes(range(2, 34)))
SEEDS = os.path.join(os.path.dirname(__file__), "data", "seeds")


def digest(n: int) -> bytes:
    return hashlib.blake2b(str(n).encode()).digest()


def add(n: int, value: int = 1, flag: int = 1, shingles: bool = False) -> Update:
    return Update(UpdateKind.ADD, digest(n), flag, value,
                  tuple(range(n, n + 32)) if shingles else None)


@implementer(IFuzzyBackend, rp.IHashScanner)
class MemoryBackend:
    """An in-memory backend with switchable failures and held (slow) writes."""

    lifetime = 1000.0

    def __init__(self) -> None:
        self.hashes: dict[bytes, tuple[int, int, tuple[int, ...] | None]] = {}
        self.batches: list[list[Update]] = []
        self.sources: list[str] = []
        self.down = False
        self.hold = False
        self.held: list[tuple[Deferred[int], list[Update], str]] = []

    def _store(self, updates: list[Update], source: str) -> int:
        for update in updates:
            if update.kind is UpdateKind.ADD:
                old = self.hashes.get(update.digest)
                if old is not None and old[0] == update.flag:
                    self.hashes[update.digest] = (old[0], old[1] + update.value, old[2])
                else:
                    self.hashes[update.digest] = (update.flag, update.value, update.shingles)
            elif update.kind is UpdateKind.DEL:
                self.hashes.pop(update.digest, None)
        self.batches.append(updates)
        self.sources.append(source)
        return len(self.batches)

    def apply(self, updates: Sequence[Update], source: str = "local") -> Deferred[int]:
        if self.down:
            return fail(BackendUnavailable("down"))
        if self.hold:
            d: Deferred[int] = Deferred()
            self.held.append((d, list(updates), source))
            return d
        return succeed(self._store(list(updates), source))

    def release(self) -> None:
        self.hold = False
        held, self.held = self.held, []
        for d, updates, source in held:
            d.callback(self._store(updates, source))

    def scan(self, after: bytes | None, limit: int) -> Deferred[list[Update]]:
        keys = sorted(k for k in self.hashes if after is None or k > after)[:limit]
        return succeed([Update(UpdateKind.ADD, k, self.hashes[k][0], self.hashes[k][1],
                               self.hashes[k][2]) for k in keys])

    def check(self, digest: bytes, shingles: Any) -> Deferred[CheckResult]:
        found = self.hashes.get(digest)
        if found is None:
            return succeed(MISS)
        return succeed(CheckResult(value=found[1], flag=found[0], prob=1.0, digest=digest))

    def count(self) -> Deferred[int]:
        return succeed(len(self.hashes))

    def version(self, source: str) -> Deferred[int]:
        return succeed(self.sources.count(source))

    def expire(self, now: float) -> Deferred[int]:
        return succeed(0)

    def close(self) -> Deferred[None]:
        return succeed(None)


@implementer(IStreamClientEndpoint)
class _Endpoint:
    def __init__(self, network: Network, address: rp.SlaveAddress) -> None:
        self.network = network
        self.address = address

    def connect(self, factory: Factory) -> Deferred[Any]:
        return self.network.connect(self.address, factory)


class Network:
    """Connects masters to slaves by address through iosim pumps on one clock."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.slaves: dict[str, rp.ReplicationSlave] = {}
        self.pumps: list[iosim.IOPump] = []
        self.source = MASTER_IP
        self.attempts = 0

    def endpoint(self, address: rp.SlaveAddress) -> IStreamClientEndpoint:
        return _Endpoint(self, address)

    def connect(self, address: rp.SlaveAddress, factory: Factory) -> Deferred[Any]:
        self.attempts += 1
        slave = self.slaves.get(str(address))
        if slave is None:
            return fail(ConnectionRefusedError())
        master_address = IPv4Address("TCP", self.source, 40000 + self.attempts)
        slave_address = IPv4Address("TCP", address.host, address.port)
        client = factory.buildProtocol(slave_address)
        server = slave.factory.buildProtocol(master_address)
        client_transport = iosim.FakeTransport(client, False, master_address, slave_address)
        server_transport = iosim.FakeTransport(server, True, slave_address, master_address)
        self.pumps.append(iosim.connect(server, server_transport, client, client_transport,
                                        greet=False, clock=self.clock))
        return succeed(client)

    def flush(self) -> None:
        moved = True
        while moved:
            moved = False
            for pump in list(self.pumps):
                if pump.flush():
                    moved = True
            self.pumps = [pump for pump in self.pumps
                          if not (pump.clientIO.disconnected and pump.serverIO.disconnected)]

    def cut(self) -> None:
        """Every connection breaks (both sides see it)."""
        for pump in self.pumps:
            pump.clientIO.loseConnection()
        self.flush()


class Harness:
    """One master and its slaves on a Network."""

    def __init__(self, test: unittest.TestCase, *, slaves: int = 1, capacity: int = 100,
                 scanner: bool = True, master_keypair: Keypair = MASTER_KEYPAIR,
                 timeout: float = 10.0, log_path: str | None = None) -> None:
        self.clock = Clock()
        self.network = Network(self.clock)
        self.master_backend = MemoryBackend()
        self.addresses = [rp.SlaveAddress(f"198.51.100.{i + 1}") for i in range(slaves)]
        self.registry = CollectorRegistry()
        self.log = rp.ReplicationLog(capacity, log_path, new_epoch=lambda: 77)
        self.master = rp.ReplicationMaster(
            master_keypair, self.addresses, self.log, clock=self.clock,
            connect=self.network.endpoint,
            scanner=self.master_backend if scanner else None, timeout=timeout,
            registry=self.registry, resync_chunk=3)
        self.backends: list[MemoryBackend] = []
        self.slaves: list[rp.ReplicationSlave] = []
        self.test = test
        for address in self.addresses:
            backend = MemoryBackend()
            slave = self.make_slave(backend)
            self.backends.append(backend)
            self.slaves.append(slave)
            self.network.slaves[str(address)] = slave
            slave.startService()
            test.addCleanup(self.stop_slave, slave)

    def make_slave(self, backend: MemoryBackend, *, masters: str = "192.0.2.0/24",
                   state: rp.SlaveState | None = None) -> rp.ReplicationSlave:
        counter = iter(range(1, 1 << 30))
        return rp.ReplicationSlave(
            backend, masters=(ipaddress.ip_network(masters),),
            master_key=MASTER_KEYPAIR.public_key,
            state=state if state is not None else rp.SlaveState(), clock=self.clock,
            timeout=10.0, random_bytes=lambda n: next(counter).to_bytes(n, "big"),
            registry=CollectorRegistry())

    def stop_slave(self, slave: rp.ReplicationSlave) -> Deferred[Any]:
        """Stop ``slave``; its connection closes (transports without a pump report it here)."""
        d = slave.stopService()
        self.network.flush()
        current = slave.current
        if current is not None:
            current.connectionLost(connectionDone)
        return d

    def start(self) -> None:
        self.master.startService()
        self.test.addCleanup(self.stop)
        self.network.flush()

    def stop(self) -> None:
        if self.master.running:
            self.master.stopService()
            self.network.flush()

    def write(self, *updates: Update) -> None:
        """What the update queue does: store on the master, then call the hook."""
        revision = self.master_backend._store(list(updates), "local")
        self.master.publish(list(updates), revision)
        self.network.flush()

    def metric(self, name: str, slave: int = 0) -> float | None:
        return self.registry.get_sample_value(name, {"slave": str(self.addresses[slave])})


def refused(slave: rp.ReplicationSlave, reason: str) -> float | None:
    """The slave's count of connections refused or dropped for ``reason``."""
    return slave.registry.get_sample_value("rspamd_tx_fuzzy_replication_refused_total",
                                           {"reason": reason})


class AddressTests(unittest.TestCase):
    """Reading slaves and masters entries."""

    def test_slave_addresses(self) -> None:
        """Hosts, host:port, bracketed IPv6 with a port, names and host networks are accepted."""
        cases = [
            (ipaddress.ip_network("10.195.171.142/32"), rp.SlaveAddress("10.195.171.142", 11336)),
            (ipaddress.ip_network("fdc1:d89e:b128:6a04::7de4/128"),
             rp.SlaveAddress("fdc1:d89e:b128:6a04::7de4", 11336)),
            (HostRef("slave.example.net"), rp.SlaveAddress("slave.example.net", 11336)),
            ("slave.example.net:7000", rp.SlaveAddress("slave.example.net", 7000)),
            ("10.0.0.1:7001", rp.SlaveAddress("10.0.0.1", 7001)),
            ("[::1]:7002", rp.SlaveAddress("::1", 7002)),
            ("[::1]", rp.SlaveAddress("::1", 11336)),
            ("fd00::5", rp.SlaveAddress("fd00::5", 11336)),
        ]
        for entry, expected in cases:
            self.assertEqual(rp.parse_slave_address(entry), expected, entry)

    def test_bad_slave_addresses(self) -> None:
        """Networks, maps, empty hosts and bad ports are configuration errors."""
        for entry in (ipaddress.ip_network("10.0.0.0/24"), MapRef("/etc/slaves"), ":11336",
                      "host:0", "host:port", "[::1]x"):
            self.assertRaises(ConfigError, rp.parse_slave_address, entry)

    def test_default_port(self) -> None:
        """The default port can be chosen by the caller."""
        self.assertEqual(rp.parse_slave_address("h", 9), rp.SlaveAddress("h", 9))
        self.assertEqual(str(rp.SlaveAddress("::1", 9)), "[::1]:9")

    def test_master_networks(self) -> None:
        """Host names in masters are resolved; maps are refused."""
        networks = rp.master_networks(
            (HostRef("master.example.net"), ipaddress.ip_network("10.0.0.0/8")),
            resolve=lambda name: ["192.0.2.7", "::ffff:192.0.2.8"])
        self.assertEqual(networks, (ipaddress.ip_network("192.0.2.7/32"),
                                    ipaddress.ip_network("192.0.2.8/32"),
                                    ipaddress.ip_network("10.0.0.0/8")))
        self.assertRaises(ConfigError, rp.master_networks, (MapRef("/m"),))


def fuzzy_options(text: str) -> FuzzyOptions:
    tree = UclObject()
    worker = UclObject()
    worker["fuzzy"] = ucl.loads(text, filename="fuzzy.inc")
    worker.locations["fuzzy"] = Location("rspamd.conf", 1, 1)
    tree["worker"] = worker
    config, diagnostics = check_config(tree)
    options = config.workers[0].options
    assert isinstance(options, FuzzyOptions)
    return options


KEYPAIR_UCL = MASTER_KEYPAIR.to_ucl()


class BuildTests(unittest.TestCase):
    """build_replication reads FuzzyOptions."""

    def test_seed_master_needs_a_keypair(self) -> None:
        """The master seed lists slaves; without any keypair replication cannot authenticate."""
        with open(os.path.join(SEEDS, "worker-fuzzy.inc"), encoding="utf-8") as handle:
            text = handle.read()
        self.assertRaises(ConfigError, rp.build_replication, fuzzy_options(text),
                          MemoryBackend(), None, Clock())

    def test_seed_master_with_keypair(self) -> None:
        """With a keypair the master seed gives a master streaming to both slaves."""
        with open(os.path.join(SEEDS, "worker-fuzzy.inc"), encoding="utf-8") as handle:
            text = handle.read() + KEYPAIR_UCL
        replication = rp.build_replication(fuzzy_options(text), MemoryBackend(), None,
                                           Clock())
        assert replication.master is not None
        self.assertIsNone(replication.slave)
        self.assertEqual(sorted(replication.master.links),
                         ["10.195.171.142:11336", "[fdc1:d89e:b128:6a04::7de4]:11336"])
        self.assertEqual(replication.master.keypair.public_key, MASTER_KEYPAIR.public_key)
        self.assertIsNotNone(replication.master.scanner)

    def test_seed_slave_accepts_nobody(self) -> None:
        """The slave seed's empty masters opens no replication listener at all."""
        with open(os.path.join(SEEDS, "worker-fuzzy-slave.inc"), encoding="utf-8") as handle:
            options = fuzzy_options(handle.read())
        replication = rp.build_replication(options, MemoryBackend(), None, Clock())
        self.assertEqual(replication.services(), [])
        self.assertFalse(rp.is_replication_slave(options))

    def test_master_subscribes_to_queue_flushes(self) -> None:
        """Every batch the update queue stores is logged by the master under a new revision."""
        clock = Clock()
        backend = MemoryBackend()
        directory = self.mktemp()
        os.makedirs(directory)
        options = fuzzy_options(KEYPAIR_UCL + f'slaves = "192.0.2.9";\ndbdir = "{directory}";\n')
        queue = UpdateQueue(backend, clock=clock, sync=1.0,
                            spool_path=os.path.join(directory, "spool"))
        replication = rp.build_replication(options, backend, queue, clock)
        assert replication.master is not None
        self.assertEqual(replication.master.log.path, os.path.join(directory, "replication.log"))
        queue.startService()
        self.addCleanup(queue.stopService)
        queue.push(add(1))
        queue.push(add(2))
        clock.advance(1)
        entry = replication.master.log.entry(1)
        assert entry is not None
        self.assertEqual([record.digest for record in entry.updates], [digest(1), digest(2)])
        replication.master.log.close()

    def test_slave_needs_master_key(self) -> None:
        """masters without master_key is a configuration error."""
        options = fuzzy_options('masters = "192.0.2.1";\n')
        self.assertRaises(ConfigError, rp.build_replication, options, MemoryBackend(), None,
                          Clock())

    def test_slave(self) -> None:
        """masters and master_key give a slave listening on the default port."""
        options = fuzzy_options(
            f'masters = "192.0.2.1";\nmaster_key = "{MASTER_KEYPAIR.public.encode()}";\n'
            'dbdir = "/nonexistent";\n')
        replication = rp.build_replication(options, MemoryBackend(), None, Clock())
        slave = replication.slave
        assert slave is not None
        self.assertTrue(rp.is_replication_slave(options))
        self.assertEqual(slave.bind_line, "*:11336")
        self.assertEqual(slave.state.path, "/nonexistent/replication.state")
        self.assertTrue(slave.accepts(ipaddress.ip_address("192.0.2.1")))
        self.assertFalse(slave.accepts(ipaddress.ip_address("192.0.2.2")))
        self.assertEqual(replication.services(), [slave])

    def test_empty_masters_refused_by_the_slave_class(self) -> None:
        """A slave object cannot be built with an empty masters list."""
        self.assertRaises(ConfigError, rp.ReplicationSlave, MemoryBackend(), masters=(),
                          master_key=MASTER_KEYPAIR.public_key, state=rp.SlaveState(),
                          clock=Clock())


class LogTests(unittest.TestCase):
    """The master's bounded revision log."""

    def record(self, n: int) -> rc.UpdateRecord:
        return rp.to_record(add(n))

    def test_revisions_and_coverage(self) -> None:
        """Revisions are consecutive; since() answers only what the log still holds."""
        replication_log = rp.ReplicationLog(3, new_epoch=lambda: 5)
        replication_log.open()
        for n in range(5):
            replication_log.append([self.record(n)], float(n))
        self.assertEqual((replication_log.epoch, replication_log.head, replication_log.first),
                         (5, 5, 3))
        self.assertEqual([e.revision for e in replication_log.since(2) or []], [3, 4, 5])
        self.assertEqual(replication_log.since(5), [])
        self.assertIsNone(replication_log.since(1))
        self.assertIsNone(replication_log.since(6))
        self.assertEqual(replication_log.entry(4).time, 3.0)  # type: ignore[union-attr]

    def test_memory_log_restarts_history(self) -> None:
        """Without a file every open starts a new epoch at revision 0."""
        epochs = iter([1, 2])
        replication_log = rp.ReplicationLog(3, new_epoch=lambda: next(epochs))
        replication_log.open()
        replication_log.append([self.record(1)], 0.0)
        replication_log.open()
        self.assertEqual((replication_log.epoch, replication_log.head), (2, 0))

    def test_file_survives_reopen(self) -> None:
        """The file keeps epoch, head and batches across a restart."""
        path = os.path.join(self.mktemp() + ".log")
        replication_log = rp.ReplicationLog(3, path, new_epoch=lambda: 9)
        replication_log.open()
        for n in range(4):
            replication_log.append([self.record(n)], float(n))
        replication_log.close()
        again = rp.ReplicationLog(3, path, new_epoch=lambda: 10)
        again.open()
        self.addCleanup(again.close)
        self.assertEqual((again.epoch, again.head, again.first), (9, 4, 2))
        self.assertEqual(again.entry(4).updates, (self.record(3),))  # type: ignore[union-attr]

    def test_torn_tail_cut(self) -> None:
        """A partly written last record is cut off at open."""
        path = self.mktemp()
        replication_log = rp.ReplicationLog(10, path, new_epoch=lambda: 9)
        replication_log.open()
        replication_log.append([self.record(1)], 1.0)
        replication_log.append([self.record(2)], 2.0)
        replication_log.close()
        size = os.path.getsize(path)
        with open(path, "r+b") as handle:
            handle.truncate(size - 5)
        again = rp.ReplicationLog(10, path)
        again.open()
        again.append([self.record(3)], 3.0)
        again.close()
        third = rp.ReplicationLog(10, path)
        third.open()
        self.addCleanup(third.close)
        self.assertEqual(third.head, 2)
        self.assertEqual(third.entry(2).updates, (self.record(3),))  # type: ignore[union-attr]

    def test_compaction(self) -> None:
        """The file is rewritten once it holds twice the capacity and still loads."""
        path = self.mktemp()
        replication_log = rp.ReplicationLog(2, path, new_epoch=lambda: 9)
        replication_log.open()
        for n in range(5):
            replication_log.append([self.record(n)], float(n))
        replication_log.close()
        self.assertEqual(os.path.getsize(path),
                         13 + 2 * (12 + len(rc.Batch(1, (self.record(0),)).encode_body())))
        again = rp.ReplicationLog(2, path)
        again.open()
        self.addCleanup(again.close)
        self.assertEqual((again.epoch, again.head, again.first), (9, 5, 4))

    def test_garbage_file_starts_new_history(self) -> None:
        """A file without the header is replaced by a new history."""
        path = self.mktemp()
        with open(path, "wb") as handle:
            handle.write(b"garbage")
        replication_log = rp.ReplicationLog(2, path, new_epoch=lambda: 4)
        replication_log.open()
        self.addCleanup(replication_log.close)
        self.assertEqual((replication_log.epoch, replication_log.head), (4, 0))


class SlaveStateTests(unittest.TestCase):
    """The slave's applied position."""

    def test_round_trip(self) -> None:
        """save() then load() of a new object gives the same position."""
        path = self.mktemp()
        rp.SlaveState(path).save(3, 42)
        state = rp.SlaveState(path)
        state.load()
        self.assertEqual((state.epoch, state.revision), (3, 42))

    def test_unreadable(self) -> None:
        """A corrupt file means nothing applied."""
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("{")
        state = rp.SlaveState(path)
        state.load()
        self.assertEqual((state.epoch, state.revision), (0, 0))


class StreamingTests(unittest.TestCase):
    """Batches flow from the master to its slaves in order and are acknowledged."""

    def test_new_slave_of_empty_master(self) -> None:
        """A new slave of a master that has published nothing gets an empty resync."""
        harness = Harness(self)
        harness.start()
        link = harness.master.links[str(harness.addresses[0])]
        self.assertTrue(link.connected)
        self.assertEqual((link.acked, link.resyncs), (0, 1))
        state = harness.slaves[0].state
        self.assertEqual((state.epoch, state.revision), (77, 0))

    def test_batch_reaches_every_slave(self) -> None:
        """A published batch is applied by every slave and acknowledged."""
        harness = Harness(self, slaves=2)
        harness.start()
        harness.write(add(1, 5), add(2, 7, shingles=True))
        for backend, slave in zip(harness.backends, harness.slaves):
            self.assertEqual(backend.hashes, harness.master_backend.hashes)
            self.assertEqual(backend.sources[-1], rp.REPLICATION_SOURCE)
            self.assertEqual(slave.state.revision, 1)
        for link in harness.master.links.values():
            self.assertEqual((link.acked, link.lag_revisions()), (1, 0))

    def test_weak_updates_stay_weak(self) -> None:
        """A weak learn reaches the slave as a weak update; a strong one as strong."""
        harness = Harness(self)
        harness.start()
        harness.write(replace(add(1, 5), weak=True), add(2, 7))
        applied = harness.backends[0].batches[-1]
        self.assertEqual([(u.digest, u.weak) for u in applied],
                         [(digest(1), True), (digest(2), False)])

    def test_order_kept_while_backend_is_slow(self) -> None:
        """Batches arriving while one is being stored are applied after it, in order."""
        harness = Harness(self)
        harness.start()
        backend = harness.backends[0]
        backend.hold = True
        for n in range(1, 5):
            harness.write(add(n, n))
        self.assertEqual(len(backend.held), 1)
        backend.release()
        harness.network.flush()
        self.assertEqual([batch[0].digest for batch in backend.batches],
                         [digest(n) for n in range(1, 5)])
        self.assertEqual(harness.master.links[str(harness.addresses[0])].acked, 4)

    def test_lag_until_acknowledged(self) -> None:
        """Lag in revisions and seconds grows until the slave acknowledges, then drops to 0."""
        harness = Harness(self)
        harness.start()
        harness.backends[0].hold = True
        harness.write(add(1))
        harness.clock.advance(3)
        harness.write(add(2))
        self.assertEqual(harness.metric("rspamd_tx_fuzzy_replication_lag_revisions"), 2)
        self.assertEqual(harness.metric("rspamd_tx_fuzzy_replication_lag_seconds"), 3)
        harness.backends[0].release()
        harness.network.flush()
        self.assertEqual(harness.metric("rspamd_tx_fuzzy_replication_lag_revisions"), 0)
        self.assertEqual(harness.metric("rspamd_tx_fuzzy_replication_lag_seconds"), 0)
        self.assertEqual(harness.metric("rspamd_tx_fuzzy_replication_slave_revision"), 2)
        self.assertEqual(harness.registry.get_sample_value(
            "rspamd_tx_fuzzy_replication_head_revision"), 2)

    def test_stats(self) -> None:
        """stats() gives the master's revision and each slave's position for /stat."""
        harness = Harness(self)
        harness.start()
        harness.write(add(1))
        stats = harness.master.stats()
        self.assertEqual((stats["role"], stats["epoch"], stats["revision"]), ("master", 77, 1))
        slave_stats = stats["slaves"][str(harness.addresses[0])]
        self.assertEqual((slave_stats["connected"], slave_stats["revision"],
                          slave_stats["lag_revisions"]), (True, 1, 0))
        self.assertEqual(harness.slaves[0].stats()["revision"], 1)
        replication = rp.Replication(harness.master, harness.slaves[0])
        self.assertEqual(set(replication.stats()), {"master", "slave"})

    def test_publish_before_start(self) -> None:
        """A batch published before the master runs is logged and sent once it starts."""
        harness = Harness(self)
        harness.master.publish([add(1)], 1)
        harness.master_backend._store([add(1)], "local")
        harness.start()
        self.assertEqual(harness.master.links[str(harness.addresses[0])].acked, 1)
        self.assertEqual(harness.backends[0].hashes, harness.master_backend.hashes)

    def test_publish_never_raises(self) -> None:
        """An update the wire cannot carry is logged, not raised to the queue."""
        harness = Harness(self)
        harness.start()
        harness.master.publish([Update(UpdateKind.ADD, digest(1), 1, 2**70)], 1)
        self.assertEqual(harness.log.head, 0)
        self.assertEqual(len(self.flushLoggedErrors(rc.ReplicationCodecError)), 1)

    def test_large_batch_split(self) -> None:
        """A batch larger than one frame takes consecutive revisions."""
        harness = Harness(self)
        harness.start()
        self.patch(rp, "MAX_UPDATES_PER_FRAME", 2)
        harness.write(add(1), add(2), add(3))
        self.assertEqual(harness.log.head, 2)
        self.assertEqual(harness.backends[0].hashes, harness.master_backend.hashes)

    def test_duplicate_batch_acknowledged_once_applied(self) -> None:
        """A batch at or below the applied revision is acknowledged without storing it again."""
        harness = Harness(self)
        harness.start()
        harness.write(add(1, 4))
        slave = harness.slaves[0]
        protocol = slave.current
        assert protocol is not None
        sent: list[rc.SealedMessage] = []
        self.patch(protocol, "send", sent.append)
        slave.enqueue(protocol, rc.Batch(1, (rp.to_record(add(1, 4)),)))
        self.assertEqual(sent, [rc.Ack(1)])
        self.assertEqual(harness.backends[0].hashes[digest(1)][1], 4)


class CatchUpTests(unittest.TestCase):
    """A slave that was away catches up from the log, or by a full resync beyond it."""

    def test_catch_up_from_log(self) -> None:
        """Batches published while a slave was unreachable are sent when it comes back."""
        harness = Harness(self, slaves=2)
        harness.start()
        harness.write(add(1))
        away = str(harness.addresses[1])
        slave = harness.network.slaves.pop(away)
        harness.network.cut()
        for n in range(2, 6):
            harness.write(add(n))
        self.assertEqual(harness.slaves[1].state.revision, 1)
        harness.network.slaves[away] = slave
        harness.clock.advance(60)
        harness.network.flush()
        link = harness.master.links[away]
        self.assertEqual((link.acked, link.resyncs), (5, 1))
        self.assertEqual(harness.backends[1].hashes, harness.master_backend.hashes)
        self.assertEqual(len(harness.backends[1].batches), 5)

    def test_full_resync_beyond_log(self) -> None:
        """A slave further behind than the log gets the master's exact hashes, then new batches.

        Its stale weights are replaced and the hashes the master no longer has
        (deleted while the slave was away, or never known to it) are pruned.
        """
        harness = Harness(self, capacity=2)
        harness.start()
        harness.write(add(1, 3))
        address = str(harness.addresses[0])
        slave = harness.network.slaves.pop(address)
        harness.network.cut()
        harness.write(Update(UpdateKind.DEL, digest(1), 1))
        for n in range(2, 10):
            harness.write(add(n, n, shingles=True))
        harness.backends[0].hashes[digest(100)] = (1, 1, None)
        harness.backends[0].hashes[digest(3)] = (1, 1000, None)
        harness.network.slaves[address] = slave
        harness.clock.advance(60)
        harness.network.flush()
        link = harness.master.links[address]
        self.assertEqual((link.resyncs, link.acked, link.resyncing), (2, 10, False))
        self.assertEqual(harness.backends[0].hashes, harness.master_backend.hashes)
        self.assertEqual(slave.state.revision, 10)
        harness.write(add(50))
        self.assertEqual(link.acked, 11)
        self.assertIn(digest(50), harness.backends[0].hashes)

    def test_batches_during_the_copy_counted_once(self) -> None:
        """Batches stored while the copy is being read end on the slave exactly once.

        The first scan call is held until batches have been stored and
        published: the copy then reflects them, and the slave must not add
        them again when the batches follow the copy.
        """
        harness = Harness(self)
        harness.write(add(1, 5))
        scans: list[Deferred[list[Update]]] = []
        original = harness.master_backend.scan

        def held_scan(after: bytes | None, limit: int) -> Deferred[list[Update]]:
            if scans:
                return original(after, limit)
            d: Deferred[list[Update]] = Deferred()
            scans.append(d)
            return d

        self.patch(harness.master_backend, "scan", held_scan)
        harness.start()
        harness.write(add(1, 2), add(2, 7))
        harness.write(Update(UpdateKind.DEL, digest(2), 1), add(3, 1))
        original(None, 1000).addCallback(scans[0].callback)
        harness.network.flush()
        link = harness.master.links[str(harness.addresses[0])]
        self.assertEqual((link.acked, link.resyncing), (3, False))
        self.assertEqual(harness.backends[0].hashes, harness.master_backend.hashes)
        self.assertEqual(harness.backends[0].hashes[digest(1)][1], 7)
        harness.write(add(1, 1))
        self.assertEqual(harness.backends[0].hashes[digest(1)][1], 8)

    def test_restarted_master_with_new_history_resyncs(self) -> None:
        """A slave that applied another epoch is resynced rather than fed batches."""
        harness = Harness(self)
        harness.slaves[0].state.save(12345, 3)
        harness.master_backend._store([add(1, 2)], "local")
        harness.start()
        self.assertEqual(harness.backends[0].hashes, harness.master_backend.hashes)
        self.assertEqual((harness.slaves[0].state.epoch, harness.slaves[0].state.revision),
                         (77, 0))

    def test_resync_without_scanner(self) -> None:
        """A master whose backend cannot list hashes drops a slave the log no longer covers."""
        harness = Harness(self, scanner=False, capacity=1)
        address = str(harness.addresses[0])
        slave = harness.network.slaves.pop(address)
        harness.start()
        harness.write(add(1))
        harness.write(add(2))
        harness.network.slaves[address] = slave
        harness.clock.advance(1)
        harness.network.flush()
        link = harness.master.links[address]
        self.assertFalse(link.connected)
        self.assertEqual(harness.slaves[0].state.epoch, 0)
        self.assertEqual(link.failures, 2)

    def test_new_slave_fed_whole_log_without_scanner(self) -> None:
        """Without a scanner, a new slave is fed the whole log while it starts at revision 1.

        What the slave held before is kept: nothing is deleted on the strength
        of an empty copy.
        """
        harness = Harness(self, scanner=False)
        address = str(harness.addresses[0])
        slave = harness.network.slaves.pop(address)
        harness.start()
        harness.write(add(1, 2))
        harness.write(add(2, 3))
        harness.backends[0].hashes[digest(9)] = (1, 1, None)
        harness.network.slaves[address] = slave
        harness.clock.advance(1)
        harness.network.flush()
        link = harness.master.links[address]
        self.assertEqual((link.acked, link.resyncs), (2, 0))
        expected = dict(harness.master_backend.hashes)
        expected[digest(9)] = (1, 1, None)
        self.assertEqual(harness.backends[0].hashes, expected)

    def test_restarted_slave_resumes_from_saved_state(self) -> None:
        """A slave restarted with its state file asks only for what it lacks."""
        harness = Harness(self)
        path = self.mktemp()
        address = str(harness.addresses[0])
        first = harness.make_slave(harness.backends[0], state=rp.SlaveState(path))
        harness.network.slaves[address] = first
        first.startService()
        harness.start()
        harness.write(add(1))
        harness.network.slaves.pop(address)
        harness.stop_slave(first)
        harness.write(add(2))
        second = harness.make_slave(harness.backends[0], state=rp.SlaveState(path))
        second.startService()
        self.addCleanup(harness.stop_slave, second)
        harness.network.slaves[address] = second
        harness.clock.advance(60)
        harness.network.flush()
        self.assertEqual(second.state.revision, 2)
        self.assertEqual(harness.master.links[address].resyncs, 1)
        self.assertEqual(len(harness.backends[0].batches), 2)


class MasterRestartTests(unittest.TestCase):
    """The master's log file keeps its history across restarts."""

    def test_restarted_master_continues_history(self) -> None:
        """A master restarted on its log file keeps epoch and revisions: no second resync."""
        path = self.mktemp()
        harness = Harness(self, log_path=path)
        harness.start()
        harness.write(add(1))
        harness.write(add(2))
        harness.stop()
        harness.master = rp.ReplicationMaster(
            MASTER_KEYPAIR, harness.addresses, rp.ReplicationLog(100, path), clock=harness.clock,
            connect=harness.network.endpoint, scanner=harness.master_backend,
            registry=CollectorRegistry())
        harness.start()
        harness.write(add(3))
        link = harness.master.links[str(harness.addresses[0])]
        self.assertEqual((harness.master.log.epoch, link.acked, link.resyncs), (77, 3, 0))
        self.assertEqual(harness.backends[0].hashes, harness.master_backend.hashes)


class FuzzProtocolTests(unittest.TestCase):
    """Garbage on a replication connection closes it; nothing is raised."""

    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.binary(max_size=80), max_size=6))
    def test_slave_side(self, chunks: list[bytes]) -> None:
        """Random bytes sent to a slave never raise and never reach its backend."""
        harness = Harness(self)
        slave = harness.slaves[0]
        protocol = slave.factory.buildProtocol(IPv4Address("TCP", MASTER_IP, 1))
        transport = StringTransport(peerAddress=IPv4Address("TCP", MASTER_IP, 1))
        protocol.makeConnection(transport)
        for chunk in chunks:
            protocol.dataReceived(chunk)
        self.assertEqual(harness.backends[0].batches, [])

    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.binary(max_size=80), max_size=6))
    def test_master_side(self, chunks: list[bytes]) -> None:
        """Random bytes sent to a master by a pretend slave never raise."""
        harness = Harness(self, slaves=0)
        link = rp.SlaveLink(harness.master, rp.SlaveAddress("198.51.100.7"))
        protocol = rp._LinkFactory(link).buildProtocol(None)
        protocol.makeConnection(StringTransport())
        for chunk in chunks:
            protocol.dataReceived(chunk)
        self.assertFalse(link.connected)


class FailureTests(unittest.TestCase):
    """Refusals, bad keys, timeouts and reconnection with backoff."""

    def test_master_not_in_masters_refused(self) -> None:
        """A connection from an address outside masters is closed before any hello."""
        harness = Harness(self)
        harness.network.source = "203.0.113.9"
        harness.start()
        slave = harness.slaves[0]
        self.assertEqual(refused(slave, "address"), 1)
        self.assertFalse(harness.master.links[str(harness.addresses[0])].connected)
        self.assertEqual(slave.state.epoch, 0)

    def test_bad_master_key(self) -> None:
        """A master presenting another public key is dropped and applies nothing."""
        harness = Harness(self, master_keypair=OTHER_KEYPAIR)
        harness.start()
        harness.write(add(1))
        self.assertEqual(refused(harness.slaves[0], "key"), 1)
        self.assertEqual(harness.backends[0].batches, [])

    def test_forged_master(self) -> None:
        """A peer claiming the master's public key without its secret gets no session."""
        forged = Keypair(OTHER_KEYPAIR.secret_key, MASTER_KEYPAIR.public)
        harness = Harness(self, master_keypair=forged)
        harness.start()
        harness.write(add(1))
        self.assertFalse(harness.master.links[str(harness.addresses[0])].connected)
        self.assertEqual(harness.slaves[0].state.epoch, 0)
        self.assertEqual(harness.backends[0].batches, [])

    def test_forged_frames_to_slave(self) -> None:
        """After a correct auth, a frame not sealed with the master's secret is refused."""
        harness = Harness(self)
        slave = harness.slaves[0]
        protocol = slave.factory.buildProtocol(IPv4Address("TCP", MASTER_IP, 1))
        transport = StringTransport(peerAddress=IPv4Address("TCP", MASTER_IP, 1))
        protocol.makeConnection(transport)
        hello = rc.decode_plain(rc.FrameDecoder().feed(transport.value())[0])
        assert isinstance(hello, rc.Hello)
        forged = rc.SealedChannel(OTHER_KEYPAIR.nm(hello.ephemeral_key), master=True)
        protocol.dataReceived(rc.encode_plain(rc.Auth(MASTER_KEYPAIR.public_key)))
        protocol.dataReceived(forged.seal(rc.Batch(1, (rp.to_record(add(1)),))))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(refused(slave, "protocol"), 1)
        self.assertEqual(harness.backends[0].batches, [])

    def test_backoff(self) -> None:
        """Refused connections are retried after 1, 2, 4 … seconds up to the maximum."""
        harness = Harness(self, slaves=0)
        harness.master.links["x"] = rp.SlaveLink(harness.master, rp.SlaveAddress("198.51.100.99"))
        harness.start()
        times = []
        for _ in range(9):
            before = harness.network.attempts
            waited = 0
            while harness.network.attempts == before:
                harness.clock.advance(1)
                waited += 1
            times.append(waited)
        self.assertEqual(times, [1, 2, 4, 8, 16, 32, 60, 60, 60])

    def test_backend_failure_reconnects_and_retries(self) -> None:
        """A slave whose backend fails drops the connection; the batch arrives after recovery."""
        harness = Harness(self)
        harness.start()
        harness.backends[0].down = True
        harness.write(add(1))
        link = harness.master.links[str(harness.addresses[0])]
        self.assertFalse(link.connected)
        harness.backends[0].down = False
        harness.clock.advance(1)
        harness.network.flush()
        self.assertEqual(link.acked, 1)
        self.assertEqual(harness.backends[0].hashes, harness.master_backend.hashes)

    def test_unacknowledged_batch_times_out(self) -> None:
        """A slave that does not acknowledge within the timeout is disconnected."""
        harness = Harness(self, timeout=4.0)
        harness.start()
        harness.backends[0].hold = True
        harness.write(add(1))
        link = harness.master.links[str(harness.addresses[0])]
        harness.clock.advance(3)
        harness.network.flush()
        self.assertTrue(link.connected)
        harness.clock.advance(3)
        harness.network.flush()
        self.assertFalse(link.connected)

    def test_slave_handshake_timeout(self) -> None:
        """A connection that never authenticates is dropped by the slave after the timeout."""
        harness = Harness(self)
        slave = harness.slaves[0]
        protocol = slave.factory.buildProtocol(IPv4Address("TCP", MASTER_IP, 1))
        transport = iosim.FakeTransport(protocol, True,
                                        peerAddress=IPv4Address("TCP", MASTER_IP, 1))
        protocol.makeConnection(transport)
        harness.clock.advance(11)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(refused(slave, "timeout"), 1)

    def test_gap_drops_connection(self) -> None:
        """A batch skipping a revision makes the slave drop the connection."""
        harness = Harness(self)
        harness.start()
        slave = harness.slaves[0]
        protocol = slave.current
        assert protocol is not None
        slave.enqueue(protocol, rc.Batch(5, (rp.to_record(add(1)),)))
        self.assertTrue(protocol.closed)
        self.assertEqual(refused(slave, "protocol"), 1)

    def test_resync_out_of_order_refused(self) -> None:
        """Resync chunks whose digests do not ascend make the slave drop the connection."""
        harness = Harness(self)
        harness.start()
        slave = harness.slaves[0]
        protocol = slave.current
        assert protocol is not None
        first, second = sorted([digest(1), digest(2)])
        slave.enqueue(protocol, rc.ResyncBegin(77, 0))
        slave.enqueue(protocol, rc.ResyncChunk((rc.UpdateRecord(1, second, 1, 1),)))
        slave.enqueue(protocol, rc.ResyncChunk((rc.UpdateRecord(1, first, 1, 1),)))
        self.assertTrue(protocol.closed)
        self.assertEqual(refused(slave, "protocol"), 1)
        self.assertNotIn(first, harness.backends[0].hashes)

    def test_new_connection_replaces_old(self) -> None:
        """A second accepted master connection replaces the first."""
        harness = Harness(self)
        harness.start()
        slave = harness.slaves[0]
        old = slave.current
        assert old is not None
        protocol = slave.factory.buildProtocol(IPv4Address("TCP", MASTER_IP, 2))
        protocol.makeConnection(
            iosim.FakeTransport(protocol, True, peerAddress=IPv4Address("TCP", MASTER_IP, 2)))
        self.assertTrue(old.closed)
        self.assertIs(slave.current, protocol)

    def test_stop_cancels_reconnect(self) -> None:
        """Stopping the master leaves no timer behind."""
        harness = Harness(self)
        harness.network.slaves.clear()
        harness.start()
        harness.stop()
        self.assertEqual(harness.clock.getDelayedCalls(), [])
