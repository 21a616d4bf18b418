"""Address lists of the configuration as sets of networks.

An address-list option (``allow_update``, ``blocked``, the milter's
``whitelist``…) holds networks, host names (:class:`~rspamd_tx.config.schema.HostRef`)
and map references (:class:`~rspamd_tx.config.schema.MapRef`).  A worker
resolves the host names (:func:`resolve_names`, at start and on reload) and
turns the list into a :class:`NetworkSet` with :func:`networks`, which also
reads local map files: one address or network per line, ``#`` comments and
blank lines skipped.  Remote (HTTP) maps are not read here: they are logged
and left out.

IPv4-mapped IPv6 addresses count as their IPv4 address everywhere.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from rspamd_tx.upstreams.resolve import resolve_host
from rspamd_tx.config.schema import HostRef, MapRef, NetworkEntry

__all__ = [
    "IPAddress",
    "Network",
    "NetworkSet",
    "host_names",
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
    path = url[len("file://"):] if url.startswith("file://") else url
    if not path.startswith(("/", "./", "../")):
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
