"""Upstream balancing with Rspamd's failure accounting and rotation algorithms.

A :class:`Balancer` owns one upstream list (see :mod:`rspamd_tx.upstreams.hosts`).
Each :class:`Upstream` follows Rspamd's state machine:

* **failure** (only counted while alive): the first error starts a window and
  triggers a re-resolve; later errors are counted; once ``error_time`` has
  elapsed since the first error, an error rate above ``max_errors /
  error_time`` marks the upstream *down* (never the only upstream of a list;
  that one just has its errors reset after ``revive_time``), otherwise a new
  window starts;
* **success** resets the error count of an alive upstream;
* **down** upstreams are re-resolved and revived after ``revive_time`` plus a
  jitter of ``U[0, revive_jitter * revive_time)``;
* when **every** upstream is down the selector revives all of them at once
  (Rspamd up to 3.12), or with ``all_down=AllDownPolicy.PROBE`` hands out one
  half-open probe at a time (Rspamd 3.13+).

Rotation: weighted round-robin (Rspamd's cur-weight algorithm, not smooth
WRR), master-slave, random (uniform, as 3.x; Rspamd 4 silently uses P2C),
hash (XXH64 + Lamping-Veach jump hash over all upstreams, as Rspamd 3.x; 4.x
moved to a ketama ring), sequential (list order, next one on retry), token
bucket (message-size aware) and power of two choices over a latency EWMA
(both as Rspamd 4.x).

:meth:`Balancer.call` runs a request with retries on other upstreams under an
overall timeout.  :class:`HealthChecker` adds active probes.  Time,
randomness and name resolution are injected; observers get every state
change and attempt outcome.
"""

from __future__ import annotations

import enum
import math
import random
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Generic, NamedTuple, Sequence, TypeVar, Union, overload

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from rspamd_tx.upstreams.hosts import EntryKind, Strategy, UpstreamEntry, UpstreamList

__all__ = [
    "Address",
    "AllAttemptsFailed",
    "AllDownPolicy",
    "AttemptTimeout",
    "AttemptOutcome",
    "Balancer",
    "BalancerEvent",
    "CallResult",
    "Deadlines",
    "HealthChecker",
    "Limits",
    "NoUpstreamAvailable",
    "Probe",
    "Resolver",
    "Selection",
    "StateChange",
    "Upstream",
    "UpstreamCallError",
    "UpstreamState",
    "UpstreamTimeout",
    "jump_hash",
    "mum_hash_step",
    "xxh64",
]

_log = Logger()

Address = Union[IPv4Address, IPv6Address, UNIXAddress]
#: Resolves an entry to its addresses (ports filled in); fails or returns an
#: empty list when the name does not resolve.
Resolver = Callable[[UpstreamEntry], "defer.Deferred[list[Address]]"]

_T = TypeVar("_T")
_M64 = 0xFFFFFFFFFFFFFFFF

#: Rspamd's upstream hash seed.
HASH_SEED = 0xA574DE7DF64E9B9D
#: Hash strategy: jump-hash probes before falling back to random.
HASH_MAX_TRIES = 20
#: Initial and maximal delay between resolve attempts of a never-resolved name.
PENDING_RESOLVE_INITIAL_DELAY = 1.0
PENDING_RESOLVE_MAX_DELAY = 60.0


# --------------------------------------------------------------------------
# Hashing (XXH64, mum step, jump hash) as used by Rspamd's hash rotation.
# --------------------------------------------------------------------------

_P1 = 0x9E3779B185EBCA87
_P2 = 0xC2B2AE3D27D4EB4F
_P3 = 0x165667B19E3779F9
_P4 = 0x85EBCA77C2B2AE63
_P5 = 0x27D4EB2F165667C5


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _M64


def _xxh_round(acc: int, lane: int) -> int:
    acc = (acc + lane * _P2) & _M64
    return (_rotl(acc, 31) * _P1) & _M64


def _xxh_merge(acc: int, val: int) -> int:
    acc ^= _xxh_round(0, val)
    return (acc * _P1 + _P4) & _M64


def xxh64(data: bytes, seed: int = 0) -> int:
    """Return the XXH64 digest of ``data`` with ``seed`` as an integer."""
    n = len(data)
    i = 0
    seed &= _M64
    if n >= 32:
        v1 = (seed + _P1 + _P2) & _M64
        v2 = (seed + _P2) & _M64
        v3 = seed
        v4 = (seed - _P1) & _M64
        while i + 32 <= n:
            v1 = _xxh_round(v1, int.from_bytes(data[i:i + 8], "little"))
            v2 = _xxh_round(v2, int.from_bytes(data[i + 8:i + 16], "little"))
            v3 = _xxh_round(v3, int.from_bytes(data[i + 16:i + 24], "little"))
            v4 = _xxh_round(v4, int.from_bytes(data[i + 24:i + 32], "little"))
            i += 32
        h = (_rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)) & _M64
        for v in (v1, v2, v3, v4):
            h = _xxh_merge(h, v)
    else:
        h = (seed + _P5) & _M64
    h = (h + n) & _M64
    while i + 8 <= n:
        h ^= _xxh_round(0, int.from_bytes(data[i:i + 8], "little"))
        h = (_rotl(h, 27) * _P1 + _P4) & _M64
        i += 8
    if i + 4 <= n:
        h ^= (int.from_bytes(data[i:i + 4], "little") * _P1) & _M64
        h = (_rotl(h, 23) * _P2 + _P3) & _M64
        i += 4
    while i < n:
        h ^= (data[i] * _P5) & _M64
        h = (_rotl(h, 11) * _P1) & _M64
        i += 1
    h ^= h >> 33
    h = (h * _P2) & _M64
    h ^= h >> 29
    h = (h * _P3) & _M64
    h ^= h >> 32
    return h


def _mum(a: int, b: int) -> int:
    product = a * b
    return ((product >> 64) + (product & _M64)) & _M64


def mum_hash_step(h: int, key: int) -> int:
    """Return mum-hash's step function ``mum(h, P) ^ mum(key, Q)``."""
    return _mum(h, 0x2E0BB864E9EA7DF5) ^ _mum(key, 0xCDB32970830FCAA1)


def jump_hash(key: int, buckets: int) -> int:
    """Return the Lamping-Veach bucket of ``key`` among ``buckets`` (> 0).

    The multiplier is Rspamd's ``2862933555777941757 + 1`` (its precedence
    slip folds the ``+ 1`` into the constant).
    """
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * 2862933555777941758) & _M64
        j = int((b + 1) * float(1 << 31) / float((key >> 33) + 1))
    return b


# --------------------------------------------------------------------------
# Tunables, states, events, errors.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """Upstream tunables (Rspamd ``options.upstream`` plus newer knobs).

    Raises ``ValueError`` on values that make no sense (non-positive windows).

    Attributes:
        max_errors: errors allowed per ``error_time``.
        error_time: error-rate window, seconds.
        revive_time: how long a down upstream stays out, seconds.
        revive_jitter: revive delay is ``revive_time * (1 + U[0, jitter))``.
        lazy_resolve_time: periodic re-resolve of names (+0-10 % jitter).
        resolve_min_interval: minimal gap between re-resolves (capped at
            ``revive_time``).
        probe_max_backoff, probe_jitter: half-open probing (``PROBE`` policy).
        token_bucket_max, token_bucket_scale, token_bucket_base_cost,
        token_bucket_refill_per_s: token bucket strategy (cost of a request =
            ``base_cost + size // scale``).
        latency_half_life: latency EWMA half-life, seconds (0: plain mean).
    """

    max_errors: int = 4
    error_time: float = 10.0
    revive_time: float = 60.0
    revive_jitter: float = 0.4
    lazy_resolve_time: float = 3600.0
    resolve_min_interval: float = 60.0
    probe_max_backoff: float = 600.0
    probe_jitter: float = 0.3
    token_bucket_max: int = 10000
    token_bucket_scale: int = 1024
    token_bucket_base_cost: int = 10
    token_bucket_refill_per_s: int = 10000 // 60
    latency_half_life: float = 60.0

    def __post_init__(self) -> None:
        if self.error_time <= 0 or self.max_errors < 0 or self.revive_time < 0:
            raise ValueError("error_time must be > 0, max_errors and revive_time >= 0")
        if self.lazy_resolve_time <= 0 or self.resolve_min_interval < 0:
            raise ValueError("lazy_resolve_time must be > 0, resolve_min_interval >= 0")
        if self.token_bucket_scale <= 0 or self.token_bucket_max <= 0:
            raise ValueError("token_bucket_scale and token_bucket_max must be > 0")

    def for_proxy(self, max_retries: int, timeout: float) -> "Limits":
        """Return the proxy's override: ``error_time = max_retries * timeout``
        and ``max_errors = max_retries - 1`` (the latter only when > 0).

        ``max_retries <= 0`` (unlimited) or ``timeout <= 0`` leave the limits
        unchanged (Rspamd would get a zero window).
        """
        if max_retries <= 0 or timeout <= 0:
            return self
        limits = replace(self, error_time=max_retries * timeout)
        if max_retries - 1 > 0:
            limits = replace(limits, max_errors=max_retries - 1)
        return limits

    @property
    def effective_resolve_min_interval(self) -> float:
        """``resolve_min_interval`` capped at ``revive_time``."""
        return min(self.resolve_min_interval, self.revive_time)


class AllDownPolicy(enum.Enum):
    """What selection does when every upstream is down."""

    #: Rspamd <= 3.12: put every upstream back into the alive list.
    REVIVE_ALL = "revive-all"
    #: Rspamd 3.13+: hand out one half-open probe per ready down upstream.
    PROBE = "probe"


class UpstreamState(enum.Enum):
    """State of one upstream."""

    ALIVE = "alive"
    DOWN = "down"
    #: Down, with a probe (health check or half-open request) in flight.
    PROBING = "probing"
    #: A name that has not resolved yet; not selectable.
    PENDING = "pending"


@dataclass(frozen=True)
class StateChange:
    """An upstream changed state (``reason`` is free text for logs)."""

    upstream: str
    old: UpstreamState
    new: UpstreamState
    reason: str


@dataclass(frozen=True)
class AttemptOutcome:
    """One attempt of :meth:`Balancer.call` (or a manual report) finished."""

    upstream: str
    address: Address | None
    ok: bool
    latency: float
    failure: Failure | None = None


BalancerEvent = Union[StateChange, AttemptOutcome]


class UpstreamCallError(Exception):
    """Base of the errors :meth:`Balancer.call` fails with.

    Attributes:
        tried: names of the upstreams tried, in attempt order.
    """

    def __init__(self, message: str, tried: Sequence[str]) -> None:
        super().__init__(message)
        self.tried: list[str] = list(tried)


class NoUpstreamAvailable(UpstreamCallError):
    """No upstream could be selected (none alive and none ready to probe)."""


class UpstreamTimeout(UpstreamCallError):
    """The overall timeout expired; the attempt in flight was cancelled."""


class AttemptTimeout(Exception):
    """One attempt exceeded ``attempt_timeout`` (retryable; it appears as
    ``AllAttemptsFailed.last_failure`` or in attempt outcomes)."""

    retryable = True


class AllAttemptsFailed(UpstreamCallError):
    """Attempts ran out (``max_retries``) or a non-retryable failure occurred.

    Attributes:
        last_failure: the failure of the last attempt.
        retryable: whether that failure was retryable (False when the call
            stopped because the predicate refused to retry).
    """

    def __init__(self, last_failure: Failure, tried: Sequence[str], retryable: bool = True) -> None:
        super().__init__(
            f"all {len(tried)} attempt(s) failed, last: {last_failure.getErrorMessage()}",
            tried,
        )
        self.last_failure = last_failure
        self.retryable = retryable


@dataclass(frozen=True)
class CallResult(Generic[_T]):
    """Successful result of :meth:`Balancer.call`.

    Attributes:
        value: what ``fn`` returned.
        upstream: name of the upstream that answered.
        address: the address it was reached at.
        tried: names of every upstream tried, in order (the last answered).
    """

    value: _T
    upstream: str
    address: Address
    tried: list[str]


# --------------------------------------------------------------------------
# Upstream.
# --------------------------------------------------------------------------


def _family_rank(address: Address) -> int:
    if isinstance(address, UNIXAddress):
        return 0
    if isinstance(address, IPv4Address):
        return 1
    return 2


@dataclass
class _AddressSlot:
    address: Address
    errors: int = 0


def _entry_addresses(entry: UpstreamEntry) -> list[Address]:
    if entry.kind is EntryKind.UNIX:
        return [UNIXAddress(entry.host.encode())]
    if entry.kind is EntryKind.INET and entry.numeric:
        assert entry.port is not None
        if ":" in entry.host:
            return [IPv6Address("TCP", entry.host, entry.port)]
        return [IPv4Address("TCP", entry.host, entry.port)]
    return []


class Upstream:
    """One upstream and its accounting.

    Attributes:
        entry: the parsed list element.
        name: ``entry.name``.
        weight: configured weight/priority.
        state: :class:`UpstreamState`.
        errors: errors in the current window.
        first_fail: clock time of the window's first error.
        checked: times selected.
        inflight: selections not yet reported ok/fail.
        latency_ewma: latency estimate in seconds (0 without samples).
        latency_samples: number of latency samples.
    """

    def __init__(self, entry: UpstreamEntry) -> None:
        self.entry = entry
        self.name = entry.name
        self.weight = entry.weight_or_priority
        self.cur_weight = self.weight
        self.state = UpstreamState.ALIVE
        self.errors = 0
        self.first_fail = 0.0
        self.checked = 0
        self.inflight = 0
        self.latency_ewma = 0.0
        self.latency_samples = 0
        self.latency_last_at = 0.0
        self.available_tokens = 0
        self.inflight_tokens = 0
        self.last_refill_at: float | None = None
        self.next_probe_at: float | None = None
        self.probe_backoff = 0.0
        self.half_open = False
        self._slots: list[_AddressSlot] = []
        self._cur = 0
        self.revive_call: IDelayedCall | None = None
        self.resolve_call: IDelayedCall | None = None
        self.last_resolve: float | None = None
        self.resolving = False
        self.pending_delay = 0.0
        self.set_addresses(_entry_addresses(entry))

    @property
    def numeric(self) -> bool:
        """True when the upstream is never resolved."""
        return self.entry.numeric

    @property
    def addresses(self) -> list[Address]:
        """Addresses in preference order (unix, IPv4, IPv6)."""
        return [slot.address for slot in self._slots]

    def has_address(self, address: Address) -> bool:
        """Whether ``address`` is one of :attr:`addresses`."""
        for slot in self._slots:
            if slot.address == address:
                return True
        return False

    def address_errors(self, address: Address) -> int:
        """Return the connect-error count of one of this upstream's addresses.

        @raise KeyError: ``address`` is not one of :attr:`addresses`.
        """
        for slot in self._slots:
            if slot.address == address:
                return slot.errors
        raise KeyError(address)

    def set_addresses(self, addresses: Sequence[Address]) -> None:
        """Replace the addresses, keeping error counts of those that remain."""
        old = {slot.address: slot.errors for slot in self._slots}
        current = self._slots[self._cur].address if self._slots else None
        unique: list[Address] = []
        for address in addresses:
            if address not in unique:
                unique.append(address)
        unique.sort(key=_family_rank)
        self._slots = [_AddressSlot(a, old.get(a, 0)) for a in unique]
        self._cur = unique.index(current) if current in unique else 0

    def current_address(self) -> Address | None:
        """Return the address the last attempt used (or the first one)."""
        return self._slots[self._cur].address if self._slots else None

    def next_address(self) -> Address | None:
        """Advance to and return the address for the next connection attempt.

        Moves to the next address of the same family whose error count is not
        higher than the current one; after a full circle stays put when the
        current address has no errors, else takes the least-failed address.
        """
        if not self._slots:
            return None
        count = len(self._slots)
        start = self._cur
        current = self._slots[start]
        min_errors, min_index = current.errors, start
        index = start
        while True:
            index = (index + 1) % count
            slot = self._slots[index]
            if slot.errors < min_errors:
                min_errors, min_index = slot.errors, index
            if index == start:
                if slot.errors != 0:
                    index = min_index
                break
            if type(slot.address) is type(current.address) and slot.errors <= current.errors:
                break
        self._cur = index
        return self._slots[index].address

    def note_address_failure(self) -> None:
        """Count a connect error against the current address."""
        if self._slots:
            self._slots[self._cur].errors += 1

    def reset_address_errors(self) -> None:
        """Forget the current address's connect errors."""
        if self._slots:
            self._slots[self._cur].errors = 0

    def record_latency(self, seconds: float, now: float, half_life: float) -> None:
        """Fold one latency sample into the EWMA (time-decayed, alpha 0.01-0.5)."""
        if seconds < 0:
            return
        if self.latency_samples == 0:
            self.latency_ewma = seconds
        else:
            if half_life <= 0:
                alpha = 1.0 / (self.latency_samples + 1)
            else:
                dt = max(0.0, now - self.latency_last_at)
                alpha = 1.0 - math.exp(-dt * math.log(2) / half_life)
                alpha = min(0.5, max(0.01, alpha))
            self.latency_ewma = alpha * seconds + (1.0 - alpha) * self.latency_ewma
        self.latency_last_at = now
        self.latency_samples += 1

    def load_score(self) -> float:
        """P2C load: ``latency * (inflight + 1) + 5 * errors * latency`` with
        latency samples, else ``inflight + 2 * errors``; lower is better."""
        if self.latency_samples > 0 and self.latency_ewma > 0:
            return self.latency_ewma * (self.inflight + 1) + self.errors * 5.0 * self.latency_ewma
        return float(self.inflight + self.errors * 2)

    def __repr__(self) -> str:
        return f"<Upstream {self.name} {self.state.value} errors={self.errors}>"


@dataclass
class Selection:
    """A selected upstream; pass it back to :meth:`Balancer.report_ok` or
    :meth:`Balancer.report_fail` exactly once.

    Attributes:
        upstream: the chosen upstream.
        address: the address to connect to (``next_address()`` was called).
        started: clock time of the selection (latency origin).
        tokens: tokens reserved (token bucket strategy).
    """

    upstream: Upstream
    address: Address
    started: float
    tokens: int = 0
    reported: bool = field(default=False, repr=False)


# --------------------------------------------------------------------------
# Balancer.
# --------------------------------------------------------------------------


class Balancer:
    """Select upstreams of one list and account for their failures.

    Args:
        upstreams: the parsed list.
        clock: time source and scheduler.
        resolver: resolves names (``None``: names stay unresolved, so only
            numeric and unix upstreams are usable).
        rng: randomness for jitter, random, P2C (default: a fresh
            ``random.Random()``).
        limits: tunables.
        all_down: policy when every upstream is down.

    Attributes:
        observers: callables receiving every :data:`BalancerEvent`; an
            observer that raises is logged and otherwise ignored.
        deadlines: the overall timeouts of the calls in flight, on one timer.
    """

    def __init__(
        self,
        upstreams: UpstreamList,
        *,
        clock: IReactorTime,
        resolver: Resolver | None = None,
        rng: random.Random | None = None,
        limits: Limits = Limits(),
        all_down: AllDownPolicy = AllDownPolicy.REVIVE_ALL,
    ) -> None:
        self.clock = clock
        self.resolver = resolver
        self.rng = rng if rng is not None else random.Random()
        self.limits = limits
        self.all_down = all_down
        self.strategy = upstreams.strategy
        self.observers: list[Callable[[BalancerEvent], None]] = []
        self.deadlines = Deadlines(clock)
        self.upstreams: list[Upstream] = []
        self._alive: list[Upstream] = []
        self._started = False
        for entry in upstreams.entries:
            self._add(Upstream(entry))

    # -- introspection ---------------------------------------------------

    @property
    def alive(self) -> list[Upstream]:
        """Alive upstreams in Rspamd's alive-list order (revived ones last)."""
        return list(self._alive)

    def get(self, name: str) -> Upstream:
        """Return the upstream called ``name``.

        Raises:
            KeyError: no such upstream.
        """
        for upstream in self.upstreams:
            if upstream.name == name:
                return upstream
        raise KeyError(name)

    def states(self) -> dict[str, UpstreamState]:
        """Return ``{name: state}`` for every upstream."""
        return {u.name: u.state for u in self.upstreams}

    # -- lifecycle -------------------------------------------------------

    def start(self) -> "defer.Deferred[None]":
        """Resolve every name and start the lazy re-resolve timers.

        Returns a Deferred firing (never failing) once each initial resolution
        finished; names that did not resolve stay ``PENDING`` and are retried
        with a back-off of 1 s doubling up to 60 s.
        """
        self._started = True
        pending = [self._initial_resolve(u) for u in self.upstreams if not u.numeric]
        return defer.gatherResults(pending).addCallback(lambda _: None)

    def stop(self) -> None:
        """Cancel every timer the balancer scheduled."""
        self._started = False
        for upstream in self.upstreams:
            self._cancel_timers(upstream)

    def update(self, new_list: UpstreamList) -> None:
        """Replace the list (SIGHUP reload), keeping the state of upstreams
        whose name, kind, host and port are unchanged (their weight is
        updated); new names are resolved when the balancer is started."""
        def key(entry: UpstreamEntry) -> tuple[Any, ...]:
            return (entry.name, entry.kind, entry.host, entry.port)

        old = {key(u.entry): u for u in self.upstreams}
        kept: list[Upstream] = []
        fresh: list[Upstream] = []
        for entry in new_list.entries:
            existing = old.pop(key(entry), None)
            if existing is not None and existing not in kept:
                existing.entry = entry
                if existing.weight != entry.weight_or_priority:
                    existing.weight = entry.weight_or_priority
                    existing.cur_weight = existing.weight
                kept.append(existing)
            else:
                upstream = Upstream(entry)
                kept.append(upstream)
                fresh.append(upstream)
        for removed in self.upstreams:
            if removed not in kept:
                self._cancel_timers(removed)
        self.strategy = new_list.strategy
        self._alive = [u for u in self._alive if u in kept]
        self.upstreams = []
        for upstream in kept:
            self.upstreams.append(upstream)
            if upstream in fresh:
                self._add(upstream)
                if self._started and not upstream.numeric:
                    self._initial_resolve(upstream)

    # -- events ----------------------------------------------------------

    def _emit(self, event: BalancerEvent) -> None:
        for observer in list(self.observers):
            try:
                observer(event)
            except Exception:
                _log.failure("upstream observer {observer!r} failed", observer=observer)

    def _set_state(self, upstream: Upstream, new: UpstreamState, reason: str) -> None:
        old = upstream.state
        if old is new:
            return
        upstream.state = new
        _log.info(
            "upstream {name}: {old} -> {new} ({reason})",
            name=upstream.name,
            old=old.value,
            new=new.value,
            reason=reason,
        )
        self._emit(StateChange(upstream.name, old, new, reason))

    # -- alive list ------------------------------------------------------

    def _add(self, upstream: Upstream) -> None:
        if upstream not in self.upstreams:
            self.upstreams.append(upstream)
        upstream.available_tokens = self.limits.token_bucket_max
        if upstream.addresses:
            upstream.state = UpstreamState.ALIVE
            self._alive.append(upstream)
        else:
            upstream.state = UpstreamState.PENDING

    def _activate(self, upstream: Upstream, reason: str) -> None:
        if upstream.revive_call is not None and upstream.revive_call.active():
            upstream.revive_call.cancel()
        upstream.revive_call = None
        upstream.half_open = False
        if upstream not in self._alive:
            self._alive.append(upstream)
            upstream.available_tokens = self.limits.token_bucket_max
            upstream.inflight_tokens = 0
        self._set_state(upstream, UpstreamState.ALIVE, reason)

    def mark_down(self, upstream: Upstream, reason: str, *, revive: bool = True) -> None:
        """Take an alive upstream out of selection.

        Re-resolves its name and, with ``revive``, schedules its return after
        ``revive_time + U[0, revive_jitter * revive_time)``.  No effect on an
        upstream that is not alive.
        """
        if upstream not in self._alive:
            return
        self._alive.remove(upstream)
        upstream.available_tokens = min(
            self.limits.token_bucket_max, upstream.available_tokens + upstream.inflight_tokens
        )
        upstream.inflight_tokens = 0
        upstream.errors = 0
        self._resolve(upstream)
        if upstream.revive_call is not None and upstream.revive_call.active():
            upstream.revive_call.cancel()
        upstream.revive_call = None
        if revive:
            delay = self._jitter(self.limits.revive_time, self.limits.revive_time * self.limits.revive_jitter)
            upstream.revive_call = self.clock.callLater(delay, self._revive, upstream)
        if upstream.probe_backoff <= 0:
            upstream.probe_backoff = self.limits.revive_time
        upstream.next_probe_at = self.clock.seconds() + self._jitter(
            upstream.probe_backoff, upstream.probe_backoff * self.limits.probe_jitter
        )
        self._set_state(upstream, UpstreamState.DOWN, reason)

    def revive(self, upstream: Upstream, reason: str = "revived") -> None:
        """Put a down (or probing) upstream back into selection with no errors."""
        if upstream.state in (UpstreamState.DOWN, UpstreamState.PROBING):
            upstream.errors = 0
            upstream.probe_backoff = self.limits.revive_time
            upstream.next_probe_at = None
            self._activate(upstream, reason)

    def set_probing(self, upstream: Upstream, probing: bool) -> None:
        """Flag a down upstream as being probed (``probing``) or not (``down``)."""
        if probing and upstream.state is UpstreamState.DOWN:
            self._set_state(upstream, UpstreamState.PROBING, "health probe started")
        elif not probing and upstream.state is UpstreamState.PROBING and not upstream.half_open:
            self._set_state(upstream, UpstreamState.DOWN, "health probe finished")

    def _revive(self, upstream: Upstream) -> None:
        upstream.revive_call = None
        self.revive(upstream, "revive time elapsed")

    def _jitter(self, value: float, jitter: float) -> float:
        if jitter == 0:
            jitter = value
        return value + jitter * self.rng.random()

    # -- name resolution ---------------------------------------------------

    def _initial_resolve(self, upstream: Upstream) -> "defer.Deferred[None]":
        return self._run_resolve(upstream, force=True)

    def _resolve(self, upstream: Upstream) -> None:
        """Re-resolve unless numeric, already resolving or resolved less than
        ``resolve_min_interval`` ago."""
        self._run_resolve(upstream, force=False)

    def _run_resolve(self, upstream: Upstream, force: bool) -> "defer.Deferred[None]":
        if upstream.numeric or self.resolver is None or upstream.resolving or not self._started:
            return defer.succeed(None)
        now = self.clock.seconds()
        if (
            not force
            and upstream.last_resolve is not None
            and now - upstream.last_resolve < self.limits.effective_resolve_min_interval
        ):
            return defer.succeed(None)
        upstream.last_resolve = now
        upstream.resolving = True
        d = defer.maybeDeferred(self.resolver, upstream.entry)

        def done(result: list[Address] | Failure) -> None:
            upstream.resolving = False
            if upstream not in self.upstreams:
                return
            ok = not isinstance(result, Failure) and len(result) > 0
            if isinstance(result, Failure):
                _log.warn(
                    "cannot resolve upstream {name}: {error}",
                    name=upstream.name,
                    error=result.getErrorMessage(),
                )
            elif ok:
                upstream.set_addresses(result)
            if ok and upstream.state is UpstreamState.PENDING:
                upstream.pending_delay = 0.0
                self._activate(upstream, "name resolved")
            self._schedule_resolve(upstream)

        return d.addBoth(done)

    def _schedule_resolve(self, upstream: Upstream) -> None:
        if not self._started:
            return
        if upstream.resolve_call is not None and upstream.resolve_call.active():
            upstream.resolve_call.cancel()
        if upstream.state is UpstreamState.PENDING:
            delay = min(
                PENDING_RESOLVE_MAX_DELAY,
                max(PENDING_RESOLVE_INITIAL_DELAY, upstream.pending_delay * 2),
            )
            upstream.pending_delay = delay
            delay = self._jitter(delay, delay * 0.25)
        else:
            lazy = self.limits.lazy_resolve_time
            delay = self._jitter(lazy, lazy * 0.1)
        upstream.resolve_call = self.clock.callLater(delay, self._lazy_resolve, upstream)

    def _lazy_resolve(self, upstream: Upstream) -> None:
        """Periodic re-resolve; a pending name retries regardless of the
        minimal interval, a resolved one waits for it."""
        upstream.resolve_call = None
        if upstream.state is not UpstreamState.PENDING and upstream.last_resolve is not None:
            wait = upstream.last_resolve + self.limits.effective_resolve_min_interval - self.clock.seconds()
            if wait > 0:
                upstream.resolve_call = self.clock.callLater(wait, self._lazy_resolve, upstream)
                return
        self._run_resolve(upstream, force=True)

    def _cancel_timers(self, upstream: Upstream) -> None:
        for call in (upstream.revive_call, upstream.resolve_call):
            if call is not None and call.active():
                call.cancel()
        upstream.revive_call = None
        upstream.resolve_call = None

    # -- accounting --------------------------------------------------------

    def _settle(self, selection: Selection, *, success: bool) -> bool:
        """Mark ``selection`` reported and give back its in-flight slot and
        its tokens (see :meth:`_return_tokens` for ``success``).

        @return: whether it was still open; a reported selection is left as
            it is.
        """
        if selection.reported:
            return False
        selection.reported = True
        upstream = selection.upstream
        upstream.inflight = max(0, upstream.inflight - 1)
        self._return_tokens(upstream, selection.tokens, success=success)
        return True

    def report_ok(self, selection: Selection, latency: float | None = None) -> None:
        """Report a completed exchange: resets errors of an alive upstream,
        revives a half-open probe, records latency, returns tokens."""
        if not self._settle(selection, success=True):
            return
        upstream = selection.upstream
        now = self.clock.seconds()
        if latency is None:
            latency = now - selection.started
        if upstream.half_open:
            upstream.half_open = False
            self.revive(upstream, "half-open probe succeeded")
        if upstream.errors > 0 and upstream in self._alive:
            upstream.errors = 0
            upstream.reset_address_errors()
        upstream.record_latency(latency, now, self.limits.latency_half_life)
        self._emit(AttemptOutcome(upstream.name, selection.address, True, latency))

    def release(self, selection: Selection) -> None:
        """Give a selection back without counting success or failure (the
        request was cancelled or failed for reasons not the upstream's)."""
        if not self._settle(selection, success=True):
            return
        upstream = selection.upstream
        if upstream.half_open:
            upstream.half_open = False
            self._set_state(upstream, UpstreamState.DOWN, "half-open probe abandoned")

    def report_fail(
        self,
        selection: Selection,
        failure: Failure | None = None,
        *,
        address_failure: bool = False,
        reason: str = "error",
    ) -> None:
        """Report a failed exchange and apply the error-rate rule."""
        if not self._settle(selection, success=False):
            return
        upstream = selection.upstream
        self.fail(upstream, reason=reason, address_failure=address_failure)
        if upstream.half_open:
            upstream.half_open = False
            upstream.probe_backoff = min(
                max(upstream.probe_backoff, self.limits.revive_time) * 2, self.limits.probe_max_backoff
            )
            upstream.next_probe_at = self.clock.seconds() + self._jitter(
                upstream.probe_backoff, upstream.probe_backoff * self.limits.probe_jitter
            )
            self._set_state(upstream, UpstreamState.DOWN, "half-open probe failed")
        latency = self.clock.seconds() - selection.started
        self._emit(AttemptOutcome(upstream.name, selection.address, False, latency, failure))

    def fail(self, upstream: Upstream, *, reason: str = "error", address_failure: bool = False) -> None:
        """Count one error against ``upstream`` (ignored unless it is alive)."""
        if upstream not in self._alive:
            return
        now = self.clock.seconds()
        limits = self.limits
        if upstream.errors == 0:
            upstream.errors = 1
            upstream.first_fail = now
            self._resolve(upstream)
        elif now >= upstream.first_fail:
            upstream.errors += 1
            elapsed = now - upstream.first_fail
            if elapsed >= limits.error_time:
                rate = upstream.errors / elapsed
                if rate > limits.max_errors / limits.error_time:
                    if len(self.upstreams) > 1:
                        self.mark_down(
                            upstream,
                            f"{reason}: {upstream.errors} errors in {elapsed:.1f} s",
                        )
                    elif elapsed > limits.revive_time:
                        upstream.errors = 0
                        self._resolve(upstream)
                else:
                    upstream.errors = 1
                    upstream.first_fail = now
        if address_failure:
            upstream.note_address_failure()

    def _return_tokens(self, upstream: Upstream, tokens: int, success: bool) -> None:
        if tokens <= 0:
            return
        upstream.inflight_tokens = max(0, upstream.inflight_tokens - tokens)
        if success:
            upstream.available_tokens = min(self.limits.token_bucket_max, upstream.available_tokens + tokens)
        self._refill(upstream, self.clock.seconds())

    def _refill(self, upstream: Upstream, now: float) -> None:
        rate = self.limits.token_bucket_refill_per_s
        if upstream.last_refill_at is None or rate == 0:
            upstream.last_refill_at = now
            return
        add = int((now - upstream.last_refill_at) * rate)
        if add <= 0:
            return
        upstream.available_tokens = min(self.limits.token_bucket_max, upstream.available_tokens + add)
        upstream.last_refill_at = now

    # -- selection -----------------------------------------------------------

    def select(
        self,
        *,
        key: bytes | None = None,
        size: int = 0,
        exclude: Upstream | None = None,
    ) -> Selection | None:
        """Pick an upstream and its next address, or ``None``.

        Args:
            key: hash key (``hash`` strategy; without one it degrades to random).
            size: request size in bytes (``token-bucket`` strategy).
            exclude: upstream to avoid (the one a retry just failed on); still
                returned when it is the only alive one (except ``sequential``,
                which then continues with the next alive upstream after it in
                list order and returns ``None`` past the end).
        """
        if not self._alive:
            if self.all_down is AllDownPolicy.REVIVE_ALL:
                down = [u for u in self.upstreams if u.state in (UpstreamState.DOWN, UpstreamState.PROBING)]
                if down:
                    _log.warn("no alive upstreams left, revive all of them")
                for upstream in down:
                    self._activate(upstream, "all upstreams were down")
            else:
                return self._select_probe(exclude)
        if not self._alive:
            return None
        picked = self._pick(key, size, exclude)
        if picked is None:
            return None
        return self._selected(*picked)

    def _selected(self, upstream: Upstream, tokens: int) -> Selection:
        upstream.checked += 1
        upstream.inflight += 1
        address = upstream.next_address()
        assert address is not None
        return Selection(upstream, address, self.clock.seconds(), tokens)

    def _select_probe(self, exclude: Upstream | None) -> Selection | None:
        now = self.clock.seconds()
        for upstream in self.upstreams:
            if upstream.state is not UpstreamState.DOWN or upstream is exclude:
                continue
            if upstream.next_probe_at is None:
                if upstream.probe_backoff <= 0:
                    upstream.probe_backoff = self.limits.revive_time
                upstream.next_probe_at = now + self._jitter(
                    upstream.probe_backoff, upstream.probe_backoff * self.limits.probe_jitter
                )
            if upstream.next_probe_at <= now and not upstream.half_open:
                upstream.half_open = True
                self._set_state(upstream, UpstreamState.PROBING, "half-open probe")
                return self._selected(upstream, 0)
        return None

    def _pick(self, key: bytes | None, size: int, exclude: Upstream | None) -> tuple[Upstream, int] | None:
        """Return the chosen upstream and the tokens reserved for it."""
        strategy = self.strategy
        if strategy is Strategy.TOKEN_BUCKET:
            return self._pick_token_bucket(size, exclude)
        if strategy is Strategy.SEQUENTIAL:
            chosen = self._pick_sequential(exclude)
        elif len(self._alive) == 1:
            chosen = self._alive[0]
        elif strategy is Strategy.ROUND_ROBIN:
            chosen = self._pick_round_robin(exclude, use_current=True)
        elif strategy is Strategy.MASTER_SLAVE:
            chosen = self._pick_round_robin(exclude, use_current=False)
        elif strategy is Strategy.HASH and key:
            chosen = self._pick_hash(key, exclude)
        elif strategy is Strategy.P2C:
            chosen = self._pick_p2c(exclude)
        else:
            chosen = self._pick_random(exclude)
        return None if chosen is None else (chosen, 0)

    def _pick_sequential(self, exclude: Upstream | None) -> Upstream | None:
        start = 0 if exclude is None or exclude not in self.upstreams else self.upstreams.index(exclude) + 1
        for upstream in self.upstreams[start:]:
            if upstream in self._alive:
                return upstream
        return None

    def _pick_random(self, exclude: Upstream | None) -> Upstream | None:
        candidates = [u for u in self._alive if u is not exclude]
        if not candidates:
            return None
        return candidates[self.rng.randrange(len(candidates))]

    def _pick_round_robin(self, exclude: Upstream | None, use_current: bool) -> Upstream | None:
        max_weight = 0
        selected: Upstream | None = None
        min_checked = 0xFFFFFFFF
        least_used: Upstream | None = None
        for upstream in self._alive:
            if upstream is exclude:
                continue
            weight = upstream.cur_weight if use_current else upstream.weight
            if weight > max_weight:
                selected, max_weight = upstream, weight
            if upstream.checked + upstream.errors * 2 < min_checked:
                least_used, min_checked = upstream, upstream.checked
        if max_weight == 0:
            if min_checked > 0xFFFFFFFF // 2:
                for upstream in self._alive:
                    upstream.checked = 0
            selected = least_used
        if use_current and selected is not None:
            if selected.cur_weight > 0:
                selected.cur_weight -= 1
            else:
                selected.cur_weight = selected.weight
        return selected

    def _pick_hash(self, key: bytes, exclude: Upstream | None) -> Upstream | None:
        k = xxh64(key, HASH_SEED)
        upstream = self.upstreams[0]
        for _ in range(HASH_MAX_TRIES):
            upstream = self.upstreams[jump_hash(k, len(self.upstreams))]
            if upstream not in self._alive or upstream is exclude:
                k = mum_hash_step(k, HASH_SEED)
            else:
                break
        if upstream in self._alive and upstream is not exclude:
            return upstream
        return self._pick_random(exclude)

    def _pick_p2c(self, exclude: Upstream | None) -> Upstream | None:
        alive = self._alive
        n = len(alive)
        if n == 2 and exclude is not None and exclude in alive:
            return alive[1] if alive[0] is exclude else alive[0]
        i = self.rng.randrange(n)
        j = self.rng.randrange(n - 1)
        if j >= i:
            j += 1
        a, b = alive[i], alive[j]
        if a is exclude:
            return b
        if b is exclude:
            return a
        return a if a.load_score() <= b.load_score() else b

    def _pick_token_bucket(self, size: int, exclude: Upstream | None) -> tuple[Upstream, int] | None:
        limits = self.limits
        cost = limits.token_bucket_base_cost + max(0, size) // limits.token_bucket_scale
        now = self.clock.seconds()
        selected: Upstream | None = None
        fallback: Upstream | None = None
        for upstream in self._alive:
            if upstream is exclude:
                continue
            self._refill(upstream, now)
            if fallback is None or upstream.inflight_tokens < fallback.inflight_tokens:
                fallback = upstream
            if upstream.available_tokens >= cost and (
                selected is None or upstream.inflight_tokens < selected.inflight_tokens
            ):
                selected = upstream
        if selected is None:
            selected = fallback
        if selected is None:
            return None
        selected.available_tokens = max(0, selected.available_tokens - cost)
        selected.inflight_tokens += cost
        return selected, cost

    # -- calls -----------------------------------------------------------------

    # Two overloads so that the result type is inferred for ``fn`` returning
    # a Deferred as well as a plain value.
    @overload
    def call(
        self,
        fn: Callable[[Address], "defer.Deferred[_T]"],
        *,
        key: bytes | None = None,
        size: int = 0,
        timeout: float,
        max_retries: int,
        retryable: Callable[[Failure], bool] | None = None,
        address_failure: Callable[[Failure], bool] | None = None,
        attempt_timeout: float | None = None,
    ) -> "defer.Deferred[CallResult[_T]]": ...

    @overload
    def call(
        self,
        fn: Callable[[Address], _T],
        *,
        key: bytes | None = None,
        size: int = 0,
        timeout: float,
        max_retries: int,
        retryable: Callable[[Failure], bool] | None = None,
        address_failure: Callable[[Failure], bool] | None = None,
        attempt_timeout: float | None = None,
    ) -> "defer.Deferred[CallResult[_T]]": ...

    def call(
        self,
        fn: Callable[[Address], "defer.Deferred[_T] | _T"],
        *,
        key: bytes | None = None,
        size: int = 0,
        timeout: float,
        max_retries: int,
        retryable: Callable[[Failure], bool] | None = None,
        address_failure: Callable[[Failure], bool] | None = None,
        attempt_timeout: float | None = None,
    ) -> "defer.Deferred[CallResult[_T]]":
        """Run ``fn(address)`` on an upstream, retrying on others.

        Each attempt selects an upstream (never the one that just failed while
        another is alive) and calls ``fn`` with its next address.  A result
        reports ok (with latency); a failure reports fail (counted against
        the address too when ``address_failure(failure)``) and, when
        ``retryable(failure)``, starts the next attempt on the next reactor
        turn.

        Args:
            fn: performs one exchange; returns a value or a Deferred.
            key: hash key; size: request size (token bucket).
            timeout: overall seconds for all attempts; on expiry the attempt
                in flight is cancelled and counted as a failure.
            max_retries: maximal number of attempts (Rspamd's meaning); 0
                means unlimited within ``timeout``.
            retryable: predicate on a failure; a non-retryable failure ends the
                call at once and is not counted against the upstream.  Default:
                the exception's ``retryable`` attribute, True when absent.
            address_failure: predicate telling connect failures (which also
                count against the address).  Default: Twisted's
                ``ConnectError`` family.
            attempt_timeout: seconds one attempt may take (Rspamd's upstream
                I/O timeout); on expiry the attempt is cancelled, counted as a
                failure and retried whatever ``retryable`` says (its failure is
                an :class:`AttemptTimeout`).  ``None``: only ``timeout``.

        Returns:
            A Deferred firing with :class:`CallResult`, or failing with
            :class:`NoUpstreamAvailable` (nothing could be selected for the
            first attempt), :class:`UpstreamTimeout` or
            :class:`AllAttemptsFailed` (attempts exhausted, nothing left to
            retry on, or a non-retryable failure).  Cancelling it cancels
            the attempt in flight without counting it.
        """
        options = _CallOptions(
            key, size, timeout, max_retries,
            retryable or _default_retryable,
            address_failure or _is_connect_error,
            attempt_timeout,
        )
        attempt: _Call[_T] = _Call(self, fn, options)
        return attempt.start()


class Deadlines:
    """Timeouts of many objects on one reactor timer.

    :meth:`set` arms (or re-arms) the timeout of a key: ``expired()`` is
    called once ``seconds`` have passed, unless :meth:`cancel` came first.
    One delayed call, due at the earliest deadline, serves every key; it is
    cancelled as soon as no timeout is armed, so an idle clock is left with
    no delayed call.  Creating and cancelling a delayed call per timeout
    costs far more than these dictionary updates when many run at once.
    Timeouts due at the same time expire in the order they were armed.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._due: dict[object, tuple[float, Callable[[], object]]] = {}
        self._call: IDelayedCall | None = None

    def set(self, key: object, seconds: float, expired: Callable[[], object]) -> None:
        """Call ``expired()`` in ``seconds`` unless ``key`` is cancelled or set again first."""
        due = self._clock.seconds() + seconds
        self._due[key] = (due, expired)
        call = self._call
        if call is None:
            self._call = self._clock.callLater(seconds, self._fire)
        elif due < call.getTime():
            call.reset(seconds)

    def cancel(self, key: object) -> None:
        """Forget ``key``'s timeout (nothing happens if none is armed)."""
        if self._due.pop(key, None) is not None and not self._due:
            call, self._call = self._call, None
            if call is not None:
                call.cancel()

    def __contains__(self, key: object) -> bool:
        return key in self._due

    def _fire(self) -> None:
        self._call = None
        now = self._clock.seconds()
        expired = [(key, callback) for key, (due, callback) in self._due.items() if due <= now]
        for key, _ in expired:
            del self._due[key]
        for _, callback in expired:
            callback()
        self._reschedule()

    def _reschedule(self) -> None:
        """Have the timer due at the earliest deadline left (none when none is)."""
        call = self._call
        if not self._due:
            if call is not None:
                self._call = None
                call.cancel()
            return
        first = min(due for due, _ in self._due.values())
        delay = max(0.0, first - self._clock.seconds())
        if call is None:
            self._call = self._clock.callLater(delay, self._fire)
        elif call.getTime() != first:
            call.reset(delay)


def _default_retryable(failure: Failure) -> bool:
    return bool(getattr(failure.value, "retryable", True))


def _is_connect_error(failure: Failure) -> bool:
    return failure.check(ConnectError) is not None


class _CallOptions(NamedTuple):
    """Parameters of one :meth:`Balancer.call` (see its docstring)."""

    key: bytes | None
    size: int
    timeout: float
    max_retries: int
    retryable: Callable[[Failure], bool]
    address_failure: Callable[[Failure], bool]
    attempt_timeout: float | None


class _Call(Generic[_T]):
    """State of one :meth:`Balancer.call`."""

    def __init__(self, balancer: Balancer, fn: Callable[[Address], Any], options: _CallOptions) -> None:
        self.balancer = balancer
        self.fn = fn
        self.options = options
        self.attempt_timer: IDelayedCall | None = None
        self.expired: Selection | None = None
        self.tried: list[str] = []
        self.previous: Upstream | None = None
        self.attempt: defer.Deferred[Any] | None = None
        self.selection: Selection | None = None
        self.retry_call: IDelayedCall | None = None
        self.last_failure: Failure | None = None
        self.finished = False
        self.result: defer.Deferred[CallResult[_T]] = defer.Deferred(self._cancel)

    def start(self) -> "defer.Deferred[CallResult[_T]]":
        self.balancer.deadlines.set(self, self.options.timeout, self._timed_out)
        self._attempt()
        return self.result

    def _finish(self, outcome: CallResult[_T] | Failure) -> None:
        if self.finished:
            return
        self.finished = True
        self.balancer.deadlines.cancel(self)
        if self.retry_call is not None and self.retry_call.active():
            self.retry_call.cancel()
        if isinstance(outcome, Failure):
            self.result.errback(outcome)
        else:
            self.result.callback(outcome)

    def _attempt(self) -> None:
        self.retry_call = None
        if self.finished:
            return
        selection = self.balancer.select(key=self.options.key, size=self.options.size, exclude=self.previous)
        if selection is None:
            if self.last_failure is not None:
                self._finish(Failure(AllAttemptsFailed(self.last_failure, self.tried)))
            else:
                self._finish(Failure(NoUpstreamAvailable("no upstream available", self.tried)))
            return
        self.selection = selection
        self.tried.append(selection.upstream.name)
        attempt = defer.maybeDeferred(self.fn, selection.address)
        if not attempt.called and self.options.attempt_timeout is not None:
            self.attempt_timer = self.balancer.clock.callLater(
                self.options.attempt_timeout, self._attempt_expired, selection, attempt
            )
        self.attempt = attempt
        attempt.addCallbacks(self._succeeded, self._failed, callbackArgs=(selection,), errbackArgs=(selection,))

    def _stop_attempt_timer(self) -> None:
        if self.attempt_timer is not None and self.attempt_timer.active():
            self.attempt_timer.cancel()
        self.attempt_timer = None

    def _attempt_expired(self, selection: Selection, attempt: "defer.Deferred[Any]") -> None:
        self.attempt_timer = None
        self.expired = selection
        attempt.cancel()

    def _succeeded(self, value: _T, selection: Selection) -> None:
        self.attempt = None
        self._stop_attempt_timer()
        self.balancer.report_ok(selection)
        if self.finished:
            return
        self._finish(CallResult(value, selection.upstream.name, selection.address, list(self.tried)))

    def _failed(self, failure: Failure, selection: Selection) -> None:
        self.attempt = None
        self._stop_attempt_timer()
        if self.expired is selection and failure.check(defer.CancelledError):
            failure = Failure(AttemptTimeout(
                f"{selection.upstream.name} did not answer within {self.options.attempt_timeout} s"
            ))
        if self.finished:
            if not failure.check(defer.CancelledError):
                self.balancer.report_fail(selection, failure, reason="error after the call ended")
            return
        if not failure.check(AttemptTimeout) and not self.options.retryable(failure):
            self.balancer.release(selection)
            self._finish(Failure(AllAttemptsFailed(failure, self.tried, retryable=False)))
            return
        self.balancer.report_fail(
            selection,
            failure,
            address_failure=self.options.address_failure(failure),
            reason=failure.getErrorMessage(),
        )
        self.last_failure = failure
        if self.options.max_retries > 0 and len(self.tried) >= self.options.max_retries:
            self._finish(Failure(AllAttemptsFailed(failure, self.tried)))
            return
        self.previous = selection.upstream
        self.retry_call = self.balancer.clock.callLater(0, self._attempt)

    def _timed_out(self) -> None:
        selection, attempt = self.selection, self.attempt
        self._stop_attempt_timer()
        self._finish(Failure(UpstreamTimeout(f"no answer within {self.options.timeout} s", self.tried)))
        if attempt is not None and selection is not None:
            self.balancer.report_fail(selection, Failure(UpstreamTimeout("timeout", self.tried)), reason="timeout")
            attempt.cancel()

    def _cancel(self, _: "defer.Deferred[CallResult[_T]]") -> None:
        self.finished = True
        self._stop_attempt_timer()
        self.balancer.deadlines.cancel(self)
        if self.retry_call is not None and self.retry_call.active():
            self.retry_call.cancel()
        if self.attempt is not None:
            if self.selection is not None:
                self.balancer.release(self.selection)
            self.attempt.cancel()


# --------------------------------------------------------------------------
# Active health checks.
# --------------------------------------------------------------------------

#: A health probe: ``probe(address)`` fires True when the upstream is healthy.
Probe = Callable[[Address], "defer.Deferred[bool]"]


class HealthChecker(Service):
    """Probe every upstream of a balancer periodically.

    A probe success revives a down upstream and clears the failure count;
    ``fail_after`` consecutive probe failures (a ``False`` result, an error,
    or no answer within ``timeout``) mark an alive upstream down without a
    timed revive, so only a later successful probe (or the all-down rule)
    brings it back.  A down upstream shows as ``probing`` while its probe is
    in flight.  An upstream whose previous probe is still running is skipped.

    Args:
        balancer: the balancer whose upstreams are probed.
        probe: ``probe(address) -> Deferred[bool]`` (e.g. HTTP ``/ping``).
        interval: seconds between rounds.
        fail_after: consecutive failures that mark an upstream down.
        timeout: seconds before a probe is cancelled and counted as failed
            (default: ``interval``).
    """

    def __init__(
        self,
        balancer: Balancer,
        probe: Probe,
        *,
        interval: float,
        fail_after: int = 3,
        timeout: float | None = None,
    ) -> None:
        if interval <= 0 or fail_after < 1:
            raise ValueError("interval must be > 0 and fail_after >= 1")
        self.balancer = balancer
        self.probe = probe
        self.interval = interval
        self.fail_after = fail_after
        self.timeout = interval if timeout is None else timeout
        self.failures: dict[str, int] = {}
        self._inflight: dict[str, defer.Deferred[Any]] = {}
        self._loop: LoopingCall | None = None

    def state(self, name: str) -> UpstreamState:
        """Return the state of upstream ``name`` (alive / down / probing / pending).

        Raises:
            KeyError: no such upstream.
        """
        return self.balancer.get(name).state

    def startService(self) -> None:
        """Start probing now and every ``interval`` seconds."""
        Service.startService(self)
        self._loop = LoopingCall(self.check_all)
        self._loop.clock = self.balancer.clock
        self._loop.start(self.interval, now=True).addErrback(
            lambda failure: _log.failure("health check loop failed", failure)
        )

    def stopService(self) -> "defer.Deferred[None] | None":
        """Stop the loop and cancel probes in flight (their outcome is ignored)."""
        result: defer.Deferred[None] | None = Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        for d in list(self._inflight.values()):
            d.cancel()
        return result

    def check_all(self) -> None:
        """Start one probe for every resolved upstream without one in flight."""
        for upstream in list(self.balancer.upstreams):
            if upstream.name in self._inflight or upstream.state is UpstreamState.PENDING:
                continue
            address = upstream.current_address()
            if address is not None:
                self._check(upstream, address)

    def _check(self, upstream: Upstream, address: Address) -> None:
        if upstream.state is UpstreamState.DOWN:
            self.balancer.set_probing(upstream, True)
        d = defer.maybeDeferred(self.probe, address)
        self._inflight[upstream.name] = d
        timer = self.balancer.clock.callLater(self.timeout, d.cancel)

        def done(result: bool | Failure) -> None:
            if timer.active():
                timer.cancel()
            self._inflight.pop(upstream.name, None)
            if upstream not in self.balancer.upstreams or not self.running:
                return
            healthy = result is True
            self.balancer.set_probing(upstream, False)
            if healthy:
                self.failures[upstream.name] = 0
                self.balancer.revive(upstream, "health check passed")
                return
            count = self.failures.get(upstream.name, 0) + 1
            self.failures[upstream.name] = count
            if count >= self.fail_after and upstream.state is UpstreamState.ALIVE:
                reason = result.getErrorMessage() if isinstance(result, Failure) else "probe said unhealthy"
                self.balancer.mark_down(
                    upstream, f"health check failed {count} times: {reason}", revive=False
                )

        d.addBoth(done)
