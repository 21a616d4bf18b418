"""The load generator's bookkeeping: percentiles, counting, bounds and merging.

Every run here drives a fake target on a :class:`twisted.internet.task.Clock`:
each request's latency is chosen by the test, so the statistics are known
exactly.  Nothing here measures real time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from bench.loadgen import (
    FuzzyTarget,
    LoadError,
    MilterTarget,
    RunStats,
    concatenate,
    merge,
    percentile,
    run_closed_loop,
    split_message,
)
from bench.messages import text_ham
from rspamd_tx.protocols import fuzzy_codec
from rspamd_tx.protocols import milter_events as me
from rspamd_tx.protocols.fuzzy_codec import FuzzyRequest, decode_request
from rspamd_tx.protocols.milter_codec import MilterConnection


def no_cpu() -> float:
    """A CPU clock that never moves (the tests do not measure the generator)."""
    return 0.0


class FakeTarget:
    """Answers request *i* after ``delays[i]`` clock seconds; ``None`` never answers.

    A delay given as a string fails the request with :class:`LoadError` of that text
    after one second.  Tracks how many requests are in flight at once.
    """

    def __init__(self, clock: task.Clock, delays: list[float | str | None]) -> None:
        self.clock = clock
        self.delays: Iterator[float | str | None] = iter(delays)
        self.sent = 0
        self.in_flight = 0
        self.most_in_flight = 0

    def __call__(self) -> Deferred[str]:
        delay = next(self.delays)
        self.sent += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        d: Deferred[str] = Deferred()

        def settle(result: object) -> object:
            self.in_flight -= 1
            return result

        d.addBoth(settle)
        if isinstance(delay, str):
            self.clock.callLater(1.0, d.errback, LoadError(delay))
        elif delay is not None:
            self.clock.callLater(delay, d.callback, "ok")
        return d


def run(clock: task.Clock, target: Callable[[], Deferred[str]], concurrency: int,
        requests: int | None = None, duration: float | None = None,
        timeout: float = 30.0, step: float = 1 / 1024) -> RunStats:
    """Drive a run to its end by advancing ``clock`` in ``step`` increments.

    Delays and steps in these tests are binary fractions, so clock arithmetic is exact.
    """
    done = run_closed_loop(clock, target, concurrency, requests, duration, timeout,
                           cpu_seconds=no_cpu)
    results: list[RunStats] = []
    done.addCallback(results.append)
    for _ in range(10_000_000):
        if results:
            return results[0]
        clock.advance(step)
    raise AssertionError("the run did not end")


class PercentileTests(unittest.TestCase):
    """Nearest-rank percentiles."""

    def test_hundred_values(self) -> None:
        """Of 1..100, p50 is 50 and p99 is 99."""
        values = [float(i) for i in range(1, 101)]
        self.assertEqual((percentile(values, 50), percentile(values, 99)), (50.0, 99.0))

    def test_small_sample(self) -> None:
        """Of four values, p50 is the second and p99 the largest."""
        self.assertEqual((percentile([1, 2, 3, 4], 50), percentile([1, 2, 3, 4], 99)), (2, 4))

    def test_one_value(self) -> None:
        """A single value is every percentile."""
        self.assertEqual((percentile([7.0], 1), percentile([7.0], 100)), (7.0, 7.0))

    def test_no_values(self) -> None:
        """No values give nan."""
        self.assertTrue(math.isnan(percentile([], 50)))

    def test_out_of_range(self) -> None:
        """A percentile outside (0, 100] is refused."""
        self.assertRaises(ValueError, percentile, [1.0], 0)


class ClosedLoopTests(unittest.TestCase):
    """:func:`run_closed_loop` on a fake target."""

    def test_latencies_recorded_per_request(self) -> None:
        """One client: each request's latency is recorded, sorted, and the stats follow."""
        clock = task.Clock()
        delays: list[float | str | None] = [0.125, 0.375, 0.25, 0.5]
        stats = run(clock, FakeTarget(clock, delays), 1, requests=4, step=0.125)
        self.assertEqual(stats.latencies, (0.125, 0.25, 0.375, 0.5))
        self.assertEqual((stats.p50, stats.p99, stats.max), (0.25, 0.5, 0.5))
        self.assertEqual(stats.elapsed, 1.25)
        self.assertEqual(stats.rate, 3.2)

    def test_request_count_is_exact(self) -> None:
        """With a request count, exactly that many requests are sent, however many clients."""
        clock = task.Clock()
        target = FakeTarget(clock, [0.125] * 100)
        stats = run(clock, target, 7, requests=30)
        self.assertEqual((target.sent, stats.completed, stats.errors), (30, 30, 0))

    def test_concurrency_is_the_in_flight_bound(self) -> None:
        """N clients keep exactly N requests in flight, never more."""
        clock = task.Clock()
        target = FakeTarget(clock, [0.0625] * 100)
        run(clock, target, 4, requests=40)
        self.assertEqual(target.most_in_flight, 4)

    def test_closed_loop_rate(self) -> None:
        """Four clients of a 250 ms target finish 16 requests in one second: 16 req/s."""
        clock = task.Clock()
        stats = run(clock, FakeTarget(clock, [0.25] * 16), 4, requests=16)
        self.assertEqual((stats.elapsed, stats.rate), (1.0, 16.0))

    def test_errors_counted_not_timed(self) -> None:
        """Failed requests count as errors by label and leave the latencies alone."""
        clock = task.Clock()
        delays: list[float | str | None] = [0.125, "http 502", 0.125, "http 502",
                                            "milter tempfail"]
        stats = run(clock, FakeTarget(clock, delays), 1, requests=5)
        self.assertEqual((stats.completed, stats.errors), (2, 3))
        self.assertEqual(dict(stats.error_kinds), {"http 502": 2, "milter tempfail": 1})

    def test_outcomes_counted(self) -> None:
        """Each success is counted under the outcome its request fired with."""
        clock = task.Clock()
        stats = run(clock, FakeTarget(clock, [0.125] * 3), 1, requests=3)
        self.assertEqual(dict(stats.outcomes), {"ok": 3})

    def test_unanswered_request_times_out(self) -> None:
        """An unanswered request is a timeout error after ``timeout`` s; the run ends."""
        clock = task.Clock()
        stats = run(clock, FakeTarget(clock, [None, 0.125]), 1, requests=2, timeout=2.0)
        self.assertEqual((stats.completed, stats.errors, dict(stats.error_kinds)),
                         (1, 1, {"timeout": 1}))
        self.assertEqual((stats.latencies, stats.elapsed), ((0.125,), 2.125))

    def test_duration_bounds_the_run(self) -> None:
        """With a duration, clients stop starting requests once it has passed."""
        clock = task.Clock()
        target = FakeTarget(clock, [0.25] * 1000)
        stats = run(clock, target, 2, duration=1.0)
        self.assertEqual((target.sent, stats.completed, stats.elapsed), (8, 8, 1.0))

    def test_synchronous_target(self) -> None:
        """A target answering at once does not recurse: many requests, zero latency."""
        clock = task.Clock()
        stats = run(clock, lambda: defer.succeed("ok"), 1, requests=5000)
        self.assertEqual((stats.completed, stats.max), (5000, 0.0))

    def test_needs_a_bound(self) -> None:
        """A run with neither a request count nor a duration is refused."""
        clock = task.Clock()
        self.assertRaises(ValueError, run_closed_loop, clock, FakeTarget(clock, []), 1)

    def test_generator_cpu_share(self) -> None:
        """Generator CPU use is its CPU seconds over the run's wall seconds."""
        clock = task.Clock()
        readings = iter([10.0, 10.5])
        done = run_closed_loop(clock, FakeTarget(clock, [1.0]), 1, requests=1,
                               cpu_seconds=lambda: next(readings))
        clock.advance(1.0)
        stats = self.successResultOf(done)
        self.assertAlmostEqual(stats.generator_cpu, 0.5)


class MergeTests(unittest.TestCase):
    """Stats of generator processes that ran at the same time."""

    def test_merge_adds_up(self) -> None:
        """Latencies merge sorted; counts add; the span runs from first start to last end."""
        a = RunStats((0.1, 0.3), 1, started=100.0, ended=102.0, cpu_seconds=1.0,
                     outcomes={"accept": 2}, error_kinds={"timeout": 1})
        b = RunStats((0.2,), 2, started=100.5, ended=104.0, cpu_seconds=2.0,
                     outcomes={"accept": 1}, error_kinds={"http 502": 2})
        merged = merge([a, b])
        self.assertEqual(merged.latencies, (0.1, 0.2, 0.3))
        self.assertEqual((merged.errors, merged.processes, merged.elapsed), (3, 2, 4.0))
        self.assertEqual(dict(merged.outcomes), {"accept": 3})
        self.assertEqual(dict(merged.error_kinds), {"timeout": 1, "http 502": 2})
        self.assertAlmostEqual(merged.rate, 0.75)
        self.assertAlmostEqual(merged.generator_cpu, 3.0 / 4.0 / 2)

    def test_merge_nothing(self) -> None:
        """Merging no runs is refused."""
        self.assertRaises(ValueError, merge, [])

    def test_json_round_trip(self) -> None:
        """What a generator process prints reads back to the same stats."""
        stats = RunStats((0.5, 0.25), 3, 1.0, 2.0, 0.5, 1, {"hit": 2}, {"timeout": 3})
        again = RunStats.from_json(stats.to_json())
        self.assertEqual(again.latencies, (0.25, 0.5))
        self.assertEqual(again, RunStats((0.25, 0.5), 3, 1.0, 2.0, 0.5, 1, {"hit": 2},
                                         {"timeout": 3}))

    def test_empty_run_numbers(self) -> None:
        """A run without successes has rate 0 and nan latencies."""
        stats = RunStats((), 4, 0.0, 1.0)
        self.assertEqual((stats.rate, stats.errors), (0.0, 4))
        self.assertTrue(math.isnan(stats.p99))


class MilterSessionTests(unittest.TestCase):
    """The milter transport plays a well-ordered MTA, checked by the project's own codec."""

    def session(self, replies_to_eom: list[Any], no_reply: int = me.NOREPLY_MASK
                ) -> tuple[Deferred[str], list[Any], StringTransport]:
        """Run one session against a filter that negotiates ``no_reply``.

        The filter continues every command that is owed a reply and answers
        the end of message with ``replies_to_eom``.  Returns the request's
        Deferred, the commands the filter accepted and the MTA's transport.
        """
        events: list[Any] = []
        target = MilterTarget(None, "127.0.0.1", 0, text_ham(2048))
        done: Deferred[str] = Deferred()
        exchange = target._exchange(done)
        transport = StringTransport()
        exchange.makeConnection(transport)
        filter_side = MilterConnection()
        for _ in range(100):
            written = transport.value()
            transport.clear()
            filter_side.receive_data(written)
            answer = b""
            for event in filter_side:
                events.append(event)
                if isinstance(event, me.OptionNegotiation):
                    answer += filter_side.send(me.OptionNegotiationReply(
                        me.PROTOCOL_VERSION, me.ACTIONS_MASK, no_reply))
                elif isinstance(event, me.EndOfMessage):
                    answer += b"".join(filter_side.send(r) for r in replies_to_eom)
                elif filter_side.reply_owed is not None:
                    answer += filter_side.send(me.Continue())
            if not answer:
                break
            exchange.dataReceived(answer)
        return done, events, transport

    def test_accepted_session(self) -> None:
        """A whole session is in order; header changes before the verdict are skipped."""
        done, events, transport = self.session(
            [me.AddHeader(b"X-Spam", b"No"), me.Accept()])
        self.assertEqual(self.successResultOf(done), "accept")
        headers, body = split_message(text_ham(2048))
        self.assertEqual([(e.name, e.value) for e in events if isinstance(e, me.Header)],
                         headers)
        self.assertEqual(b"".join(e.data for e in events if isinstance(e, me.BodyChunk)), body)
        self.assertIsInstance(events[-1], me.Quit)
        self.assertTrue(transport.disconnecting)

    def test_replies_awaited_per_command(self) -> None:
        """Without no-reply flags the MTA waits for a reply to every command."""
        done, events, _ = self.session([me.Accept()], no_reply=0)
        self.assertEqual(self.successResultOf(done), "accept")
        self.assertEqual(sum(isinstance(e, me.EndOfMessage) for e in events), 1)

    def test_tempfail_is_an_error(self) -> None:
        """A temporary failure verdict fails the request."""
        done, _, _ = self.session([me.Tempfail()])
        self.assertEqual(str(self.failureResultOf(done, LoadError).value), "milter tempfail")

    def test_reject_code_is_an_outcome(self) -> None:
        """A 5xx reply code is a successful session with that outcome."""
        done, _, _ = self.session([me.ReplyCode(b"554", b"5.7.1", b"Spam")])
        self.assertEqual(self.successResultOf(done), "reply 554")


class FakeUdpPort:
    """A UDP port that keeps what is written to it."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def write(self, datagram: bytes, address: Any) -> None:
        self.sent.append((datagram, address))

    def stopListening(self) -> None:  # noqa: N802 (Twisted API)
        pass


class FakeUdpReactor:
    """``listenUDP`` only: every listener gets a :class:`FakeUdpPort`."""

    def __init__(self) -> None:
        self.ports: list[FakeUdpPort] = []

    def listenUDP(  # noqa: N802 (Twisted API)
            self, port: int, protocol: Any, interface: str = "") -> FakeUdpPort:
        self.ports.append(FakeUdpPort())
        return self.ports[-1]


class FuzzyTargetTests(unittest.TestCase):
    """Fuzzy requests are version 4 datagrams answered by tag; refusals are errors."""

    def send(self, command: str) -> tuple[FuzzyTarget, Deferred[str], FuzzyRequest]:
        """Send one request; return the target, its Deferred and the decoded datagram."""
        reactor = FakeUdpReactor()
        target = FuzzyTarget(reactor, "127.0.0.1", 11335, command, digests=4, seed=3)
        d = target()
        datagram, address = reactor.ports[0].sent[-1]
        self.assertEqual(address, ("127.0.0.1", 11335))
        return target, d, decode_request(datagram)

    def answer(self, target: FuzzyTarget, tag: int, value: int, prob: float) -> None:
        client, _ = target.clients[0]
        reply = fuzzy_codec.FuzzyReply(value, 1, tag, prob)
        client.datagramReceived(
            fuzzy_codec.encode_reply_body(reply, fuzzy_codec.Epoch.EPOCH11), None)

    def test_request_is_version_4(self) -> None:
        """A CHECK goes out as a plaintext version 4 command for a pool digest."""
        target, _, request = self.send("check")
        self.assertEqual((request.command.version, request.command.command),
                         (4, fuzzy_codec.Command.CHECK))
        self.assertIn(request.command.digest, target.digests)

    def test_check_hit(self) -> None:
        """A CHECK answered with prob 1 is a hit."""
        target, d, request = self.send("check")
        self.answer(target, request.command.tag, 10, 1.0)
        self.assertEqual(self.successResultOf(d), "hit")

    def test_check_miss(self) -> None:
        """A CHECK answered with a zero reply is a miss."""
        target, d, request = self.send("check")
        self.answer(target, request.command.tag, 0, 0.0)
        self.assertEqual(self.successResultOf(d), "miss")

    def test_other_tags_ignored(self) -> None:
        """A reply carrying another tag does not answer the request."""
        target, d, request = self.send("check")
        self.answer(target, (request.command.tag + 1) % 2**32, 0, 1.0)
        self.assertNoResult(d)

    def test_refusal_is_an_error(self) -> None:
        """A WRITE refused with 403 fails with that code."""
        target, d, request = self.send("write")
        self.answer(target, request.command.tag, 403, 0.0)
        self.assertEqual(str(self.failureResultOf(d, LoadError).value), "fuzzy 403")


class ConcatenateTests(unittest.TestCase):
    """Stats of one target measured in slices, one after another."""

    def test_durations_add_up(self) -> None:
        """Slices add their latencies, counts and durations; gaps between them do not count."""
        a = RunStats((0.25,), 1, started=10.0, ended=12.0, cpu_seconds=1.0,
                     outcomes={"hit": 1}, error_kinds={"timeout": 1})
        b = RunStats((0.125, 0.5), 0, started=20.0, ended=23.0, cpu_seconds=0.5,
                     outcomes={"hit": 2})
        joined = concatenate([a, b])
        self.assertEqual(joined.latencies, (0.125, 0.25, 0.5))
        self.assertEqual((joined.errors, joined.elapsed, joined.processes), (1, 5.0, 1))
        self.assertEqual((dict(joined.outcomes), dict(joined.error_kinds)),
                         ({"hit": 3}, {"timeout": 1}))
        self.assertEqual((joined.rate, joined.generator_cpu), (0.6, 0.3))

    def test_concatenate_nothing(self) -> None:
        """Concatenating no runs is refused."""
        self.assertRaises(ValueError, concatenate, [])
