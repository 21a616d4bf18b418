"""Rspamd ``bind_socket`` lines: parsing into listen specs and binding them.

A worker's ``bind_socket`` (aliases ``listen``, ``bind``) holds one or more
lines, each naming one or more places to listen:

====================================  ===========================================
``host:port``                         every address ``host`` resolves to
``1.2.3.4:port`` / ``[::1]:port``     that address
``*:port``                            ``0.0.0.0`` and ``::``
``*v4:port`` / ``*v6:port``           only ``0.0.0.0`` / only ``::``
``host`` / ``[::1]`` (no port)        the worker's default port
``/path.sock mode=0666 owner=u:g``    a unix socket (``group=g`` also accepted)
``systemd:N`` / ``systemd:name``      a socket inherited through socket activation
====================================  ===========================================

A trailing ``:priority`` after the port is accepted and ignored, as Rspamd
does. Parsing (:func:`parse_bind_line`) is separate from binding
(:func:`open_listen_sockets`), which creates ready-to-adopt sockets, and from
serving (:func:`adopt_sockets`), which hands them to a reactor. Keeping the
three apart lets a supervisor bind once and let several processes adopt the
same sockets.
"""

from __future__ import annotations

import enum
import errno
import grp
import ipaddress
import os
import pwd
import socket
import stat
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from rspamd_tx.config.tree import ConfigError, Location

__all__ = [
    "DEFAULT_BIND_PORT",
    "WORKER_DEFAULT_PORTS",
    "SocketKind",
    "InetListen",
    "UnixListen",
    "SystemdListen",
    "ListenSpec",
    "resolve_host",
    "parse_bind_line",
    "parse_bind_lines",
    "open_listen_sockets",
    "datagram_twin",
    "adopt_sockets",
    "describe_socket",
    "socket_from_descriptor",
]

log = Logger()

#: Rspamd's ``DEFAULT_BIND_PORT``.
DEFAULT_BIND_PORT = 11333

#: The port each worker type listens on when a bind line names no port.
WORKER_DEFAULT_PORTS: Mapping[str, int] = {
    "rspamd_proxy": 11332,
    "normal": 11333,
    "controller": 11334,
    "fuzzy": 11335,
}

#: Mode of a unix socket whose bind line gives none (Rspamd's default).
DEFAULT_UNIX_MODE = 0o644

#: Largest datagram a fuzzy listener accepts.
MAX_DATAGRAM_SIZE = 8192


class SocketKind(enum.Enum):
    """What a listener carries: a byte stream (TCP, unix) or datagrams (UDP)."""

    STREAM = "stream"
    DATAGRAM = "datagram"


@dataclass(frozen=True, slots=True)
class InetListen:
    """Listen on one numeric IPv4 or IPv6 ``address`` and ``port``.

    ``port`` 0 asks the kernel for a free port; every socket made from the
    same bind line then shares the port the first one got.
    """

    address: str
    port: int
    bind_line: str


@dataclass(frozen=True, slots=True)
class UnixListen:
    """Listen on a unix socket at ``path``.

    ``mode`` is applied with ``chmod`` after binding; ``uid``/``gid`` (``None``:
    unchanged) with ``chown``. A stale socket file at ``path`` is removed first.
    """

    path: str
    mode: int
    uid: int | None
    gid: int | None
    bind_line: str


@dataclass(frozen=True, slots=True)
class SystemdListen:
    """Adopt a socket passed by systemd socket activation.

    ``index`` is the 0-based position in ``LISTEN_FDS`` (descriptor ``3 +
    index``); when the bind line gave a name, ``name`` is looked up in
    ``LISTEN_FDNAMES`` and ``index`` is ``None``.
    """

    index: int | None
    name: str | None
    bind_line: str


ListenSpec = InetListen | UnixListen | SystemdListen

#: Turns a host name into numeric addresses; raises :class:`ConfigError`.
Resolver = Callable[[str], Sequence[str]]


def resolve_host(host: str) -> list[str]:
    """Every distinct address ``host`` resolves to, in resolver order.

    Uses the system resolver (``/etc/hosts`` first on usual set-ups, so
    ``localhost`` gives ``127.0.0.1`` and ``::1`` where IPv6 is configured).

    @raise ConfigError: the name does not resolve.
    """
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigError(f"cannot resolve {host!r}: {e}") from e
    addresses: list[str] = []
    for family, _type, _proto, _name, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        address = str(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise ConfigError(f"{host!r} has no IPv4 or IPv6 address")
    return addresses


def _parse_port(text: str, line: str, location: Location | None) -> int:
    """The port in ``text`` (``port`` or ``port:priority``, priority ignored)."""
    port_text, _, priority = text.partition(":")
    if priority and not priority.isdigit():
        raise ConfigError(
            f"bind_socket {line!r}: bad priority {priority!r}", location)
    if not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(f"bind_socket {line!r}: bad port {port_text!r}",
                          location)
    return int(port_text)


def _parse_unix(line: str, location: Location | None,
                users: Callable[[str], pwd.struct_passwd],
                groups: Callable[[str], grp.struct_group]) -> UnixListen:
    tokens = [t for t in line.replace(",", " ").split(" ") if t]
    path, options = tokens[0], tokens[1:]
    mode = DEFAULT_UNIX_MODE
    uid: int | None = None
    gid: int | None = None
    group_given = False
    for option in options:
        key, sep, value = option.partition("=")
        key = key.lower()
        if not sep:
            raise ConfigError(
                f"bind_socket {line!r}: option {option!r} is not name=value",
                location)
        if key == "mode":
            try:
                mode = int(value, 8 if value.startswith("0") and
                           value[1:2] not in ("x", "X") else 0)
            except ValueError:
                raise ConfigError(f"bind_socket {line!r}: bad mode {value!r}",
                                  location) from None
            if mode <= 0 or mode > 0o7777:
                raise ConfigError(f"bind_socket {line!r}: bad mode {value!r}",
                                  location)
        elif key == "owner":
            user, _, group = value.partition(":")
            try:
                entry = users(user)
            except KeyError:
                raise ConfigError(f"bind_socket {line!r}: unknown user {user!r}",
                                  location) from None
            uid = entry.pw_uid
            if group:
                gid = _group_id(group, line, location, groups)
                group_given = True
            elif not group_given:
                gid = entry.pw_gid
        elif key == "group":
            gid = _group_id(value, line, location, groups)
            group_given = True
        else:
            raise ConfigError(
                f"bind_socket {line!r}: unknown unix socket option {key!r}",
                location)
    return UnixListen(path, mode, uid, gid, line)


def _group_id(name: str, line: str, location: Location | None,
              groups: Callable[[str], grp.struct_group]) -> int:
    try:
        return groups(name).gr_gid
    except KeyError:
        raise ConfigError(f"bind_socket {line!r}: unknown group {name!r}",
                          location) from None


def _numeric(host: str) -> str | None:
    """``host`` normalised if it is an IP literal, else ``None``."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def parse_bind_line(
    line: str,
    *,
    default_port: int = DEFAULT_BIND_PORT,
    resolve: Resolver = resolve_host,
    users: Callable[[str], pwd.struct_passwd] = pwd.getpwnam,
    groups: Callable[[str], grp.struct_group] = grp.getgrnam,
    location: Location | None = None,
) -> list[ListenSpec]:
    """Parse one ``bind_socket`` line into the listen specs it names.

    Host names are resolved with ``resolve`` (one spec per address); user and
    group names of unix sockets are looked up with ``users`` and ``groups``.

    @raise ConfigError: the line is malformed, a name does not resolve or a
        user or group is unknown; the message quotes the line and ``location``
        (where the line was written) is attached.
    """
    text = line.strip()
    if not text:
        raise ConfigError("bind_socket: empty bind line", location)
    if text[:8].lower() == "systemd:":
        selector = text[8:]
        if not selector:
            raise ConfigError(f"bind_socket {line!r}: missing systemd socket",
                              location)
        if selector.isdigit():
            return [SystemdListen(int(selector), None, line)]
        return [SystemdListen(None, selector, line)]
    if text[0] in "/.":
        return [_parse_unix(text, location, users, groups)]
    if text[0] == "*":
        rest = text[1:]
        families = ["0.0.0.0", "::"]
        if rest[:2].lower() == "v4":
            families, rest = ["0.0.0.0"], rest[2:]
        elif rest[:2].lower() == "v6":
            families, rest = ["::"], rest[2:]
        if rest and not rest.startswith(":"):
            raise ConfigError(f"bind_socket {line!r}: expected ':port' after "
                              f"{text[:len(text) - len(rest)]!r}", location)
        port = _parse_port(rest[1:], line, location) if rest else default_port
        return [InetListen(a, port, line) for a in families]
    if text[0] == "[":
        close = text.find("]")
        if close < 0:
            raise ConfigError(f"bind_socket {line!r}: missing ']'", location)
        host, rest = text[1:close], text[close + 1:]
        if rest and not rest.startswith(":"):
            raise ConfigError(
                f"bind_socket {line!r}: unexpected {rest!r} after ']'", location)
    else:
        if ":" in text and (_numeric(text) is not None or text.count(":") > 2):
            raise ConfigError(
                f"bind_socket {line!r}: write IPv6 addresses in brackets, "
                f"as in '[::1]:11332'", location)
        host, sep, rest = text.partition(":")
        rest = sep + rest
    port = _parse_port(rest[1:], line, location) if rest else default_port
    if not host:
        raise ConfigError(f"bind_socket {line!r}: missing host", location)
    numeric = _numeric(host)
    if numeric is not None:
        return [InetListen(numeric, port, line)]
    try:
        addresses = resolve(host)
    except ConfigError as e:
        raise ConfigError(f"bind_socket {line!r}: {e.message}", location) from e
    return [InetListen(_numeric(a) or a, port, line) for a in addresses]


def parse_bind_lines(lines: Iterable[str], **kwargs: object) -> list[ListenSpec]:
    """Parse several bind lines (a worker's whole ``bind_socket``).

    Keyword arguments are those of :func:`parse_bind_line`. Duplicate specs
    (the same address named twice) are kept once.

    @raise ConfigError: as :func:`parse_bind_line`.
    """
    specs: list[ListenSpec] = []
    seen: set[tuple[object, ...]] = set()
    for line in lines:
        for spec in parse_bind_line(line, **kwargs):  # type: ignore[arg-type]
            key = _spec_key(spec)
            if key not in seen:
                seen.add(key)
                specs.append(spec)
    return specs


def _spec_key(spec: ListenSpec) -> tuple[object, ...]:
    if isinstance(spec, InetListen):
        return ("inet", spec.address, spec.port or spec.bind_line)
    if isinstance(spec, UnixListen):
        return ("unix", spec.path)
    return ("systemd", spec.index, spec.name)


def describe_socket(sock: socket.socket) -> str:
    """A short human name for a listening socket: ``tcp [::1]:11332``."""
    kind = "udp" if sock.type == socket.SOCK_DGRAM else "tcp"
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix {name}"
    if sock.family == socket.AF_INET6:
        return f"{kind} [{name[0]}]:{name[1]}"
    return f"{kind} {name[0]}:{name[1]}"


def _bind_inet(spec: InetListen, port: int, kind: SocketKind,
               backlog: int, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in spec.address else socket.AF_INET
    sock_type = (socket.SOCK_STREAM if kind is SocketKind.STREAM
                 else socket.SOCK_DGRAM)
    sock = socket.socket(family, sock_type)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind is SocketKind.STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        elif reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((spec.address, port))
        if kind is SocketKind.STREAM:
            sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _bind_unix(spec: UnixListen, backlog: int) -> socket.socket:
    try:
        st = os.lstat(spec.path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"bind_socket {spec.bind_line!r}: {spec.path} "
                              f"exists and is not a socket")
        os.unlink(spec.path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(spec.path)
        os.chmod(spec.path, spec.mode)
        if spec.uid is not None or spec.gid is not None:
            os.chown(spec.path, -1 if spec.uid is None else spec.uid,
                     -1 if spec.gid is None else spec.gid)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _systemd_socket(spec: SystemdListen, environ: Mapping[str, str],
                    pid: int) -> socket.socket:
    line = spec.bind_line
    listen_pid = environ.get("LISTEN_PID")
    if listen_pid is not None and listen_pid.strip() != str(pid):
        raise ConfigError(f"bind_socket {line!r}: LISTEN_PID is {listen_pid}, "
                          f"not this process ({pid})")
    count_text = environ.get("LISTEN_FDS")
    if count_text is None or not count_text.strip().isdigit():
        raise ConfigError(f"bind_socket {line!r}: no socket activation "
                          f"(LISTEN_FDS is {count_text!r})")
    count = int(count_text)
    index = spec.index
    if index is None:
        names = environ.get("LISTEN_FDNAMES", "").split(":")
        if spec.name not in names:
            raise ConfigError(f"bind_socket {line!r}: no socket named "
                              f"{spec.name!r} in LISTEN_FDNAMES")
        index = names.index(spec.name)
    if index >= count:
        raise ConfigError(f"bind_socket {line!r}: LISTEN_FDS is {count}, "
                          f"there is no socket {index}")
    fd = 3 + index
    what = f"bind_socket {line!r}: descriptor {fd}"
    try:
        is_socket = stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError as e:
        raise ConfigError(f"{what}: {e.strerror or e}") from e
    if not is_socket:
        raise ConfigError(f"{what} is not a socket")
    return socket_from_descriptor(fd, what)


def socket_from_descriptor(fd: int, what: str) -> socket.socket:
    """The socket open on descriptor ``fd``, made non-blocking and not
    inherited by processes this one starts.

    @raise ConfigError: ``fd`` is not an open socket; the message starts
        with ``what``.
    """
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise ConfigError(f"{what}: {e.strerror or e}") from e
    os.set_inheritable(fd, False)
    sock.setblocking(False)
    return sock


def open_listen_sockets(
    specs: Sequence[ListenSpec],
    kinds: Collection[SocketKind],
    *,
    environ: Mapping[str, str] | None = None,
    pid: int | None = None,
    backlog: int = socket.SOMAXCONN,
    reuse_port: bool = False,
) -> list[socket.socket]:
    """Bind every spec for every kind a worker serves; return the sockets.

    The sockets are bound, listening (streams) and non-blocking, ready for
    :func:`adopt_sockets` here or in a child process. A worker serving both
    kinds (fuzzy: UDP and TCP) gets both on each address and the same port;
    unix sockets are stream only. A systemd socket is adopted as whatever kind
    it is, and must be a kind the worker serves. ``environ`` and ``pid``
    (default: this process's) are where socket activation is read from.
    With ``reuse_port``, IP datagram sockets are bound with ``SO_REUSEPORT``,
    so that :func:`datagram_twin` can open more sockets on the same address
    (one per process; the kernel spreads the datagrams over them by sender).

    An address the host does not have (``EADDRNOTAVAIL``, e.g. ``::1`` where
    IPv6 is off, as ``localhost`` may resolve to) is skipped with a warning
    when another address of the same bind line was bound; otherwise it is an
    error like any other. On error every socket opened so far is closed.

    @raise ConfigError: a bind failed (address in use, permission, ...), a
        systemd socket is missing or of the wrong kind, or only datagrams are
        served and a unix socket was asked for.
    """
    env = os.environ if environ is None else environ
    own_pid = os.getpid() if pid is None else pid
    ordered = [k for k in (SocketKind.STREAM, SocketKind.DATAGRAM) if k in kinds]
    sockets: list[socket.socket] = []
    chosen_ports: dict[str, int] = {}
    bound_lines: set[str] = set()
    unavailable: dict[str, ConfigError] = {}
    try:
        for spec in specs:
            if isinstance(spec, SystemdListen):
                sock = _systemd_socket(spec, env, own_pid)
                sockets.append(sock)
                kind = (SocketKind.DATAGRAM if sock.type == socket.SOCK_DGRAM
                        else SocketKind.STREAM)
                if kind not in kinds:
                    raise ConfigError(
                        f"bind_socket {spec.bind_line!r}: inherited socket is "
                        f"a {kind.value} socket; this worker does not serve "
                        f"{kind.value}s")
            elif isinstance(spec, UnixListen):
                if SocketKind.STREAM not in kinds:
                    raise ConfigError(f"bind_socket {spec.bind_line!r}: unix "
                                      f"sockets are stream sockets only")
                sockets.append(_wrap_os_error(spec, _bind_unix, spec, backlog))
            else:
                for kind in ordered:
                    port = spec.port or chosen_ports.get(spec.bind_line, 0)
                    try:
                        sock = _wrap_os_error(spec, _bind_inet, spec, port,
                                              kind, backlog, reuse_port)
                    except ConfigError as e:
                        if not _unavailable(e):
                            raise
                        unavailable.setdefault(spec.bind_line, e)
                        break
                    sockets.append(sock)
                    bound_lines.add(spec.bind_line)
                    if port == 0:
                        chosen_ports[spec.bind_line] = sock.getsockname()[1]
        for line, error in unavailable.items():
            if line not in bound_lines:
                raise error
            log.warn("{error}; listening on the line's other addresses",
                     error=str(error))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def datagram_twin(sock: socket.socket) -> socket.socket | None:
    """Another non-blocking datagram socket bound to ``sock``'s address.

    Only an IP datagram socket bound with ``SO_REUSEPORT`` (see
    :func:`open_listen_sockets`) has twins; for any other socket the answer
    is ``None``.  Datagrams to the address are then spread over the twins by
    the kernel, so processes each reading their own twin never wake up for
    one another's datagrams.

    @raise OSError: the twin cannot be bound.
    """
    if (sock.type != socket.SOCK_DGRAM
            or sock.family not in (socket.AF_INET, socket.AF_INET6)
            or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)):
        return None
    twin = socket.socket(sock.family, socket.SOCK_DGRAM)
    try:
        if sock.family == socket.AF_INET6:
            twin.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        twin.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        twin.bind(sock.getsockname())
        twin.setblocking(False)
    except OSError:
        twin.close()
        raise
    return twin


def _unavailable(error: ConfigError) -> bool:
    """Whether a bind failed because this host lacks the address (or family)."""
    cause = error.__cause__
    return isinstance(cause, OSError) and cause.errno in (
        errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT)


def _wrap_os_error(spec: InetListen | UnixListen,
                   call: Callable[..., socket.socket],
                   *args: object) -> socket.socket:
    try:
        return call(*args)
    except OSError as e:
        where = (spec.path if isinstance(spec, UnixListen)
                 else f"[{spec.address}]:{spec.port}" if ":" in spec.address
                 else f"{spec.address}:{spec.port}")
        raise ConfigError(f"bind_socket {spec.bind_line!r}: cannot bind {where}: "
                          f"{e.strerror or e}") from e


def adopt_sockets(
    reactor: object,
    sockets: Iterable[socket.socket],
    stream_factory: IProtocolFactory | None,
    datagram_protocol: Callable[[], DatagramProtocol] | None,
) -> list[IListeningPort]:
    """Start serving bound sockets on ``reactor`` (an ``IReactorSocket``).

    Stream sockets go to ``stream_factory`` (through its own
    ``adopt_stream_port(reactor, fileno, family)`` when it has one, else the
    reactor's ``adoptStreamPort``); each datagram socket gets its own protocol
    from ``datagram_protocol()``. The ports work on duplicates of the
    descriptors; the caller keeps (and eventually closes) ``sockets``.

    @raise ConfigError: a socket's kind has no handler.
    """
    ports: list[IListeningPort] = []
    for sock in sockets:
        if sock.type == socket.SOCK_DGRAM:
            if datagram_protocol is None:
                raise ConfigError(f"{describe_socket(sock)}: this worker does "
                                  f"not serve datagrams")
            ports.append(reactor.adoptDatagramPort(  # type: ignore[attr-defined]
                sock.fileno(), sock.family, datagram_protocol(),
                MAX_DATAGRAM_SIZE))
        else:
            if stream_factory is None:
                raise ConfigError(f"{describe_socket(sock)}: this worker does "
                                  f"not serve streams")
            own_port = getattr(stream_factory, "adopt_stream_port", None)
            if own_port is not None:
                ports.append(own_port(reactor, sock.fileno(), sock.family))
            else:
                ports.append(reactor.adoptStreamPort(  # type: ignore[attr-defined]
                    sock.fileno(), sock.family, stream_factory))
    return ports
