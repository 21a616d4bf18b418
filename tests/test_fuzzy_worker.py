"""Tests for :mod:`rspamd_tx.fuzzy.server`: the fuzzy storage worker in-process.

The worker runs under :class:`rspamd_tx.runtime.WorkerService` on the real
reactor, with its sqlite backend in a temporary directory, and is spoken to
over loopback UDP and TCP with the wire codec.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer, task
from twisted.internet import reactor as global_reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import DatagramProtocol, Protocol
from twisted.internet.task import Clock
from twisted.trial import unittest

from rspamd_tx.config.bind import parse_bind_lines
from rspamd_tx.config.tree import ConfigError
from rspamd_tx.config.ucl import loads
from rspamd_tx.config.workers import Config, WorkerConfig, check_config
from rspamd_tx.fuzzy.listeners import FuzzyDatagramProtocol, FuzzyStreamFactory
from rspamd_tx.fuzzy.server import FuzzyWorker, build_worker, spool_directory
from rspamd_tx.runtime import PROCESS_SLOT_ENV
from rspamd_tx.fuzzy.sqlite_backend import SqliteFuzzyBackend
from rspamd_tx.protocols.fuzzy_codec import (
    ClientEncryption,
    Command,
    FuzzyCommand,
    FuzzyReply,
    FuzzyStreamDecoder,
    decode_reply,
    encode_frame,
    encode_request,
)
from rspamd_tx.protocols.keypair import Keypair
from rspamd_tx.runtime import WorkerService, bound_sockets
from tests.helpers.net import free_port, http_get, ipv6_available

reactor: Any = global_reactor
DIGEST = bytes(range(64))
TIMEOUT = 5.0


def listening_port(service: WorkerService) -> int:
    """The port of the worker's first listener."""
    address = service.ports[0].getHost()
    assert isinstance(address, IPv4Address)
    return address.port


def fuzzy_config(text: str) -> tuple[Config, WorkerConfig]:
    """The checked configuration of one ``worker "fuzzy" { text }``."""
    config, diagnostics = check_config(loads(f'worker "fuzzy" {{ {text} }}'))
    errors = [str(d) for d in diagnostics if d.severity == "error"]
    if errors:
        raise AssertionError(errors)
    return config, config.workers[0]


def keypair_ucl(pair: Keypair) -> str:
    """A ``keypair { }`` block for a worker section."""
    mapping = pair.as_mapping()
    return f'keypair {{ pubkey = "{mapping["pubkey"]}"; privkey = "{mapping["privkey"]}"; }}'


def command(code: int = Command.CHECK, **fields: Any) -> FuzzyCommand:
    values: dict[str, Any] = {"version": 4, "command": code, "tag": 42, "digest": DIGEST}
    values.update(fields)
    return FuzzyCommand(**values)


class _UdpClient(DatagramProtocol):
    def __init__(self) -> None:
        self.reply: defer.Deferred[bytes] = defer.Deferred()

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if not self.reply.called:
            self.reply.callback(datagram)


class _TcpClient(Protocol):
    def __init__(self, count: int) -> None:
        self.decoder = FuzzyStreamDecoder()
        self.frames: list[bytes] = []
        self.count = count
        self.done: defer.Deferred[list[bytes]] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.frames += self.decoder.feed(data)
        if len(self.frames) >= self.count and not self.done.called:
            self.done.callback(self.frames)


@defer.inlineCallbacks
def udp_exchange(port: int, request: FuzzyCommand, host: str = "127.0.0.1") -> Any:
    """Send ``request`` in a datagram to ``host``; the decoded reply."""
    client = _UdpClient()
    listener = reactor.listenUDP(0, client, interface=host)
    try:
        listener.write(encode_request(request), (host, port))
        raw = yield client.reply.addTimeout(TIMEOUT, reactor)
    finally:
        yield listener.stopListening()
    return decode_reply(raw)


@defer.inlineCallbacks
def tcp_frames(port: int, payloads: list[bytes], replies: int) -> Any:
    """Send ``payloads`` pipelined on one TCP connection; the first ``replies`` reply frames."""
    client = _TcpClient(replies)
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    transport = client.transport
    assert transport is not None
    try:
        transport.write(b"".join(encode_frame(payload) for payload in payloads))
        frames = yield client.done.addTimeout(TIMEOUT, reactor)
    finally:
        transport.loseConnection()
    return frames


@defer.inlineCallbacks
def tcp_exchange(port: int, requests: list[FuzzyCommand]) -> Any:
    """Send ``requests`` pipelined on one TCP connection; the decoded replies."""
    frames = yield tcp_frames(port, [encode_request(r) for r in requests], len(requests))
    return [decode_reply(frame) for frame in frames]


class BuildTests(unittest.TestCase):
    """What ``build_worker`` makes of a configuration (no I/O)."""

    def test_sqlite_default(self) -> None:
        """Without ``backend`` the storage uses sqlite at ``dbdir``/fuzzy.db."""
        config, worker = fuzzy_config('dbdir = "/srv/fuzzy";')
        builder = build_worker(config, worker, Clock())
        self.assertIsInstance(builder.backend, SqliteFuzzyBackend)
        assert isinstance(builder.backend, SqliteFuzzyBackend)
        self.assertEqual(builder.backend.path, "/srv/fuzzy/fuzzy.db")

    def test_hashfile_and_spool(self) -> None:
        """``hashfile`` names the database; the update spool goes next to it."""
        config, worker = fuzzy_config('hashfile = "/data/f.db"; expire = 1d;')
        builder = build_worker(config, worker, Clock())
        assert isinstance(builder.backend, SqliteFuzzyBackend)
        self.assertEqual((builder.backend.path, builder.backend.lifetime),
                         ("/data/f.db", 86400.0))
        self.assertEqual(spool_directory(worker.options), "/data")  # type: ignore[arg-type]

    def test_spool_per_process_slot(self) -> None:
        """Slot 0 spools to fuzzy-updates.spool; other processes of the worker to their own file."""
        config, worker = fuzzy_config('dbdir = "/srv/fuzzy";')
        self.patch(os, "environ", {**os.environ, PROCESS_SLOT_ENV: "0"})
        first = build_worker(config, worker, Clock())
        self.patch(os, "environ", {**os.environ, PROCESS_SLOT_ENV: "1"})
        second = build_worker(config, worker, Clock())
        self.assertEqual(first.queue._spool.path, "/srv/fuzzy/fuzzy-updates.spool")
        self.assertEqual(second.queue._spool.path, "/srv/fuzzy/fuzzy-updates.1.spool")

    def test_redis_backend(self) -> None:
        """``backend = redis`` with servers gives the Redis backend with its prefix."""
        config, worker = fuzzy_config(
            'backend = "redis"; servers = "127.0.0.1:6379"; prefix = "fz"; dbdir = "/tmp";')
        builder = build_worker(config, worker, Clock())
        self.assertEqual(type(builder.backend).__name__, "RedisFuzzyBackend")
        self.assertEqual(builder.backend.prefix, b"fz")  # type: ignore[attr-defined]

    def test_redis_needs_servers(self) -> None:
        """``backend = redis`` without any server is a configuration error."""
        config, worker = fuzzy_config('backend = "redis"; dbdir = "/tmp";')
        self.assertRaises(ConfigError, build_worker, config, worker, Clock())

    def test_replication_master(self) -> None:
        """``slaves`` makes the worker a replication master fed by the queue's flushes."""
        config, worker = fuzzy_config(
            f'dbdir = "/srv/fuzzy"; slaves = "127.0.0.1"; {keypair_ucl(Keypair.generate())}')
        builder = build_worker(config, worker, Clock())
        self.assertIsNotNone(builder.replication.master)
        self.assertIsNone(builder.replication.slave)

    def test_replication_needs_keypair(self) -> None:
        """``slaves`` without any keypair is a configuration error."""
        config, worker = fuzzy_config('dbdir = "/srv/fuzzy"; slaves = "127.0.0.1";')
        self.assertRaises(ConfigError, build_worker, config, worker, Clock())

    def test_noop_backend_refused(self) -> None:
        """``backend = noop`` is not offered: a configuration error."""
        config, worker = fuzzy_config('backend = "noop"; dbdir = "/tmp";')
        self.assertRaises(ConfigError, build_worker, config, worker, Clock())

    def test_listeners(self) -> None:
        """A fresh datagram protocol per socket and one stream factory share the pipeline."""
        config, worker = fuzzy_config('dbdir = "/srv/fuzzy"; tcp_timeout = 7s;')
        builder = build_worker(config, worker, Clock())
        first, second = builder.datagram_protocol(), builder.datagram_protocol()
        self.assertIsInstance(first, FuzzyDatagramProtocol)
        self.assertIsNot(first, second)
        self.assertIs(first.storage, builder.storage)
        factory = builder.stream_factory()
        self.assertIsInstance(factory, FuzzyStreamFactory)
        self.assertEqual((factory.storage, factory.timeout), (builder.storage, 7.0))
        self.assertEqual(builder.services(), [builder.key_maps, builder.map_files, builder.lifecycle])
        self.assertEqual(list(builder.key_maps), [])  # no dynamic_keys_map: nothing watched


class RunningWorkerTests(unittest.TestCase):
    """The worker serving loopback UDP and TCP on one port."""

    @defer.inlineCallbacks
    def start(self, options: str, host: str = "127.0.0.1") -> Any:
        self.dbdir = os.path.abspath(self.mktemp())
        os.makedirs(self.dbdir)
        self.port = free_port(host)
        bind = f"[{host}]" if ":" in host else host
        config, worker = fuzzy_config(
            f'bind_socket = "{bind}:{self.port}"; dbdir = "{self.dbdir}"; {options}')
        service = WorkerService(config, worker, build_worker, reactor,
                                bound_sockets(parse_bind_lines(worker.common.bind_socket)))
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        builder = service.builder
        assert isinstance(builder, FuzzyWorker)
        started = yield builder.lifecycle.ready
        self.assertTrue(started)
        self.service, self.builder = service, builder
        return builder

    @defer.inlineCallbacks
    def test_learn_then_check(self) -> Any:
        """A WRITE over UDP is acknowledged, stored at the flush and found over TCP."""
        yield self.start('allow_update = "127.0.0.1"; sync = 1h;')
        ack: FuzzyReply = yield udp_exchange(self.port, command(Command.WRITE, flag=1, value=10))
        self.assertEqual((ack.value, ack.prob, ack.flag), (0, 1.0, 1))
        yield self.builder.drain()
        check, stat = yield tcp_exchange(self.port, [command(), command(Command.STAT)])
        self.assertEqual((check.value, check.flag, check.prob), (10, 1, 1.0))
        self.assertEqual((stat.flag, stat.prob), (1, 1.0))

    @defer.inlineCallbacks
    def test_ipv6(self) -> Any:
        """On an IPv6 socket writes from ``::1`` are authorised by an IPv6 ``allow_update``."""
        if not ipv6_available():
            raise unittest.SkipTest("no IPv6 loopback")
        yield self.start('allow_update = "::1";', host="::1")
        ack = yield udp_exchange(self.port, command(Command.WRITE, flag=1), host="::1")
        self.assertEqual(ack.prob, 1.0)

    @defer.inlineCallbacks
    def test_sync_flushes(self) -> Any:
        """The queue is flushed by itself every ``sync`` seconds."""
        yield self.start('allow_update = "127.0.0.1"; sync = 0.1s;')
        yield udp_exchange(self.port, command(Command.WRITE, flag=2, value=3))
        for _ in range(50):
            reply = yield udp_exchange(self.port, command())
            if reply.prob > 0.5:
                break
            yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertEqual((reply.value, reply.flag), (3, 2))

    @defer.inlineCallbacks
    def test_localhost_resolved(self) -> Any:
        """``allow_update = localhost`` lets 127.0.0.1 write once the worker is ready."""
        yield self.start('allow_update = "localhost";')
        ack = yield udp_exchange(self.port, command(Command.WRITE, flag=1))
        self.assertEqual(ack.prob, 1.0)

    @defer.inlineCallbacks
    def test_reconfigure_swaps_acl(self) -> Any:
        """A reload that narrows ``allow_update`` refuses writes from then on."""
        yield self.start('allow_update = "127.0.0.1";')
        config, worker = fuzzy_config(f'dbdir = "{self.dbdir}"; allow_update = "127.0.0.2";')
        self.builder.reconfigure(config, worker)
        refused = yield udp_exchange(self.port, command(Command.WRITE, flag=1))
        self.assertEqual((refused.value, refused.prob), (403, 0.0))

    @defer.inlineCallbacks
    def test_reconfigure_swaps_keys(self) -> Any:
        """After a reload with a new keypair only clients of the new key are answered."""
        old, new = Keypair.generate(), Keypair.generate()
        yield self.start(keypair_ucl(old))
        config, worker = fuzzy_config(f'dbdir = "{self.dbdir}"; {keypair_ucl(new)}')
        self.builder.reconfigure(config, worker)
        yield self.builder.apply_options(worker.options)  # type: ignore[arg-type]
        to_old = ClientEncryption(old.public_key, Keypair.generate())
        to_new = ClientEncryption(new.public_key, Keypair.generate())
        [frame] = yield tcp_frames(self.port, [encode_request(command(tag=1), to_old),
                                               encode_request(command(tag=2), to_new)], 1)
        self.assertEqual(decode_reply(frame, to_new.nm).tag, 2)
        self.assertEqual(self.builder.statistics()["invalid_requests"], 1)

    @defer.inlineCallbacks
    def test_dynamic_keys_map_served_and_reloaded(self) -> Any:
        """Keys from dynamic_keys_map decrypt requests; a reload naming another map
        swaps them; a reload without the option drops them."""
        first, second = Keypair.generate(), Keypair.generate()
        paths = [os.path.abspath(self.mktemp()) for _ in range(2)]
        for path, pair in zip(paths, (first, second)):
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(f"[ {{ {keypair_ucl(pair)} }} ]\n")
        yield self.start(f'dynamic_keys_map = "{paths[0]}"; {keypair_ucl(Keypair.generate())}')
        to_first = ClientEncryption(first.public_key, Keypair.generate())
        to_second = ClientEncryption(second.public_key, Keypair.generate())
        [before] = yield tcp_frames(self.port, [encode_request(command(tag=1), to_first)], 1)
        config, worker = fuzzy_config(f'dbdir = "{self.dbdir}"; dynamic_keys_map = "{paths[1]}";')
        self.builder.reconfigure(config, worker)
        yield self.builder.apply_options(worker.options)  # type: ignore[arg-type]
        [after] = yield tcp_frames(self.port, [encode_request(command(tag=2), to_first),
                                               encode_request(command(tag=3), to_second)], 1)
        config, worker = fuzzy_config(f'dbdir = "{self.dbdir}";')
        self.builder.reconfigure(config, worker)
        yield self.builder.apply_options(worker.options)  # type: ignore[arg-type]
        self.assertEqual((decode_reply(before, to_first.nm).tag,
                          decode_reply(after, to_second.nm).tag,
                          self.builder.storage.policy.dynamic_keypairs,
                          list(self.builder.key_maps)),
                         (1, 3, (), []))

    @defer.inlineCallbacks
    def test_allow_update_map_change_applied(self) -> Any:
        """When an ``allow_update`` map file changes the new list applies at the next
        check of the map files, without a reload."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("127.0.0.2\n")
        yield self.start(f'allow_update = "{path}";')
        refused = yield udp_exchange(self.port, command(Command.WRITE, flag=1))
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("127.0.0.2\n127.0.0.1  # this host\n")
        self.assertEqual(self.builder.map_files.paths, {path})
        self.builder.map_files.check()
        accepted = yield udp_exchange(self.port, command(Command.WRITE, flag=1))
        self.assertEqual((refused.value, accepted.prob), (403, 1.0))

    @defer.inlineCallbacks
    def test_stop_stores_queue(self) -> Any:
        """Stopping the worker stores what the queue holds before closing the backend."""
        yield self.start('allow_update = "127.0.0.1"; sync = 1h;')
        yield udp_exchange(self.port, command(Command.WRITE, flag=1, value=4))
        yield self.service.stopService()
        backend = SqliteFuzzyBackend(os.path.join(self.dbdir, "fuzzy.db"), reactor=reactor)
        yield backend.start()
        self.addCleanup(backend.close)
        found = yield backend.check(DIGEST, None)
        self.assertEqual((found.value, found.flag), (4, 1))

    @defer.inlineCallbacks
    def test_metrics_endpoint(self) -> Any:
        """With ``metrics`` the storage's counters are served on ``/metrics``."""
        metrics_port = free_port()
        yield self.start(f'metrics = "127.0.0.1:{metrics_port}";')
        yield udp_exchange(self.port, command())
        status, body = yield http_get(reactor, "127.0.0.1", metrics_port, "/metrics")
        self.assertEqual(status, 200)
        self.assertIn(b'rspamd_tx_fuzzy_requests_total{command="check",outcome="miss"} 1.0',
                      body)
        self.assertIn(b"rspamd_tx_fuzzy_queue_depth 0.0", body)
