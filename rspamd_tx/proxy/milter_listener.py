"""The proxy's milter listener: one :class:`MilterProtocol` per MTA connection.

Each connection owns its protocol state (a
:class:`~rspamd_tx.protocols.milter_codec.MilterConnection`: decoder, stage
table, bounds) and its :class:`~rspamd_tx.proxy.milter_session.MilterSession`;
the shared configuration (scanner, options, failure policy, clock) lives on
the :class:`MilterFactory`.

* ``O`` is answered as Rspamd does (version 6, Rspamd's actions ORed in, no
  reply before end of message); nothing else is answered until ``E``.
* ``E`` scans the message with the :class:`~rspamd_tx.proxy.scanning.IScanner`
  and answers with :func:`~rspamd_tx.proxy.milter_reply.result_replies`.  A
  message from a ``whitelist`` address (networks, host names, map files) is
  accepted unscanned; one larger than ``max_message`` is not scanned and
  gets the ``oversize`` failure action.
* While the scanner works, ``p`` (progress) goes out every
  ``progress_interval`` seconds so the MTA's end-of-message timeout does not
  fire.
* A failed scan (:class:`~rspamd_tx.proxy.scanning.ScanFailure`, or a reply
  that is not a JSON result) gets the failure policy's action
  (:func:`~rspamd_tx.proxy.milter_reply.failure_replies`; default ``t``).
* ``A``, ``K`` and ``Q`` while a scan is pending cancel it; several messages
  and several ``K``-separated SMTP sessions may share a connection.
* A malformed or out-of-order frame, and a close in the middle of a message,
  end that connection with a logged reason and no reply; other connections
  are unaffected.  ``GET /ping`` gets Rspamd's fixed pong.

On a real reactor :meth:`MilterFactory.adopt_stream_port` serves a listening
descriptor with :class:`~rspamd_tx.upstreams.http_client.StreamPort`, as the
HTTP listener is served; the listener works the same over any transport.
"""

from __future__ import annotations

import ipaddress
import random
import socket
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from rspamd_tx.address_lists import IPAddress, host_names, networks
from rspamd_tx.config.workers import ProxyOptions
from rspamd_tx.protocols.milter_codec import MilterConnection, MilterProtocolError, Stage, negotiate
from rspamd_tx.protocols.milter_events import (
    Abort,
    Accept,
    EndOfMessage,
    HttpPing,
    OptionNegotiation,
    Progress,
    Quit,
    QuitNewConnection,
    Response,
    ServerEvent,
)
from rspamd_tx.proxy.failure_policy import FailurePolicyTable
from rspamd_tx.proxy.milter_reply import (
    STANDARD_ACTIONS,
    ConnectionFlags,
    ReceivedHeaders,
    ReplySettings,
    failure_replies,
    parse_reply,
    result_replies,
)
from rspamd_tx.proxy.milter_session import DEFAULT_SPILL_THRESHOLD, MilterSession
from rspamd_tx.proxy.scanning import FailureClass, IScanner, ScanFailure, ScanReply
from rspamd_tx.upstreams.http_client import SocketStream, adopt_stream_port, write_now

__all__ = ["DEFAULT_PROGRESS_INTERVAL", "MilterFactory", "MilterProtocol"]

_log = Logger()

#: Seconds between two ``p`` replies while a scan is pending.
DEFAULT_PROGRESS_INTERVAL = 10.0

#: Bytes a socket transport reads at a time (Twisted's default) ...
_READ_SIZE: int = FileDescriptor.bufferSize
#: ... and while a large message is arriving (a read came back full).
_LARGE_READ_SIZE = 256 * 1024

#: Stages in which the MTA is inside a message: closing there is logged as an error.
_IN_MESSAGE = frozenset({Stage.MAIL, Stage.RCPT, Stage.DATA, Stage.HEADERS, Stage.EOH, Stage.BODY, Stage.EOM})


class MilterProtocol(Protocol):
    """One MTA connection speaking milter v6.

    Attributes:
        tag: the session tag used in logs and sent as the scan's log tag.
        milter: the connection's protocol state.
        session: the connection's session state.
    """

    factory: MilterFactory

    def __init__(self) -> None:
        self.tag = f"{random.getrandbits(24):06x}"
        self.milter = MilterConnection()
        self.session: MilterSession | None = None
        self.peer = "-"
        self._scan: Deferred[None] | None = None
        self._progress: IDelayedCall | None = None
        self._started = 0.0
        self._closed = False
        # The tag of this connection's log lines: the queue id while a
        # message is answered, else the session tag.
        self._log_tag = self.tag
        self._read_size = _READ_SIZE

    # -- Twisted API ------------------------------------------------------------

    def connectionMade(self) -> None:
        assert self.transport is not None
        factory = self.factory
        options = factory.options
        self.session = MilterSession(
            options.max_message,
            ConnectionFlags(options.discard_on_reject, options.quarantine_on_reject),
            spill_threshold=factory.spill_threshold,
            spill_dir=factory.spill_dir,
        )
        peer = self.transport.getPeer()
        self.peer = str(getattr(peer, "host", peer))
        no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if no_delay is not None and isinstance(peer, (IPv4Address, IPv6Address)):
            try:
                no_delay(True)
            except OSError:
                pass
        factory.connections.add(self)

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        assert self.session is not None
        milter = self.milter
        handle = self.session.handle
        if len(data) >= self._read_size and self._read_size < _LARGE_READ_SIZE:
            self._set_read_size(_LARGE_READ_SIZE)
        milter.receive_data(data)
        try:
            for event in milter:
                own = _OWN_EVENTS.get(type(event))
                if own is None:
                    handle(event)
                else:
                    own(self, event)
                    if self._closed:
                        return
        except MilterProtocolError as error:
            self._abandon(f"milter protocol error: {error.reason}")

    def _set_read_size(self, size: int) -> None:
        """Read up to ``size`` bytes at a time from a socket transport.

        A read that came back full means a large message is arriving: larger
        reads then mean fewer reactor turns per megabyte; the default comes
        back with the next message.
        """
        self._read_size = size
        if isinstance(self.transport, (FileDescriptor, SocketStream)):
            self.transport.bufferSize = size

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self._closed and self.milter.stage in _IN_MESSAGE:
            self._warn(
                "connection from MTA {peer} closed in the middle of a message (stage {stage})",
                peer=self.peer, stage=self.milter.stage.value,
            )
        self._closed = True
        self._cancel_scan()
        if self.session is not None:
            self.session.close()
        self.factory.connection_closed(self)

    # -- events -----------------------------------------------------------------

    def _ping(self, event: HttpPing) -> None:
        assert self.transport is not None
        self.transport.write(event.response)
        self._close()

    def _negotiate(self, event: OptionNegotiation) -> None:
        write_now(self.transport, self.milter.send(negotiate(event)))

    def _quit(self, event: Quit) -> None:
        self._cancel_scan()
        self._close()

    def _abort(self, event: Abort | QuitNewConnection) -> None:
        assert self.session is not None
        self._cancel_scan()
        self.session.handle(event)

    def _end_of_message(self, event: EndOfMessage) -> None:
        assert self.session is not None
        session = self.session
        factory = self.factory
        self._started = factory.clock.seconds()
        self._log_tag = (session.queue_id or b"").decode("utf-8", "replace") or self.tag
        if factory.whitelisted(session.ip):
            self._answer([Accept()], f"accept (whitelisted {session.ip})")
            return
        if session.message.oversize:
            failure = ScanFailure(
                FailureClass.OVERSIZE, 413,
                f"message of {session.message.size} bytes exceeds max_message "
                f"{factory.options.max_message}",
            )
            self._failed(failure)
            return
        request = session.scan_request(self.tag, factory.options.client_ca_name)
        headers = session.received_headers()
        scan = maybeDeferred(factory.scanner.scan, request)
        self._arm_progress()
        done: Deferred[None] = scan.addCallbacks(
            self._scanned, self._scan_failed, callbackArgs=(headers,)
        )
        done.addErrback(self._internal_error)
        if not done.called:
            self._scan = done

    def _scanned(self, reply: ScanReply, headers: ReceivedHeaders) -> None:
        self._scan = None
        self._stop_progress()
        if self._closed:
            return
        parsed = parse_reply(reply)
        if parsed.result is None:
            self._failed(ScanFailure(FailureClass.BAD_REPLY, reply.status, parsed.error,
                                     reply.tried or (reply.upstream,)))
            return
        assert self.session is not None
        replies = result_replies(
            parsed, headers=headers, flags=self.session.flags, settings=self.factory.settings
        )
        action = parsed.result.get("action", "-")
        score = parsed.result.get("score", "-")
        self._answer(replies, f"{action} (score {score}, upstream {reply.upstream})")

    def _scan_failed(self, failure: Failure) -> None:
        self._scan = None
        self._stop_progress()
        if self._closed or failure.check(CancelledError):
            return
        if isinstance(failure.value, ScanFailure):
            self._failed(failure.value)
        else:
            _log.failure("scanner failed unexpectedly", failure, log_tag=self._log_tag)
            self._failed(ScanFailure(FailureClass.BAD_REPLY, 500, "Internal error"))

    def _internal_error(self, failure: Failure) -> None:
        """Answering went wrong here: log it and close rather than leave the MTA waiting."""
        self._scan = None
        _log.failure("answering a scan failed", failure, log_tag=self._log_tag)
        self._abandon("internal error while answering the scan")

    def _failed(self, failure: ScanFailure) -> None:
        action = self.factory.policy.action_for(failure)
        replies = failure_replies(action, failure, self.factory.settings)
        self._answer(replies, f"scan failed ({failure}), policy {action.value}", warn=True)

    def _answer(self, replies: list[Response], outcome: str, warn: bool = False) -> None:
        """Write the end-of-message replies at once, log the outcome, start the next message."""
        assert self.transport is not None and self.session is not None
        session = self.session
        send = self.milter.send
        write_now(self.transport, b"".join([send(reply) for reply in replies]))
        _log.emit(
            LogLevel.warn if warn else LogLevel.info,
            "milter {peer} from {sender} ({size} bytes): {outcome}, replies {codes}, {duration:.3f}s",
            log_tag=self._log_tag,
            peer=self.peer,
            sender=(session.sender or b"-").decode("utf-8", "replace"),
            size=session.message.size,
            outcome=outcome,
            codes=b"".join([reply.code for reply in replies]).decode("latin-1"),
            duration=self.factory.clock.seconds() - self._started,
        )
        session.reset_message()
        self._log_tag = self.tag
        if self._read_size != _READ_SIZE:
            self._set_read_size(_READ_SIZE)

    def _warn(self, format: str, **kwargs: object) -> None:
        """Log a warning tagged as this connection's lines are."""
        _log.warn(format, log_tag=self._log_tag, **kwargs)

    # -- progress ---------------------------------------------------------------

    def _arm_progress(self) -> None:
        interval = self.factory.progress_interval
        if interval > 0:
            self._progress = self.factory.clock.callLater(interval, self._send_progress)

    def _send_progress(self) -> None:
        self._progress = None
        if self._closed or self.transport is None:
            return
        self.transport.write(self.milter.send(Progress()))
        self._arm_progress()

    def _stop_progress(self) -> None:
        progress, self._progress = self._progress, None
        if progress is not None and progress.active():
            progress.cancel()

    # -- closing ----------------------------------------------------------------

    def _cancel_scan(self) -> None:
        self._stop_progress()
        scan, self._scan = self._scan, None
        if scan is not None:
            scan.cancel()

    def _abandon(self, why: str) -> None:
        """Close without a reply after a protocol problem."""
        self._warn("closing milter connection from {peer}: {why}", peer=self.peer, why=why)
        self._cancel_scan()
        self._close()

    def _close(self) -> None:
        self._closed = True
        if self.transport is not None:
            self.transport.loseConnection()


#: The events the listener acts on itself; the session handles the others.
_OWN_EVENTS: dict[type, Callable[[MilterProtocol, Any], None]] = {
    HttpPing: MilterProtocol._ping,
    OptionNegotiation: MilterProtocol._negotiate,
    EndOfMessage: MilterProtocol._end_of_message,
    Quit: MilterProtocol._quit,
    Abort: MilterProtocol._abort,
    QuitNewConnection: MilterProtocol._abort,
}


class MilterFactory(ServerFactory):
    """Shared state of the milter listener's connections.

    Args:
        scanner: scans the messages.
        options: the proxy worker's options.
        policy: the failure policy table.
        reactor: time (``IReactorTime``) for progress replies and durations.
        actions: the registered action names (Rspamd's standard ones; add
            ``discard``/``quarantine`` when the configuration declares them).
        server_name: ``X-Rspamd-Server`` of ``extended_spam_headers``
            (default: this host's name).
        progress_interval: seconds between ``p`` replies while scanning (0: none).
        spill_threshold: message bytes kept in memory before spilling to disk.
        spill_dir: directory of spilled messages.

    Attributes:
        connections: open connections.
        settings: the reply settings derived from ``options``.
    """

    protocol = MilterProtocol
    noisy = False

    def __init__(
        self,
        scanner: IScanner,
        options: ProxyOptions,
        policy: FailurePolicyTable,
        reactor: Any,
        *,
        actions: Collection[str] = STANDARD_ACTIONS,
        server_name: str | None = None,
        progress_interval: float = DEFAULT_PROGRESS_INTERVAL,
        spill_threshold: int = DEFAULT_SPILL_THRESHOLD,
        spill_dir: str | None = None,
    ) -> None:
        self.scanner = scanner
        self.clock = reactor
        self.actions = frozenset(actions)
        self.server_name = server_name if server_name is not None else socket.gethostname()
        self.progress_interval = progress_interval
        self.spill_threshold = spill_threshold
        self.spill_dir = spill_dir
        self.connections: set[MilterProtocol] = set()
        self._hosts: Mapping[str, Iterable[IPAddress]] | None = None
        self._drained: list[Deferred[None]] = []
        self.update(options, policy)

    def update(self, options: ProxyOptions, policy: FailurePolicyTable) -> None:
        """Use new options and policy from now on (open connections included)."""
        self.options = options
        self.policy = policy
        self.settings = ReplySettings.from_options(
            options, actions=self.actions, server_name=self.server_name
        )
        self._whitelist = networks(options.whitelist, self._hosts)

    def whitelist_names(self) -> set[str]:
        """The host names in ``whitelist``: :meth:`use_hosts` wants their addresses."""
        return host_names(self.options.whitelist)

    def use_hosts(self, hosts: Mapping[str, Iterable[IPAddress]]) -> None:
        """Match ``whitelist`` host names by these addresses from now on.

        Until the first call (names not resolved yet) host names match
        nothing; networks and map files match at once.
        """
        self._hosts = hosts
        self._whitelist = networks(self.options.whitelist, hosts)

    def whitelisted(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
        """Whether ``ip`` is in ``whitelist``: its networks, the lines of its map
        files and the addresses of its host names (see :meth:`use_hosts`)."""
        return ip in self._whitelist

    def adopt_stream_port(self, reactor: Any, fileno: int, family: int) -> IListeningPort:
        """Serve this factory on (a duplicate of) the listening descriptor ``fileno``.

        See :func:`~rspamd_tx.upstreams.http_client.adopt_stream_port`.
        """
        return adopt_stream_port(reactor, fileno, family, self)

    def connection_closed(self, connection: MilterProtocol) -> None:
        """Forget a closed connection; fire :meth:`drain` waiters when none is left."""
        self.connections.discard(connection)
        if not self.connections:
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)

    def drain(self) -> Deferred[None]:
        """Fire when no connection is open any more."""
        if not self.connections:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._drained.append(d)
        return d
