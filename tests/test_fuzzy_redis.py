"""The Redis fuzzy backend against real redis-servers: semantics and Rspamd 3.x's key layout."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, DeferredList, gatherResults, inlineCallbacks
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from rspamd_tx.fuzzy.backend import (
    MISS,
    BackendUnavailable,
    IFuzzyBackend,
    Update,
    UpdateKind,
)
from rspamd_tx.fuzzy.redis_backend import (
    SCAN_LISTING_IDLE,
    RedisFuzzyBackend,
    digest_key_pattern,
    parse_servers,
    shingle_key,
)
from rspamd_tx.fuzzy.replication import IHashScanner
from rspamd_tx.protocols import fuzzy_codec
from rspamd_tx.upstreams.hosts import Strategy
from tests.peers.redis import skip_unless_redis, start_redis
from tests.peers.rspamd import skip_unless_rspamd, start_rspamd

DAY = 86400

reactor: Any = _reactor


def digest(n: int) -> bytes:
    return bytes([n]) * 64


def shingles(n: int) -> tuple[int, ...]:
    """32 distinct shingles for message ``n``, some above 2**63."""
    return tuple((n << 56) + (i << 1) + (1 << 63 if i % 2 else 0) for i in range(32))


def add(n: int, flag: int = 1, value: int = 1, with_shingles: bool = False) -> Update:
    return Update(UpdateKind.ADD, digest(n), flag, value, shingles(n) if with_shingles else None)


def hashed(n: int) -> bytes:
    """A pseudo-random digest: stored order differs from ``n`` order."""
    return hashlib.blake2b(b"scan %d" % n).digest()


@inlineCallbacks
def scan_all(backend: RedisFuzzyBackend, limit: int) -> Any:
    """Every page of one scan pass, until the empty page that ends it."""
    pages: list[list[Update]] = []
    cursor = None
    while True:
        page = yield backend.scan(cursor, limit)
        if not page:
            return pages
        pages.append(page)
        cursor = page[-1].digest


class ServerListTests(unittest.TestCase):
    """Redis upstream options."""

    def test_master_slave_with_priorities(self) -> None:
        """``master-slave:`` lists keep hosts, ports and priorities; 6379 is the default port."""
        parsed = parse_servers("master-slave:localhost:6383:30,dolores.vpn.example.net:6383:20,"
                               "other", Strategy.ROUND_ROBIN)
        self.assertEqual(
            (parsed.strategy, [(e.host, e.port, e.weight_or_priority) for e in parsed.entries]),
            (Strategy.MASTER_SLAVE,
             [("localhost", 6383, 30), ("dolores.vpn.example.net", 6383, 20), ("other", 6379, 0)]),
        )

    def test_unix_socket_refused(self) -> None:
        """A unix socket element is refused with ValueError."""
        self.assertRaises(ValueError, parse_servers, "/run/redis.sock", Strategy.ROUND_ROBIN)

    def test_shingle_key_is_unsigned_decimal(self) -> None:
        """Slot keys spell the hash as unsigned decimal, as Rspamd does."""
        self.assertEqual(shingle_key(b"fuzzy", 3, 2**64 - 1), b"fuzzy_3_18446744073709551615")

    def test_digest_key_pattern_escapes_prefix(self) -> None:
        """The SCAN pattern escapes glob characters of the prefix and asks for 64 more bytes."""
        self.assertEqual(digest_key_pattern(b"f*?[]\\"), b"f\\*\\?\\[\\]\\\\" + b"?" * 64)


class RedisBackendTests(unittest.TestCase):
    """One real redis-server, the backend on the real reactor."""

    skip = skip_unless_redis()

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        self.redis = yield start_redis(reactor)
        self.addCleanup(self.redis.stop)
        self.raw = yield self.redis.client()
        self.backend = self.make(servers=self.redis.address)

    def make(self, **options: Any) -> RedisFuzzyBackend:
        options.setdefault("timeout", 1.0)
        backend = RedisFuzzyBackend(reactor=reactor, clock=reactor, lifetime=2 * DAY, **options)
        self.addCleanup(backend.close)
        return backend

    def test_provides_interface(self) -> None:
        """The backend provides IFuzzyBackend."""
        self.assertTrue(verifyObject(IFuzzyBackend, self.backend))

    @inlineCallbacks
    def test_exact_hit(self) -> Any:
        """A learned digest is found with prob 1.0, its weight, flag and creation time."""
        before = int(reactor.seconds())
        yield self.backend.apply([add(1, flag=3, value=7)])
        result = yield self.backend.check(digest(1), None)
        self.assertEqual((result.value, result.flag, result.prob, result.digest),
                         (7, 3, 1.0, digest(1)))
        self.assertTrue(before <= result.timestamp <= before + 5)

    @inlineCallbacks
    def test_miss(self) -> Any:
        """An unknown digest is a miss with everything zero."""
        result = yield self.backend.check(digest(2), shingles(2))
        self.assertEqual(result, MISS)

    @inlineCallbacks
    def test_shingle_hit(self) -> Any:
        """All 32 shingles of a stored message match with Rspamd's prob 31/32."""
        yield self.backend.apply([add(1, value=5, with_shingles=True)])
        result = yield self.backend.check(digest(9), shingles(1))
        self.assertEqual((result.value, result.prob, result.digest), (5, 31 / 32, digest(1)))

    @inlineCallbacks
    def test_shingle_sixteen_is_miss(self) -> Any:
        """16 agreeing slots are not enough; 17 are."""
        yield self.backend.apply([add(1, with_shingles=True)])
        sixteen = yield self.backend.check(digest(9), shingles(1)[:16] + shingles(50)[16:])
        seventeen = yield self.backend.check(digest(9), shingles(1)[:17] + shingles(50)[17:])
        self.assertEqual((sixteen, seventeen.prob), (MISS, 17 / 32))

    @inlineCallbacks
    def test_add_accumulates_and_other_flag_overwrites_flag(self) -> Any:
        """Same flag adds to V; another flag overwrites F while V keeps accumulating."""
        yield self.backend.apply([add(1, flag=2, value=3)])
        yield self.backend.apply([add(1, flag=2, value=4)])
        same = yield self.backend.check(digest(1), None)
        yield self.backend.apply([add(1, flag=5, value=1)])
        other = yield self.backend.check(digest(1), None)
        self.assertEqual([(same.value, same.flag), (other.value, other.flag)], [(7, 2), (8, 5)])

    @inlineCallbacks
    def test_weak_add_keeps_another_flag(self) -> Any:
        """A weak learn sets F only when unset (HSETNX, Rspamd 3.6+); V still accumulates."""
        yield self.backend.apply([add(1, flag=2, value=3)])
        yield self.backend.apply([replace(add(1, flag=5, value=4), weak=True)])
        kept = yield self.backend.check(digest(1), None)
        yield self.backend.apply([replace(add(2, flag=5, value=6), weak=True)])
        new = yield self.backend.check(digest(2), None)
        self.assertEqual([(kept.value, kept.flag), (new.value, new.flag)], [(7, 2), (6, 5)])

    def test_weak_add_commands(self) -> None:
        """Only the flag command differs between a weak and a strong learn."""
        strong = self.backend.commands([add(1, flag=5)])
        weak = self.backend.commands([replace(add(1, flag=5), weak=True)])
        self.assertEqual((strong[0][0], weak[0][0], strong[1:] == weak[1:]),
                         ("HSET", "HSETNX", True))

    @inlineCallbacks
    def test_del_removes_hash_and_slots(self) -> Any:
        """DEL removes the hash and, for a shingle command, its 32 slot keys."""
        yield self.backend.apply([add(1, with_shingles=True)])
        yield self.backend.apply([Update(UpdateKind.DEL, digest(1), 7, 0, shingles(1))])
        keys = yield self.raw.execute_command("KEYS", "fuzzy*")
        self.assertEqual(sorted(keys), [b"fuzzy_count", b"fuzzylocal"])

    @inlineCallbacks
    def test_key_layout(self) -> Any:
        """A shingle learn writes Rspamd 3.x's keys: hash V/F/C, 32 slots, count, version."""
        yield self.backend.apply([add(1, flag=4, value=9, with_shingles=True)])
        key = b"fuzzy" + digest(1)
        fields = yield self.raw.execute_command("HGETALL", key)
        stored = dict(zip(fields[::2], fields[1::2]))
        self.assertEqual(sorted(stored), [b"C", b"F", b"V"])
        self.assertEqual((stored[b"V"], stored[b"F"]), (b"9", b"4"))
        slots = yield self.raw.execute_command(
            "MGET", *[b"fuzzy_%d_%d" % (i, h) for i, h in enumerate(shingles(1))])
        self.assertEqual(slots, [digest(1)] * 32)
        count = yield self.raw.execute_command("GET", "fuzzy_count")
        version = yield self.raw.execute_command("GET", "fuzzylocal")
        self.assertEqual((count, version), (b"1", b"1"))
        ttl = yield self.raw.execute_command("TTL", key)
        slot_ttl = yield self.raw.execute_command("TTL", b"fuzzy_0_%d" % shingles(1)[0])
        count_ttl = yield self.raw.execute_command("TTL", "fuzzy_count")
        self.assertTrue(2 * DAY - 5 <= ttl <= 2 * DAY and 2 * DAY - 5 <= slot_ttl <= 2 * DAY)
        self.assertEqual(count_ttl, -1)

    @inlineCallbacks
    def test_creation_time_set_once(self) -> Any:
        """C is written by the first learn only (HSETNX)."""
        key = b"fuzzy" + digest(1)
        yield self.raw.execute_command("HSET", key, "C", "1000")
        yield self.backend.apply([add(1)])
        created = yield self.raw.execute_command("HGET", key, "C")
        self.assertEqual(created, b"1000")

    @inlineCallbacks
    def test_refresh_rearms_ttl(self) -> Any:
        """REFRESH re-applies EXPIRE to the hash and the request's slot keys."""
        yield self.backend.apply([add(1, with_shingles=True)])
        key = b"fuzzy" + digest(1)
        slot = b"fuzzy_5_%d" % shingles(1)[5]
        yield self.raw.execute_command("EXPIRE", key, 10)
        yield self.raw.execute_command("EXPIRE", slot, 10)
        yield self.backend.apply([Update(UpdateKind.REFRESH, digest(1), 1, 0, shingles(1))])
        key_ttl = yield self.raw.execute_command("TTL", key)
        slot_ttl = yield self.raw.execute_command("TTL", slot)
        self.assertTrue(key_ttl > 10 and slot_ttl > 10, (key_ttl, slot_ttl))

    @inlineCallbacks
    def test_prefix_and_db(self) -> Any:
        """``prefix`` and ``db`` select where keys go."""
        backend = self.make(servers=self.redis.address, prefix="fz", db=3)
        yield backend.apply([add(1)])
        yield self.raw.execute_command("SELECT", 3)
        keys = yield self.raw.execute_command("KEYS", "*")
        self.assertEqual(sorted(keys), sorted([b"fz" + digest(1), b"fz_count", b"fzlocal"]))

    @inlineCallbacks
    def test_count_and_version(self) -> Any:
        """count() is WRITEs minus DELs, version() the batch counter of the source."""
        yield self.backend.apply([add(1), add(2)])
        yield self.backend.apply([Update(UpdateKind.DEL, digest(1), 1)], "peer")
        count = yield self.backend.count()
        local = yield self.backend.version("local")
        peer = yield self.backend.version("peer")
        unknown = yield self.backend.version("none")
        self.assertEqual((count, local, peer, unknown), (1, 1, 1, 0))

    @inlineCallbacks
    def test_apply_returns_revision(self) -> Any:
        """apply() fires with the incremented revision."""
        first = yield self.backend.apply([add(1)])
        second = yield self.backend.apply([add(2)])
        self.assertEqual((first, second), (1, 2))

    @inlineCallbacks
    def test_stopped_redis_check_fails_fast(self) -> Any:
        """With Redis gone, check fails with BackendUnavailable within the timeout."""
        yield self.backend.apply([add(1)])
        yield self.redis.kill()
        started = reactor.seconds()
        yield self.assertFailure(self.backend.check(digest(1), None), BackendUnavailable)
        self.assertLess(reactor.seconds() - started, 1.5)
        started = reactor.seconds()
        yield self.assertFailure(self.backend.check(digest(1), None), BackendUnavailable)
        self.assertLess(reactor.seconds() - started, 0.2)

    @inlineCallbacks
    def test_stopped_redis_apply_unavailable(self) -> Any:
        """With Redis gone, apply fails with BackendUnavailable."""
        yield self.redis.kill()
        yield self.assertFailure(self.backend.apply([add(1)]), BackendUnavailable)

    @inlineCallbacks
    def test_recovers_after_restart(self) -> Any:
        """After Redis comes back, the backend writes again (reconnecting on its own)."""
        yield self.redis.kill()
        yield self.assertFailure(self.backend.apply([add(1)]), BackendUnavailable)
        yield self.redis.start()
        for _ in range(100):
            try:
                yield self.backend.apply([add(1)])
                break
            except BackendUnavailable:
                yield deferLater(reactor, 0.1, lambda: None)
        result = yield self.backend.check(digest(1), None)
        self.assertEqual(result.value, 1)

    @inlineCallbacks
    def test_error_reply_fails_that_lookup_only(self) -> Any:
        """A key of the wrong type fails its lookup; the lookups around it get their answers."""
        yield self.backend.apply([add(1, value=4), add(3, value=6)])
        yield self.raw.execute_command("SET", b"fuzzy" + digest(2), "not a hash")
        results = yield DeferredList([self.backend.check(digest(n), None) for n in (1, 2, 3)],
                                     consumeErrors=True)
        self.assertEqual([ok for ok, _ in results], [True, False, True])
        self.assertTrue(results[1][1].check(BackendUnavailable))
        self.assertEqual((results[0][1].value, results[2][1].value), (4, 6))

    @inlineCallbacks
    def test_batches_and_lookups_interleaved(self) -> Any:
        """Batches sent while lookups are under way are stored; every lookup gets its answer."""
        yield self.backend.apply([add(n, value=n) for n in range(1, 21)])
        pending = []
        for n in range(1, 21):
            pending.append(self.backend.check(digest(n), shingles(n)))
            if n % 5 == 0:
                pending.append(self.backend.apply([add(n + 100, with_shingles=True)]))
        results = yield gatherResults(pending)
        lookups = [result for result in results if not isinstance(result, int)]
        self.assertEqual([result.value for result in lookups], list(range(1, 21)))
        self.assertEqual([result for result in results if isinstance(result, int)],
                         [2, 3, 4, 5])
        stored = yield self.backend.check(digest(200), shingles(120))
        self.assertEqual((stored.digest, stored.prob), (digest(120), 31 / 32))

    @inlineCallbacks
    def test_read_only_without_write_servers(self) -> Any:
        """read_servers alone make a read-only backend: apply fails, check works."""
        yield self.backend.apply([add(1)])
        backend = self.make(read_servers=self.redis.address)
        yield self.assertFailure(backend.apply([add(2)]), BackendUnavailable)
        result = yield backend.check(digest(1), None)
        self.assertEqual(result.value, 1)


class _Silent(Protocol):
    """A server that accepts connections and never answers."""


class UnresponsiveServerTests(unittest.TestCase):
    """A server that accepts the connection but never replies: calls fail on the timeout."""

    timeout_s = 0.2

    def setUp(self) -> None:
        port = reactor.listenTCP(0, Factory.forProtocol(_Silent), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.backend = RedisFuzzyBackend(reactor=reactor, clock=reactor,
                                         servers=f"127.0.0.1:{port.getHost().port}",
                                         timeout=self.timeout_s)

    @inlineCallbacks
    def assert_times_out(self, call: Deferred[Any]) -> Any:
        started = reactor.seconds()
        yield self.assertFailure(call, BackendUnavailable)
        elapsed = reactor.seconds() - started
        self.assertTrue(self.timeout_s * 0.99 <= elapsed < self.timeout_s * 1.25 + 0.2, elapsed)

    @inlineCallbacks
    def test_check_and_apply_time_out(self) -> Any:
        """Lookups and batches fail with BackendUnavailable within the timeout (+1/4)."""
        yield self.assert_times_out(self.backend.check(digest(1), shingles(1)))
        yield self.assert_times_out(self.backend.apply([add(1)]))
        yield self.assert_times_out(self.backend.count())
        yield self.backend.close()

    @inlineCallbacks
    def test_close_fails_calls_under_way(self) -> Any:
        """close() fails the calls still waiting for a reply at once."""
        yield self.assert_times_out(self.backend.check(digest(1), None))
        pending = self.backend.check(digest(1), None)
        closing = self.backend.close()
        yield self.assertFailure(pending, BackendUnavailable)
        yield closing


class ReplicaTests(unittest.TestCase):
    """``write_servers`` on a primary, ``read_servers`` on its replica."""

    skip = skip_unless_redis()

    @inlineCallbacks
    def test_read_from_replica_write_to_primary(self) -> Any:
        """Writes land on the primary; reads are served by the replica."""
        primary = yield start_redis(reactor)
        self.addCleanup(primary.stop)
        replica = yield start_redis(reactor, replica_of=primary)
        self.addCleanup(replica.stop)
        backend = RedisFuzzyBackend(reactor=reactor, clock=reactor,
                                    write_servers=f"master-slave:{primary.address}",
                                    read_servers=replica.address)
        self.addCleanup(backend.close)
        yield backend.apply([add(1, value=3)])
        result = MISS
        for _ in range(100):
            result = yield backend.check(digest(1), None)
            if result.hit:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(result.value, 3)
        yield primary.kill()
        after = yield backend.check(digest(1), None)
        self.assertEqual(after.value, 3)
        yield self.assertFailure(backend.apply([add(2)]), BackendUnavailable)


class _OneDatagram(DatagramProtocol):
    """Collects the first datagram received."""

    def __init__(self) -> None:
        self.received: Deferred[bytes] = Deferred()

    def datagramReceived(self, data: bytes, addr: Any) -> None:  # noqa: N802 (Twisted API)
        if not self.received.called:
            self.received.callback(data)


@inlineCallbacks
def fuzzy_exchange(port: int, command: fuzzy_codec.FuzzyCommand) -> Any:
    """Send one plaintext command to a fuzzy storage on loopback; fire with the reply."""
    catcher = _OneDatagram()
    listener = reactor.listenUDP(0, catcher, interface="127.0.0.1")
    try:
        listener.write(fuzzy_codec.encode_request(command), ("127.0.0.1", port))
        catcher.received.addTimeout(5, reactor)
        datagram = yield catcher.received
    finally:
        yield listener.stopListening()
    return fuzzy_codec.decode_reply(datagram)


class RspamdInteropTests(unittest.TestCase):
    """Our backend and a real Rspamd 3.4 fuzzy storage sharing one Redis."""

    skip = skip_unless_redis() or skip_unless_rspamd()
    timeout = 180

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        self.redis = yield start_redis(reactor)
        self.addCleanup(self.redis.stop)
        self.rspamd = yield start_rspamd(
            reactor, workers=("fuzzy",), wait_hyperscan=False,
            worker_options={"fuzzy": f'backend = "redis"; servers = "{self.redis.address}";\n'
                                     'sync = 1; expire = 2d; allow_update = ["127.0.0.1"];'},
        )
        self.addCleanup(self.rspamd.stop)
        self.port = int(self.rspamd.address("fuzzy").rsplit(":", 1)[1])
        self.backend = RedisFuzzyBackend(reactor=reactor, clock=reactor,
                                         servers=self.redis.address)
        self.addCleanup(self.backend.close)

    @inlineCallbacks
    def test_rspamd_finds_our_hashes(self) -> Any:
        """Hashes we write are found by Rspamd's storage, exactly and by shingles."""
        yield self.backend.apply([add(1, flag=3, value=7, with_shingles=True)])
        exact = yield fuzzy_exchange(self.port, fuzzy_codec.FuzzyCommand(
            version=4, command=fuzzy_codec.Command.CHECK, tag=1, digest=digest(1)))
        fuzzy = yield fuzzy_exchange(self.port, fuzzy_codec.FuzzyCommand(
            version=4, command=fuzzy_codec.Command.CHECK, tag=2, digest=digest(9),
            shingles=shingles(1)))
        self.assertEqual((exact.value, exact.flag, exact.prob), (7, 3, 1.0))
        self.assertEqual((fuzzy.value, fuzzy.flag, fuzzy.prob, fuzzy.digest),
                         (7, 3, 31 / 32, digest(1)))

    @inlineCallbacks
    def test_we_find_rspamd_hashes(self) -> Any:
        """A learn stored by Rspamd's storage is found by our backend with the same answer."""
        learned = yield fuzzy_exchange(self.port, fuzzy_codec.FuzzyCommand(
            version=4, command=fuzzy_codec.Command.WRITE, tag=3, digest=digest(2), flag=4,
            value=5, shingles=shingles(2)))
        self.assertEqual(learned.prob, 1.0)
        result = MISS
        for _ in range(100):
            result = yield self.backend.check(digest(2), None)
            if result.hit:
                break
            yield deferLater(reactor, 0.1, lambda: None)
        fuzzy = yield self.backend.check(digest(9), shingles(2))
        count = yield self.backend.count()
        self.assertEqual((result.value, result.flag, fuzzy.prob, fuzzy.digest, count),
                         (5, 4, 31 / 32, digest(2), 1))

    @inlineCallbacks
    def test_scan_lists_rspamd_hashes(self) -> Any:
        """A shingle learn stored by Rspamd's storage is listed once by scan, with its values."""
        yield fuzzy_exchange(self.port, fuzzy_codec.FuzzyCommand(
            version=4, command=fuzzy_codec.Command.WRITE, tag=4, digest=digest(3), flag=6,
            value=9, shingles=shingles(3)))
        page: list[Update] = []
        for _ in range(100):
            page = yield self.backend.scan(None, 10)
            if page:
                break
            yield deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(page, [Update(UpdateKind.ADD, digest(3), 6, 9)])


class RedisScanTests(unittest.TestCase):
    """scan(): the stored hashes of a real redis-server, in digest order, for a full resync."""

    skip = skip_unless_redis()

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        self.redis = yield start_redis(reactor)
        self.addCleanup(self.redis.stop)
        self.raw = yield self.redis.client()
        self.backend = self.make()

    def make(self, **options: Any) -> RedisFuzzyBackend:
        options.setdefault("servers", self.redis.address)
        options.setdefault("clock", reactor)
        backend = RedisFuzzyBackend(reactor=reactor, timeout=1.0, lifetime=2 * DAY, **options)
        self.addCleanup(backend.close)
        return backend

    def test_provides_hash_scanner(self) -> None:
        """The backend declares and provides IHashScanner."""
        self.assertTrue(verifyObject(IHashScanner, self.backend))

    @inlineCallbacks
    def test_empty_store(self) -> Any:
        """An empty database gives an empty first page: the end."""
        page = yield self.backend.scan(None, 10)
        self.assertEqual(page, [])

    @inlineCallbacks
    def test_ascending_digest_order_with_values(self) -> Any:
        """Hashes come as ADD updates in ascending digest order, with flag and weight."""
        stored = [Update(UpdateKind.ADD, hashed(n), n % 3 + 1, n + 10) for n in range(20)]
        yield self.backend.apply(stored)
        page = yield self.backend.scan(None, 100)
        self.assertEqual(page, sorted(stored, key=lambda update: update.digest))

    @inlineCallbacks
    def test_paging_lists_every_hash_once(self) -> Any:
        """Pages of ``limit`` (across several SCAN round trips) hold every hash exactly once."""
        digests = [hashed(n) for n in range(2500)]
        yield self.backend.apply([Update(UpdateKind.ADD, d, 1, 1) for d in digests])
        pages = yield scan_all(self.backend, 333)
        self.assertEqual([len(page) for page in pages], [333] * 7 + [169])
        self.assertEqual([u.digest for page in pages for u in page], sorted(digests))

    @inlineCallbacks
    def test_after_is_exclusive(self) -> Any:
        """``after`` excludes itself, and need not be a stored digest."""
        yield self.backend.apply([add(1), add(3), add(5)])
        from_stored = yield self.backend.scan(digest(3), 10)
        from_between = yield self.backend.scan(digest(2), 10)
        from_last = yield self.backend.scan(digest(5), 10)
        self.assertEqual(([u.digest for u in from_stored], [u.digest for u in from_between],
                          from_last),
                         ([digest(5)], [digest(3), digest(5)], []))

    @inlineCallbacks
    def test_limit_zero_lists_nothing(self) -> Any:
        """A limit of 0 fires with an empty list."""
        yield self.backend.apply([add(1)])
        page = yield self.backend.scan(None, 0)
        self.assertEqual(page, [])

    @inlineCallbacks
    def test_other_keys_excluded(self) -> Any:
        """Shingle slots, the count, revision keys (even one of digest length) and other
        prefixes are not listed."""
        yield self.backend.apply([add(1, with_shingles=True)])
        yield self.backend.apply([add(2)], "x" * 64)
        yield self.raw.execute_command("HSET", b"fuzzyX" + digest(3), "V", "1", "F", "1")
        yield self.raw.execute_command("HSET", b"fuzzy" + digest(4)[:63], "V", "1", "F", "1")
        yield self.raw.execute_command("HSET", b"fuzzy" + digest(5) + b"!", "V", "1", "F", "1")
        yield self.raw.execute_command("HSET", b"other" + digest(6), "V", "1", "F", "1")
        keys = yield self.raw.execute_command("DBSIZE")
        page = yield self.backend.scan(None, 100)
        self.assertEqual((keys, [u.digest for u in page]), (41, [digest(1), digest(2)]))

    @inlineCallbacks
    def test_rspamd_written_hash_included(self) -> Any:
        """A hash laid out by Rspamd itself (raw HSET of V, F, C) is listed with its values."""
        yield self.raw.execute_command("HSET", b"fuzzy" + digest(7), "V", "12", "F", "3",
                                       "C", "1700000000")
        page = yield self.backend.scan(None, 10)
        self.assertEqual(page, [Update(UpdateKind.ADD, digest(7), 3, 12)])

    @inlineCallbacks
    def test_invalid_hashes_skipped(self) -> Any:
        """Keys of digest shape without valid V and F, or not hashes, are skipped."""
        yield self.raw.execute_command("HSET", b"fuzzy" + digest(1), "C", "1")
        yield self.raw.execute_command("HSET", b"fuzzy" + digest(2), "V", "x", "F", "1")
        yield self.raw.execute_command("HSET", b"fuzzy" + digest(3), "V", "1", "F", "-1")
        yield self.raw.execute_command("SET", b"fuzzy" + digest(4), "1")
        yield self.backend.apply([add(5)])
        page = yield self.backend.scan(None, 10)
        self.assertEqual([u.digest for u in page], [digest(5)])

    @inlineCallbacks
    def test_binary_digests_and_glob_prefix(self) -> Any:
        """Digests with glob and protocol bytes are listed under a prefix with glob characters."""
        backend = self.make(prefix="f*[?]")
        odd = [b"*" * 64, b"?" * 64, b"\r\n" * 32, b"\x00" * 64, b"[" + b"\xff" * 63]
        yield backend.apply([Update(UpdateKind.ADD, d, 1, 2) for d in odd])
        yield self.backend.apply([add(1)])
        page = yield backend.scan(None, 10)
        self.assertEqual([u.digest for u in page], sorted(odd))

    @inlineCallbacks
    def test_hash_deleted_during_pass_skipped(self) -> Any:
        """A hash deleted after the pass started is left out; the page is filled from later ones."""
        yield self.backend.apply([add(n) for n in range(1, 7)])
        first = yield self.backend.scan(None, 2)
        yield self.backend.apply([Update(UpdateKind.DEL, digest(n), 1) for n in (3, 4)])
        second = yield self.backend.scan(first[-1].digest, 2)
        self.assertEqual([u.digest for u in first + second],
                         [digest(1), digest(2), digest(5), digest(6)])

    @inlineCallbacks
    def test_values_read_per_page(self) -> Any:
        """A page reports the weight stored when it is read, not when the pass started."""
        yield self.backend.apply([add(1), add(2)])
        yield self.backend.scan(None, 1)
        yield self.backend.apply([add(2, value=4)])
        second = yield self.backend.scan(digest(1), 1)
        self.assertEqual(second, [Update(UpdateKind.ADD, digest(2), 1, 5)])

    @inlineCallbacks
    def test_pass_reuses_its_listing(self) -> Any:
        """Later pages bisect the listing made when the pass started; a new pass lists anew."""
        yield self.backend.apply([add(1), add(3)])
        yield self.backend.scan(None, 1)
        yield self.backend.apply([add(2)])
        same_pass = yield self.backend.scan(digest(1), 10)
        new_pass = yield self.backend.scan(None, 10)
        self.assertEqual(([u.digest for u in same_pass], [u.digest for u in new_pass]),
                         ([digest(3)], [digest(1), digest(2), digest(3)]))

    @inlineCallbacks
    def test_idle_listing_dropped(self) -> Any:
        """A listing unused for SCAN_LISTING_IDLE seconds is dropped; the next page lists anew."""
        clock = Clock()
        backend = self.make(clock=clock)
        yield backend.apply([add(1), add(3)])
        yield backend.scan(None, 1)
        yield backend.apply([add(2)])
        clock.advance(SCAN_LISTING_IDLE - 1)
        kept = yield backend.scan(digest(1), 10)
        clock.advance(SCAN_LISTING_IDLE)
        relisted = yield backend.scan(digest(1), 10)
        self.assertEqual(([u.digest for u in kept], [u.digest for u in relisted]),
                         ([digest(3)], [digest(2), digest(3)]))

    @inlineCallbacks
    def test_older_listing_finishing_last_is_not_kept(self) -> Any:
        """Of two overlapping passes, later pages use the listing started last,
        even when the earlier listing completes after it."""
        yield self.backend.apply([add(1), add(3)])
        arrived: Deferred[None] = Deferred()
        release: Deferred[None] = Deferred()
        command_on = self.backend._command_on

        def hold_first_scan(server: Any, *args: Any) -> Deferred[Any]:
            d = command_on(server, *args)
            if args[0] == "SCAN" and not arrived.called:
                def hold(reply: Any) -> Deferred[Any]:
                    arrived.callback(None)
                    return release.addCallback(lambda _: reply)
                d.addCallback(hold)
            return d

        self.patch(self.backend, "_command_on", hold_first_scan)
        first = self.backend.scan(None, 1)
        yield arrived
        yield self.raw.execute_command("HSET", b"fuzzy" + digest(2), "V", "1", "F", "1")
        second = yield self.backend.scan(None, 1)
        release.callback(None)
        first_page = yield first
        page = yield self.backend.scan(digest(1), 10)
        self.assertEqual(([u.digest for u in first_page + second], [u.digest for u in page]),
                         ([digest(1), digest(1)], [digest(2), digest(3)]))

    @inlineCallbacks
    def test_unavailable_when_redis_is_gone(self) -> Any:
        """With Redis down, scan fails with BackendUnavailable within the timeout."""
        yield self.backend.apply([add(1)])
        yield self.redis.kill()
        started = reactor.seconds()
        yield self.assertFailure(self.backend.scan(None, 10), BackendUnavailable)
        self.assertLess(reactor.seconds() - started, 1.5)

    @inlineCallbacks
    def test_reads_from_read_servers(self) -> Any:
        """A backend with only read_servers lists the hashes stored there."""
        yield self.backend.apply([add(1), add(2)])
        backend = self.make(servers=None, read_servers=self.redis.address)
        pages = yield scan_all(backend, 1)
        self.assertEqual([[u.digest for u in page] for page in pages], [[digest(1)], [digest(2)]])
