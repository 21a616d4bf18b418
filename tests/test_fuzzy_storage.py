"""Tests for :mod:`rspamd_tx.fuzzy.storage`: the request pipeline, step by step."""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from ipaddress import ip_address, ip_network
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial import unittest
from zope.interface import implementer

from rspamd_tx.address_lists import NetworkSet
from rspamd_tx.config.schema import HostRef, MapRef
from rspamd_tx.config.workers import FuzzyOptions
from rspamd_tx.fuzzy.backend import (
    MISS,
    BackendUnavailable,
    CheckResult,
    IFuzzyBackend,
    IImmediateFuzzyBackend,
    Update,
    UpdateKind,
)
from rspamd_tx.fuzzy.storage import (
    IP_STATS_SIZE,
    LOG_INTERVAL,
    PEER_CACHE_SIZE,
    FuzzyPolicy,
    FuzzyStorage,
    UpdateSink,
    key_label,
)
from rspamd_tx.fuzzy.update_queue import UpdateQueue
from rspamd_tx.protocols.fuzzy_codec import (
    ClientEncryption,
    Command,
    FuzzyCommand,
    FuzzyReply,
    decode_reply,
    encode_request,
)
from rspamd_tx.protocols.keypair import Keypair

NOW = 1_700_000_000
DIGEST = bytes(range(64))
OTHER_DIGEST = bytes(range(1, 65))
SHINGLES = tuple(range(1000, 1032))
CLIENT = ip_address("127.0.0.1")
CLIENT_NETWORK = ip_network("127.0.0.1")
STRANGER = ip_address("192.0.2.7")


@implementer(IFuzzyBackend)
class MemoryBackend:
    """An in-memory backend: exact digests only, answers at once unless ``hold``.

    Tests may also set ``hashes`` (digest → the result a CHECK gets) directly.
    """

    lifetime = 172800.0

    def __init__(self) -> None:
        self.hashes: dict[bytes, CheckResult] = {}
        self.lookups: list[tuple[bytes, Any]] = []
        self.stored = 0
        self.revision = 0
        self.hold = False
        self.held: list[Deferred[CheckResult]] = []
        self.error: Exception | None = None

    def check(self, digest: bytes, shingles: Any) -> Deferred[CheckResult]:
        self.lookups.append((digest, shingles))
        if self.error is not None:
            return fail(self.error)
        if self.hold:
            d: Deferred[CheckResult] = Deferred()
            self.held.append(d)
            return d
        return succeed(self.hashes.get(digest, MISS))

    def apply(self, updates: Sequence[Update], source: str = "local") -> Deferred[int]:
        for update in updates:
            if update.kind is UpdateKind.ADD:
                self.hashes[update.digest] = CheckResult(update.value, update.flag, 1.0, NOW,
                                                         update.digest)
            elif update.kind is UpdateKind.DEL:
                self.hashes.pop(update.digest, None)
        self.stored = len(self.hashes)
        self.revision += 1
        return succeed(self.revision)

    def count(self) -> Deferred[int]:
        if self.error is not None:
            return fail(self.error)
        return succeed(self.stored)

    def version(self, source: str) -> Deferred[int]:
        return succeed(self.revision)

    def expire(self, now: float) -> Deferred[int]:
        return succeed(0)

    def close(self) -> Deferred[None]:
        return succeed(None)


class ListQueue:
    """An update sink that keeps what it is given."""

    def __init__(self) -> None:
        self.updates: list[Update] = []

    def push(self, update: Update) -> None:
        self.updates.append(update)


def command(code: int = Command.CHECK, *, version: int = 4, digest: bytes = DIGEST,
            flag: int = 0, value: int = 0, tag: int = 0x1A2B3C4D,
            shingles: tuple[int, ...] = ()) -> FuzzyCommand:
    return FuzzyCommand(version=version, command=code, tag=tag, digest=digest, flag=flag,
                        value=value, shingles=shingles)


class PipelineTestCase(unittest.TestCase):
    """Builds a storage over :class:`MemoryBackend` with a :class:`Clock` at :data:`NOW`."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.backend = MemoryBackend()
        self.queue = ListQueue()
        self.sink: UpdateSink = self.queue
        self.jitter = 0.0

    def storage(self, **options: Any) -> FuzzyStorage:
        return FuzzyStorage(FuzzyOptions(**options), self.backend, self.sink, self.clock,
                            jitter=lambda: self.jitter, hosts={"localhost": [CLIENT]})

    def ask(self, storage: FuzzyStorage, request: FuzzyCommand,
            address: Any = CLIENT, encryption: ClientEncryption | None = None) -> FuzzyReply:
        """Send ``request``; the decoded (synchronous) reply."""
        raw = storage.handle(encode_request(request, encryption), address)
        self.assertIsInstance(raw, bytes)
        assert isinstance(raw, bytes)
        return decode_reply(raw, encryption.nm if encryption else None)

    def store(self, value: int = 10, flag: int = 1, prob: float = 1.0, ts: int = NOW - 3600,
              digest: bytes = DIGEST) -> None:
        self.backend.hashes[DIGEST] = CheckResult(value=value, flag=flag, prob=prob,
                                                  timestamp=ts, digest=digest)


class CheckTests(PipelineTestCase):
    def test_miss(self) -> None:
        """A miss answers value, flag, prob and ts 0 with the request tag."""
        reply = self.ask(self.storage(), command())
        self.assertEqual((reply.value, reply.flag, reply.prob, reply.ts, reply.tag),
                         (0, 0, 0.0, 0, 0x1A2B3C4D))

    def test_hit(self) -> None:
        """A hit answers the stored weight, flag, time and digest with prob 1."""
        self.store()
        reply = self.ask(self.storage(), command())
        self.assertEqual((reply.value, reply.flag, reply.prob, reply.ts, reply.digest),
                         (10, 1, 1.0, NOW - 3600, DIGEST))

    def test_shingles_passed_to_backend(self) -> None:
        """A shingle command looks up its digest with its 32 shingles."""
        self.ask(self.storage(), command(shingles=SHINGLES))
        self.assertEqual(self.backend.lookups, [(DIGEST, SHINGLES)])

    def test_shingle_hit_reports_stored_digest(self) -> None:
        """A shingle hit reports the backend's probability and the stored digest."""
        self.store(prob=27 / 32, digest=OTHER_DIGEST)
        reply = self.ask(self.storage(), command(shingles=SHINGLES))
        self.assertEqual((reply.prob, reply.digest), (27 / 32, OTHER_DIGEST))

    def test_version3_reply_is_16_bytes(self) -> None:
        """A version 3 request gets the 16-byte epoch 10 reply."""
        raw = self.storage().handle(encode_request(command(version=3)), CLIENT)
        assert isinstance(raw, bytes)
        self.assertEqual(len(raw), 16)

    def test_version4_reply_is_96_bytes(self) -> None:
        """A version 4 request gets the 96-byte epoch 11 reply."""
        raw = self.storage().handle(encode_request(command()), CLIENT)
        assert isinstance(raw, bytes)
        self.assertEqual(len(raw), 96)

    def test_asynchronous_backend(self) -> None:
        """When the backend answers later, handle returns a Deferred of the reply."""
        self.backend.hold = True
        self.store()
        answer = self.storage().handle(encode_request(command()), CLIENT)
        self.assertIsInstance(answer, Deferred)
        replies: list[bytes | None] = []
        assert isinstance(answer, Deferred)
        answer.addCallback(replies.append)
        self.assertEqual(replies, [])
        self.backend.held[0].callback(self.backend.hashes[DIGEST])
        [reply] = replies
        assert reply is not None
        self.assertEqual(decode_reply(reply).value, 10)

    def test_backend_failure_is_a_miss(self) -> None:
        """A failing backend gives a quick miss and counts a backend error."""
        self.backend.error = BackendUnavailable("down")
        storage = self.storage()
        reply = self.ask(storage, command())
        self.assertEqual((reply.value, reply.prob), (0, 0.0))
        self.assertEqual(storage.stats.backend_errors, 1)

    def test_skip_hashes(self) -> None:
        """A hit on a digest listed in ``skip_hashes`` answers 401, prob 0."""
        self.store()
        reply = self.ask(self.storage(skip_hashes=(DIGEST.hex(),)), command())
        self.assertEqual((reply.value, reply.prob), (401, 0.0))

    def test_skip_hashes_map_file(self) -> None:
        """``skip_hashes`` may name a file with one hex digest per line."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as handle:
            handle.write(f"# skipped\n{DIGEST.hex()}\n")
        self.store()
        reply = self.ask(self.storage(skip_hashes=(path,)), command())
        self.assertEqual(reply.value, 401)

    def test_delay_hides_young_hash(self) -> None:
        """A hash younger than ``delay`` is answered as a miss with its flag kept."""
        self.store(ts=NOW - 10)
        storage = self.storage(delay=60.0)
        reply = self.ask(storage, command())
        self.assertEqual((reply.value, reply.flag, reply.prob, reply.ts), (0, 1, 0.0, 0))
        self.assertEqual(storage.stats.delayed_hashes, 1)

    def test_delay_jitter(self) -> None:
        """The delay is stretched by up to 50 %: delay 60 s with jitter 0.5 hides age 70 s."""
        self.store(ts=NOW - 70)
        self.jitter = 0.5
        self.assertEqual(self.ask(self.storage(delay=60.0), command()).prob, 0.0)
        self.jitter = 0.0
        self.assertEqual(self.ask(self.storage(delay=60.0), command()).prob, 1.0)

    def test_delay_whitelist(self) -> None:
        """Sources in ``delay_whitelist`` see new hashes at once."""
        self.store(ts=NOW - 10)
        storage = self.storage(delay=60.0, delay_whitelist=(ip_network("127.0.0.0/8"),))
        self.assertEqual(self.ask(storage, command()).prob, 1.0)

    def test_refresh_queued_on_strong_hit(self) -> None:
        """A hit with prob > 0.9 queues a REFRESH of the matched digest and request shingles."""
        self.store(prob=1.0, digest=OTHER_DIGEST)
        self.ask(self.storage(), command(shingles=SHINGLES))
        self.assertEqual(self.queue.updates, [Update(UpdateKind.REFRESH, OTHER_DIGEST, 1,
                                                     shingles=SHINGLES)])

    def test_no_refresh_on_weak_hit(self) -> None:
        """A shingle hit with prob ≤ 0.9 queues nothing."""
        self.store(prob=20 / 32)
        self.ask(self.storage(), command(shingles=SHINGLES))
        self.assertEqual(self.queue.updates, [])

    def test_no_refresh_when_read_only(self) -> None:
        """A ``read_only`` storage never queues REFRESH."""
        self.store()
        self.ask(self.storage(read_only=True), command())
        self.assertEqual(self.queue.updates, [])

    def test_forbidden_ids(self) -> None:
        """A hit whose flag is in ``forbidden_ids`` is answered as a zeroed miss."""
        self.store(flag=5)
        reply = self.ask(self.storage(forbidden_ids=(5,)), command())
        self.assertEqual((reply.value, reply.flag, reply.prob, reply.ts), (0, 0, 0.0, 0))

    def test_ratelimit(self) -> None:
        """CHECKs past the burst are refused with 403 and flag 0."""
        self.store()
        storage = self.storage(ratelimit_rate=0.1, ratelimit_burst=2.0)
        values = [self.ask(storage, command(), STRANGER).value for _ in range(4)]
        self.assertEqual(values, [10, 10, 10, 403])
        self.assertEqual(storage.stats.ratelimited_requests, 1)

    def test_ratelimit_whitelist(self) -> None:
        """``ratelimit_whitelist`` sources are never rate limited."""
        storage = self.storage(ratelimit_rate=0.1, ratelimit_burst=1.0,
                               ratelimit_whitelist=(ip_network("192.0.2.0/24"),))
        values = [self.ask(storage, command(), STRANGER).value for _ in range(5)]
        self.assertEqual(values, [0] * 5)

    def test_writes_not_rate_limited(self) -> None:
        """The rate limit meters CHECK only."""
        storage = self.storage(ratelimit_rate=0.1, ratelimit_burst=1.0,
                               allow_update=(ip_network("192.0.2.0/24"),))
        values = [self.ask(storage, command(Command.WRITE, flag=1), STRANGER).value
                  for _ in range(5)]
        self.assertEqual(values, [0] * 5)


class WriteTests(PipelineTestCase):
    def test_write_accepted(self) -> None:
        """An allowed WRITE is queued as ADD and acknowledged with prob 1 and its flag."""
        storage = self.storage(allow_update=(ip_network("127.0.0.1"),))
        reply = self.ask(storage, command(Command.WRITE, flag=3, value=10, shingles=SHINGLES))
        self.assertEqual((reply.value, reply.flag, reply.prob), (0, 3, 1.0))
        self.assertEqual(self.queue.updates, [Update(UpdateKind.ADD, DIGEST, 3, 10, SHINGLES,
                                                     source="127.0.0.1")])

    def test_write_under_weak_id_marked_weak(self) -> None:
        """A WRITE whose flag is one of ``weak_ids`` is queued weak; other flags and DEL are not."""
        storage = self.storage(allow_update=(ip_network("127.0.0.1"),), weak_ids=(3, 9))
        for code, flag in ((Command.WRITE, 3), (Command.WRITE, 4), (Command.DEL, 3)):
            self.ask(storage, command(code, flag=flag))
        self.assertEqual([(u.kind, u.flag, u.weak) for u in self.queue.updates],
                         [(UpdateKind.ADD, 3, True), (UpdateKind.ADD, 4, False),
                          (UpdateKind.DEL, 3, False)])

    def test_delete_accepted(self) -> None:
        """An allowed DEL is queued as DEL."""
        storage = self.storage(allow_update=(ip_network("127.0.0.1"),))
        reply = self.ask(storage, command(Command.DEL, flag=3))
        self.assertEqual(reply.prob, 1.0)
        self.assertEqual([u.kind for u in self.queue.updates], [UpdateKind.DEL])

    def test_write_from_other_address_refused(self) -> None:
        """A WRITE from outside ``allow_update`` gets 403 and nothing is queued."""
        storage = self.storage(allow_update=(ip_network("127.0.0.2"),))
        reply = self.ask(storage, command(Command.WRITE, flag=1))
        self.assertEqual((reply.value, reply.prob), (403, 0.0))
        self.assertEqual(self.queue.updates, [])

    def test_nobody_writes_without_acl(self) -> None:
        """Without ``allow_update`` or ``allow_update_keys`` every write is refused."""
        self.assertEqual(self.ask(self.storage(), command(Command.DEL)).value, 403)

    def test_read_only(self) -> None:
        """``read_only`` refuses writes even from allowed addresses."""
        storage = self.storage(read_only=True, allow_update=(ip_network("127.0.0.1"),))
        self.assertEqual(self.ask(storage, command(Command.WRITE)).value, 403)

    def test_allow_update_host_name(self) -> None:
        """Host names in ``allow_update`` match their resolved addresses."""
        storage = self.storage(allow_update=(HostRef("localhost"),))
        self.assertEqual(self.ask(storage, command(Command.WRITE)).prob, 1.0)
        self.assertEqual(self.ask(storage, command(Command.WRITE), STRANGER).value, 403)

    def test_allow_update_map_file(self) -> None:
        """``allow_update`` may name a file of addresses and networks."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as handle:
            handle.write("192.0.2.0/24 # lab\n")
        storage = self.storage(allow_update=(MapRef(path),))
        self.assertEqual(self.ask(storage, command(Command.WRITE), STRANGER).prob, 1.0)

    def test_ipv4_mapped_source(self) -> None:
        """An IPv4-mapped IPv6 source matches IPv4 networks."""
        storage = self.storage(allow_update=(ip_network("127.0.0.1"),))
        reply = self.ask(storage, command(Command.WRITE), ip_address("::ffff:127.0.0.1"))
        self.assertEqual(reply.prob, 1.0)

    def test_unix_source_may_write(self) -> None:
        """A local socket client (no address) may write when ``allow_update`` is set."""
        storage = self.storage(allow_update=(ip_network("127.0.0.2"),))
        self.assertEqual(self.ask(storage, command(Command.WRITE), None).prob, 1.0)

    def test_skip_hashes_on_write(self) -> None:
        """A WRITE of a digest in ``skip_hashes`` gets 401 and is not queued."""
        storage = self.storage(allow_update=(ip_network("127.0.0.1"),),
                               skip_hashes=(DIGEST.hex(),))
        self.assertEqual(self.ask(storage, command(Command.WRITE)).value, 401)
        self.assertEqual(self.queue.updates, [])

    def test_unknown_command_refused(self) -> None:
        """Codes other than CHECK/WRITE/DEL/STAT/PING (even REFRESH) get 500, nothing queued."""
        storage = self.storage(allow_update=(ip_network("127.0.0.1"),))
        for code in (Command.REFRESH, Command.DUP, 7):
            self.assertEqual(self.ask(storage, command(code)).value, 500)
        self.assertEqual(self.queue.updates, [])


class StatAndPingTests(PipelineTestCase):
    def test_stat_reports_refreshed_count(self) -> None:
        """STAT answers the count read by ``refresh_count`` in ``flag``, prob 1."""
        storage = self.storage()
        self.backend.stored = 1234
        storage.refresh_count()
        reply = self.ask(storage, command(Command.STAT))
        self.assertEqual((reply.value, reply.flag, reply.prob), (0, 1234, 1.0))

    def test_stat_splits_large_count(self) -> None:
        """Counts beyond 32 bits put the high part in ``value`` (3.8+ encoding)."""
        storage = self.storage()
        self.backend.stored = (5 << 32) + 7
        storage.refresh_count()
        reply = self.ask(storage, command(Command.STAT))
        self.assertEqual((reply.value, reply.flag), (5, 7))

    def test_refresh_count_survives_backend_failure(self) -> None:
        """A failing count keeps the last value and the Deferred succeeds."""
        storage = self.storage()
        self.backend.stored = 9
        storage.refresh_count()
        self.backend.error = BackendUnavailable("down")
        results: list[object] = []
        storage.refresh_count().addCallback(results.append)
        self.assertEqual((results, storage.stats.fuzzy_stored), ([None], 9))

    def test_ping_echoes_value(self) -> None:
        """PING answers prob 1 with the request value echoed."""
        reply = self.ask(self.storage(), command(Command.PING, value=123456))
        self.assertEqual((reply.value, reply.prob), (123456, 1.0))


class EncryptionTests(PipelineTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.server_key = Keypair.generate()
        self.client = ClientEncryption(self.server_key.public_key, Keypair.generate())

    def test_encrypted_round_trip(self) -> None:
        """An encrypted CHECK gets a 136-byte encrypted reply the client decrypts."""
        self.store()
        storage = self.storage(keypairs=(self.server_key,))
        raw = storage.handle(encode_request(command(), self.client), CLIENT)
        assert isinstance(raw, bytes)
        self.assertEqual(len(raw), 136)
        self.assertEqual(decode_reply(raw, self.client.nm).value, 10)

    def test_encrypted_version3_reply(self) -> None:
        """An encrypted version 3 request gets a 56-byte reply."""
        storage = self.storage(keypairs=(self.server_key,))
        raw = storage.handle(encode_request(command(version=3), self.client), CLIENT)
        assert isinstance(raw, bytes)
        self.assertEqual(len(raw), 56)

    def test_unknown_key_id_uses_default_key(self) -> None:
        """A request for an unknown key id is decrypted with the last keypair."""
        other = Keypair.generate()
        storage = self.storage(keypairs=(other, self.server_key))
        raw = bytearray(encode_request(command(), self.client))
        raw[4:12] = b"\xff" * 8
        answer = storage.handle(bytes(raw), CLIENT)
        assert isinstance(answer, bytes)
        self.assertEqual(decode_reply(answer, self.client.nm).prob, 0.0)

    def test_encrypted_without_keypair_dropped(self) -> None:
        """Without any keypair an encrypted request gets no reply."""
        storage = self.storage()
        self.assertIsNone(storage.handle(encode_request(command(), self.client), CLIENT))
        self.assertEqual(storage.stats.invalid_requests, 1)

    def test_encrypted_only_refuses_plaintext(self) -> None:
        """With ``encrypted_only`` plaintext gets 403 and encrypted requests are served."""
        self.store()
        storage = self.storage(keypairs=(self.server_key,), encrypted_only=True)
        self.assertEqual(self.ask(storage, command()).value, 403)
        self.assertEqual(self.ask(storage, command(), encryption=self.client).value, 10)

    def test_allow_update_keys(self) -> None:
        """Clients of a key listed in ``allow_update_keys`` may write; plaintext may not."""
        storage = self.storage(keypairs=(self.server_key,),
                               allow_update_keys=(self.server_key.id_string,))
        write = command(Command.WRITE, flag=1, value=2)
        self.assertEqual(self.ask(storage, write, encryption=self.client).prob, 1.0)
        self.assertEqual(self.ask(storage, write).value, 403)

    def test_replication_slave_ignores_keys(self) -> None:
        """A replication slave (``masters`` set) never lets key holders write."""
        storage = self.storage(keypairs=(self.server_key,), masters=(ip_network("192.0.2.1"),),
                               allow_update_keys=(self.server_key.id_string,))
        reply = self.ask(storage, command(Command.WRITE), encryption=self.client)
        self.assertEqual(reply.value, 403)

    def test_allow_update_wins_over_keys(self) -> None:
        """When ``allow_update`` exists and the address is outside it, keys are not consulted."""
        storage = self.storage(keypairs=(self.server_key,),
                               allow_update=(ip_network("127.0.0.2"),),
                               allow_update_keys=(self.server_key.id_string,))
        reply = self.ask(storage, command(Command.WRITE), encryption=self.client)
        self.assertEqual(reply.value, 403)

    def test_reconfigure_swaps_keys(self) -> None:
        """After ``reconfigure`` the new keypair decrypts and the old one is gone."""
        storage = self.storage(keypairs=(self.server_key,))
        fresh = Keypair.generate()
        storage.reconfigure(FuzzyOptions(keypairs=(fresh,)))
        self.assertIsNone(storage.handle(encode_request(command(), self.client), CLIENT))
        client = ClientEncryption(fresh.public_key, Keypair.generate())
        self.assertEqual(self.ask(storage, command(), encryption=client).prob, 0.0)

    def test_key_statistics(self) -> None:
        """Encrypted requests are counted under the key's label and the source address."""
        self.store()
        storage = self.storage(keypairs=(self.server_key,))
        self.ask(storage, command(), encryption=self.client)
        self.ask(storage, command(Command.WRITE), encryption=self.client)
        keys = storage.stats.as_dict()["keys"]
        label = key_label(self.server_key)
        self.assertEqual((keys[label]["checked"], keys[label]["matched"], keys[label]["errors"]),
                         (1, 1, 1))
        self.assertEqual(keys[label]["ips"]["127.0.0.1"]["matched"], 1)


class AdmissionAndRobustnessTests(PipelineTestCase):
    def test_blocked_source_dropped(self) -> None:
        """A blocked source gets no reply and is counted."""
        storage = self.storage(blocked=(ip_network("192.0.2.0/24"),))
        self.assertIsNone(storage.handle(encode_request(command()), STRANGER))
        self.assertEqual((storage.stats.blocked_requests, self.backend.lookups), (1, []))

    def test_garbage_dropped_and_counted(self) -> None:
        """Garbage gets no reply, bumps ``invalid_requests`` and the source's error count."""
        storage = self.storage()
        self.assertIsNone(storage.handle(b"\x07" * 80, STRANGER))
        stats = storage.stats.as_dict()
        self.assertEqual((stats["invalid_requests"], stats["errors_ips"]),
                         (1, {"192.0.2.7": 1}))

    def test_invalid_requests_logged_rarely(self) -> None:
        """Invalid requests are logged once per interval, with the number suppressed."""
        storage = self.storage()
        with capturedLogs() as events:
            for _ in range(5):
                storage.handle(b"\x07" * 80, STRANGER)
            self.clock.advance(LOG_INTERVAL)
            storage.handle(b"\x07" * 80, STRANGER)
        logged = [e for e in events if "invalid fuzzy request" in e.get("log_format", "")]
        self.assertEqual([e["suppressed"] for e in logged], [0, 4])
        self.assertEqual(storage.stats.invalid_requests, 6)

    def test_sink_failure_gives_no_reply(self) -> None:
        """An exception inside the pipeline is counted and gives no reply."""

        class BrokenQueue:
            def push(self, update: Update) -> None:
                raise RuntimeError("broken")

        storage = FuzzyStorage(FuzzyOptions(allow_update=(ip_network("127.0.0.1"),)),
                               self.backend, BrokenQueue(), self.clock)
        self.assertIsNone(storage.handle(encode_request(command(Command.WRITE)), CLIENT))
        self.assertEqual(storage.stats.internal_errors, 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_epoch_counters(self) -> None:
        """Every answer counts in its epoch; hits and shingle commands separately."""
        self.store()
        storage = self.storage()
        self.ask(storage, command())
        self.ask(storage, command(version=3, digest=OTHER_DIGEST, shingles=SHINGLES))
        stats = storage.stats.as_dict()
        self.assertEqual((stats["fuzzy_checked"], stats["fuzzy_found"], stats["fuzzy_shingles"]),
                         ([1, 1], [0, 1], [1, 0]))

    def test_metrics(self) -> None:
        """Requests are exported per command and outcome, with the queue depth."""
        storage = FuzzyStorage(FuzzyOptions(), self.backend, self.queue, self.clock,
                               queue_depth=lambda: 7)
        storage.handle(encode_request(command()), CLIENT)
        storage.handle(b"junk" * 30, CLIENT)
        registry = storage.registry
        self.assertEqual(registry.get_sample_value(
            "rspamd_tx_fuzzy_requests_total", {"command": "check", "outcome": "miss"}), 1.0)
        self.assertEqual(registry.get_sample_value(
            "rspamd_tx_fuzzy_requests_total", {"command": "unknown", "outcome": "invalid"}), 1.0)
        self.assertEqual(registry.get_sample_value("rspamd_tx_fuzzy_queue_depth"), 7.0)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=600), st.sampled_from(["127.0.0.1", "192.0.2.7", "::1"]))
    def test_handle_never_raises(self, datagram: bytes, host: str) -> None:
        """Any datagram gives bytes, None or a Deferred, and never an exception."""
        self.store()
        storage = self.storage(allow_update=(HostRef("localhost"),), delay=5.0,
                               ratelimit_rate=1.0, ratelimit_burst=2.0)
        answer = storage.handle(datagram, ip_address(host))
        self.assertIsInstance(answer, (bytes, type(None), Deferred))
        self.assertEqual(storage.stats.internal_errors, 0)

    @settings(max_examples=200, deadline=None)
    @given(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255),
           st.integers(-(2**31), 2**31 - 1), st.binary(max_size=40))
    def test_structured_commands_never_raise(self, version: int, code: int, flag: int,
                                             value: int, tail: bytes) -> None:
        """Well-framed commands with any header values and extension bytes never raise."""
        storage = self.storage(allow_update=(HostRef("localhost"),))
        datagram = struct.pack("<BBBBiI", version, code, 0, flag, value, 1) + DIGEST + tail
        answer = storage.handle(datagram, CLIENT)
        self.assertIsInstance(answer, (bytes, type(None)))
        self.assertEqual(storage.stats.internal_errors, 0)


class NetworkSetTests(unittest.TestCase):
    def test_membership(self) -> None:
        """Addresses match networks of their own family only; None matches nothing."""
        networks = NetworkSet((ip_network("10.0.0.0/8"), ip_network("::1")))
        self.assertIn(ip_address("10.1.2.3"), networks)
        self.assertIn(ip_address("::1"), networks)
        self.assertNotIn(ip_address("11.0.0.1"), networks)
        self.assertNotIn(None, networks)


class UpdateQueueTests(PipelineTestCase):
    """The pipeline feeding the real update queue on a fake clock."""

    def setUp(self) -> None:
        super().setUp()
        self.update_queue = UpdateQueue(self.backend, clock=self.clock, sync=10.0,
                                        spool_path=os.path.abspath(self.mktemp()))
        self.sink = self.update_queue
        self.update_queue.startService()
        self.addCleanup(self.update_queue.stopService)

    def test_write_visible_after_sync(self) -> None:
        """A WRITE is acknowledged at once and found by CHECK after the next flush."""
        storage = self.storage(allow_update=(ip_network("127.0.0.1"),))
        self.update_queue.add_flush_hook(lambda batch, revision: storage.refresh_count())
        self.ask(storage, command(Command.WRITE, flag=1, value=7))
        self.assertEqual((self.ask(storage, command()).prob, self.update_queue.depth), (0.0, 1))
        self.clock.advance(10.0)
        self.assertEqual(self.ask(storage, command()).value, 7)
        self.assertEqual(self.ask(storage, command(Command.STAT)).flag, 1)


DATA = os.path.join(os.path.dirname(__file__), "data", "fuzzy")
SPEC_SERVER_KEY = Keypair.from_secret(bytes(range(0x10, 0x30)))
"""The protocol spec's test storage key, used for the captured encrypted requests."""


def captured(name: str) -> bytes:
    with open(os.path.join(DATA, name), "rb") as handle:
        return handle.read()


class CapturedTrafficTests(PipelineTestCase):
    """Datagrams of real Rspamd 3.4 clients and replies of a real 3.4 storage."""

    def test_write_reply_identical_to_rspamd(self) -> None:
        """Our acknowledgement of a WRITE is byte for byte the real storage's."""
        storage = self.storage(allow_update=(ip_network("127.0.0.1"),))
        write = command(Command.WRITE, digest=bytes(range(0x40, 0x80)), flag=3, value=7, tag=11)
        self.assertEqual(storage.handle(encode_request(write), CLIENT),
                         captured("storage-plain-write-reply.bin"))

    def test_exact_hit_reply_identical_to_rspamd(self) -> None:
        """Our exact-hit CHECK reply is byte for byte the real (sqlite) storage's."""
        digest = bytes(range(0x40, 0x80))
        self.backend.hashes[digest] = CheckResult(7, 3, 1.0, 0, digest)
        check = command(digest=digest, tag=12)
        self.assertEqual(self.storage().handle(encode_request(check), CLIENT),
                         captured("storage-plain-check-hit-reply.bin"))

    def test_captured_write_queued(self) -> None:
        """A fuzzy_check WRITE (shingles, domain extension) is queued with flag and weight."""
        storage = self.storage(allow_update=(ip_network("127.0.0.1"),))
        raw = storage.handle(captured("plain-write-0.bin"), CLIENT)
        assert isinstance(raw, bytes)
        self.assertEqual(decode_reply(raw).prob, 1.0)
        [update] = self.queue.updates
        self.assertEqual((update.kind, update.flag, update.value, len(update.shingles or ())),
                         (UpdateKind.ADD, 1, 10, 32))

    def test_captured_encrypted_write(self) -> None:
        """An encrypted fuzzy_check WRITE is decrypted with our key, queued and answered
        with a 136-byte encrypted reply."""
        storage = self.storage(keypairs=(SPEC_SERVER_KEY,), allow_update=(CLIENT_NETWORK,))
        raw = storage.handle(captured("encrypted-write-0.bin"), CLIENT)
        assert isinstance(raw, bytes)
        self.assertEqual(len(raw), 136)
        self.assertEqual([(u.kind, u.flag, u.value) for u in self.queue.updates],
                         [(UpdateKind.ADD, 1, 10)])

    def test_captured_check(self) -> None:
        """A fuzzy_check CHECK with shingles is looked up with its digest and shingles."""
        storage = self.storage()
        raw = storage.handle(captured("plain-check-0.bin"), CLIENT)
        assert isinstance(raw, bytes)
        self.assertEqual(decode_reply(raw).tag, 1032311634)
        [(_, shingles)] = self.backend.lookups
        self.assertEqual(len(shingles), 32)


@implementer(IImmediateFuzzyBackend)
class ImmediateMemoryBackend(MemoryBackend):
    """:class:`MemoryBackend` answering through ``check_now`` (as SQLite does);
    its Deferred ``check`` must not be used."""

    misused = False

    def check(self, digest: bytes, shingles: Any) -> Deferred[CheckResult]:
        self.misused = True
        raise AssertionError("the storage used check() of an immediate backend")

    def check_now(self, digest: bytes, shingles: Any) -> CheckResult:
        self.lookups.append((digest, shingles))
        if self.error is not None:
            raise self.error
        return self.hashes.get(digest, MISS)


class ImmediateBackendMixin(PipelineTestCase):
    """Runs a test class against :class:`ImmediateMemoryBackend`."""

    def setUp(self) -> None:
        super().setUp()
        backend = self.backend = ImmediateMemoryBackend()
        self.addCleanup(lambda: self.assertFalse(backend.misused))


class ImmediateCheckTests(ImmediateBackendMixin, CheckTests):
    """Every CHECK test, with the lookup answered by ``check_now``."""

    def test_asynchronous_backend(self) -> None:
        """With an immediate backend, handle answers a CHECK at once, never a Deferred."""
        self.store()
        answer = self.storage().handle(encode_request(command()), CLIENT)
        assert isinstance(answer, bytes)
        self.assertEqual((decode_reply(answer).value, self.backend.lookups),
                         (10, [(DIGEST, None)]))

    def test_any_lookup_error_is_a_miss(self) -> None:
        """Whatever check_now raises is a backend error: a miss, counted and logged."""
        self.backend.error = RuntimeError("disk on fire")
        storage = self.storage()
        with capturedLogs() as logged:
            reply = self.ask(storage, command())
        self.assertEqual((reply.value, reply.prob, storage.stats.backend_errors,
                          storage.stats.internal_errors), (0, 0.0, 1, 0))
        self.assertIn("disk on fire", [e.get("error") for e in logged])
        self.assertEqual(storage.registry.get_sample_value(
            "rspamd_tx_fuzzy_requests_total",
            {"command": "check", "outcome": "backend_error"}), 1.0)

    def test_error_after_lookup_is_internal(self) -> None:
        """An error while answering a hit is an internal error, not a backend error."""
        self.store(value=1, prob=2e300)  # cannot be sent as a float32
        storage = self.storage()
        self.assertIsNone(storage.handle(encode_request(command()), CLIENT))
        self.assertEqual((storage.stats.internal_errors, storage.stats.backend_errors), (1, 0))
        self.assertEqual(len(self.flushLoggedErrors()), 1)


class ImmediateWriteTests(ImmediateBackendMixin, WriteTests):
    """Every WRITE test with an immediate backend."""


class ImmediateEncryptionTests(ImmediateBackendMixin, EncryptionTests):
    """Every encryption test with an immediate backend."""


class ImmediateRobustnessTests(ImmediateBackendMixin):
    """The pipeline over an immediate backend never raises and answers at once."""

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=600), st.sampled_from(["127.0.0.1", "192.0.2.7", "::1"]))
    def test_handle_answers_at_once(self, datagram: bytes, host: str) -> None:
        """Any datagram gives bytes or None (never a Deferred), and never an exception."""
        self.store()
        storage = self.storage(allow_update=(HostRef("localhost"),), delay=5.0,
                               ratelimit_rate=1.0, ratelimit_burst=2.0)
        answer = storage.handle(datagram, ip_address(host))
        self.assertIsInstance(answer, (bytes, type(None)))
        self.assertEqual(storage.stats.internal_errors, 0)


class ImmediateCapturedTrafficTests(ImmediateBackendMixin, CapturedTrafficTests):
    """Every captured-traffic test with an immediate backend."""


class CachedPolicyFactsTests(PipelineTestCase):
    """What the pipeline remembers per source, key and outcome stays correct."""

    def test_reconfigure_renews_source_verdicts(self) -> None:
        """A source seen before is judged by the new policy after ``reconfigure``."""
        storage = self.storage(allow_update=(ip_network("127.0.0.1"),))
        self.assertEqual(self.ask(storage, command(Command.WRITE)).prob, 1.0)
        storage.reconfigure(FuzzyOptions(allow_update=(ip_network("127.0.0.2"),)))
        self.assertEqual(self.ask(storage, command(Command.WRITE)).value, 403)
        storage.reconfigure(FuzzyOptions(blocked=(ip_network("127.0.0.0/8"),)))
        self.assertIsNone(storage.handle(encode_request(command()), CLIENT))
        self.assertEqual(storage.stats.blocked_requests, 1)

    def test_delay_whitelist_per_source(self) -> None:
        """Sources in and out of ``delay_whitelist`` keep their own verdicts."""
        self.store(ts=NOW - 1)
        storage = self.storage(delay=60.0, delay_whitelist=(ip_network("127.0.0.1"),))
        for _ in range(2):
            self.assertEqual(self.ask(storage, command()).value, 10)
            self.assertEqual(self.ask(storage, command(), STRANGER).prob, 0.0)
        self.assertEqual(storage.stats.delayed_hashes, 2)

    def test_source_cache_bounded(self) -> None:
        """At most PEER_CACHE_SIZE sources are remembered, the oldest forgotten first,
        and a forgotten source is judged again when it returns."""
        policy = FuzzyPolicy(allow_update=NetworkSet((ip_network("10.0.0.0/8"),)))
        first = ip_address("10.0.0.0")
        for n in range(PEER_CACHE_SIZE + 1):
            policy._peer(ip_address(int(first) + n))
        self.assertEqual(len(policy._peers), PEER_CACHE_SIZE)
        self.assertNotIn(first, policy._peers)
        peer = policy._peer(first)
        self.assertEqual((peer.source, peer.update_allowed, peer.blocked),
                         ("10.0.0.0", True, False))

    def test_ipv4_mapped_source_statistics(self) -> None:
        """An IPv4-mapped source is counted under its IPv4 address, a local one as unix."""
        self.store()
        storage = self.storage()
        self.ask(storage, command(), ip_address("::ffff:127.0.0.1"))
        self.ask(storage, command(), None)
        ips = storage.stats.as_dict()["keys"]["unkeyed"]["ips"]
        self.assertEqual((ips["127.0.0.1"]["matched"], ips["unix"]["matched"]), (1, 1))

    def test_source_statistics_least_recently_used(self) -> None:
        """Per-source counters keep the IP_STATS_SIZE most recently seen sources."""
        storage = self.storage()
        first = int(ip_address("10.0.0.0"))
        self.ask(storage, command(), ip_address(first))
        for n in range(1, IP_STATS_SIZE):
            self.ask(storage, command(), ip_address(first + n))
        self.ask(storage, command(), ip_address(first))  # seen again: now the most recent
        self.ask(storage, command(), ip_address(first + IP_STATS_SIZE))
        ips = storage.stats.as_dict()["keys"]["unkeyed"]["ips"]
        self.assertEqual(len(ips), IP_STATS_SIZE)
        self.assertEqual(ips["10.0.0.0"]["checked"], 2)
        self.assertNotIn("10.0.0.1", ips)

    def test_key_label_after_reconfigure(self) -> None:
        """A reply that arrives after the keys changed still counts under its own key."""
        server_key = Keypair.generate()
        client = ClientEncryption(server_key.public_key, Keypair.generate())
        self.backend.hold = True
        storage = self.storage(keypairs=(server_key,))
        answer = storage.handle(encode_request(command(), client), CLIENT)
        storage.reconfigure(FuzzyOptions(keypairs=(Keypair.generate(),)))
        self.backend.held[0].callback(MISS)
        self.assertIsInstance(answer, Deferred)
        keys = storage.stats.as_dict()["keys"]
        self.assertEqual(keys[key_label(server_key)]["checked"], 1)

    def test_may_write_with_other_keypair_object(self) -> None:
        """Key holders are recognised by key, whether or not the keypair object is the
        policy's own."""
        server_key = Keypair.generate()
        policy = FuzzyPolicy(keypairs=(server_key,),
                             allow_update_keys=frozenset({server_key.id_string}))
        twin = Keypair.from_secret(server_key.secret_key)
        self.assertIsNot(twin, server_key)
        self.assertEqual([policy.may_write(CLIENT, k) for k in (server_key, twin, None)],
                         [True, True, False])
        self.assertFalse(policy.may_write(CLIENT, Keypair.generate()))
        self.assertEqual((policy.label(server_key), policy.label(twin), policy.label(None)),
                         (key_label(server_key), key_label(server_key), "unkeyed"))

    def test_metrics_accumulate(self) -> None:
        """Repeated outcomes add up in their own series."""
        self.store()
        storage = self.storage()
        for _ in range(3):
            self.ask(storage, command())
        self.ask(storage, command(digest=OTHER_DIGEST))
        samples = [storage.registry.get_sample_value(
            "rspamd_tx_fuzzy_requests_total", {"command": "check", "outcome": outcome})
            for outcome in ("hit", "miss")]
        self.assertEqual(samples, [3.0, 1.0])

