"""Prometheus metrics of a proxy worker process and the ``/metrics`` endpoint serving them.

:class:`ProxyMetrics` owns one :class:`prometheus_client.CollectorRegistry` per
process (never the global one) with:

* ``rspamd_tx_proxy_requests_total{outcome}`` — finished client requests by
  outcome: ``scanned`` (the scanner's reply relayed), ``failed`` (an error
  reply), ``policy`` (a failure-policy verdict), ``local`` (``/ping``),
  ``rejected`` (protocol errors, bounds, wrong protocol, idle timeout) and
  ``aborted`` (the client left during the scan);
* ``rspamd_tx_proxy_requests_in_flight`` — requests being scanned;
* ``rspamd_tx_proxy_retries_total{block}`` — attempts beyond the first;
* ``rspamd_tx_proxy_upstream_latency_seconds{block,upstream}`` — latency of
  successful attempts, a histogram;
* ``rspamd_tx_proxy_upstream_failures_total{block,upstream}`` — failed attempts;
* ``rspamd_tx_proxy_upstream_state{block,upstream,state}`` — 1 for the
  upstream's current state (``alive``, ``down``, ``probing``, ``pending``), 0
  for the others; fed by the balancers' observer hooks.

:class:`MetricsResource` renders the registry in the Prometheus text format and
:class:`MetricsService` serves it on a ``bind_socket``-style address (the
worker's ``metrics`` option) with :mod:`twisted.web`.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from rspamd_tx.config.bind import SocketKind, adopt_sockets, open_listen_sockets, parse_bind_line
from rspamd_tx.upstreams.balancer import AttemptOutcome, Balancer, BalancerEvent, StateChange, UpstreamState

__all__ = ["MetricsResource", "MetricsService", "OUTCOMES", "ProxyMetrics"]

log = Logger()

#: Outcomes a finished client request is counted under.
OUTCOMES = ("scanned", "failed", "policy", "local", "rejected", "aborted")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ProxyMetrics:
    """The metrics of one proxy process.

    Args:
        registry: where the metrics live (default: a fresh registry).

    Attributes:
        registry: the registry (render it with :class:`MetricsResource`).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "rspamd_tx_proxy_requests", "Finished client requests by outcome", ["outcome"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "rspamd_tx_proxy_requests_in_flight", "Requests being scanned", registry=self.registry
        )
        self.retries = Counter(
            "rspamd_tx_proxy_retries", "Upstream attempts beyond the first", ["block"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "rspamd_tx_proxy_upstream_latency_seconds", "Latency of successful upstream attempts",
            ["block", "upstream"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.failures = Counter(
            "rspamd_tx_proxy_upstream_failures", "Failed upstream attempts", ["block", "upstream"],
            registry=self.registry,
        )
        self.state = Gauge(
            "rspamd_tx_proxy_upstream_state", "1 for the current state of each upstream",
            ["block", "upstream", "state"], registry=self.registry,
        )
        # Labelled children looked up once: ``labels()`` costs a lock and a
        # dict lookup with tuple building on every call.
        self._outcomes: dict[str, Any] = {}
        self._latencies: dict[tuple[str, str], Any] = {}
        self._failures: dict[tuple[str, str], Any] = {}

    def set_state(self, block: str, upstream: str, state: UpstreamState) -> None:
        """Show ``state`` as the current state of ``upstream`` in ``block``."""
        for candidate in UpstreamState:
            self.state.labels(block, upstream, candidate.value).set(1 if candidate is state else 0)

    def forget(self, block: str, upstream: str) -> None:
        """Drop the state series of an upstream that is no longer configured."""
        for candidate in UpstreamState:
            try:
                self.state.remove(block, upstream, candidate.value)
            except KeyError:
                pass

    def track(self, block: str, balancer: Balancer) -> None:
        """Record the current state of every upstream of ``balancer``."""
        for upstream in balancer.upstreams:
            self.set_state(block, upstream.name, upstream.state)

    def observe(self, block: str, event: BalancerEvent) -> None:
        """A balancer observer hook: count attempts and follow state changes."""
        if isinstance(event, StateChange):
            self.set_state(block, event.upstream, event.new)
        elif isinstance(event, AttemptOutcome):
            key = (block, event.upstream)
            if event.ok:
                histogram = self._latencies.get(key)
                if histogram is None:
                    histogram = self._latencies[key] = self.latency.labels(*key)
                histogram.observe(event.latency)
            else:
                counter = self._failures.get(key)
                if counter is None:
                    counter = self._failures[key] = self.failures.labels(*key)
                counter.inc()

    def request_started(self) -> None:
        """A request went to the scanner."""
        self.in_flight.inc()

    def request_finished(self, outcome: str, block: str | None = None, tried: int = 0, scanned: bool = False) -> None:
        """A client request ended.

        Args:
            outcome: one of :data:`OUTCOMES`.
            block: the upstream block that served it (for retries).
            tried: attempts made (retries are ``tried - 1``).
            scanned: whether :meth:`request_started` was called for it.
        """
        counter = self._outcomes.get(outcome)
        if counter is None:
            if outcome not in OUTCOMES:
                raise ValueError(f"unknown outcome {outcome!r}")
            counter = self._outcomes[outcome] = self.requests.labels(outcome)
        counter.inc()
        if scanned:
            self.in_flight.dec()
        if tried > 1 and block is not None:
            self.retries.labels(block).inc(tried - 1)

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format."""
        return generate_latest(self.registry)


class MetricsResource(Resource):
    """A leaf resource answering every GET with the registry's text format."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        Resource.__init__(self)  # type: ignore[no-untyped-call]
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))  # type: ignore[no-untyped-call]
        return generate_latest(self.registry)


class _MetricsRoot(Resource):
    """``/metrics`` only; anything else is 404."""

    def __init__(self, registry: CollectorRegistry) -> None:
        Resource.__init__(self)  # type: ignore[no-untyped-call]
        self.putChild(b"metrics", MetricsResource(registry))


class _QuietSite(Site):
    """A site that does not log every scrape."""

    def log(self, request: http.Request) -> None:
        """Scrapes are not logged."""


class MetricsService(Service):
    """Serve ``/metrics`` on ``bind_line`` (``bind_socket`` syntax) while running.

    A bind failure is logged and the worker goes on without the endpoint.

    Attributes:
        ports: the listening ports while running.
    """

    def __init__(self, bind_line: str, registry: CollectorRegistry, reactor: Any) -> None:
        self.bind_line = bind_line
        self.reactor = reactor
        self.site = _QuietSite(_MetricsRoot(registry))  # type: ignore[no-untyped-call]
        self.site.noisy = False
        self.ports: list[IListeningPort] = []

    def startService(self) -> None:
        Service.startService(self)
        try:
            specs = parse_bind_line(self.bind_line)
            sockets = open_listen_sockets(specs, {SocketKind.STREAM})
        except Exception as exc:
            log.error("metrics endpoint {line!r} not started: {error}", line=self.bind_line, error=str(exc))
            return
        try:
            self.ports = adopt_sockets(self.reactor, sockets, self.site, None)
        finally:
            for sock in sockets:
                sock.close()
        for listening in self.ports:
            host = listening.getHost()
            where = f"{host.host}:{host.port}" if isinstance(host, (IPv4Address, IPv6Address)) else str(host)
            log.info("metrics endpoint listening on {address}", address=where)

    def stopService(self) -> Deferred[Any]:
        Service.stopService(self)
        ports, self.ports = self.ports, []
        return gatherResults([maybeDeferred(port.stopListening) for port in ports])
