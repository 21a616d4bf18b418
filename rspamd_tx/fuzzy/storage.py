"""The fuzzy storage request pipeline: one request in, at most one reply out.

:class:`FuzzyStorage` turns a request datagram (or TCP frame payload) from a
source address into the reply bytes, following ``fuzzy-protocol.md`` §10.1:

1. **admission**: a source in ``blocked`` is dropped before parsing;
2. **parse/decrypt** with the configured keypairs, then those of
   ``dynamic_keys_map`` (unknown key ids use the default key, the last
   configured one); failures get no reply, are counted in
   ``invalid_requests`` and per source in ``errors_ips``, and logged at most
   once per :data:`LOG_INTERVAL`;
3. ``encrypted_only`` refuses plaintext commands;
4. per command:

   * CHECK: the rate limit (:mod:`rspamd_tx.fuzzy.ratelimit`), then the
     backend lookup; a backend failure answers a miss.  The result then goes
     through ``skip_hashes`` (401), ``delay`` (a hash younger than
     ``delay × (1 + 0.5·rand)`` is reported as a miss, flag kept), a REFRESH
     queued when ``prob`` > 0.9 unless ``read_only``, and ``forbidden_ids``
     (reply zeroed);
   * WRITE / DEL: write authorisation (``fuzzy-storage.md`` §3:
     ``read_only``, then ``allow_update`` when configured, else
     ``allow_update_keys`` for encrypted requests, except on a replication
     slave), ``skip_hashes`` for WRITE (401), then the update is queued
     (a WRITE under one of the ``weak_ids`` marked weak) and acknowledged at
     once (``prob`` 1.0, request flag);
   * STAT: the stored-hash count as 3.8+ encodes it (``value`` = high 32
     bits, ``flag`` = low 32 bits, ``prob`` 1.0), which 3.4 clients read
     from ``flag``; the count is refreshed by :meth:`FuzzyStorage.refresh_count`;
   * PING: ``prob`` 1.0 and the request ``value`` echoed;
   * any other code (including the internal REFRESH and DUP): refused with 500.

Refusal codes follow the Rspamd 3.4 dialect, the peer this storage is tested
against: **403** for a rate-limited CHECK, a plaintext command under
``encrypted_only`` and a WRITE/DEL that is not permitted (3.10+ storages send
503 and 415 for the last two, which 3.4 clients do not recognise); **401** for
``skip_hashes``; **500** for an unknown command.

Replies use the request's epoch (16/96 bytes, plus 40 when encrypted: the
reply is then encrypted with the request's shared key).

Source addresses are :mod:`ipaddress` objects; ``None`` stands for a local
(unix socket) client, which Rspamd lets write and never rate limits.
"""

from __future__ import annotations

import os
import random
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol, TypeVar, Union

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import CounterMetricFamily
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from rspamd_tx.address_lists import (
    NetworkSet,
    networks,
    normal_address,
    read_map_lines,
)
from rspamd_tx.address_lists import host_names as address_host_names
from rspamd_tx.config.workers import FuzzyOptions
from rspamd_tx.fuzzy.backend import (
    LOCAL_SOURCE,
    CheckResult,
    Digest,
    IFuzzyBackend,
    IImmediateFuzzyBackend,
    Shingles,
    Update,
    UpdateKind,
)
from rspamd_tx.fuzzy.ratelimit import IPAddress, RateLimiter
from rspamd_tx.fuzzy.replication import is_replication_slave
from rspamd_tx.protocols import zbase32
from rspamd_tx.protocols.cryptobox import NmKeyCache
from rspamd_tx.protocols.fuzzy_codec import (
    DIGEST_SIZE,
    Command,
    Epoch,
    FuzzyProtocolError,
    FuzzyRequest,
    ReplyCode,
    decode_request,
    encode_reply_values,
)
from rspamd_tx.protocols.keypair import Keypair

__all__ = [
    "FuzzyPolicy",
    "FuzzyStats",
    "FuzzyStorage",
    "HandleResult",
    "LOG_INTERVAL",
    "RequestCounters",
    "UpdateSink",
    "host_names",
    "key_label",
]

log = Logger()

_T = TypeVar("_T")

HandleResult = Union[bytes, None, "Deferred[bytes | None]"]
"""What :meth:`FuzzyStorage.handle` returns: the reply, ``None`` for no reply,
or a Deferred firing with one of those (CHECK with an asynchronous backend)."""

LOG_INTERVAL = 60.0
"""Invalid requests and failed lookups are each logged at most once per this many seconds."""

IP_STATS_SIZE = 1024
"""Per-source counters kept per key (and invalid-request sources), LRU."""

PEER_CACHE_SIZE = 4096
"""Source addresses whose policy facts a :class:`FuzzyPolicy` remembers (oldest dropped first)."""

UNKEYED = "unkeyed"
"""Statistics label of plaintext clients."""

_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1
_U32 = 0xFFFFFFFF
_CHECK, _WRITE, _DEL, _STAT, _PING = (Command.CHECK, Command.WRITE, Command.DEL, Command.STAT,
                                      Command.PING)
_ADD_KIND, _DEL_KIND, _REFRESH_KIND = UpdateKind.ADD, UpdateKind.DEL, UpdateKind.REFRESH
_FORBIDDEN, _SKIPPED, _INTERNAL_ERROR = (ReplyCode.FORBIDDEN, ReplyCode.SKIPPED,
                                         ReplyCode.INTERNAL_ERROR)


class UpdateSink(Protocol):
    """Where accepted writes and internal refreshes go (the update queue)."""

    def push(self, update: Update) -> None:
        """Queue ``update`` for the next flush; never raises for a valid update."""


def key_label(keypair: Keypair) -> str:
    """The statistics label of a server key: zbase32 of its 8-byte wire key id."""
    return zbase32.encode(keypair.fuzzy_key_id)


def host_names(options: FuzzyOptions) -> set[str]:
    """Host names in the address lists of ``options`` (they need resolving)."""
    return address_host_names(options.allow_update, options.delay_whitelist, options.blocked,
                              options.ratelimit_whitelist)


def _skip_hashes(entries: Iterable[str]) -> frozenset[bytes]:
    digests: set[bytes] = set()
    for entry in entries:
        texts = (read_map_lines(entry)
                 if entry.startswith(("/", "./", "../", "file://", "http://", "https://"))
                 else [entry])
        for text in texts:
            try:
                digest = bytes.fromhex(text)
            except ValueError:
                digest = b""
            if len(digest) != DIGEST_SIZE:
                log.warn("skip_hashes: {text!r} is not a 128-digit hex digest; ignored",
                         text=text)
                continue
            digests.add(digest)
    return frozenset(digests)


@dataclass(frozen=True)
class FuzzyPolicy:
    """Everything configurable the pipeline consults, swapped as one value.

    A policy also remembers what it has worked out per source address (see
    :meth:`_peer`) and per keypair (statistics label, write permission), so
    replacing the policy forgets all of it at once.

    Attributes:
        keypairs: the server keypairs; the last one is the default key.
        dynamic_keypairs: the keypairs of ``dynamic_keys_map``: found by key
            id after ``keypairs``, never the default key.
        allow_update: sources allowed to write; ``None`` when not configured.
        allow_update_keys: ``id`` strings (zbase32 of BLAKE2b-512 of the public
            key) of server keys whose clients may write.
        blocked: sources dropped before parsing.
        delay: seconds a new hash stays hidden from CHECK, or ``None``.
        delay_whitelist: sources that see new hashes at once.
        encrypted_only: plaintext commands are refused.
        read_only: every write is refused and no REFRESH is queued.
        skip_hashes: digests refused on WRITE and hidden from CHECK (401).
        forbidden_ids: flags whose CHECK hits are answered as misses.
        weak_ids: flags whose WRITEs never replace the flag of a hash stored
            under another one.
    """

    keypairs: tuple[Keypair, ...] = ()
    dynamic_keypairs: tuple[Keypair, ...] = ()
    allow_update: NetworkSet | None = None
    allow_update_keys: frozenset[str] = frozenset()
    blocked: NetworkSet = NetworkSet()
    delay: float | None = None
    delay_whitelist: NetworkSet = NetworkSet()
    encrypted_only: bool = False
    read_only: bool = False
    skip_hashes: frozenset[bytes] = frozenset()
    forbidden_ids: frozenset[int] = frozenset()
    weak_ids: frozenset[int] = frozenset()
    _by_id: Mapping[bytes, Keypair] = field(init=False, repr=False, compare=False)
    _labels: Mapping[int, str] = field(init=False, repr=False, compare=False)
    _key_writers: Mapping[int, bool] = field(init=False, repr=False, compare=False)
    _peers: dict[IPAddress | None, _Peer] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Per-key facts by id() of our own keypairs: the policy keeps them
        # alive, so an id here cannot stand for another object.
        setattr_ = object.__setattr__
        every = (*self.dynamic_keypairs, *self.keypairs)
        # A static key wins over a dynamic one with the same id.
        setattr_(self, "_by_id", {k.fuzzy_key_id: k for k in every})
        setattr_(self, "_labels", {id(k): key_label(k) for k in every})
        setattr_(self, "_key_writers",
                 {id(k): k.id_string in self.allow_update_keys for k in every})
        setattr_(self, "_peers", {})

    @classmethod
    def from_options(cls, options: FuzzyOptions,
                     hosts: Mapping[str, Iterable[IPAddress]] | None = None,
                     dynamic_keypairs: tuple[Keypair, ...] = ()) -> FuzzyPolicy:
        """The policy of ``options`` with these dynamic keypairs; host names are
        looked up in ``hosts`` (unresolved ones are logged and left out;
        ``None`` means not resolved yet), local map files are read.  A
        replication slave (``masters`` set) lets only ``allow_update``
        addresses write, never key holders."""
        allow_keys: set[str] = set()
        for entry in () if is_replication_slave(options) else options.allow_update_keys:
            if entry.startswith(("/", "./", "../", "file://")):
                allow_keys.update(read_map_lines(entry))
            else:
                allow_keys.add(entry)
        return cls(
            keypairs=tuple(options.keypairs),
            dynamic_keypairs=dynamic_keypairs,
            allow_update=(networks(options.allow_update, hosts)
                          if options.allow_update else None),
            allow_update_keys=frozenset(allow_keys),
            blocked=networks(options.blocked, hosts),
            delay=options.delay if options.delay else None,
            delay_whitelist=networks(options.delay_whitelist, hosts),
            encrypted_only=options.encrypted_only,
            read_only=options.read_only,
            skip_hashes=_skip_hashes(options.skip_hashes),
            forbidden_ids=frozenset(options.forbidden_ids),
            weak_ids=frozenset(options.weak_ids),
        )

    def key_for(self, key_id: bytes) -> Keypair | None:
        """The keypair for a request's 8-byte key id (static, then dynamic),
        else the default key (the last static one; ``None`` without any)."""
        keypair = self._by_id.get(key_id)
        if keypair is None and self.keypairs:
            keypair = self.keypairs[-1]
        return keypair

    def may_write(self, address: IPAddress | None, keypair: Keypair | None) -> bool:
        """Write authorisation of ``fuzzy-storage.md`` §3."""
        return self._may_write(address is None or address in (self.allow_update or ()), keypair)

    def _may_write(self, update_allowed: bool, keypair: Keypair | None) -> bool:
        """:meth:`may_write` for a source whose ``allow_update`` membership
        (local sources always count as members) is ``update_allowed``."""
        if self.read_only:
            return False
        if self.allow_update is not None:
            return update_allowed
        if self.allow_update_keys and keypair is not None:
            allowed = self._key_writers.get(id(keypair))
            if allowed is None:  # not one of this policy's keys
                return keypair.id_string in self.allow_update_keys
            return allowed
        return False

    def label(self, keypair: Keypair | None) -> str:
        """The statistics label of requests decrypted with ``keypair``
        (:func:`key_label`; :data:`UNKEYED` for plaintext)."""
        if keypair is None:
            return UNKEYED
        label = self._labels.get(id(keypair))
        return label if label is not None else key_label(keypair)

    def _peer(self, address: IPAddress | None) -> _Peer:
        """What this policy says about ``address`` (``None``: a local socket).

        Computed once per address and kept (at most :data:`PEER_CACHE_SIZE`
        addresses, the oldest dropped first); the address is normalised as
        :meth:`FuzzyStorage.handle` describes.
        """
        peers = self._peers
        peer = peers.get(address)
        if peer is None:
            normal = None if address is None else normal_address(address)
            peer = _Peer(
                address=normal,
                source="unix" if normal is None else str(normal),
                blocked=normal in self.blocked,
                update_allowed=normal is None or normal in (self.allow_update or ()),
                delay_exempt=normal in self.delay_whitelist,
            )
            if len(peers) >= PEER_CACHE_SIZE:
                del peers[next(iter(peers))]
            peers[address] = peer
        return peer


@dataclass(frozen=True, slots=True)
class _Peer:
    """A source address and the policy's verdicts on it.

    Attributes:
        address: the normalised address, ``None`` for a local socket.
        source: its statistics and update-source label (``unix`` when local).
        blocked: in ``blocked``.
        update_allowed: local, or in ``allow_update`` (when configured).
        delay_exempt: in ``delay_whitelist``.
    """

    address: IPAddress | None
    source: str
    blocked: bool
    update_allowed: bool
    delay_exempt: bool


@dataclass(slots=True)
class RequestCounters:
    """Rspamd's per-key and per-source counters."""

    checked: int = 0
    matched: int = 0
    added: int = 0
    deleted: int = 0
    errors: int = 0
    delayed: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters by name."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(slots=True)
class _KeyStats:
    counters: RequestCounters = field(default_factory=RequestCounters)
    ips: OrderedDict[str, RequestCounters] = field(default_factory=OrderedDict)

    def for_source(self, source: str) -> RequestCounters:
        counters = self.ips.get(source)
        if counters is None:
            counters = self.ips[source] = RequestCounters()
            while len(self.ips) > IP_STATS_SIZE:
                self.ips.popitem(last=False)
        else:
            self.ips.move_to_end(source)
        return counters


class FuzzyStats:
    """The storage's statistics, shaped like Rspamd's ``fuzzystat``.

    Attributes:
        fuzzy_stored: last known number of stored hashes.
        invalid_requests: datagrams that did not parse or decrypt.
        delayed_hashes: CHECK hits hidden by ``delay``.
        blocked_requests: datagrams dropped because the source is blocked.
        ratelimited_requests: CHECKs refused by the rate limit.
        backend_errors: CHECKs answered as misses because the backend failed.
        internal_errors: requests dropped by an unexpected error.
        checked / shingles / found: per epoch, commands answered, shingle
            commands among them, answers with ``prob`` > 0.5.
    """

    def __init__(self) -> None:
        self.fuzzy_stored = 0
        self.invalid_requests = 0
        self.delayed_hashes = 0
        self.blocked_requests = 0
        self.ratelimited_requests = 0
        self.backend_errors = 0
        self.internal_errors = 0
        self.checked: dict[Epoch, int] = {epoch: 0 for epoch in (Epoch.EPOCH10, Epoch.EPOCH11)}
        self.shingles: dict[Epoch, int] = dict(self.checked)
        self.found: dict[Epoch, int] = dict(self.checked)
        self._keys: dict[str, _KeyStats] = {}
        self._errors_ips: OrderedDict[str, int] = OrderedDict()

    def key(self, label: str) -> RequestCounters:
        """The counters of the key labelled ``label`` (``unkeyed`` for plaintext)."""
        return self._key_stats(label).counters

    def source(self, label: str, source: str) -> RequestCounters:
        """The counters of ``source`` under the key labelled ``label``."""
        return self._key_stats(label).for_source(source)

    def _key_stats(self, label: str) -> _KeyStats:
        stats = self._keys.get(label)
        if stats is None:
            stats = self._keys[label] = _KeyStats()
        return stats

    def invalid(self, source: str) -> None:
        """Count an invalid request from ``source``."""
        self.invalid_requests += 1
        self._errors_ips[source] = self._errors_ips.pop(source, 0) + 1
        while len(self._errors_ips) > IP_STATS_SIZE:
            self._errors_ips.popitem(last=False)

    def record(self, label: str, source: str, command: int, epoch: Epoch, value: int,
               matched: bool, shingle: bool, delayed: bool) -> None:
        """Count one answered command (Rspamd 3.4's rule, §13): in its epoch,
        and under its key label both as a whole and for ``source``."""
        checked = self.checked
        checked[epoch] = checked.get(epoch, 0) + 1
        if matched:
            self.found[epoch] = self.found.get(epoch, 0) + 1
        if shingle:
            self.shingles[epoch] = self.shingles.get(epoch, 0) + 1
        stats = self._keys.get(label)
        if stats is None:
            stats = self._keys[label] = _KeyStats()
        total = stats.counters
        ips = stats.ips
        per_source = ips.get(source)
        if per_source is None:
            per_source = stats.for_source(source)
        else:
            ips.move_to_end(source)
        if delayed:
            self.delayed_hashes += 1
            total.delayed += 1
            per_source.delayed += 1
        if not matched and value != 0:
            total.errors += 1
            per_source.errors += 1
        elif command == _CHECK:
            total.checked += 1
            per_source.checked += 1
            if matched:
                total.matched += 1
                per_source.matched += 1
        elif command == _WRITE:
            total.added += 1
            per_source.added += 1
        elif command == _DEL:
            total.deleted += 1
            per_source.deleted += 1

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready statistics (Rspamd's ``fuzzystat`` keys plus ours)."""
        return {
            "keys": {
                label: {**stats.counters.as_dict(),
                        "ips": {ip: c.as_dict() for ip, c in stats.ips.items()}}
                for label, stats in self._keys.items()
            },
            "fuzzy_stored": self.fuzzy_stored,
            "fuzzy_expired": 0,
            "invalid_requests": self.invalid_requests,
            "delayed_hashes": self.delayed_hashes,
            "blocked_requests": self.blocked_requests,
            "ratelimited_requests": self.ratelimited_requests,
            "backend_errors": self.backend_errors,
            "internal_errors": self.internal_errors,
            "errors_ips": dict(self._errors_ips),
            "fuzzy_checked": [self.checked.get(e, 0) for e in (Epoch.EPOCH10, Epoch.EPOCH11)],
            "fuzzy_shingles": [self.shingles.get(e, 0) for e in (Epoch.EPOCH10, Epoch.EPOCH11)],
            "fuzzy_found": [self.found.get(e, 0) for e in (Epoch.EPOCH10, Epoch.EPOCH11)],
        }


class _Metrics:
    """The Prometheus view of the storage, in its own registry.

    Request counts are plain integers bumped per request on the reactor
    thread and turned into the ``rspamd_tx_fuzzy_requests_total`` counter
    family when the registry is collected (a scrape), so counting costs one
    dict update instead of a locked counter.
    """

    def __init__(self, registry: CollectorRegistry, depth: Callable[[], float],
                 stored: Callable[[], float]) -> None:
        self._counts: dict[tuple[int | None, str], int] = {}
        registry.register(self)
        self.queue_depth = Gauge(
            "rspamd_tx_fuzzy_queue_depth", "Updates waiting to be stored", registry=registry)
        self.queue_depth.set_function(depth)
        self.stored = Gauge(
            "rspamd_tx_fuzzy_stored_hashes", "Last known number of stored hashes",
            registry=registry)
        self.stored.set_function(stored)

    def count(self, code: int | None, outcome: str) -> None:
        """Count one request with command ``code`` (``None``: not parsed) and ``outcome``."""
        key = (code, outcome)
        counts = self._counts
        counts[key] = counts.get(key, 0) + 1

    def collect(self) -> Iterator[CounterMetricFamily]:
        """The request counts as a counter family (the registry's collector API)."""
        family = CounterMetricFamily(
            "rspamd_tx_fuzzy_requests", "Fuzzy requests by command and outcome",
            labels=["command", "outcome"])
        totals: dict[tuple[str, str], int] = {}
        for (code, outcome), value in self._counts.items():
            labels = ("unknown" if code is None else _command_name(code), outcome)
            totals[labels] = totals.get(labels, 0) + value
        for labels, value in sorted(totals.items()):
            family.add_metric(list(labels), value)
        yield family


def _command_name(code: int) -> str:
    return Command(code).name.lower() if code in Command._value2member_map_ else "unknown"


def _clamp_i32(value: int) -> int:
    return max(_I32_MIN, min(_I32_MAX, value))


class _ThrottledLog:
    """Logs a recurring event at most once per ``interval`` seconds, at ``level``."""

    def __init__(self, clock: IReactorTime, interval: float, level: LogLevel) -> None:
        self._clock = clock
        self._interval = interval
        self._level = level
        self._next = float("-inf")
        self._suppressed = 0

    def emit(self, format: str, **kwargs: object) -> None:
        now = self._clock.seconds()
        if now < self._next:
            self._suppressed += 1
            return
        log.emit(self._level, format + " ({suppressed} similar messages suppressed)",
                 suppressed=self._suppressed, **kwargs)
        self._suppressed = 0
        self._next = now + self._interval


class FuzzyStorage:
    """The request pipeline of one fuzzy storage worker.

    Attributes:
        backend: where hashes are looked up (and, through the queue, stored);
            fixed at construction.
        queue: where accepted updates go.
        policy: the current :class:`FuzzyPolicy` (replaced by :meth:`reconfigure`).
        ratelimiter: the CHECK rate limiter, or ``None`` when not configured.
        stats: the :class:`FuzzyStats`.
        registry: the Prometheus registry holding the storage's metrics.
    """

    def __init__(
        self,
        options: FuzzyOptions,
        backend: IFuzzyBackend,
        queue: UpdateSink,
        clock: IReactorTime,
        *,
        hosts: Mapping[str, Iterable[IPAddress]] | None = None,
        registry: CollectorRegistry | None = None,
        queue_depth: Callable[[], float] | None = None,
        jitter: Callable[[], float] = random.random,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        """
        :param options: the worker's options.
        :param backend: the hash store.
        :param queue: receives accepted WRITE/DEL and internal REFRESH updates.
        :param clock: time source (``delay``, rate limit, log throttling).
        :param hosts: addresses of the host names in the address lists
            (``None``: not resolved yet; they match nothing until
            :meth:`reconfigure` gives them).
        :param registry: Prometheus registry for the metrics (a new one if absent).
        :param queue_depth: reports the queue's depth for the metric.
        :param jitter: uniform [0, 1) numbers for the ``delay`` jitter.
        :param random_bytes: nonces of encrypted replies.
        """
        self.backend = backend
        self._check_now: Callable[[Digest, Shingles | None], CheckResult] | None = (
            IImmediateFuzzyBackend(backend).check_now
            if IImmediateFuzzyBackend.providedBy(backend) else None)
        self.queue = queue
        self.stats = FuzzyStats()
        self.registry = registry if registry is not None else CollectorRegistry()
        self._clock = clock
        self._jitter = jitter
        self._random_bytes = random_bytes
        self._invalid_log = _ThrottledLog(clock, LOG_INTERVAL, LogLevel.info)
        self._backend_log = _ThrottledLog(clock, LOG_INTERVAL, LogLevel.warn)
        self._metrics = _Metrics(self.registry, queue_depth or (lambda: 0.0),
                                 lambda: float(self.stats.fuzzy_stored))
        self.policy = FuzzyPolicy()
        self._dynamic_keypairs: tuple[Keypair, ...] = ()
        self.ratelimiter: RateLimiter | None = None
        self._ratelimit_settings: tuple[Any, ...] | None = None
        self._nm_cache = NmKeyCache(max(1, options.keypair_cache_size))
        self.reconfigure(options, hosts)

    # -- configuration ------------------------------------------------------

    def reconfigure(self, options: FuzzyOptions,
                    hosts: Mapping[str, Iterable[IPAddress]] | None = None) -> None:
        """Switch keys, ACLs and policy to ``options`` in one step.

        The rate limiter keeps its buckets when its settings are unchanged.
        """
        policy = FuzzyPolicy.from_options(options, hosts, self._dynamic_keypairs)
        settings = (options.ratelimit_rate, options.ratelimit_burst,
                    options.ratelimit_network_mask, options.ratelimit_max_buckets,
                    options.ratelimit_bucket_ttl, options.ratelimit_log_only,
                    tuple(options.ratelimit_whitelist),
                    None if hosts is None else sorted((k, tuple(v)) for k, v in hosts.items()))
        ratelimiter = self.ratelimiter
        if settings != self._ratelimit_settings:
            ratelimiter = None
            if options.ratelimit_rate is not None and options.ratelimit_burst is not None:
                ratelimiter = RateLimiter(
                    options.ratelimit_rate, options.ratelimit_burst, self._clock,
                    network_mask=options.ratelimit_network_mask,
                    max_buckets=options.ratelimit_max_buckets,
                    bucket_ttl=options.ratelimit_bucket_ttl,
                    whitelist=networks(options.ratelimit_whitelist, hosts),
                    log_only=options.ratelimit_log_only)
        self.policy, self.ratelimiter, self._ratelimit_settings = policy, ratelimiter, settings

    def use_dynamic_keys(self, keypairs: tuple[Keypair, ...]) -> None:
        """Serve ``keypairs`` (a new ``dynamic_keys_map`` load) besides the static
        keys, from now on and across :meth:`reconfigure`."""
        self._dynamic_keypairs = tuple(keypairs)
        self.policy = replace(self.policy, dynamic_keypairs=self._dynamic_keypairs)

    # -- the hash count -----------------------------------------------------

    def refresh_count(self) -> Deferred[None]:
        """Re-read the stored-hash count from the backend; never fails."""
        try:
            d = self.backend.count()
        except Exception as error:  # a broken backend must not stop the caller's timer
            d = fail(error)

        def store(count: int) -> None:
            self.stats.fuzzy_stored = int(count)

        def failed(failure: Failure) -> None:
            log.warn("cannot read the fuzzy hash count: {error}",
                     error=failure.getErrorMessage())

        return d.addCallbacks(store, failed)

    # -- requests -----------------------------------------------------------

    def handle(self, datagram: bytes, address: IPAddress | None) -> HandleResult:
        """The reply to ``datagram`` from ``address`` (``None``: a local socket).

        An IPv4-mapped IPv6 address counts as its IPv4 address.  Returns the
        reply bytes, ``None`` when nothing is to be sent, or a Deferred firing
        with one of those when the backend answers later (a backend providing
        :class:`~rspamd_tx.fuzzy.backend.IImmediateFuzzyBackend` never makes
        it wait).  Never raises, and the Deferred never fails: unexpected
        errors are logged, counted in ``internal_errors`` and give no reply.
        """
        try:
            policy = self.policy
            result = self._handle(policy, datagram, policy._peer(address))
        except Exception:
            self._internal_error(Failure())
            return None
        if result is None or isinstance(result, bytes):
            return result
        return _settled(result.addErrback(self._internal_error))

    def _internal_error(self, failure: Failure) -> None:
        self.stats.internal_errors += 1
        log.failure("fuzzy request dropped after an internal error", failure)

    def _handle(self, policy: FuzzyPolicy, datagram: bytes, peer: _Peer) -> HandleResult:
        if peer.blocked:
            self.stats.blocked_requests += 1
            self._metrics.count(None, "blocked")
            return None
        try:
            request = decode_request(datagram, policy.key_for, self._nm_cache)
        except FuzzyProtocolError as error:
            self.stats.invalid(peer.source)
            self._metrics.count(None, "invalid")
            self._invalid_log.emit("invalid fuzzy request from {source}: {error}",
                                   source=peer.source, error=str(error))
            return None
        command = request.command
        code = command.command
        if policy.encrypted_only and request.encryption is None:
            return self._answer(request, peer, _FORBIDDEN, "refused", 0)
        if code == _CHECK:
            return self._check(policy, request, peer)
        if code == _WRITE or code == _DEL:
            return self._write(policy, request, peer)
        if code == _STAT:
            count = max(0, self.stats.fuzzy_stored)
            return self._answer(request, peer, count >> 32 & 0x7FFFFFFF, "ok", count & _U32, 1.0)
        if code == _PING:
            return self._answer(request, peer, command.value, "ok", command.flag, 1.0)
        return self._answer(request, peer, _INTERNAL_ERROR, "refused", 0)

    def _write(self, policy: FuzzyPolicy, request: FuzzyRequest, peer: _Peer) -> bytes:
        command = request.command
        encryption = request.encryption
        if not policy._may_write(peer.update_allowed,
                                 None if encryption is None else encryption.keypair):
            return self._answer(request, peer, _FORBIDDEN, "refused", command.flag)
        if command.command == _WRITE:
            if command.digest in policy.skip_hashes:
                return self._answer(request, peer, _SKIPPED, "skipped", command.flag)
            update = Update(_ADD_KIND, command.digest, command.flag, command.value,
                            command.shingles or None, peer.source,
                            command.flag in policy.weak_ids)
        else:
            update = Update(_DEL_KIND, command.digest, command.flag, 0,
                            command.shingles or None, peer.source)
        self.queue.push(update)
        return self._answer(request, peer, 0, "accepted", command.flag, 1.0)

    def _check(self, policy: FuzzyPolicy, request: FuzzyRequest, peer: _Peer) -> HandleResult:
        ratelimiter = self.ratelimiter
        if ratelimiter is not None and not ratelimiter.allow(peer.address):
            self.stats.ratelimited_requests += 1
            return self._answer(request, peer, _FORBIDDEN, "ratelimited", 0)
        command = request.command
        check_now = self._check_now
        if check_now is not None:
            try:
                result = check_now(command.digest, command.shingles or None)
            except Exception:
                return self._lookup_failed(request, peer, Failure())
            return self._checked(policy, request, peer, result)
        try:
            lookup: Deferred[CheckResult] = self.backend.check(
                command.digest, command.shingles or None)
        except Exception as error:
            lookup = fail(error)

        def answer(result: CheckResult) -> bytes | None:
            return self._checked(policy, request, peer, result)

        def failed(failure: Failure) -> bytes | None:
            return self._lookup_failed(request, peer, failure)

        return _settled(lookup.addCallbacks(answer, failed))

    def _lookup_failed(self, request: FuzzyRequest, peer: _Peer, failure: Failure) -> bytes:
        self.stats.backend_errors += 1
        self._backend_log.emit("fuzzy lookup failed, answering a miss: {error}",
                               error=failure.getErrorMessage())
        return self._answer(request, peer, 0, "backend_error", 0)

    def _checked(self, policy: FuzzyPolicy, request: FuzzyRequest, peer: _Peer,
                 result: CheckResult) -> bytes:
        if not result.prob > 0.5:  # not result.hit
            return self._answer(request, peer, 0, "miss", 0)
        command = request.command
        digest = result.digest if result.digest is not None else command.digest
        value, flag, prob = result.value, result.flag & _U32, result.prob
        if not _I32_MIN <= value <= _I32_MAX:
            value = _clamp_i32(value)
        ts = int(result.timestamp)
        skip_hashes = policy.skip_hashes
        if skip_hashes and (digest in skip_hashes or command.digest in skip_hashes):
            return self._answer(request, peer, _SKIPPED, "skipped", flag, 0.0, digest)
        delayed = False
        if policy.delay is not None and not peer.delay_exempt:
            age = self._clock.seconds() - ts
            delayed = age < policy.delay * (1.0 + 0.5 * self._jitter())
        if prob > 0.9 and not policy.read_only:
            self.queue.push(Update(_REFRESH_KIND, digest, result.flag, 0,
                                   command.shingles or None, LOCAL_SOURCE))
        if flag in policy.forbidden_ids:
            return self._answer(request, peer, 0, "forbidden", 0, 0.0, digest)
        return self._answer(request, peer, value, "delayed" if delayed else "hit", flag,
                            prob, digest, ts, delayed)

    def _answer(self, request: FuzzyRequest, peer: _Peer, value: int, outcome: str, flag: int,
                prob: float = 0.0, digest: bytes | None = None, ts: int = 0,
                delayed: bool = False) -> bytes:
        """Count the answer and encode it; ``delayed`` replies are sent as misses.

        ``digest`` defaults to the request's; ``ts`` is clamped to a u32.
        """
        command = request.command
        encryption = request.encryption
        code = command.command
        self.stats.record(UNKEYED if encryption is None else self.policy.label(encryption.keypair),
                          peer.source, code, request.epoch, value, prob > 0.5,
                          bool(command.shingles), delayed)
        self._metrics.count(code, outcome)
        if delayed:
            value, prob, ts = 0, 0.0, 0
        elif not 0 <= ts <= _U32:
            ts = max(0, min(ts, _U32))
        return encode_reply_values(request, value, flag, prob,
                                   command.digest if digest is None else digest, ts,
                                   self._random_bytes)


def _settled(d: Deferred[_T]) -> _T | Deferred[_T]:
    """``d``'s result if it has already fired (and is not a failure), else ``d``."""
    box: list[_T] = []

    def keep(value: _T) -> _T:
        box.append(value)
        return value

    d.addCallback(keep)
    return box[0] if box else d
