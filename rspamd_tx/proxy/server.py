"""The proxy worker as the runtime sees it: :func:`build_worker`.

A :class:`ProxyWorker` wires one ``worker "rspamd_proxy"`` section together:

* an :class:`~rspamd_tx.proxy.upstream_scanner.UpstreamScanner` over its
  ``upstream`` blocks, with ``/ping`` health checks; when the worker has
  ``mirror`` blocks or ``script``\ s it is wrapped in a
  :class:`~rspamd_tx.proxy.mirrors.MirroringScanner` that copies sessions to
  the mirrors and runs the compare scripts, and the listener scans through that;
* the failure policy table of its ``failure_policy { }``;
* the stream listener: with ``milter = no`` the HTTP/legacy listener
  (:mod:`rspamd_tx.proxy.http_listener`); with ``milter = yes`` the milter
  listener (:mod:`rspamd_tx.proxy.milter_listener`), answering the actions the
  configuration's ``actions { }`` registers;
* :class:`~rspamd_tx.metrics.ProxyMetrics` fed by the balancers, served on the
  worker's ``metrics`` address when one is configured;
* with the milter listener, :class:`WhitelistNames`, which resolves the host
  names of ``whitelist`` at start and after each reload, and a watch on its
  map files (:class:`~rspamd_tx.address_lists.MapFilesWatch`): the list is
  read again when one changes.

``reconfigure`` (SIGHUP) hands the new upstream and mirror blocks to the
scanners, which keep the state of upstreams that remain (scripts and parsers
are reloaded), and the new options and policy to the listener.  The first
mirror or script added to a worker that had none takes effect on restart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from rspamd_tx.address_lists import IPAddress, MapFilesWatch, map_files, resolve_names
from rspamd_tx.config.workers import STANDARD_ACTIONS, GlobalOptions, ProxyOptions
from rspamd_tx.metrics import MetricsService, ProxyMetrics
from rspamd_tx.proxy.failure_policy import FailurePolicyTable
from rspamd_tx.proxy.http_listener import HttpListenerFactory
from rspamd_tx.proxy.milter_listener import MilterFactory
from rspamd_tx.proxy.mirrors import MirroringScanner
from rspamd_tx.proxy.upstream_scanner import HealthSettings, UpstreamScanner
from rspamd_tx.upstreams.resolve import make_resolver

if TYPE_CHECKING:
    from rspamd_tx.config.workers import Config, WorkerConfig

__all__ = [
    "ProxyFactory",
    "ProxyWorker",
    "ScannerService",
    "WhitelistNames",
    "build_worker",
]

log = Logger()

class ScannerService(Service):
    """Runs an :class:`UpstreamScanner` (and its mirrors): resolves names on
    start, cancels timers and closes connections on stop."""

    def __init__(self, scanner: UpstreamScanner, mirrors: MirroringScanner | None = None) -> None:
        self.scanner = scanner
        self.mirrors = mirrors

    def startService(self) -> None:
        Service.startService(self)
        self.scanner.start()
        if self.mirrors is not None:
            self.mirrors.start()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        if self.mirrors is not None:
            self.mirrors.stop()
        return self.scanner.stop()


class WhitelistNames(Service):
    """Keeps the milter ``whitelist``'s host names resolved: once at start,
    again after each reload (:meth:`refresh`).  Of overlapping lookups only
    the latest one is used.

    Args:
        factory: the milter listener's factory.
        name_resolver: an ``IHostnameResolver`` (``None``: names stay unresolved).
    """

    def __init__(self, factory: MilterFactory, name_resolver: Any) -> None:
        self.factory = factory
        self.name_resolver = name_resolver
        self._generation = 0

    def startService(self) -> None:
        Service.startService(self)
        self.refresh()

    def refresh(self) -> Deferred[None]:
        """Resolve the factory's whitelist host names and hand it the addresses."""
        self._generation += 1
        generation = self._generation
        names = self.factory.whitelist_names()
        if not names or self.name_resolver is None:
            return succeed(None)

        def use(hosts: dict[str, list[IPAddress]]) -> None:
            if generation == self._generation:
                self.factory.use_hosts(hosts)

        return resolve_names(self.name_resolver, names).addCallback(use)


class ProxyFactory(HttpListenerFactory):
    """An HTTP listener with no upstream: answers ``/ping``; scans get ``404 Backend not found``."""

    def __init__(self, clock: Any) -> None:
        options = ProxyOptions()
        super().__init__(
            UpstreamScanner(options, GlobalOptions(), clock), options, FailurePolicyTable(), clock
        )


def _resolver(reactor: Any) -> Any:
    name_resolver = getattr(reactor, "nameResolver", None)
    return make_resolver(name_resolver) if name_resolver is not None else None


class ProxyWorker:
    """The proxy's :class:`rspamd_tx.runtime.WorkerBuilder`.

    Attributes:
        scanner: the upstream scanner.
        mirrors: ``scanner`` plus mirrors and compare scripts, when the
            worker has any (the listener then scans through it), else ``None``.
        policy: the failure policy table.
        metrics: this process's metrics.
        factory: the stream listener's factory.
        map_files: the watch on the milter ``whitelist``'s map files.
    """

    def __init__(self, config: Config | None, worker: WorkerConfig | None, reactor: Any) -> None:
        self.reactor = reactor
        self.config = config
        self.worker = worker
        options = _proxy_options(worker)
        global_options = config.options if config is not None else GlobalOptions()
        self.options = options
        self.metrics = ProxyMetrics()
        self.policy = FailurePolicyTable.from_options(options.failure_policy)
        self.scanner = UpstreamScanner(
            options,
            global_options,
            reactor,
            resolver=_resolver(reactor),
            health=HealthSettings(),
        )
        self.scanner.add_observer(self.metrics.observe)
        self.mirrors: MirroringScanner | None = None
        if options.mirrors or options.scripts:
            self.mirrors = MirroringScanner(self.scanner, global_options, resolver=_resolver(reactor))
        self._track_upstreams()
        self._health = MultiService()
        for checker in self.scanner.health_checkers():
            self._add_health(checker)
        self._milter = options.milter
        self.factory = self._listener_factory(options)
        self._whitelist_names = (
            WhitelistNames(self.factory, getattr(reactor, "nameResolver", None))
            if isinstance(self.factory, MilterFactory) else None)
        self.map_files = MapFilesWatch(
            self._maps_changed, reactor,
            global_options.map_watch_interval * global_options.map_file_watch_multiplier)
        self.map_files.watch(map_files(options.whitelist) if options.milter else ())

    def _maps_changed(self) -> None:
        """A map file of the milter ``whitelist`` changed: read the list again."""
        update = getattr(self.factory, "update", None)
        if update is not None:
            update(self.options, self.policy)

    def _add_health(self, checker: IService) -> None:
        checker.setServiceParent(self._health)

    def _upstream_names(self) -> set[tuple[str, str]]:
        return {
            (block, upstream.name)
            for block, balancer in self.scanner.balancers().items()
            for upstream in balancer.upstreams
        }

    def _track_upstreams(self) -> None:
        for name, balancer in self.scanner.balancers().items():
            self.metrics.track(name, balancer)

    def _listener_factory(self, options: ProxyOptions) -> IProtocolFactory:
        if options.milter:
            actions = self.config.actions if self.config is not None else STANDARD_ACTIONS
            return MilterFactory(
                self._listener_scanner(), options, self.policy, self.reactor, actions=actions
            )
        return HttpListenerFactory(
            self._listener_scanner(), options, self.policy, self.reactor, metrics=self.metrics
        )

    def _listener_scanner(self) -> UpstreamScanner | MirroringScanner:
        return self.mirrors if self.mirrors is not None else self.scanner

    def stream_factory(self) -> IProtocolFactory:
        return self.factory

    def datagram_protocol(self) -> DatagramProtocol | None:
        return None

    def services(self) -> list[IService]:
        """The scanner, its health checks, the milter whitelist's name lookups and map
        file watch and, with ``metrics`` set, the metrics endpoint."""
        services: list[IService] = [ScannerService(self.scanner, self.mirrors), self._health]
        if self._whitelist_names is not None:
            services += [self._whitelist_names, self.map_files]
        if self.options.metrics:
            services.append(MetricsService(self.options.metrics, self.metrics.registry, self.reactor))
        return services

    def reconfigure(self, config: Config, worker: WorkerConfig) -> None:
        """Take new options: upstream lists swapped keeping state, new policy and listener options."""
        self.config = config
        self.worker = worker
        options = _proxy_options(worker)
        self.options = options
        self.policy = FailurePolicyTable.from_options(options.failure_policy)
        before = self._upstream_names()
        for checker in self.scanner.update(options, config.options):
            self._add_health(checker)
        if self.mirrors is not None:
            self.mirrors.update(options, config.options)
        elif options.mirrors or options.scripts:
            log.warn("mirrors and compare scripts added to a worker without any take effect on restart")
        for checker in list(self._health):
            if checker not in self.scanner.health_checkers():
                checker.disownServiceParent()
        for block, upstream in before - self._upstream_names():
            self.metrics.forget(block, upstream)
        self._track_upstreams()
        update = getattr(self.factory, "update", None)
        if update is not None:
            update(options, self.policy)
        if self._whitelist_names is not None and self._whitelist_names.running:
            self._whitelist_names.refresh()
        self.map_files.watch(map_files(options.whitelist) if self._milter else ())
        if options.milter != self._milter:
            log.warn("switching between milter and HTTP takes effect on restart")

    def drain(self) -> Deferred[None]:
        drain = getattr(self.factory, "drain", None)
        if drain is None:
            return succeed(None)
        result: Deferred[None] = drain()
        return result


def _proxy_options(worker: WorkerConfig | None) -> ProxyOptions:
    if worker is None:
        return ProxyOptions()
    options = worker.options
    if not isinstance(options, ProxyOptions):
        raise TypeError(f"worker {worker.type!r} has no proxy options")
    return options


def build_worker(config: Config | None, worker: WorkerConfig | None, reactor: Any) -> ProxyWorker:
    """The builder serving one ``rspamd_proxy`` worker (defaults when ``config`` is ``None``)."""
    return ProxyWorker(config, worker, reactor)
