"""Network helpers for tests: a tiny HTTP GET client, free ports, IPv6 probe."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python.failure import Failure

#: The repository root (holds rspamd_tx/ and twisted/plugins/).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def unix_socket_path(case: Any, name: str) -> str:
    """A path for a unix socket that stays under the AF_UNIX length limit (108 bytes).

    Trial's per-test temporary directories can be longer than the limit; the socket goes in
    a short directory under ``/tmp`` instead, removed when ``case`` (a TestCase) ends.
    """
    directory = tempfile.mkdtemp(prefix="rtx-", dir="/tmp")
    case.addCleanup(shutil.rmtree, directory, True)
    return os.path.join(directory, name)


def ipv6_available() -> bool:
    """Whether ``::1`` can be bound here."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP and UDP port free on ``host`` right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    while True:
        with socket.socket(family, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = tcp.getsockname()[1]
            with socket.socket(family, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((host, port))
                except OSError:
                    continue
        return int(port)


class _Collect(Protocol):
    def __init__(self, request: bytes, done: Deferred[bytes]) -> None:
        self.request = request
        self.done = done
        self.data = b""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        self.done.callback(self.data)


class _Factory(ClientFactory):
    def __init__(self, request: bytes) -> None:
        self.request = request
        self.done: Deferred[bytes] = Deferred()

    def buildProtocol(self, addr: Any) -> _Collect:
        return _Collect(self.request, self.done)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.done.errback(reason)


def raw_exchange(reactor: Any, host: str, port: int,
                 request: bytes, timeout: float = 10) -> Deferred[bytes]:
    """Send ``request`` and collect everything until the server closes."""
    factory = _Factory(request)
    reactor.connectTCP(host, port, factory, timeout=timeout)
    return factory.done.addTimeout(timeout, reactor)


def http_get(reactor: Any, host: str, port: int, path: str,
             timeout: float = 10) -> Deferred[tuple[int, bytes]]:
    """``GET path`` over HTTP/1.0; fires with (status code, body)."""
    request = f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode()

    def parse(reply: bytes) -> tuple[int, bytes]:
        head, _, body = reply.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        return status, body

    return raw_exchange(reactor, host, port, request, timeout).addCallback(parse)
