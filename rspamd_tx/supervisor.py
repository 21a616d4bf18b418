"""Run one worker in several processes that share its listening sockets.

The :class:`Supervisor` binds the worker's sockets once and spawns ``count``
children that adopt them (the sockets are passed as descriptors 3, 4, ...
through ``childFDs``).  Stream sockets are shared; an IP datagram socket bound
with ``SO_REUSEPORT`` gets a twin per child (:func:`datagram_twin`), as Rspamd
gives each fuzzy process its own UDP socket, so a datagram wakes one process
only; a twin that cannot be bound is replaced by the shared socket. A child that dies while the supervisor runs is
restarted after a delay that doubles with each quick failure. ``SIGHUP`` is
forwarded to every child (each reloads its own configuration), and so is the
log reopening that ``SIGUSR1`` asks for (:meth:`Supervisor.reopen_logs`).
Stopping the supervisor sends ``SIGTERM`` to every child and waits for all
of them (then ``SIGKILL`` after ``stop_timeout``).

Children watch their standard input, a pipe from the supervisor: when it
closes (the supervisor died) they stop (:class:`ParentWatch`).
"""

from __future__ import annotations

import errno
import os
import signal
import socket
from collections.abc import Callable, Collection, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from rspamd_tx.config.bind import SocketKind, datagram_twin, describe_socket
from rspamd_tx.runtime import PROCESS_SLOT_ENV, SignalInstaller, install_signal_handler

__all__ = ["Supervisor", "ParentWatch", "ChildCommand"]

log = Logger()

ChildCommand = Callable[[Sequence[int]], tuple[str, list[str]]]
"""Given the descriptors a child inherits, its executable and argv."""

#: First descriptor number of inherited listening sockets in a child.
FIRST_CHILD_FD = 3


class _Child(ProcessProtocol):
    """Tracks one child process for the supervisor."""

    def __init__(self, supervisor: Supervisor, slot: int) -> None:
        self.supervisor = supervisor
        self.slot = slot
        self.pid: int | None = None
        self.started_at = supervisor.reactor.seconds()

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]

    def processEnded(self, reason: Failure) -> None:
        self.supervisor._child_ended(self, reason)


class Supervisor(Service):
    """Keep ``count`` child processes serving the same sockets.

    @param count: number of children.
    @param kinds: socket kinds the worker serves (passed to ``open_sockets``).
    @param open_sockets: binds the listening sockets (called once, in
        :meth:`privilegedStartService`).
    @param child_command: builds a child's command line from the descriptor
        numbers it inherits.
    @param environ: the children's environment.
    @param restart_delay: first delay before restarting a dead child; it
        doubles for each child that dies within ``stable_after`` seconds of its
        start, up to ``max_restart_delay``.

    @ivar children: the live children by slot (``pid`` attribute).
    """

    def __init__(
        self,
        name: str,
        count: int,
        kinds: Collection[SocketKind],
        open_sockets: Callable[[Collection[SocketKind]], list[socket.socket]],
        child_command: ChildCommand,
        reactor: Any,
        *,
        environ: dict[str, str] | None = None,
        restart_delay: float = 1.0,
        max_restart_delay: float = 60.0,
        stable_after: float = 10.0,
        stop_timeout: float = 30.0,
        install_signal: SignalInstaller = install_signal_handler,
    ) -> None:
        self.name = name
        self.count = count
        self.kinds = frozenset(kinds)
        self.reactor = reactor
        self.children: dict[int, _Child] = {}
        self._open_sockets = open_sockets
        self._child_command = child_command
        self._environ = dict(os.environ if environ is None else environ)
        self._restart_delay = restart_delay
        self._max_restart_delay = max_restart_delay
        self._stable_after = stable_after
        self._stop_timeout = stop_timeout
        self._install_signal = install_signal
        self._restore_signal: Callable[[], None] | None = None
        self._sockets: list[socket.socket] = []
        self._slot_sockets: list[list[socket.socket]] = []
        self._failures: dict[int, int] = {}
        self._pending_restarts: dict[int, Any] = {}
        self._stopping: Deferred[None] | None = None

    def privilegedStartService(self) -> None:
        """Bind the listening sockets (before ``twistd`` drops privileges).

        @raise ConfigError: a socket cannot be opened.
        """
        self._bind()
        Service.privilegedStartService(self)

    def _bind(self) -> None:
        self._sockets = self._open_sockets(self.kinds)
        for sock in self._sockets:
            log.info("{worker} listening on {address} for {count} processes",
                     worker=self.name, address=describe_socket(sock),
                     count=self.count)
        self._slot_sockets = [list(self._sockets)]
        for _ in range(1, self.count):
            self._slot_sockets.append([self._twin(sock) for sock in self._sockets])

    def _twin(self, sock: socket.socket) -> socket.socket:
        try:
            twin = datagram_twin(sock)
        except OSError as e:
            log.warn("{worker}: cannot open another socket on {address} ({error}); "
                     "the processes share one", worker=self.name,
                     address=describe_socket(sock), error=e.strerror or str(e))
            return sock
        return sock if twin is None else twin

    def startService(self) -> None:
        """Bind the sockets unless already bound, forward ``SIGHUP`` to the
        children and start ``count`` of them.

        @raise ConfigError: a socket cannot be opened.
        """
        if not self._sockets:
            self._bind()
        Service.startService(self)
        self._stopping = None
        self._restore_signal = self._install_signal(
            self.reactor, signal.SIGHUP, self.forward_reload)
        for slot in range(self.count):
            self._spawn(slot)

    def _spawn(self, slot: int) -> None:
        self._pending_restarts.pop(slot, None)
        sockets = self._slot_sockets[slot]
        fds = [FIRST_CHILD_FD + i for i in range(len(sockets))]
        child_fds: dict[int, int | str] = {0: "w", 1: 1, 2: 2}
        for fd, sock in zip(fds, sockets):
            child_fds[fd] = sock.fileno()
        executable, args = self._child_command(fds)
        child = _Child(self, slot)
        environ = {**self._environ, PROCESS_SLOT_ENV: str(slot)}
        self.reactor.spawnProcess(child, executable, args, env=environ,
                                  childFDs=child_fds)
        self.children[slot] = child
        log.info("{worker}: started process {pid} (slot {slot})",
                 worker=self.name, pid=child.pid, slot=slot)

    def _child_ended(self, child: _Child, reason: Failure) -> None:
        if self.children.get(child.slot) is child:
            del self.children[child.slot]
        if self._stopping is not None:
            if not self.children and not self._stopping.called:
                self._stopping.callback(None)
            return
        lived = self.reactor.seconds() - child.started_at
        if lived >= self._stable_after:
            self._failures[child.slot] = 0
        failures = self._failures.get(child.slot, 0)
        delay = min(self._max_restart_delay,
                    self._restart_delay * (2 ** failures))
        self._failures[child.slot] = failures + 1
        how = ("exited" if reason.check(ProcessDone)
               else str(reason.value).strip().rstrip("."))
        log.error("{worker}: process {pid} (slot {slot}) died: {how}; "
                  "restarting in {delay}s", worker=self.name, pid=child.pid,
                  slot=child.slot, how=how, delay=delay)
        self._pending_restarts[child.slot] = self.reactor.callLater(
            delay, self._spawn, child.slot)

    def forward_reload(self) -> None:
        """Send ``SIGHUP`` to every child."""
        log.info("{worker}: reloading {count} processes", worker=self.name,
                 count=len(self.children))
        self._signal_children("HUP")

    def reopen_logs(self) -> None:
        """Send ``SIGUSR1`` to every child (each reopens its log file)."""
        self._signal_children(signal.SIGUSR1)

    def _signal_children(self, sig: str | int) -> None:
        for child in list(self.children.values()):
            try:
                child.transport.signalProcess(sig)  # type: ignore[union-attr]
            except ProcessExitedAlready:
                pass
            except OSError as e:
                if e.errno != errno.ESRCH:
                    raise

    def stopService(self) -> Deferred[None]:
        """Send the children ``SIGTERM`` (``SIGKILL`` after the stop timeout)
        and close the sockets once all have exited.

        @return: fires with None when no child is left.
        """
        Service.stopService(self)
        if self._restore_signal is not None:
            self._restore_signal()
            self._restore_signal = None
        for call in self._pending_restarts.values():
            call.cancel()
        self._pending_restarts.clear()
        stopping: Deferred[None] = Deferred()
        self._stopping = stopping
        if not self.children:
            stopping.callback(None)
        else:
            self._signal_children("TERM")
            killer = self.reactor.callLater(self._stop_timeout, self._kill)
            stopping.addBoth(_cancel_then_pass, killer)
        stopping.addCallback(lambda _: self._close_sockets())
        return stopping

    def _kill(self) -> None:
        log.error("{worker}: {count} processes still running after {seconds}s; "
                  "killing them", worker=self.name, count=len(self.children),
                  seconds=self._stop_timeout)
        self._signal_children("KILL")

    def _close_sockets(self) -> None:
        for sock in {id(sock): sock for slot in self._slot_sockets for sock in slot}.values():
            sock.close()
        self._sockets, self._slot_sockets = [], []


def _cancel_then_pass(result: object, call: Any) -> object:
    if call.active():
        call.cancel()
    return result


class ParentWatch(Service):
    """Stop the reactor when the supervisor's pipe on descriptor ``fd`` closes.

    Run in supervised children so they never outlive their supervisor.
    """

    def __init__(self, reactor: Any, fd: int = 0) -> None:
        self.reactor = reactor
        self.fd = fd

    def fileno(self) -> int:
        """The watched descriptor (the reactor's ``IFileDescriptor``)."""
        return self.fd

    def logPrefix(self) -> str:
        """The prefix of the reactor's log lines about this reader."""
        return "ParentWatch"

    def doRead(self) -> None:
        """Stop the reactor when the pipe reports end of file (the supervisor
        has gone); anything read is ignored."""
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.reactor.removeReader(self)
            log.info("supervisor went away; stopping")
            self.reactor.stop()

    def connectionLost(self, reason: Failure) -> None:
        """Called by the reactor when it drops this reader."""

    def startService(self) -> None:
        """Start watching the descriptor."""
        Service.startService(self)
        os.set_blocking(self.fd, False)
        self.reactor.addReader(self)

    def stopService(self) -> Deferred[None] | None:
        """Stop watching.

        @return: an already fired Deferred.
        """
        Service.stopService(self)
        self.reactor.removeReader(self)
        return defer.succeed(None)
