"""Worker processes: listeners, services, graceful stop, reload and signals.

A worker is described by its :class:`WorkerConfig` and served by a
*worker builder* (:class:`WorkerBuilder`) that its module's
``build_worker(config, worker, reactor)`` returns. :class:`WorkerService`
runs one worker in this process: it binds (or inherits) the listening
sockets, hands them to the builder's protocols, runs the builder's services,
reloads the configuration on ``SIGHUP`` and stops gracefully.

``count = N`` with N > 1 runs the worker in N processes under a
:class:`rspamd_tx.supervisor.Supervisor`, which binds the sockets once and
passes them to its children.

The ``twistd`` taps share :class:`TapOptions` (command line, configuration
loading and checking) and :func:`make_tap_service`, which builds the service
tree (:func:`make_worker_tree`, rooted in a :class:`WorkerTree` that sets up
logging and stop signals) on the global reactor.
"""

from __future__ import annotations

import ctypes
import gc
import os
import resource
import signal
import socket
import sys
from collections.abc import Callable, Collection, Sequence
from functools import partial
from types import FrameType
from typing import TYPE_CHECKING, Any, Protocol

from twisted.application.service import IService, MultiService
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.python.components import Componentized
from twisted.python.failure import Failure

from rspamd_tx.config.bind import (
    DEFAULT_BIND_PORT,
    WORKER_DEFAULT_PORTS,
    ListenSpec,
    SocketKind,
    adopt_sockets,
    describe_socket,
    open_listen_sockets,
    parse_bind_lines,
    socket_from_descriptor,
)
from rspamd_tx.config.tree import ConfigError
from rspamd_tx.logging import LogObserver, LogSettings, make_observer

if TYPE_CHECKING:
    from rspamd_tx.config.schema import Diagnostic
    from rspamd_tx.config.workers import Config, WorkerConfig

__all__ = [
    "WorkerBuilder",
    "BuildWorker",
    "ConfigReloader",
    "SocketSource",
    "WorkerService",
    "bound_sockets",
    "inherited_sockets",
    "install_signal_handler",
    "is_error",
    "apply_limits",
    "worker_enabled",
    "process_count",
    "TapOptions",
    "WorkerTree",
    "make_worker_tree",
    "make_tap_service",
    "settle_heap",
    "tune_malloc",
]

log = Logger()

#: Allocations between two collections of the youngest generation once a
#: worker serves (Python's default is 700).
GC_YOUNG_THRESHOLD = 20_000

#: glibc ``mallopt`` parameters and the values a serving worker sets: large
#: blocks (message bodies) come from the heap up to 32 MiB instead of fresh
#: mappings, and freed memory is handed back to the system only beyond
#: 64 MiB free at the top, so a steady load reuses the same pages instead of
#: faulting new ones in for every message.
MALLOC_SETTINGS: tuple[tuple[int, int], ...] = (
    (-1, 64 << 20),  # M_TRIM_THRESHOLD
    (-2, 16 << 20),  # M_TOP_PAD
    (-3, 32 << 20),  # M_MMAP_THRESHOLD
)

#: Environment variable telling a supervised child its slot (0 to count - 1).
PROCESS_SLOT_ENV = "RSPAMD_TX_PROCESS_SLOT"


def process_slot() -> int:
    """This process's slot among the ``count`` processes of its worker.

    A supervisor passes it to each child in :data:`PROCESS_SLOT_ENV`; a worker running
    alone is slot 0. Workers use it to keep per-process files apart (e.g. update spools).
    """
    try:
        return max(0, int(os.environ.get(PROCESS_SLOT_ENV, "0")))
    except ValueError:
        return 0

#: How long a stopping worker waits for in-flight work by default (seconds).
DEFAULT_DRAIN_TIMEOUT = 10.0


class WorkerBuilder(Protocol):
    """What a worker module gives the runtime to serve one worker.

    A builder is cheap to make: it does no I/O until its services start.
    """

    def stream_factory(self) -> IProtocolFactory | None:
        """The factory for stream (TCP, unix) connections, or ``None``."""

    def datagram_protocol(self) -> DatagramProtocol | None:
        """A new protocol for one datagram listener, or ``None``.

        Called once per datagram socket: each call returns a fresh instance.
        """

    def services(self) -> list[IService]:
        """Services to run alongside the listeners (timers, backends, ...)."""

    def reconfigure(self, config: Config, worker: WorkerConfig) -> None:
        """Switch to a new, already checked, configuration."""

    def drain(self) -> Deferred[None]:
        """Fire once in-flight work has finished (listeners are closed)."""


BuildWorker = Callable[["Config", "WorkerConfig", Any], WorkerBuilder]
"""``build_worker(config, worker, reactor)`` of a worker module."""

ConfigReloader = Callable[[], "tuple[Config, list[Diagnostic]]"]
"""Re-reads and checks the configuration; may raise :class:`ConfigError`."""

SocketSource = Callable[[Collection[SocketKind]], list[socket.socket]]
"""Gives the bound listening sockets for the kinds a worker serves."""


def bound_sockets(specs: Sequence[ListenSpec], *, reuse_port: bool = False) -> SocketSource:
    """A socket source that binds ``specs`` (see :func:`open_listen_sockets`,
    which also says what ``reuse_port`` does)."""

    def open_sockets(kinds: Collection[SocketKind]) -> list[socket.socket]:
        return open_listen_sockets(specs, kinds, reuse_port=reuse_port)

    return open_sockets


def inherited_sockets(fds: Sequence[int]) -> SocketSource:
    """A socket source for listening sockets inherited on descriptors ``fds``.

    Their kind is read from the sockets themselves.

    @raise ConfigError: a descriptor is not an open socket.
    """

    def adopt(kinds: Collection[SocketKind]) -> list[socket.socket]:
        return [socket_from_descriptor(fd, f"inherited descriptor {fd}")
                for fd in fds]

    return adopt


def worker_enabled(worker: WorkerConfig) -> bool:
    """Whether a worker runs: ``enabled`` and ``count`` unset or at least 1."""
    return bool(worker.common.active)


def process_count(worker: WorkerConfig,
                  cpus: Callable[[], int | None] = os.cpu_count) -> int:
    """How many processes serve ``worker``: its ``count``, or when unset
    Rspamd's default of min(4, max(1, CPUs - 2))."""
    if worker.common.count is not None:
        return int(worker.common.count)
    return min(4, max(1, (cpus() or 1) - 2))


def apply_limits(worker: WorkerConfig,
                 setrlimit: Callable[[int, tuple[int, int]], None] = resource.setrlimit,
                 ) -> None:
    """Apply the worker's ``max_files`` (``RLIMIT_NOFILE``) and ``max_core``
    (``RLIMIT_CORE``) to this process; 0 leaves a limit unchanged.

    A limit the process may not set is logged, not fatal.
    """
    for name, limit, value in (("max_files", resource.RLIMIT_NOFILE,
                                worker.common.max_files),
                               ("max_core", resource.RLIMIT_CORE,
                                worker.common.max_core)):
        if value <= 0:
            continue
        try:
            setrlimit(limit, (value, value))
        except (OSError, ValueError) as e:
            log.warn("{worker}: cannot set {name} to {value}: {error}",
                     worker=worker.type, name=name, value=value, error=e)


def is_error(diagnostic: Diagnostic) -> bool:
    """Whether a configuration diagnostic is an error (not a warning)."""
    return diagnostic.severity == "error"


def install_signal_handler(reactor: Any, signum: int,
                           callback: Callable[[], object]) -> Callable[[], None]:
    """Run ``callback`` in the reactor thread whenever ``signum`` arrives.

    The Python-level handler only schedules the callback with
    ``reactor.callFromThread``, which also wakes the reactor. Returns a
    function restoring the previous handler.
    """

    def handler(_signum: int, _frame: FrameType | None) -> None:
        reactor.callFromThread(callback)

    previous = signal.signal(signum, handler)

    def restore() -> None:
        signal.signal(signum, previous)

    return restore


SignalInstaller = Callable[[Any, int, Callable[[], object]], Callable[[], None]]


def tune_malloc() -> bool:
    """Apply :data:`MALLOC_SETTINGS` through glibc's ``mallopt``.

    Returns whether every setting took; ``False`` (nothing changed) where the
    C library has no ``mallopt``.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return all(mallopt(parameter, value) == 1 for parameter, value in MALLOC_SETTINGS)


def settle_heap() -> None:
    """Tune the allocator (:func:`tune_malloc`) and the cyclic garbage
    collector for serving, once start-up is over.

    What start-up left alive (modules, configuration, metrics) is collected
    once and then frozen (:func:`gc.freeze`), so later full collections walk
    only what requests allocate; and the youngest generation is collected
    every :data:`GC_YOUNG_THRESHOLD` allocations instead of every 700.
    Reference counting frees almost all of a request's objects at once, so
    this costs little memory and saves collector time and pauses on every
    request.
    """
    tune_malloc()
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, oldest)


class WorkerService(MultiService):
    """One worker served in this process.

    Children are the builder's services. :meth:`privilegedStartService`
    applies the worker's resource limits (``limits``) and takes the listening
    sockets from ``sockets`` (so ``twistd`` binds them before dropping
    privileges); the reactor adopts them. Stopping closes
    the listeners first, then waits for the builder's :meth:`drain` at most
    ``drain_timeout`` seconds, then stops the children.

    With a ``reload`` function, ``SIGHUP`` re-reads the configuration: a new
    configuration without errors goes to ``builder.reconfigure``; one that fails
    is refused, every error logged and the running one kept.

    @ivar builder: the worker's builder.
    @ivar ports: the listening ports while running.
    @ivar config: the configuration in use; @ivar worker: this worker's part.
    """

    def __init__(
        self,
        config: Config,
        worker: WorkerConfig,
        build: BuildWorker,
        reactor: Any,
        sockets: SocketSource,
        *,
        reload: ConfigReloader | None = None,
        worker_index: int = 0,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        install_signal: SignalInstaller = install_signal_handler,
        limits: Callable[[WorkerConfig], None] = apply_limits,
    ) -> None:
        MultiService.__init__(self)
        self._apply_limits = limits
        self.config = config
        self.worker = worker
        self.reactor = reactor
        self.builder = build(config, worker, reactor)
        self.ports: list[IListeningPort] = []
        self.name = f"{worker.type}#{worker_index}"
        self._sockets_source = sockets
        self._sockets: list[socket.socket] = []
        self._listening = False
        self._reload = reload
        self._worker_index = worker_index
        self._drain_timeout = drain_timeout
        self._install_signal = install_signal
        self._restore_signal: Callable[[], None] | None = None
        for child in self.builder.services():
            child.setServiceParent(self)

    def privilegedStartService(self) -> None:
        """Apply the resource limits and take the listening sockets (before
        ``twistd`` drops privileges), then start the children's privileged part.

        @raise ConfigError: a socket cannot be opened, inherited or adopted
            (see :mod:`rspamd_tx.config.bind`); the ones taken are closed.
        """
        self._apply_limits(self.worker)
        self._listen()
        MultiService.privilegedStartService(self)

    def _listen(self) -> None:
        factory = self.builder.stream_factory()
        first_datagram = self.builder.datagram_protocol()
        kinds: set[SocketKind] = set()
        if factory is not None:
            kinds.add(SocketKind.STREAM)
        if first_datagram is not None:
            kinds.add(SocketKind.DATAGRAM)
        self._sockets = self._sockets_source(kinds)
        self._listening = True
        pending = [first_datagram]

        def datagram() -> DatagramProtocol:
            if pending:
                protocol = pending.pop()
                assert protocol is not None
                return protocol
            protocol = self.builder.datagram_protocol()
            assert protocol is not None
            return protocol

        try:
            self.ports = adopt_sockets(
                self.reactor, self._sockets, factory,
                datagram if first_datagram is not None else None)
        except BaseException:
            self._close_sockets()
            self._listening = False
            raise
        for sock in self._sockets:
            log.info("{worker} listening on {address}", worker=self.name,
                     address=describe_socket(sock))

    def startService(self) -> None:
        """Listen (unless :meth:`privilegedStartService` did), install the
        ``SIGHUP`` reload handler when reloading is possible and start the
        children.

        @raise ConfigError: as :meth:`privilegedStartService`.
        """
        if not self._listening:
            self._listen()
        if self._reload is not None and self._restore_signal is None:
            self._restore_signal = self._install_signal(
                self.reactor, signal.SIGHUP, self.reload)
        MultiService.startService(self)

    def reload(self) -> bool:
        """Re-read the configuration and hand it to the builder.

        @return: whether the new configuration was taken.
        """
        if self._reload is None:
            return False
        try:
            config, diagnostics = self._reload()
        except ConfigError as e:
            log.error("{worker}: configuration reload refused: {error}; "
                      "keeping the running configuration",
                      worker=self.name, error=str(e))
            return False
        errors = [d for d in diagnostics if is_error(d)]
        for d in errors:
            log.error("{worker}: {diagnostic}", worker=self.name,
                      diagnostic=str(d))
        if errors:
            log.error("{worker}: configuration reload refused ({count} "
                      "errors); keeping the running configuration",
                      worker=self.name, count=len(errors))
            return False
        same_type = config.workers_of(self.worker.type)
        if self._worker_index >= len(same_type):
            log.error("{worker}: the new configuration has no such worker; "
                      "keeping the running configuration", worker=self.name)
            return False
        worker = same_type[self._worker_index]
        if list(worker.common.bind_socket) != list(self.worker.common.bind_socket):
            log.warn("{worker}: bind_socket changes take effect on restart",
                     worker=self.name)
        if (worker.common.count != self.worker.common.count
                or not worker_enabled(worker)):
            log.warn("{worker}: count and enabled changes take effect on "
                     "restart", worker=self.name)
        self.builder.reconfigure(config, worker)
        self.config, self.worker = config, worker
        log.info("{worker}: configuration reloaded", worker=self.name)
        return True

    def stopService(self) -> Deferred[None]:
        """Stop listening, wait for the builder's drain (at most the drain
        timeout), then stop the children.

        @return: fires with None once the children have stopped; a listener
            that fails to stop does not hold up the rest.
        """
        if self._restore_signal is not None:
            self._restore_signal()
            self._restore_signal = None
        ports, self.ports = self.ports, []
        stopping = [defer.maybeDeferred(p.stopListening) for p in ports]
        d: Deferred[Any] = defer.gatherResults(stopping, consumeErrors=True)
        d.addBoth(lambda _: self._close_sockets())
        d.addCallback(lambda _: self._drain())
        d.addCallback(lambda _: MultiService.stopService(self))
        d.addCallback(lambda _: None)
        return d

    def _drain(self) -> Deferred[None]:
        drained = self.builder.drain()
        drained.addTimeout(self._drain_timeout, self.reactor)

        def timed_out(failure: Failure) -> None:
            failure.trap(defer.TimeoutError, defer.CancelledError)
            log.warn("{worker}: in-flight work not finished after {seconds}s; "
                     "stopping anyway", worker=self.name,
                     seconds=self._drain_timeout)

        drained.addErrback(timed_out)
        return drained

    def _close_sockets(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets = []
        self._listening = False


# -- the command line and the service tree shared by the twistd taps --------

#: The twistd entry point a supervisor re-runs for its children. ``SIGHUP``
#: and ``SIGUSR1`` are ignored until the worker installs its handlers, so a
#: reload or log reopening forwarded while a child starts does not kill it.
TWISTD_ENTRY = ("import signal; signal.signal(signal.SIGHUP, signal.SIG_IGN); "
                "signal.signal(signal.SIGUSR1, signal.SIG_IGN); "
                "from twisted.scripts.twistd import run; run()")


class TapOptions(usage.Options):
    """Command line of a worker tap (``twistd rspamd-proxy``, ...).

    Subclasses set :attr:`worker_type` and :attr:`tapname`. After parsing,
    :attr:`config` is the checked configuration, :attr:`workers` the enabled
    workers of :attr:`worker_type` (with their index among workers of that type
    and their listen specs), :attr:`warnings` the checker's warnings and
    :attr:`log_settings` the logging set-up.

    ``--worker-index`` and ``--inherited-fds`` are internal: a supervisor
    passes them to the processes it spawns.
    """

    worker_type = ""
    tapname = ""

    optParameters = [
        ["config", "c", None,
         "Configuration directory holding local.d/ and override.d/ "
         "(default: the shipped configuration only)"],
        ["log-level", None, None,
         "Log level: error, warning, notice, info, silent or debug "
         "(default: the logging section's level)"],
        ["worker-index", None, None,
         "(internal) which worker of this type a supervised process serves"],
        ["inherited-fds", None, None,
         "(internal) comma-separated listening descriptors passed by the "
         "supervisor"],
    ]
    optFlags = [
        ["json-log", None, "Log JSON lines instead of text"],
    ]

    def __init__(self) -> None:
        usage.Options.__init__(self)
        self["var"] = {}
        self.config: Config | None = None
        self.workers: list[tuple[int, WorkerConfig, list[ListenSpec]]] = []
        self.warnings: list[Diagnostic] = []
        self.log_settings = LogSettings()

    def opt_var(self, value: str) -> None:
        """Set a configuration variable: --var NAME=VALUE (repeatable)"""
        name, sep, text = value.partition("=")
        if not sep or not name:
            raise usage.UsageError(f"--var expects NAME=VALUE, not {value!r}")
        self["var"][name] = text

    def load(self) -> tuple[Config, list[Diagnostic]]:
        """Read and check the configuration named by the options.

        @raise ConfigError: the configuration cannot be read.
        """
        from rspamd_tx.config.loader import load_config
        from rspamd_tx.config.workers import check_config

        return check_config(load_config(self["config"],
                                        variables=dict(self["var"])))

    def postOptions(self) -> None:
        """Load and check the configuration; fill :attr:`config`,
        :attr:`workers`, :attr:`warnings` and :attr:`log_settings`.

        @raise usage.UsageError: the configuration cannot be read, has errors,
            a worker of this type has an unusable or no ``bind_socket``, the
            logging settings are unusable, or the internal supervisor options
            are not numbers.
        """
        if self["config"] is not None:
            self["config"] = os.path.abspath(self["config"])
        if self["inherited-fds"] is not None:
            try:
                self["inherited-fds"] = [
                    int(fd) for fd in self["inherited-fds"].split(",") if fd]
                self["worker-index"] = int(self["worker-index"] or 0)
            except ValueError:
                raise usage.UsageError("--inherited-fds and --worker-index "
                                       "take numbers") from None
        try:
            config, diagnostics = self.load()
        except ConfigError as e:
            raise usage.UsageError(f"invalid configuration:\n{e}") from e
        errors = [str(d) for d in diagnostics if is_error(d)]
        self.warnings = [d for d in diagnostics if not is_error(d)]
        default_port = WORKER_DEFAULT_PORTS.get(self.worker_type,
                                                DEFAULT_BIND_PORT)
        index = -1
        for worker in config.workers:
            if worker.type != self.worker_type:
                continue
            index += 1
            if not worker_enabled(worker):
                continue
            try:
                specs = parse_bind_lines(worker.common.bind_socket,
                                         default_port=default_port)
            except ConfigError as e:
                errors.append(str(e))
                continue
            if not specs:
                errors.append(f"worker {self.worker_type!r} has no bind_socket")
            self.workers.append((index, worker, specs))
        try:
            self.log_settings = LogSettings.from_config(config.logging).override(
                level=self["log-level"], json=self["json-log"])
        except ConfigError as e:
            errors.append(str(e))
        else:
            problem = self.log_settings.problem()
            if problem is not None:
                errors.append(problem)
        if errors:
            raise usage.UsageError("invalid configuration:\n" +
                                   "\n".join(errors))
        if not self.workers:
            raise usage.UsageError(
                f"no enabled {self.worker_type} worker in the configuration "
                f"(check enabled and count in its worker section)")
        if self["inherited-fds"] is not None and self["worker-index"] not in [
                i for i, _w, _s in self.workers]:
            raise usage.UsageError(
                f"--worker-index {self['worker-index']}: no such enabled worker")
        self.config = config

    def child_arguments(self) -> list[str]:
        """The options again, for a supervised child's command line."""
        args: list[str] = []
        if self["config"] is not None:
            args += ["--config", self["config"]]
        for name, value in self["var"].items():
            args += ["--var", f"{name}={value}"]
        if self["json-log"]:
            args.append("--json-log")
        if self["log-level"] is not None:
            args += ["--log-level", self["log-level"]]
        return args


class WorkerTree(MultiService):
    """The root of a worker tap's service tree.

    When attached to a ``twistd`` application it installs ``log_observer``
    as the application's ``ILogObserver``, so the configuration's logging
    settings decide format, destination and level.

    Once the reactor has started (after its own signal set-up), ``SIGTERM``
    and ``SIGINT`` stop the reactor through :func:`install_signal_handler`,
    so a stop by signal is a normal shutdown and the process exits 0; and
    ``SIGUSR1`` reopens the log file (after rotation) and is passed on to the
    children of every supervisor in the tree (their ``reopen_logs``).  Then
    ``settle`` (by default :func:`settle_heap`) tunes the garbage collector.
    """

    def __init__(self, log_observer: LogObserver | None = None,
                 reactor: Any = None, settle: Callable[[], None] = settle_heap) -> None:
        MultiService.__init__(self)
        self.log_observer = log_observer
        self.reactor = reactor
        self._settle = settle
        self._restore_signals: list[Callable[[], None]] = []

    def setServiceParent(self, parent: Any) -> None:
        """Attach to ``parent``; a componentized parent (a ``twistd``
        application) also gets :attr:`log_observer` as its ``ILogObserver``."""
        if self.log_observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.log_observer)
        MultiService.setServiceParent(self, parent)

    def startService(self) -> None:
        """Start the children; with a reactor, install the signal handlers
        (:meth:`install_signals`) and settle the heap once the reactor has
        started."""
        MultiService.startService(self)
        if self.reactor is not None:
            self.reactor.addSystemEventTrigger("after", "startup",
                                               self.install_signals)
            self.reactor.addSystemEventTrigger("after", "startup", self._settle)

    def install_signals(self) -> None:
        """Make ``SIGTERM`` and ``SIGINT`` stop the reactor and ``SIGUSR1``
        reopen the logs."""
        if not self.running or self._restore_signals:
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            name = signal.Signals(signum).name
            self._restore_signals.append(install_signal_handler(
                self.reactor, signum, partial(self._stop_on, name)))
        self._restore_signals.append(install_signal_handler(
            self.reactor, signal.SIGUSR1, self.reopen_logs))

    def _stop_on(self, name: str) -> None:
        log.info("received {signal}, shutting down", signal=name)
        try:
            self.reactor.stop()
        except ReactorNotRunning:
            pass

    def reopen_logs(self) -> None:
        """Reopen the log file and have supervised children do the same."""
        if self.log_observer is not None:
            try:
                self.log_observer.reopen()
            except ConfigError as e:
                log.error("cannot reopen the log: {error}", error=str(e))
        for service in self:
            reopen = getattr(service, "reopen_logs", None)
            if reopen is not None:
                reopen()

    def stopService(self) -> Deferred[None] | None:
        """Restore the signal handlers and stop the children.

        @return: fires once every child has stopped.
        """
        restore, self._restore_signals = self._restore_signals, []

        def undo_all() -> None:
            for undo in restore:
                undo()

        if restore and getattr(self.reactor, "running", False):
            # The reactor is shutting down: a second SIGTERM or SIGINT must
            # still meet our handler (which ignores it), not the reactor's,
            # which would try to stop a reactor that is already stopping.
            self.reactor.addSystemEventTrigger("after", "shutdown", undo_all)
        else:
            undo_all()
        stopped: Deferred[None] | None = MultiService.stopService(self)
        return stopped


def make_tap_service(options: TapOptions, build: BuildWorker) -> WorkerTree:
    """A tap's ``makeService``: :func:`make_worker_tree` on the global reactor.

    The reactor is imported here, when the service is built, so importing a
    tap installs none.
    """
    from twisted.internet import reactor

    return make_worker_tree(options, build, reactor)


def make_worker_tree(options: TapOptions, build: BuildWorker,
                     reactor: Any) -> WorkerTree:
    """The service tree for parsed tap ``options``.

    Each enabled worker of the tap's type becomes a :class:`WorkerService`
    (``count = 1``) or a :class:`rspamd_tx.supervisor.Supervisor` of
    ``count`` processes; a supervised process (``--inherited-fds``) serves
    only its own worker on the inherited sockets.
    """
    from rspamd_tx.supervisor import ParentWatch, Supervisor

    assert options.config is not None
    config = options.config
    tree = WorkerTree(make_observer(options.log_settings), reactor)
    for warning in options.warnings:
        log.warn("{diagnostic}", diagnostic=str(warning))
    inherited = options["inherited-fds"]
    children: list[IService] = []
    for index, worker, specs in options.workers:
        if inherited is not None:
            if index != options["worker-index"]:
                continue
            children.append(WorkerService(
                config, worker, build, reactor, inherited_sockets(inherited),
                reload=options.load, worker_index=index))
            children.append(ParentWatch(reactor))
        elif process_count(worker) > 1:
            probe = build(config, worker, reactor)
            kinds = set()
            if probe.stream_factory() is not None:
                kinds.add(SocketKind.STREAM)
            if probe.datagram_protocol() is not None:
                kinds.add(SocketKind.DATAGRAM)
            children.append(Supervisor(
                f"{worker.type}#{index}", process_count(worker), kinds,
                bound_sockets(specs, reuse_port=True), _child_command(options, index), reactor))
        else:
            children.append(WorkerService(
                config, worker, build, reactor, bound_sockets(specs),
                reload=options.load, worker_index=index))
    for child in children:
        child.setServiceParent(tree)
    return tree


def _child_command(options: TapOptions,
                   index: int) -> Callable[[Sequence[int]], tuple[str, list[str]]]:
    def command(fds: Sequence[int]) -> tuple[str, list[str]]:
        return sys.executable, [
            sys.executable, "-c", TWISTD_ENTRY, "--nodaemon", "--pidfile=",
            options.tapname, *options.child_arguments(),
            "--worker-index", str(index),
            "--inherited-fds", ",".join(str(fd) for fd in fds)]

    return command
