"""The embedded fuzzy backend: one SQLite database file.

Schema (our own, built for point lookups; ``PRAGMA user_version`` = 1)::

    digests(id INTEGER PRIMARY KEY, digest BLOB UNIQUE, flag, value, time)
    shingles(number, value, digest_id -> digests.id ON DELETE CASCADE)
        PRIMARY KEY (number, value), WITHOUT ROWID
    sources(name PRIMARY KEY, version, last)

``shingles.value`` is the unsigned shingle hash reinterpreted as a signed
64-bit integer (SQLite integers are signed). ``time`` is the unix second of
the last write (or REFRESH).

Threads: every write (and the schema set-up, the hash count and the expiry
sweep) runs on one dedicated worker thread (a single-thread
:class:`~twisted.python.threadpool.ThreadPool` owned by the backend, started by
:meth:`SqliteFuzzyBackend.start` and stopped by :meth:`SqliteFuzzyBackend.close`)
through ``deferToThreadPool``. CHECK and version reads run on the reactor
thread through a second connection: they are indexed point lookups, and WAL
mode lets them proceed while the worker thread writes.  The backend provides
:class:`~rspamd_tx.fuzzy.backend.IImmediateFuzzyBackend`, so a CHECK needs no
Deferred (:meth:`SqliteFuzzyBackend.check_now`).

Semantics follow Rspamd's sqlite backend (``fuzzy-storage.md`` §6.2):

* ADD on an existing digest with the same flag adds the weight; with another
  flag it replaces both weight and flag; shingles are written only when the
  digest is new (a slot shared with an older digest is taken over);
* DEL removes the digest and its shingles;
* REFRESH sets ``time`` to now (Rspamd's sqlite backend ignores it; here it
  keeps hashes that keep matching alive, as Redis does);
* hashes older than ``lifetime`` are invisible to CHECK and removed by
  :meth:`SqliteFuzzyBackend.expire` (at most 5000 per run), which runs at
  start, at close and after each flush that changed something;
* the shingle vote is Rspamd's Redis vote (:func:`~rspamd_tx.fuzzy.backend.vote_shingles`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from twisted.internet import threads
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from rspamd_tx.fuzzy.backend import (
    DEFAULT_EXPIRE,
    LOCAL_SOURCE,
    MISS,
    SHINGLE_COUNT,
    BackendUnavailable,
    CheckResult,
    Digest,
    IImmediateFuzzyBackend,
    Shingles,
    Update,
    UpdateKind,
    vote_shingles,
)

_T = TypeVar("_T")

SCHEMA_VERSION = 1
EXPIRE_BATCH = 5000
"""At most this many expired hashes are deleted per :meth:`SqliteFuzzyBackend.expire`."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS digests(
    id INTEGER PRIMARY KEY,
    digest BLOB NOT NULL UNIQUE,
    flag INTEGER NOT NULL,
    value INTEGER NOT NULL,
    time INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS digests_time ON digests(time);
CREATE TABLE IF NOT EXISTS shingles(
    number INTEGER NOT NULL,
    value INTEGER NOT NULL,
    digest_id INTEGER NOT NULL REFERENCES digests(id) ON DELETE CASCADE,
    PRIMARY KEY (number, value)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS shingles_digest ON shingles(digest_id);
CREATE TABLE IF NOT EXISTS sources(
    name TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    last INTEGER NOT NULL);
"""

_SHINGLE_LOOKUP = " UNION ALL ".join(
    [f"SELECT {number} AS number, digest_id FROM shingles WHERE number = {number} AND value = ?"
     for number in range(SHINGLE_COUNT)]
)
_DIGEST_LOOKUP = "SELECT value, flag, time FROM digests WHERE digest = ?"
_SHINGLE_OWNERS = (
    "SELECT q.number, d.digest FROM (" + _SHINGLE_LOOKUP + ") AS q "
    "JOIN digests AS d ON d.id = q.digest_id"
)


def _signed(value: int) -> int:
    """An unsigned 64-bit shingle as the signed integer SQLite stores."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _configure(connection: sqlite3.Connection) -> None:
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = NORMAL")
    connection.execute("PRAGMA foreign_keys = ON")
    connection.execute("PRAGMA mmap_size = 268435456")
    connection.execute("PRAGMA cache_size = -65536")


@implementer(IImmediateFuzzyBackend)
class SqliteFuzzyBackend:
    """Fuzzy hashes in one SQLite file.

    Call :meth:`start` (fires once the database is ready) before anything
    else and :meth:`close` at the end. Errors of SQLite while writing make
    :meth:`apply` fail with :class:`BackendUnavailable`, the transaction rolled
    back (nothing of the batch stored).

    Attributes:
        path: the database file.
        lifetime: the ``expire`` option in seconds.
    """

    def __init__(
        self,
        path: str,
        *,
        reactor: IReactorFromThreads,
        clock: IReactorTime | None = None,
        lifetime: float = DEFAULT_EXPIRE,
    ) -> None:
        """
        :param path: database file, created if missing.
        :param reactor: used to hand results back from the worker thread.
        :param clock: source of time; defaults to ``reactor``.
        :param lifetime: seconds a hash lives after its last write.
        """
        self.path = path
        self.lifetime = float(lifetime)
        self._reactor = reactor
        self._clock: IReactorTime = clock if clock is not None else reactor  # type: ignore[assignment]
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name=f"fuzzy-sqlite:{path}")
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None

    # -- life cycle ---------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Start the worker thread, create the schema and sweep expired hashes."""
        self._pool.start()
        d = self._in_thread(self._open_writer)
        d.addCallback(lambda _: self._open_reader())
        d.addCallback(lambda _: self.expire(self._clock.seconds()))
        d.addCallback(lambda _: None)
        return d

    def close(self) -> Deferred[None]:
        """Sweep expired hashes, close both connections and stop the thread.

        Closing a closed backend does nothing.
        """
        if not self._pool.started:
            return succeed(None)
        if self._writer is None:
            self._pool.stop()
            return succeed(None)
        d: Deferred[Any] = self.expire(self._clock.seconds())
        d.addErrback(lambda _: None)
        d.addCallback(lambda _: self._in_thread(self._close_writer))

        def finish(result: object) -> object:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
            self._pool.stop()
            return result

        d.addBoth(finish)
        d.addCallback(lambda _: None)
        return d

    def _open_writer(self) -> None:
        connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        _configure(connection)
        connection.executescript(_SCHEMA)
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self._writer = connection

    def _open_reader(self) -> None:
        connection = sqlite3.connect(self.path, isolation_level=None, timeout=0.05)
        _configure(connection)
        connection.execute("PRAGMA query_only = ON")
        self._reader = connection

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _in_thread(self, function: Callable[..., _T], *args: object) -> Deferred[_T]:
        return threads.deferToThreadPool(self._reactor, self._pool, function, *args)

    # -- reads --------------------------------------------------------------

    def check(self, digest: Digest, shingles: Shingles | None) -> Deferred[CheckResult]:
        """Exact digest first, then the shingle vote; fires with :data:`MISS` if none."""
        try:
            return succeed(self.check_now(digest, shingles))
        except BackendUnavailable as error:
            return fail(error)

    def check_now(self, digest: Digest, shingles: Shingles | None) -> CheckResult:
        """:meth:`check`'s result, returned at once (the read runs on this thread).

        Raises :class:`BackendUnavailable` for any SQLite error (including a
        database that is not open).
        """
        try:
            return self._check(digest, shingles, self._clock.seconds())
        except sqlite3.Error as error:
            raise BackendUnavailable(str(error)) from None

    def _check(self, digest: Digest, shingles: Shingles | None, now: float) -> CheckResult:
        reader = self._connected_reader()
        oldest = now - self.lifetime
        row = reader.execute(_DIGEST_LOOKUP, (digest,)).fetchone()
        if row is not None and row[2] >= oldest:
            return CheckResult(row[0], row[1], 1.0, row[2], digest)
        if shingles is None:
            return MISS
        owners: list[bytes | None] = [None] * SHINGLE_COUNT
        for number, owner in reader.execute(_SHINGLE_OWNERS, [_signed(v) for v in shingles]):
            owners[number] = owner
        winner, agreeing = vote_shingles(owners)
        if winner is None:
            return MISS
        row = reader.execute(_DIGEST_LOOKUP, (winner,)).fetchone()
        if row is None or row[2] < oldest:
            return MISS
        return CheckResult(row[0], row[1], agreeing / SHINGLE_COUNT, row[2], winner)

    def version(self, source: str) -> Deferred[int]:
        """Fire with the revision of ``source`` (0 if it never wrote)."""
        row = self._connected_reader().execute(
            "SELECT version FROM sources WHERE name = ?", (source,)
        ).fetchone()
        return succeed(0 if row is None else int(row[0]))

    def count(self) -> Deferred[int]:
        """Fire with the number of stored digests (expired ones included until swept)."""
        return self._in_thread(self._count)

    def _count(self) -> int:
        return int(self._connected_writer().execute("SELECT COUNT(*) FROM digests").fetchone()[0])

    def scan(self, after: bytes | None, limit: int) -> Deferred[list[Update]]:
        """Fire with up to ``limit`` stored hashes whose digest sorts after ``after``.

        In ascending digest order, each as an ADD :class:`Update` with the
        stored flag and weight, and its 32 shingles when all are still owned
        by it (else ``None``). An empty list means the end (used by a full
        replication resync).
        """
        return self._in_thread(self._scan, after if after is not None else b"", limit)

    def _scan(self, after: bytes, limit: int) -> list[Update]:
        writer = self._connected_writer()
        rows = writer.execute(
            "SELECT id, digest, flag, value FROM digests WHERE digest > ? "
            "ORDER BY digest LIMIT ?", (after, limit),
        ).fetchall()
        updates = []
        for digest_id, digest, flag, value in rows:
            slots = writer.execute(
                "SELECT number, value FROM shingles WHERE digest_id = ? ORDER BY number",
                (digest_id,),
            ).fetchall()
            shingles = (tuple(value % (1 << 64) for _, value in slots)
                        if len(slots) == SHINGLE_COUNT else None)
            updates.append(Update(UpdateKind.ADD, digest, flag, value, shingles))
        return updates

    def _connected_reader(self) -> sqlite3.Connection:
        if self._reader is None:
            raise sqlite3.OperationalError("the database is not open")
        return self._reader

    def _connected_writer(self) -> sqlite3.Connection:
        if self._writer is None:
            raise sqlite3.OperationalError("the database is not open")
        return self._writer

    # -- writes -------------------------------------------------------------

    def apply(self, updates: Sequence[Update], source: str = LOCAL_SOURCE) -> Deferred[int]:
        """Store ``updates`` in one transaction; fire with ``source``'s revision.

        The revision grows only for batches containing an ADD or DEL (as in
        Rspamd). Fails with :class:`BackendUnavailable` (nothing stored) on any
        SQLite error.
        """
        now = int(self._clock.seconds())
        batch = list(updates)
        d = self._in_thread(self._apply, batch, source, now)
        d.addErrback(_unavailable)

        def sweep(revision: int) -> Deferred[int]:
            if not any(update.kind is not UpdateKind.REFRESH for update in batch):
                return succeed(revision)
            swept = self.expire(self._clock.seconds())
            swept.addErrback(lambda _: None)
            swept.addCallback(lambda _: revision)
            return swept

        d.addCallback(sweep)
        return d

    def _apply(self, updates: list[Update], source: str, now: int) -> int:
        writer = self._connected_writer()
        writer.execute("BEGIN IMMEDIATE")
        try:
            changed = False
            slots: list[tuple[int, int, int]] = []
            for update in updates:
                if update.kind is UpdateKind.ADD:
                    self._add(writer, update, now, slots)
                    changed = True
                elif update.kind is UpdateKind.DEL:
                    self._insert_slots(writer, slots)
                    writer.execute("DELETE FROM digests WHERE digest = ?", (update.digest,))
                    changed = True
                else:
                    # A row already at ``now`` is left alone: a batch of such
                    # refreshes then writes no page, so readers keep their cache.
                    writer.execute(
                        "UPDATE digests SET time = ?1 WHERE digest = ?2 AND time <> ?1",
                        (now, update.digest),
                    )
            self._insert_slots(writer, slots)
            if changed:
                writer.execute(
                    "INSERT INTO sources(name, version, last) VALUES (?, 1, ?) "
                    "ON CONFLICT(name) DO UPDATE SET version = version + 1, last = excluded.last",
                    (source, now),
                )
            row = writer.execute("SELECT version FROM sources WHERE name = ?", (source,)).fetchone()
            writer.execute("COMMIT")
        except BaseException:
            writer.execute("ROLLBACK")
            raise
        return 0 if row is None else int(row[0])

    @staticmethod
    def _insert_slots(writer: sqlite3.Connection, slots: list[tuple[int, int, int]]) -> None:
        """Write the collected shingle rows and empty ``slots``.

        In key order for locality; the stable sort keeps the batch order of
        equal slots, so the digest learned last takes a shared slot over.
        Called before every DEL so that a digest deleted later in the batch
        loses its shingles too.
        """
        slots.sort(key=lambda slot: slot[:2])
        writer.executemany(
            "INSERT OR REPLACE INTO shingles(number, value, digest_id) VALUES (?, ?, ?)", slots
        )
        slots.clear()

    @staticmethod
    def _add(writer: sqlite3.Connection, update: Update, now: int,
             slots: list[tuple[int, int, int]]) -> None:
        """Apply one ADD; the shingle rows of a new digest are appended to ``slots``.

        A stored digest learned again under its flag gains the weight; under
        another flag it takes the new flag and weight, unless the update is
        weak: then flag and weight stay and only its lifetime restarts.
        """
        row = writer.execute(
            "SELECT id, flag FROM digests WHERE digest = ?", (update.digest,)
        ).fetchone()
        if row is not None:
            if row[1] == update.flag:
                writer.execute(
                    "UPDATE digests SET value = value + ?, time = ? WHERE id = ?",
                    (update.value, now, row[0]),
                )
            elif update.weak:
                writer.execute("UPDATE digests SET time = ? WHERE id = ?", (now, row[0]))
            else:
                writer.execute(
                    "UPDATE digests SET value = ?, flag = ?, time = ? WHERE id = ?",
                    (update.value, update.flag, now, row[0]),
                )
            return
        cursor = writer.execute(
            "INSERT INTO digests(digest, flag, value, time) VALUES (?, ?, ?, ?)",
            (update.digest, update.flag, update.value, now),
        )
        if update.shingles is not None:
            digest_id = cursor.lastrowid
            assert digest_id is not None
            slots += [(number, _signed(value), digest_id)
                      for number, value in enumerate(update.shingles)]

    def expire(self, now: float) -> Deferred[int]:
        """Delete up to 5000 hashes last written before ``now - lifetime``.

        Their shingles go with them. Fires with the number of hashes deleted.
        """
        d = self._in_thread(self._expire, int(now - self.lifetime))
        d.addErrback(_unavailable)
        return d

    def _expire(self, oldest: int) -> int:
        writer = self._connected_writer()
        writer.execute("BEGIN IMMEDIATE")
        try:
            cursor = writer.execute(
                "DELETE FROM digests WHERE id IN "
                "(SELECT id FROM digests WHERE time < ? LIMIT ?)",
                (oldest, EXPIRE_BATCH),
            )
            writer.execute("COMMIT")
        except BaseException:
            writer.execute("ROLLBACK")
            raise
        return cursor.rowcount


def _unavailable(failure: Failure) -> Failure:
    """Turn an SQLite error into :class:`BackendUnavailable`; pass others on."""
    if failure.check(sqlite3.Error):
        return Failure(BackendUnavailable(failure.getErrorMessage()))
    return failure
