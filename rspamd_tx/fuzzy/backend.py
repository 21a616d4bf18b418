"""Storage backends of the fuzzy storage: value types and the backend interface.

The types here are independent of the wire codec: the listener turns decoded
commands into :class:`Update` and CHECK lookups, a backend stores and answers
them. Two backends implement :class:`IFuzzyBackend`:
:mod:`rspamd_tx.fuzzy.sqlite_backend` (embedded default) and
:mod:`rspamd_tx.fuzzy.redis_backend` (Rspamd 3.x Redis layout, shareable with
Rspamd's own storages).

The shingle vote shared by both backends reproduces Rspamd's
(``fuzzy-protocol.md`` §10.2) so that ``prob`` values are identical.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, replace

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

DIGEST_SIZE = 64
"""Length of a fuzzy digest in bytes (BLAKE2b-512 of the message part)."""

SHINGLE_COUNT = 32
"""Number of shingle hashes carried by a shingle command."""

SHINGLE_VOTE_THRESHOLD = SHINGLE_COUNT // 2
"""A shingle match needs strictly more agreeing slots than this."""

LOCAL_SOURCE = "local"
"""The update source whose revision Rspamd keeps (``<prefix>local`` in Redis)."""

DEFAULT_EXPIRE = 172800.0
"""Lifetime of a hash when ``expire`` is unset (2 days), in seconds."""

_U64_LIMIT = 1 << 64

Digest = bytes
"""A 64-byte digest; opaque, never re-hashed."""

Shingles = tuple[int, ...]
"""32 unsigned 64-bit shingle hashes, slot ``i`` at index ``i``."""


class BackendUnavailable(Exception):
    """The backend cannot store (or read) right now; the caller keeps the data.

    Raised (as a Deferred failure) by :meth:`IFuzzyBackend.apply` when a batch
    could not be stored: nothing of the batch is considered stored, the caller
    retries it later. :meth:`IFuzzyBackend.check` fails with it when the backend
    cannot answer; the listener then answers a miss.
    """


class UpdateKind(enum.IntEnum):
    """What an :class:`Update` does; values are the wire command codes."""

    ADD = 1
    DEL = 2
    REFRESH = 100


def check_digest(digest: bytes) -> Digest:
    """Return ``digest`` if it is exactly :data:`DIGEST_SIZE` bytes.

    :raises ValueError: wrong type or length.
    """
    if not isinstance(digest, bytes) or len(digest) != DIGEST_SIZE:
        raise ValueError(f"a digest is {DIGEST_SIZE} bytes")
    return digest


def check_shingles(shingles: Sequence[int]) -> Shingles:
    """Return ``shingles`` as a tuple if it holds 32 unsigned 64-bit integers.

    :raises ValueError: wrong count or a value out of range.
    """
    values = tuple(shingles)
    if len(values) != SHINGLE_COUNT:
        raise ValueError(f"a shingle set has {SHINGLE_COUNT} values")
    for value in values:
        if not isinstance(value, int) or not 0 <= value < _U64_LIMIT:
            raise ValueError("a shingle is an unsigned 64-bit integer")
    return values


@dataclass(frozen=True, slots=True)
class Update:
    """One queued modification of the store.

    Attributes:
        kind: ADD (learn: add ``value`` to the weight), DEL (forget the digest
            whatever its flag) or REFRESH (extend the lifetime of a matched hash).
        digest: the 64-byte digest.
        flag: the list (flag) number; ignored by DEL.
        value: the weight to add (ADD); ignored otherwise.
        shingles: the 32 shingles of a shingle command, else ``None``.
        source: who asked for the update (client address, ``local`` for
            internal REFRESH, a peer name for replicated batches); informative,
            stored only in the update spool.
        weak: an ADD whose flag is one of the ``weak_ids``: it never replaces
            the flag of a hash already stored under another flag.
    """

    kind: UpdateKind
    digest: Digest
    flag: int
    value: int = 0
    shingles: Shingles | None = None
    source: str = LOCAL_SOURCE
    weak: bool = False

    def __post_init__(self) -> None:
        if type(self.kind) is not UpdateKind:
            object.__setattr__(self, "kind", UpdateKind(self.kind))
        if type(self.digest) is not bytes or len(self.digest) != DIGEST_SIZE:
            check_digest(self.digest)
        if self.shingles is not None:
            object.__setattr__(self, "shingles", check_shingles(self.shingles))


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The answer of a backend lookup.

    Attributes:
        value: stored weight (0 on a miss).
        flag: stored flag (0 on a miss).
        prob: 1.0 for an exact digest hit, ``n / 32`` for a shingle hit with
            ``n`` agreeing slots, 0.0 on a miss.
        timestamp: unix seconds the backend associates with the hash (Redis:
            creation ``C``; sqlite: last write), 0 on a miss.
        digest: the matched stored digest (differs from the request's on a
            shingle hit), ``None`` on a miss; a REFRESH targets this digest.
    """

    value: int = 0
    flag: int = 0
    prob: float = 0.0
    timestamp: int = 0
    digest: Digest | None = None

    @property
    def hit(self) -> bool:
        """Whether the lookup matched a stored hash."""
        return self.prob > 0.5


MISS = CheckResult()
"""The result of a lookup that matched nothing: everything zero."""


def vote_shingles(owners: Sequence[bytes | None]) -> tuple[bytes | None, int]:
    """Select the digest most shingle slots point to, exactly as Rspamd does.

    ``owners[i]`` is the digest stored for slot ``i`` (``None`` if the slot is
    unknown). Returns ``(digest, count)``; ``digest`` is ``None`` unless more
    than 16 slots exist and more than 16 agree.

    Rspamd sorts the 32 values (missing slots as all-zero digests, so they come
    first), then walks from the second element counting runs of equal found
    values: a run starting at the first element is counted one short (32/32
    identical gives 31), and ties go to the smaller digest. Kept so that
    ``prob = count / 32`` matches Rspamd's answers bit for bit.
    """
    if sum(owner is not None for owner in owners) <= SHINGLE_VOTE_THRESHOLD:
        return None, 0
    zero = bytes(DIGEST_SIZE)
    ordered = sorted((owner if owner is not None else zero, owner is not None)
                     for owner in owners)
    previous = ordered[0][0]
    run = 0
    best = 0
    selected: bytes | None = None
    for value, found in ordered[1:]:
        if not found:
            continue
        if value == previous:
            run += 1
            if run > best:
                best = run
                selected = value
        else:
            run = 1
            previous = value
    if best <= SHINGLE_VOTE_THRESHOLD:
        return None, 0
    return selected, best


def deduplicate(updates: Sequence[Update]) -> list[Update]:
    """Collapse a batch the way Rspamd does before each flush (spec §1.1).

    Per digest, only entries with the same flag as the first entry seen are
    merged (others are kept as they are):

    * WRITE after WRITE: the values are summed into the first, the second dropped;
    * WRITE after REFRESH: the REFRESH is dropped;
    * WRITE after DEL: the WRITE is dropped;
    * REFRESH after anything: the REFRESH is dropped;
    * DEL after anything: the earlier entry is dropped.

    A merged WRITE keeps the first entry's ``weak`` mark (entries of one flag
    are all weak or all strong).  Returns the surviving updates in their original order.
    """
    kept: list[Update | None] = list(updates)
    seen: dict[bytes, int] = {}
    for index, update in enumerate(updates):
        first_index = seen.get(update.digest)
        if first_index is None:
            seen[update.digest] = index
            continue
        first = kept[first_index]
        assert first is not None
        if first.flag != update.flag:
            continue
        if update.kind is UpdateKind.ADD:
            if first.kind is UpdateKind.ADD:
                kept[first_index] = replace(first, value=first.value + update.value)
                kept[index] = None
            elif first.kind is UpdateKind.REFRESH:
                kept[first_index] = None
                seen[update.digest] = index
            else:
                kept[index] = None
        elif update.kind is UpdateKind.REFRESH:
            kept[index] = None
        else:
            kept[first_index] = None
            seen[update.digest] = index
    return [update for update in kept if update is not None]


class IFuzzyBackend(Interface):
    """Where the fuzzy storage keeps its hashes.

    Every method returns a :class:`~twisted.internet.defer.Deferred`; none
    blocks the reactor thread on I/O. Time comes from the backend's injected
    ``IReactorTime``.
    """

    lifetime = Attribute("Lifetime of a hash in seconds (float): the ``expire`` option.")

    def check(digest: Digest, shingles: Shingles | None) -> Deferred[CheckResult]:
        """Look a message part up: exact digest first, then the shingle vote.

        Fires with :data:`MISS` when nothing matches; fails with
        :class:`BackendUnavailable` when the backend cannot answer now.
        """

    def apply(updates: Sequence[Update], source: str = LOCAL_SOURCE) -> Deferred[int]:
        """Store one batch (atomically where the backend allows).

        Increments the revision of ``source`` and fires with the new revision.
        Fails with :class:`BackendUnavailable` when the batch could not be
        stored; the caller then still owns the whole batch.
        """

    def count() -> Deferred[int]:
        """Fire with the (approximate, for Redis) number of stored hashes."""

    def version(source: str) -> Deferred[int]:
        """Fire with the revision of ``source`` (0 when never written)."""

    def expire(now: float) -> Deferred[int]:
        """Delete hashes older than ``now - lifetime`` where the backend must do it.

        Fires with the number of hashes removed (always 0 for Redis, whose
        keys carry a TTL).
        """

    def close() -> Deferred[None]:
        """Release connections and files; the backend is unusable afterwards."""


class IImmediateFuzzyBackend(IFuzzyBackend):
    """A backend that can also answer a lookup at once, without a Deferred.

    Optional: the storage uses :meth:`check_now` when a backend provides this
    interface (SQLite, whose reads run on the reactor thread) and
    :meth:`IFuzzyBackend.check` otherwise.
    """

    def check_now(digest: Digest, shingles: Shingles | None) -> CheckResult:
        """What :meth:`IFuzzyBackend.check` would fire with, returned directly.

        Raises :class:`BackendUnavailable` when the backend cannot answer now.
        """
