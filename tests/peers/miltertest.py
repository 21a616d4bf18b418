"""Run OpenDKIM's ``miltertest`` (an MTA-side milter peer) and record the frames it exchanges.

``miltertest -s script.lua`` plays an MTA against a milter; its Lua API
(``mt.connect``, ``mt.negotiate``, ``mt.mailfrom``, ``mt.eom``,
``mt.eom_check``, ``mt.getreply`` …) cannot list every modification nor show
the text of a reply-code response, so :class:`FrameRelay` sits between it and
the milter and decodes both directions with our codec.

Typical use in a trial test::

    relay = FrameRelay(reactor, "127.0.0.1", milter_port)
    port = relay.listen()
    self.addCleanup(relay.stop)
    code, out, err = yield run_miltertest(reactor, SCRIPT, {"port": str(port)})
    relay.responses  # every reply frame the milter sent, decoded
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IListeningPort
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure

from rspamd_tx.protocols.milter_codec import MilterDecoder, MilterProtocolError, MtaDecoder
from rspamd_tx.protocols.milter_events import Response, ServerEvent

__all__ = ["MILTERTEST", "FrameRelay", "run_miltertest", "skip_unless_miltertest"]

MILTERTEST = shutil.which("miltertest") or "/usr/bin/miltertest"


def skip_unless_miltertest() -> str | None:
    """A trial ``skip`` reason when ``miltertest`` is not installed, else ``None``."""
    if not os.access(MILTERTEST, os.X_OK):
        return "miltertest is not installed"
    return None


def run_miltertest(
    reactor: Any, script: str, variables: Mapping[str, str]
) -> defer.Deferred[tuple[int, bytes, bytes]]:
    """Run ``miltertest -s script`` with ``-D name=value`` per variable.

    Fires with ``(exit code, stdout, stderr)``; ``mt.echo`` writes to stdout.
    """
    args = [arg for name, value in variables.items() for arg in ("-D", f"{name}={value}")]
    d: defer.Deferred[tuple[bytes, bytes, int]] = getProcessOutputAndValue(
        MILTERTEST, [*args, "-s", script], env=dict(os.environ), reactor=reactor
    )
    return d.addCallback(lambda result: (result[2], result[0], result[1]))


class _Upstream(protocol.Protocol):
    """The relay's connection to the milter."""

    def __init__(self, downstream: _Downstream) -> None:
        self.downstream = downstream

    def dataReceived(self, data: bytes) -> None:
        self.downstream.from_milter(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.downstream.milter_closed()


class _Downstream(protocol.Protocol):
    """The relay's connection from the MTA (miltertest)."""

    factory: _RelayFactory

    def __init__(self) -> None:
        self.upstream: _Upstream | None = None
        self.pending = b""
        self.commands = MilterDecoder(max_frame=1 << 24)
        self.responses = MtaDecoder()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.pauseProducing()
        relay = self.factory.relay
        endpoint = TCP4ClientEndpoint(relay.reactor, relay.host, relay.port, timeout=5)
        d = connectProtocol(endpoint, _Upstream(self))
        d.addCallbacks(self._connected, self._failed)

    def _connected(self, upstream: _Upstream) -> None:
        assert self.transport is not None
        self.upstream = upstream
        self.transport.resumeProducing()

    def _failed(self, failure: Failure) -> None:
        assert self.transport is not None
        self.factory.relay.errors.append(f"cannot reach the milter: {failure.value}")
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        relay = self.factory.relay
        self.commands.feed(data)
        try:
            relay.commands.extend(self.commands)
        except MilterProtocolError as error:
            relay.errors.append(f"MTA sent: {error.reason}")
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.write(data)

    def from_milter(self, data: bytes) -> None:
        relay = self.factory.relay
        self.responses.feed(data)
        try:
            relay.responses.extend(self.responses)
        except MilterProtocolError as error:
            relay.errors.append(f"milter sent: {error.reason}")
        if self.transport is not None:
            self.transport.write(data)

    def milter_closed(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.loseConnection()


class _RelayFactory(protocol.ServerFactory):
    protocol = _Downstream
    noisy = False

    def __init__(self, relay: FrameRelay) -> None:
        self.relay = relay


class FrameRelay:
    """A TCP relay in front of a milter that decodes every frame both ways.

    Attributes:
        commands: the MTA's commands, decoded, in order (all connections).
        responses: the milter's replies, decoded, in order (all connections).
        errors: frames that did not decode, and connection problems.
    """

    def __init__(self, reactor: Any, host: str, port: int) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.commands: list[ServerEvent] = []
        self.responses: list[Response] = []
        self.errors: list[str] = []
        self._listening: IListeningPort | None = None

    def listen(self) -> int:
        """Start listening on a free loopback port; return it."""
        self._listening = self.reactor.listenTCP(0, _RelayFactory(self), interface="127.0.0.1")
        return int(self._listening.getHost().port)

    def stop(self) -> defer.Deferred[None] | None:
        """Stop listening (open connections end with their peers)."""
        if self._listening is None:
            return None
        listening, self._listening = self._listening, None
        result: defer.Deferred[None] | None = listening.stopListening()
        return result
