"""Serving a listener factory on loopback exactly as the daemon serves it."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import ServerFactory

from rspamd_tx.config.bind import SocketKind, adopt_sockets, open_listen_sockets, parse_bind_line


def serve_on_loopback(reactor: Any, factory: ServerFactory) -> tuple[IListeningPort, int]:
    """Bind a fresh 127.0.0.1 port and serve ``factory`` on it through
    :func:`~rspamd_tx.config.bind.adopt_sockets`, as the daemon's workers do
    (a factory with its own stream port gets it).  Returns the listening port
    (stop it when done) and the port number.
    """
    [sock] = open_listen_sockets(parse_bind_line("127.0.0.1:0"), {SocketKind.STREAM})
    try:
        [port] = adopt_sockets(reactor, [sock], factory, None)
        number: int = sock.getsockname()[1]
    finally:
        sock.close()
    return port, number
