"""Master/slave replication between fuzzy storages (rspamd-tx's own; Rspamd 2.0+ has none).

Roles
    A storage whose ``slaves`` is non-empty is a **master**: after each
    successful flush of its update queue it numbers the batch with the next
    revision of its replication log and streams it to every slave.
    A storage whose ``masters`` is non-empty is a **slave**: it listens for
    its master (``replication_bind``, default ``*:11336``), applies batches
    strictly in revision order through its own backend and acknowledges
    each revision. ``masters = ""`` (empty) means *no master is accepted*:
    the replication listener is not opened at all (an empty list never means
    "anyone"). A storage may be neither or both. :func:`is_replication_slave`
    is the flag the request pipeline reads: a slave authorises direct
    WRITE/DEL only from ``allow_update`` addresses (never through
    ``allow_update_keys`` alone). The slave seed (``masters = ""``,
    ``allow_update = ""``) thus accepts neither replication nor direct
    writes until ``masters`` and ``master_key`` are filled in.

Transport and keys (wire format: :mod:`rspamd_tx.protocols.replication_codec`)
    The master connects over TCP to each ``slaves`` entry (``host`` or
    ``host:port``, ``[v6]:port``; default port :data:`DEFAULT_REPLICATION_PORT`).
    The slave accepts the connection only from a peer address in
    ``masters``, sends a fresh ephemeral public key, and the master answers
    with its static public key; every later frame is sealed with the
    cryptobox NM key of that pair. The master's key is ``sync_keypair`` if
    configured, else the storage's default (last) ``keypair``; the slave
    requires ``master_key`` to equal it. The slave is identified by address
    only: the stream is confidential against eavesdroppers and cannot be
    forged or replayed towards a slave, but a host impersonating a slave's
    address could read it.

Revisions, log, catch-up, resync
    The master's :class:`ReplicationLog` holds an ``epoch`` (random 64-bit id
    of this revision history) and the last ``capacity`` batches, in memory
    and, with a ``dbdir``, in the append-only file ``replication.log``
    (fsync'ed per batch, compacted when it holds twice ``capacity``). The
    backend's own per-source revision is not used: REFRESH-only batches do
    not advance it and storages sharing one Redis share it.
    On connect the slave reports the ``(epoch, revision)`` it last applied
    (kept in ``replication.state`` under its ``dbdir``, else in memory). Same
    epoch and a revision the log still covers: the master sends the missing
    batches. Otherwise (new slave, log rolled over, master history lost) a
    **full resync** streams every hash the master's backend stores (a
    backend providing :class:`IHashScanner`); the slave replaces each digest
    (DEL then ADD with the master's weight), records the master's epoch and
    the revision the copy ends at, then receives the later batches. When the
    backend cannot list its hashes but the log still starts at revision 1,
    the slave is instead reset to an empty revision 0 and sent the whole log.
    Batches stored while the copy is being read may or may not show in it:
    once the copy is sent, the master re-reads every digest those batches
    touched and sends its current state (repeating until no batch came in
    meanwhile), so the slave ends equal to the master at the final revision.
    Hashes the slave holds but the master does not are deleted during the
    copy when the slave's backend provides ``scan`` too (the copy arrives in
    digest order, so each chunk prunes the range it covers, the last one
    everything after it); otherwise, and when the copy is empty (nothing is
    deleted on the strength of an empty copy), they survive until they
    expire. Caveats: a batch already stored by the
    backend but not yet handed to :meth:`ReplicationMaster.publish` when a
    digest is re-read is counted twice on that slave (the window is the
    time between the backend's commit and the flush hook); a slave crashing
    between storing a batch and recording its revision applies that batch
    again (ADD weights add up).

Timing
    Everything uses the injected clock. A slave that does not acknowledge
    within ``master_timeout`` is disconnected; every disconnection is
    followed by a reconnection after an exponential backoff (1 s doubling up
    to 60 s, reset by the next acknowledgement). Handshakes not finished
    within ``master_timeout`` are dropped by both sides.

Observability
    Per slave: last acknowledged revision, lag in revisions and in seconds
    (age of the oldest unacknowledged batch), connection state, full resyncs;
    as ``prometheus_client`` metrics ``rspamd_tx_fuzzy_replication_*`` and in
    :meth:`ReplicationMaster.stats` / :meth:`ReplicationSlave.stats` for
    ``/stat``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import struct
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from twisted.application.service import IService, Service
from twisted.internet.defer import (
    Deferred,
    gatherResults,
    inlineCallbacks,
    maybeDeferred,
    succeed,
)
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IListeningPort,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, ServerFactory, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface

from rspamd_tx.config.bind import (
    SocketKind,
    adopt_sockets,
    open_listen_sockets,
    parse_bind_line,
    resolve_host,
)
from rspamd_tx.config.schema import HostRef, MapRef, NetworkEntry
from rspamd_tx.config.tree import ConfigError
from rspamd_tx.fuzzy.backend import IFuzzyBackend, Update, UpdateKind
from rspamd_tx.protocols.keypair import Keypair, PublicKey
from rspamd_tx.protocols.replication_codec import (
    MAX_UPDATES_PER_FRAME,
    PROTOCOL_VERSION,
    Ack,
    Auth,
    Batch,
    Frame,
    FrameDecoder,
    Hello,
    ReplicationCodecError,
    ResyncBegin,
    ResyncChunk,
    ResyncEnd,
    ResyncFix,
    SealedChannel,
    SealedMessage,
    State,
    UpdateRecord,
    decode_plain,
    encode_plain,
)

if TYPE_CHECKING:
    from rspamd_tx.fuzzy.update_queue import UpdateQueue

__all__ = [
    "DEFAULT_LOG_SIZE",
    "DEFAULT_REPLICATION_PORT",
    "REPLICATION_SOURCE",
    "IHashScanner",
    "LogEntry",
    "Replication",
    "ReplicationLog",
    "ReplicationMaster",
    "ReplicationSlave",
    "SlaveAddress",
    "SlaveState",
    "build_replication",
    "hostname_endpoints",
    "is_replication_slave",
    "master_networks",
    "parse_slave_address",
]

log = Logger()

DEFAULT_REPLICATION_PORT = 11336
"""TCP port slaves listen on when neither side names one."""
DEFAULT_LOG_SIZE = 4096
"""Batches the master keeps for catching slaves up."""
REPLICATION_SOURCE = "replication"
"""The backend ``source`` replicated batches are applied under on a slave."""
RESYNC_CHUNK = 1000
"""Hashes per :class:`ResyncChunk`."""
INITIAL_DELAY = 1.0
MAX_DELAY = 60.0
_LOG_MAGIC = b"RTXL\x01"
_LOG_HEADER = struct.Struct("!Q")
_LOG_RECORD = struct.Struct("!Id")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def is_replication_slave(options: Any) -> bool:
    """Whether a storage with these ``FuzzyOptions`` is a replication slave (``masters`` set).

    The request pipeline reads it: on a slave only ``allow_update`` addresses
    may write or delete directly.
    """
    return bool(getattr(options, "masters", ()))


class IHashScanner(Interface):
    """A backend that can list what it stores (needed for a full resync)."""

    def scan(after: bytes | None, limit: int) -> Deferred[list[Update]]:
        """Fire with at most ``limit`` stored hashes whose digest sorts after ``after``.

        In ascending digest order, each as an ADD :class:`Update` carrying the
        stored flag, weight and shingles (``None`` when unknown). An empty
        list means the end.
        """


# -- configuration -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SlaveAddress:
    """Where a slave listens."""

    host: str
    port: int = DEFAULT_REPLICATION_PORT

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_slave_address(entry: NetworkEntry | str, default_port: int = DEFAULT_REPLICATION_PORT
                        ) -> SlaveAddress:
    """One ``slaves`` element as a :class:`SlaveAddress`.

    Accepts a host address (``/32`` or ``/128`` network, as the address-list
    option type gives it), a host name, or the strings ``host``,
    ``host:port``, ``[v6]:port`` and a bare IPv6 address.

    :raises ConfigError: a network wider than one host, a map, a bad port.
    """
    if isinstance(entry, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        if entry.num_addresses != 1:
            raise ConfigError(f"slaves: {entry} is a network, not a host")
        return SlaveAddress(str(entry.network_address), default_port)
    if isinstance(entry, HostRef):
        return SlaveAddress(entry.name, default_port)
    if isinstance(entry, MapRef):
        raise ConfigError(f"slaves: maps are not supported ({entry})")
    text = str(entry).strip()
    host, port_text = text, ""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"slaves: bad address {text!r}")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    if not host:
        raise ConfigError(f"slaves: bad address {text!r}")
    if not port_text:
        return SlaveAddress(host, default_port)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"slaves: bad port in {text!r}")
    return SlaveAddress(host, int(port_text))


def _normal(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def master_networks(entries: Iterable[NetworkEntry],
                    resolve: Callable[[str], Sequence[str]] = resolve_host) -> tuple[Network, ...]:
    """The networks a slave accepts its master from.

    Host names are resolved now with ``resolve``; maps are refused.

    :raises ConfigError: a map, or a host name that does not resolve.
    """
    networks: list[Network] = []
    for entry in entries:
        if isinstance(entry, MapRef):
            raise ConfigError(f"masters: maps are not supported ({entry})")
        if isinstance(entry, HostRef):
            for text in resolve(entry.name):
                networks.append(ipaddress.ip_network(_normal(ipaddress.ip_address(text))))
        else:
            networks.append(entry)
    return tuple(networks)


def _peer_address(address: IAddress) -> IPAddress | None:
    host = getattr(address, "host", None)
    if not isinstance(host, str):
        return None
    try:
        return _normal(ipaddress.ip_address(host.split("%", 1)[0]))
    except ValueError:
        return None


# -- conversions ----------------------------------------------------------------


def to_record(update: Update) -> UpdateRecord:
    """The wire form of a backend update (its informative ``source`` is not sent)."""
    return UpdateRecord(int(update.kind), update.digest, update.flag, update.value,
                        update.shingles, update.weak)


def to_update(record: UpdateRecord) -> Update:
    """A replicated record as a backend update from :data:`REPLICATION_SOURCE`."""
    return Update(UpdateKind(record.kind), record.digest, record.flag, record.value,
                  record.shingles, REPLICATION_SOURCE, record.weak)


def replacing(records: Iterable[UpdateRecord]) -> list[Update]:
    """Resync records as updates that make the slave's copy equal the master's.

    Each ADD record becomes a DEL (dropping whatever the slave has for the
    digest) followed by an ADD of the master's weight, flag and shingles; a
    DEL record stays a DEL.
    """
    updates: list[Update] = []
    for record in records:
        updates.append(Update(UpdateKind.DEL, record.digest, record.flag, 0, None,
                              REPLICATION_SOURCE))
        if record.kind == UpdateKind.ADD:
            updates.append(Update(UpdateKind.ADD, record.digest, record.flag, record.value,
                                  record.shingles, REPLICATION_SOURCE))
    return updates


# -- the master's log --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One logged batch: its revision, updates and the time it was published."""

    revision: int
    updates: tuple[UpdateRecord, ...]
    time: float


def _random_epoch() -> int:
    return int.from_bytes(os.urandom(8), "big") or 1


class ReplicationLog:
    """The master's revision counter and its last ``capacity`` batches.

    With ``path`` the log survives restarts: the file holds the epoch and the
    batches (``u32 length ‖ f64 time ‖ batch body`` records, fsync'ed per
    append); a torn last record is cut off when the file is opened. Without
    ``path`` (or if the file is unreadable) a new epoch starts at revision 0.

    Attributes:
        epoch: non-zero id of this revision history.
        head: the last revision assigned (0 before the first batch).
        capacity: batches kept.
    """

    def __init__(self, capacity: int = DEFAULT_LOG_SIZE, path: str | None = None, *,
                 new_epoch: Callable[[], int] = _random_epoch) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.path = path
        self._new_epoch = new_epoch
        self.epoch = 0
        self.head = 0
        self._entries: deque[LogEntry] = deque(maxlen=capacity)
        self._file_records = 0
        self._file: Any = None

    def open(self) -> None:
        """Load the file (if any) and get ready to append."""
        self.epoch = 0
        self.head = 0
        self._entries.clear()
        if self.path is None:
            self.epoch = self._new_epoch()
            return
        try:
            self._load(self.path)
        except OSError as error:
            log.warn("replication log {path} unreadable ({error}); a new history starts",
                     path=self.path, error=str(error))
            self.epoch = 0
        if self.epoch == 0:
            self.epoch = self._new_epoch()
            self.head = 0
            self._entries.clear()
            self._rewrite()
        else:
            self._file = open(self.path, "ab")

    def close(self) -> None:
        """Close the file; the log keeps its contents in memory."""
        if self._file is not None:
            self._file.close()
            self._file = None

    @property
    def first(self) -> int:
        """The oldest revision still held (``head + 1`` when empty)."""
        return self._entries[0].revision if self._entries else self.head + 1

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, updates: Sequence[UpdateRecord], now: float) -> LogEntry:
        """Number ``updates`` with the next revision, keep and persist them.

        Opens the log first if needed. A failure to write the file is logged
        and the entry is kept in memory only.
        """
        if not self.is_open:
            self.open()
        entry = LogEntry(self.head + 1, tuple(updates), now)
        if self.path is not None:
            try:
                self._persist(entry)
            except OSError as error:
                log.error("replication log {path}: write failed ({error}); batch {revision} "
                          "kept in memory only", path=self.path, error=str(error),
                          revision=entry.revision)
                self.close()
        self.head = entry.revision
        self._entries.append(entry)
        return entry

    @property
    def is_open(self) -> bool:
        """Whether :meth:`open` has given the log an epoch."""
        return self.epoch != 0

    def _persist(self, entry: LogEntry) -> None:
        if self._file is None:
            assert self.path is not None
            self._file = open(self.path, "ab")
        self._file.write(self._encode(entry))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file_records += 1
        if self._file_records > 2 * self.capacity:
            self._rewrite(extra=entry)

    def entry(self, revision: int) -> LogEntry | None:
        """The batch numbered ``revision`` if still held."""
        if not self._entries or not self.first <= revision <= self.head:
            return None
        return self._entries[revision - self.first]

    def since(self, revision: int) -> list[LogEntry] | None:
        """The batches after ``revision``; ``None`` when the log no longer covers them.

        ``revision`` beyond :attr:`head` is not covered either (that slave saw
        another history).
        """
        if revision > self.head or revision + 1 < self.first:
            return None
        return list(self._entries)[revision + 1 - self.first:]

    @staticmethod
    def _encode(entry: LogEntry) -> bytes:
        body = Batch(entry.revision, entry.updates).encode_body()
        return _LOG_RECORD.pack(len(body), entry.time) + body

    def _load(self, path: str) -> None:
        if not os.path.exists(path):
            return
        with open(path, "rb") as handle:
            data = handle.read()
        header = len(_LOG_MAGIC) + _LOG_HEADER.size
        if len(data) < header or data[:len(_LOG_MAGIC)] != _LOG_MAGIC:
            log.warn("replication log {path} has no valid header; a new history starts",
                     path=path)
            return
        (epoch,) = _LOG_HEADER.unpack_from(data, len(_LOG_MAGIC))
        offset = header
        records = 0
        head = 0
        while len(data) - offset >= _LOG_RECORD.size:
            length, when = _LOG_RECORD.unpack_from(data, offset)
            end = offset + _LOG_RECORD.size + length
            if end > len(data):
                break
            try:
                batch = Batch.decode_body(data[offset + _LOG_RECORD.size:end])
            except ReplicationCodecError:
                break
            if head and batch.revision != head + 1:
                break
            self._entries.append(LogEntry(batch.revision, batch.updates, when))
            head = batch.revision
            records += 1
            offset = end
        if offset != len(data):
            log.warn("replication log {path}: {extra} trailing bytes cut off",
                     path=path, extra=len(data) - offset)
            with open(path, "r+b") as handle:
                handle.truncate(offset)
        self.epoch = epoch
        self.head = head
        self._file_records = records

    def _rewrite(self, extra: LogEntry | None = None) -> None:
        """Replace the file by the header and the held entries (plus ``extra``)."""
        assert self.path is not None
        self.close()
        entries = list(self._entries) + ([extra] if extra is not None else [])
        entries = entries[-self.capacity:]
        temporary = self.path + ".tmp"
        with open(temporary, "wb") as handle:
            handle.write(_LOG_MAGIC + _LOG_HEADER.pack(self.epoch))
            for entry in entries:
                handle.write(self._encode(entry))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)
        self._file_records = len(entries)
        self._file = open(self.path, "ab")


# -- master ---------------------------------------------------------------------------


class _MasterMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.head = Gauge("rspamd_tx_fuzzy_replication_head_revision",
                          "Last revision the master assigned", registry=registry)
        self.acked = Gauge("rspamd_tx_fuzzy_replication_slave_revision",
                           "Last revision a slave acknowledged", ["slave"], registry=registry)
        self.lag = Gauge("rspamd_tx_fuzzy_replication_lag_revisions",
                         "Revisions a slave has not acknowledged", ["slave"], registry=registry)
        self.lag_seconds = Gauge("rspamd_tx_fuzzy_replication_lag_seconds",
                                 "Age of the oldest batch a slave has not acknowledged",
                                 ["slave"], registry=registry)
        self.connected = Gauge("rspamd_tx_fuzzy_replication_connected",
                               "1 while a slave is connected and streaming", ["slave"],
                               registry=registry)
        self.resyncs = Counter("rspamd_tx_fuzzy_replication_resyncs",
                               "Full resyncs sent to a slave", ["slave"], registry=registry)


class SlaveLink:
    """The master's view of one slave: connection, acknowledged revision, lag.

    Attributes:
        address: where the slave listens.
        acked: the last revision of the master's epoch the slave acknowledged
            (or reported); ``None`` until the slave reported one.
        connected: whether a session is established (state received).
        resyncing: whether a full resync is being sent.
        failures: consecutive connection failures (drives the backoff).
        resyncs: full resyncs started.
    """

    def __init__(self, master: ReplicationMaster, address: SlaveAddress) -> None:
        self.master = master
        self.address = address
        self.name = str(address)
        self.acked: int | None = None
        self.sent = 0
        self.connected = False
        self.resyncing = False
        self.failures = 0
        self.resyncs = 0
        self.progress_at = 0.0
        self.behind_since: float | None = None
        self.protocol: _MasterProtocol | None = None
        self._reconnect: IDelayedCall | None = None
        self._connecting: Deferred[Any] | None = None
        self._running = False

    # life cycle

    def start(self) -> None:
        self._running = True
        self._connect()

    def stop(self) -> Deferred[None]:
        """Stop reconnecting and drop the connection; fires once it is closed."""
        self._running = False
        if self._reconnect is not None and self._reconnect.active():
            self._reconnect.cancel()
        self._reconnect = None
        if self._connecting is not None:
            self._connecting.cancel()
        if self.protocol is not None and self.protocol.transport is not None:
            self.protocol.transport.abortConnection()
            return self.protocol.lost.wait()
        return succeed(None)

    def _connect(self) -> None:
        self._reconnect = None
        endpoint = self.master.connect(self.address)
        self._connecting = d = endpoint.connect(_LinkFactory(self))

        def connected(protocol: _MasterProtocol) -> None:
            self._connecting = None

        def failed(failure: Failure) -> None:
            self._connecting = None
            if self._running:
                log.warn("replication: cannot connect to slave {slave}: {error}",
                         slave=self.name, error=failure.getErrorMessage())
                self._retry()

        d.addCallbacks(connected, failed)

    def _retry(self) -> None:
        delay = min(self.master.max_delay, self.master.initial_delay * 2 ** self.failures)
        self.failures += 1
        self._reconnect = self.master.clock.callLater(delay, self._connect)

    def connection_lost(self, protocol: _MasterProtocol, reason: str) -> None:
        if self.protocol is not protocol:
            return
        self.protocol = None
        self.connected = False
        self.resyncing = False
        if self._running:
            log.info("replication: slave {slave} disconnected ({reason})",
                     slave=self.name, reason=reason)
            self._retry()

    # session

    def on_state(self, protocol: _MasterProtocol, state: State) -> None:
        """The slave told what it holds: catch it up or start a resync."""
        replication_log = self.master.log
        self.connected = True
        self.progress_at = self.master.clock.seconds()
        missing = (replication_log.since(state.revision)
                   if state.epoch == replication_log.epoch else None)
        if missing is None:
            self.acked = None
            if self.master.scanner is None and replication_log.first == 1:
                self._bootstrap(protocol)
            else:
                self._start_resync(protocol)
            return
        self.acked = state.revision
        self.sent = state.revision
        if missing and self.behind_since is None:
            self.behind_since = missing[0].time
        for entry in missing:
            self._send(protocol, entry)

    def on_ack(self, protocol: _MasterProtocol, ack: Ack) -> None:
        if self.acked is not None and ack.revision < self.acked:
            protocol.fail(f"acknowledgement of revision {ack.revision} went backwards")
            return
        if ack.revision > self.sent:
            protocol.fail(f"acknowledgement of revision {ack.revision} never sent")
            return
        self.acked = ack.revision
        self.failures = 0
        self.progress_at = self.master.clock.seconds()
        head = self.master.log.head
        if self.acked >= head:
            self.behind_since = None
        else:
            pending = self.master.log.entry(self.acked + 1)
            self.behind_since = pending.time if pending is not None else self.behind_since
        if self.resyncing and ack.revision == self.sent:
            self.resyncing = False
            missing = self.master.log.since(ack.revision)
            if missing is None:
                self._start_resync(protocol)
                return
            for entry in missing:
                self._send(protocol, entry)

    def published(self, entry: LogEntry) -> None:
        """A new batch exists: send it if the slave is streaming and up to date."""
        if self.behind_since is None:
            self.behind_since = entry.time
        protocol = self.protocol
        if protocol is None or not self.connected or self.resyncing:
            return
        if entry.revision == self.sent + 1:
            self._send(protocol, entry)

    def _send(self, protocol: _MasterProtocol, entry: LogEntry) -> None:
        if self.sent == self.acked:
            self.progress_at = self.master.clock.seconds()
        protocol.send(Batch(entry.revision, entry.updates))
        self.sent = entry.revision

    def _bootstrap(self, protocol: _MasterProtocol) -> None:
        """Move the slave to revision 0 of this epoch (an empty copy), then send the whole log.

        Used when the log still holds every batch since the epoch began and
        the backend cannot list its hashes: it assumes the master's store was
        empty when the epoch began.
        """
        self.resyncing = True
        epoch = self.master.log.epoch
        if self.behind_since is None and self.master.log.head:
            self.behind_since = self.master.clock.seconds()
        log.info("replication: slave {slave} starts from the beginning of the log",
                 slave=self.name)
        protocol.send(ResyncBegin(epoch, 0))
        protocol.send(ResyncEnd(epoch, 0))
        self.sent = 0

    def _start_resync(self, protocol: _MasterProtocol) -> None:
        scanner = self.master.scanner
        if scanner is None:
            protocol.fail("a full resync is needed but the backend cannot list its hashes")
            return
        self.resyncing = True
        self.resyncs += 1
        self.master.metrics.resyncs.labels(self.name).inc()
        replication_log = self.master.log
        epoch, begin = replication_log.epoch, replication_log.head
        if self.behind_since is None:
            self.behind_since = self.master.clock.seconds()
        log.info("replication: full resync of slave {slave} from revision {revision}",
                 slave=self.name, revision=begin)
        protocol.send(ResyncBegin(epoch, begin))
        d = protocol.stream_snapshot(scanner, self.master.resync_chunk)

        def fix(complete: bool) -> Deferred[int | None] | None:
            return self._fix_changed(protocol, scanner, begin) if complete else None

        def finished(end: int | None) -> None:
            if end is not None and not protocol.closed:
                self.sent = end
                protocol.send(ResyncEnd(epoch, end))
                self.progress_at = self.master.clock.seconds()

        def failed(failure: Failure) -> None:
            protocol.fail(f"resync failed: {failure.getErrorMessage()}")

        d.addCallback(fix)
        d.addCallbacks(finished, failed)

    @inlineCallbacks
    def _fix_changed(self, protocol: _MasterProtocol, backend: Any, begin: int) -> Any:
        """Send the current state of digests that batches after ``begin`` touched.

        The copy is read while batches keep being stored: a digest changed by
        one of them may or may not be reflected in the copy. Re-reading each
        such digest now (until no new batch appeared meanwhile) and replacing
        it on the slave makes the slave equal to the master at the returned
        revision, whatever the interleaving. Fires with that revision, or
        ``None`` if the connection closed.
        """
        done = begin
        while not protocol.closed:
            head = self.master.log.head
            if head == done:
                return done
            entries = self.master.log.since(done)
            if entries is None:
                raise RuntimeError("the log rolled over during the copy")
            touched: dict[bytes, tuple[int, ...] | None] = {}
            for entry in entries:
                for record in entry.updates:
                    if record.shingles is not None or record.digest not in touched:
                        touched[record.digest] = record.shingles
            fixes: list[UpdateRecord] = []
            for digest in sorted(touched):
                result = yield backend.check(digest, None)
                if result.digest == digest and result.prob >= 1.0:
                    fixes.append(UpdateRecord(int(UpdateKind.ADD), digest, result.flag,
                                              result.value, touched[digest]))
                else:
                    fixes.append(UpdateRecord(int(UpdateKind.DEL), digest, 0))
            for start in range(0, len(fixes), MAX_UPDATES_PER_FRAME):
                protocol.send(ResyncFix(tuple(fixes[start:start + MAX_UPDATES_PER_FRAME])))
            self.progress_at = self.master.clock.seconds()
            done = head
        return None

    # observations

    def lag_revisions(self) -> int:
        """Revisions published but not acknowledged by the slave."""
        return self.master.log.head - (self.acked or 0)

    def lag_seconds(self) -> float:
        """Age of the oldest batch the slave has not acknowledged (0 when caught up)."""
        if self.behind_since is None or self.lag_revisions() == 0:
            return 0.0
        return max(0.0, self.master.clock.seconds() - self.behind_since)

    def stalled(self, now: float) -> bool:
        """Whether an outstanding batch went unacknowledged for the timeout."""
        outstanding = self.resyncing or (self.acked is not None and self.sent > self.acked)
        return self.connected and outstanding and now - self.progress_at > self.master.timeout

    def stats(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "resyncing": self.resyncing,
            "revision": self.acked or 0,
            "lag_revisions": self.lag_revisions(),
            "lag_seconds": self.lag_seconds(),
            "resyncs": self.resyncs,
            "failures": self.failures,
        }


class _LossWatch:
    """Hands out Deferreds that fire once a connection is lost."""

    def __init__(self) -> None:
        self.fired = False
        self._waiters: list[Deferred[None]] = []

    def wait(self) -> Deferred[None]:
        if self.fired:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        return d

    def fire(self) -> None:
        self.fired = True
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)


class _LinkFactory(Factory):
    noisy = False

    def __init__(self, link: SlaveLink) -> None:
        self.link = link

    def buildProtocol(self, addr: IAddress) -> _MasterProtocol:
        return _MasterProtocol(self.link)


class _MasterProtocol(Protocol):
    """The master's side of one connection to a slave."""

    def __init__(self, link: SlaveLink) -> None:
        self.link = link
        self.decoder = FrameDecoder()
        self.channel: SealedChannel | None = None
        self.closed = False
        self.reason: str | None = None
        self.lost = _LossWatch()
        self._paused: Deferred[None] | None = None
        self._handshake_timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self.link.protocol = self
        self.transport.registerProducer(self, True)
        self._handshake_timer = self.link.master.clock.callLater(
            self.link.master.timeout, self.fail, "handshake not finished within the timeout")

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            for frame in self.decoder.feed(data):
                self._frame(frame)
                if self.closed:
                    return
        except ReplicationCodecError as error:
            self.fail(str(error))

    def _frame(self, frame: Frame) -> None:
        if self.channel is None:
            message = decode_plain(frame)
            if not isinstance(message, Hello):
                raise ReplicationCodecError("expected a hello")
            if message.version != PROTOCOL_VERSION:
                raise ReplicationCodecError(f"unsupported protocol version {message.version}")
            keypair = self.link.master.keypair
            try:
                nm = keypair.nm(message.ephemeral_key)
            except ValueError as error:
                raise ReplicationCodecError(f"unusable slave key: {error}") from None
            self.transport.write(encode_plain(Auth(keypair.public_key)))
            self.channel = SealedChannel(nm, master=True)
            return
        sealed = self.channel.open(frame)
        if isinstance(sealed, State):
            if self.link.connected:
                raise ReplicationCodecError("state sent twice")
            self._cancel_timer()
            self.link.on_state(self, sealed)
        elif isinstance(sealed, Ack) and self.link.connected:
            self.link.on_ack(self, sealed)
        else:
            raise ReplicationCodecError(f"unexpected {type(sealed).__name__} from a slave")

    def send(self, message: SealedMessage) -> None:
        if self.closed or self.channel is None:
            return
        self.transport.write(self.channel.seal(message))

    def fail(self, reason: str) -> None:
        """Log ``reason`` and drop the connection."""
        if self.closed:
            return
        log.warn("replication: dropping slave {slave}: {reason}",
                 slave=self.link.name, reason=reason)
        self.closed = True
        self.reason = reason
        self.transport.loseConnection()

    @inlineCallbacks
    def stream_snapshot(self, scanner: Any, chunk: int) -> Any:
        """Send every stored hash as :class:`ResyncChunk` frames; fire with completeness."""
        cursor: bytes | None = None
        while not self.closed:
            updates = yield maybeDeferred(scanner.scan, cursor, chunk)
            if self.closed:
                break
            if not updates:
                return True
            records = tuple(to_record(update) for update in updates)
            for start in range(0, len(records), MAX_UPDATES_PER_FRAME):
                self.send(ResyncChunk(records[start:start + MAX_UPDATES_PER_FRAME]))
            cursor = updates[-1].digest
            self.link.progress_at = self.link.master.clock.seconds()
            while self._paused is not None and not self.closed:
                yield self._paused
        return False

    # IPushProducer: the transport pauses the snapshot while its buffer is full.

    def pauseProducing(self) -> None:
        if self._paused is None:
            self._paused = Deferred()

    def resumeProducing(self) -> None:
        paused, self._paused = self._paused, None
        if paused is not None:
            paused.callback(None)

    def stopProducing(self) -> None:
        self.closed = True
        self.resumeProducing()

    def _cancel_timer(self) -> None:
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_timer()
        self.closed = True
        self.resumeProducing()
        self.link.connection_lost(self, self.reason or reason.getErrorMessage())
        self.lost.fire()


class ReplicationMaster(Service):
    """Streams every flushed batch to the configured slaves.

    Subscribe :meth:`publish` to the update queue's flush hook. Starting the
    service opens the log and connects to every slave; stopping it closes the
    connections and the log.

    Args:
        keypair: the master's static keypair (slaves check its public key).
        slaves: where the slaves listen.
        replication_log: the revision log (opened by :meth:`startService`).
        clock: source of time and timers.
        connect: gives the client endpoint of a slave.
        scanner: the master's backend when it also provides ``scan``
            (:class:`IHashScanner`), used for full resyncs; ``None``: a slave
            that needs one stays disconnected (logged) and is retried.
        timeout: seconds to wait for a hello or an acknowledgement.
        registry: prometheus registry of the metrics.
    """

    def __init__(self, keypair: Keypair, slaves: Sequence[SlaveAddress],
                 replication_log: ReplicationLog, *, clock: IReactorTime,
                 connect: Callable[[SlaveAddress], IStreamClientEndpoint],
                 scanner: Any = None, timeout: float = 10.0,
                 initial_delay: float = INITIAL_DELAY, max_delay: float = MAX_DELAY,
                 resync_chunk: int = RESYNC_CHUNK,
                 registry: CollectorRegistry | None = None) -> None:
        self.keypair = keypair
        self.log = replication_log
        self.clock = clock
        self.connect = connect
        self.scanner = scanner
        self.timeout = timeout
        self.initial_delay = initial_delay
        self.max_delay = max_delay
        self.resync_chunk = resync_chunk
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = _MasterMetrics(self.registry)
        self.metrics.head.set_function(lambda: self.log.head)
        self.links = {str(address): SlaveLink(self, address) for address in slaves}
        for name, link in self.links.items():
            self.metrics.acked.labels(name).set_function(lambda link=link: link.acked or 0)
            self.metrics.lag.labels(name).set_function(link.lag_revisions)
            self.metrics.lag_seconds.labels(name).set_function(link.lag_seconds)
            self.metrics.connected.labels(name).set_function(
                lambda link=link: 1 if link.connected else 0)
        self._watchdog = LoopingCall(self._check_stalled)
        self._watchdog.clock = clock

    def startService(self) -> None:
        super().startService()
        if not self.log.is_open:
            self.log.open()
        for link in self.links.values():
            link.start()
        d = self._watchdog.start(max(self.timeout / 4, 0.05), now=False)
        d.addErrback(lambda failure: log.failure("replication watchdog failed", failure))

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._watchdog.running:
            self._watchdog.stop()
        closed = [link.stop() for link in self.links.values()]
        self.log.close()
        d = gatherResults(closed)
        d.addCallback(lambda _: None)
        return d

    def publish(self, batch: Sequence[Update], revision: int = 0) -> None:
        """The queue's flush hook: log ``batch`` under new revisions and send it.

        ``revision`` (the backend's) is ignored; batches larger than one frame
        take several consecutive revisions. Works while the service is
        stopped too (the batch is logged and sent once it runs). Never raises:
        failures are logged.
        """
        try:
            self._publish(batch)
        except Exception:
            log.failure("replication: cannot publish a batch of {count} updates",
                        count=len(batch))

    def _publish(self, batch: Sequence[Update]) -> None:
        records = [to_record(update) for update in batch]
        for start in range(0, len(records), MAX_UPDATES_PER_FRAME):
            entry = self.log.append(records[start:start + MAX_UPDATES_PER_FRAME],
                                    self.clock.seconds())
            for link in self.links.values():
                link.published(entry)

    def _check_stalled(self) -> None:
        now = self.clock.seconds()
        for link in self.links.values():
            if link.protocol is not None and link.stalled(now):
                link.protocol.fail(f"no acknowledgement within {self.timeout:g} s")

    def stats(self) -> dict[str, Any]:
        """Replication state for ``/stat``."""
        return {
            "role": "master",
            "epoch": self.log.epoch,
            "revision": self.log.head,
            "log_first": self.log.first,
            "log_size": len(self.log),
            "slaves": {name: link.stats() for name, link in self.links.items()},
        }


# -- slave ---------------------------------------------------------------------------


class SlaveState:
    """What a slave last applied: the master's epoch and revision.

    With ``path`` it is kept in a small JSON file, replaced atomically
    (write, fsync, rename) after each applied batch; without, in memory.
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self.epoch = 0
        self.revision = 0

    def load(self) -> None:
        """Read the file; a missing or unreadable one means nothing applied."""
        self.epoch, self.revision = 0, 0
        if self.path is None or not os.path.exists(self.path):
            return
        try:
            with open(self.path, encoding="utf-8") as handle:
                data = json.load(handle)
            epoch, revision = int(data["epoch"]), int(data["revision"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warn("replication state {path} unreadable ({error}); a full resync follows",
                     path=self.path, error=str(error))
            return
        if 0 <= epoch < 1 << 64 and 0 <= revision < 1 << 64:
            self.epoch, self.revision = epoch, revision

    def save(self, epoch: int, revision: int) -> None:
        """Record ``(epoch, revision)``; raises ``OSError`` if the file cannot be written."""
        if self.path is not None:
            temporary = self.path + ".tmp"
            with open(temporary, "w", encoding="utf-8") as handle:
                json.dump({"epoch": epoch, "revision": revision}, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        self.epoch, self.revision = epoch, revision


class _SlaveMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.revision = Gauge("rspamd_tx_fuzzy_replication_applied_revision",
                              "Last master revision this slave applied", registry=registry)
        self.batches = Counter("rspamd_tx_fuzzy_replication_applied_batches",
                               "Replicated batches applied", registry=registry)
        self.refused = Counter("rspamd_tx_fuzzy_replication_refused",
                               "Replication connections refused or dropped", ["reason"],
                               registry=registry)
        self.last_applied = Gauge("rspamd_tx_fuzzy_replication_last_applied_timestamp",
                                  "Clock time of the last applied batch", registry=registry)


class _SlaveProtocol(Protocol):
    """The slave's side of one connection from its master."""

    def __init__(self, slave: ReplicationSlave) -> None:
        self.slave = slave
        self.decoder = FrameDecoder()
        self.channel: SealedChannel | None = None
        self.ephemeral: Keypair | None = None
        self.closed = False
        self.resync: ResyncBegin | None = None
        self.resync_cursor: bytes | None = None
        self.epoch = 0
        self.lost = _LossWatch()
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        address = _peer_address(peer)
        if address is None or not self.slave.accepts(address):
            self.slave.metrics.refused.labels("address").inc()
            log.warn("replication: refused a connection from {peer}: not in masters",
                     peer=peer)
            self.closed = True
            self.transport.loseConnection()
            return
        self.slave.adopt(self)
        self.ephemeral = Keypair.generate(self.slave.random_bytes)
        self.transport.write(encode_plain(Hello(self.ephemeral.public_key)))
        self._timer = self.slave.clock.callLater(self.slave.timeout, self.fail, "timeout",
                                                 "no authentication within the timeout")

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            for frame in self.decoder.feed(data):
                self._frame(frame)
                if self.closed:
                    return
        except ReplicationCodecError as error:
            self.fail("protocol", str(error))

    def _frame(self, frame: Frame) -> None:
        if self.channel is None:
            message = decode_plain(frame)
            if not isinstance(message, Auth):
                raise ReplicationCodecError("expected an auth")
            if message.master_key != self.slave.master_key:
                self.fail("key", "the master's public key is not master_key")
                return
            assert self.ephemeral is not None
            try:
                nm = self.ephemeral.nm(message.master_key)
            except ValueError as error:
                raise ReplicationCodecError(f"unusable master key: {error}") from None
            self.channel = SealedChannel(nm, master=False)
            self.transport.write(self.channel.seal(State(self.slave.state.epoch,
                                                         self.slave.state.revision)))
            self.epoch = self.slave.state.epoch
            return
        message = self.channel.open(frame)
        self._cancel_timer()
        self.slave.enqueue(self, message)

    def send(self, message: SealedMessage) -> None:
        if not self.closed and self.channel is not None:
            self.transport.write(self.channel.seal(message))

    def fail(self, reason: str, detail: str) -> None:
        """Count ``reason``, log ``detail`` and drop the connection."""
        if self.closed:
            return
        self.slave.metrics.refused.labels(reason).inc()
        log.warn("replication: dropping master {peer}: {detail}",
                 peer=self.transport.getPeer(), detail=detail)
        self.closed = True
        self.transport.loseConnection()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_timer()
        self.closed = True
        self.slave.release(self)
        self.lost.fire()


class _SlaveFactory(ServerFactory):
    noisy = False

    def __init__(self, slave: ReplicationSlave) -> None:
        self.slave = slave

    def buildProtocol(self, addr: IAddress) -> _SlaveProtocol:
        return _SlaveProtocol(self.slave)


class ReplicationSlave(Service):
    """Receives its master's batches and applies them in revision order.

    Listens on ``bind_line`` (``bind_socket`` syntax) while running;
    :attr:`factory` serves connections made by other means (tests). Accepts
    one master connection at a time: a new accepted connection replaces the
    previous one (a master reconnecting after a silent network failure).

    Args:
        backend: where batches are applied (source :data:`REPLICATION_SOURCE`).
        masters: networks a master may connect from; must not be empty.
        master_key: the raw public key the master must present.
        state: the applied ``(epoch, revision)``, loaded at start.
        clock: timers (handshake timeout).
        reactor: listens on ``bind_line``.
        bind_line: listen address, ``None`` to listen nowhere.
        timeout: seconds a master has to authenticate.
        random_bytes: source of the ephemeral keys.
        registry: prometheus registry of the metrics.

    Attributes:
        ports: the listening ports while running.
    """

    def __init__(self, backend: IFuzzyBackend, *, masters: Sequence[Network],
                 master_key: bytes, state: SlaveState, clock: IReactorTime,
                 reactor: Any = None, bind_line: str | None = None, timeout: float = 10.0,
                 random_bytes: Callable[[int], bytes] = os.urandom,
                 registry: CollectorRegistry | None = None) -> None:
        if not masters:
            raise ConfigError("a replication slave needs at least one address in masters")
        self.backend = backend
        self.masters = tuple(masters)
        self.master_key = bytes(master_key)
        self.state = state
        self.clock = clock
        self.reactor = reactor
        self.bind_line = bind_line
        self.timeout = timeout
        self.random_bytes = random_bytes
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = _SlaveMetrics(self.registry)
        self.metrics.revision.set_function(lambda: self.state.revision)
        self.factory = _SlaveFactory(self)
        self.ports: list[IListeningPort] = []
        self.applied_batches = 0
        self.last_applied = 0.0
        self.current: _SlaveProtocol | None = None
        self._queue: deque[tuple[_SlaveProtocol, SealedMessage]] = deque()
        self._busy = False
        self._draining = False

    def accepts(self, address: IPAddress) -> bool:
        """Whether ``address`` is in ``masters``."""
        return any(address.version == network.version and address in network
                   for network in self.masters)

    def startService(self) -> None:
        super().startService()
        self.state.load()
        if self.bind_line is None:
            return
        try:
            specs = parse_bind_line(self.bind_line, default_port=DEFAULT_REPLICATION_PORT)
            sockets = open_listen_sockets(specs, {SocketKind.STREAM})
        except ConfigError as error:
            log.error("replication: slave cannot listen on {line!r}: {error}",
                      line=self.bind_line, error=str(error))
            return
        try:
            self.ports = adopt_sockets(self.reactor, sockets, self.factory, None)
        finally:
            for sock in sockets:
                sock.close()
        for port in self.ports:
            log.info("replication: slave listening on {address}", address=port.getHost())

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        ports, self.ports = self.ports, []
        closing: list[Deferred[Any]] = [maybeDeferred(port.stopListening) for port in ports]
        if self.current is not None and self.current.transport is not None:
            self.current.transport.abortConnection()
            closing.append(self.current.lost.wait())
        return gatherResults(closing)

    # connections

    def adopt(self, protocol: _SlaveProtocol) -> None:
        previous, self.current = self.current, protocol
        if previous is not None and not previous.closed:
            previous.fail("replaced", "a new master connection replaces this one")

    def release(self, protocol: _SlaveProtocol) -> None:
        if self.current is protocol:
            self.current = None

    # applying

    def enqueue(self, protocol: _SlaveProtocol, message: SealedMessage) -> None:
        """Apply ``message`` after everything received before it."""
        self._queue.append((protocol, message))
        if not self._busy:
            self._drain()

    def _drain(self) -> None:
        if self._draining:
            return
        self._draining = True
        try:
            while self._queue and not self._busy:
                protocol, message = self._queue.popleft()
                if protocol.closed:
                    continue
                self._busy = True
                d = maybeDeferred(self._handle, protocol, message)
                d.addErrback(self._failed, protocol)
                d.addBoth(self._settled)
        finally:
            self._draining = False

    def _failed(self, failure: Failure, protocol: _SlaveProtocol) -> None:
        if failure.check(ReplicationCodecError):
            protocol.fail("protocol", failure.getErrorMessage())
        else:
            protocol.fail("backend", f"cannot apply: {failure.getErrorMessage()}")

    def _settled(self, _: object) -> None:
        self._busy = False
        self._drain()

    def _handle(self, protocol: _SlaveProtocol, message: SealedMessage) -> Deferred[None] | None:
        state = self.state
        if isinstance(message, Batch):
            if protocol.resync is not None:
                raise ReplicationCodecError("batch during a resync")
            if protocol.epoch != state.epoch or state.epoch == 0:
                raise ReplicationCodecError("batch before the master's history is known")
            if message.revision <= state.revision:
                protocol.send(Ack(message.revision))
                return None
            if message.revision != state.revision + 1:
                raise ReplicationCodecError(
                    f"revision {message.revision} after {state.revision}: a gap")
            d = self.backend.apply([to_update(record) for record in message.updates],
                                   REPLICATION_SOURCE)
            d.addCallback(lambda _: self._applied(protocol, state.epoch, message.revision))
            return d
        if isinstance(message, ResyncBegin):
            if protocol.resync is not None:
                raise ReplicationCodecError("nested resync")
            protocol.resync = message
            log.info("replication: full resync from the master at revision {revision}",
                     revision=message.revision)
            return None
        if isinstance(message, ResyncChunk):
            if protocol.resync is None:
                raise ReplicationCodecError("resync chunk outside a resync")
            digests = [record.digest for record in message.updates]
            if not digests or any(a >= b for a, b in zip([protocol.resync_cursor or b""]
                                                         + digests, digests)):
                raise ReplicationCodecError("resync digests are not in ascending order")
            d = self._stale(protocol.resync_cursor, digests[-1], set(digests))
            protocol.resync_cursor = digests[-1]

            def store(stale: list[Update]) -> Deferred[int]:
                return self.backend.apply(stale + replacing(message.updates), REPLICATION_SOURCE)

            d.addCallback(store)
            d.addCallback(lambda _: None)
            return d
        if isinstance(message, ResyncFix):
            if protocol.resync is None:
                raise ReplicationCodecError("resync fix outside a resync")
            d = self.backend.apply(replacing(message.updates), REPLICATION_SOURCE)
            d.addCallback(lambda _: None)
            return d
        if isinstance(message, ResyncEnd):
            begin = protocol.resync
            if begin is None or begin.epoch != message.epoch or message.revision < begin.revision:
                raise ReplicationCodecError("resync end does not match its beginning")
            protocol.resync = None
            protocol.epoch = message.epoch
            d = (self._stale(protocol.resync_cursor, None, set())
                 if protocol.resync_cursor is not None else succeed([]))
            protocol.resync_cursor = None

            def finish(stale: list[Update]) -> Deferred[Any]:
                done = self.backend.apply(stale, REPLICATION_SOURCE) if stale else succeed(0)
                done.addCallback(lambda _: self._applied(protocol, message.epoch,
                                                         message.revision))
                return done

            d.addCallback(finish)
            return d
        raise ReplicationCodecError(f"unexpected {type(message).__name__} from a master")

    @inlineCallbacks
    def _stale(self, after: bytes | None, upto: bytes | None, keep: set[bytes]) -> Any:
        """DEL updates for the slave's digests in ``(after, upto]`` that the master lacks.

        During a resync the master's hashes arrive in ascending digest order, so
        whatever the slave stores between two received digests is gone on the
        master. Needs a backend with ``scan``; without, nothing is pruned.
        """
        scan = getattr(self.backend, "scan", None)
        stale: list[Update] = []
        if scan is None:
            return stale
        cursor = after
        while True:
            stored = yield scan(cursor, RESYNC_CHUNK)
            if not stored:
                return stale
            for update in stored:
                if upto is not None and update.digest > upto:
                    return stale
                if update.digest not in keep:
                    stale.append(Update(UpdateKind.DEL, update.digest, update.flag, 0, None,
                                        REPLICATION_SOURCE))
            cursor = stored[-1].digest

    def _applied(self, protocol: _SlaveProtocol, epoch: int, revision: int) -> None:
        self.state.save(epoch, revision)
        self.applied_batches += 1
        self.last_applied = self.clock.seconds()
        self.metrics.batches.inc()
        self.metrics.last_applied.set(self.last_applied)
        protocol.send(Ack(revision))

    def stats(self) -> dict[str, Any]:
        """Replication state for ``/stat``."""
        return {
            "role": "slave",
            "epoch": self.state.epoch,
            "revision": self.state.revision,
            "connected": self.current is not None and self.current.channel is not None,
            "applied_batches": self.applied_batches,
            "last_applied": self.last_applied,
        }


# -- wiring ---------------------------------------------------------------------------


def hostname_endpoints(reactor: Any, timeout: float
                       ) -> Callable[[SlaveAddress], IStreamClientEndpoint]:
    """The ``connect`` argument of :class:`ReplicationMaster` for real TCP (names resolved)."""
    def connect(address: SlaveAddress) -> IStreamClientEndpoint:
        return HostnameEndpoint(reactor, address.host, address.port, timeout=timeout)
    return connect


@dataclass(frozen=True)
class Replication:
    """The replication part of one fuzzy storage worker.

    Attributes:
        master: streams flushed batches to ``slaves``, or ``None``.
        slave: accepts batches from ``masters``, or ``None``.
    """

    master: ReplicationMaster | None = None
    slave: ReplicationSlave | None = None

    def services(self) -> list[IService]:
        """The services to run with the worker (master and/or slave)."""
        return [service for service in (self.master, self.slave) if service is not None]

    def publish(self, batch: Sequence[Update], revision: int) -> None:
        """The update queue's flush hook: hand ``batch`` to the master, if any."""
        if self.master is not None:
            self.master.publish(batch, revision)

    def stats(self) -> dict[str, Any]:
        """``{"master": …, "slave": …}`` for the roles this worker has (may be empty)."""
        out: dict[str, Any] = {}
        if self.master is not None:
            out["master"] = self.master.stats()
        if self.slave is not None:
            out["slave"] = self.slave.stats()
        return out


def build_replication(options: Any, backend: IFuzzyBackend, queue: UpdateQueue | None,
                      reactor: Any, *, registry: CollectorRegistry | None = None,
                      resolve: Callable[[str], Sequence[str]] = resolve_host) -> Replication:
    """The replication ``FuzzyOptions`` ask for, subscribed to ``queue``'s flushes.

    The caller runs :meth:`Replication.services` with the worker (started
    before and stopped after the queue, so that the last flush is logged
    while the master runs) and merges :meth:`Replication.stats` into
    ``/stat``. When ``queue`` is ``None`` the caller subscribes
    :meth:`Replication.publish` itself.

    Options read: ``slaves``, ``masters``, ``master_key``, ``master_timeout``,
    ``keypairs``, ``dbdir``, and, when present, ``sync_keypair``,
    ``replication_port``, ``replication_bind`` and ``replication_log_size``.

    :raises ConfigError: ``slaves`` without any keypair, ``masters`` without
        ``master_key``, a bad slave address or an unusable ``masters`` entry.
    """
    timeout = float(getattr(options, "master_timeout", 10.0))
    port = int(getattr(options, "replication_port", None) or DEFAULT_REPLICATION_PORT)
    dbdir = getattr(options, "dbdir", None)
    master: ReplicationMaster | None = None
    slave: ReplicationSlave | None = None
    slaves = tuple(getattr(options, "slaves", ()))
    if slaves:
        keypair = getattr(options, "sync_keypair", None)
        keypairs = tuple(getattr(options, "keypairs", ()))
        if keypair is None and keypairs:
            keypair = keypairs[-1]
        if keypair is None:
            raise ConfigError("slaves: replication needs a keypair (sync_keypair or keypair)")
        capacity = int(getattr(options, "replication_log_size", None) or DEFAULT_LOG_SIZE)
        path = os.path.join(dbdir, "replication.log") if dbdir else None
        master = ReplicationMaster(
            keypair, [parse_slave_address(entry, port) for entry in slaves],
            ReplicationLog(capacity, path), clock=reactor,
            connect=hostname_endpoints(reactor, timeout),
            scanner=backend if hasattr(backend, "scan") else None,
            timeout=timeout, registry=registry)
    masters = tuple(getattr(options, "masters", ()))
    if masters:
        master_key = getattr(options, "master_key", None)
        if not master_key:
            raise ConfigError("masters: a replication slave needs master_key")
        bind_line = getattr(options, "replication_bind", None) or f"*:{port}"
        state = SlaveState(os.path.join(dbdir, "replication.state") if dbdir else None)
        slave = ReplicationSlave(
            backend, masters=master_networks(masters, resolve),
            master_key=PublicKey.parse(master_key).raw, state=state, clock=reactor,
            reactor=reactor, bind_line=bind_line, timeout=timeout, registry=registry)
    replication = Replication(master, slave)
    if master is not None and queue is not None:
        queue.add_flush_hook(replication.publish)
    return replication
