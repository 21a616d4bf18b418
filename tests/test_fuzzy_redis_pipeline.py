"""Pre-encoded Redis calls: encoding, reply routing, the shared timeout timer."""

from __future__ import annotations

from typing import Any

import txredisapi
from twisted.internet import reactor as _reactor
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from rspamd_tx.fuzzy.backend import Update, UpdateKind
from rspamd_tx.fuzzy.redis_backend import RedisFuzzyBackend
from rspamd_tx.fuzzy.redis_pipeline import (
    CALL_TIMEOUT_SLICES,
    CallTimeouts,
    PendingCall,
    PipelineProtocol,
    encode_command,
)

reactor: Any = _reactor


def txredisapi_encoding(*args: Any) -> bytes:
    """What txredisapi's own ``execute_command`` writes for ``args`` (no charset)."""
    encoded: bytes = txredisapi.BaseRedisProtocol(charset=None)._build_command(*args)
    return encoded


def outcome(call: PendingCall) -> list[Any]:
    """``[result]`` or ``[Failure]`` once ``call`` fired, ``[]`` before."""
    box: list[Any] = []
    call.deferred.addBoth(box.append)
    return box


def connected_protocol() -> tuple[PipelineProtocol, StringTransport]:
    protocol = PipelineProtocol(charset=None, convertNumbers=False)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


class EncodeTests(unittest.TestCase):
    """encode_command writes what txredisapi would."""

    def test_same_bytes_as_txredisapi(self) -> None:
        """str, bytes (binary, empty) and int arguments, negative and above 2**63."""
        for args in [("HSET", b"fuzzy\x00\r\n*", "F", 7), ("INCR", b"fuzzy_count"),
                     ("HINCRBY", b"k", "V", -5), ("SETEX", b"fuzzy_1_%d" % 2**64, 172800, b""),
                     ("MULTI",), ("GET", "h\u00e9")]:
            self.assertEqual(encode_command(args), txredisapi_encoding(*args), args)

    def test_batch_commands_same_bytes(self) -> None:
        """Every command of a batch (ADD, DEL, REFRESH with shingles) encodes as before."""
        backend = RedisFuzzyBackend(reactor=reactor, clock=Clock(), servers="127.0.0.1:1")
        shingles = tuple(range(2**64 - 32, 2**64))
        commands = backend.commands([
            Update(UpdateKind.ADD, b"a" * 64, 3, -2, shingles),
            Update(UpdateKind.DEL, b"b" * 64, 1, 0, shingles),
            Update(UpdateKind.REFRESH, b"c" * 64, 1, 0, shingles),
        ], "peer")
        self.assertEqual([encode_command(c) for c in commands],
                         [txredisapi_encoding(*c) for c in commands])

    def test_hmget_shortcut(self) -> None:
        """The pre-built HMGET of a 64-byte digest equals the encoded command; others too."""
        backend = RedisFuzzyBackend(reactor=reactor, clock=Clock(), servers="127.0.0.1:1",
                                    prefix="fz\u00e9")
        for digest in (b"\r" * 64, b"x" * 63, b"y" * 65):
            self.assertEqual(backend._hmget(digest),
                             txredisapi_encoding("HMGET", "fz\u00e9".encode() + digest,
                                                 "V", "F", "C"))

    def test_other_types_refused(self) -> None:
        """bool and float are refused rather than spelled differently from txredisapi."""
        self.assertRaises(TypeError, encode_command, ("SET", b"k", True))
        self.assertRaises(TypeError, encode_command, ("SET", b"k", 1.5))


class PendingCallTests(unittest.TestCase):
    """One Deferred for the replies of a call."""

    def test_last_reply(self) -> None:
        """It fires with the last of its replies, and says which reply was the last."""
        call = PendingCall(3)
        fired = outcome(call)
        self.assertEqual([call.take(b"OK"), call.take(b"QUEUED"), fired], [False, False, []])
        self.assertTrue(call.take([1, 2]))
        self.assertEqual(fired, [[1, 2]])

    def test_first_error_fails_and_rest_consumed(self) -> None:
        """An error reply fails it at once; the following replies are still counted."""
        call = PendingCall(3)
        fired = outcome(call)
        call.take(b"OK")
        call.take(txredisapi.ResponseError("EXECABORT"))
        self.assertIsInstance(fired[0], Failure)
        self.assertTrue(fired[0].check(txredisapi.ResponseError))
        self.assertTrue(call.take(txredisapi.ResponseError("ignored")))
        self.assertEqual(len(fired), 1)

    def test_late_replies_after_failure_dropped(self) -> None:
        """After fail(), replies are consumed without firing again."""
        call = PendingCall(1)
        fired = outcome(call)
        call.fail(txredisapi.TimeoutError("late"))
        self.assertTrue(call.take(b"value"))
        self.assertEqual(len(fired), 1)
        self.assertTrue(fired[0].check(txredisapi.TimeoutError))


class ProtocolTests(unittest.TestCase):
    """PipelineProtocol routes replies in request order."""

    def test_send_writes_payload_and_routes_replies(self) -> None:
        """Pre-encoded calls and txredisapi commands share one ordered reply queue."""
        protocol, transport = connected_protocol()
        first, second = PendingCall(1), PendingCall(3)
        got_first, got_second = outcome(first), outcome(second)
        protocol.send(b"*1\r\n$4\r\nPING\r\n", first)
        own = protocol.execute_command("GET", b"k")
        got_own: list[Any] = []
        own.addBoth(got_own.append)
        protocol.send(b"payload", second)
        self.assertEqual(transport.value(),
                         b"*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\npayload")
        protocol.dataReceived(b"+PONG\r\n$1\r\nv\r\n+OK\r\n+QUE")
        self.assertEqual((got_first, got_own, got_second), ([b"PONG"], [b"v"], []))
        protocol.dataReceived(b"UED\r\n*2\r\n$-1\r\n-WRONGTYPE bad\r\n")
        self.assertEqual(got_second[0][0], None)
        self.assertIsInstance(got_second[0][1], txredisapi.ResponseError)
        self.assertEqual(protocol.replyQueue.waiting, [])

    def test_error_reply_fails_call(self) -> None:
        """An error reply fails its call only; the next call gets its own reply."""
        protocol, _ = connected_protocol()
        failing, next_call = PendingCall(1), PendingCall(1)
        got_failing, got_next = outcome(failing), outcome(next_call)
        protocol.send(b"x", failing)
        protocol.send(b"y", next_call)
        protocol.dataReceived(b"-ERR wrong\r\n:5\r\n")
        self.assertTrue(got_failing[0].check(txredisapi.ResponseError))
        self.assertEqual(got_next, [5])

    def test_connection_lost_fails_calls(self) -> None:
        """A lost connection fails every waiting call with ConnectionError."""
        protocol, _ = connected_protocol()
        calls = [PendingCall(1), PendingCall(4)]
        fired = [outcome(call) for call in calls]
        for call in calls:
            protocol.send(b"x", call)
        protocol.dataReceived(b"+OK\r\n")
        protocol.connectionLost(Failure(ConnectionError("gone")))
        self.assertEqual(fired[0], [b"OK"])
        self.assertTrue(fired[1][0].check(txredisapi.ConnectionError))
        self.assertEqual(protocol.replyQueue.waiting, [])

    def test_send_refused_when_not_connected(self) -> None:
        """send() on a connection that is not usable raises ConnectionError."""
        protocol = PipelineProtocol(charset=None, convertNumbers=False)
        self.assertRaises(txredisapi.ConnectionError, protocol.send, b"x", PendingCall(1))

    def test_conversions_kept_with_charset(self) -> None:
        """With a charset, replies are decoded by txredisapi's own parsing."""
        protocol = PipelineProtocol(charset="utf-8", convertNumbers=True)
        protocol.makeConnection(StringTransport())
        call = PendingCall(1)
        got = outcome(call)
        protocol.send(b"x", call)
        protocol.dataReceived(b"*2\r\n$2\r\n12\r\n$1\r\na\r\n")
        self.assertEqual(got, [[12, "a"]])


class CallTimeoutsTests(unittest.TestCase):
    """One timer bounds every call."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.timeouts = CallTimeouts(self.clock, 1.0)

    def test_fails_between_timeout_and_a_slice_later(self) -> None:
        """An unanswered call fails no earlier than timeout, at most one slice later."""
        self.clock.advance(0.1)
        call = PendingCall(1)
        fired = outcome(call)
        self.timeouts.track(call)
        self.clock.pump([0.01] * 99)
        self.assertEqual(fired, [])
        self.clock.pump([0.01] * round(100 / CALL_TIMEOUT_SLICES + 2))
        self.assertTrue(fired[0].check(txredisapi.TimeoutError))
        self.assertIn("1 s", fired[0].getErrorMessage())

    def test_answered_call_untouched_and_timer_stops(self) -> None:
        """Answered calls are left alone; the timer stops once nothing recent is tracked."""
        call = PendingCall(1)
        fired = outcome(call)
        self.timeouts.track(call)
        call.take(b"v")
        self.clock.pump([0.25] * 12)
        self.assertEqual((fired, self.clock.getDelayedCalls()), ([b"v"], []))

    def test_call_tracked_by_a_timed_out_caller_times_out(self) -> None:
        """A call tracked from the failure callback of a timed-out call is bounded too."""
        first, retry = PendingCall(1), PendingCall(1)
        first.deferred.addErrback(lambda _: self.timeouts.track(retry))
        fired = outcome(retry)
        self.timeouts.track(first)
        self.clock.pump([0.25] * 5)
        self.assertTrue(first.deferred.called)
        self.assertEqual(fired, [])
        self.clock.pump([0.25] * 5)
        self.assertTrue(fired[0].check(txredisapi.TimeoutError))

    def test_one_timer_for_many_calls(self) -> None:
        """Tracking many calls keeps a single DelayedCall."""
        for _ in range(100):
            self.timeouts.track(PendingCall(1))
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_close_fails_pending_now_and_later(self) -> None:
        """close() fails the unanswered calls at once, and those tracked afterwards."""
        calls = [PendingCall(1), PendingCall(1)]
        fired = [outcome(call) for call in calls]
        self.timeouts.track(calls[0])
        self.clock.advance(0.3)
        self.timeouts.track(calls[1])
        self.timeouts.close(txredisapi.ConnectionError("closed"))
        late = PendingCall(1)
        late_fired = outcome(late)
        self.timeouts.track(late)
        for box in [*fired, late_fired]:
            self.assertTrue(box[0].check(txredisapi.ConnectionError))
        self.assertEqual(self.clock.getDelayedCalls(), [])
