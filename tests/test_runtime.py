"""Tests for rspamd_tx.runtime and rspamd_tx.supervisor."""

from __future__ import annotations

import gc
import os
import platform
import resource
import signal
import socket
import sys
from typing import Any, cast

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest

from rspamd_tx.config.bind import InetListen, SocketKind
from rspamd_tx.config.schema import Diagnostic
from rspamd_tx.config.tree import ConfigError, Location
from rspamd_tx.runtime import (
    GC_YOUNG_THRESHOLD,
    PROCESS_SLOT_ENV,
    WorkerService,
    WorkerTree,
    apply_limits,
    bound_sockets,
    inherited_sockets,
    install_signal_handler,
    process_count,
    process_slot,
    settle_heap,
    tune_malloc,
)
from rspamd_tx.supervisor import ParentWatch, Supervisor

from tests.helpers.net import REPO_ROOT, raw_exchange
from rspamd_tx.config.workers import WorkerCommon

from tests.helpers.pid_worker import FakeConfig, FakeWorker

PID_WORKER = os.path.join(REPO_ROOT, "tests", "helpers", "pid_worker.py")


class Builder:
    """A WorkerBuilder recording what the runtime does with it."""

    def __init__(self, config: Any, worker: Any, reactor: Any) -> None:
        self.worker = worker
        self.factory: Factory[Protocol] = Factory.forProtocol(Protocol)
        self.datagrams: list[DatagramProtocol] = []
        self.serve_datagrams = False
        self.reconfigured: list[tuple[Any, Any]] = []
        self.draining: Deferred[None] = Deferred()
        self.drain_calls = 0

    def stream_factory(self) -> Factory[Protocol]:
        return self.factory

    def datagram_protocol(self) -> DatagramProtocol | None:
        if not self.serve_datagrams:
            return None
        self.datagrams.append(DatagramProtocol())
        return self.datagrams[-1]

    def services(self) -> list[Any]:
        return []

    def reconfigure(self, config: Any, worker: Any) -> None:
        self.reconfigured.append((config, worker))

    def drain(self) -> Deferred[None]:
        self.drain_calls += 1
        return self.draining


class FakeSignals:
    """Records signal handlers instead of installing them."""

    def __init__(self) -> None:
        self.handlers: dict[int, Any] = {}
        self.restored: list[int] = []

    def __call__(self, reactor: Any, signum: int, callback: Any) -> Any:
        self.handlers[signum] = callback
        return lambda: self.restored.append(signum)


def capture_logs(test: unittest.TestCase) -> list[dict[str, Any]]:
    """Every event logged during the test."""
    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    test.addCleanup(globalLogPublisher.removeObserver, observer)
    return events


def loopback_sockets(test: unittest.TestCase, kinds: Any) -> list[socket.socket]:
    sockets = bound_sockets([InetListen("127.0.0.1", 0, "127.0.0.1:0")])(kinds)
    for sock in sockets:
        test.addCleanup(sock.close)
    return sockets


def recorder(service: WorkerService) -> Builder:
    """The :class:`Builder` serving ``service``."""
    assert isinstance(service.builder, Builder)
    return service.builder


class WorkerServiceTests(unittest.TestCase):
    """One worker in this process, on a memory reactor."""

    def make(self, reload: Any = None, datagrams: bool = False,
             drain_timeout: float = 5.0) -> tuple[WorkerService, Any, Any]:
        clock = MemoryReactorClock()
        signals = FakeSignals()
        kinds_seen: list[set[SocketKind]] = []

        def sockets(kinds: Any) -> list[socket.socket]:
            kinds_seen.append(set(kinds))
            return loopback_sockets(self, kinds)

        config = FakeConfig((FakeWorker(1),))

        def build(config: Any, worker: Any, reactor: Any) -> Builder:
            builder = Builder(config, worker, reactor)
            builder.serve_datagrams = datagrams
            return builder

        limited: list[Any] = []
        # FakeConfig and FakeWorker stand in for Config and WorkerConfig.
        service = WorkerService(config, config.workers[0],  # type: ignore[arg-type]
                                build, clock,
                                sockets, reload=reload,
                                drain_timeout=drain_timeout,
                                install_signal=signals, limits=limited.append)
        service.kinds_seen = kinds_seen  # type: ignore[attr-defined]
        service.limited = limited  # type: ignore[attr-defined]
        return service, clock, signals

    def test_listens_with_builder_handlers(self) -> None:
        """Start binds the kinds the builder serves and adopts each socket."""
        service, clock, _ = self.make(datagrams=True)
        service.privilegedStartService()
        service.startService()
        self.assertEqual(service.kinds_seen,  # type: ignore[attr-defined]
                         [{SocketKind.STREAM, SocketKind.DATAGRAM}])
        handlers = [entry[2] for entry in clock.adoptedPorts]
        self.assertEqual(handlers, [recorder(service).factory,
                                    recorder(service).datagrams[0]])
        self.assertEqual(len(recorder(service).datagrams), 1)
        self.assertEqual(service.limited,  # type: ignore[attr-defined]
                         [service.worker])

    def test_failed_bind_retried_on_start(self) -> None:
        """A socket source that fails leaves the worker not listening, so start binds again."""
        service, clock, _ = self.make()
        working = service._sockets_source
        calls: list[Any] = []

        def failing_once(kinds: Any) -> list[socket.socket]:
            calls.append(kinds)
            if len(calls) == 1:
                raise OSError("address in use")
            return working(kinds)

        service._sockets_source = failing_once
        self.assertRaises(OSError, service.privilegedStartService)
        service.startService()
        self.assertEqual(len(calls), 2)
        self.assertEqual(len(clock.adoptedPorts), 1)

    def test_stop_waits_for_drain(self) -> None:
        """Stopping closes listeners, then waits for in-flight work."""
        service, clock, _ = self.make()
        service.startService()
        stopped = service.stopService()
        self.assertEqual(service.ports, [])
        self.assertEqual(recorder(service).drain_calls, 1)
        self.assertNoResult(stopped)
        recorder(service).draining.callback(None)
        self.successResultOf(stopped)
        self.assertFalse(service.running)

    def test_drain_timeout(self) -> None:
        """Work still running after drain_timeout does not block the stop."""
        events = capture_logs(self)
        service, clock, _ = self.make(drain_timeout=5.0)
        service.startService()
        stopped = service.stopService()
        clock.advance(4.9)
        self.assertNoResult(stopped)
        clock.advance(0.2)
        self.successResultOf(stopped)
        self.assertTrue(any("not finished after" in e.get("log_format", "")
                            for e in events))

    def test_sighup_reconfigures(self) -> None:
        """SIGHUP with a good configuration reaches builder.reconfigure."""
        new = FakeConfig((FakeWorker(2),))
        service, _, signals = self.make(reload=lambda: (new, []))
        service.startService()
        signals.handlers[signal.SIGHUP]()
        self.assertEqual(recorder(service).reconfigured,
                         [(new, new.workers[0])])
        self.assertIs(service.config, new)

    def test_sighup_broken_config_kept(self) -> None:
        """A configuration with errors is refused, every error logged."""
        events = capture_logs(self)
        errors = [Diagnostic("error", "bad count", Location("a.inc", 1, 2)),
                  Diagnostic("warning", "unknown key", Location("a.inc", 2, 1)),
                  Diagnostic("error", "bad port", Location("b.inc", 3, 4))]
        service, _, signals = self.make(
            reload=lambda: (FakeConfig((FakeWorker(9),)), errors))
        old = service.config
        service.startService()
        signals.handlers[signal.SIGHUP]()
        self.assertEqual(recorder(service).reconfigured, [])
        self.assertIs(service.config, old)
        logged = [e["diagnostic"] for e in events if "diagnostic" in e]
        self.assertEqual(logged, ["a.inc:1:2: bad count", "b.inc:3:4: bad port"])

    def test_sighup_unreadable_config_kept(self) -> None:
        """A configuration that fails to load is refused with its error."""
        events = capture_logs(self)

        def reload() -> Any:
            raise ConfigError("unterminated string", Location("x.inc", 5, 1))

        service, _, signals = self.make(reload=reload)
        service.startService()
        self.assertFalse(service.reload())
        self.assertEqual(recorder(service).reconfigured, [])
        self.assertIn("x.inc:5:1: unterminated string",
                      [e.get("error") for e in events])

    def test_signal_handler_restored(self) -> None:
        """Stopping puts the previous SIGHUP handler back."""
        service, _, signals = self.make(reload=lambda: (None, []))
        service.startService()
        recorder(service).draining.callback(None)
        service.stopService()
        self.assertEqual(signals.restored, [signal.SIGHUP])

    def test_inherited_sockets(self) -> None:
        """Inherited descriptors become sockets of their own kind."""
        [tcp] = loopback_sockets(self, {SocketKind.STREAM})
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(udp.close)
        fds = [os.dup(tcp.fileno()), os.dup(udp.fileno())]
        sockets = inherited_sockets(fds)({SocketKind.STREAM})
        for sock in sockets:
            self.addCleanup(sock.close)
        self.assertEqual([s.type for s in sockets],
                         [socket.SOCK_STREAM, socket.SOCK_DGRAM])

    def test_inherited_bad_descriptor(self) -> None:
        """A descriptor that is not open is a ConfigError."""
        fd = os.dup(0)
        os.close(fd)
        with self.assertRaises(ConfigError):
            inherited_sockets([fd])({SocketKind.STREAM})

    def test_process_count(self) -> None:
        """An unset count is Rspamd's min(4, max(1, CPUs - 2))."""
        worker = FakeWorker(1, common=WorkerCommon(count=None))
        self.assertEqual([process_count(worker, lambda: n)  # type: ignore
                          for n in (None, 1, 4, 5, 64)], [1, 1, 2, 3, 4])
        worker = FakeWorker(1, common=WorkerCommon(count=7))
        self.assertEqual(process_count(worker), 7)  # type: ignore[arg-type]


class LimitTests(unittest.TestCase):
    """max_files and max_core become resource limits."""

    def test_limits_set(self) -> None:
        """Positive values set soft and hard limits; 0 leaves them alone."""
        calls: list[tuple[int, tuple[int, int]]] = []
        worker = FakeWorker(1, common=WorkerCommon(max_files=4096, max_core=0))
        apply_limits(worker, lambda *args: calls.append(args))  # type: ignore
        self.assertEqual(calls, [(resource.RLIMIT_NOFILE, (4096, 4096))])

    def test_refused_limit_logged(self) -> None:
        """A limit the process may not raise is logged, not raised."""
        events = capture_logs(self)

        def refuse(limit: int, values: tuple[int, int]) -> None:
            raise ValueError("not allowed to raise maximum limit")

        worker = FakeWorker(1, common=WorkerCommon(max_files=0, max_core=1 << 30))
        apply_limits(worker, refuse)  # type: ignore[arg-type]
        self.assertEqual([e.get("name") for e in events if "name" in e],
                         ["max_core"])


class SignalTests(unittest.TestCase):
    """install_signal_handler goes through the reactor."""

    def test_handler_calls_from_thread(self) -> None:
        """The signal schedules the callback with callFromThread."""
        calls: list[Any] = []

        class Recorder:
            def callFromThread(self, f: Any, *args: Any) -> None:
                calls.append(f)

        def callback() -> None:
            """The reloader."""

        before = signal.getsignal(signal.SIGUSR2)
        restore = install_signal_handler(Recorder(), signal.SIGUSR2, callback)
        try:
            os.kill(os.getpid(), signal.SIGUSR2)
        finally:
            restore()
        self.assertEqual(calls, [callback])
        self.assertEqual(signal.getsignal(signal.SIGUSR2), before)


class FakeProcess:
    """The transport of a spawned child on a fake reactor."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str | int] = []

    def signalProcess(self, name: str | int) -> None:
        self.signals.append(name)


class SpawningReactor(MemoryReactorClock):
    """A memory reactor whose spawnProcess records children."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, list[str], dict[int, Any], FakeProcess]] = []
        self.environments: list[dict[str, str]] = []

    def spawnProcess(self, protocol: Any, executable: str, args: list[str],
                     env: Any = None, path: Any = None, uid: Any = None,
                     gid: Any = None, usePTY: bool = False,
                     childFDs: Any = None) -> FakeProcess:
        process = FakeProcess(1000 + len(self.spawned))
        protocol.makeConnection(process)
        self.spawned.append((protocol, args, childFDs, process))
        self.environments.append(dict(env or {}))
        return process


def died(code: int = 1) -> Failure:
    return Failure(ProcessTerminated(exitCode=code))


class SupervisorUnitTests(unittest.TestCase):
    """The supervisor's bookkeeping on a fake reactor."""

    def make(self, count: int = 2) -> tuple[Supervisor, SpawningReactor, Any]:
        fake = SpawningReactor()
        signals = FakeSignals()
        supervisor = Supervisor(
            "proxy#0", count, {SocketKind.STREAM},
            lambda kinds: loopback_sockets(self, kinds),
            lambda fds: ("/bin/child", ["child", ",".join(map(str, fds))]),
            fake, environ={}, restart_delay=1.0, max_restart_delay=4.0,
            stable_after=10.0, stop_timeout=30.0, install_signal=signals)
        supervisor.privilegedStartService()
        supervisor.startService()
        return supervisor, fake, signals

    def test_spawns_count_children_with_sockets(self) -> None:
        """count children each get the listening socket as descriptor 3."""
        supervisor, fake, _ = self.make()
        self.assertEqual(len(fake.spawned), 2)
        for _protocol, args, child_fds, _process in fake.spawned:
            self.assertEqual(args, ["child", "3"])
            self.assertEqual(child_fds[3], supervisor._sockets[0].fileno())
            self.assertEqual((child_fds[0], child_fds[1], child_fds[2]),
                             ("w", 1, 2))

    def test_each_child_has_its_own_datagram_socket(self) -> None:
        """With reuse_port, every child gets its own datagram socket on the one
        address (a restart gets its slot's again) and they all share the
        stream socket; stopping closes them all."""
        fake = SpawningReactor()
        supervisor = Supervisor(
            "fuzzy#0", 3, {SocketKind.STREAM, SocketKind.DATAGRAM},
            bound_sockets([InetListen("127.0.0.1", 0, "127.0.0.1:0")], reuse_port=True),
            lambda fds: ("/bin/child", ["child", ",".join(map(str, fds))]),
            fake, environ={}, install_signal=FakeSignals())
        supervisor.privilegedStartService()
        supervisor.startService()
        stream, datagram = supervisor._sockets
        given = [(child_fds[3], child_fds[4]) for _, _, child_fds, _ in fake.spawned]
        self.assertEqual({streams for streams, _ in given}, {stream.fileno()})
        self.assertEqual(len({datagrams for _, datagrams in given}), 3)
        self.assertEqual(given[0][1], datagram.fileno())
        twins = [sock for slot in supervisor._slot_sockets for sock in slot]
        self.assertEqual({sock.getsockname() for sock in twins if sock.type == socket.SOCK_DGRAM},
                         {datagram.getsockname()})
        fake.spawned[2][0].processEnded(died())
        fake.advance(1.0)
        self.assertEqual(fake.spawned[-1][2][4], given[2][1])
        stopped = supervisor.stopService()
        for protocol, *_ in fake.spawned[:2] + fake.spawned[3:]:
            protocol.processEnded(Failure(ProcessDone(0)))
        self.successResultOf(stopped)
        self.assertTrue(all(sock.fileno() == -1 for sock in twins))

    def test_children_told_their_slot(self) -> None:
        """Each child gets its slot in RSPAMD_TX_PROCESS_SLOT, and a restart keeps the slot."""
        supervisor, fake, _ = self.make(count=2)
        self.assertEqual(
            [env[PROCESS_SLOT_ENV] for env in fake.environments], ["0", "1"]
        )
        protocol = fake.spawned[1][0]
        protocol.processEnded(died())
        fake.advance(1.0)
        self.assertEqual(fake.environments[-1][PROCESS_SLOT_ENV], "1")

    def test_process_slot_from_environment(self) -> None:
        """process_slot reads the slot a supervisor set, 0 when alone or unreadable."""
        self.patch(os, "environ", {PROCESS_SLOT_ENV: "3"})
        self.assertEqual(process_slot(), 3)
        self.patch(os, "environ", {})
        self.assertEqual(process_slot(), 0)
        self.patch(os, "environ", {PROCESS_SLOT_ENV: "x"})
        self.assertEqual(process_slot(), 0)

    def test_restart_with_backoff(self) -> None:
        """A child dying quickly is restarted after 1, 2, 4, 4 seconds."""
        supervisor, fake, _ = self.make(count=1)
        delays = []
        for _ in range(4):
            protocol = fake.spawned[-1][0]
            before = len(fake.spawned)
            protocol.processEnded(died())
            waited = 0.0
            while len(fake.spawned) == before:
                fake.advance(0.5)
                waited += 0.5
            delays.append(waited)
        self.assertEqual(delays, [1.0, 2.0, 4.0, 4.0])

    def test_backoff_resets_after_stable_run(self) -> None:
        """A child that ran for stable_after is restarted after 1 s again."""
        supervisor, fake, _ = self.make(count=1)
        fake.spawned[-1][0].processEnded(died())
        fake.advance(1.0)
        fake.advance(20.0)
        fake.spawned[-1][0].processEnded(died())
        before = len(fake.spawned)
        fake.advance(1.0)
        self.assertEqual(len(fake.spawned), before + 1)

    def test_sighup_forwarded(self) -> None:
        """SIGHUP to the supervisor goes to every child."""
        supervisor, fake, signals = self.make()
        signals.handlers[signal.SIGHUP]()
        self.assertEqual([p.signals for *_, p in fake.spawned],
                         [["HUP"], ["HUP"]])

    def test_stop_terminates_and_waits(self) -> None:
        """Stop sends TERM, waits for every child, restarts none."""
        supervisor, fake, signals = self.make()
        stopped = supervisor.stopService()
        self.assertEqual([p.signals for *_, p in fake.spawned],
                         [["TERM"], ["TERM"]])
        fake.spawned[0][0].processEnded(Failure(ProcessDone(0)))
        self.assertNoResult(stopped)
        fake.spawned[1][0].processEnded(Failure(ProcessDone(0)))
        self.successResultOf(stopped)
        fake.advance(100)
        self.assertEqual(len(fake.spawned), 2)
        self.assertEqual(signals.restored, [signal.SIGHUP])
        self.assertEqual(supervisor._sockets, [])

    def test_stop_kills_after_timeout(self) -> None:
        """Children ignoring TERM get KILL after stop_timeout."""
        supervisor, fake, _ = self.make(count=1)
        stopped = supervisor.stopService()
        fake.advance(29)
        self.assertEqual(fake.spawned[0][3].signals, ["TERM"])
        fake.advance(1)
        self.assertEqual(fake.spawned[0][3].signals, ["TERM", "KILL"])
        fake.spawned[0][0].processEnded(died(-9))
        self.successResultOf(stopped)

    def test_reopen_logs_forwarded(self) -> None:
        """A log reopening goes to every child as SIGUSR1."""
        supervisor, fake, _ = self.make()
        supervisor.reopen_logs()
        self.assertEqual([p.signals for *_, p in fake.spawned],
                         [[signal.SIGUSR1], [signal.SIGUSR1]])

    def test_stop_cancels_pending_restart(self) -> None:
        """A restart scheduled before the stop never happens."""
        supervisor, fake, _ = self.make(count=1)
        fake.spawned[0][0].processEnded(died())
        self.successResultOf(supervisor.stopService())
        fake.advance(10)
        self.assertEqual(len(fake.spawned), 1)


class ReopeningObserver:
    """A log observer counting reopen() calls."""

    def __init__(self) -> None:
        self.reopened = 0

    def __call__(self, event: Any) -> None:
        """Drops events."""

    def reopen(self) -> None:
        self.reopened += 1


class WorkerTreeTests(unittest.TestCase):
    """The root service: stop and log signals."""

    def test_signals_installed_after_startup(self) -> None:
        """TERM, INT and USR1 handlers are set after the reactor's own, and
        the previous ones are back after the stop."""
        fake = MemoryReactorClock()
        settled: list[bool] = []
        tree = WorkerTree(None, fake, settle=lambda: settled.append(True))
        tree.startService()
        found = [(phase, event, t[0]) for phase, events in fake.triggers.items()
                 for event, triggers in events.items() for t in triggers]
        self.assertEqual([(phase, event) for phase, event, _ in found],
                         [("after", "startup")] * 2)
        before = [signal.getsignal(s) for s in
                  (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)]
        for _, _, trigger in found:
            trigger()
        self.assertEqual(settled, [True])
        self.addCleanup(tree.stopService)
        during = [signal.getsignal(s) for s in
                  (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)]
        self.assertNotIn(during[0], before)
        self.assertNotIn(during[2], before)
        tree.stopService()
        self.assertEqual([signal.getsignal(s) for s in
                          (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)],
                         before)

    def test_handlers_kept_until_shutdown_ends(self) -> None:
        """Stopped while the reactor shuts down, the tree keeps its TERM/INT handlers (a second
        signal must not reach the reactor's own) until the shutdown is over."""
        fake = MemoryReactorClock()
        tree = WorkerTree(None, fake, settle=lambda: None)
        tree.startService()
        before = signal.getsignal(signal.SIGTERM)
        tree.install_signals()
        ours = signal.getsignal(signal.SIGTERM)
        self.addCleanup(signal.signal, signal.SIGTERM, before)
        fake.running = True
        tree.stopService()
        self.assertIs(signal.getsignal(signal.SIGTERM), ours)
        [trigger] = fake.triggers["after"]["shutdown"]
        trigger[0]()
        self.assertEqual(signal.getsignal(signal.SIGTERM), before)

    def test_stop_signal_stops_reactor(self) -> None:
        """SIGTERM's callback stops the reactor (once, without error)."""
        fake = MemoryReactorClock()
        fake.running = True
        tree = WorkerTree(None, fake)
        tree._stop_on("SIGTERM")
        self.assertTrue(fake.hasStopped)

    def test_reopen_logs(self) -> None:
        """SIGUSR1's callback reopens the log and reaches supervisors."""
        observer = ReopeningObserver()
        tree = WorkerTree(observer, MemoryReactorClock())  # type: ignore
        forwarded: list[str] = []

        class FakeSupervisor(WorkerTree):
            def reopen_logs(self) -> None:
                forwarded.append("USR1")

        FakeSupervisor().setServiceParent(tree)
        tree.reopen_logs()
        self.assertEqual((observer.reopened, forwarded), (1, ["USR1"]))


class SettleHeapTests(unittest.TestCase):
    """The garbage collector's tuning for serving."""

    def test_freezes_survivors_and_raises_young_threshold(self) -> None:
        """Objects alive before are frozen; the youngest generation waits for
        GC_YOUNG_THRESHOLD allocations, the older thresholds are kept."""
        threshold = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *threshold)
        self.addCleanup(gc.unfreeze)
        survivor = [object()]
        settle_heap()
        self.assertGreater(gc.get_freeze_count(), 0)
        self.assertFalse(any(tracked is survivor for tracked in gc.get_objects()))
        self.assertEqual(gc.get_threshold(),
                         (GC_YOUNG_THRESHOLD, threshold[1], threshold[2]))


    def test_malloc_tuned_on_glibc(self) -> None:
        """On glibc every mallopt setting is accepted."""
        if platform.libc_ver()[0] != "glibc":
            raise unittest.SkipTest("mallopt is glibc's")
        self.assertTrue(tune_malloc())


class ParentWatchTests(unittest.TestCase):
    """A supervised child stops when its supervisor's pipe closes."""

    def test_eof_stops_reactor(self) -> None:
        """End of file on the pipe stops the reactor; data does not."""
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, read_end)
        fake = MemoryReactorClock()
        fake.running = True
        readers: list[Any] = []
        fake.addReader = readers.append  # type: ignore[method-assign]
        fake.removeReader = lambda r: readers.remove(r) if r in readers else None  # type: ignore
        watch = ParentWatch(fake, read_end)
        watch.startService()
        self.assertEqual(readers, [watch])
        os.write(write_end, b"x")
        watch.doRead()
        self.assertFalse(fake.hasStopped)
        os.close(write_end)
        watch.doRead()
        self.assertTrue(fake.hasStopped)
        self.assertEqual(readers, [])


class SupervisedProcessTests(unittest.TestCase):
    """A real supervisor and real child processes on a loopback port."""

    timeout = 60

    def setUp(self) -> None:
        self.control = os.path.abspath(self.mktemp())
        with open(self.control, "w") as f:
            f.write("1")
        self.supervisor = Supervisor(
            "pid#0", 2, {SocketKind.STREAM},
            bound_sockets([InetListen("127.0.0.1", 0, "127.0.0.1:0")]),
            lambda fds: (sys.executable, [
                sys.executable, PID_WORKER, ",".join(map(str, fds)),
                self.control]),
            reactor, environ=dict(os.environ, PYTHONPATH=REPO_ROOT),
            restart_delay=0.2, stop_timeout=20)
        self.supervisor.privilegedStartService()
        self.port = self.supervisor._sockets[0].getsockname()[1]
        self.supervisor.startService()
        self.addCleanup(self.stop)

    def stop(self) -> Deferred[None] | None:
        if self.supervisor.running:
            return self.supervisor.stopService()
        return None

    @inlineCallbacks
    def answer(self) -> Any:
        """One answer from whichever child accepts: (pid, generation)."""
        reply = yield raw_exchange(reactor, "127.0.0.1", self.port, b"")
        pid, generation = reply.split()
        return int(pid), int(generation)

    @inlineCallbacks
    def answers_until(self, done: Any, attempts: int = 400) -> Any:
        """Collect answers until ``done(answers)`` or ``attempts`` are spent."""
        answers: list[tuple[int, int]] = []
        for _ in range(attempts):
            answers.append((yield self.answer()))
            if done(answers):
                break
            yield deferLater(reactor, 0.01, lambda: None)
        return answers

    def child_pids(self) -> set[int | None]:
        return {c.pid for c in self.supervisor.children.values()}

    def all_serving(self) -> Deferred[list[tuple[int, int]]]:
        """Wait until every child has answered (its signal handlers are set)."""
        pids = self.child_pids()
        return self.answers_until(lambda a: {pid for pid, _ in a} == pids)

    @inlineCallbacks
    def test_two_pids_serve_one_port(self) -> Any:
        """count = 2: both child PIDs answer on the one port."""
        pids = self.child_pids()
        self.assertEqual(len(pids), 2)
        answers = yield self.answers_until(
            lambda a: {pid for pid, _ in a} == pids)
        self.assertEqual({pid for pid, _ in answers}, pids)
        self.assertNotIn(os.getpid(), pids)

    @inlineCallbacks
    def test_killed_child_restarted(self) -> Any:
        """A child killed with SIGKILL is replaced by a new serving process."""
        yield self.answers_until(lambda a: len(a) >= 1)
        victim = self.supervisor.children[0].pid
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        for _ in range(500):
            child = self.supervisor.children.get(0)
            if child is not None and child.pid != victim:
                break
            yield deferLater(reactor, 0.02, lambda: None)
        replacement = self.supervisor.children[0].pid
        self.assertNotEqual(replacement, victim)
        answers = yield self.answers_until(
            lambda a: replacement in {pid for pid, _ in a})
        self.assertIn(replacement, {pid for pid, _ in answers})

    @inlineCallbacks
    def test_stop_ends_children_cleanly(self) -> Any:
        """Stopping sends SIGTERM; every child exits with status 0."""
        yield self.all_serving()
        ended: list[Failure] = []
        for child in self.supervisor.children.values():
            original = child.processEnded

            def record(reason: Failure, original: Any = original) -> None:
                ended.append(reason)
                original(reason)

            child.processEnded = record  # type: ignore[method-assign]
        yield self.supervisor.stopService()
        self.assertEqual(len(ended), 2)
        for reason in ended:
            self.assertIsInstance(reason.value, ProcessDone)
        self.assertEqual(self.supervisor.children, {})

    @inlineCallbacks
    def test_sighup_reload_and_refusal(self) -> Any:
        """SIGHUP reaches children: a good config is taken, a broken one not."""
        pids = self.child_pids()
        yield self.all_serving()
        with open(self.control, "w") as f:
            f.write("2")
        self.supervisor.forward_reload()
        answers = yield self.answers_until(
            lambda a: {pid for pid, gen in a if gen == 2} == pids)
        self.assertEqual({pid for pid, gen in answers if gen == 2}, pids)
        for broken in ("error", "raise"):
            with open(self.control, "w") as f:
                f.write(broken)
            self.supervisor.forward_reload()
            yield deferLater(reactor, 0.5, lambda: None)
            answers = yield self.answers_until(lambda a: len(a) >= 10)
            self.assertEqual({gen for _pid, gen in answers}, {2})
        self.assertEqual(self.child_pids(), pids)
