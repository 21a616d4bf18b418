"""The SQLite fuzzy backend: lookups, update semantics, expiry, atomicity, persistence."""

from __future__ import annotations

import os
from dataclasses import replace
import sqlite3
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from rspamd_tx.fuzzy.backend import (
    MISS,
    BackendUnavailable,
    IFuzzyBackend,
    IImmediateFuzzyBackend,
    Update,
    UpdateKind,
)
from rspamd_tx.fuzzy.sqlite_backend import SqliteFuzzyBackend

DAY = 86400.0
START = 1_700_000_000.0

reactor: Any = _reactor


def digest(n: int) -> bytes:
    return bytes([n]) * 64


def shingles(n: int) -> tuple[int, ...]:
    """32 distinct shingles for message ``n``, some above 2**63."""
    return tuple((n << 56) + (i << 1) + (1 << 63 if i % 2 else 0) for i in range(32))


def add(n: int, flag: int = 1, value: int = 1, with_shingles: bool = False) -> Update:
    return Update(UpdateKind.ADD, digest(n), flag, value, shingles(n) if with_shingles else None)


class SqliteBackendTests(unittest.TestCase):
    """One database in a temporary directory, time from a :class:`Clock`."""

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        self.clock = Clock()
        self.clock.advance(START)
        self.path = os.path.join(self.mktemp(), "fuzzy.db")
        os.makedirs(os.path.dirname(self.path))
        self.backend = yield self.open()

    @inlineCallbacks
    def open(self, lifetime: float = 2 * DAY) -> Any:
        backend = SqliteFuzzyBackend(self.path, reactor=reactor, clock=self.clock,
                                     lifetime=lifetime)
        yield backend.start()
        self.addCleanup(backend.close)
        return backend

    def test_provides_interface(self) -> None:
        """The backend provides IFuzzyBackend, and IImmediateFuzzyBackend too."""
        self.assertTrue(verifyObject(IFuzzyBackend, self.backend))
        self.assertTrue(verifyObject(IImmediateFuzzyBackend, self.backend))

    @inlineCallbacks
    def test_check_now_answers_as_check(self) -> Any:
        """check_now returns what check fires with: exact and shingle hits, misses, and
        expired hashes (misses)."""
        yield self.backend.apply([add(1, flag=3, value=7), add(2, with_shingles=True)])
        self.clock.advance(DAY)
        yield self.backend.apply([add(3)])
        lookups = ((digest(1), None), (digest(9), shingles(2)), (digest(9), None),
                   (digest(3), None))
        seen = []
        for _ in range(2):
            for key, slots in lookups:
                expected = yield self.backend.check(key, slots)
                self.assertEqual(self.backend.check_now(key, slots), expected)
                seen.append(expected.prob)
            self.clock.advance(1.5 * DAY)
        self.assertEqual(seen, [1.0, 31 / 32, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])

    @inlineCallbacks
    def test_check_now_on_closed_database(self) -> Any:
        """check_now raises BackendUnavailable once the database is closed; check fails."""
        yield self.backend.close()
        self.assertRaises(BackendUnavailable, self.backend.check_now, digest(1), None)
        yield self.assertFailure(self.backend.check(digest(1), None), BackendUnavailable)

    @inlineCallbacks
    def test_exact_hit(self) -> Any:
        """A learned digest is found with prob 1.0, its weight, flag and write time."""
        yield self.backend.apply([add(1, flag=3, value=7)])
        result = yield self.backend.check(digest(1), None)
        self.assertEqual((result.value, result.flag, result.prob, result.timestamp, result.digest),
                         (7, 3, 1.0, int(START), digest(1)))

    @inlineCallbacks
    def test_miss(self) -> Any:
        """An unknown digest without shingles is a miss with everything zero."""
        yield self.backend.apply([add(1)])
        result = yield self.backend.check(digest(2), None)
        self.assertEqual(result, MISS)

    @inlineCallbacks
    def test_shingle_hit(self) -> Any:
        """All 32 shingles of a stored message match with Rspamd's prob 31/32."""
        yield self.backend.apply([add(1, value=5, with_shingles=True)])
        result = yield self.backend.check(digest(9), shingles(1))
        self.assertEqual((result.value, result.prob, result.digest), (5, 31 / 32, digest(1)))

    @inlineCallbacks
    def test_shingle_partial_hit(self) -> Any:
        """17 agreeing slots (the rest unknown) are a hit with prob 17/32."""
        yield self.backend.apply([add(1, with_shingles=True)])
        query = shingles(1)[:17] + shingles(50)[17:]
        result = yield self.backend.check(digest(9), query)
        self.assertEqual((result.prob, result.digest), (17 / 32, digest(1)))

    @inlineCallbacks
    def test_shingle_sixteen_is_miss(self) -> Any:
        """16 agreeing slots are not enough."""
        yield self.backend.apply([add(1, with_shingles=True)])
        query = shingles(1)[:16] + shingles(50)[16:]
        result = yield self.backend.check(digest(9), query)
        self.assertEqual(result, MISS)

    @inlineCallbacks
    def test_add_same_flag_sums(self) -> Any:
        """Learning a digest again with the same flag adds the weights."""
        yield self.backend.apply([add(1, flag=2, value=3)])
        yield self.backend.apply([add(1, flag=2, value=4)])
        result = yield self.backend.check(digest(1), None)
        self.assertEqual((result.value, result.flag), (7, 2))

    @inlineCallbacks
    def test_add_other_flag_replaces(self) -> Any:
        """Learning with another flag replaces flag and weight (Rspamd's sqlite rule)."""
        yield self.backend.apply([add(1, flag=2, value=3)])
        yield self.backend.apply([add(1, flag=5, value=4)])
        result = yield self.backend.check(digest(1), None)
        self.assertEqual((result.value, result.flag), (4, 5))

    @inlineCallbacks
    def test_weak_add_keeps_another_flag(self) -> Any:
        """A weak learn under another flag leaves flag and weight, restarting the lifetime;
        under the stored flag it adds its weight, and it stores a new digest."""
        yield self.backend.apply([add(1, flag=2, value=3)])
        self.clock.advance(100)
        yield self.backend.apply([replace(add(1, flag=5, value=4), weak=True)])
        other = yield self.backend.check(digest(1), None)
        yield self.backend.apply([replace(add(1, flag=2, value=4), weak=True)])
        same = yield self.backend.check(digest(1), None)
        yield self.backend.apply([replace(add(2, flag=5, value=6), weak=True)])
        new = yield self.backend.check(digest(2), None)
        self.assertEqual([(other.value, other.flag, other.timestamp - START),
                          (same.value, same.flag), (new.value, new.flag)],
                         [(3, 2, 100), (7, 2), (6, 5)])

    @inlineCallbacks
    def test_del_removes_digest_and_shingles(self) -> Any:
        """DEL forgets the digest whatever the flag, and its shingles with it."""
        yield self.backend.apply([add(1, flag=2, with_shingles=True)])
        yield self.backend.apply([Update(UpdateKind.DEL, digest(1), 9)])
        exact = yield self.backend.check(digest(1), None)
        fuzzy = yield self.backend.check(digest(9), shingles(1))
        self.assertEqual((exact, fuzzy), (MISS, MISS))

    @inlineCallbacks
    def test_refresh_extends_life(self) -> Any:
        """REFRESH sets the write time to now, so the hash outlives its first expiry."""
        yield self.backend.apply([add(1)])
        self.clock.advance(1.5 * DAY)
        yield self.backend.apply([Update(UpdateKind.REFRESH, digest(1), 1)])
        self.clock.advance(DAY)
        result = yield self.backend.check(digest(1), None)
        self.assertEqual(result.timestamp, int(START + 1.5 * DAY))

    @inlineCallbacks
    def test_expired_hash_invisible(self) -> Any:
        """A hash older than the lifetime is a miss even before it is swept."""
        yield self.backend.apply([add(1)])
        self.clock.advance(2 * DAY + 1)
        result = yield self.backend.check(digest(1), None)
        self.assertEqual(result, MISS)

    @inlineCallbacks
    def test_expire_sweeps_old_rows(self) -> Any:
        """expire() deletes hashes older than the lifetime and keeps younger ones."""
        yield self.backend.apply([add(1)])
        self.clock.advance(DAY)
        yield self.backend.apply([add(2)])
        self.clock.advance(1.5 * DAY)
        removed = yield self.backend.expire(self.clock.seconds())
        count = yield self.backend.count()
        self.assertEqual((removed, count), (1, 1))

    @inlineCallbacks
    def test_version_counts_modifying_batches(self) -> Any:
        """The source revision grows per batch with an ADD or DEL, not for REFRESH only."""
        first = yield self.backend.apply([add(1), add(2)])
        second = yield self.backend.apply([Update(UpdateKind.REFRESH, digest(1), 1)])
        third = yield self.backend.apply([Update(UpdateKind.DEL, digest(2), 1)], "peer")
        local = yield self.backend.version("local")
        peer = yield self.backend.version("peer")
        self.assertEqual((first, second, third, local, peer), (1, 1, 1, 1, 1))

    @inlineCallbacks
    def test_batch_is_atomic(self) -> Any:
        """A batch failing half-way stores nothing and fails with BackendUnavailable."""
        raw = sqlite3.connect(self.path)
        raw.execute("CREATE TRIGGER refuse BEFORE INSERT ON digests WHEN NEW.flag = 66 "
                    "BEGIN SELECT RAISE(ABORT, 'refused'); END")
        raw.commit()
        raw.close()
        yield self.assertFailure(self.backend.apply([add(1), add(2, flag=66)]),
                                 BackendUnavailable)
        count = yield self.backend.count()
        version = yield self.backend.version("local")
        self.assertEqual((count, version), (0, 0))

    @inlineCallbacks
    def test_persists_across_reopen(self) -> Any:
        """Hashes, shingles and the revision survive closing and reopening the file."""
        yield self.backend.apply([add(1, value=4, with_shingles=True)])
        yield self.backend.close()
        backend = yield self.open()
        result = yield backend.check(digest(9), shingles(1))
        version = yield backend.version("local")
        self.assertEqual((result.value, result.digest, version), (4, digest(1), 1))

    @inlineCallbacks
    def test_scan_lists_hashes_in_order(self) -> Any:
        """scan() pages through stored hashes in digest order, with their shingles."""
        yield self.backend.apply([add(3, value=2), add(1, with_shingles=True), add(2)])
        first = yield self.backend.scan(None, 2)
        rest = yield self.backend.scan(first[-1].digest, 2)
        self.assertEqual([(u.digest, u.value, u.shingles) for u in first + rest],
                         [(digest(1), 1, shingles(1)), (digest(2), 1, None),
                          (digest(3), 2, None)])

    @inlineCallbacks
    def test_add_then_del_in_one_batch(self) -> Any:
        """A digest learned and deleted in one batch (other flags) leaves no shingles behind."""
        yield self.backend.apply([add(1, flag=1, with_shingles=True),
                                  Update(UpdateKind.DEL, digest(1), 2)])
        result = yield self.backend.check(digest(9), shingles(1))
        self.assertEqual(result, MISS)

    @inlineCallbacks
    def test_shared_slot_taken_over(self) -> Any:
        """A new digest takes over shingle slots it shares with an older one."""
        yield self.backend.apply([add(1, with_shingles=True)])
        yield self.backend.apply([Update(UpdateKind.ADD, digest(2), 1, 1, shingles(1))])
        result = yield self.backend.check(digest(9), shingles(1))
        self.assertEqual(result.digest, digest(2))
