"""Tests for rspamd_tx.config.bind: bind_socket lines, binding and adoption."""

from __future__ import annotations

import grp
import os
import pwd
import socket
import stat
import subprocess
import sys
import textwrap
from collections.abc import Generator, Sequence
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorUNIX
from twisted.internet.protocol import ClientFactory, DatagramProtocol, Protocol
from twisted.trial import unittest
from zope.interface import implementer

from rspamd_tx.config.bind import (
    DEFAULT_BIND_PORT,
    InetListen,
    ListenSpec,
    SocketKind,
    SystemdListen,
    UnixListen,
    adopt_sockets,
    datagram_twin,
    open_listen_sockets,
    parse_bind_line,
    parse_bind_lines,
    resolve_host,
)
from rspamd_tx.config.tree import ConfigError, Location
from rspamd_tx.config.workers import ProxyOptions
from rspamd_tx.proxy.failure_policy import FailurePolicyTable
from rspamd_tx.proxy.milter_listener import MilterFactory
from rspamd_tx.proxy.scanning import IScanner, ScanReply, ScanRequest
from rspamd_tx.proxy.server import ProxyFactory
from rspamd_tx.upstreams.http_client import StreamPort

from tests.helpers.net import REPO_ROOT, http_get, ipv6_available, unix_socket_path


def fake_resolve(host: str) -> list[str]:
    """A deterministic resolver for the tests."""
    table = {
        "localhost": ["127.0.0.1", "::1"],
        "mail.example.net": ["192.0.2.10"],
        "v6only.example.net": ["2001:db8::25"],
    }
    if host not in table:
        raise ConfigError(f"cannot resolve {host!r}")
    return table[host]


def fake_users(name: str) -> pwd.struct_passwd:
    """Users: _rspamd (uid 101, primary group 102)."""
    if name != "_rspamd":
        raise KeyError(name)
    return pwd.struct_passwd(("_rspamd", "x", 101, 102, "", "/", "/bin/false"))


def fake_groups(name: str) -> grp.struct_group:
    """Groups: mail (gid 8)."""
    if name != "mail":
        raise KeyError(name)
    return grp.struct_group(("mail", "x", 8, []))


def parse(line: str, default_port: int = DEFAULT_BIND_PORT) -> list[ListenSpec]:
    return parse_bind_line(line, default_port=default_port,
                           resolve=fake_resolve, users=fake_users,
                           groups=fake_groups)


class ParseTests(unittest.TestCase):
    """Every bind_socket form gives the listen specs Rspamd would bind."""

    TABLE = [
        ("127.0.0.1:11332", [InetListen("127.0.0.1", 11332, "127.0.0.1:11332")]),
        ("127.0.0.1", [InetListen("127.0.0.1", 11335, "127.0.0.1")]),
        ("localhost:11332", [InetListen("127.0.0.1", 11332, "localhost:11332"),
                             InetListen("::1", 11332, "localhost:11332")]),
        ("localhost", [InetListen("127.0.0.1", 11335, "localhost"),
                       InetListen("::1", 11335, "localhost")]),
        ("mail.example.net:25", [InetListen("192.0.2.10", 25,
                                            "mail.example.net:25")]),
        ("*:11335", [InetListen("0.0.0.0", 11335, "*:11335"),
                     InetListen("::", 11335, "*:11335")]),
        ("*", [InetListen("0.0.0.0", 11335, "*"), InetListen("::", 11335, "*")]),
        ("*v4:11332", [InetListen("0.0.0.0", 11332, "*v4:11332")]),
        ("*V6:11332", [InetListen("::", 11332, "*V6:11332")]),
        ("[::1]:11332", [InetListen("::1", 11332, "[::1]:11332")]),
        ("[::1]", [InetListen("::1", 11335, "[::1]")]),
        ("[0:0::1]:7", [InetListen("::1", 7, "[0:0::1]:7")]),
        ("127.0.0.1:11332:10", [InetListen("127.0.0.1", 11332,
                                           "127.0.0.1:11332:10")]),
        ("/run/rspamd/proxy.sock",
         [UnixListen("/run/rspamd/proxy.sock", 0o644, None, None,
                     "/run/rspamd/proxy.sock")]),
        ("/run/p.sock mode=0666 owner=_rspamd",
         [UnixListen("/run/p.sock", 0o666, 101, 102,
                     "/run/p.sock mode=0666 owner=_rspamd")]),
        ("/run/p.sock owner=_rspamd:mail,mode=0660",
         [UnixListen("/run/p.sock", 0o660, 101, 8,
                     "/run/p.sock owner=_rspamd:mail,mode=0660")]),
        ("/run/p.sock group=mail owner=_rspamd",
         [UnixListen("/run/p.sock", 0o644, 101, 8,
                     "/run/p.sock group=mail owner=_rspamd")]),
        ("/run/p.sock mode=438", [UnixListen("/run/p.sock", 0o666, None, None,
                                             "/run/p.sock mode=438")]),
        ("./rel.sock", [UnixListen("./rel.sock", 0o644, None, None,
                                   "./rel.sock")]),
        ("systemd:0", [SystemdListen(0, None, "systemd:0")]),
        ("SYSTEMD:2", [SystemdListen(2, None, "SYSTEMD:2")]),
        ("systemd:proxy", [SystemdListen(None, "proxy", "systemd:proxy")]),
    ]

    def test_table(self) -> None:
        """Each form in the table parses to exactly the expected specs."""
        for line, expected in self.TABLE:
            self.assertEqual(parse(line, default_port=11335), expected, line)

    def test_default_port_is_rspamds(self) -> None:
        """Without a worker's port, a bare host gets Rspamd's 11333."""
        self.assertEqual(parse_bind_line("127.0.0.1"),
                         [InetListen("127.0.0.1", 11333, "127.0.0.1")])

    def test_several_lines_dedup(self) -> None:
        """A worker's lines are parsed together and repeats are kept once."""
        specs = parse_bind_lines(["localhost:1", "127.0.0.1:1", "[::1]:2"],
                                 resolve=fake_resolve)
        inet = [s for s in specs if isinstance(s, InetListen)]
        self.assertEqual(inet, specs)
        self.assertEqual([(s.address, s.port) for s in inet],
                         [("127.0.0.1", 1), ("::1", 1), ("::1", 2)])

    def test_real_localhost(self) -> None:
        """The system resolver gives 127.0.0.1 for localhost."""
        self.assertIn("127.0.0.1", resolve_host("localhost"))


class ParseErrorTests(unittest.TestCase):
    """Malformed lines raise ConfigError quoting the line."""

    BAD = [
        ("", "empty bind line"),
        ("127.0.0.1:http", "bad port 'http'"),
        ("127.0.0.1:70000", "bad port '70000'"),
        ("127.0.0.1:11332:x", "bad priority 'x'"),
        ("*v5:11332", "expected ':port'"),
        ("[::1:11332", "missing ']'"),
        ("[::1]x", "unexpected 'x'"),
        ("::1", "write IPv6 addresses in brackets"),
        ("nowhere.invalid:1", "cannot resolve 'nowhere.invalid'"),
        (":11332", "missing host"),
        ("systemd:", "missing systemd socket"),
        ("/p.sock mode=0", "bad mode '0'"),
        ("/p.sock mode=abc", "bad mode 'abc'"),
        ("/p.sock owner=nobody-here", "unknown user 'nobody-here'"),
        ("/p.sock owner=_rspamd:nogroup-here", "unknown group 'nogroup-here'"),
        ("/p.sock group=nogroup-here", "unknown group 'nogroup-here'"),
        ("/p.sock colour=blue", "unknown unix socket option 'colour'"),
        ("/p.sock 0666", "option '0666' is not name=value"),
    ]

    def test_errors(self) -> None:
        """Each bad line raises ConfigError with a clear message."""
        for line, message in self.BAD:
            with self.assertRaises(ConfigError, msg=line) as caught:
                parse(line)
            self.assertIn(message, str(caught.exception), line)

    def test_error_location(self) -> None:
        """The location of the line is attached to the error."""
        where = Location("local.d/worker-proxy.inc", 3, 1)
        with self.assertRaises(ConfigError) as caught:
            parse_bind_line("127.0.0.1:x", location=where)
        self.assertEqual(caught.exception.location, where)
        self.assertTrue(str(caught.exception).startswith(
            "local.d/worker-proxy.inc:3:1: bind_socket '127.0.0.1:x'"))


class BindTests(unittest.TestCase):
    """Specs become bound sockets on loopback."""

    def open(self, specs: Sequence[ListenSpec], kinds: set[SocketKind],
             **kwargs: Any) -> list[socket.socket]:
        sockets = open_listen_sockets(specs, kinds, **kwargs)
        for sock in sockets:
            self.addCleanup(sock.close)
        return sockets

    def test_ipv4_stream(self) -> None:
        """An IPv4 literal with port 0 gives one listening TCP socket."""
        [sock] = self.open(parse("127.0.0.1:0"), {SocketKind.STREAM})
        self.assertEqual(sock.type, socket.SOCK_STREAM)
        self.assertEqual(sock.getsockname()[0], "127.0.0.1")
        self.assertNotEqual(sock.getsockname()[1], 0)
        client = socket.create_connection(sock.getsockname()[:2])
        client.close()

    def test_datagram_twins_share_the_address(self) -> None:
        """With reuse_port, a datagram socket has twins on its address and the
        kernel spreads senders over them; streams and plain sockets have none."""
        stream, datagram = self.open(parse("127.0.0.1:0"),
                                     {SocketKind.STREAM, SocketKind.DATAGRAM},
                                     reuse_port=True)
        self.assertIsNone(datagram_twin(stream))
        twin = datagram_twin(datagram)
        assert twin is not None
        self.addCleanup(twin.close)
        self.assertEqual(twin.getsockname(), datagram.getsockname())
        self.assertFalse(twin.getblocking())
        reached = set()
        for _ in range(64):
            sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.addCleanup(sender.close)
            sender.sendto(b"x", datagram.getsockname())
            for index, receiver in enumerate((datagram, twin)):
                try:
                    receiver.recvfrom(16)
                except BlockingIOError:
                    continue
                reached.add(index)
        self.assertEqual(reached, {0, 1})
        [plain] = self.open(parse("127.0.0.1:0"), {SocketKind.DATAGRAM})
        self.assertIsNone(datagram_twin(plain))

    def test_ipv6_stream(self) -> None:
        """A bracketed IPv6 literal binds an IPv6-only socket."""
        if not ipv6_available():
            raise unittest.SkipTest("no IPv6 loopback")
        [sock] = self.open(parse("[::1]:0"), {SocketKind.STREAM})
        self.assertEqual(sock.family, socket.AF_INET6)
        self.assertEqual(sock.getsockname()[0], "::1")
        self.assertEqual(
            sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY), 1)

    def test_host_name_binds_every_address_on_one_port(self) -> None:
        """localhost:0 binds 127.0.0.1 and ::1 sharing the chosen port."""
        if not ipv6_available():
            raise unittest.SkipTest("no IPv6 loopback")
        sockets = self.open(parse("localhost:0"), {SocketKind.STREAM})
        names = [s.getsockname()[:2] for s in sockets]
        self.assertEqual([n[0] for n in names], ["127.0.0.1", "::1"])
        self.assertEqual(names[0][1], names[1][1])

    def test_datagram_and_stream_share_port(self) -> None:
        """A fuzzy-style worker gets TCP and UDP on the same port."""
        sockets = self.open(parse("127.0.0.1:0"),
                            {SocketKind.DATAGRAM, SocketKind.STREAM})
        self.assertEqual([s.type for s in sockets],
                         [socket.SOCK_STREAM, socket.SOCK_DGRAM])
        self.assertEqual(sockets[0].getsockname(), sockets[1].getsockname())

    def test_default_port_binds(self) -> None:
        """A bare host listens on the given default port."""
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        [sock] = self.open(parse("127.0.0.1", default_port=port),
                           {SocketKind.STREAM})
        self.assertEqual(sock.getsockname(), ("127.0.0.1", port))

    def test_unix_mode_and_owner(self) -> None:
        """A unix socket gets its mode and owner:group after bind."""
        if os.geteuid() != 0:
            raise unittest.SkipTest("chown needs root")
        path = unix_socket_path(self, "w.sock")
        nobody = pwd.getpwnam("nobody")
        group = grp.getgrgid(0).gr_name
        [sock] = self.open(
            parse_bind_line(f"{path} mode=0666 owner=nobody:{group}"),
            {SocketKind.STREAM})
        st = os.stat(path)
        self.assertTrue(stat.S_ISSOCK(st.st_mode))
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o666)
        self.assertEqual((st.st_uid, st.st_gid), (nobody.pw_uid, 0))

    def test_unix_default_mode(self) -> None:
        """Without mode= the socket is 0644, owner unchanged."""
        path = unix_socket_path(self, "w.sock")
        self.open(parse_bind_line(path), {SocketKind.STREAM})
        st = os.stat(path)
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o644)
        self.assertEqual(st.st_uid, os.geteuid())

    def test_unix_stale_socket_removed(self) -> None:
        """A socket file left by a dead process is replaced."""
        path = unix_socket_path(self, "w.sock")
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(path)
        stale.close()
        [sock] = self.open(parse_bind_line(path), {SocketKind.STREAM})
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)
        client.close()

    def test_unix_refuses_other_files(self) -> None:
        """A regular file at the path is not removed: ConfigError."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("keep me")
        with self.assertRaises(ConfigError) as caught:
            self.open(parse_bind_line(path), {SocketKind.STREAM})
        self.assertIn("exists and is not a socket", str(caught.exception))
        with open(path) as f:
            self.assertEqual(f.read(), "keep me")

    def test_unix_datagram_only_refused(self) -> None:
        """A datagram-only worker cannot listen on a unix socket."""
        with self.assertRaises(ConfigError) as caught:
            self.open(parse_bind_line("/tmp/x.sock"), {SocketKind.DATAGRAM})
        self.assertIn("stream sockets only", str(caught.exception))

    def test_address_in_use(self) -> None:
        """A port already taken gives ConfigError and closes what was opened."""
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        free = socket.socket()
        free.bind(("127.0.0.1", 0))
        free_port = free.getsockname()[1]
        free.close()
        specs = parse(f"127.0.0.1:{free_port}") + parse(f"127.0.0.1:{port}")
        with self.assertRaises(ConfigError) as caught:
            self.open(specs, {SocketKind.STREAM})
        self.assertIn(f"cannot bind 127.0.0.1:{port}", str(caught.exception))
        again = socket.socket()
        self.addCleanup(again.close)
        again.bind(("127.0.0.1", free_port))

    def test_missing_address_skipped(self) -> None:
        """An address this host lacks is skipped when the line has another."""
        specs = [InetListen("127.0.0.1", 0, "mail:0"),
                 InetListen("192.0.2.77", 0, "mail:0")]
        sockets = self.open(specs, {SocketKind.STREAM})
        self.assertEqual([s.getsockname()[0] for s in sockets], ["127.0.0.1"])

    def test_only_missing_address_fails(self) -> None:
        """A line whose every address is missing is an error."""
        with self.assertRaises(ConfigError) as caught:
            self.open([InetListen("192.0.2.77", 0, "192.0.2.77:0")],
                      {SocketKind.STREAM})
        self.assertIn("cannot bind 192.0.2.77:0", str(caught.exception))

    def test_systemd_errors(self) -> None:
        """Socket activation problems are reported per case."""
        cases = [
            ({}, "systemd:0", "no socket activation"),
            ({"LISTEN_FDS": "1", "LISTEN_PID": "1"}, "systemd:0",
             "LISTEN_PID is 1"),
            ({"LISTEN_FDS": "1"}, "systemd:3", "LISTEN_FDS is 1"),
            ({"LISTEN_FDS": "1", "LISTEN_FDNAMES": "a"}, "systemd:b",
             "no socket named 'b'"),
        ]
        for env, line, message in cases:
            with self.assertRaises(ConfigError, msg=line) as caught:
                self.open(parse(line), {SocketKind.STREAM}, environ=env,
                          pid=4242)
            self.assertIn(message, str(caught.exception))


def _collecting_factory(request: bytes, done: Deferred[bytes]) -> ClientFactory:
    """A client factory sending ``request`` and firing ``done`` with the reply."""

    class Collect(Protocol):
        def connectionMade(self) -> None:
            assert self.transport is not None
            self.data = b""
            self.transport.write(request)

        def dataReceived(self, data: bytes) -> None:
            self.data += data

        def connectionLost(self, reason: object = None) -> None:
            done.callback(self.data)

    factory = ClientFactory()
    factory.protocol = Collect
    return factory


SYSTEMD_CHILD = textwrap.dedent("""
    import sys
    from twisted.internet import reactor
    from rspamd_tx.config.bind import (
        SocketKind, adopt_sockets, describe_socket, open_listen_sockets,
        parse_bind_line)
    from rspamd_tx.proxy.server import ProxyFactory

    sockets = open_listen_sockets(parse_bind_line(sys.argv[1]),
                                  {SocketKind.STREAM})
    adopt_sockets(reactor, sockets, ProxyFactory(reactor), None)
    print(describe_socket(sockets[0]), flush=True)
    reactor.run()
""")


@implementer(IScanner)
class _UnusedScanner:
    """A scanner for listeners that are only served, never asked to scan."""

    name = "unused"

    def scan(self, request: ScanRequest) -> Deferred[ScanReply]:
        raise AssertionError("no scan expected")


class AdoptTests(unittest.TestCase):
    """Bound sockets served by the reactor."""

    @inlineCallbacks
    def test_stream_serves_ping(self) -> Generator[Deferred[Any], Any, None]:
        """An adopted TCP socket serves the proxy's /ping, on the listener's own port."""
        sockets = open_listen_sockets(parse("127.0.0.1:0"), {SocketKind.STREAM})
        self.addCleanup(sockets[0].close)
        [port] = adopt_sockets(reactor, sockets, ProxyFactory(reactor), None)
        self.addCleanup(port.stopListening)
        self.assertIsInstance(port, StreamPort)
        status, body = yield http_get(reactor, "127.0.0.1",
                                      sockets[0].getsockname()[1], "/ping")
        self.assertEqual((status, body), (200, b"pong\r\n"))

    def test_milter_listener_gets_stream_port(self) -> None:
        """The milter listener is served on its own port, as the HTTP listener is."""
        sockets = open_listen_sockets(parse("127.0.0.1:0"), {SocketKind.STREAM})
        self.addCleanup(sockets[0].close)
        factory = MilterFactory(_UnusedScanner(), ProxyOptions(), FailurePolicyTable(), reactor)
        [port] = adopt_sockets(reactor, sockets, factory, None)
        self.addCleanup(port.stopListening)
        self.assertIsInstance(port, StreamPort)

    def test_plain_factory_gets_reactor_port(self) -> None:
        """A factory without a port of its own is served by the reactor's adoptStreamPort."""
        sockets = open_listen_sockets(parse("127.0.0.1:0"), {SocketKind.STREAM})
        self.addCleanup(sockets[0].close)
        [port] = adopt_sockets(reactor, sockets, ClientFactory.forProtocol(Protocol), None)
        self.addCleanup(port.stopListening)
        self.assertNotIsInstance(port, StreamPort)
        host = port.getHost()
        assert isinstance(host, IPv4Address)
        self.assertEqual(host.port, sockets[0].getsockname()[1])

    @inlineCallbacks
    def test_datagram_gets_own_protocol(self) -> Generator[Deferred[Any], Any, None]:
        """Each datagram socket gets a fresh protocol, which receives."""
        received: Deferred[bytes] = Deferred()

        class Receiver(DatagramProtocol):
            def datagramReceived(self, data: bytes, addr: object) -> None:
                received.callback(data)

        made: list[DatagramProtocol] = []

        def protocol() -> DatagramProtocol:
            made.append(Receiver())
            return made[-1]

        sockets = open_listen_sockets(parse("127.0.0.1:0"),
                                      {SocketKind.DATAGRAM})
        self.addCleanup(sockets[0].close)
        [port] = adopt_sockets(reactor, sockets, None, protocol)
        self.addCleanup(port.stopListening)
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(client.close)
        client.sendto(b"hello", sockets[0].getsockname())
        data = yield received
        self.assertEqual((data, len(made)), (b"hello", 1))

    @inlineCallbacks
    def test_unix_stream_serves_ping(self) -> Generator[Deferred[Any], Any, None]:
        """An adopted unix socket serves /ping and stops cleanly."""
        path = unix_socket_path(self, "p.sock")
        sockets = open_listen_sockets(parse_bind_line(f"{path} mode=0600"),
                                      {SocketKind.STREAM})
        self.addCleanup(sockets[0].close)
        [port] = adopt_sockets(reactor, sockets, ProxyFactory(reactor), None)
        done: Deferred[bytes] = Deferred()
        factory = _collecting_factory(b"GET /ping HTTP/1.0\r\n\r\n", done)
        IReactorUNIX(reactor).connectUNIX(path, factory, timeout=10)
        reply = yield done.addTimeout(10, reactor)
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply)
        self.assertTrue(reply.endswith(b"\r\n\r\npong\r\n"), reply)
        stopped = port.stopListening()
        if stopped is not None:
            yield stopped

    def test_kind_without_handler(self) -> None:
        """A datagram socket without a datagram handler is refused."""
        sockets = open_listen_sockets(parse("127.0.0.1:0"),
                                      {SocketKind.DATAGRAM})
        self.addCleanup(sockets[0].close)
        with self.assertRaises(ConfigError):
            adopt_sockets(reactor, sockets, ProxyFactory(reactor), None)

    def test_systemd_activation_in_child(self) -> None:
        """A child given LISTEN_FDS adopts the fd by index and by name."""
        for line in ("systemd:1", "systemd:web"):
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            listener.listen(8)
            other = socket.socket()
            other.bind(("127.0.0.1", 0))
            port = listener.getsockname()[1]
            code = (f"import os; os.environ['LISTEN_PID'] = str(os.getpid()); "
                    f"exec({SYSTEMD_CHILD!r})")
            env = dict(os.environ, PYTHONPATH=REPO_ROOT, LISTEN_FDS="2",
                       LISTEN_FDNAMES="other:web")
            child = subprocess.Popen(
                [sys.executable, "-c",
                 "import fcntl, os, sys; "
                 "a, b = (fcntl.fcntl(int(fd), fcntl.F_DUPFD, 100) "
                 "for fd in sys.argv[1:3]); "
                 "os.dup2(a, 3); os.dup2(b, 4); "
                 "os.execv(sys.executable, [sys.executable, '-c', "
                 "sys.argv[3], sys.argv[4]])",
                 str(other.fileno()), str(listener.fileno()), code, line],
                env=env, stdout=subprocess.PIPE, pass_fds=(
                    listener.fileno(), other.fileno()))
            self.addCleanup(child.wait)
            self.addCleanup(child.kill)
            listener.close()
            other.close()
            assert child.stdout is not None
            self.addCleanup(child.stdout.close)
            first_line = child.stdout.readline().decode().strip()
            self.assertEqual(first_line, f"tcp 127.0.0.1:{port}")
            with socket.create_connection(("127.0.0.1", port), 10) as client:
                client.sendall(b"GET /ping HTTP/1.0\r\n\r\n")
                reply = b""
                while chunk := client.recv(4096):
                    reply += chunk
            self.assertTrue(reply.startswith(b"HTTP/1.1 200 OK\r\n"))
            self.assertTrue(reply.endswith(b"\r\n\r\npong\r\n"))
