"""The durable update queue: de-duplication, periodic flush, retry, spool, recovery."""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Sequence
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.task import Clock, deferLater
from twisted.trial import unittest
from zope.interface import implementer

from rspamd_tx.fuzzy.backend import (
    LOCAL_SOURCE,
    BackendUnavailable,
    CheckResult,
    IFuzzyBackend,
    Update,
    UpdateKind,
    deduplicate,
)
from rspamd_tx.fuzzy.update_queue import (
    SPOOL_NAME,
    Spool,
    SpoolError,
    UpdateQueue,
    decode_update,
    encode_update,
)
from tests.peers.redis import skip_unless_redis, start_redis

SYNC = 60.0

reactor: Any = _reactor


def digest(n: int) -> bytes:
    return n.to_bytes(2, "big") * 32


def add(n: int, flag: int = 1, value: int = 1) -> Update:
    return Update(UpdateKind.ADD, digest(n), flag, value)


def kind(k: UpdateKind, n: int, flag: int = 1) -> Update:
    return Update(k, digest(n), flag)


@implementer(IFuzzyBackend)
class RecordingBackend:
    """Stores batches in a list; can be switched unavailable or made to hold replies."""

    lifetime = 172800.0

    def __init__(self) -> None:
        self.batches: list[list[Update]] = []
        self.available = True
        self.held: list[Deferred[int]] = []
        self.hold = False
        self.calls = 0

    def check(self, digest: bytes, shingles: Any) -> Deferred[CheckResult]:
        return succeed(CheckResult())

    def apply(self, updates: Sequence[Update], source: str = LOCAL_SOURCE) -> Deferred[int]:
        self.calls += 1
        if not self.available:
            return fail(BackendUnavailable("down"))
        if self.hold:
            d: Deferred[int] = Deferred()
            d.addCallback(self._store_held, list(updates))
            self.held.append(d)
            return d
        self._store(updates)
        return succeed(len(self.batches))

    def _store(self, updates: Sequence[Update]) -> None:
        self.batches.append(list(updates))

    def _store_held(self, revision: int, updates: list[Update]) -> int:
        self._store(updates)
        return revision

    def stored(self) -> list[Update]:
        return [update for batch in self.batches for update in batch]

    def count(self) -> Deferred[int]:
        return succeed(len(self.stored()))

    def version(self, source: str) -> Deferred[int]:
        return succeed(len(self.batches))

    def expire(self, now: float) -> Deferred[int]:
        return succeed(0)

    def close(self) -> Deferred[None]:
        return succeed(None)


class DeduplicateTests(unittest.TestCase):
    """Rspamd's queue de-duplication table (spec §1.1)."""

    def test_write_write_sums(self) -> None:
        """Two WRITEs of one digest and flag become one with the summed value."""
        self.assertEqual(deduplicate([add(1, value=2), add(1, value=3)]), [add(1, value=5)])

    def test_refresh_then_write_keeps_write(self) -> None:
        """A WRITE after a REFRESH drops the REFRESH."""
        self.assertEqual(deduplicate([kind(UpdateKind.REFRESH, 1), add(1)]), [add(1)])

    def test_del_then_write_drops_write(self) -> None:
        """A WRITE after a DEL is dropped."""
        self.assertEqual(deduplicate([kind(UpdateKind.DEL, 1), add(1)]),
                         [kind(UpdateKind.DEL, 1)])

    def test_refresh_after_anything_dropped(self) -> None:
        """A REFRESH after another entry of the digest is dropped."""
        self.assertEqual(deduplicate([add(1), kind(UpdateKind.REFRESH, 1)]), [add(1)])

    def test_del_wins(self) -> None:
        """A DEL drops the earlier entry and is kept."""
        self.assertEqual(deduplicate([add(1), add(2), kind(UpdateKind.DEL, 1)]),
                         [add(2), kind(UpdateKind.DEL, 1)])

    def test_other_flag_left_alone(self) -> None:
        """Entries whose flag differs from the first one seen are kept as they are."""
        batch = [add(1, flag=1), add(1, flag=2), add(1, flag=2)]
        self.assertEqual(deduplicate(batch), batch)


class SpoolRecordTests(unittest.TestCase):
    """The spool's record format."""

    @settings(max_examples=200, deadline=None)
    @given(kind=st.sampled_from(list(UpdateKind)), flag=st.integers(0, 2**32 - 1),
           value=st.integers(-(2**63), 2**63 - 1), raw=st.binary(min_size=64, max_size=64),
           shingles=st.none() | st.lists(st.integers(0, 2**64 - 1), min_size=32, max_size=32),
           source=st.text(max_size=40), weak=st.booleans())
    def test_round_trip(self, kind: UpdateKind, flag: int, value: int, raw: bytes,
                        shingles: list[int] | None, source: str, weak: bool) -> None:
        """Every update survives encoding and decoding unchanged."""
        update = Update(kind, raw, flag, value, tuple(shingles) if shingles else None, source,
                        weak)
        record = encode_update(update)
        self.assertEqual(decode_update(record[8:]), update)

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=400))
    def test_garbage_raises_only_spool_error(self, payload: bytes) -> None:
        """Random payloads decode or raise SpoolError, never anything else."""
        try:
            decode_update(payload)
        except SpoolError:
            pass

    def test_marks_byte(self) -> None:
        """Byte 13 of the payload marks shingles (bit 0) and a weak update (bit 1);
        a record with any other bit set is refused."""
        weak = encode_update(Update(UpdateKind.ADD, bytes(64), 1, 1, None, "x", True))[8:]
        plain = encode_update(Update(UpdateKind.ADD, bytes(64), 1, 1, None, "x"))[8:]
        self.assertEqual((weak[13], plain[13], weak[:13] + weak[14:] == plain[:13] + plain[14:]),
                         (2, 0, True))
        self.assertRaises(SpoolError, decode_update, weak[:13] + b"\x04" + weak[14:])

    def test_out_of_range_flag_refused(self) -> None:
        """A flag beyond 32 bits cannot be spooled."""
        self.assertRaises(SpoolError, encode_update, add(1, flag=2**32))


class UpdateQueueTests(unittest.TestCase):
    """The queue with a recording backend and a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.backend = RecordingBackend()
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.spool_path = os.path.join(self.directory, SPOOL_NAME)

    def make(self, **options: Any) -> UpdateQueue:
        queue = UpdateQueue(self.backend, clock=self.clock, sync=SYNC,
                            spool_path=self.spool_path, **options)
        queue.startService()
        self.addCleanup(self.stop, queue)
        return queue

    def stop(self, queue: UpdateQueue) -> Any:
        """Release held replies and stop ``queue`` if it still runs."""
        self.backend.hold = False
        for held in self.backend.held:
            if not held.called:
                held.callback(0)
        return queue.stopService() if queue.running else None

    def test_flush_every_sync(self) -> None:
        """Nothing is stored before ``sync`` seconds; then the batch is, de-duplicated."""
        queue = self.make()
        queue.push(add(1, value=2))
        queue.push(add(1, value=3))
        self.clock.advance(SYNC - 1)
        self.assertEqual(self.backend.batches, [])
        self.clock.advance(1)
        self.assertEqual((self.backend.batches, queue.depth), ([[add(1, value=5)]], 0))

    def test_hook_gets_batch_and_revision(self) -> None:
        """The flush hook sees each stored batch and the backend's revision."""
        queue = self.make()
        seen: list[tuple[list[Update], int]] = []
        queue.add_flush_hook(lambda batch, revision: seen.append((list(batch), revision)))
        queue.push(add(1))
        self.clock.advance(SYNC)
        queue.push(add(2))
        self.clock.advance(SYNC)
        self.assertEqual(seen, [([add(1)], 1), ([add(2)], 2)])

    def test_failing_backend_keeps_updates(self) -> None:
        """A batch the backend refuses stays queued, and is stored once it recovers."""
        queue = self.make()
        self.backend.available = False
        queue.push(add(1))
        queue.push(add(2))
        self.clock.advance(SYNC)
        self.assertEqual((queue.depth, queue.failures), (2, 1))
        self.backend.available = True
        self.clock.advance(1)
        self.assertEqual((self.backend.stored(), queue.depth), ([add(1), add(2)], 0))

    def test_backoff_doubles(self) -> None:
        """Retries come after 1, 2, 4 … seconds, capped by retry_max."""
        queue = self.make(retry_initial=1.0, retry_max=4.0)
        self.backend.available = False
        queue.push(add(1))
        self.clock.advance(SYNC)
        attempts = [self.backend.calls]
        for delay in (1, 2, 4, 4):
            self.clock.advance(delay - 0.01)
            attempts.append(self.backend.calls)
            self.clock.advance(0.01)
            attempts.append(self.backend.calls)
        self.assertEqual(attempts, [1, 1, 2, 2, 3, 3, 4, 4, 5])

    def test_no_overlapping_flushes(self) -> None:
        """A tick while a flush is running does not start a second one."""
        queue = self.make()
        self.backend.hold = True
        queue.push(add(1))
        self.clock.advance(SYNC)
        queue.push(add(2))
        self.clock.advance(SYNC)
        self.assertEqual(self.backend.calls, 1)
        self.backend.held[0].callback(1)
        self.assertEqual((self.backend.calls, queue.depth), (2, 1))

    def test_over_bound_spooled(self) -> None:
        """Past ``max_memory`` updates, waiting updates go to the spool file."""
        queue = self.make(max_memory=3)
        self.backend.available = False
        for n in range(5):
            queue.push(add(n))
        spool = Spool(self.spool_path)
        spool.open()
        self.assertEqual((spool.pending, queue.depth), (4, 5))

    def test_recovery_replays_in_order_and_truncates(self) -> None:
        """After recovery, spooled updates are stored first, in order; the file is emptied."""
        queue = self.make(max_memory=2)
        self.backend.available = False
        for n in range(7):
            queue.push(add(n))
        self.clock.advance(SYNC)
        self.backend.available = True
        self.clock.advance(1)
        self.assertEqual(self.backend.stored(), [add(n) for n in range(7)])
        self.assertEqual((os.path.getsize(self.spool_path), queue.depth), (0, 0))

    def test_spool_consumed_batch_by_batch(self) -> None:
        """With small batches, the stored part of the spool is remembered by its offset.

        Five pushes with max_memory 1 spool four updates; the first stored
        batch of two leaves two pending on disk (the second batch is in flight).
        """
        queue = self.make(max_memory=1, max_batch=2)
        self.backend.available = False
        for n in range(5):
            queue.push(add(n))
        self.backend.available = True
        self.backend.hold = True
        self.clock.advance(SYNC)
        self.backend.held[0].callback(1)
        spool = Spool(self.spool_path)
        spool.open()
        self.assertEqual((spool.pending, queue.depth), (2, 3))

    def test_restart_from_spool(self) -> None:
        """Updates spooled at stop are stored by the next queue started on the same file."""
        queue = self.make()
        self.backend.available = False
        queue.push(add(1))
        queue.push(add(2))
        queue.stopService()
        self.backend.available = True
        self.make()
        self.assertEqual(self.backend.stored(), [add(1), add(2)])
        self.assertEqual(os.path.getsize(self.spool_path), 0)

    def test_stop_flushes(self) -> None:
        """Stopping the service stores what is queued when the backend is up."""
        queue = self.make()
        queue.push(add(1))
        queue.stopService()
        self.assertEqual(self.backend.stored(), [add(1)])
        self.assertFalse(os.path.exists(self.spool_path))

    def test_torn_tail_cut(self) -> None:
        """A record cut short by a crash is removed; the complete ones are replayed."""
        with open(self.spool_path, "wb") as handle:
            handle.write(encode_update(add(1)) + encode_update(add(2))[:30])
        self.make()
        self.assertEqual(self.backend.stored(), [add(1)])

    def test_undecodable_record_skipped(self) -> None:
        """A checksummed record that does not decode is skipped; the others are stored."""
        payload = b"\x07" * 20
        bad = struct.pack("<II", len(payload), zlib.crc32(payload)) + payload
        with open(self.spool_path, "wb") as handle:
            handle.write(encode_update(add(1)) + bad + encode_update(add(2)))
        queue = self.make()
        self.assertEqual((self.backend.stored(), queue.depth), ([add(1), add(2)], 0))
        self.assertEqual(os.path.getsize(self.spool_path), 0)

    def test_explicit_flush(self) -> None:
        """flush() stores at once (the ``fuzzy_sync`` control command)."""
        queue = self.make()
        queue.push(add(1))
        queue.flush()
        self.assertEqual(self.backend.stored(), [add(1)])


class RedisOutageTests(unittest.TestCase):
    """The queue in front of a real Redis that is killed and restarted."""

    skip = skip_unless_redis()

    @inlineCallbacks
    def test_nothing_lost_across_redis_restart(self) -> Any:
        """A stream of learns pushed while Redis is killed and restarted is stored entirely."""
        from rspamd_tx.fuzzy.redis_backend import RedisFuzzyBackend

        redis = yield start_redis(reactor, persistent=True)
        self.addCleanup(redis.stop)
        backend = RedisFuzzyBackend(reactor=reactor, clock=reactor, servers=redis.address,
                                    timeout=0.5)
        self.addCleanup(backend.close)
        directory = self.mktemp()
        os.makedirs(directory)
        queue = UpdateQueue(backend, clock=reactor, sync=0.05,
                            spool_path=os.path.join(directory, SPOOL_NAME),
                            max_memory=50, retry_initial=0.1, retry_max=0.5)
        queue.startService()
        self.addCleanup(queue.stopService)
        total = 300
        for n in range(total):
            queue.push(add(n))
            if n == 100:
                yield redis.kill()
            if n == 200:
                yield redis.start()
            yield deferLater(reactor, 0.002, lambda: None)
        for _ in range(300):
            if queue.depth == 0:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(queue.depth, 0)
        found = 0
        for n in range(total):
            result = yield backend.check(digest(n), None)
            found += result.hit
        self.assertEqual(found, total)
