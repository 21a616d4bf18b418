"""An :class:`~rspamd_tx.proxy.scanning.IScanner` that relays scans to upstream scanners.

:class:`UpstreamScanner` serves the ``upstream`` blocks of a proxy worker
(upstreams-and-proxy.md §4).  Each block gets its own
:class:`~rspamd_tx.upstreams.balancer.Balancer` over its ``hosts`` list
(round-robin unless the line says otherwise, default port 11333, the proxy's
error accounting ``error_time = max_retries × timeout``, ``max_errors =
max_retries − 1``), and optionally a :class:`~rspamd_tx.upstreams.balancer.HealthChecker`
probing ``/ping``.

For each :class:`~rspamd_tx.proxy.scanning.ScanRequest`:

* **routing** (§4.1): ``request.route`` (the client's ``Host``) matched
  case-insensitively against the block names, else the default block (the
  last with ``default = true``); none → ``404 Backend not found``;
* **request** (§4.3): the client's headers in order, without
  ``Content-Length``, ``Transfer-Encoding``, ``Keep-Alive``, ``Connection``,
  ``Key`` and ``Host``; then ``Host: <upstream name>``, ``Connection: close``
  (``keep-alive`` with ``keepalive = true``), ``Settings-ID`` replaced by the
  block's ``settings_id``, the block's ``extra_headers`` replacing same-named
  ones, ``User-Agent`` when absent, ``IP`` (the client address) when absent,
  ``Log-Tag`` per ``log_tag_type`` when absent (Rspamd 3.12+; older scanners
  only store it);
  the body inline with ``POST``; with ``compression`` a non-empty body the
  client did not compress travels as one zstd frame (``Compression: zstd``,
  ``Content-Type: application/octet-stream``) unless the upstream is local
  (``local = true``, or a loopback, link-local, site-local or unix address).
  Rspamd's proxy keeps HTTP-mode bodies in shared memory and so compresses
  only milter traffic; here bodies are always in memory and requests of HTTP
  clients are compressed too;
* **encryption** (httpcrypt.md §5): with a block ``key`` each attempt is an
  HTTPCrypt exchange: the request above (compressed first, without ``Host``
  and ``Connection``) becomes the inner request of an outer ``POST /post``
  whose ``Host`` is the upstream name, the client keypair kept
  like Rspamd's HTTP context (:class:`~rspamd_tx.protocols.httpcrypt.ClientKeys`),
  and the reply is decrypted before anything else looks at it;
* **retries** (§4.2) by the balancer: at most ``max_retries`` attempts (0: no
  limit) on any connection failure, timeout or malformed reply (a reply that
  does not decrypt or decompress included), each attempt bounded by the
  block's ``timeout``; any other HTTP reply ends the scan;
* **reply** (§4.4): ``Content-Length``, ``Connection``, ``Date``, ``Server``,
  ``Key`` and ``Transfer-Encoding`` dropped; a zstd body decompressed (and its
  ``Compression``/``Content-Encoding`` header dropped); other headers kept in order;
* **failures** → :class:`~rspamd_tx.proxy.scanning.ScanFailure` with the status
  Rspamd's proxy answers (``404 Backend not found``, ``408 IO timeout``, ``500
  IO write error: Connection refused``, ``400 IO read error: unexpected EOF``…).

Host names in ``hosts`` are resolved when the scanner starts; a scan arriving
before that finished waits for it instead of failing.

``self_scan`` blocks are not served: a scan routed to one fails
(``BAD_REPLY``, 501).  Rspamd's shared-memory bodies for local upstreams are
not used: bodies always travel inline with ``POST``.

:class:`RequestSender` is the per-attempt part (headers, compression,
encryption, reply decoding) shared with the mirrors of
:mod:`rspamd_tx.proxy.mirrors`.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.address import UNIXAddress
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from rspamd_tx import __version__
from rspamd_tx.config.workers import GlobalOptions, MirrorBlock, ProxyOptions, UpstreamBlock
from rspamd_tx.protocols.compression import (
    CompressionError,
    compress,
    decompress,
    reply_is_compressed,
    without_compression_headers,
)
from rspamd_tx.protocols.http_codec import HttpLimits
from rspamd_tx.protocols.httpcrypt import ClientKeys, EncryptedRequest, HttpCryptError
from rspamd_tx.protocols.keypair import PublicKey
from rspamd_tx.proxy.scanning import (
    FailureClass,
    IScanner,
    ScanFailure,
    ScanReply,
    ScanRequest,
)
from rspamd_tx.upstreams.balancer import (
    Address,
    AllAttemptsFailed,
    AllDownPolicy,
    Balancer,
    BalancerEvent,
    CallResult,
    HealthChecker,
    Limits,
    NoUpstreamAvailable,
    Resolver,
    UpstreamTimeout,
)
from rspamd_tx.upstreams.hosts import DEFAULT_PROXY_PORT, parse_upstreams
from rspamd_tx.upstreams.http_client import (
    BadReply,
    ConnectError,
    ScannerClient,
    ScannerError,
    ScannerResponse,
    ScannerTimeout,
)

__all__ = [
    "Backend",
    "COMPRESSED_CONTENT_TYPE",
    "DEFAULT_USER_AGENT",
    "HealthSettings",
    "RequestSender",
    "TargetBlock",
    "UpstreamObserver",
    "UpstreamScanner",
    "address_is_local",
    "limits_for",
    "request_headers",
    "reply_from_response",
]

log = Logger()

#: ``User-Agent`` sent when the client sent none.
DEFAULT_USER_AGENT = f"rspamd-tx/{__version__}"

#: Client request headers never forwarded (the proxy sets its own or they are hop-by-hop).
_DROPPED_REQUEST = frozenset(
    {"content-length", "transfer-encoding", "keep-alive", "connection", "key", "host"}
)
#: Scanner reply headers the proxy regenerates.
_DROPPED_REPLY = frozenset(
    {"content-length", "connection", "date", "server", "key", "transfer-encoding"}
)
#: ``Content-Type`` of a request body the proxy compressed (Rspamd's proxy sends this).
COMPRESSED_CONTENT_TYPE = "application/octet-stream"
#: Inner-request headers that belong to the outer request of an HTTPCrypt exchange.
_OUTER_ONLY = frozenset({"host", "connection"})

#: An ``upstream`` or a ``mirror`` block: both say how requests to them are transformed.
TargetBlock = UpstreamBlock | MirrorBlock

#: Receives ``(block name, event)`` for every balancer event of every block.
UpstreamObserver = Callable[[str, BalancerEvent], None]


@dataclass(frozen=True)
class HealthSettings:
    """Active ``/ping`` health checks of the upstreams.

    Attributes:
        interval: seconds between probe rounds.
        fail_after: consecutive failed probes that mark an upstream down.
        timeout: seconds a probe may take.
    """

    interval: float = 10.0
    fail_after: int = 3
    timeout: float = 5.0


def limits_for(options: ProxyOptions, global_options: GlobalOptions, timeout: float) -> Limits:
    """The balancer tunables of a block: ``options.upstream`` with the proxy override."""
    tunables = global_options.upstream
    base = Limits(
        max_errors=tunables.max_errors,
        error_time=tunables.error_time,
        revive_time=tunables.revive_time,
        lazy_resolve_time=tunables.lazy_resolve_time,
        resolve_min_interval=tunables.resolve_min_interval,
    )
    if options.max_retries > 0:
        return base.for_proxy(options.max_retries, timeout)
    return base


def request_headers(
    request: ScanRequest,
    block: TargetBlock,
    upstream_name: str,
    *,
    user_agent: str = DEFAULT_USER_AGENT,
    send_client_ip: bool = True,
    compressed: bool = False,
    log_tag_type: str = "session",
) -> list[tuple[str, str]]:
    """The headers sent to ``upstream_name`` of ``block`` for ``request`` (§4.3).

    ``compressed`` adds ``Compression: zstd`` and sets ``Content-Type:
    application/octet-stream`` (the caller compressed the body).  Mirror blocks
    have no ``extra_headers`` or ``keepalive``.
    ``log_tag_type`` (the block's, else the worker's) chooses the ``Log-Tag``
    added when the client sent none: ``session``/``session_tag`` the request's
    log tag, ``queue_id``/``queue-id`` the client's ``Queue-ID`` (else the log
    tag), ``none``/``skip`` nothing.  Header bytes are carried as ISO-8859-1
    text so every byte survives.
    """
    extra_headers: dict[str, str] = getattr(block, "extra_headers", None) or {}
    keepalive: bool = getattr(block, "keepalive", False)
    replaced = _replaced_names(extra_headers, block.settings_id is not None, compressed)
    headers: list[tuple[str, str]] = [
        ("Host", upstream_name),
        ("Connection", "keep-alive" if keepalive else "close"),
    ]
    # First values, as they stand in the output, of the fields whose presence matters.
    seen: dict[str, str] = {}
    names = _NAME_FORMS
    for raw_name, raw_value in request.headers:
        forms = names.get(raw_name)
        if forms is None:
            forms = _name_forms(raw_name)
        name, lower = forms
        if lower in _DROPPED_REQUEST or lower in replaced:
            continue
        value = raw_value.decode("latin-1")
        if lower in _NOTED_REQUEST and lower not in seen:
            seen[lower] = value
        headers.append((name, value))
    if block.settings_id is not None:
        headers.append(("Settings-ID", block.settings_id))
    for name, value in extra_headers.items():
        lower = name.lower()
        if lower in _NOTED_REQUEST and lower not in seen:
            seen[lower] = value
        headers.append((name, value))
    if "user-agent" not in seen:
        headers.append(("User-Agent", user_agent))
    if send_client_ip and request.client_address and "ip" not in seen:
        headers.append(("IP", request.client_address))
    tag = _log_tag(request, seen.get("queue-id"), block.log_tag_type or log_tag_type)
    if tag and "log-tag" not in seen:
        headers.append(("Log-Tag", tag))
    if compressed:
        headers.append(("Content-Type", COMPRESSED_CONTENT_TYPE))
        headers.append(("Compression", "zstd"))
    return headers


#: Header name bytes → the name as text and in lower case, for names seen before.
_NAME_FORMS: dict[bytes, tuple[str, str]] = {}
#: Most names :data:`_NAME_FORMS` keeps.
_NAME_FORMS_KEPT = 4096


def _name_forms(raw_name: bytes) -> tuple[str, str]:
    """A header name as text and in lower case (remembered)."""
    name = raw_name.decode("latin-1")
    forms = (name, name.lower())
    if len(_NAME_FORMS) < _NAME_FORMS_KEPT:
        _NAME_FORMS[raw_name] = forms
    return forms


#: Client headers whose presence changes what :func:`request_headers` adds.
_NOTED_REQUEST = frozenset({"user-agent", "ip", "log-tag", "queue-id"})
_NO_NAMES: frozenset[str] = frozenset()


def _replaced_names(extra_headers: dict[str, str], settings_id: bool, compressed: bool) -> frozenset[str]:
    """Client header names (lower case) that the block's own values replace."""
    if not (extra_headers or settings_id or compressed):
        return _NO_NAMES
    replaced = {name.lower() for name in extra_headers}
    if settings_id:
        replaced.add("settings-id")
    if compressed:
        replaced.add("content-type")
    return frozenset(replaced)


def _log_tag(request: ScanRequest, queue_id: str | None, tag_type: str) -> str:
    if tag_type in ("none", "skip"):
        return ""
    if tag_type in ("queue_id", "queue-id") and queue_id:
        return queue_id
    return request.log_tag


def reply_from_response(
    response: ScannerResponse, upstream: str, tried: Sequence[str]
) -> ScanReply:
    """The :class:`ScanReply` relaying ``response`` (§4.4), already decrypted
    and decompressed by :class:`RequestSender`: the regenerated headers are
    dropped, the others kept in order."""
    headers = tuple(
        (name.encode("latin-1"), value.encode("latin-1"))
        for name, value in response.headers
        if name.lower() not in _DROPPED_REPLY
    )
    return ScanReply(
        status=response.status,
        reason=response.reason.encode("latin-1"),
        headers=headers,
        body=response.body,
        upstream=upstream,
        tried=tuple(tried),
    )


_LOCAL_V6 = (
    ipaddress.ip_network("fe80::/10"),
    ipaddress.ip_network("fec0::/10"),
)


def address_is_local(address: Address) -> bool:
    """Whether Rspamd's proxy treats ``address`` as local: unix sockets,
    127.0.0.0/8, ``::1``, fe80::/10 and fec0::/10.  Host names that are not
    addresses are not local."""
    if isinstance(address, (UNIXAddress, str)):
        return True
    host = address[0] if isinstance(address, tuple) else address.host
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if ip.is_loopback:
        return True
    return ip.version == 6 and any(ip in network for network in _LOCAL_V6)


def _client_compressed(request: ScanRequest) -> bool:
    return any(
        name.lower() in (b"compression", b"content-encoding") for name, _ in request.headers
    )


class RequestSender:
    """Sends a scan request to one upstream address and decodes the reply.

    This is one attempt of an ``upstream`` block and the single attempt of a
    ``mirror``: the headers of :func:`request_headers`; with the block's
    ``compression`` a non-empty body the client did not compress is sent as a
    zstd frame unless the upstream is local (``local = true`` or
    ``is_local(address)``); with the block's ``key`` the request is encrypted
    (HTTPCrypt, outer ``Host`` = upstream name) and the reply decrypted; a zstd
    reply is decompressed (at most ``max_size`` bytes) and its compression
    headers dropped.

    Args:
        client: sends the HTTP request (:class:`ScannerClient` interface).
        keys: the client keypair for encrypted exchanges.
        user_agent: ``User-Agent`` added when the client sent none.
        send_client_ip: add ``IP`` with the client's address when absent.
        is_local: which addresses are local (no compression to them).
    """

    def __init__(
        self,
        client: ScannerClient,
        keys: ClientKeys,
        *,
        user_agent: str = DEFAULT_USER_AGENT,
        send_client_ip: bool = True,
        is_local: Callable[[Address], bool] = address_is_local,
    ) -> None:
        self.client = client
        self.keys = keys
        self.user_agent = user_agent
        self.send_client_ip = send_client_ip
        self.is_local = is_local

    def send(
        self,
        request: ScanRequest,
        block: TargetBlock,
        address: Address,
        upstream_name: str,
        *,
        timeout: float,
        max_size: int,
        log_tag_type: str = "session",
    ) -> Deferred[ScannerResponse]:
        """Send ``request`` to ``address`` (of upstream ``upstream_name`` of ``block``).

        Fires with the plaintext, decompressed reply for any HTTP status;
        fails with a :class:`~rspamd_tx.upstreams.http_client.ScannerError`:
        those of the client, and :class:`BadReply` (500) for a request that
        cannot be encrypted or a reply that does not decrypt or decompress.
        """
        body = request.body
        compressed = False
        if (
            block.compression
            and body
            and not (block.local or self.is_local(address))
            and not _client_compressed(request)
        ):
            try:
                body = compress(body)
            except CompressionError as exc:
                return _failed_send(BadReply(500, f"cannot compress request: {exc}"))
            compressed = True
        headers = request_headers(
            request,
            block,
            upstream_name,
            user_agent=self.user_agent,
            send_client_ip=self.send_client_ip,
            compressed=compressed,
            log_tag_type=log_tag_type,
        )
        target = request.target.decode("latin-1") or "/checkv2"
        if block.key is None:
            sent = self.client.request(address, "POST", target, headers, body, timeout=timeout)
        else:
            try:
                encrypted = self.keys.encrypt_request(
                    "POST",
                    target,
                    [(name, value) for name, value in headers if name.lower() not in _OUTER_ONLY],
                    body,
                    PublicKey.parse(block.key),
                    host=upstream_name,
                    keep_alive=bool(getattr(block, "keepalive", False)),
                )
            except HttpCryptError as exc:
                return _failed_send(BadReply(500, f"cannot encrypt request: {exc}"))
            sent = self.client.request(
                address, encrypted.method, encrypted.target, encrypted.headers, encrypted.body,
                timeout=timeout,
            )
            sent.addCallback(_decrypted, encrypted, max_size)
        return sent.addCallback(_decompressed, max_size)


def _failed_send(error: BadReply) -> Deferred[ScannerResponse]:
    d: Deferred[ScannerResponse] = Deferred()
    d.errback(error)
    return d


def _decrypted(response: ScannerResponse, encrypted: EncryptedRequest, max_size: int) -> ScannerResponse:
    """The inner reply of an encrypted exchange (:class:`BadReply` if it does not open)."""
    try:
        inner = encrypted.decrypt_reply(
            response.status, response.headers, response.body, HttpLimits(max_message=max_size)
        )
    except HttpCryptError as exc:
        raise BadReply(500, f"cannot decrypt reply: {exc}") from None
    return ScannerResponse(inner.status, inner.reason, inner.headers, inner.body)


def _decompressed(response: ScannerResponse, max_size: int) -> ScannerResponse:
    """``response`` with a zstd body inflated (:class:`BadReply` if it does not)."""
    if not reply_is_compressed(response.headers):
        return response
    try:
        body = decompress(response.body, max_size)
    except CompressionError as exc:
        raise BadReply(500, f"cannot decompress reply: {exc}") from None
    return ScannerResponse(
        response.status, response.reason, without_compression_headers(response.headers), body
    )


class Backend:
    """One ``upstream`` block: its balancer, timeout and optional health checker.

    Attributes:
        block: the configuration block.
        name: the block name (routing key).
        balancer: the block's balancer (``None`` for blocks that are not served).
        timeout: I/O timeout of one attempt, seconds.
        unusable: why the block cannot scan (``None`` when it can).
        health: the health checker, when health checks are on.
    """

    def __init__(
        self,
        block: UpstreamBlock,
        options: ProxyOptions,
        global_options: GlobalOptions,
        clock: Any,
        resolver: Resolver | None,
        rng: random.Random | None,
    ) -> None:
        self.block = block
        self.name = block.name
        self.timeout = block.timeout if block.timeout is not None and block.timeout > 0 else options.timeout
        self.health: HealthChecker | None = None
        self.balancer: Balancer | None = None
        self._starting = False
        self._waiters: list[Deferred[None]] = []
        self.unusable: str | None = None
        if block.self_scan:
            self.unusable = "self_scan upstreams are not supported"
        else:
            self.balancer = Balancer(
                parse_upstreams(block.hosts, DEFAULT_PROXY_PORT),
                clock=clock,
                resolver=resolver,
                rng=rng,
                limits=limits_for(options, global_options, self.timeout),
                all_down=AllDownPolicy.REVIVE_ALL,
            )

    def update(self, block: UpstreamBlock, options: ProxyOptions, global_options: GlobalOptions) -> None:
        """Take a new block of the same name, keeping upstream states."""
        self.block = block
        self.timeout = block.timeout if block.timeout is not None and block.timeout > 0 else options.timeout
        if self.balancer is not None and not block.self_scan:
            self.balancer.update(parse_upstreams(block.hosts, DEFAULT_PROXY_PORT))
            self.balancer.limits = limits_for(options, global_options, self.timeout)

    def start(self) -> Deferred[None]:
        """Start the balancer (initial name resolution); fires once that is done.

        Until then :meth:`when_started` makes scans wait instead of failing
        on upstreams whose names are not resolved yet.
        """
        assert self.balancer is not None
        self._starting = True
        started = self.balancer.start()
        started.addBoth(self._started)
        return started

    def _started(self, _: object) -> None:
        self._starting = False
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(None)

    @property
    def starting(self) -> bool:
        """Whether the initial name resolution is still running."""
        return self._starting

    def when_started(self) -> Deferred[None]:
        """A Deferred firing once the initial name resolution has finished."""
        waiter: Deferred[None] = Deferred()
        if self._starting:
            self._waiters.append(waiter)
        else:
            waiter.callback(None)
        return waiter

    def upstream_name(self, address: Address) -> str:
        """The name of the upstream ``address`` belongs to (the address text if none)."""
        assert self.balancer is not None
        for upstream in self.balancer.upstreams:
            if upstream.has_address(address):
                return upstream.name
        return str(address)


def _block_key(name: str) -> str:
    return name.lower()


@implementer(IScanner)
class UpstreamScanner:
    """Scans by relaying to the upstream blocks of a proxy worker.

    Args:
        options: the proxy worker's options (``upstream`` blocks, ``timeout``,
            ``max_retries``, ``max_message``).
        global_options: the global ``options`` (``upstream`` tunables).
        reactor: TCP/unix connections and time.
        client: the HTTP client (default: one on ``reactor``; its reply bound is
            ``max_message``).
        resolver: resolves upstream host names (``None``: only numeric and
            unix upstreams are usable).
        rng: randomness for the balancers.
        health: active health checks, or ``None`` for none (Rspamd has none).
        user_agent: ``User-Agent`` added when the client sent none.
        send_client_ip: add ``IP`` with the client's address when absent
            (default: the worker's ``send_client_ip`` option).
        keys: the client keypair for encrypted upstreams (default: one on
            ``reactor``'s clock, rotated every 120 s like Rspamd's).
        is_local: which addresses are local (never sent compressed bodies).

    Attributes:
        name: ``"upstreams"``.
        sender: performs each attempt (shared with the mirrors).
        backends: block name (lower case) → :class:`Backend`, in block order.
        default: the default backend, if any.
    """

    name = "upstreams"

    def __init__(
        self,
        options: ProxyOptions,
        global_options: GlobalOptions,
        reactor: Any,
        *,
        client: ScannerClient | None = None,
        resolver: Resolver | None = None,
        rng: random.Random | None = None,
        health: HealthSettings | None = None,
        user_agent: str = DEFAULT_USER_AGENT,
        send_client_ip: bool | None = None,
        keys: ClientKeys | None = None,
        is_local: Callable[[Address], bool] = address_is_local,
    ) -> None:
        self.reactor = reactor
        self.options = options
        self.global_options = global_options
        self.client = client if client is not None else ScannerClient(reactor, max_reply=options.max_message)
        self.resolver = resolver
        self.rng = rng
        self.health_settings = health
        self.user_agent = user_agent
        if send_client_ip is None:
            send_client_ip = options.send_client_ip
        self.send_client_ip = send_client_ip
        self.sender = RequestSender(
            self.client,
            keys if keys is not None else ClientKeys(reactor),
            user_agent=user_agent,
            send_client_ip=send_client_ip,
            is_local=is_local,
        )
        self.backends: dict[str, Backend] = {}
        self.default: Backend | None = None
        self._observers: list[UpstreamObserver] = []
        self._started = False
        self._build(options)

    # -- configuration --------------------------------------------------------

    def _blocks(self, options: ProxyOptions) -> list[UpstreamBlock]:
        return [b for b in options.upstreams if b.enabled and not b.disabled]

    def _build(self, options: ProxyOptions) -> None:
        for block in self._blocks(options):
            backend = Backend(
                block, options, self.global_options, self.reactor, self.resolver, self.rng
            )
            self._attach(backend)
            self.backends[_block_key(block.name)] = backend
            if backend.unusable is not None:
                log.error("upstream {name}: {why}; scans routed to it fail", name=block.name, why=backend.unusable)
        self.default = self._default_backend(options)

    def _default_backend(self, options: ProxyOptions) -> Backend | None:
        chosen: Backend | None = None
        for block in self._blocks(options):
            if block.default or (block.default is None and block.self_scan):
                chosen = self.backends[_block_key(block.name)]
        return chosen

    def _attach(self, backend: Backend) -> None:
        balancer = backend.balancer
        if balancer is None:
            return
        name = backend.name

        def relay(event: BalancerEvent) -> None:
            for observer in list(self._observers):
                observer(name, event)

        balancer.observers.append(relay)
        if self.health_settings is not None:
            settings = self.health_settings
            backend.health = HealthChecker(
                balancer,
                self._probe,
                interval=settings.interval,
                fail_after=settings.fail_after,
                timeout=settings.timeout,
            )

    def _probe(self, address: Address) -> Deferred[bool]:
        """Health probe: ``GET /ping`` answered with status 200."""
        timeout = self.health_settings.timeout if self.health_settings is not None else 5.0
        d = self.client.request(
            address, "GET", "/ping", [("Connection", "close"), ("User-Agent", self.user_agent)],
            timeout=timeout,
        )
        return d.addCallback(lambda response: response.status == 200)

    def add_observer(self, observer: UpstreamObserver) -> None:
        """Call ``observer(block name, event)`` for every balancer event of every block."""
        self._observers.append(observer)

    def update(self, options: ProxyOptions, global_options: GlobalOptions | None = None) -> list[HealthChecker]:
        """Switch to new options (SIGHUP): blocks kept by name keep their upstream states.

        Returns the health checkers of blocks that are new (the caller runs
        them); those of removed blocks are stopped here.
        """
        if global_options is not None:
            self.global_options = global_options
        self.options = options
        old = self.backends
        self.backends = {}
        fresh: list[HealthChecker] = []
        for block in self._blocks(options):
            key = _block_key(block.name)
            backend = old.pop(key, None)
            served = not block.self_scan
            if backend is not None and (backend.balancer is not None) == served:
                backend.update(block, options, self.global_options)
            else:
                if backend is not None:
                    self._stop_backend(backend)
                backend = Backend(block, options, self.global_options, self.reactor, self.resolver, self.rng)
                self._attach(backend)
                if backend.balancer is not None and self._started:
                    backend.start()
                if backend.health is not None:
                    fresh.append(backend.health)
            self.backends[key] = backend
        for removed in old.values():
            self._stop_backend(removed)
        self.default = self._default_backend(options)
        return fresh

    def _stop_backend(self, backend: Backend) -> None:
        if backend.balancer is not None:
            backend.balancer.stop()
        if backend.health is not None and backend.health.running:
            backend.health.stopService()

    def health_checkers(self) -> list[HealthChecker]:
        """The health checkers of every block (empty without health checks)."""
        return [b.health for b in self.backends.values() if b.health is not None]

    def balancers(self) -> dict[str, Balancer]:
        """Block name → balancer of every served block."""
        return {b.name: b.balancer for b in self.backends.values() if b.balancer is not None}

    def start(self) -> Deferred[None]:
        """Resolve upstream names and start re-resolve timers; fires when resolved."""
        self._started = True
        starting = [b.start() for b in self.backends.values() if b.balancer is not None]
        settled: Deferred[Any] = DeferredList(starting, consumeErrors=True)
        return settled.addCallback(lambda _: None)

    def stop(self) -> Deferred[None]:
        """Cancel balancer timers and close the client's connections."""
        self._started = False
        for backend in self.backends.values():
            if backend.balancer is not None:
                backend.balancer.stop()
        return self.client.close()

    # -- scanning -------------------------------------------------------------

    def route(self, route: bytes | None) -> Backend | None:
        """The backend for a ``Host`` value (case-insensitive), else the default."""
        if route is not None:
            backend = self.backends.get(route[:511].decode("latin-1").lower())
            if backend is not None:
                return backend
        return self.default

    def scan(self, request: ScanRequest) -> Deferred[ScanReply]:
        """Scan ``request`` on its backend; see :meth:`IScanner.scan`."""
        backend = self.route(request.route)
        if backend is None:
            return _failed(ScanFailure(FailureClass.NO_UPSTREAM, 404, "Backend not found"))
        if backend.balancer is None:
            return _failed(ScanFailure(FailureClass.BAD_REPLY, 501, f"upstream {backend.name}: {backend.unusable}"))
        if backend.starting:
            waiting = backend.when_started()
            return waiting.addCallback(lambda _: self._relay(backend, request))
        return self._relay(backend, request)

    def _relay(self, backend: Backend, request: ScanRequest) -> Deferred[ScanReply]:
        """Send ``request`` through ``backend``'s balancer (names resolved)."""
        assert backend.balancer is not None
        block = backend.block
        timeout = backend.timeout
        max_size = self.options.max_message
        log_tag_type = self.options.log_tag_type

        def attempt(address: Address) -> Deferred[ScannerResponse]:
            return self.sender.send(
                request,
                block,
                address,
                backend.upstream_name(address),
                timeout=timeout,
                max_size=max_size,
                log_tag_type=log_tag_type,
            )

        retries = self.options.max_retries
        overall = timeout * retries if retries > 0 else timeout * 10
        call: Deferred[CallResult[ScannerResponse]] = backend.balancer.call(
            attempt,
            key=request.hash_key,
            size=len(request.body),
            timeout=overall + 1.0,
            max_retries=retries,
            retryable=_scanner_error,
            address_failure=_connect_error,
        )
        return call.addCallbacks(_call_done, _call_failed)


def _scanner_error(failure: Failure) -> bool:
    """Whether an attempt failed in a way worth another upstream."""
    return failure.check(ScannerError) is not None


def _connect_error(failure: Failure) -> bool:
    """Whether an attempt failed to connect (that counts against the address too)."""
    return failure.check(ConnectError) is not None


def _call_done(result: CallResult[ScannerResponse]) -> ScanReply:
    return reply_from_response(result.value, result.upstream, result.tried)


def _call_failed(failure: Failure) -> Failure:
    failure.trap(NoUpstreamAvailable, UpstreamTimeout, AllAttemptsFailed)
    error = failure.value
    assert isinstance(error, Exception)
    return Failure(_scan_failure(error))


def _failed(failure: ScanFailure) -> Deferred[ScanReply]:
    d: Deferred[ScanReply] = Deferred()
    d.errback(failure)
    return d


def _scan_failure(error: Exception) -> ScanFailure:
    """The :class:`ScanFailure` for an error of :meth:`Balancer.call`."""
    tried = tuple(getattr(error, "tried", ()))
    if isinstance(error, NoUpstreamAvailable):
        return ScanFailure(FailureClass.NO_UPSTREAM, 404, "Backend not found", tried)
    if isinstance(error, UpstreamTimeout):
        return ScanFailure(FailureClass.TIMEOUT, 408, "IO timeout", tried)
    assert isinstance(error, AllAttemptsFailed)
    last = error.last_failure.value
    if isinstance(last, ScannerTimeout):
        return ScanFailure(FailureClass.TIMEOUT, last.status, last.reason, tried)
    if isinstance(last, ScannerError):
        return ScanFailure(FailureClass.BAD_REPLY, last.status, last.reason, tried)
    if isinstance(last, CancelledError):
        return ScanFailure(FailureClass.TIMEOUT, 408, "IO timeout", tried)
    return ScanFailure(FailureClass.BAD_REPLY, 500, f"Internal error: {last}", tried)
