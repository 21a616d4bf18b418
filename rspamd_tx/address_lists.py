"""Address lists of the configuration as sets of networks.

An address-list option (``allow_update``, ``blocked``, the milter's
``whitelist``…) holds networks, host names (:class:`~rspamd_tx.config.schema.HostRef`)
and map references (:class:`~rspamd_tx.config.schema.MapRef`).  A worker
resolves the host names (:func:`resolve_names`, at start and on reload) and
turns the list into a :class:`NetworkSet` with :func:`networks`, which also
reads local map files: one address or network per line, ``#`` comments and
blank lines skipped.  Remote (HTTP) maps are not read here: they are logged
and left out.  :class:`MapFilesWatch` tells a worker when one of its map
files changed, so that it builds its lists again (as Rspamd reloads maps).

IPv4-mapped IPv6 addresses count as their IPv4 address everywhere.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from rspamd_tx.upstreams.resolve import resolve_host
from rspamd_tx.config.schema import HostRef, MapRef, NetworkEntry

__all__ = [
    "IPAddress",
    "MapFilesWatch",
    "Network",
    "NetworkSet",
    "file_signature",
    "host_names",
    "local_map_path",
    "map_files",
    "networks",
    "normal_address",
    "read_map_lines",
    "resolve_names",
]

log = Logger()

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def normal_address(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address as its IPv4 address; others unchanged."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True)
class NetworkSet:
    """An immutable set of networks; ``address in networks`` tests membership.

    IPv4-mapped IPv6 addresses match the IPv4 networks.  Anything that is not
    an address (``None`` for a local socket) is in no set.
    """

    networks: tuple[Network, ...] = ()

    def __contains__(self, address: object) -> bool:
        if not self.networks:
            return False
        if not isinstance(address, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            return False
        address = normal_address(address)
        return any(
            address.version == network.version and address in network
            for network in self.networks
        )

    def __bool__(self) -> bool:
        return bool(self.networks)


def read_map_lines(url: str) -> list[str]:
    """The entries of a local map file (``/path``, ``./path`` or ``file:///path``):
    the first word of each line, ``#`` comments and blank lines skipped.

    A remote map, or a file that cannot be read, is logged and gives no entries.
    """
    path = local_map_path(url)
    if path is None:
        log.warn("map {url} is not a local file; ignored", url=url)
        return []
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as error:
        log.warn("cannot read map {url}: {error}", url=url, error=str(error))
        return []
    entries = []
    for line in lines:
        text = line.split("#", 1)[0].strip()
        if text:
            entries.append(text.split()[0])
    return entries


def local_map_path(url: str) -> str | None:
    """The file of a local map (``/path``, ``./path``, ``../path``,
    ``file:///path``), ``None`` for any other (remote) map."""
    path = url[len("file://"):] if url.startswith("file://") else url
    return path if path.startswith(("/", "./", "../")) else None


def file_signature(path: str) -> tuple[int, int, int] | None:
    """What tells a rewritten file from the one seen before: inode, size and
    modification time (ns); ``None`` when it cannot be read."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns


def map_files(*urls: Iterable[str | NetworkEntry]) -> set[str]:
    """The local files among these map references (``MapRef`` entries of address
    lists, or map strings)."""
    paths: set[str] = set()
    for entries in urls:
        for entry in entries:
            url = entry.url if isinstance(entry, MapRef) else entry
            if isinstance(url, str) and (path := local_map_path(url)) is not None:
                paths.add(path)
    return paths


class MapFilesWatch(Service):
    """Calls ``changed()`` when one of the watched map files changes (written,
    replaced, created or removed), as Rspamd reloads its maps; checked every
    ``interval`` seconds on ``clock``.  The first check only takes note.

    Args:
        changed: what to call (its errors are logged, the watch goes on).
        clock: time (``IReactorTime``).
        interval: seconds between checks.
    """

    def __init__(self, changed: Callable[[], object], clock: IReactorTime,
                 interval: float) -> None:
        self.changed = changed
        self.clock = clock
        self.interval = interval
        self.paths: frozenset[str] = frozenset()
        self._seen: dict[str, tuple[int, int, int] | None] = {}
        self._loop: LoopingCall | None = None

    def watch(self, paths: Iterable[str]) -> None:
        """Watch these files from now on (their current state is the baseline)."""
        self.paths = frozenset(paths)
        self._seen = {path: file_signature(path) for path in self.paths}

    def startService(self) -> None:
        Service.startService(self)
        self._loop = LoopingCall(self.check)
        self._loop.clock = self.clock
        self._loop.start(max(self.interval, 0.1), now=False)

    def stopService(self) -> None:
        Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def check(self) -> None:
        """Call ``changed()`` once if any watched file changed since the last check."""
        now = {path: file_signature(path) for path in self.paths}
        changed = sorted(path for path in now if now[path] != self._seen.get(path))
        self._seen = now
        if not changed:
            return
        log.info("map files changed, reloading: {paths}", paths=", ".join(changed))
        try:
            self.changed()
        except Exception:
            log.failure("reloading changed maps failed")


def host_names(*lists: Iterable[NetworkEntry]) -> set[str]:
    """The host names in these address lists (they need resolving)."""
    return {entry.name for entries in lists for entry in entries if isinstance(entry, HostRef)}


def networks(entries: Iterable[NetworkEntry],
             hosts: Mapping[str, Iterable[IPAddress]] | None) -> NetworkSet:
    """The networks of an address list.

    Host names are looked up in ``hosts`` (``None``: nothing resolved yet):
    a name not there yet matches nothing for now, silently; one that
    resolved to nothing is logged and left out.  Map files are read now; a
    line that is not an address or network is logged and skipped.
    """
    out: list[Network] = []
    for entry in entries:
        if isinstance(entry, HostRef):
            if hosts is None or entry.name not in hosts:
                continue
            addresses = list(hosts[entry.name])
            if not addresses:
                log.warn("host {name} in an address list does not resolve; ignored",
                         name=entry.name)
            out.extend(ipaddress.ip_network(normal_address(a)) for a in addresses)
        elif isinstance(entry, MapRef):
            for line in read_map_lines(entry.url):
                try:
                    out.append(ipaddress.ip_network(line, strict=False))
                except ValueError:
                    log.warn("map {url}: {line!r} is not an address; ignored",
                             url=entry.url, line=line)
        else:
            out.append(entry)
    return NetworkSet(tuple(out))


def resolve_names(name_resolver: Any,
                  wanted: Iterable[str]) -> Deferred[dict[str, list[IPAddress]]]:
    """Resolve host names of address lists with ``name_resolver`` (an
    ``IHostnameResolver``); a name that fails maps to ``[]`` (logged).
    Never fails."""
    names = sorted(set(wanted))

    def addresses(found: list[Any]) -> list[IPAddress]:
        return list(dict.fromkeys(ipaddress.ip_address(a.host.split("%", 1)[0]) for a in found))

    def one(name: str) -> Deferred[list[IPAddress]]:
        def failed(failure: Failure) -> list[IPAddress]:
            log.warn("cannot resolve {name}: {error}", name=name,
                     error=failure.getErrorMessage())
            return []

        return resolve_host(name_resolver, name, 0).addCallback(addresses).addErrback(failed)

    gathered = defer.gatherResults([one(name) for name in names])
    return gathered.addCallback(lambda found: dict(zip(names, found)))
