"""The twistd plugins end to end: discovery, start on the shipped
configuration, /ping, SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial import unittest

from tests.helpers.net import REPO_ROOT, free_port, http_get

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
SHIPPED_TOP = os.path.join(REPO_ROOT, "conf", "rspamd.conf")


def child_env() -> dict[str, str]:
    """The environment of a twistd run: our repo on the path."""
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    env.pop("RSPAMD_TX_CONFDIR", None)
    return env


class Twistd(ProcessProtocol):
    """A twistd process: collects its output, fires ``ended`` with the reason."""

    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[list[Failure]] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback([reason])


class DiscoveryTests(unittest.TestCase):
    """twistd finds both plugins from anywhere."""

    def test_help_lists_plugins(self) -> None:
        """twistd --help, run outside the repository, lists both taps."""
        result = subprocess.run([TWISTD, "--help"], cwd=self.mktemp_dir(),
                                env=child_env(), capture_output=True,
                                text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("rspamd-proxy", result.stdout)
        self.assertIn("fuzzy-storage", result.stdout)

    def test_taps_install_no_reactor(self) -> None:
        """Importing the plugin and tap modules installs no reactor and does
        not import txredisapi."""
        code = ("import sys; import twisted.plugins.rspamd_tx_plugins, "
                "rspamd_tx.proxy.tap, rspamd_tx.fuzzy.tap; "
                "print('twisted.internet.reactor' in sys.modules, "
                "'txredisapi' in sys.modules)")
        result = subprocess.run([sys.executable, "-c", code],
                                cwd=self.mktemp_dir(), env=child_env(),
                                capture_output=True, text=True, timeout=60)
        self.assertEqual(result.stdout.split(), ["False", "False"],
                         result.stderr)

    def mktemp_dir(self) -> str:
        path: str = os.path.abspath(self.mktemp())
        os.makedirs(path)
        return path


class ShippedConfigTests(unittest.TestCase):
    """twistd -n <tap> on the shipped configuration with local.d overrides."""

    timeout = 90

    def setUp(self) -> None:
        if not os.path.isfile(SHIPPED_TOP):
            raise unittest.SkipTest("no shipped configuration in conf/")
        self.base = os.path.abspath(self.mktemp())
        self.etc = os.path.join(self.base, "etc")
        os.makedirs(os.path.join(self.etc, "local.d"))
        self.dirs = {}
        for name in ("RUNDIR", "DBDIR", "LOGDIR"):
            self.dirs[name] = os.path.join(self.base, name.lower())
            os.makedirs(self.dirs[name])

    def local(self, name: str, text: str) -> None:
        with open(os.path.join(self.etc, "local.d", name), "w") as f:
            f.write(text)

    def start(self, tap: str, *extra: str) -> Twistd:
        """Run twistd -n ``tap`` from the temp dir; stopped after the test."""
        args = [TWISTD, "-n", "--pidfile=", tap, "-c", self.etc, *extra]
        for name, path in self.dirs.items():
            args += ["--var", f"{name}={path}"]
        process = Twistd()
        transport = reactor.spawnProcess(process, TWISTD, args,
                                         env=child_env(), path=self.base)

        def stop() -> Deferred[Any] | None:
            if process.ended.called:
                return None
            transport.signalProcess("KILL")
            return process.ended

        self.addCleanup(stop)
        process.transport_ = transport  # type: ignore[attr-defined]
        return process

    @inlineCallbacks
    def wait_ping(self, process: Twistd, port: int) -> Any:
        """Poll /ping until it answers (bounded)."""
        for _ in range(300):
            if process.ended.called:
                self.fail(f"twistd ended early:\n{process.output.decode()}")
            try:
                result = yield http_get(reactor, "127.0.0.1", port, "/ping",
                                        timeout=5)
                return result
            except Exception:
                yield deferLater(reactor, 0.1, lambda: None)
        self.fail(f"no answer on {port}:\n{process.output.decode()}")

    @inlineCallbacks
    def terminate(self, process: Twistd) -> Any:
        """SIGTERM; return the exception describing the process's end."""
        process.transport_.signalProcess("TERM")  # type: ignore[attr-defined]
        [reason] = yield process.ended
        return reason.value

    @inlineCallbacks
    def test_proxy_ping_and_sigterm(self) -> Any:
        """The proxy answers /ping and exits 0 on SIGTERM."""
        port = free_port()
        self.local("worker-proxy.inc",
                   f'bind_socket = "127.0.0.1:{port}";\ncount = 1;\n')
        process = self.start("rspamd-proxy")
        status, body = yield self.wait_ping(process, port)
        # The shipped proxy is in milter mode, whose fixed reply (as Rspamd's)
        # ends with the C string's terminating NUL.
        self.assertEqual((status, body.rstrip(b"\x00")), (200, b"pong\r\n"))
        reason = yield self.terminate(process)
        self.assertIsInstance(reason, ProcessDone, process.output)
        self.assertIn(b"rspamd_proxy#0 listening on tcp 127.0.0.1:", process.output)

    @inlineCallbacks
    def test_proxy_two_processes(self) -> Any:
        """count = 2 runs two children that both reload on SIGHUP; SIGTERM
        stops all and exits 0."""
        port = free_port()
        self.local("worker-proxy.inc",
                   f'bind_socket = "127.0.0.1:{port}";\ncount = 2;\n')
        process = self.start("rspamd-proxy")
        status, _ = yield self.wait_ping(process, port)
        self.assertEqual(status, 200)
        children = _children_of(process.transport_.pid)  # type: ignore
        self.assertEqual(len(children), 2, process.output)
        yield self.wait_output(process, b"listening", count=3)
        process.transport_.signalProcess("HUP")  # type: ignore[attr-defined]
        yield self.wait_output(process, b"configuration reloaded", count=2)
        reason = yield self.terminate(process)
        self.assertIsInstance(reason, ProcessDone, process.output)
        for pid in children:
            self.assertFalse(_alive(pid), f"child {pid} outlived the supervisor")

    @inlineCallbacks
    def wait_output(self, process: Twistd, text: bytes, count: int = 1) -> Any:
        """Poll the process's output until ``text`` shows ``count`` times
        (bounded)."""
        for _ in range(300):
            if process.output.count(text) >= count:
                return
            yield deferLater(reactor, 0.1, lambda: None)
        self.fail(f"{text!r} not logged:\n{process.output.decode()}")

    @inlineCallbacks
    def test_proxy_sighup(self) -> Any:
        """SIGHUP refuses a broken configuration (errors logged, still
        serving) and takes a good one."""
        port = free_port()
        good = f'bind_socket = "127.0.0.1:{port}";\ncount = 1;\n'
        self.local("worker-proxy.inc", good)
        process = self.start("rspamd-proxy")
        yield self.wait_ping(process, port)
        self.local("worker-proxy.inc", good + 'timeout = "soon";\n')
        process.transport_.signalProcess("HUP")  # type: ignore[attr-defined]
        yield self.wait_output(process, b"configuration reload refused")
        self.assertIn(b"local.d/worker-proxy.inc:3:", process.output)
        status, _ = yield self.wait_ping(process, port)
        self.assertEqual(status, 200)
        self.local("worker-proxy.inc", good)
        process.transport_.signalProcess("HUP")  # type: ignore[attr-defined]
        yield self.wait_output(process, b"configuration reloaded")
        reason = yield self.terminate(process)
        self.assertIsInstance(reason, ProcessDone, process.output)

    @inlineCallbacks
    def test_log_file_rotation(self) -> Any:
        """type = file logs to the file; SIGUSR1 after a rename reopens it."""
        port = free_port()
        self.local("worker-proxy.inc",
                   f'bind_socket = "127.0.0.1:{port}";\ncount = 1;\n')
        self.local("logging.inc", 'type = "file";\n'
                   'filename = "$LOGDIR/rspamd-tx.log";\n')
        log_file = os.path.join(self.dirs["LOGDIR"], "rspamd-tx.log")
        process = self.start("rspamd-proxy")
        yield self.wait_ping(process, port)
        os.rename(log_file, log_file + ".1")
        process.transport_.signalProcess(  # type: ignore[attr-defined]
            signal.SIGUSR1)
        for _ in range(300):
            if os.path.exists(log_file):
                break
            yield deferLater(reactor, 0.1, lambda: None)
        process.transport_.signalProcess("HUP")  # type: ignore[attr-defined]
        for _ in range(300):
            with open(log_file) as f:
                if "configuration reloaded" in f.read():
                    break
            yield deferLater(reactor, 0.1, lambda: None)
        yield self.terminate(process)
        with open(log_file + ".1") as f:
            self.assertIn("rspamd_proxy#0 listening on tcp", f.read())
        with open(log_file) as f:
            self.assertIn("configuration reloaded", f.read())

    @inlineCallbacks
    def test_fuzzy_datagrams_and_sigterm(self) -> Any:
        """The fuzzy storage listens on its UDP port, survives a junk
        datagram and exits 0 on SIGTERM."""
        port = free_port()
        self.local("worker-fuzzy.inc",
                   f'bind_socket = "127.0.0.1:{port}";\ncount = 1;\n')
        process = self.start("fuzzy-storage")
        yield self.wait_output(process, b"listening on udp 127.0.0.1:")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.sendto(b"hello", ("127.0.0.1", port))
        yield deferLater(reactor, 0.5, lambda: None)
        self.assertFalse(process.ended.called, process.output)
        reason = yield self.terminate(process)
        self.assertIsInstance(reason, ProcessDone, process.output)

    @inlineCallbacks
    def test_json_log(self) -> Any:
        """--json-log makes every log line a JSON object."""
        port = free_port()
        self.local("worker-proxy.inc",
                   f'bind_socket = "127.0.0.1:{port}";\ncount = 1;\n')
        process = self.start("rspamd-proxy", "--json-log")
        yield self.wait_ping(process, port)
        yield self.terminate(process)
        lines = [line for line in process.output.decode().splitlines() if line]
        self.assertTrue(lines)
        for line in lines:
            self.assertTrue(line.startswith('{"time": '), line)


def _children_of(pid: int) -> list[int]:
    """Live child PIDs of ``pid`` (from /proc)."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            children.append(int(entry))
    return children


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (zombies count as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
