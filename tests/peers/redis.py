"""Start real ``redis-server`` processes on loopback for integration tests.

Typical use in a ``twisted.trial.unittest.TestCase``::

    from twisted.internet import defer, reactor
    from tests.peers.redis import skip_unless_redis, start_redis

    class Tests(unittest.TestCase):
        skip = skip_unless_redis()

        @defer.inlineCallbacks
        def test_x(self):
            primary = yield start_redis(reactor)
            self.addCleanup(primary.stop)
            replica = yield start_redis(reactor, replica_of=primary)
            self.addCleanup(replica.stop)
            client = yield primary.client()   # binary-safe raw client

Each server runs in the foreground (``--daemonize no``) as a child of the test
process, in a fresh temporary directory, bound to ``127.0.0.1`` on a free
port, without persistence (``--save "" --appendonly no``) unless asked for. ``start_redis``
fires once the server answers ``PING`` (a replica: once its link to the
primary is up), polling with ``deferLater`` and bounded by ``timeout``.
``kill()`` (SIGKILL) and ``restart()`` (same port, same directory) serve the
failure tests; ``stop()`` is idempotent and removes the directory.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from typing import Any

from twisted.internet import defer, protocol, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.python.failure import Failure

from tests.peers.rspamd import free_port

__all__ = ["RedisPeer", "skip_unless_redis", "start_redis"]

HOST = "127.0.0.1"
POLL_INTERVAL = 0.05


def skip_unless_redis() -> str | None:
    """A trial ``skip`` reason when ``redis-server`` is not installed."""
    if shutil.which("redis-server") is None:
        return "redis-server is not installed"
    return None


class _ProcessWatch(protocol.ProcessProtocol):
    """Fires ``ended`` when the server process exits."""

    def __init__(self) -> None:
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.output = bytearray()

    def outReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
        self.output += data[-65536:]

    def errReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
        self.output += data[-65536:]

    def processEnded(self, reason: Failure) -> None:  # noqa: N802 (Twisted API)
        self.ended.callback(None)


class _InlineQuery(protocol.Protocol):
    """Sends one inline command and collects the reply until the peer is quiet."""

    def __init__(self, command: bytes, expect: bytes) -> None:
        self.command = command
        self.expect = expect
        self.buffer = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:  # noqa: N802 (Twisted API)
        self.transport.write(self.command + b"\r\n")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
        self.buffer += data
        if self.expect in self.buffer or self.buffer.startswith(b"-"):
            self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:  # noqa: N802
        if not self.done.called:
            self.done.callback(self.buffer)


class RedisPeer:
    """A running ``redis-server``.

    Attributes:
        port: the TCP port on 127.0.0.1.
        directory: the server's working directory.
        replica_of: the primary this server replicates, if any.
    """

    def __init__(self, reactor: Any, port: int, directory: str,
                 replica_of: RedisPeer | None, persistent: bool = False) -> None:
        self.reactor = reactor
        self.persistent = persistent
        self.port = port
        self.directory = directory
        self.replica_of = replica_of
        self._watch: _ProcessWatch | None = None
        self._process: Any = None
        self._clients: list[Any] = []

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``, as a Redis ``servers`` option element."""
        return f"{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._watch is not None and not self._watch.ended.called

    def _arguments(self) -> list[str]:
        arguments = [
            "redis-server", "--port", str(self.port), "--bind", HOST, "--save", "",
            "--appendonly", "yes" if self.persistent else "no", "--appendfsync", "always",
            "--dir", self.directory, "--daemonize", "no",
            "--logfile", "", "--protected-mode", "no",
        ]
        if self.replica_of is not None:
            arguments += ["--replicaof", HOST, str(self.replica_of.port)]
        return arguments

    def _spawn(self) -> None:
        executable = shutil.which("redis-server")
        assert executable is not None
        self._watch = _ProcessWatch()
        self._process = self.reactor.spawnProcess(
            self._watch, executable, self._arguments(), env={}, path=self.directory
        )

    def query(self, command: bytes, expect: bytes = b"\r\n") -> defer.Deferred[bytes]:
        """Send one inline command (e.g. ``b"PING"``) and fire with the raw reply."""
        endpoint = TCP4ClientEndpoint(self.reactor, HOST, self.port, timeout=1)
        query = _InlineQuery(command, expect)
        connected: defer.Deferred[Any] = connectProtocol(endpoint, query)
        connected.addCallback(lambda _: query.done)
        return connected

    @defer.inlineCallbacks
    def wait_ready(self, timeout: float = 15.0) -> Any:
        """Poll until ``PING`` answers (a replica: until ``master_link_status:up``)."""
        deadline = self.reactor.seconds() + timeout
        while True:
            if not self.running:
                assert self._watch is not None
                raise RuntimeError("redis-server exited: "
                                   + self._watch.output.decode(errors="replace"))
            try:
                reply = yield self.query(b"PING", b"+PONG")
                if reply.startswith(b"+PONG"):
                    if self.replica_of is None:
                        return None
                    info = yield self.query(b"INFO replication", b"master_link_status")
                    if b"master_link_status:up" in info:
                        return None
            except Exception:
                pass
            if self.reactor.seconds() > deadline:
                raise TimeoutError(f"redis-server on port {self.port} not ready in {timeout} s")
            yield task.deferLater(self.reactor, POLL_INTERVAL, lambda: None)

    def start(self) -> defer.Deferred[Any]:
        """(Re)start the process on the same port and directory; fires when ready."""
        self._spawn()
        return self.wait_ready()

    def _signal(self, name: str) -> defer.Deferred[None]:
        if not self.running:
            return defer.succeed(None)
        assert self._watch is not None
        self._process.signalProcess(name)
        return self._watch.ended

    def kill(self) -> defer.Deferred[None]:
        """SIGKILL the server; fires once it is gone."""
        return self._signal("KILL")

    @defer.inlineCallbacks
    def restart(self) -> Any:
        """Kill the server and start it again on the same port."""
        yield self.kill()
        yield self.start()

    @defer.inlineCallbacks
    def client(self) -> Any:
        """A binary-safe raw txredisapi connection (bytes in and out, no number
        conversion), closed by :meth:`stop`."""
        import txredisapi

        connection = yield txredisapi.Connection(
            HOST, self.port, reconnect=False, charset=None, convertNumbers=False
        )
        self._clients.append(connection)
        return connection

    @defer.inlineCallbacks
    def stop(self) -> Any:
        """Close raw clients, terminate the server and remove its directory."""
        clients, self._clients = self._clients, []
        for connection in clients:
            yield connection.disconnect()
        if self.running:
            assert self._watch is not None
            self._process.signalProcess("TERM")
            timer = self.reactor.callLater(10, self._signal, "KILL")
            yield self._watch.ended
            if timer.active():
                timer.cancel()
        shutil.rmtree(self.directory, ignore_errors=True)


@defer.inlineCallbacks
def start_redis(reactor: Any, replica_of: RedisPeer | None = None,
                timeout: float = 15.0, persistent: bool = False) -> Any:
    """Start a ``redis-server`` on a free loopback port; fires with a :class:`RedisPeer`.

    ``persistent``: keep data across :meth:`RedisPeer.kill` and restart
    (append-only file, fsync'ed at every write).

    The caller must ``addCleanup(peer.stop)``.
    """
    directory = tempfile.mkdtemp(prefix="rspamd-tx-redis-")
    peer = RedisPeer(reactor, free_port((socket.SOCK_STREAM,)), directory,
                     replica_of, persistent)
    peer._spawn()
    try:
        yield peer.wait_ready(timeout)
    except Exception:
        yield peer.stop()
        raise
    return peer
