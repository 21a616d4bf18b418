"""Cheap Redis calls for the fuzzy backend, on top of txredisapi's connections.

txredisapi keeps the connections (pool, reconnection, ``AUTH``, ``SELECT``),
but its ``execute_command`` is costly for a storage answering thousands of
lookups a second: every argument is encoded anew, each command goes through
three Deferreds, and a reply timeout would take a ``DelayedCall`` per
command. This module sends *calls* instead:

* a call is a pre-encoded payload of one or more commands
  (:func:`encode_command`) written at once, whose replies all go to one
  :class:`PendingCall` and fire its single Deferred
  (:meth:`PipelineProtocol.send`);
* :class:`CallTimeouts` bounds every call with one timer for all of them.

A payload is written with a single ``transport.write``, so the commands of a
``MULTI`` … ``EXEC`` batch are never interleaved with other commands on the
connection and need no connection of their own.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import txredisapi
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

CALL_TIMEOUT_SLICES = 4
"""Timer ticks per timeout: a call fails between ``timeout`` and ``timeout * 1.25`` s late."""


def encode_command(args: Sequence[bytes | str | int]) -> bytes:
    """One command in RESP (array of bulk strings), as txredisapi would send it.

    ``str`` arguments are UTF-8 encoded, ``int`` ones written in decimal.

    :raises TypeError: an argument of another type (``bool`` included).
    """
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if type(arg) is not bytes:
            if isinstance(arg, str):
                arg = arg.encode()
            elif type(arg) is int:
                arg = b"%d" % arg
            else:
                raise TypeError(f"cannot send {type(arg).__name__} to Redis")
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


class PendingCall:
    """The replies of one call: fires :attr:`deferred` once.

    The Deferred fails with the first error reply (a ``txredisapi`` error
    instance, for example ``ResponseError`` or ``ConnectionError`` when the
    connection is lost) or fires with the last of the ``replies`` replies.
    Replies arriving after it fired (after a timeout, say) are consumed and
    dropped, so the replies that follow reach their own calls.
    """

    __slots__ = ("deferred", "_remaining")

    def __init__(self, replies: int) -> None:
        """
        :param replies: number of replies the payload produces (at least 1).
        """
        self.deferred: Deferred[Any] = Deferred()
        self._remaining = replies

    def take(self, reply: Any) -> bool:
        """Consume the next reply of the call; ``True`` when it was the last one."""
        self._remaining -= 1
        deferred = self.deferred
        if not deferred.called:
            if isinstance(reply, Exception):
                deferred.errback(reply)
            elif not self._remaining:
                deferred.callback(reply)
        return not self._remaining

    def fail(self, error: Any) -> None:
        """Fail the call with ``error`` (an exception or a Failure) unless it has fired."""
        if not self.deferred.called:
            self.deferred.errback(error)


class PipelineProtocol(txredisapi.RedisProtocol):  # type: ignore[misc]
    """txredisapi's protocol plus :meth:`send` for pre-encoded calls.

    Replies are routed in the order the requests were written, whether they
    were sent with :meth:`send` or txredisapi's ``execute_command`` (used by
    txredisapi itself for ``AUTH`` and ``SELECT``). txredisapi's
    ``pipeline()`` buffers commands whose replies are awaited early: it must
    not be used on a connection that :meth:`send` also uses.
    """

    def send(self, payload: bytes, call: PendingCall) -> None:
        """Write ``payload``; its replies go to ``call``.

        :raises txredisapi.ConnectionError: the connection is not usable.
        """
        if not self.connected:
            raise txredisapi.ConnectionError("Not connected")
        self.transport.write(payload)
        self.replyQueue.waiting.append(call)

    def replyReceived(self, reply: Any) -> None:  # noqa: N802 (txredisapi API)
        """Hand ``reply`` to the oldest waiting call or txredisapi command."""
        waiting = self.replyQueue.waiting
        if waiting and type(waiting[0]) is PendingCall:
            if waiting[0].take(reply):
                del waiting[0]
        else:
            self.replyQueue.put(reply)

    def dataReceived(self, data: bytes, unpause: bool = False) -> None:  # noqa: N802
        """Parse replies with hiredis and route each one (:meth:`replyReceived`).

        Without conversions to make (no ``charset``, no ``convertNumbers``,
        no txredisapi transaction under way) replies are routed as hiredis
        returns them; otherwise txredisapi's own parsing runs.
        """
        reader = getattr(self, "_reader", None)
        if (reader is None or self.charset is not None or self.convertNumbers
                or self.inTransaction):
            super().dataReceived(data, unpause)
            return
        if data:
            reader.feed(data)
        reply = reader.gets()
        while reply is not False:
            self.replyReceived(reply)
            reply = reader.gets()


class CallTimeouts:
    """Fails the calls that are not answered within ``timeout`` seconds, with one timer.

    Tracked calls are kept in slices of ``timeout / CALL_TIMEOUT_SLICES``
    seconds; a timer at each slice end fails (with
    ``txredisapi.TimeoutError``) the unanswered calls of the slices that
    ended ``timeout`` seconds ago or more. A call thus fails between
    ``timeout`` and ``timeout * (1 + 1 / CALL_TIMEOUT_SLICES)`` seconds after
    it was tracked. Tracking costs a list append; the timer runs only while
    calls tracked in the last ``timeout`` seconds or so exist.
    """

    def __init__(self, clock: IReactorTime, timeout: float) -> None:
        """
        :param clock: time source of the timer.
        :param timeout: seconds a call may wait for its replies (> 0).
        """
        self.timeout = timeout
        self._clock = clock
        self._interval = timeout / CALL_TIMEOUT_SLICES
        self._current: list[PendingCall] = []
        self._ended: deque[tuple[float, list[PendingCall]]] = deque()
        self._timer: IDelayedCall | None = None
        self._closed: Exception | None = None

    def track(self, call: PendingCall) -> None:
        """Fail ``call`` if it is still unanswered ``timeout`` seconds from now."""
        if self._closed is not None:
            call.fail(self._closed)
            return
        self._current.append(call)
        if self._timer is None:
            self._timer = self._clock.callLater(self._interval, self._tick)

    def _tick(self) -> None:
        now = self._clock.seconds()
        ended = self._ended
        if self._current:
            ended.append((now, self._current))
            self._current = []
        limit = now - self.timeout
        expired: list[PendingCall] = []
        while ended and ended[0][0] <= limit:
            expired += ended.popleft()[1]
        self._timer = self._clock.callLater(self._interval, self._tick) if ended else None
        # failing runs the callers' callbacks, which may track new calls: the state is final
        for call in expired:
            if not call.deferred.called:
                call.fail(txredisapi.TimeoutError(f"no reply within {self.timeout:g} s"))

    def close(self, error: Exception) -> None:
        """Stop the timer and fail every unanswered call with ``error``, now and later.

        A call tracked after this fails at once with ``error``.
        """
        self._closed = error
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        pending = [call for _, calls in self._ended for call in calls] + self._current
        self._ended.clear()
        self._current = []
        for call in pending:
            call.fail(error)
