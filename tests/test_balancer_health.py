"""Tests for the active health checks of rspamd_tx.upstreams.balancer."""

from __future__ import annotations

import random
from typing import Callable

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from rspamd_tx.upstreams.balancer import (
    Address,
    Balancer,
    BalancerEvent,
    HealthChecker,
    StateChange,
    UpstreamState,
)
from rspamd_tx.upstreams.hosts import parse_upstreams

ALIVE, DOWN, PROBING = UpstreamState.ALIVE, UpstreamState.DOWN, UpstreamState.PROBING
A, B = "127.0.0.1:1", "127.0.0.2:1"


class FakeProbe:
    """A probe whose answer per host is set by the test.

    ``answers[host]`` is True/False (answered at once), an exception (failed
    at once) or None (never answered until cancelled).
    """

    def __init__(self) -> None:
        self.answers: dict[str, object] = {"127.0.0.1": True, "127.0.0.2": True}
        self.calls: list[str] = []
        self.cancelled: list[str] = []
        self.pending: dict[str, defer.Deferred[bool]] = {}

    def __call__(self, address: Address) -> "defer.Deferred[bool]":
        host = address.host  # type: ignore[union-attr]
        self.calls.append(host)
        answer = self.answers[host]
        if answer is None:
            d: defer.Deferred[bool] = defer.Deferred(lambda _: self.cancelled.append(host))
            self.pending[host] = d
            return d
        if isinstance(answer, Exception):
            return defer.fail(answer)
        return defer.succeed(bool(answer))


def setup(
    test: unittest.TestCase, fail_after: int = 3, timeout: float | None = None
) -> tuple[Balancer, Clock, FakeProbe, HealthChecker]:
    """Build a two-upstream balancer and a running checker (10 s interval)."""
    clock = Clock()
    balancer = Balancer(parse_upstreams(f"{A},{B}"), clock=clock, rng=random.Random(1))
    balancer.start()
    probe = FakeProbe()
    checker = HealthChecker(balancer, probe, interval=10, fail_after=fail_after, timeout=timeout)
    checker.startService()
    test.addCleanup(lambda: checker.running and checker.stopService())
    return balancer, clock, probe, checker


def rounds(clock: Clock, count: int) -> None:
    """Let ``count`` more probe rounds run."""
    for _ in range(count):
        clock.advance(10)


class HealthCheckTests(unittest.TestCase):
    """Probes mark upstreams down and revive them."""

    def test_probes_every_upstream_each_round(self) -> None:
        """Each round probes every upstream once, starting immediately."""
        _, clock, probe, _ = setup(self)
        self.assertEqual(probe.calls, ["127.0.0.1", "127.0.0.2"])
        rounds(clock, 2)
        self.assertEqual(len(probe.calls), 6)

    def test_healthy_stays_alive(self) -> None:
        """Successful probes leave upstreams alive."""
        balancer, clock, _, checker = setup(self)
        rounds(clock, 3)
        self.assertEqual((checker.state(A), checker.state(B)), (ALIVE, ALIVE))

    def test_marked_down_after_fail_after(self) -> None:
        """fail_after consecutive failures mark the upstream down, not sooner."""
        balancer, clock, probe, checker = setup(self, fail_after=3)
        probe.answers["127.0.0.1"] = False
        rounds(clock, 2)
        self.assertEqual((checker.state(A), checker.failures[A]), (ALIVE, 2))
        rounds(clock, 1)
        self.assertEqual(checker.state(A), DOWN)
        self.assertNotIn(balancer.get(A), balancer.alive)

    def test_exception_counts_as_failure(self) -> None:
        """A probe error counts like an unhealthy answer."""
        balancer, clock, probe, checker = setup(self, fail_after=1)
        probe.answers["127.0.0.2"] = ConnectionError("refused")
        rounds(clock, 1)
        self.assertEqual(checker.state(B), DOWN)

    def test_success_resets_failure_count(self) -> None:
        """A success between failures restarts the count."""
        balancer, clock, probe, checker = setup(self, fail_after=2)
        probe.answers["127.0.0.1"] = False
        rounds(clock, 1)
        probe.answers["127.0.0.1"] = True
        rounds(clock, 1)
        probe.answers["127.0.0.1"] = False
        rounds(clock, 1)
        self.assertEqual(checker.state(A), ALIVE)
        self.assertEqual(checker.failures[A], 1)

    def test_probe_success_revives(self) -> None:
        """A down upstream comes back on its first successful probe."""
        balancer, clock, probe, checker = setup(self, fail_after=1)
        probe.answers["127.0.0.1"] = False
        rounds(clock, 1)
        self.assertEqual(checker.state(A), DOWN)
        probe.answers["127.0.0.1"] = True
        rounds(clock, 1)
        self.assertEqual(checker.state(A), ALIVE)
        self.assertIn(balancer.get(A), balancer.alive)

    def test_health_down_not_revived_by_timer(self) -> None:
        """An upstream marked down by health checks waits for a good probe."""
        balancer, clock, probe, checker = setup(self, fail_after=1)
        probe.answers["127.0.0.1"] = False
        rounds(clock, 20)
        self.assertEqual(checker.state(A), DOWN)

    def test_probing_state_while_in_flight(self) -> None:
        """A down upstream shows as probing while its probe is in flight."""
        balancer, clock, probe, checker = setup(self, fail_after=1, timeout=5)
        probe.answers["127.0.0.1"] = False
        rounds(clock, 1)
        probe.answers["127.0.0.1"] = None
        rounds(clock, 1)
        self.assertEqual(checker.state(A), PROBING)
        probe.pending["127.0.0.1"].callback(True)
        self.assertEqual(checker.state(A), ALIVE)

    def test_probe_timeout_cancels_and_fails(self) -> None:
        """A probe without answer within timeout is cancelled and counts as failed."""
        balancer, clock, probe, checker = setup(self, fail_after=1, timeout=4)
        probe.answers["127.0.0.1"] = None
        rounds(clock, 1)
        clock.advance(4)
        self.assertEqual(probe.cancelled, ["127.0.0.1"])
        self.assertEqual(checker.state(A), DOWN)

    def test_no_overlapping_probes(self) -> None:
        """An upstream whose probe is still running is skipped next round."""
        _, clock, probe, _ = setup(self, timeout=100)
        probe.answers["127.0.0.1"] = None
        rounds(clock, 3)
        self.assertEqual(probe.calls.count("127.0.0.1"), 2)
        self.assertEqual(probe.calls.count("127.0.0.2"), 4)

    def test_stop_cancels_loop_and_probes(self) -> None:
        """stopService stops the rounds and cancels probes in flight."""
        _, clock, probe, checker = setup(self, timeout=100)
        probe.answers["127.0.0.1"] = None
        rounds(clock, 1)
        checker.stopService()
        self.assertEqual(probe.cancelled, ["127.0.0.1"])
        calls = len(probe.calls)
        rounds(clock, 3)
        self.assertEqual(len(probe.calls), calls)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_stop_does_not_count_cancelled_probes(self) -> None:
        """Probes cancelled by stopService do not count as failures."""
        balancer, clock, probe, checker = setup(self, fail_after=1, timeout=100)
        probe.answers["127.0.0.1"] = None
        rounds(clock, 1)
        checker.stopService()
        self.assertEqual(checker.state(A), ALIVE)
        self.assertEqual(checker.failures.get(A, 0), 0)

    def test_state_changes_reach_observers(self) -> None:
        """Down and revive from health checks are StateChange events."""
        balancer, clock, probe, checker = setup(self, fail_after=1)
        events: list[BalancerEvent] = []
        balancer.observers.append(events.append)
        probe.answers["127.0.0.1"] = False
        rounds(clock, 1)
        probe.answers["127.0.0.1"] = True
        rounds(clock, 1)
        changes = [(e.new, e.reason.split(":")[0]) for e in events if isinstance(e, StateChange)]
        self.assertEqual(changes[0], (DOWN, "health check failed 1 times"))
        self.assertEqual(changes[-1], (ALIVE, "health check passed"))

    def test_invalid_arguments(self) -> None:
        """A non-positive interval or fail_after < 1 is refused."""
        balancer = Balancer(parse_upstreams(A), clock=Clock())
        probe: Callable[[Address], defer.Deferred[bool]] = FakeProbe()
        self.assertRaises(ValueError, HealthChecker, balancer, probe, interval=0)
        self.assertRaises(ValueError, HealthChecker, balancer, probe, interval=1, fail_after=0)

    def test_unknown_upstream_state(self) -> None:
        """Asking for an unknown upstream raises KeyError."""
        _, _, _, checker = setup(self)
        self.assertRaises(KeyError, checker.state, "nope")
