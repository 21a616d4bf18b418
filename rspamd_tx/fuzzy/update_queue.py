"""The durable update queue of the fuzzy storage.

Like Rspamd, accepted writes and internal refreshes are queued and flushed to
the backend as one batch every ``sync`` seconds, de-duplicated first
(:func:`~rspamd_tx.fuzzy.backend.deduplicate`). Unlike Rspamd (which drops a
batch after ``updates_maxfail`` failures), **an update is never dropped**:

* a batch the backend cannot store is kept, in order, and retried with
  exponential backoff (``retry_initial`` doubling up to ``retry_max``);
* while more than ``max_memory`` updates (or ``max_memory_bytes``) wait in
  memory, they are appended to a spool file (``<dbdir>/fuzzy-updates.spool``),
  fsync'ed per append;
* the spool always holds the *oldest* waiting updates: it is flushed first, in
  order, batch by batch; progress is recorded in ``<spool>.offset`` (fsync'ed,
  replaced atomically) and the file is truncated once everything in it is
  stored; a torn record at its end (crash during an append) is cut off;
* at start the spool is replayed; at stop what can be stored is stored and
  the rest is spooled.

Delivery is at least once: a batch whose outcome is unknown (timeout after
the backend received it, crash between storing and recording the spool
offset) is stored again.

Spool record: ``u32 length, u32 crc32(payload)`` then the payload
``u8 kind, u32 flag, i64 value, u8 marks, 64-byte digest,
[32 × u64 shingles], u16 source length, source (UTF-8)``, little-endian;
``marks`` bit 0: shingles follow, bit 1: a weak update (other bits zero).
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from rspamd_tx.fuzzy.backend import (
    DIGEST_SIZE,
    LOCAL_SOURCE,
    SHINGLE_COUNT,
    IFuzzyBackend,
    Update,
    UpdateKind,
    deduplicate,
)

log = Logger()

SPOOL_NAME = "fuzzy-updates.spool"
"""File name of the spool under ``dbdir``."""

FlushHook = Callable[[Sequence[Update], int], object]
"""Called after each stored batch with the (de-duplicated) batch and its revision."""

_HEADER = struct.Struct("<II")
_FIXED = struct.Struct(f"<BIqB{DIGEST_SIZE}s")
_SHINGLES = struct.Struct(f"<{SHINGLE_COUNT}Q")
_SOURCE_LENGTH = struct.Struct("<H")
MAX_RECORD = _FIXED.size + _SHINGLES.size + _SOURCE_LENGTH.size + 0xFFFF
_VALUE_LIMIT = 1 << 63
_HAS_SHINGLES = 1
_WEAK = 2


class SpoolError(Exception):
    """A spool record cannot be encoded or the spool file is unusable."""


def encode_update(update: Update) -> bytes:
    """One spool record (header and payload) for ``update``.

    :raises SpoolError: a flag, value or source outside the record's ranges.
    """
    source = update.source.encode()
    if not 0 <= update.flag <= 0xFFFFFFFF or not -_VALUE_LIMIT <= update.value < _VALUE_LIMIT \
            or len(source) > 0xFFFF:
        raise SpoolError("update out of the spool record's ranges")
    marks = (_HAS_SHINGLES if update.shingles is not None else 0) | (_WEAK if update.weak else 0)
    payload = _FIXED.pack(int(update.kind), update.flag, update.value, marks, update.digest)
    if update.shingles is not None:
        payload += _SHINGLES.pack(*update.shingles)
    payload += _SOURCE_LENGTH.pack(len(source)) + source
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def decode_update(payload: bytes) -> Update:
    """The :class:`Update` of one record payload.

    :raises SpoolError: malformed payload.
    """
    try:
        kind, flag, value, marks, digest = _FIXED.unpack_from(payload)
        if marks & ~(_HAS_SHINGLES | _WEAK):
            raise SpoolError(f"unknown marks {marks:#x}")
        offset = _FIXED.size
        shingles = None
        if marks & _HAS_SHINGLES:
            shingles = _SHINGLES.unpack_from(payload, offset)
            offset += _SHINGLES.size
        (length,) = _SOURCE_LENGTH.unpack_from(payload, offset)
        offset += _SOURCE_LENGTH.size
        source = payload[offset:offset + length].decode()
        if offset + length != len(payload):
            raise SpoolError("spool record has trailing bytes")
        return Update(UpdateKind(kind), digest, flag, value, shingles, source,
                      weak=bool(marks & _WEAK))
    except (struct.error, ValueError) as error:
        raise SpoolError(f"bad spool record: {error}") from error


class Spool:
    """The append-only spool file and its consumed offset.

    Attributes:
        path: the spool file; ``path + ".offset"`` records how much of it is stored.
        pending: number of records not yet consumed.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._offset_path = path + ".offset"
        self.pending = 0
        self._offset = 0

    def open(self) -> None:
        """Read the consumed offset, count pending records and cut a torn tail."""
        self._offset = 0
        if os.path.exists(self._offset_path):
            with open(self._offset_path, "rb") as handle:
                text = handle.read().strip()
            self._offset = int(text) if text.isdigit() else 0
        if not os.path.exists(self.path):
            self._offset = 0
            self.pending = 0
            return
        size = os.path.getsize(self.path)
        if self._offset > size:
            self._offset = 0
        count, end = 0, self._offset
        with open(self.path, "rb") as handle:
            handle.seek(self._offset)
            while True:
                record = self._read_record(handle)
                if record is None:
                    break
                count += 1
                end = handle.tell()
        if end != size:
            log.warn("spool {path}: cutting {n} bytes of a torn record", path=self.path,
                     n=size - end)
            with open(self.path, "r+b") as handle:
                handle.truncate(end)
                os.fsync(handle.fileno())
        self.pending = count

    @staticmethod
    def _read_record(handle: Any) -> bytes | None:
        header = handle.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return None
        length, checksum = _HEADER.unpack(header)
        if length > MAX_RECORD:
            return None
        payload = handle.read(length)
        if len(payload) < length or zlib.crc32(payload) != checksum:
            return None
        return bytes(payload)

    def append(self, updates: Sequence[Update]) -> None:
        """Append ``updates`` in order and fsync.

        :raises SpoolError: an update cannot be encoded (nothing is written).
        :raises OSError: the file cannot be written.
        """
        data = b"".join(encode_update(update) for update in updates)
        with open(self.path, "ab") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        self.pending += len(updates)

    def read(self, limit: int) -> tuple[list[Update], int]:
        """Up to ``limit`` oldest pending updates and the offset just after them.

        A record with a valid checksum that does not decode is logged and
        skipped (it is consumed with the batch).
        """
        updates: list[Update] = []
        with open(self.path, "rb") as handle:
            handle.seek(self._offset)
            end = self._offset
            while len(updates) < limit:
                payload = self._read_record(handle)
                if payload is None:
                    break
                end = handle.tell()
                try:
                    updates.append(decode_update(payload))
                except SpoolError as error:
                    log.error("spool {path}: skipping a record ending at {end}: {error}",
                              path=self.path, end=end, error=error)
        return updates, end

    def consume(self, count: int, end: int) -> None:
        """Mark the ``count`` records before ``end`` stored.

        The file is truncated when nothing remains; otherwise the offset is
        recorded durably.
        """
        self.pending -= count
        if self.pending <= 0 or end >= os.path.getsize(self.path):
            self.pending = 0
            self._offset = 0
            with open(self.path, "r+b") as handle:
                handle.truncate(0)
                os.fsync(handle.fileno())
            if os.path.exists(self._offset_path):
                os.unlink(self._offset_path)
            return
        self._offset = end
        temporary = self._offset_path + ".tmp"
        with open(temporary, "wb") as handle:
            handle.write(b"%d\n" % end)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self._offset_path)


def _weight(update: Update) -> int:
    """Approximate memory cost of a queued update in bytes."""
    return 160 + (SHINGLE_COUNT * 8 if update.shingles is not None else 0) + len(update.source)


class UpdateQueue(Service):
    """Queue of updates flushed to a backend every ``sync`` seconds, never dropped.

    Attributes:
        backend: where batches go.
        sync: flush period in seconds.
        depth: updates waiting (memory, in flight and spooled).
        flushes: batches stored so far.
        failures: consecutive failed flushes (0 when the backend is healthy).
    """

    def __init__(
        self,
        backend: IFuzzyBackend,
        *,
        clock: IReactorTime,
        sync: float,
        spool_path: str,
        max_memory: int = 100_000,
        max_memory_bytes: int = 64 << 20,
        max_batch: int = 10_000,
        retry_initial: float = 1.0,
        retry_max: float = 60.0,
        source: str = LOCAL_SOURCE,
    ) -> None:
        """
        :param spool_path: the spool file (normally ``<dbdir>/`` :data:`SPOOL_NAME`).
        :param max_memory: updates kept in memory before spooling.
        :param max_memory_bytes: approximate bytes kept in memory before spooling.
        :param max_batch: most updates handed to the backend in one batch.
        :param source: revision source the batches are applied under.
        """
        self.backend = backend
        self.sync = float(sync)
        self.max_memory = max_memory
        self.max_memory_bytes = max_memory_bytes
        self.max_batch = max_batch
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.source = source
        self.flushes = 0
        self.failures = 0
        self._clock = clock
        self._spool = Spool(spool_path)
        self._memory: list[Update] = []
        self._memory_bytes = 0
        self._in_flight: list[Update] = []
        self._hooks: list[FlushHook] = []
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock
        self._current: Deferred[None] | None = None
        self._waiters: list[Deferred[None]] = []
        self._retry: IDelayedCall | None = None
        self._stopping = False

    # -- intake -------------------------------------------------------------

    @property
    def depth(self) -> int:
        return len(self._memory) + len(self._in_flight) + self._spool.pending

    def push(self, update: Update) -> None:
        """Queue ``update`` for the next flush (spooling if memory is over its bound)."""
        self._memory.append(update)
        self._memory_bytes += _weight(update)
        if self._current is None:
            self._enforce_bound()

    def add_flush_hook(self, hook: FlushHook) -> None:
        """Call ``hook(batch, revision)`` after every stored batch (errors are logged)."""
        self._hooks.append(hook)

    def _enforce_bound(self) -> None:
        if len(self._memory) <= self.max_memory and self._memory_bytes <= self.max_memory_bytes:
            return
        try:
            self._spool.append(self._memory)
        except (OSError, SpoolError) as error:
            log.error("cannot spool {n} updates to {path}: {error}; kept in memory",
                      n=len(self._memory), path=self._spool.path, error=error)
            return
        self._memory = []
        self._memory_bytes = 0

    # -- service ------------------------------------------------------------

    def startService(self) -> None:
        """Replay the spool (flushing it at once if not empty) and start the timer."""
        Service.startService(self)
        self._stopping = False
        self._spool.open()
        self._loop.start(self.sync, now=False).addErrback(
            lambda failure: log.failure("update queue timer failed", failure))
        if self._spool.pending:
            self._flush_logged()

    @inlineCallbacks
    def stopService(self) -> Any:
        """Stop the timer, store what can be stored, spool the rest."""
        Service.stopService(self)
        self._stopping = True
        if self._loop.running:
            self._loop.stop()
        self._cancel_retry()
        yield self.flush()
        self._cancel_retry()
        if self._memory:
            try:
                self._spool.append(self._memory)
                self._memory = []
                self._memory_bytes = 0
            except (OSError, SpoolError) as error:
                log.error("cannot spool {n} updates at stop: {error}; they are lost",
                          n=len(self._memory), error=error)

    def _tick(self) -> None:
        if self._retry is not None and self._retry.active():
            return
        self._flush_logged()

    def _flush_logged(self) -> None:
        self.flush().addErrback(lambda failure: log.failure("flush failed", failure))

    def _cancel_retry(self) -> None:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None

    # -- flushing -----------------------------------------------------------

    def flush(self) -> Deferred[None]:
        """Store everything waiting, batch by batch, until empty or the backend fails.

        A flush already running is joined, never overlapped. Fires with
        ``None`` (also after a failure, which schedules a retry).
        """
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        if self._current is None:
            self._cancel_retry()
            self._current = self._flush_all()
            self._current.addErrback(lambda failure: log.failure("flush crashed", failure))
            self._current.addBoth(self._flush_done)
        return waiter

    def _flush_done(self, _: object) -> None:
        self._current = None
        self._enforce_bound()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    @inlineCallbacks
    def _flush_all(self) -> Any:
        while True:
            from_spool = self._spool.pending > 0
            if from_spool:
                batch, end = self._spool.read(self.max_batch)
                if not batch:
                    log.error("spool {path}: nothing readable left; emptying it",
                              path=self._spool.path)
                    self._spool.consume(self._spool.pending, end)
                    continue
            else:
                batch = self._memory[:self.max_batch]
                if not batch:
                    return
                del self._memory[:len(batch)]
                self._memory_bytes -= sum(_weight(update) for update in batch)
                self._in_flight = batch
            merged = deduplicate(batch)
            try:
                revision = yield maybeDeferred(self.backend.apply, merged, self.source)
            except Exception as error:
                if not from_spool:
                    self._memory[0:0] = batch
                    self._memory_bytes += sum(_weight(update) for update in batch)
                    self._in_flight = []
                self._failed(error)
                return
            if from_spool:
                self._spool.consume(len(batch), end)
            else:
                self._in_flight = []
            self.failures = 0
            self.flushes += 1
            self._run_hooks(merged, revision)

    def _failed(self, error: Exception) -> None:
        self.failures += 1
        if self._stopping:
            log.warn("flush at stop failed: {error}", error=error)
            return
        delay = min(self.retry_max, self.retry_initial * 2 ** (self.failures - 1))
        log.warn("flush of the update queue failed ({error}); {depth} updates kept, "
                 "retrying in {delay:.1f} s", error=error, depth=self.depth, delay=delay)
        self._retry = self._clock.callLater(delay, self._flush_logged)

    def _run_hooks(self, batch: Sequence[Update], revision: int) -> None:
        for hook in self._hooks:
            try:
                result = hook(batch, revision)
            except Exception:
                log.failure("flush hook {hook!r} failed", Failure(), hook=hook)
                continue
            if isinstance(result, Deferred):
                result.addErrback(self._hook_failed, hook)

    @staticmethod
    def _hook_failed(failure: Failure, hook: FlushHook) -> None:
        log.failure("flush hook {hook!r} failed", failure, hook=hook)


__all__ = [
    "SPOOL_NAME",
    "FlushHook",
    "Spool",
    "SpoolError",
    "UpdateQueue",
    "decode_update",
    "encode_update",
]
