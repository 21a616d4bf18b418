"""The Redis fuzzy backend, with Rspamd 3.x's own key layout and commands.

Our storages and Rspamd's can share one Redis (``fuzzy-storage.md`` §5):

* ``<prefix><digest>``: hash with ``V`` (weight), ``F`` (flag), ``C``
  (creation time), TTL ``expire``;
* ``<prefix>_<i>_<h>``: the digest owning shingle slot ``i`` with unsigned
  hash ``h``, TTL ``expire``;
* ``<prefix>_count``: WRITEs minus DELs; ``<prefix><source>``: batch revision.

Each batch is one ``MULTI`` … ``EXEC`` on a write server ending with
``INCR <prefix><source>``, so it is stored completely or not at all. Reads go
round-robin over the read servers, writes to the alive write server with the
highest priority (``master-slave``).

Every Redis call is bounded by ``timeout`` (``Deferred.addTimeout`` on the
injected clock): txredisapi itself would wait for a reconnection forever. A
server whose call failed is skipped, without waiting, until its connection
is re-established; when no server is usable :meth:`RedisFuzzyBackend.check`
and :meth:`RedisFuzzyBackend.apply` fail at once with
:class:`~rspamd_tx.fuzzy.backend.BackendUnavailable`.

``txredisapi`` installs the global reactor when imported, so it is imported
by this module only, which the tap imports lazily.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import txredisapi
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    FirstError,
    TimeoutError as DeferredTimeoutError,
    fail,
    gatherResults,
    inlineCallbacks,
    succeed,
)
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from rspamd_tx.fuzzy.backend import (
    DEFAULT_EXPIRE,
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
from rspamd_tx.upstreams.hosts import EntryKind, Strategy, UpstreamList, parse_upstreams

log = Logger()

DEFAULT_REDIS_PORT = 6379
DEFAULT_PREFIX = "fuzzy"
DEFAULT_TIMEOUT = 1.0
RECONNECT_MAX_DELAY = 2.0
"""Longest pause between reconnection attempts to a Redis server, in seconds."""

_REDIS_ERRORS = (
    txredisapi.RedisError,
    ConnectionError,
    CancelledError,
    DeferredTimeoutError,
)


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


class _RedisServer:
    """One Redis server: a small (re)connecting txredisapi pool, started on first use."""

    def __init__(self, host: str, port: int, *, reactor: IReactorTCP, db: int | None,
                 password: str | None, username: str | None, timeout: float,
                 pool_size: int) -> None:
        self.name = f"{host}:{port}"
        self.failed = False
        self._factory = txredisapi.RedisFactory(
            self.name, db, pool_size, isLazy=True, charset=None, password=password,
            convertNumbers=False, username=username,
        )
        self._factory.maxDelay = RECONNECT_MAX_DELAY
        self._endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
        self._connecting = False
        self._handler: Any = self._factory.handler

    @property
    def handler(self) -> Any:
        """The txredisapi connection handler; connecting starts on first access."""
        self.connect()
        return self._handler

    def connect(self) -> None:
        """Start (re)connecting the pool, once."""
        if not self._connecting:
            self._connecting = True
            self._factory.startConnecting(self._endpoint)

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


class _ServerGroup:
    """The servers of one role (read or write) with their selection rule."""

    def __init__(self, servers: list[tuple[_RedisServer, int]], strategy: Strategy) -> None:
        self._servers = servers
        self._strategy = strategy
        self._next = 0

    def pick(self) -> _RedisServer | None:
        """The server to use now, ``None`` when all are known to be down."""
        usable = [(server, priority) for server, priority in self._servers if server.usable]
        if not usable:
            return None
        if self._strategy is Strategy.MASTER_SLAVE:
            best = max(priority for _, priority in usable)
            return next(server for server, priority in usable if priority == best)
        self._next = (self._next + 1) % len(usable)
        return usable[self._next][0]


@implementer(IFuzzyBackend)
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
        self._servers: dict[tuple[str, int], _RedisServer] = {}

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

    def _call(self, server: _RedisServer, deferred: Deferred[Any]) -> Deferred[Any]:
        """Bound ``deferred`` by the timeout; errors become BackendUnavailable."""
        deferred.addTimeout(self.timeout, self._clock)

        def succeeded(result: Any) -> Any:
            server.failed = False
            return result

        def failed(failure: Failure) -> Failure:
            while failure.check(FirstError):
                failure = cast(FirstError, failure.value).subFailure
            if failure.check(*_REDIS_ERRORS):
                server.failed = True
                log.warn("Redis {server}: {error}", server=server.name,
                         error=failure.getErrorMessage() or getattr(failure.type, "__name__", "error"))
                return Failure(BackendUnavailable(f"Redis {server.name}: "
                                                  f"{failure.getErrorMessage()}"))
            return failure

        return deferred.addCallbacks(succeeded, failed)

    def _command(self, group: _ServerGroup, *args: Any) -> Deferred[Any]:
        server = group.pick()
        if server is None:
            return fail(BackendUnavailable("no Redis server is available"))
        try:
            deferred = server.handler.execute_command(*args)
        except _REDIS_ERRORS as error:
            deferred = fail(error)
        return self._call(server, deferred)

    # -- reads --------------------------------------------------------------

    @inlineCallbacks
    def check(self, digest: Digest, shingles: Shingles | None) -> Any:
        """``HMGET <prefix>D V F C``; else ``MGET`` of the 32 slot keys and the vote.

        Fires with a :class:`CheckResult` (:data:`MISS` when nothing matches);
        fails with :class:`BackendUnavailable` within ``timeout`` when Redis
        cannot answer (at once when no server is usable).
        """
        found = yield self._fetch(digest, 1.0)
        if found is not None or shingles is None:
            return found if found is not None else MISS
        owners = yield self._command(
            self._read, "MGET",
            *[shingle_key(self.prefix, number, value) for number, value in enumerate(shingles)],
        )
        winner, agreeing = vote_shingles(
            [owner if isinstance(owner, bytes) else None for owner in owners]
        )
        if winner is None:
            return MISS
        found = yield self._fetch(winner, agreeing / SHINGLE_COUNT)
        return found if found is not None else MISS

    @inlineCallbacks
    def _fetch(self, digest: bytes, prob: float) -> Any:
        value, flag, created = yield self._command(
            self._read, "HMGET", self._key(digest), "V", "F", "C"
        )
        if value is None or flag is None:
            return None
        return CheckResult(value=int(value), flag=int(flag), prob=prob,
                           timestamp=int(created) if created is not None else 0, digest=digest)

    def count(self) -> Deferred[int]:
        """``GET <prefix>_count`` (WRITEs minus DELs; 0 when absent)."""
        d = self._command(self._read, "GET", self.prefix + b"_count")
        return d.addCallback(lambda value: int(value) if value is not None else 0)

    def version(self, source: str) -> Deferred[int]:
        """``GET <prefix><source>`` (0 when absent)."""
        d = self._command(self._read, "GET", self.prefix + source.encode())
        return d.addCallback(lambda value: int(value) if value is not None else 0)

    # -- writes -------------------------------------------------------------

    def commands(self, updates: Sequence[Update], source: str = LOCAL_SOURCE) -> list[tuple[Any, ...]]:
        """The commands of one batch between ``MULTI`` and ``EXEC`` (spec §5.2)."""
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
                    ("HSET", key, "F", update.flag),
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
        connection = yield self._call(server, server.handler.pipeline())
        try:
            for command in [("MULTI",), *commands, ("EXEC",)]:
                connection.execute_command(*command)
            replies = yield self._call(server, connection.execute_pipeline())
        except txredisapi.ConnectionError as error:
            server.failed = True
            raise BackendUnavailable(f"Redis {server.name}: {error}") from error
        executed = replies[-1]
        if not isinstance(executed, list) or not executed:
            raise BackendUnavailable(f"Redis {server.name}: transaction aborted")
        return int(executed[-1])

    def expire(self, now: float) -> Deferred[int]:
        """Nothing to do: Redis expires keys by their TTL. Fires with 0."""
        return succeed(0)

    def close(self) -> Deferred[None]:
        """Close every connection; fires when all are closed."""
        d = gatherResults([server.disconnect() for server in self._servers.values()],
                          consumeErrors=True)
        return d.addCallback(lambda _: None)
