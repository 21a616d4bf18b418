"""The fuzzy storage's transports: UDP datagrams and (Rspamd 3.14+) TCP frames.

Both only move bytes between a transport and :meth:`FuzzyStorage.handle
<rspamd_tx.fuzzy.storage.FuzzyStorage.handle>`:

* :class:`FuzzyDatagramProtocol`: each datagram is one request; its reply (if
  any) goes back to the sender from the same socket.
* :class:`FuzzyStreamProtocol` (made by :class:`FuzzyStreamFactory`): frames of
  ``u16`` little-endian length + one request payload, any number per
  connection (pipelining).  Replies are framed the same way and written in
  request order; requests without a reply (invalid payloads) are skipped.  A
  frame length of 0 or above 8192 closes the connection with a logged reason;
  so does ``tcp_timeout`` seconds without input.  A connection from a
  ``blocked`` source is closed at once.  At most
  :data:`MAX_PENDING_REPLIES` answers may be outstanding per connection;
  reading pauses until they are written.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
from collections import deque
from dataclasses import dataclass
from typing import Any, cast

from twisted.internet.interfaces import IAddress, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from rspamd_tx.fuzzy.ratelimit import IPAddress
from rspamd_tx.fuzzy.storage import FuzzyStorage
from rspamd_tx.protocols.fuzzy_codec import FuzzyProtocolError, FuzzyStreamDecoder, encode_frame

__all__ = [
    "MAX_PENDING_REPLIES",
    "FuzzyDatagramProtocol",
    "FuzzyStreamFactory",
    "FuzzyStreamProtocol",
    "parse_host",
]

log = Logger()

MAX_PENDING_REPLIES = 64
"""Unanswered requests a TCP connection may have before reading pauses."""


@functools.lru_cache(maxsize=4096)
def parse_host(host: str) -> IPAddress | None:
    """The address of a peer host string (``None`` if it is no IP address).

    An IPv6 zone (``fe80::1%eth0``) is dropped.
    """
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


def _peer_address(peer: IAddress) -> IPAddress | None:
    host = getattr(peer, "host", None)
    return parse_host(host) if isinstance(host, str) else None


class FuzzyDatagramProtocol(DatagramProtocol):
    """Answers each request datagram with the storage's reply.

    Senders on IP sockets are identified by address; a sender on a unix
    datagram socket (``addr`` is a path) is a local client.  Never raises out
    of :meth:`datagramReceived`.

    Replies go straight to the port's socket when the transport has one (a
    listening UDP or unix datagram port): the peer address came from
    ``recvfrom`` on that very socket, so the address checks of the
    transport's ``write`` have nothing to find.  A reply the kernel cannot
    take (``EAGAIN``, ``ENOBUFS``…) is dropped with a logged warning, a
    refused one (``ECONNREFUSED``, a late ICMP error of an earlier reply) is
    dropped silently, as the transport's ``write`` does.
    """

    noisy = False

    def __init__(self, storage: FuzzyStorage) -> None:
        self.storage = storage

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        try:
            address = None
            if isinstance(addr, tuple):
                address = parse_host(addr[0])
                if address is None:
                    return
            answer = self.storage.handle(datagram, address)
            if answer is None or isinstance(answer, bytes):
                self._send(answer, addr, len(datagram))
            else:
                answer.addCallback(self._send, addr, len(datagram))
        except Exception:
            log.failure("fuzzy datagram from {peer} dropped", peer=addr)

    def _send(self, reply: bytes | None, addr: Any, size: int) -> None:
        if reply is None:
            log.debug("dropped a {size}-byte datagram from {peer} without reply",
                      size=size, peer=addr)
            return
        transport = self.transport
        if transport is None or not addr:
            return
        sock = getattr(transport, "socket", None)
        try:
            if sock is not None:
                sock.sendto(reply, addr)
            else:
                transport.write(reply, addr)
        except OSError as error:
            if error.errno != errno.ECONNREFUSED:
                log.warn("cannot send a fuzzy reply to {peer}: {error}", peer=addr, error=error)


@dataclass(slots=True)
class _PendingReply:
    """The place of one request in a connection's reply order."""

    done: bool = False
    reply: bytes | None = None


class FuzzyStreamProtocol(Protocol):
    """One TCP connection to the storage (see the module docstring)."""

    def __init__(self, factory: FuzzyStreamFactory) -> None:
        self.factory = factory
        self.decoder = FuzzyStreamDecoder()
        self.address: IPAddress | None = None
        self._replies: deque[_PendingReply] = deque()
        self._paused = False
        self._closed = False
        self._idle: IDelayedCall | None = None
        self._timeout = factory.timeout

    def _producer(self) -> IPushProducer:
        return cast(IPushProducer, self.transport)

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.address = _peer_address(self.transport.getPeer())
        if self.address in self.factory.storage.policy.blocked:
            self.factory.storage.stats.blocked_requests += 1
            log.info("fuzzy TCP connection from blocked {address} closed",
                     address=str(self.address))
            self._closed = True
            self.transport.loseConnection()
            return
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        self._idle = self.factory.clock.callLater(self._timeout, self._timed_out)

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        if self._idle is not None and self._idle.active():
            self._idle.reset(self._timeout)
        try:
            frames = self.decoder.feed(data)
        except FuzzyProtocolError as error:
            log.info("fuzzy TCP connection from {peer} closed: {reason}",
                     peer=str(self.address), reason=str(error))
            self._close()
            return
        for payload in frames:
            slot = _PendingReply()
            self._replies.append(slot)
            answer = self.factory.storage.handle(payload, self.address)
            if answer is None or isinstance(answer, bytes):
                self._answered(answer, slot)
            else:
                answer.addCallback(self._answered, slot)
        if len(self._replies) >= MAX_PENDING_REPLIES and not self._paused:
            self._paused = True
            self._producer().pauseProducing()

    def _answered(self, reply: bytes | None, slot: _PendingReply) -> None:
        slot.done, slot.reply = True, reply
        while self._replies and self._replies[0].done:
            ready = self._replies.popleft().reply
            if ready is not None and not self._closed and self.transport is not None:
                self.transport.write(encode_frame(ready))
        if self._paused and len(self._replies) < MAX_PENDING_REPLIES and not self._closed:
            self._paused = False
            self._producer().resumeProducing()

    def _timed_out(self) -> None:
        self._idle = None
        log.info("fuzzy TCP connection from {peer} idle for {seconds} s; closed",
                 peer=str(self.address), seconds=self._timeout)
        self._close()

    def _stop_idle_timer(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None

    def _close(self) -> None:
        self._closed = True
        self._stop_idle_timer()
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        self._stop_idle_timer()
        self._replies.clear()


class FuzzyStreamFactory(Factory):
    """Makes a :class:`FuzzyStreamProtocol` per connection.

    Attributes:
        storage: the shared pipeline.
        clock: time source of the idle timeout.
        timeout: idle timeout in seconds (``tcp_timeout``); may be changed at
            run time, new connections use the new value.
    """

    noisy = False

    def __init__(self, storage: FuzzyStorage, clock: IReactorTime, timeout: float) -> None:
        self.storage = storage
        self.clock = clock
        self.timeout = timeout

    def buildProtocol(self, addr: IAddress | None) -> FuzzyStreamProtocol:
        return FuzzyStreamProtocol(self)
