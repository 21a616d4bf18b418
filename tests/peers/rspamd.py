"""Start a real Rspamd 3.4 on loopback for integration tests, and run ``rspamc``.

Typical use in a ``twisted.trial.unittest.TestCase``::

    from twisted.internet import defer, reactor
    from tests.peers.rspamd import rspamc, skip_unless_rspamd, start_rspamd

    class ScanTests(unittest.TestCase):
        skip = skip_unless_rspamd()

        @defer.inlineCallbacks
        def test_gtube(self):
            peer = yield start_rspamd(
                reactor,
                workers=("normal", "controller"),
                override={"fuzzy_check.conf": 'rule "x" { servers = "127.0.0.1:9"; }'},
                worker_options={"controller": 'password = "q1";'},
            )
            self.addCleanup(peer.stop)
            code, out, err = yield rspamc(
                reactor, ["-h", peer.address("normal"), "symbols", path])

What the helper does (see ``/work/shared/PEERS.md``):

* builds a private ``LOCAL_CONFDIR`` in a fresh directory under ``/tmp`` (with
  ``run/``, ``db/`` and ``log/`` next to it) and starts ``rspamd -f -c
  /etc/rspamd/rspamd.conf --var=LOCAL_CONFDIR=… --var=RUNDIR=… --var=DBDIR=…
  --var=LOGDIR=…``, as ``-u _rspamd -g _rspamd`` when run as root (the
  directory is handed to that user);
* gives every requested worker (``normal``, ``controller``, ``proxy``,
  ``fuzzy``) a free ``127.0.0.1`` port in ``override.d/worker-*.inc``, and
  disables the others; the caller's ``worker_options[worker]`` text is
  appended to that file (it must not set ``bind_socket``);
* writes ``local.d/options.inc`` with DNS pointed at a closed loopback port and
  ``hs_cache_dir`` from ``$RSPAMD_TX_HS_CACHE`` (default
  ``/var/tmp/rspamd-tx-hs-cache``), followed by the caller's ``options.inc``;
* disables every network module with ``local.d/<module>.conf`` (``enabled =
  false;``) unless the caller supplies that file, and disables ``fuzzy_check``
  unless the caller supplies a ``fuzzy_check.conf``;
* writes every other caller file into ``local.d/`` or ``override.d/``; in all
  caller texts ``@NORMAL_PORT@``, ``@CONTROLLER_PORT@``, ``@PROXY_PORT@``,
  ``@FUZZY_PORT@`` and ``@DIR@`` are replaced by the chosen values;
* without caller options, a proxy started next to a normal worker is an HTTP
  proxy (``milter = no``) with that worker as its default upstream;
* waits, polling with ``deferLater`` and bounded by ``timeout``, until the
  normal and controller workers answer ``/ping``, the proxy accepts TCP
  connections, a fuzzy worker answers a STAT datagram and (unless
  ``wait_hyperscan=False``) the log says the hyperscan database is loaded;
* ``peer.stop()`` sends SIGTERM, waits, then SIGKILLs leftover workers by pid
  (a 3.4 fuzzy worker that flushes a REFRESH at shutdown never exits) and the
  master; Rspamd's stdout/stderr go to ``log/rspamd.out``, not to pipes.

Set ``RSPAMD_TX_KEEP_PEER_DIR=1`` to keep each peer's directory (config, logs)
after the test for debugging.

Run integration tests in a private network namespace
(``unshare -n sh -c 'ip link set lo up && trial …'``), as CI does.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, error, protocol, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.python.failure import Failure

from rspamd_tx.protocols import fuzzy_codec

__all__ = [
    "NETWORK_MODULES",
    "RspamdPeer",
    "RspamdStartError",
    "WORKERS",
    "free_port",
    "rspamc",
    "skip_unless_rspamd",
    "start_rspamd",
]

RSPAMD = shutil.which("rspamd") or "/usr/bin/rspamd"
RSPAMC = shutil.which("rspamc") or "/usr/bin/rspamc"
STOCK_CONFIG = "/etc/rspamd/rspamd.conf"
RSPAMD_USER = "_rspamd"
DEFAULT_HS_CACHE = "/var/tmp/rspamd-tx-hs-cache"

WORKERS: dict[str, str] = {
    "normal": "worker-normal.inc",
    "controller": "worker-controller.inc",
    "proxy": "worker-proxy.inc",
    "fuzzy": "worker-fuzzy.inc",
}
"""Worker names accepted by :func:`start_rspamd` and their include files."""

_HTTP_WORKERS = ("normal", "controller", "proxy")
_HYPERSCAN_WORKERS = ("normal", "controller")

NETWORK_MODULES = (
    "rbl", "surbl", "spf", "dkim", "dmarc", "arc", "asn", "hfilter", "whitelist",
    "phishing", "multimap", "mid", "mime_types", "dcc", "emails", "url_redirector",
    "reputation", "neural", "rspamd_update", "bimi", "p0f", "antivirus",
    "external_services", "ratelimit", "greylist", "replies", "history_redis",
    "mx_check",
)  # fmt: skip
"""Modules disabled by default because they would reach the network."""

_POLL_INTERVAL = 0.2


class RspamdStartError(Exception):
    """Rspamd exited or did not become ready in time; carries the log tail."""


def skip_unless_rspamd() -> str | None:
    """A trial ``skip`` reason when Rspamd is not installed, else ``None``."""
    if not (os.path.exists(RSPAMD) and os.path.exists(STOCK_CONFIG)):
        return "Rspamd 3.4 is not installed"
    return None


def free_port(kinds: Iterable[int] = (socket.SOCK_STREAM, socket.SOCK_DGRAM)) -> int:
    """A loopback port that is currently free for every socket type in ``kinds``."""
    kinds = tuple(kinds)
    while True:
        with socket.socket(socket.AF_INET, kinds[0]) as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
            if all(_port_free(port, kind) for kind in kinds[1:]):
                return port


def _port_free(port: int, kind: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class _RspamdProcess(protocol.ProcessProtocol):
    """Fires ``ended`` with the master's exit status.

    The master's output goes to a file, not to pipes: a worker that outlives
    the master would otherwise hold the pipes open and ``processEnded`` would
    never come.
    """

    def __init__(self) -> None:
        self.ended: defer.Deferred[int | None] = defer.Deferred()
        self.exit_status: int | None = None
        self.running = True

    def processEnded(self, reason: Failure) -> None:  # noqa: N802 (Twisted API)
        self.running = False
        self.exit_status = getattr(reason.value, "exitCode", None)
        self.ended.callback(self.exit_status)


@dataclass
class RspamdPeer:
    """A running Rspamd.

    Attributes:
        directory: the private directory (``LOCAL_CONFDIR``; ``run``, ``db``,
            ``log`` inside it).
        ports: loopback port of each started worker.
        log_path: Rspamd's log file.
        pid: the master process id.
    """

    reactor: Any
    directory: str
    ports: dict[str, int]
    log_path: str
    pid: int
    _process: _RspamdProcess = field(repr=False)
    _transport: Any = field(repr=False)
    keep_directory: bool = False
    _stopping: defer.Deferred[None] | None = field(default=None, repr=False)

    def address(self, worker: str) -> str:
        """``127.0.0.1:PORT`` of ``worker`` (for ``rspamc -h`` or a ``servers`` option)."""
        return f"127.0.0.1:{self.ports[worker]}"

    @property
    def running(self) -> bool:
        """Whether the master process has not exited yet."""
        return self._process.running

    def read_log(self) -> str:
        """The whole Rspamd log so far ("" before it exists)."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as log:
                return log.read()
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the log plus the master's own output."""
        tail = "\n".join(self.read_log().splitlines()[-lines:])
        try:
            with open(self.output_path, encoding="utf-8", errors="replace") as output:
                printed = output.read()[-4096:]
        except FileNotFoundError:
            printed = ""
        return f"{tail}\n--- rspamd output ---\n{printed}"

    @property
    def output_path(self) -> str:
        """Where the master's stdout and stderr go."""
        return os.path.join(self.directory, "log", "rspamd.out")

    def _workers(self) -> list[tuple[int, str]]:
        """The master's children (its workers) as (pid, start time) from /proc."""
        workers: list[tuple[int, str]] = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                fields = _stat_fields(int(entry))
                if fields is not None and fields[1] == str(self.pid):
                    workers.append((int(entry), fields[19]))
        return workers

    def stop(self, timeout: float = 5.0) -> defer.Deferred[None]:
        """SIGTERM the master, wait up to ``timeout`` s, then SIGKILL what is left; clean up.

        Workers still running after ``timeout`` (or after the master) are
        killed by pid, then the master if needed; zombies (state ``Z``: PID 1
        may not reap in containers) are left alone.  Removes the directory
        unless ``keep_directory``.  Safe to call more than once; returns the
        same Deferred.
        """
        if self._stopping is None:
            self._stopping = defer.ensureDeferred(self._stop(timeout))
        return self._stopping

    async def _stop(self, timeout: float) -> None:
        workers = self._workers() if self._process.running else []
        if self._process.running:
            self._transport.signalProcess("TERM")
            await self._wait_exit(timeout)
        # A 3.4 fuzzy worker that flushes a REFRESH while terminating never
        # exits; its master would wait 16 s.  Kill what is left, by pid.
        self._kill(workers)
        if self._process.running:
            await self._wait_exit(2.0)
        if self._process.running:
            self._transport.signalProcess("KILL")
            await self._process.ended
        self._kill(workers)
        if not self.keep_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    async def _wait_exit(self, timeout: float) -> None:
        waited = 0.0
        while self._process.running and waited < timeout:
            await task.deferLater(self.reactor, _POLL_INTERVAL, lambda: None)
            waited += _POLL_INTERVAL

    @staticmethod
    def _kill(workers: Iterable[tuple[int, str]]) -> None:
        """SIGKILL each worker still alive; the start time guards against pid reuse."""
        for pid, started in workers:
            fields = _stat_fields(pid)
            if fields is not None and fields[19] == started and fields[0] != "Z":
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` after the command name: [0] state, [1] parent
    pid, [19] start time; ``None`` when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields if len(fields) > 19 else None


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        if text and not text.endswith("\n"):
            handle.write("\n")


def _chown_tree(path: str, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, gid)


def _hs_cache_dir(
    uid: int | None, gid: int | None, local: Mapping[str, str], override: Mapping[str, str]
) -> str:
    """The hyperscan cache directory for one configuration.

    Rspamd's hs_helper deletes every cached database its own configuration does not use, so
    peers started with different rules must not share a directory: each distinct set of
    ``local.d``/``override.d`` texts (before port substitution, so it is stable between runs)
    gets its own subdirectory of ``$RSPAMD_TX_HS_CACHE``.
    """
    digest = hashlib.sha256()
    for name, text in sorted(local.items()) + [("", "")] + sorted(override.items()):
        digest.update(name.encode() + b"\0" + text.encode() + b"\0")
    base = os.environ.get("RSPAMD_TX_HS_CACHE", DEFAULT_HS_CACHE)
    cache = os.path.join(base, digest.hexdigest()[:16])
    os.makedirs(cache, exist_ok=True)
    if uid is not None and gid is not None:
        for path in (base, cache):
            if os.stat(path).st_uid != uid:
                os.chown(path, uid, gid)
    return cache


def _build_config(
    directory: str,
    ports: Mapping[str, int],
    local: Mapping[str, str],
    override: Mapping[str, str],
    worker_options: Mapping[str, str],
    hs_cache: str,
) -> None:
    """Write ``local.d`` and ``override.d`` under ``directory``."""

    def substitute(text: str) -> str:
        for worker, port in ports.items():
            text = text.replace(f"@{worker.upper()}_PORT@", str(port))
        return text.replace("@DIR@", directory)

    local = {name: substitute(text) for name, text in local.items()}
    override = {name: substitute(text) for name, text in override.items()}
    worker_options = {name: substitute(text) for name, text in worker_options.items()}
    if "proxy" in ports and "normal" in ports and "proxy" not in worker_options:
        worker_options["proxy"] = (
            "milter = no;\n"
            f'upstream "local" {{ default = yes; hosts = "127.0.0.1:{ports["normal"]}"; }}\n'
        )
    local_dir = os.path.join(directory, "local.d")
    override_dir = os.path.join(directory, "override.d")
    for sub in ("local.d", "override.d", "run", "db", "log"):
        os.makedirs(os.path.join(directory, sub), exist_ok=True)
    dns_port = free_port((socket.SOCK_DGRAM, socket.SOCK_STREAM))
    options = (
        f'dns {{ nameserver = "127.0.0.1:{dns_port}"; timeout = 1s; retransmits = 1; }}\n'
        f'hs_cache_dir = "{hs_cache.rstrip("/")}/";\n'
    )
    _write(os.path.join(local_dir, "options.inc"), options + local.get("options.inc", ""))
    for module in NETWORK_MODULES:
        if f"{module}.conf" not in local and f"{module}.conf" not in override:
            _write(os.path.join(local_dir, f"{module}.conf"), "enabled = false;")
    if "fuzzy_check.conf" not in local and "fuzzy_check.conf" not in override:
        _write(os.path.join(local_dir, "fuzzy_check.conf"), "enabled = false;")
    for name, text in local.items():
        if name != "options.inc":
            _write(os.path.join(local_dir, name), text)
    for name, text in override.items():
        _write(os.path.join(override_dir, name), text)
    for worker, include in WORKERS.items():
        if worker in ports:
            lines = f'bind_socket = "127.0.0.1:{ports[worker]}";\n'
            if worker == "fuzzy":
                lines += "count = 1;\n"
            lines += worker_options.get(worker, "")
        else:
            lines = "enabled = false;\n"
            if worker == "fuzzy":
                lines += "count = -1;\n"
        _write(os.path.join(override_dir, include), lines)


async def _tcp_accepts(reactor: Any, port: int) -> bool:
    """Whether something accepts TCP connections on ``port`` (closed at once)."""
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=2)
    try:
        connected = await connectProtocol(endpoint, protocol.Protocol())
    except error.ConnectError:
        return False
    assert connected.transport is not None
    connected.transport.loseConnection()
    return True


async def _http_ping(reactor: Any, port: int) -> bool:
    """Whether ``GET /ping`` on ``port`` answers ``pong``."""

    class Ping(protocol.Protocol):
        def __init__(self) -> None:
            self.data = bytearray()
            self.done: defer.Deferred[bytes] = defer.Deferred()

        def connectionMade(self) -> None:  # noqa: N802 (Twisted API)
            assert self.transport is not None
            self.transport.write(b"GET /ping HTTP/1.0\r\n\r\n")

        def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
            self.data += data

        def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:  # noqa: N802
            self.done.callback(bytes(self.data))

    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=2)
    try:
        ping = Ping()
        await connectProtocol(endpoint, ping)
        assert ping.transport is not None
        timer = reactor.callLater(2.0, ping.transport.abortConnection)
        answer = await ping.done
        if timer.active():
            timer.cancel()
    except error.ConnectError:
        return False
    return b"pong" in answer


async def _fuzzy_stat(reactor: Any, port: int) -> bool:
    """Whether a fuzzy storage on ``port`` answers a plaintext STAT datagram."""

    class Stat(protocol.DatagramProtocol):
        def __init__(self) -> None:
            self.answered: defer.Deferred[bool] = defer.Deferred()

        def datagramReceived(self, data: bytes, addr: Any) -> None:  # noqa: N802
            if not self.answered.called:
                self.answered.callback(True)

    command = fuzzy_codec.FuzzyCommand(
        version=4, command=fuzzy_codec.Command.STAT, tag=0x5354, digest=bytes(64)
    )
    stat = Stat()
    listener = reactor.listenUDP(0, stat, interface="127.0.0.1")
    try:
        listener.write(fuzzy_codec.encode_request(command), ("127.0.0.1", port))
        timer = reactor.callLater(0.5, stat.answered.callback, False)
        answered = await stat.answered
        if timer.active():
            timer.cancel()
        return answered
    finally:
        await defer.maybeDeferred(listener.stopListening)


_HYPERSCAN_LOADED = re.compile(
    r"\((?P<process>main|normal|controller)\)"
    r".*full hyperscan database of \d+ regexps has been loaded"
)


def _hyperscan_loaded(log: str, workers: Sequence[str]) -> bool:
    """Whether the scanning workers have their hyperscan database.

    From a warm cache the master loads it before forking the workers (only
    ``(main)`` logs it); otherwise each worker logs it after the hs_helper
    has compiled the database.
    """
    loaded = {match.group("process") for match in _HYPERSCAN_LOADED.finditer(log)}
    if "main" in loaded:
        return True
    return all(worker in loaded for worker in workers if worker in _HYPERSCAN_WORKERS)


async def _start(
    reactor: Any,
    workers: Sequence[str],
    local: Mapping[str, str],
    override: Mapping[str, str],
    worker_options: Mapping[str, str],
    timeout: float,
    wait_hyperscan: bool,
    keep_directory: bool,
    chosen_ports: Mapping[str, int],
) -> RspamdPeer:
    unknown = set(workers) - set(WORKERS)
    if unknown:
        raise ValueError(f"unknown workers: {sorted(unknown)}")
    clashing = set(override) & set(WORKERS.values())
    if clashing:
        raise ValueError(f"use worker_options instead of override files {sorted(clashing)}")
    as_root = os.geteuid() == 0
    uid = gid = None
    if as_root:
        account = pwd.getpwnam(RSPAMD_USER)
        uid, gid = account.pw_uid, account.pw_gid
    directory = tempfile.mkdtemp(prefix="rspamd-tx-peer-")
    os.chmod(directory, 0o755)
    ports = {worker: int(chosen_ports.get(worker) or free_port()) for worker in workers}
    _build_config(
        directory, ports, local, override, worker_options, _hs_cache_dir(uid, gid, local, override)
    )
    if uid is not None and gid is not None:
        _chown_tree(directory, uid, gid)
    args = [
        RSPAMD, "-f", "-c", STOCK_CONFIG,
        f"--var=LOCAL_CONFDIR={directory}",
        f"--var=RUNDIR={directory}/run",
        f"--var=DBDIR={directory}/db",
        f"--var=LOGDIR={directory}/log",
    ]  # fmt: skip
    args += ["-u", RSPAMD_USER, "-g", RSPAMD_USER] if as_root else ["-i"]
    process = _RspamdProcess()
    output_fd = os.open(
        os.path.join(directory, "log", "rspamd.out"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644
    )
    null_fd = os.open(os.devnull, os.O_RDONLY)
    try:
        transport = reactor.spawnProcess(
            process,
            RSPAMD,
            args,
            env=dict(os.environ),
            path=directory,
            childFDs={0: null_fd, 1: output_fd, 2: output_fd},
        )
    finally:
        os.close(output_fd)
        os.close(null_fd)
    peer = RspamdPeer(
        reactor=reactor,
        directory=directory,
        ports=ports,
        log_path=os.path.join(directory, "log", "rspamd.log"),
        pid=transport.pid,
        _process=process,
        _transport=transport,
        keep_directory=keep_directory,
    )
    try:
        await _wait_ready(peer, workers, timeout, wait_hyperscan)
    except BaseException:
        await peer.stop()
        raise
    return peer


async def _wait_ready(
    peer: RspamdPeer, workers: Sequence[str], timeout: float, wait_hyperscan: bool
) -> None:
    reactor = peer.reactor
    pending = list(workers)
    waited = 0.0
    while True:
        if not peer.running:
            raise RspamdStartError(
                f"rspamd exited with {peer._process.exit_status}:\n{peer.log_tail()}"
            )
        for worker in list(pending):
            port = peer.ports[worker]
            if worker == "fuzzy":
                ready = await _fuzzy_stat(reactor, port)
            elif worker == "proxy":
                # the proxy forwards /ping to its upstream, which may be absent
                ready = await _tcp_accepts(reactor, port)
            else:
                ready = await _http_ping(reactor, port)
            if ready:
                pending.remove(worker)
        if not pending and (not wait_hyperscan or _hyperscan_loaded(peer.read_log(), workers)):
            return
        if waited >= timeout:
            raise RspamdStartError(
                f"rspamd not ready after {timeout} s (waiting for {pending or 'hyperscan'}):\n"
                f"{peer.log_tail()}"
            )
        await task.deferLater(reactor, _POLL_INTERVAL, lambda: None)
        waited += _POLL_INTERVAL


def start_rspamd(
    reactor: Any,
    workers: Sequence[str] = ("normal", "controller"),
    local: Mapping[str, str] | None = None,
    override: Mapping[str, str] | None = None,
    worker_options: Mapping[str, str] | None = None,
    timeout: float = 120.0,
    wait_hyperscan: bool = True,
    keep_directory: bool = False,
    ports: Mapping[str, int] | None = None,
) -> defer.Deferred[RspamdPeer]:
    """Start Rspamd with ``workers`` on fresh loopback ports; fires when it is ready.

    Args:
        reactor: a reactor providing process, TCP, UDP and time.
        workers: any of ``normal``, ``controller``, ``proxy``, ``fuzzy``.
        local: file name → text for ``local.d/`` (``options.inc`` is appended
            to the helper's DNS/hyperscan settings; a module's ``.conf``
            replaces the helper's ``enabled = false;``).
        override: file name → text for ``override.d/`` (not ``worker-*.inc``).
        worker_options: worker → text appended to its ``override.d/worker-*.inc``.
        timeout: seconds to wait for readiness (first starts compile hyperscan).
        wait_hyperscan: also wait until ``normal``/``controller`` log that the
            hyperscan database is loaded.
        keep_directory: keep the directory (config and log) after ``stop()``;
            also turned on by a non-empty ``$RSPAMD_TX_KEEP_PEER_DIR``.
        ports: worker → port to use instead of a free one (e.g. reserved
            with :func:`free_port` so another peer can be configured first).

    In every text, ``@NORMAL_PORT@``, ``@CONTROLLER_PORT@``, ``@PROXY_PORT@``,
    ``@FUZZY_PORT@`` are replaced by the chosen ports and ``@DIR@`` by the
    peer directory.  Without ``worker_options["proxy"]`` a proxy started with
    a normal worker is an HTTP proxy (``milter = no``) whose default upstream
    is that worker; pass options (e.g. ``milter = yes;`` and an upstream using
    ``@NORMAL_PORT@``) to get anything else.

    The Deferred fails with :class:`RspamdStartError` (Rspamd is then stopped)
    if Rspamd exits or is not ready in time.  Always ``addCleanup(peer.stop)``.
    """
    return defer.ensureDeferred(
        _start(
            reactor,
            tuple(workers),
            dict(local or {}),
            dict(override or {}),
            dict(worker_options or {}),
            timeout,
            wait_hyperscan,
            keep_directory or bool(os.environ.get("RSPAMD_TX_KEEP_PEER_DIR")),
            dict(ports or {}),
        )
    )


def rspamc(
    reactor: Any,
    args: Sequence[str],
    stdin: bytes | None = None,
    env: Mapping[str, str] | None = None,
) -> defer.Deferred[tuple[int, bytes, bytes]]:
    """Run the real ``rspamc`` with ``args``; fires with ``(exit code, stdout, stderr)``.

    ``stdin`` is written to its standard input when given (e.g. the message
    when no file is named); otherwise standard input is closed at once.  Pass
    ``-t SECONDS`` in ``args`` to bound it.  A death by signal is reported as
    exit code ``128 + signal``.
    """
    collector = _Collect(stdin or b"")
    environment = dict(os.environ if env is None else env)
    reactor.spawnProcess(collector, RSPAMC, [RSPAMC, *args], env=environment)
    return collector.done


class _Collect(protocol.ProcessProtocol):
    """Feeds stdin, collects stdout/stderr, fires ``done`` with (code, out, err)."""

    def __init__(self, stdin: bytes) -> None:
        self.stdin = stdin
        self.out = bytearray()
        self.err = bytearray()
        self.done: defer.Deferred[tuple[int, bytes, bytes]] = defer.Deferred()

    def connectionMade(self) -> None:  # noqa: N802 (Twisted API)
        assert self.transport is not None
        if self.stdin:
            self.transport.write(self.stdin)
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
        self.out += data

    def errReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
        self.err += data

    def processEnded(self, reason: Failure) -> None:  # noqa: N802 (Twisted API)
        code = getattr(reason.value, "exitCode", None)
        if code is None:
            code = 128 + (getattr(reason.value, "signal", None) or 0)
        self.done.callback((code, bytes(self.out), bytes(self.err)))
