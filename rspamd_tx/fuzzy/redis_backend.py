"""The Redis fuzzy backend, with Rspamd 3.x's own key layout and commands.

Our storages and Rspamd's can share one Redis (``fuzzy-storage.md`` §5):

* ``<prefix><digest>``: hash with ``V`` (weight), ``F`` (flag), ``C``
  (creation time), TTL ``expire``;
* ``<prefix>_<i>_<h>``: the digest owning shingle slot ``i`` with unsigned
  hash ``h``, TTL ``expire``;
* ``<prefix>_count``: WRITEs minus DELs; ``<prefix><source>``: batch revision.

A digest key is told apart from the others by its shape only: the prefix
followed by exactly 64 bytes (shingle, count and revision keys are shorter).

Each batch is one ``MULTI`` … ``EXEC`` on a write server ending with
``INCR <prefix><source>``, so it is stored completely or not at all. Reads go
round-robin over the read servers, writes to the alive write server with the
highest priority (``master-slave``).

Commands go out pre-encoded through :mod:`rspamd_tx.fuzzy.redis_pipeline`
(txredisapi keeps the connections): a lookup is one ``HMGET`` built from
fixed bytes and the digest, a batch one write of the whole transaction, each
with one Deferred. Every Redis call is bounded by ``timeout``: one timer of
the backend (:class:`~rspamd_tx.fuzzy.redis_pipeline.CallTimeouts`, on the
injected clock) fails the calls unanswered for ``timeout`` to 1.25 ×
``timeout`` seconds, as txredisapi itself would wait for a reconnection
forever. A server whose call failed is skipped, without waiting, until its
connection is re-established; when no server is usable
:meth:`RedisFuzzyBackend.check` and :meth:`RedisFuzzyBackend.apply` fail at
once with :class:`~rspamd_tx.fuzzy.backend.BackendUnavailable`.

Listing the stored hashes (:meth:`RedisFuzzyBackend.scan`, for a full
replication resync) has no ordered index to use: Redis can only ``SCAN`` its
whole keyspace. One *listing* walks every key of the database (``SCAN`` with
``MATCH <prefix>`` + 64 × ``?``, :data:`SCAN_COUNT` keys per round trip, each
round trip bounded by ``timeout``), keeps the matching digests and sorts
them: O(N) Redis work for N keys in the database, O(n log n) here for n
hashes, and about 110 bytes of memory per hash while it is kept (some 110 MB
for a million hashes). A listing is therefore not made per page: it is made
when a pass starts (``after`` is ``None``) and the later pages of the pass
bisect it, so a pass of n hashes in pages of ``limit`` costs one listing
plus n ``HMGET`` instead of n/limit listings (on loopback, reading takes
about 0.07 ms per hash, over a minute per million hashes). The listing is
dropped :data:`SCAN_LISTING_IDLE` seconds after its last use and on close.

``txredisapi`` installs the global reactor when imported, so it is imported
by this module only, which the tap imports lazily.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import txredisapi
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    fail,
    gatherResults,
    inlineCallbacks,
    succeed,
)
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IDelayedCall, IReactorTCP, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from rspamd_tx.fuzzy.backend import (
    DEFAULT_EXPIRE,
    DIGEST_SIZE,
    LOCAL_SOURCE,
    MISS,
    SHINGLE_COUNT,
    BackendUnavailable,
    CheckResult,
    Digest,
    IFuzzyBackend,
    Shingles,
    Update,
    UpdateKind,
    vote_shingles,
)
from rspamd_tx.fuzzy.redis_pipeline import (
    CallTimeouts,
    PendingCall,
    PipelineProtocol,
    encode_command,
)
from rspamd_tx.fuzzy.replication import IHashScanner
from rspamd_tx.upstreams.hosts import EntryKind, Strategy, UpstreamList, parse_upstreams

log = Logger()

DEFAULT_REDIS_PORT = 6379
DEFAULT_PREFIX = "fuzzy"
DEFAULT_TIMEOUT = 1.0
RECONNECT_MAX_DELAY = 2.0
"""Longest pause between reconnection attempts to a Redis server, in seconds."""
SCAN_COUNT = 1000
"""``COUNT`` hint of each ``SCAN`` round trip while listing the stored hashes."""
SCAN_LISTING_IDLE = 60.0
"""Seconds an unused digest listing is kept for later :meth:`RedisFuzzyBackend.scan` pages."""
SCAN_READ_BATCH = 100
"""Hashes read per ``MULTI``/``EXEC`` round trip by :meth:`RedisFuzzyBackend.scan`; a
page of ``limit`` takes several, so that no single reply keeps the reactor busy long."""

_GLOB_SPECIAL = re.compile(rb"([\\*?\[\]])")
_FLAG_LIMIT = 1 << 32
_VALUE_LIMIT = 1 << 63

_REDIS_ERRORS = (
    txredisapi.RedisError,
    ConnectionError,
    CancelledError,
)
_MULTI = encode_command((b"MULTI",))
_EXEC = encode_command((b"EXEC",))
_HMGET_TAIL = b"\r\n$1\r\nV\r\n$1\r\nF\r\n$1\r\nC\r\n"
"""What follows the key in ``HMGET <key> V F C``."""


def parse_servers(value: str | Sequence[str], default_strategy: Strategy) -> UpstreamList:
    """Parse a Redis upstream option (``host[:port[:prio]]`` list, optional prefix).

    ``master-slave:localhost:6383:30,dolores.vpn.example.net:6383:20`` gives
    two servers, the first preferred for writes. Only TCP servers are accepted.

    :raises ValueError: malformed list or a non-TCP element.
    """
    servers = parse_upstreams(value, default_port=DEFAULT_REDIS_PORT,
                              default_strategy=default_strategy)
    for entry in servers.entries:
        if entry.kind is not EntryKind.INET:
            raise ValueError(f"Redis server {entry.name!r}: only host[:port] is supported")
    return servers


def shingle_key(prefix: bytes, number: int, value: int) -> bytes:
    """``<prefix>_<i>_<h>``: the key of shingle slot ``number`` with hash ``value``."""
    return b"%s_%d_%d" % (prefix, number, value)


def digest_key_pattern(prefix: bytes) -> bytes:
    """The ``SCAN MATCH`` pattern of digest keys: ``prefix`` (glob-escaped) and 64 × ``?``.

    Redis globs match bytes, so the pattern selects exactly the keys of
    ``len(prefix) + 64`` bytes starting with ``prefix``.
    """
    return _GLOB_SPECIAL.sub(rb"\\\1", prefix) + b"?" * DIGEST_SIZE


def _stored_update(digest: bytes, row: Any) -> Update | None:
    """The ADD update of one ``HMGET V F C`` reply, ``None`` if it is not a valid hash.

    Valid: ``F`` an unsigned 32-bit and ``V`` a signed 64-bit decimal integer.
    """
    if not isinstance(row, list) or len(row) != 3:
        return None
    value, flag, _created = row
    try:
        weight, number = int(value), int(flag)
    except (TypeError, ValueError):
        return None
    if not (0 <= number < _FLAG_LIMIT and -_VALUE_LIMIT <= weight < _VALUE_LIMIT):
        return None
    return Update(UpdateKind.ADD, digest, number, weight)


def _fetched(row: Any, digest: bytes, prob: float) -> CheckResult | None:
    """The result of one ``HMGET V F C`` reply, ``None`` when ``V`` or ``F`` is absent."""
    value, flag, created = row
    if value is None or flag is None:
        return None
    return CheckResult(value=int(value), flag=int(flag), prob=prob,
                       timestamp=int(created) if created is not None else 0, digest=digest)


def _fetched_or_miss(row: Any, digest: bytes, prob: float) -> CheckResult:
    """The result of one ``HMGET V F C`` reply, :data:`MISS` when ``V`` or ``F`` is absent."""
    found = _fetched(row, digest, prob)
    return found if found is not None else MISS


def _exact_or_miss(row: Any, server: _RedisServer, digest: bytes) -> CheckResult:
    """The exact lookup's result from ``server``'s ``HMGET`` reply, which answered."""
    server.failed = False
    found = _fetched(row, digest, 1.0)
    return found if found is not None else MISS


def _succeeded(result: Any, server: _RedisServer) -> Any:
    server.failed = False
    return result


def _failed(failure: Failure, server: _RedisServer) -> Failure:
    """A Redis error of ``server`` as BackendUnavailable (marking the server failed)."""
    if failure.check(*_REDIS_ERRORS):
        server.failed = True
        log.warn("Redis {server}: {error}", server=server.name,
                 error=failure.getErrorMessage() or getattr(failure.type, "__name__", "error"))
        return Failure(BackendUnavailable(f"Redis {server.name}: {failure.getErrorMessage()}"))
    return failure


@dataclass(frozen=True, slots=True)
class _DigestListing:
    """Every digest one ``SCAN`` pass found, sorted.

    Attributes:
        generation: number of the listing; a later listing has a larger one.
        digests: the 64-byte digests in ascending order.
    """

    generation: int
    digests: list[bytes]


class _RedisServer:
    """One Redis server: a small (re)connecting txredisapi pool, started on first use."""

    def __init__(self, host: str, port: int, *, reactor: IReactorTCP, db: int | None,
                 password: str | None, username: str | None, timeout: float,
                 pool_size: int, timeouts: CallTimeouts) -> None:
        self.name = f"{host}:{port}"
        self.failed = False
        self._factory = txredisapi.RedisFactory(
            self.name, db, pool_size, isLazy=True, charset=None, password=password,
            convertNumbers=False, username=username,
        )
        self._factory.protocol = PipelineProtocol
        self._factory.maxDelay = RECONNECT_MAX_DELAY
        self._endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
        self._connecting = False
        self._timeouts = timeouts

    def connect(self) -> None:
        """Start (re)connecting the pool, once."""
        if not self._connecting:
            self._connecting = True
            self._factory.startConnecting(self._endpoint)

    def call(self, payload: bytes, replies: int, *, bulk: bool = False) -> Deferred[Any]:
        """Send the pre-encoded ``payload`` (``replies`` replies) on a connection of the pool.

        Fires with the last reply; fails with the first error reply, or a
        ``txredisapi`` ``ConnectionError`` (``TimeoutError`` when nothing
        answered within the backend's timeout).

        The pool's connections are shared, none is taken out: lookups go on
        the first connected connection, so that the lookups of one reactor
        turn leave in one write and their replies come back in one read;
        ``bulk`` calls (batches) on the last one, so that with two or more
        connections Redis reads lookups while it receives a batch. Without a
        connected connection the call waits for one (starting to connect if
        needed).
        """
        call = PendingCall(replies)
        self._timeouts.track(call)
        if call.deferred.called:
            return call.deferred
        if self._connecting:
            idle = self._factory.connectionQueue.pending
            while idle:
                connection = idle[-1] if bulk else idle[0]
                if connection.connected:
                    connection.send(payload, call)
                    return call.deferred
                # lost: txredisapi's getConnection would drop it from the queue as well
                idle.remove(connection)
        else:
            self.connect()
        waiting: Deferred[Any] = self._factory.getConnection(peek=True)
        waiting.addCallbacks(_send_when_connected, call.fail, callbackArgs=(payload, call))
        return call.deferred

    @property
    def usable(self) -> bool:
        """Connected now, or not yet known to be down."""
        return self._factory.size > 0 or not self.failed

    def disconnect(self) -> Deferred[Any]:
        """Stop reconnecting and close the pool."""
        if not self._connecting:
            return succeed(None)
        closed: Deferred[Any] = self._factory.disconnect()
        return closed


def _send_when_connected(connection: PipelineProtocol, payload: bytes, call: PendingCall) -> None:
    """Send a call that waited for a connection, unless it has failed meanwhile."""
    if not call.deferred.called:
        try:
            connection.send(payload, call)
        except txredisapi.ConnectionError as error:
            call.fail(error)


class _ServerGroup:
    """The servers of one role (read or write) with their selection rule."""

    def __init__(self, servers: list[tuple[_RedisServer, int]], strategy: Strategy) -> None:
        self._servers = servers
        self._strategy = strategy
        self._next = 0

    def pick(self) -> _RedisServer | None:
        """The server to use now, ``None`` when all are known to be down."""
        if len(self._servers) == 1:
            only = self._servers[0][0]
            return only if only.usable else None
        usable = [(server, priority) for server, priority in self._servers if server.usable]
        if not usable:
            return None
        if self._strategy is Strategy.MASTER_SLAVE:
            best = max(priority for _, priority in usable)
            return next(server for server, priority in usable if priority == best)
        self._next = (self._next + 1) % len(usable)
        return usable[self._next][0]


@implementer(IFuzzyBackend, IHashScanner)
class RedisFuzzyBackend:
    """Fuzzy hashes in Redis, laid out exactly as Rspamd 3.x lays them out.

    Attributes:
        prefix: key prefix (bytes of the ``prefix`` option).
        lifetime: the ``expire`` option; TTL of every key (whole seconds).
        timeout: bound of every Redis call, in seconds.
    """

    def __init__(
        self,
        *,
        reactor: IReactorTCP,
        clock: IReactorTime,
        servers: str | Sequence[str] | None = None,
        read_servers: str | Sequence[str] | None = None,
        write_servers: str | Sequence[str] | None = None,
        prefix: str = DEFAULT_PREFIX,
        db: int | None = None,
        password: str | None = None,
        username: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        lifetime: float = DEFAULT_EXPIRE,
        pool_size: int = 2,
    ) -> None:
        """
        :param reactor: reactor used to connect.
        :param clock: time source for timeouts and the ``C`` field.
        :param servers: upstream list for reads and writes.
        :param read_servers: reads (instead of ``servers``); alone: read-only.
        :param write_servers: writes (instead of ``servers``).
        :raises ValueError: no server at all or a malformed server list.
        """
        if servers is None and read_servers is None and write_servers is None:
            raise ValueError("the Redis fuzzy backend needs servers, read_servers or write_servers")
        self.prefix = prefix.encode()
        self.lifetime = float(lifetime)
        self.timeout = float(timeout)
        self._clock = clock
        self._timeouts = CallTimeouts(clock, self.timeout)
        self._hmget_head = b"*5\r\n$5\r\nHMGET\r\n$%d\r\n%s" % (
            len(self.prefix) + DIGEST_SIZE, self.prefix)
        self._servers: dict[tuple[str, int], _RedisServer] = {}
        self._listing: _DigestListing | None = None
        self._listing_generation = 0
        self._listing_expiry: IDelayedCall | None = None

        def group(value: str | Sequence[str] | None, strategy: Strategy) -> _ServerGroup:
            if value is None:
                return _ServerGroup([], strategy)
            parsed = parse_servers(value, strategy)
            members = []
            for entry in parsed.entries:
                assert entry.port is not None
                key = (entry.host, entry.port)
                if key not in self._servers:
                    self._servers[key] = _RedisServer(
                        entry.host, entry.port, reactor=reactor, db=db, password=password,
                        username=username, timeout=self.timeout, pool_size=pool_size,
                        timeouts=self._timeouts,
                    )
                members.append((self._servers[key], entry.weight_or_priority))
            return _ServerGroup(members, parsed.strategy)

        self._read = group(read_servers if read_servers is not None else servers,
                           Strategy.ROUND_ROBIN)
        self._write = group(write_servers if write_servers is not None else servers,
                            Strategy.MASTER_SLAVE)

    def start(self) -> Deferred[None]:
        """Start connecting to every server (also done on first use); fires at once."""
        for server in self._servers.values():
            server.connect()
        return succeed(None)

    # -- plumbing -----------------------------------------------------------

    def _key(self, digest: bytes) -> bytes:
        return self.prefix + digest

    @property
    def _ttl(self) -> int:
        return int(self.lifetime)

    def _call(self, server: _RedisServer, payload: bytes, replies: int, *,
              bulk: bool = False) -> Deferred[Any]:
        """:meth:`_RedisServer.call`; errors become BackendUnavailable."""
        return server.call(payload, replies, bulk=bulk).addCallbacks(
            _succeeded, _failed, callbackArgs=(server,), errbackArgs=(server,))

    def _send(self, group: _ServerGroup, payload: bytes, replies: int = 1) -> Deferred[Any]:
        """:meth:`_call` on the server ``group`` picks; BackendUnavailable when there is none."""
        server = group.pick()
        if server is None:
            return fail(BackendUnavailable("no Redis server is available"))
        return self._call(server, payload, replies)

    def _command(self, group: _ServerGroup, *args: Any) -> Deferred[Any]:
        return self._send(group, encode_command(args))

    def _command_on(self, server: _RedisServer, *args: Any) -> Deferred[Any]:
        return self._call(server, encode_command(args), 1)

    def _hmget(self, digest: bytes) -> bytes:
        """The encoded ``HMGET <prefix><digest> V F C``."""
        if len(digest) == DIGEST_SIZE:
            return self._hmget_head + digest + _HMGET_TAIL
        return encode_command((b"HMGET", self.prefix + digest, b"V", b"F", b"C"))

    # -- reads --------------------------------------------------------------

    def check(self, digest: Digest, shingles: Shingles | None) -> Deferred[CheckResult]:
        """``HMGET <prefix>D V F C``; else ``MGET`` of the 32 slot keys and the vote.

        Fires with a :class:`CheckResult` (:data:`MISS` when nothing matches);
        fails with :class:`BackendUnavailable` within ``timeout`` (to 1.25 ×
        ``timeout``) when Redis cannot answer (at once when no server is usable).
        """
        server = self._read.pick()
        if server is None:
            return fail(BackendUnavailable("no Redis server is available"))
        found = server.call(self._hmget(digest), 1)
        if shingles is None:
            return found.addCallbacks(_exact_or_miss, _failed,
                                      callbackArgs=(server, digest), errbackArgs=(server,))
        return found.addCallbacks(self._exact_or_vote, _failed,
                                  callbackArgs=(server, digest, shingles),
                                  errbackArgs=(server,))

    def _exact_or_vote(self, row: Any, server: _RedisServer, digest: bytes,
                       shingles: Shingles) -> CheckResult | Deferred[CheckResult]:
        server.failed = False
        found = _fetched(row, digest, 1.0)
        if found is not None:
            return found
        owners = self._command(
            self._read, b"MGET",
            *[shingle_key(self.prefix, number, value) for number, value in enumerate(shingles)],
        )
        return owners.addCallback(self._voted)

    def _voted(self, owners: list[Any]) -> CheckResult | Deferred[CheckResult]:
        winner, agreeing = vote_shingles(
            [owner if isinstance(owner, bytes) else None for owner in owners]
        )
        if winner is None:
            return MISS
        fetched = self._send(self._read, self._hmget(winner))
        return fetched.addCallback(_fetched_or_miss, winner, agreeing / SHINGLE_COUNT)

    def count(self) -> Deferred[int]:
        """``GET <prefix>_count`` (WRITEs minus DELs; 0 when absent)."""
        d = self._command(self._read, "GET", self.prefix + b"_count")
        return d.addCallback(lambda value: int(value) if value is not None else 0)

    def version(self, source: str) -> Deferred[int]:
        """``GET <prefix><source>`` (0 when absent)."""
        d = self._command(self._read, "GET", self.prefix + source.encode())
        return d.addCallback(lambda value: int(value) if value is not None else 0)

    # -- listing (full replication resync) ------------------------------------

    def scan(self, after: bytes | None, limit: int) -> Deferred[list[Update]]:
        """Fire with up to ``limit`` stored hashes whose digest sorts after ``after``.

        In ascending digest order, each as an ADD :class:`Update` with the
        stored flag (``F``) and weight (``V``) and ``shingles=None`` (Rspamd's
        layout does not link a digest to its shingle slots). An empty list
        means the end; ``limit <= 0`` fires with an empty list at once.

        ``after=None`` starts a pass: it lists the digest keys anew (``SCAN``
        of the whole database on one read server, see the module docstring
        for the cost). Later pages bisect the newest listing, which is never
        older than the start of the pass asking, and read the hashes with
        ``MULTI``/``HMGET V F C``…/``EXEC`` round trips of up to
        :data:`SCAN_READ_BATCH` keys. A pass thus
        lists every hash stored when it started and not deleted before its
        page was read, each exactly once, with the values current at that
        read; a hash stored after the start may or may not be listed.
        Keys of the digest shape that are not hashes, and hashes without an
        unsigned 32-bit ``F`` and a signed 64-bit ``V``, are skipped.

        Fails with :class:`BackendUnavailable` when no read server is usable
        or one does not answer; every Redis call is bounded by ``timeout``.
        """
        if limit <= 0:
            return succeed([])
        return self._scan(after, limit)

    @inlineCallbacks
    def _scan(self, after: bytes | None, limit: int) -> Any:
        listing = self._listing
        if after is None or listing is None:
            listing = yield self._list_digests()
        self._keep_listing()
        digests = listing.digests
        start = 0 if after is None else bisect.bisect_right(digests, after)
        found: list[Update] = []
        while len(found) < limit and start < len(digests):
            page = digests[start:start + min(SCAN_READ_BATCH, limit - len(found))]
            start += len(page)
            found += yield self._read_hashes(page)
        return found

    @inlineCallbacks
    def _list_digests(self) -> Any:
        """``SCAN`` one read server for digest keys; fire with a new :class:`_DigestListing`.

        The listing becomes the cached one unless a listing started later
        was stored meanwhile.
        """
        self._listing_generation += 1
        generation = self._listing_generation
        server = self._read.pick()
        if server is None:
            raise BackendUnavailable("no Redis server is available")
        pattern = digest_key_pattern(self.prefix)
        size = len(self.prefix) + DIGEST_SIZE
        found: set[bytes] = set()
        cursor = b"0"
        while True:
            cursor, keys = yield self._command_on(server, "SCAN", cursor, "MATCH", pattern,
                                                  "COUNT", SCAN_COUNT)
            found.update(key[len(self.prefix):] for key in keys
                         if len(key) == size and key.startswith(self.prefix))
            if cursor == b"0":
                break
        listing = _DigestListing(generation, sorted(found))
        if self._listing is None or self._listing.generation < generation:
            self._listing = listing
        return listing

    def _keep_listing(self) -> None:
        """(Re)arm the timer dropping the cached listing after :data:`SCAN_LISTING_IDLE` s."""
        if self._listing is None:
            return
        if self._listing_expiry is not None and self._listing_expiry.active():
            self._listing_expiry.reset(SCAN_LISTING_IDLE)
        else:
            self._listing_expiry = self._clock.callLater(SCAN_LISTING_IDLE, self._drop_listing)

    def _drop_listing(self) -> None:
        self._listing = None
        if self._listing_expiry is not None and self._listing_expiry.active():
            self._listing_expiry.cancel()
        self._listing_expiry = None

    @inlineCallbacks
    def _read_hashes(self, digests: list[bytes]) -> Any:
        """``HMGET <prefix>D V F C`` for each digest in one transaction; fire with the updates.

        Digests whose hash is gone, is not a hash or holds no valid ``V``/``F``
        are left out.
        """
        server = self._read.pick()
        if server is None:
            raise BackendUnavailable("no Redis server is available")
        payload = b"".join([_MULTI, *map(self._hmget, digests), _EXEC])
        rows = yield self._call(server, payload, len(digests) + 2, bulk=True)
        if not isinstance(rows, list) or len(rows) != len(digests):
            raise BackendUnavailable(f"Redis {server.name}: transaction aborted")
        updates = []
        for digest, row in zip(digests, rows):
            update = _stored_update(digest, row)
            if update is not None:
                updates.append(update)
        return updates

    # -- writes -------------------------------------------------------------

    def commands(self, updates: Sequence[Update], source: str = LOCAL_SOURCE) -> list[tuple[Any, ...]]:
        """The commands of one batch between ``MULTI`` and ``EXEC`` (spec §5.2).

        A weak ADD sets the flag with ``HSETNX``, as Rspamd 3.6+ does: a hash
        stored under another flag keeps it (its weight still grows).
        """
        ttl = self._ttl
        now = int(self._clock.seconds())
        commands: list[tuple[Any, ...]] = []
        for update in updates:
            key = self._key(update.digest)
            slots = ([shingle_key(self.prefix, number, value)
                      for number, value in enumerate(update.shingles)]
                     if update.shingles is not None else [])
            if update.kind is UpdateKind.ADD:
                commands += [
                    ("HSETNX" if update.weak else "HSET", key, "F", update.flag),
                    ("HSETNX", key, "C", now),
                    ("HINCRBY", key, "V", update.value),
                    ("EXPIRE", key, ttl),
                    ("INCR", self.prefix + b"_count"),
                ]
                commands += [("SETEX", slot, ttl, update.digest) for slot in slots]
            elif update.kind is UpdateKind.DEL:
                commands += [("DEL", key), ("DECR", self.prefix + b"_count")]
                commands += [("DEL", slot) for slot in slots]
            else:
                commands.append(("EXPIRE", key, ttl))
                commands += [("EXPIRE", slot, ttl) for slot in slots]
        commands.append(("INCR", self.prefix + source.encode()))
        return commands

    @inlineCallbacks
    def apply(self, updates: Sequence[Update], source: str = LOCAL_SOURCE) -> Any:
        """Store the batch in one ``MULTI``/``EXEC``; fire with the new revision.

        Fails with :class:`BackendUnavailable` (nothing stored, as far as this
        client can tell) when no write server is usable, on a timeout, a lost
        connection or an aborted transaction.
        """
        server = self._write.pick()
        if server is None:
            raise BackendUnavailable("no Redis write server is available")
        commands = self.commands(updates, source)
        payload = b"".join([_MULTI, *map(encode_command, commands), _EXEC])
        executed = yield self._call(server, payload, len(commands) + 2, bulk=True)
        if not isinstance(executed, list) or not executed:
            raise BackendUnavailable(f"Redis {server.name}: transaction aborted")
        return int(executed[-1])

    def expire(self, now: float) -> Deferred[int]:
        """Nothing to do: Redis expires keys by their TTL. Fires with 0."""
        return succeed(0)

    def close(self) -> Deferred[None]:
        """Drop the cached digest listing, fail the calls under way, close every connection.

        Fires when all connections are closed.
        """
        self._drop_listing()
        self._timeouts.close(txredisapi.ConnectionError("the backend is closed"))
        d = gatherResults([server.disconnect() for server in self._servers.values()],
                          consumeErrors=True)
        return d.addCallback(lambda _: None)

