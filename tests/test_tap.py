"""Tests for the taps: rspamd_tx.proxy.tap and rspamd_tx.fuzzy.tap."""

from __future__ import annotations

import os
from typing import TypeVar

from twisted.application.service import Application, IServiceCollection
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver
from twisted.python.failure import Failure
from twisted.python import usage
from twisted.trial import unittest

from rspamd_tx.config.bind import InetListen
from rspamd_tx.config.ucl import loads
from rspamd_tx.config.workers import Config, WorkerConfig, check_config
from rspamd_tx.fuzzy import tap as fuzzy_tap
from rspamd_tx.fuzzy.server import FuzzyWorker, build_worker as build_fuzzy
from rspamd_tx.logging import LogSettings
from rspamd_tx.proxy import tap as proxy_tap
from rspamd_tx.proxy.server import ProxyWorker, build_worker as build_proxy
from rspamd_tx.runtime import WorkerService, WorkerTree, is_error
from rspamd_tx.supervisor import ParentWatch, Supervisor

from tests.helpers.confdir import make_config

PROXY_ONE = 'bind_socket = "127.0.0.1:11332";\ncount = 1;\n'


def worker_config(text: str) -> tuple[Config, WorkerConfig]:
    """The checked configuration of ``text`` and its only worker."""
    config, diagnostics = check_config(loads(text))
    errors = [str(d) for d in diagnostics if is_error(d)]
    if errors:
        raise AssertionError(errors)
    [worker] = config.workers
    return config, worker


_Options = TypeVar("_Options", bound=usage.Options)


def parse(options: _Options, args: list[str]) -> _Options:
    options.parseOptions(args)
    return options


class OptionsTests(unittest.TestCase):
    """Command-line parsing and configuration checking."""

    def test_options(self) -> None:
        """-c, repeated --var, --json-log and --log-level are read."""
        local = make_config(self, {"worker-proxy.inc": PROXY_ONE})
        options = parse(proxy_tap.Options(), [
            "-c", local, "--var", "RUNDIR=/tmp/r", "--var", "X=a=b",
            "--json-log", "--log-level", "debug"])
        self.assertEqual(options["config"], local)
        self.assertEqual(options["var"], {"RUNDIR": "/tmp/r", "X": "a=b"})
        self.assertEqual(options.log_settings,
                         LogSettings("console", None, "debug", True))

    def test_config_directory(self) -> None:
        """local.d/worker-proxy.inc in --config sets the proxy's listeners."""
        local = make_config(self, {"worker-proxy.inc": PROXY_ONE})
        options = parse(proxy_tap.Options(), ["--config", local])
        [(index, worker, specs)] = options.workers
        self.assertEqual((index, worker.type, worker.common.count),
                         (0, "rspamd_proxy", 1))
        self.assertEqual(specs, [InetListen("127.0.0.1", 11332,
                                            "127.0.0.1:11332")])

    def test_default_port_per_worker(self) -> None:
        """A bind line without port takes the worker type's port."""
        local = make_config(self, {
            "worker-proxy.inc": 'bind_socket = "127.0.0.1";\n',
            "worker-fuzzy.inc": 'bind_socket = "127.0.0.1";\ncount = 1;\n'})
        proxy = parse(proxy_tap.Options(), ["-c", local])
        fuzzy = parse(fuzzy_tap.Options(), ["-c", local])
        self.assertEqual(proxy.workers[0][2],
                         [InetListen("127.0.0.1", 11332, "127.0.0.1")])
        self.assertEqual(fuzzy.workers[0][2],
                         [InetListen("127.0.0.1", 11335, "127.0.0.1")])

    def test_bad_var(self) -> None:
        """--var without '=' is a usage error."""
        with self.assertRaises(usage.UsageError) as caught:
            parse(proxy_tap.Options(), ["--var", "RUNDIR"])
        self.assertIn("NAME=VALUE", str(caught.exception))

    def test_bad_config_lists_locations(self) -> None:
        """Every error of a bad configuration is listed with its location."""
        local = make_config(self, {"worker-proxy.inc":
                                   'count = "lots";\ntimeout = "soon";\n'})
        with self.assertRaises(usage.UsageError) as caught:
            parse(proxy_tap.Options(), ["-c", local])
        lines = str(caught.exception).splitlines()
        self.assertEqual(lines[0], "invalid configuration:")
        self.assertEqual(len(lines), 3)
        self.assertTrue(lines[1].startswith(
            f"{local}/local.d/worker-proxy.inc:1:"), lines[1])
        self.assertTrue(lines[2].startswith(
            f"{local}/local.d/worker-proxy.inc:2:"), lines[2])

    def test_unparsable_config(self) -> None:
        """A file that does not parse is a usage error naming the file."""
        local = make_config(self, {"worker-proxy.inc": 'count = "1;\n'})
        with self.assertRaises(usage.UsageError) as caught:
            parse(proxy_tap.Options(), ["-c", local])
        self.assertIn(f"{local}/local.d/worker-proxy.inc:", str(caught.exception))

    def test_bad_bind_socket(self) -> None:
        """bind_socket errors are configuration errors."""
        local = make_config(self, {"worker-proxy.inc":
                                   'bind_socket = "127.0.0.1:http";\n'})
        with self.assertRaises(usage.UsageError) as caught:
            parse(proxy_tap.Options(), ["-c", local])
        self.assertIn("bind_socket '127.0.0.1:http': bad port 'http'",
                      str(caught.exception))

    def test_bad_log_level(self) -> None:
        """An unknown --log-level is a usage error."""
        local = make_config(self, {"worker-proxy.inc": PROXY_ONE})
        with self.assertRaises(usage.UsageError):
            parse(proxy_tap.Options(), ["-c", local, "--log-level", "loud"])

    def test_unusable_log_file(self) -> None:
        """A log file in a missing directory is a configuration error."""
        local = make_config(self, {
            "worker-proxy.inc": PROXY_ONE,
            "logging.inc": 'type = "file";\nfilename = "/nonexistent/x.log";\n'})
        with self.assertRaises(usage.UsageError) as caught:
            parse(proxy_tap.Options(), ["-c", local])
        self.assertIn("logging: directory /nonexistent does not exist",
                      str(caught.exception))

    def test_disabled_worker(self) -> None:
        """A tap whose worker is disabled (count = -1) refuses to start."""
        local = make_config(self, {})
        with self.assertRaises(usage.UsageError) as caught:
            parse(fuzzy_tap.Options(), ["-c", local])
        self.assertIn("no enabled fuzzy worker", str(caught.exception))

    def test_missing_directory(self) -> None:
        """A --config directory that does not exist is a usage error."""
        make_config(self, {})
        with self.assertRaises(usage.UsageError):
            parse(proxy_tap.Options(), ["-c", "/nonexistent/rspamd"])

    def test_child_arguments_round_trip(self) -> None:
        """child_arguments parse back to the same options."""
        local = make_config(self, {"worker-proxy.inc": PROXY_ONE})
        options = parse(proxy_tap.Options(), [
            "-c", local, "--var", "A=1", "--json-log", "--log-level", "info"])
        again = parse(proxy_tap.Options(), options.child_arguments())
        for key in ("config", "var", "json-log", "log-level"):
            self.assertEqual(again[key], options[key], key)

    def test_inherited_fds(self) -> None:
        """The internal --inherited-fds and --worker-index are numbers."""
        local = make_config(self, {"worker-proxy.inc": PROXY_ONE})
        options = parse(proxy_tap.Options(), [
            "-c", local, "--worker-index", "0", "--inherited-fds", "3,4"])
        self.assertEqual((options["inherited-fds"], options["worker-index"]),
                         ([3, 4], 0))
        with self.assertRaises(usage.UsageError):
            parse(proxy_tap.Options(), ["-c", local, "--inherited-fds", "x"])
        with self.assertRaises(usage.UsageError):
            parse(proxy_tap.Options(), [
                "-c", local, "--worker-index", "5", "--inherited-fds", "3"])


class MakeServiceTests(unittest.TestCase):
    """makeService builds the tree and nothing else."""

    def test_single_process(self) -> None:
        """count = 1: one WorkerService with the proxy's builder."""
        local = make_config(self, {"worker-proxy.inc": PROXY_ONE})
        tree = proxy_tap.makeService(parse(proxy_tap.Options(), ["-c", local]))
        self.assertIsInstance(tree, WorkerTree)
        [service] = list(tree)
        self.assertIsInstance(service, WorkerService)
        self.assertIsInstance(service.builder, ProxyWorker)
        self.assertEqual(service.ports, [])

    def test_supervised(self) -> None:
        """count = 3: a Supervisor of three processes."""
        local = make_config(self, {"worker-fuzzy.inc":
                                   'bind_socket = "127.0.0.1:0";\ncount = 3;\n'})
        tree = fuzzy_tap.makeService(parse(fuzzy_tap.Options(), ["-c", local]))
        [supervisor] = list(tree)
        self.assertIsInstance(supervisor, Supervisor)
        self.assertEqual(supervisor.count, 3)
        self.assertEqual(supervisor.children, {})

    def test_supervised_child(self) -> None:
        """A supervised process serves its worker and watches its parent."""
        local = make_config(self, {"worker-fuzzy.inc":
                                   'bind_socket = "127.0.0.1:0";\ncount = 3;\n'})
        tree = fuzzy_tap.makeService(parse(fuzzy_tap.Options(), [
            "-c", local, "--worker-index", "0", "--inherited-fds", "3"]))
        service, watch = list(tree)
        self.assertIsInstance(service, WorkerService)
        self.assertIsInstance(service.builder, FuzzyWorker)
        self.assertIsInstance(watch, ParentWatch)

    def test_log_observer_installed(self) -> None:
        """Attached to a twistd application, the tree sets its log observer."""
        local = make_config(self, {"worker-proxy.inc": PROXY_ONE})
        tree = proxy_tap.makeService(parse(proxy_tap.Options(), ["-c", local]))
        assert isinstance(tree, WorkerTree)
        application = Application("rspamd-proxy")
        tree.setServiceParent(application)
        self.assertIs(application.getComponent(ILogObserver),
                      tree.log_observer)
        self.assertIn(tree, list(IServiceCollection(application)))


class WorkerBuilderTests(unittest.TestCase):
    """The builders the taps get from build_worker keep the runtime's
    contract (rspamd_tx.runtime.WorkerBuilder)."""

    def test_proxy_builder(self) -> None:
        """The proxy serves streams only; its /ping answers pong; drain fires
        once the connection is gone."""
        clock = Clock()
        builder = build_proxy(*worker_config('worker "rspamd_proxy" {}'), clock)
        self.assertIsNone(builder.datagram_protocol())
        self.assertIsInstance(builder.services(), list)
        factory = builder.stream_factory()
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        assert protocol is not None
        transport = StringTransport(
            peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertEqual(body, b"pong\r\n")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(builder.drain())

    def test_fuzzy_builder(self) -> Deferred[None]:
        """The fuzzy storage gives a fresh datagram protocol per listener;
        once its storage has started, drain fires."""
        from twisted.internet import reactor

        dbdir = os.path.abspath(self.mktemp())
        os.makedirs(dbdir)
        builder = build_fuzzy(
            *worker_config(f'worker "fuzzy" {{ dbdir = "{dbdir}"; }}'), reactor)
        first, second = builder.datagram_protocol(), builder.datagram_protocol()
        self.assertIsInstance(first, DatagramProtocol)
        self.assertIsNot(first, second)
        self.assertIsInstance(builder.services(), list)
        builder.lifecycle.startService()
        self.addCleanup(builder.lifecycle.stopService)

        def started(ok: bool) -> Deferred[None]:
            self.assertTrue(ok)
            return builder.drain()

        return builder.lifecycle.ready.addCallback(started)
