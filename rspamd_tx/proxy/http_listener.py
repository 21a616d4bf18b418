"""The proxy's HTTP listener: Rspamd's scan protocol and the legacy RSPAMC/SPAMC one.

One :class:`HttpProxyProtocol` per client connection owns its own
:class:`~rspamd_tx.protocols.http_codec.RequestParser`; the shared
configuration (scanner, options, failure policy, metrics, clock) lives on the
:class:`HttpListenerFactory`.  Each connection carries one request and is
closed after the reply, as Rspamd does (every reply says ``Connection: close``).

* ``/ping`` (any method, case-insensitive, leading ``/`` optional) is answered
  here: ``200``, ``text/plain``, ``pong\\r\\n``.
* Every other request is a scan: its headers are relayed unchanged (order,
  case, duplicates such as several ``Rcpt``) with the body, method and URL to
  the :class:`~rspamd_tx.proxy.scanning.IScanner`; ``Host`` picks the upstream
  block.  The scanner's reply goes back with its status, reason, headers and
  body byte-exact and its ``Content-Type``; ``Connection``, ``Server``,
  ``Date`` and ``Content-Length`` are ours.
* Legacy ``CHECK``/``SYMBOLS`` requests (``RSPAMC/…`` or ``SPAMC/…``) are
  scanned as ``/checkv2`` and the JSON result is converted to the legacy text
  (:mod:`rspamd_tx.protocols.legacy_reply`); a non-JSON reply is relayed as
  HTTP, as Rspamd's proxy does.
* A failed scan is answered per the failure policy: ``tempfail`` with
  Rspamd's error reply (the failure's status and reason, empty ``text/plain``
  body: ``404 Backend not found``, ``408 IO timeout``, ``500 IO write error:
  …``), the other actions with a synthetic verdict
  (:func:`~rspamd_tx.proxy.failure_policy.synthetic_result`).
* The first bytes are sniffed (:mod:`rspamd_tx.protocols.sniff`): milter or TLS
  at this port is logged as the configuration mistake it is and the connection
  closed without a reply.
* Bounds: the body is limited to ``max_message`` (a larger one is an
  ``oversize`` failure for the policy, by default ``413 Request entity too
  large``), the header count and size by :class:`~rspamd_tx.protocols.http_codec.HttpLimits`
  (``431``), malformed requests get ``400 HTTP parser error: …``; a client
  silent for the worker ``timeout`` while sending its request gets ``408 IO
  timeout``.  Every such close is logged with the client address.  Broken
  legacy requests are closed without a reply, as Rspamd does.
* Requests the scanner would not read from the body are not relayed: an
  HTTPCrypt request (``Key`` header: the listener holds no keypair) is closed
  without a reply, as Rspamd closes requests it cannot decrypt; one naming a
  local ``File``, ``Path`` or ``Shm`` source (header or query parameter) gets
  ``403`` — relaying it would let any client make the scanner read its files.

One log line per request names the session tag, the client, the upstreams
tried, the action and score, the status and the duration.

On a real reactor :meth:`HttpListenerFactory.adopt_stream_port` serves a
listening descriptor with :class:`~rspamd_tx.upstreams.http_client.StreamPort`
(less work per connection than Twisted's TCP transport); the listener works
the same over any transport.
"""

from __future__ import annotations

import ipaddress
import json
import random
from email.utils import formatdate
from functools import lru_cache
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IAddress, IListeningPort
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from rspamd_tx import __version__
from rspamd_tx.config.workers import ProxyOptions
from rspamd_tx.metrics import ProxyMetrics
from rspamd_tx.protocols.http_codec import (
    Data,
    EndOfMessage,
    HttpLimits,
    HttpProtocolError,
    LegacyVariant,
    Request,
    RequestParser,
    encode_response_head,
)
from rspamd_tx.protocols.legacy_reply import legacy_reply
from rspamd_tx.protocols.sniff import SNIFF_LIMIT, Kind, classify
from rspamd_tx.proxy.failure_policy import FailurePolicyTable, synthetic_result
from rspamd_tx.proxy.scanning import (
    FailureAction,
    FailureClass,
    IScanner,
    ScanFailure,
    ScanReply,
    ScanRequest,
)
from rspamd_tx.upstreams.balancer import Deadlines
from rspamd_tx.upstreams.http_client import adopt_stream_port, write_now

__all__ = [
    "HttpListenerFactory",
    "HttpProxyProtocol",
    "PONG",
    "SERVER_NAME",
    "address_text",
    "hash_key",
]

log = Logger()

PONG = b"pong\r\n"
SERVER_NAME = f"rspamd-tx/{__version__}"

_SNIFF_MISTAKES = {
    Kind.MILTER: (
        "milter protocol sent to the HTTP port: point the MTA at a worker with "
        "milter = yes, or set milter = yes on this one"
    ),
    Kind.TLS: "TLS handshake sent to the plain-text HTTP port: the proxy does not speak TLS",
}


def address_text(address: IAddress) -> str:
    """The client address as the ``IP`` header and logs show it (``1.2.3.4:port``, ``[::1]:port``)."""
    if isinstance(address, IPv4Address):
        return f"{address.host}:{address.port}"
    if isinstance(address, IPv6Address):
        return f"[{address.host}]:{address.port}"
    if isinstance(address, UNIXAddress):
        name = address.name
        return str(name.decode("utf-8", "replace")) if isinstance(name, bytes) else str(name or "unix")
    return str(address)


def hash_key(address: IAddress) -> bytes:
    """The ``hash:`` balancing key of a client: its raw IP bytes (unix peers: 127.0.0.1)."""
    if isinstance(address, (IPv4Address, IPv6Address)):
        return _packed_host(address.host)
    return _LOCALHOST_PACKED


_LOCALHOST_PACKED = ipaddress.ip_address("127.0.0.1").packed


@lru_cache(maxsize=4096)
def _packed_host(host: str) -> bytes:
    """The raw bytes of an address text (zone dropped); the text itself when it is none."""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).packed
    except ValueError:
        return host.encode("latin-1", "replace")


#: Bytes of the connection's start kept to quote a bad request line in the log.
_PREFIX_KEPT = 200
#: How most connections start; :func:`~rspamd_tx.protocols.sniff.classify` calls it HTTP.
_USUAL_START = b"POST /"


class _DateCache:
    """The ``Date`` header text of the last whole second a reply was made in."""

    def __init__(self) -> None:
        self.second: int | None = None
        self.text = ""

    def text_for(self, seconds: float) -> str:
        """``Date`` for the time ``seconds`` (RFC 7231 IMF-fixdate)."""
        second = round(seconds * 1_000_000) // 1_000_000
        if second != self.second:
            self.text = formatdate(second, usegmt=True)
            self.second = second
        return self.text


def _session_tag() -> str:
    """Six hex digits naming a connection in the logs (not a secret)."""
    return f"{random.getrandbits(24):06x}"


def _path(target: str) -> str:
    return target.split("?", 1)[0].lstrip("/").lower()


#: Request headers (and query parameters) that make a scanner read a local
#: file or shared memory segment instead of the body (http-protocol.md §3).
_LOCAL_SOURCES = ("file", "path", "shm")


#: Request headers the listener looks at itself: encryption, local sources, routing.
_SCREENED = frozenset({"key", "host", *_LOCAL_SOURCES})


def _query_source(target: str) -> str | None:
    """The local source a request target's query names (``file``, ``path``, ``shm``), if any."""
    _, _, query = target.partition("?")
    for parameter in query.split("&"):
        key = parameter.split("=", 1)[0].lower()
        if key in _LOCAL_SOURCES:
            return key
    return None


#: What :func:`_screen` finds: the headers as bytes, whether a ``Key`` is there,
#: the first local source header and the first ``Host`` value.
_Screened = tuple[tuple[tuple[bytes, bytes], ...], bool, str | None, str | None]


def _screen(request: Request) -> _Screened:
    """One pass over a request's headers: their bytes for the scanner, and what
    the listener decides on (``Key``, the first local source, the first ``Host``)."""
    relayed: list[tuple[bytes, bytes]] = []
    encrypted = False
    source: str | None = None
    host: str | None = None
    names = _NAME_FORMS
    for name, value in request.headers:
        forms = names.get(name)
        if forms is None:
            forms = _name_forms(name)
        raw_name, lower = forms
        if lower in _SCREENED:
            if lower == "key":
                encrypted = True
            elif lower == "host":
                if host is None:
                    host = value
            elif source is None:
                source = lower
        relayed.append((raw_name, value.encode("latin-1")))
    return tuple(relayed), encrypted, source, host


#: Header name → its bytes and its lower-case form, for names seen before.
_NAME_FORMS: dict[str, tuple[bytes, str]] = {}
#: Most names :data:`_NAME_FORMS` keeps.
_NAME_FORMS_KEPT = 4096


def _name_forms(name: str) -> tuple[bytes, str]:
    """The bytes and the lower-case form of a header name (remembered)."""
    forms = (name.encode("latin-1"), name.lower())
    if len(_NAME_FORMS) < _NAME_FORMS_KEPT:
        _NAME_FORMS[name] = forms
    return forms


class HttpProxyProtocol(Protocol):
    """One client connection: sniff, parse one request, answer it, close."""

    factory: HttpListenerFactory

    def __init__(self) -> None:
        self._head = b""
        self._prefix = b""
        self._kind: Kind | None = None
        self._parser: RequestParser | None = None
        self._request: Request | None = None
        self._route: str | None = None
        self._body: list[bytes] = []
        self._scan: Deferred[ScanReply] | None = None
        self._closed = False
        self._answered = False
        self._started = 0.0
        self._peer: IAddress | None = None
        self.tag = _session_tag()
        self.client = "unknown"

    # -- connection events ------------------------------------------------------

    def connectionMade(self) -> None:
        factory = self.factory
        factory.connections.add(self)
        assert self.transport is not None
        self._peer = self.transport.getPeer()
        self.client = address_text(self._peer)
        self._started = factory.clock.seconds()
        self._parser = RequestParser(factory.limits())
        self._arm_timer()

    def dataReceived(self, data: bytes) -> None:
        if self._answered or self._closed or self._scan is not None:
            return
        self._receive(data)
        if not (self._answered or self._closed or self._scan is not None):
            # Still waiting for the rest of the request: the client has
            # another ``timeout`` to send it.
            self._arm_timer()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        self._cancel_timer()
        scan, self._scan = self._scan, None
        if scan is not None:
            log.info("client {client} went away during the scan", client=self.client, log_tag=self.tag)
            scan.cancel()
        self.factory.connection_closed(self)

    # -- parsing ----------------------------------------------------------------

    def _receive(self, data: bytes) -> None:
        if len(self._prefix) < _PREFIX_KEPT:
            self._prefix += data[: _PREFIX_KEPT - len(self._prefix)]
        if self._kind is None:
            if not self._head and data.startswith(_USUAL_START):
                # What classify() says of these bytes, without looking at them.
                self._kind = Kind.HTTP
            else:
                self._head += data
                kind = classify(self._head)
                if kind is None and len(self._head) < SNIFF_LIMIT:
                    return
                self._kind = kind if kind is not None else Kind.UNKNOWN
                if self._kind in _SNIFF_MISTAKES:
                    self._reject(_SNIFF_MISTAKES[self._kind], reply=None)
                    return
                data, self._head = self._head, b""
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        assert self._parser is not None
        try:
            events = self._parser.feed(data)
        except HttpProtocolError as exc:
            self._protocol_error(exc)
            return
        for event in events:
            if type(event) is Data:
                self._body.append(event.chunk)
            elif type(event) is Request:
                self._request = event
            elif type(event) is EndOfMessage:
                self._cancel_timer()
                request, body = self._request, b"".join(self._body)
                self._body = []
                assert request is not None
                self._dispatch(request, body)
                return

    def _legacy_connection(self) -> bool:
        return self._kind is Kind.LEGACY or (self._request is not None and self._request.legacy is not None)

    def _protocol_error(self, exc: HttpProtocolError) -> None:
        if exc.status == 413:
            failure = ScanFailure(FailureClass.OVERSIZE, 413, "Request entity too large")
            log.warn(
                "client {client}: message larger than max_message ({limit} bytes)",
                client=self.client, limit=self.factory.options.max_message, log_tag=self.tag,
            )
            self._answer_failure(failure, self._request, outcome_if_error="rejected")
            return
        if self._legacy_connection():
            self._reject(f"bad legacy request: {exc.reason}", reply=None)
            return
        if self._request is None:
            why = f"unsupported request {self._first_line()!r} ({exc.reason})"
        else:
            why = f"bad request: {exc.reason}"
        self._reject(why, reply=(exc.status, f"HTTP parser error: {exc.reason}"))

    def _first_line(self) -> bytes:
        """The start of the connection's first line, as far as it was kept."""
        return self._prefix.lstrip(b"\r\n").split(b"\n", 1)[0].rstrip(b"\r")

    # -- dispatch ---------------------------------------------------------------

    def _dispatch(self, request: Request, body: bytes) -> None:
        legacy = request.legacy
        if legacy is None and _path(request.target) == "ping":
            self._write_reply(200, "OK", b"text/plain", (), PONG)
            self._finish("local", request, status=200)
            return
        headers, encrypted, source, host = _screen(request)
        if encrypted:
            self._reject("encrypted (HTTPCrypt) request: no keypair to decrypt it", reply=None)
            return
        if source is None:
            source = _query_source(request.target)
        if source is not None:
            self._reject(
                f"refusing to relay a scan of a local {source} named by the client",
                reply=(403, "Local sources are not relayed"),
            )
            return
        route = host if legacy is None else None
        self._route = route
        assert self._peer is not None
        scan_request = ScanRequest(
            headers=headers,
            body=body,
            method=b"POST" if legacy is not None else request.method.encode("ascii"),
            target=request.target.encode("latin-1") or b"/checkv2",
            route=route.encode("latin-1") if route is not None else None,
            hash_key=hash_key(self._peer),
            log_tag=self.tag,
            client_address=self.client,
        )
        metrics = self.factory.metrics
        if metrics is not None:
            metrics.request_started()
        scan = maybeDeferred(self.factory.scanner.scan, scan_request)
        self._scan = scan
        scan.addCallbacks(self._scanned, self._scan_failed)
        scan.addErrback(self._answering_failed)

    def _scanned(self, reply: ScanReply) -> None:
        self._scan = None
        if self._closed:
            self._count("aborted", scanned=True)
            return
        request = self._request
        assert request is not None
        content_type = reply.content_type()
        if request.legacy is not None and b"json" in content_type.lower():
            try:
                payload = legacy_reply(request.legacy.variant, reply.result())
            except ValueError:
                log.warn("cannot parse results from {upstream}; relaying them as they are",
                         upstream=reply.upstream, log_tag=self.tag)
            else:
                self._write(payload)
                self._finish("scanned", request, status=reply.status, reply=reply, scanned=True)
                return
        extra = tuple(
            (n.decode("latin-1"), v.decode("latin-1"))
            for n, v in reply.headers
            if n.lower() != b"content-type"
        )
        self._write_reply(
            reply.status, reply.reason.decode("latin-1"), content_type or None, extra, reply.body
        )
        self._finish("scanned", request, status=reply.status, reply=reply, scanned=True)

    def _scan_failed(self, failure: Failure) -> None:
        self._scan = None
        if self._closed or failure.check(CancelledError):
            self._count("aborted", scanned=True)
            return
        if isinstance(failure.value, ScanFailure):
            scan_failure = failure.value
        else:
            log.failure("scanner failed unexpectedly", failure, log_tag=self.tag)
            scan_failure = ScanFailure(FailureClass.BAD_REPLY, 500, "Internal error")
        self._answer_failure(scan_failure, self._request, outcome_if_error="failed", scanned=True)

    def _answering_failed(self, failure: Failure) -> None:
        log.failure("answering the scan failed", failure, log_tag=self.tag)

    def _answer_failure(
        self,
        failure: ScanFailure,
        request: Request | None,
        *,
        outcome_if_error: str,
        scanned: bool = False,
    ) -> None:
        action = self.factory.policy.action_for(failure)
        legacy = request.legacy.variant if request is not None and request.legacy is not None else None
        if action is FailureAction.TEMPFAIL:
            self._write_reply(failure.status, failure.reason, b"text/plain", (), b"")
            self._finish(outcome_if_error, request, status=failure.status, failure=failure, scanned=scanned)
            return
        result = synthetic_result(action, failure)
        if legacy is not None or (request is None and self._kind is Kind.LEGACY):
            variant = legacy if legacy is not None else LegacyVariant.RSPAMC
            self._write(legacy_reply(variant, result))
        else:
            self._write_reply(200, "OK", b"application/json", (), json.dumps(result).encode("utf-8"))
        self._finish("policy", request, status=200, failure=failure, result=result, scanned=scanned)

    # -- replies and closing ----------------------------------------------------

    def _write_reply(
        self,
        status: int,
        reason: str,
        content_type: bytes | None,
        extra: tuple[tuple[str, str], ...],
        body: bytes,
    ) -> None:
        """Answer with an HTTP reply: our ``Connection``, ``Server``, ``Date`` and
        ``Content-Length``, then ``content_type`` and ``extra``, then ``body``."""
        headers = [
            ("Connection", "close"),
            ("Server", SERVER_NAME),
            ("Date", self.factory.dates.text_for(self.factory.clock.seconds())),
            ("Content-Length", "0"),
        ]
        if content_type is not None:
            headers.append(("Content-Type", content_type.decode("latin-1")))
        headers.extend(extra)
        self._write(encode_response_head(status, reason, headers, len(body)), body)

    def _write(self, *parts: bytes) -> None:
        self._answered = True
        if self.transport is not None and not self._closed:
            write_now(self.transport, *parts)
            self.transport.loseConnection()

    def _reject(self, why: str, reply: tuple[int, str] | None) -> None:
        """Close after a protocol problem, with Rspamd's error reply when ``reply`` is given."""
        self._cancel_timer()
        log.warn("closing connection from {client}: {why}", client=self.client, why=why, log_tag=self.tag)
        self._count("rejected")
        if reply is not None:
            status, reason = reply
            self._write_reply(status, reason, b"text/plain", (), b"")
        else:
            self._answered = True
            if self.transport is not None:
                self.transport.loseConnection()

    def _count(self, outcome: str, scanned: bool = False, block: str | None = None, tried: int = 0) -> None:
        metrics = self.factory.metrics
        if metrics is not None:
            metrics.request_finished(outcome, block=block, tried=tried, scanned=scanned)

    def _finish(
        self,
        outcome: str,
        request: Request | None,
        *,
        status: int,
        reply: ScanReply | None = None,
        failure: ScanFailure | None = None,
        result: dict[str, Any] | None = None,
        scanned: bool = False,
    ) -> None:
        duration = self.factory.clock.seconds() - self._started
        tried: tuple[str, ...] = ()
        action, score = "-", "-"
        if reply is not None:
            tried = reply.tried or (reply.upstream,)
            action, score = reply.verdict_text()
        if failure is not None:
            tried = failure.tried
            action = f"failed ({failure.kind.value})"
        if result is not None:
            action = f"{result['action']} (policy, {failure.kind.value if failure else '-'})"
            score = str(result["score"])
        if request is None:
            method = target = "-"
        else:
            method = request.method if request.legacy is None else request.method + " " + request.legacy.protocol
            target = request.target or "/checkv2"
        log.info(
            "{client} {method} {target}: upstreams [{tried}], action {action}, score {score},"
            " status {status}, {duration:.3f}s",
            client=self.client, method=method, target=target, tried=", ".join(tried),
            action=action, score=score, status=status, duration=duration, log_tag=self.tag,
        )
        block = None
        if len(tried) > 1 and (reply is not None or failure is not None):
            # Only retries are counted per block.
            block = _block_of(self.factory.scanner, self._route)
        self._count(outcome, scanned=scanned, block=block, tried=len(tried))

    # -- idle timeout -----------------------------------------------------------

    def _arm_timer(self) -> None:
        timeout = self.factory.options.timeout
        if timeout > 0:
            self.factory.deadlines.set(self, timeout, self._timed_out)

    def _cancel_timer(self) -> None:
        self.factory.deadlines.cancel(self)

    def _timed_out(self) -> None:
        if self._answered or self._closed:
            return
        self._reject(
            f"IO timeout: no complete request within {self.factory.options.timeout:g} s",
            reply=(408, "IO timeout"),
        )


def _block_of(scanner: IScanner, host: str | None) -> str | None:
    """The upstream block name a request with ``Host`` ``host`` (``None``: none, or
    a legacy request) went to, when the scanner can tell."""
    route = getattr(scanner, "route", None)
    if route is None:
        return None
    backend = route(host.encode("latin-1") if host is not None else None)
    return getattr(backend, "name", None)


class HttpListenerFactory(ServerFactory[HttpProxyProtocol]):
    """Shared state of the HTTP listener's connections.

    Args:
        scanner: scans the requests.
        options: the proxy worker's options (``timeout``, ``max_message``).
        policy: the failure policy table.
        clock: time (``IReactorTime``).
        metrics: counters to feed, if any.
        limits: parser bounds; ``max_message`` is always taken from ``options``.

    Attributes:
        connections: open connections.
        dates: the ``Date`` header text, computed once per second.
        deadlines: the idle timeouts of the connections, on one timer.
    """

    noisy = False

    def __init__(
        self,
        scanner: IScanner,
        options: ProxyOptions,
        policy: FailurePolicyTable,
        clock: Any,
        *,
        metrics: ProxyMetrics | None = None,
        limits: HttpLimits | None = None,
    ) -> None:
        self.scanner = scanner
        self.options = options
        self.policy = policy
        self.clock = clock
        self.metrics = metrics
        self._limits = limits if limits is not None else HttpLimits()
        self._connection_limits: HttpLimits | None = None
        self.dates = _DateCache()
        self.deadlines = Deadlines(clock)
        self.connections: set[HttpProxyProtocol] = set()
        self._drained: list[Deferred[None]] = []

    def buildProtocol(self, addr: IAddress | None) -> HttpProxyProtocol:
        """A fresh protocol (with its own parser) for one connection."""
        protocol = HttpProxyProtocol()
        protocol.factory = self
        return protocol

    def limits(self) -> HttpLimits:
        """Parser bounds for a new connection (``max_message`` from the options).

        The bounds are built once and shared while ``max_message`` stays the same.
        """
        cached = self._connection_limits
        if cached is None or cached.max_message != self.options.max_message:
            cached = self._connection_limits = HttpLimits(
                max_message=self.options.max_message,
                max_header_count=self._limits.max_header_count,
                max_line=self._limits.max_line,
                max_header_section=self._limits.max_header_section,
            )
        return cached

    def adopt_stream_port(self, reactor: Any, fileno: int, family: int) -> IListeningPort:
        """Serve this factory on (a duplicate of) the listening descriptor ``fileno``.

        See :func:`~rspamd_tx.upstreams.http_client.adopt_stream_port`.
        """
        return adopt_stream_port(reactor, fileno, family, self)

    def update(self, options: ProxyOptions, policy: FailurePolicyTable) -> None:
        """Use new options and policy for connections from now on."""
        self.options = options
        self.policy = policy

    def connection_closed(self, connection: HttpProxyProtocol) -> None:
        """Forget a closed connection; fire :meth:`drain` waiters when none is left."""
        self.connections.discard(connection)
        if not self.connections:
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)

    def drain(self) -> Deferred[None]:
        """Fire when no connection is open any more."""
        if not self.connections:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._drained.append(d)
        return d
