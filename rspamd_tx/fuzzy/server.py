"""The fuzzy storage worker as the runtime sees it: :func:`build_worker`.

One ``worker "fuzzy"`` section becomes a :class:`FuzzyWorker`:

* a backend chosen by ``backend``: ``sqlite`` (the default; file from
  ``hashfile``/``database``, else ``dbdir``/``fuzzy.db``, else
  ``fuzzy.db`` in the default ``$DBDIR``) or ``redis``
  (servers from the worker section, else the global ``redis`` section, see
  :meth:`rspamd_tx.config.workers.Config.fuzzy_redis`);
* the :class:`~rspamd_tx.fuzzy.update_queue.UpdateQueue` that stores accepted
  writes every ``sync`` seconds (spool file under ``dbdir``, else next to
  the sqlite file, see :func:`spool_directory`);
* the :class:`~rspamd_tx.fuzzy.storage.FuzzyStorage` pipeline, served by a
  :class:`~rspamd_tx.fuzzy.listeners.FuzzyDatagramProtocol` per UDP socket and
  a :class:`~rspamd_tx.fuzzy.listeners.FuzzyStreamFactory` for TCP on the same
  port;
* replication to ``slaves`` / from ``masters`` when configured
  (:mod:`rspamd_tx.fuzzy.replication`);
* :class:`FuzzyLifecycle`, the one service that starts these in order and
  stops them in reverse (the queue flushes before the backend closes);
* with ``dynamic_keys_map``, a :class:`~rspamd_tx.fuzzy.key_maps.DynamicKeys`
  watcher that hands the map's keypairs to the pipeline whenever it changes
  (files every ``map_watch_interval × map_file_watch_multiplier`` seconds,
  HTTP(S) maps every ``map_watch_interval``);
* with ``metrics``, a :class:`~rspamd_tx.metrics.MetricsService` serving
  the storage's Prometheus registry on ``/metrics``.

Map files named in the address lists (``allow_update``, ``blocked``…,
``skip_hashes``, ``allow_update_keys``) are watched: when one changes the
policy is built again, as on a reload.

``reconfigure`` (``SIGHUP``) resolves the host names of the new address lists
and then swaps keypairs, ACLs and policy in one step (the dynamic keypairs
loaded so far stay; a changed ``dynamic_keys_map`` is watched instead of the
old one); backend and queue settings take effect on restart.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from twisted.application.service import IService, MultiService, Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTCP
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent

from rspamd_tx.address_lists import MapFilesWatch, map_files, resolve_names
from rspamd_tx.config.loader import DEFAULT_DBDIR
from rspamd_tx.config.tree import ConfigError
from rspamd_tx.config.workers import FuzzyOptions
from rspamd_tx.fuzzy.backend import IFuzzyBackend
from rspamd_tx.fuzzy.key_maps import DynamicKeys
from rspamd_tx.fuzzy.listeners import FuzzyDatagramProtocol, FuzzyStreamFactory
from rspamd_tx.fuzzy.ratelimit import IPAddress
from rspamd_tx.fuzzy.replication import (
    Replication,
    ReplicationMaster,
    ReplicationSlave,
    build_replication,
)
from rspamd_tx.fuzzy.sqlite_backend import SqliteFuzzyBackend
from rspamd_tx.fuzzy.storage import FuzzyStorage, host_names
from rspamd_tx.fuzzy.update_queue import SPOOL_NAME, UpdateQueue
from rspamd_tx.metrics import MetricsService
from rspamd_tx.runtime import process_slot

if TYPE_CHECKING:
    from rspamd_tx.config.workers import Config, WorkerConfig

__all__ = ["FuzzyLifecycle", "FuzzyWorker", "build_worker", "make_backend",
           "spool_directory", "spool_file_name"]

log = Logger()


def make_backend(config: Config, options: FuzzyOptions, reactor: Any) -> IFuzzyBackend:
    """The backend ``options`` select; no I/O happens until it is started.

    sqlite without ``hashfile``, ``database`` or ``dbdir`` uses
    ``fuzzy.db`` in the default ``$DBDIR``.

    :raises ConfigError: redis without servers, or an unsupported backend.
    """
    if options.backend == "redis":
        # txredisapi installs the global reactor when imported: only when needed
        from rspamd_tx.fuzzy.redis_backend import RedisFuzzyBackend

        servers = config.fuzzy_redis(options)
        if servers is None:
            raise ConfigError('worker "fuzzy": backend redis needs servers '
                              "(in the worker or a redis section)")
        try:
            return RedisFuzzyBackend(
                reactor=reactor, clock=reactor,
                servers=servers.servers or None,
                read_servers=servers.read_servers or None,
                write_servers=servers.write_servers or None,
                prefix=options.prefix, db=servers.db, password=servers.password,
                username=servers.username, timeout=servers.timeout, lifetime=options.expire)
        except ValueError as error:
            raise ConfigError(f'worker "fuzzy": {error}') from error
    if options.backend == "sqlite":
        path = options.sqlite_path or os.path.join(DEFAULT_DBDIR, "fuzzy.db")
        return SqliteFuzzyBackend(path, reactor=reactor, lifetime=options.expire)
    raise ConfigError(f'worker "fuzzy": backend {options.backend!r} is not supported')


def spool_file_name(slot: int) -> str:
    """The update spool of the process in ``slot``: each of ``count`` processes keeps its own."""
    if slot == 0:
        return SPOOL_NAME
    stem, dot, suffix = SPOOL_NAME.rpartition(".")
    return f"{stem}.{slot}{dot}{suffix}"


def spool_directory(options: FuzzyOptions) -> str:
    """Where the update queue spools: ``dbdir``, else the sqlite file's
    directory, else the default ``$DBDIR``."""
    if options.dbdir:
        return options.dbdir
    path = options.hashfile or (options.database if options.backend == "sqlite" else None)
    if path:
        return os.path.dirname(os.path.abspath(path))
    return DEFAULT_DBDIR


class FuzzyLifecycle(Service):
    """Starts and stops the worker's parts in order.

    Start: open the backend, resolve the host names of the address lists and
    switch the pipeline to them, start replication, start the update queue
    (replaying its spool), refresh the hash count now and every ``sync``.
    Stop, in reverse: the count timer, the queue (which stores or spools what
    it holds), replication, then the backend is closed.

    Attributes:
        ready: fires with ``True`` once started, or ``False`` when a step
            failed (the failure is logged); renewed at each start.
    """

    name = "fuzzy-storage"

    def __init__(self, worker: FuzzyWorker) -> None:
        self.worker = worker
        self.ready: Deferred[bool] = Deferred()
        self._counting: LoopingCall | None = None
        self._starting: Deferred[None] | None = None

    def startService(self) -> None:
        Service.startService(self)
        worker = self.worker
        if self.ready.called:
            self.ready = Deferred()
        start = getattr(worker.backend, "start", None)
        d: Deferred[Any] = defer.maybeDeferred(start) if start is not None else defer.succeed(None)
        d.addCallback(lambda _: worker.apply_options(worker.options))
        d.addCallback(lambda _: [service.startService() for service in worker.replicating()])
        d.addCallback(lambda _: worker.queue.startService())
        d.addCallback(lambda _: self._start_counting())

        def done(result: object) -> None:
            self._starting = None
            if isinstance(result, Failure):
                log.failure("the fuzzy storage did not start", result)
            self.ready.callback(not isinstance(result, Failure))

        self._starting = d.addBoth(done)

    def _start_counting(self) -> None:
        if not self.running:
            return
        self._counting = LoopingCall(self.worker.storage.refresh_count)
        self._counting.clock = self.worker.reactor
        self._counting.start(self.worker.options.sync, now=True).addErrback(
            lambda failure: log.failure("hash count refresh stopped", failure))

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        if self._starting is None:
            return self._stop()
        stopped: Deferred[None] = Deferred()
        self._starting.addCallback(lambda _: self._stop().chainDeferred(stopped))
        return stopped

    def _stop(self) -> Deferred[None]:
        if self._counting is not None and self._counting.running:
            self._counting.stop()
        self._counting = None
        worker = self.worker

        def logged(what: str) -> Any:
            return lambda failure: log.failure("{what} failed", failure, what=what)

        def stop(service: ReplicationMaster | ReplicationSlave) -> Callable[[object], Any]:
            return lambda _: service.stopService() if service.running else None

        d: Deferred[Any] = (defer.maybeDeferred(worker.queue.stopService)
                            if worker.queue.running else defer.succeed(None))
        d.addErrback(logged("stopping the update queue"))
        for service in reversed(worker.replicating()):
            d.addCallback(stop(service))
            d.addErrback(logged("stopping replication"))
        d.addCallback(lambda _: worker.backend.close())
        d.addErrback(logged("closing the fuzzy backend"))
        return d.addCallback(lambda _: None)


class FuzzyWorker:
    """The fuzzy storage's :class:`rspamd_tx.runtime.WorkerBuilder`.

    Attributes:
        options: the worker's options in use.
        backend, queue, storage: the parts described in the module docstring.
        registry: Prometheus registry of the storage's metrics.
        lifecycle: the :class:`FuzzyLifecycle` service.
        key_maps: the ``dynamic_keys_map`` watcher (one child service, or none).
        map_files: the watch on the address lists' map files.
    """

    def __init__(self, config: Config, worker: WorkerConfig, reactor: Any,
                 registry: CollectorRegistry | None = None) -> None:
        options = worker.options
        if not isinstance(options, FuzzyOptions):
            raise ConfigError(f"worker {worker.type!r} is not a fuzzy storage")
        self.config = config
        self.worker = worker
        self.options = options
        self.reactor = reactor
        self.registry = registry if registry is not None else CollectorRegistry()
        self.backend = make_backend(config, options, reactor)
        self.queue = UpdateQueue(self.backend, clock=reactor, sync=options.sync,
                                 spool_path=os.path.join(spool_directory(options),
                                                         spool_file_name(process_slot())))
        self.storage = FuzzyStorage(options, self.backend, self.queue, reactor,
                                    registry=self.registry,
                                    queue_depth=lambda: float(self.queue.depth))
        self.queue.add_flush_hook(lambda batch, revision: self.storage.refresh_count())
        self.replication: Replication = build_replication(
            options, self.backend, self.queue, reactor, registry=self.registry)
        self.factory = FuzzyStreamFactory(self.storage, reactor, options.tcp_timeout)
        self.lifecycle = FuzzyLifecycle(self)
        self._generation = 0
        self.key_maps = MultiService()
        self._watch_key_map(options.dynamic_keys_map)
        global_options = config.options
        self.map_files = MapFilesWatch(
            self._maps_changed, reactor,
            global_options.map_watch_interval * global_options.map_file_watch_multiplier)
        self.map_files.watch(_map_paths(options))

    def _maps_changed(self) -> None:
        """A map file of the address lists changed: build the policy again."""
        self.apply_options(self.options).addErrback(
            lambda failure: log.failure("reloading changed maps failed", failure))

    def _watch_key_map(self, url: str | None) -> None:
        """Load the keypairs of ``url`` (``dynamic_keys_map``) from now on,
        instead of any map watched before; ``None``: no dynamic keys."""
        for old in list(self.key_maps):
            if isinstance(old, DynamicKeys) and old.url == url:
                return
            old.disownServiceParent()
        if url is None:
            self.storage.use_dynamic_keys(())
            return
        options = self.config.options
        agent = (Agent(self.reactor) if url.startswith(("http://", "https://"))
                 and IReactorTCP.providedBy(self.reactor) else None)
        DynamicKeys(url, self.storage.use_dynamic_keys, self.reactor,
                    interval=options.map_watch_interval,
                    file_interval=options.map_watch_interval * options.map_file_watch_multiplier,
                    agent=agent).setServiceParent(self.key_maps)

    def stream_factory(self) -> FuzzyStreamFactory:
        """The TCP factory (one for every stream socket of the worker)."""
        return self.factory

    def datagram_protocol(self) -> FuzzyDatagramProtocol:
        """A new UDP protocol on the shared pipeline."""
        return FuzzyDatagramProtocol(self.storage)

    def services(self) -> list[IService]:
        """The lifecycle service, the ``dynamic_keys_map`` watcher, the watch on
        the address lists' map files, and the ``/metrics`` endpoint when
        ``metrics`` is set."""
        services: list[IService] = [self.key_maps, self.map_files, self.lifecycle]
        if self.options.metrics:
            services.append(MetricsService(self.options.metrics, self.registry, self.reactor))
        return services

    def replicating(self) -> list[ReplicationMaster | ReplicationSlave]:
        """The replication services this worker runs (master and/or slave)."""
        return [service for service in (self.replication.master, self.replication.slave)
                if service is not None]

    def statistics(self) -> dict[str, Any]:
        """The storage statistics (Rspamd's ``fuzzystat`` shape), the queue depth and
        the replication state when replicating."""
        return {**self.storage.stats.as_dict(), "queue_depth": self.queue.depth,
                **({"replication": self.replication.stats()} if self.replicating() else {})}

    def apply_options(self, options: FuzzyOptions) -> Deferred[None]:
        """Resolve the host names of ``options`` and then switch the pipeline to it.

        Of several overlapping calls only the latest one takes effect.
        """
        self._generation += 1
        generation = self._generation
        resolver = getattr(self.reactor, "nameResolver", None)
        names = host_names(options)
        resolved: Deferred[dict[str, list[IPAddress]]] = (
            resolve_names(resolver, names) if names and resolver is not None
            else defer.succeed({}))

        def swap(hosts: dict[str, list[IPAddress]]) -> None:
            if generation != self._generation:
                return
            self.storage.reconfigure(options, hosts)
            self.factory.timeout = options.tcp_timeout
            self.options = options

        return resolved.addCallback(swap)

    def reconfigure(self, config: Config, worker: WorkerConfig) -> None:
        """Take a reloaded configuration: keys, ACLs and policy switch together
        once the new host names are resolved (see :meth:`apply_options`)."""
        options = worker.options
        if not isinstance(options, FuzzyOptions):
            log.error("reload: worker {type!r} is not a fuzzy storage; ignored", type=worker.type)
            return
        if (options.backend, options.sqlite_path, config.fuzzy_redis(options), options.prefix,
                options.sync, options.expire) != (
                self.options.backend, self.options.sqlite_path,
                self.config.fuzzy_redis(self.options), self.options.prefix,
                self.options.sync, self.options.expire):
            log.warn("fuzzy backend, sync and expire changes take effect on restart")
        self.config, self.worker = config, worker
        self._watch_key_map(options.dynamic_keys_map)
        self.map_files.watch(_map_paths(options))
        self.apply_options(options).addErrback(
            lambda failure: log.failure("fuzzy reconfiguration failed", failure))

    def drain(self) -> Deferred[None]:
        """Store what the queue holds, then re-read the hash count."""
        d: Deferred[Any] = defer.maybeDeferred(self.queue.flush)
        return d.addCallback(lambda _: self.storage.refresh_count())


def _map_paths(options: FuzzyOptions) -> set[str]:
    """The local map files of the worker's address and key lists."""
    return map_files(options.allow_update, options.blocked, options.delay_whitelist,
                     options.ratelimit_whitelist, options.skip_hashes, options.allow_update_keys)


def build_worker(config: Config, worker: WorkerConfig, reactor: Any) -> FuzzyWorker:
    """The builder serving one ``fuzzy`` worker."""
    return FuzzyWorker(config, worker, reactor)
