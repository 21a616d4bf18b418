"""Failover: our proxy in front of two upstreams, one of which dies under load.

In-process fake scanners on loopback answer ``/checkv2`` after a short delay
and ``/ping`` at once; "killing" one stops its listener and aborts its
connections, so requests in flight there fail mid-way and must be retried on
the other.  Every one of 500 concurrent requests must be answered; the health
checks mark the dead upstream down and revive it once it listens again;
master-slave moves to the slave and back.  The last test does the same with
two real Rspamd 3.4 workers, one stopped mid-run (inside ``unshare -n``).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial import unittest

from rspamd_tx.config import ucl
from rspamd_tx.config.tree import UclObject
from rspamd_tx.config.workers import GlobalOptions, ProxyOptions, check_config
from rspamd_tx.protocols.http_codec import EndOfMessage, Request, RequestParser, encode_response
from rspamd_tx.proxy.failure_policy import FailurePolicyTable
from rspamd_tx.proxy.http_listener import HttpListenerFactory
from rspamd_tx.proxy.upstream_scanner import HealthSettings, UpstreamScanner
from rspamd_tx.upstreams.balancer import AttemptOutcome, UpstreamState
from rspamd_tx.upstreams.http_client import ScannerClient, ScannerResponse

from tests.peers.rspamd import skip_unless_rspamd, start_rspamd

GTUBE = (
    b"From: a@example.com\r\nTo: b@example.org\r\nSubject: t\r\n\r\n"
    b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X\r\n"
)
POLL = 0.05


class _FakeScannerConnection(Protocol):
    factory: FakeScanner

    def __init__(self) -> None:
        self.parser = RequestParser()
        self.request: Request | None = None

    def connectionMade(self) -> None:
        self.factory.connections.add(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.connections.discard(self)

    def dataReceived(self, data: bytes) -> None:
        for event in self.parser.feed(data):
            if isinstance(event, Request):
                self.request = event
            elif isinstance(event, EndOfMessage):
                assert self.request is not None
                if self.request.target == "/ping":
                    self.answer(b"text/plain", b"pong\r\n")
                else:
                    self.factory.received += 1
                    reactor.callLater(self.factory.delay, self.answer_scan)

    def answer_scan(self) -> None:
        if self.transport is None or not self.transport.connected:
            return
        self.factory.served += 1
        body = json.dumps({"action": "no action", "score": 0.0, "scanner": self.factory.name})
        self.answer(b"application/json", body.encode())

    def answer(self, content_type: bytes, body: bytes) -> None:
        assert self.transport is not None
        self.transport.write(
            encode_response(
                200, "OK", [("Connection", "close"), ("Content-Type", content_type.decode())], body
            )
        )
        self.transport.loseConnection()


class FakeScanner(ServerFactory):
    """A scanner on loopback answering every scan after ``delay`` seconds."""

    protocol = _FakeScannerConnection
    noisy = False

    def __init__(self, name: str, delay: float = 0.05) -> None:
        self.name = name
        self.delay = delay
        self.connections: set[_FakeScannerConnection] = set()
        self.port: IListeningPort | None = None
        self.port_number = 0
        self.received = 0
        self.served = 0

    def start(self) -> None:
        """Listen (again on the same port once it had one)."""
        self.port = reactor.listenTCP(self.port_number, self, interface="127.0.0.1")
        self.port_number = self.port.getHost().port

    def kill(self) -> Deferred[Any]:
        """Stop listening and abort every connection, as a crash would."""
        for connection in list(self.connections):
            assert connection.transport is not None
            connection.transport.abortConnection()
        port, self.port = self.port, None
        assert port is not None
        return port.stopListening()

    def stop(self) -> Any:
        if self.port is not None:
            return self.kill()
        return None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port_number}"


def proxy_options(text: str) -> ProxyOptions:
    tree = UclObject(worker=UclObject(rspamd_proxy=ucl.loads(text)))
    config, diagnostics = check_config(tree)
    errors = [d for d in diagnostics if d.severity == "error"]
    assert not errors, errors
    options = config.workers[0].options
    assert isinstance(options, ProxyOptions)
    return options


class FailoverTestCase(unittest.TestCase):
    """Helpers: start a proxy over an upstream line, send many requests, poll states."""

    timeout = 240

    def start_proxy(self, hosts: str, health: HealthSettings | None = None) -> tuple[UpstreamScanner, int]:
        options = proxy_options(
            f'timeout = 10s; max_retries = 5; upstream {{ local {{ default = yes; hosts = "{hosts}"; }} }}'
        )
        scanner = UpstreamScanner(
            options,
            GlobalOptions(),
            reactor,
            health=health or HealthSettings(interval=0.1, fail_after=2, timeout=1.0),
        )
        scanner.start()
        self.addCleanup(scanner.stop)
        for checker in scanner.health_checkers():
            checker.startService()
            self.addCleanup(checker.stopService)
        factory = HttpListenerFactory(
            scanner, options, FailurePolicyTable.from_options(options.failure_policy), reactor
        )
        port = reactor.listenTCP(0, factory, interface="127.0.0.1", backlog=1024)
        self.addCleanup(port.stopListening)
        return scanner, port.getHost().port

    def fake(self, name: str, delay: float = 0.05) -> FakeScanner:
        scanner = FakeScanner(name, delay)
        scanner.start()
        self.addCleanup(scanner.stop)
        return scanner

    def client(self) -> ScannerClient:
        client = ScannerClient(reactor, max_idle_per_address=0)
        self.addCleanup(client.close)
        return client

    def send(self, client: ScannerClient, port: int, count: int, body: bytes = b"Subject: x\r\n\r\nbody\r\n") -> list[Deferred[ScannerResponse]]:
        return [
            client.request(
                ("127.0.0.1", port), "POST", "/checkv2",
                [("Connection", "close"), ("Rcpt", f"r{index}@example.org")], body, timeout=60,
            )
            for index in range(count)
        ]

    @inlineCallbacks
    def wait_for(self, predicate: Any, what: str, limit: float = 30.0) -> Any:
        waited = 0.0
        while not predicate():
            if waited >= limit:
                self.fail(f"timed out waiting for {what}")
            yield deferLater(reactor, POLL, lambda: None)
            waited += POLL

    @inlineCallbacks
    def all_answered(self, requests: list[Deferred[ScannerResponse]]) -> Any:
        results = yield DeferredList(requests, consumeErrors=True)
        failures = [value for ok, value in results if not ok]
        self.assertEqual(failures, [], f"{len(failures)} of {len(requests)} requests lost")
        statuses = {value.status for _, value in results}
        self.assertEqual(statuses, {200})
        return [json.loads(value.body) for _, value in results]


class RoundRobinFailoverTests(FailoverTestCase):
    """Two upstreams in round-robin, one killed under load."""

    @inlineCallbacks
    def test_kill_under_load(self) -> Any:
        """500 requests in flight, one upstream killed: all answered; it goes down and comes back."""
        first, second = self.fake("first"), self.fake("second")
        scanner, port = self.start_proxy(f"{first.address},{second.address}")
        balancer = scanner.balancers()["local"]
        requests = self.send(self.client(), port, 500)
        yield self.wait_for(lambda: first.received >= 20, "requests reaching the first upstream")
        yield first.kill()
        results = yield self.all_answered(requests)
        self.assertEqual(len(results), 500)
        self.assertGreater(first.received, first.served, "no request was cut off by the kill")
        self.assertGreaterEqual(first.served + second.served, 500)
        yield self.wait_for(
            lambda: balancer.get(first.address).state is not UpstreamState.ALIVE,
            "the dead upstream to be marked down",
        )
        first.start()
        yield self.wait_for(
            lambda: balancer.get(first.address).state is UpstreamState.ALIVE,
            "the upstream to be revived",
        )
        served_before = first.served
        yield self.all_answered(self.send(self.client(), port, 20))
        self.assertGreater(first.served, served_before)


class MasterSlaveTests(FailoverTestCase):
    """master-slave: the master takes everything while alive."""

    @inlineCallbacks
    def test_fail_over_and_back(self) -> Any:
        """Traffic moves to the slave when the master dies and back when it returns."""
        master, slave = self.fake("master", 0.01), self.fake("slave", 0.01)
        scanner, port = self.start_proxy(f"master-slave:{master.address},{slave.address}")
        balancer = scanner.balancers()["local"]
        results = yield self.all_answered(self.send(self.client(), port, 30))
        self.assertEqual({r["scanner"] for r in results}, {"master"})
        yield master.kill()
        results = yield self.all_answered(self.send(self.client(), port, 30))
        self.assertEqual({r["scanner"] for r in results}, {"slave"})
        yield self.wait_for(
            lambda: balancer.get(master.address).state is not UpstreamState.ALIVE, "master down"
        )
        master.start()
        yield self.wait_for(
            lambda: balancer.get(master.address).state is UpstreamState.ALIVE, "master revived"
        )
        results = yield self.all_answered(self.send(self.client(), port, 30))
        self.assertEqual({r["scanner"] for r in results}, {"master"})


class RealRspamdFailoverTests(FailoverTestCase):
    """Two real Rspamd normal workers, one stopped while requests are in flight."""

    skip = skip_unless_rspamd()

    @inlineCallbacks
    def test_stop_one_rspamd_mid_run(self) -> Any:
        """Every GTUBE request is answered with reject although one Rspamd stops mid-run."""
        one = yield start_rspamd(reactor, workers=("normal",), wait_hyperscan=False)
        self.addCleanup(one.stop)
        two = yield start_rspamd(reactor, workers=("normal",), wait_hyperscan=False)
        self.addCleanup(two.stop)
        scanner, port = self.start_proxy(
            f"{one.address('normal')},{two.address('normal')}",
            HealthSettings(interval=0.2, fail_after=2, timeout=2.0),
        )
        balancer = scanner.balancers()["local"]
        failed: list[str] = []
        scanner.add_observer(
            lambda block, event: failed.append(event.upstream)
            if isinstance(event, AttemptOutcome) and not event.ok else None
        )
        client = self.client()
        requests = self.send(client, port, 100, GTUBE)
        yield deferLater(reactor, 0.05, lambda: None)
        stopping = one.stop()
        requests += self.send(client, port, 100, GTUBE)
        yield stopping
        requests += self.send(client, port, 100, GTUBE)
        results = yield self.all_answered(requests)
        self.assertEqual({r["action"] for r in results}, {"reject"})
        self.assertIn(one.address("normal"), failed, "no attempt met the stopped Rspamd")
        yield self.wait_for(
            lambda: balancer.get(one.address("normal")).state is not UpstreamState.ALIVE,
            "the stopped Rspamd to be marked down",
        )
