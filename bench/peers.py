"""The processes a benchmark measures: our daemons, their CPU and memory.

* :func:`start_ours` runs ``twistd -n --pidfile= TAP -c DIR --var …`` (``TAP``
  is ``rspamd-proxy`` or ``fuzzy-storage``) on a private ``--config``
  directory whose ``local.d`` the caller writes; logs go to a file at
  ``info`` level, as Rspamd's do.
* :func:`memory` reads ``VmRSS``/``VmHWM`` from ``/proc/PID/status``;
  :func:`reset_peak` resets ``VmHWM`` (``clear_refs`` 5) so a later reading
  is the peak of what came after; :func:`cpu_seconds` sums the CPU time of
  processes; :func:`rspamd_worker_pid` finds a worker of a real Rspamd.

Real Rspamd and Redis are started with :func:`tests.peers.rspamd.start_rspamd`
and :func:`tests.peers.redis.start_redis`.
Everything binds to 127.0.0.1 on ports chosen at run time; every ``stop``
is bounded (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, error, protocol, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.python.failure import Failure

__all__ = [
    "Daemon",
    "StartError",
    "children_of",
    "cpu_seconds",
    "memory",
    "reset_peak",
    "rspamd_worker_pid",
    "start_ours",
    "tcp_accepts",
    "wait_until",
]

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_POLL = 0.2


class StartError(Exception):
    """A daemon exited or was not ready in time.

    ``str()`` is the reason followed by the last few lines of the daemon's
    output; :attr:`tail` holds more of it.
    """

    def __init__(self, reason: str, tail: str) -> None:
        super().__init__(reason, tail)
        self.reason = reason
        self.tail = tail

    def __str__(self) -> str:
        lines = [line.strip() for line in self.tail.splitlines() if line.strip()]
        return f"{self.reason}; output ends: {' | '.join(lines[-5:])}"


class _Process(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.running = True
        self.ended: defer.Deferred[None] = defer.Deferred()

    def processEnded(self, reason: Failure) -> None:  # noqa: N802 (Twisted API)
        self.running = False
        self.ended.callback(None)


@dataclass
class Daemon:
    """A process we started: its pid, directory, output file and port."""

    reactor: Any
    name: str
    pid: int
    port: int
    directory: str
    output: str
    _process: _Process = field(repr=False)
    _transport: Any = field(repr=False)

    @property
    def running(self) -> bool:
        return self._process.running

    def output_tail(self, size: int = 3000) -> str:
        """The end of the daemon's output and log files."""
        text = ""
        for path in (self.output, os.path.join(self.directory, "log", "daemon.log")):
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    text += f.read()[-size:]
            except FileNotFoundError:
                pass
        return text

    async def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL; remove the directory."""
        if self._process.running:
            self._transport.signalProcess("TERM")
            await wait_until(self.reactor, lambda: not self._process.running, timeout)
        for pid in children_of(self.pid):
            _kill(pid)
        if self._process.running:
            self._transport.signalProcess("KILL")
            await self._process.ended
        shutil.rmtree(self.directory, ignore_errors=True)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def children_of(pid: int) -> list[int]:
    """Live direct children of ``pid`` (zombies excluded), from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return found


def cpu_seconds(pids: Iterable[int]) -> float:
    """User plus system CPU seconds used so far by ``pids`` (gone ones count 0)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += int(fields[11]) + int(fields[12])
    return total / ticks


def rspamd_worker_pid(master: int, title: str) -> int | None:
    """The child of Rspamd's ``master`` whose process title contains ``title``
    (``normal``, ``rspamd_proxy``, ``fuzzy``), or ``None``."""
    for pid in children_of(master):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if title.encode() in f.read():
                    return pid
        except OSError:
            continue
    return None


def memory(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of ``pid`` in KiB (empty when it is gone)."""
    values = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    values[name] = int(rest.split()[0])
    except OSError:
        return {}
    return values


def reset_peak(pid: int) -> bool:
    """Reset ``VmHWM`` of ``pid`` to its current RSS; whether the kernel allowed it."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


async def wait_until(reactor: Any, ready: Callable[[], bool | Awaitable[bool]],
                     timeout: float) -> bool:
    """Poll ``ready`` every 0.2 s for at most ``timeout`` s; whether it became true."""
    waited = 0.0
    while True:
        result = ready()
        if not isinstance(result, bool):
            result = await result
        if result:
            return True
        if waited >= timeout:
            return False
        await task.deferLater(reactor, _POLL, lambda: None)
        waited += _POLL


async def tcp_accepts(reactor: Any, port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=2)
    try:
        connected = await connectProtocol(endpoint, protocol.Protocol())
    except error.ConnectError:
        return False
    assert connected.transport is not None
    connected.transport.loseConnection()
    return True


def _spawn(reactor: Any, executable: str, args: list[str], directory: str,
           env: Mapping[str, str]) -> tuple[_Process, Any, str]:
    output = os.path.join(directory, "output.txt")
    out_fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null_fd = os.open(os.devnull, os.O_RDONLY)
    process = _Process()
    try:
        transport = reactor.spawnProcess(process, executable, args, env=dict(env),
                                         path=directory,
                                         childFDs={0: null_fd, 1: out_fd, 2: out_fd})
    finally:
        os.close(out_fd)
        os.close(null_fd)
    return process, transport, output


async def start_ours(reactor: Any, tap: str, port: int, local: Mapping[str, str],
                     ready: Callable[[Daemon], Awaitable[bool]] | None = None,
                     timeout: float = 30.0) -> Daemon:
    """Run our ``tap`` with ``local`` (file name → text) as ``local.d``; wait until ready.

    ``ready`` defaults to "accepts TCP on ``port``".  ``logging.inc`` defaults
    to an ``info``-level log file in the daemon's directory.  Raises
    :class:`StartError` (after stopping it) if the daemon exits or is not
    ready within ``timeout`` seconds.
    """
    directory = tempfile.mkdtemp(prefix=f"rspamd-tx-bench-{tap}-")
    for sub in ("local.d", "run", "db", "log"):
        os.makedirs(os.path.join(directory, sub))
    files = {"logging.inc": f'type = "file";\nfilename = "{directory}/log/daemon.log";\n'
                            'level = "info";\n'}
    files.update(local)
    for name, text in files.items():
        with open(os.path.join(directory, "local.d", name), "w") as f:
            f.write(text)
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RSPAMD_TX_CONFDIR", None)
    args = [TWISTD, "-n", "--pidfile=", tap, "-c", directory,
            "--var", f"RUNDIR={directory}/run", "--var", f"DBDIR={directory}/db",
            "--var", f"LOGDIR={directory}/log"]
    process, transport, output = _spawn(reactor, TWISTD, args, directory, env)
    daemon = Daemon(reactor, tap, transport.pid, port, directory, output, process, transport)
    check = ready or (lambda d: tcp_accepts(reactor, d.port))

    async def up() -> bool:
        if not daemon.running:
            return True
        return await check(daemon)

    if not await wait_until(reactor, up, timeout) or not daemon.running:
        tail = daemon.output_tail()
        await daemon.stop()
        raise StartError(f"{tap} did not become ready within {timeout:g} s", tail)
    return daemon
