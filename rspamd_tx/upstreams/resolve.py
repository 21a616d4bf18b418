"""Name resolution for upstream entries on top of Twisted's resolvers.

:func:`make_resolver` returns a :data:`~rspamd_tx.upstreams.balancer.Resolver`
(``entry -> Deferred[list[address]]``) built from an ``IHostnameResolver``
(``reactor.nameResolver``) and, for ``service=`` entries, an
``twisted.internet.interfaces.IResolver`` (``twisted.names.client``) that
answers SRV queries.  Nothing here imports the global reactor.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    IResolutionReceiver,
    IResolver,
)
from twisted.names import dns
from zope.interface import implementer

from rspamd_tx.upstreams.balancer import Address, Resolver
from rspamd_tx.upstreams.hosts import EntryKind, UpstreamEntry

__all__ = ["ResolutionFailed", "make_resolver", "resolve_host"]


class ResolutionFailed(Exception):
    """A name resolved to no usable address."""


@implementer(IResolutionReceiver)
class _Collector:
    """Collects the addresses of one ``resolveHostName`` call."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.addresses: list[Address] = []
        self.done: defer.Deferred[list[Address]] = defer.Deferred()

    def resolutionBegan(self, resolution: IHostResolution) -> None:
        """Nothing to do until addresses arrive."""

    def addressResolved(self, address: object) -> None:
        """Keep TCP IPv4/IPv6 addresses, with our port."""
        if isinstance(address, IPv4Address):
            self.addresses.append(IPv4Address("TCP", address.host, self.port))
        elif isinstance(address, IPv6Address):
            self.addresses.append(IPv6Address("TCP", address.host, self.port))

    def resolutionComplete(self) -> None:
        """Fire with the addresses collected."""
        self.done.callback(self.addresses)


def resolve_host(
    name_resolver: IHostnameResolver, host: str, port: int
) -> "defer.Deferred[list[Address]]":
    """Resolve ``host`` to TCP addresses carrying ``port``.

    Fails with :class:`ResolutionFailed` when nothing resolves.
    """
    collector = _Collector(port)
    name_resolver.resolveHostName(collector, host, port)

    def check(addresses: list[Address]) -> list[Address]:
        if not addresses:
            raise ResolutionFailed(f"{host} does not resolve")
        return addresses

    return collector.done.addCallback(check)


def make_resolver(
    name_resolver: IHostnameResolver, srv_resolver: IResolver | None = None
) -> Resolver:
    """Return an entry resolver.

    ``inet`` entries resolve their host (A and AAAA via ``name_resolver``);
    ``srv`` entries query SRV records with ``srv_resolver`` and resolve every
    target with its port, ordered by SRV priority then descending weight;
    ``unix`` entries need no resolution and map to nothing.

    The resolver's Deferred fails with :class:`ResolutionFailed` when a name
    resolves to nothing or an SRV entry has no ``srv_resolver``, and with the
    DNS error of a failed SRV query.
    """

    def resolve(entry: UpstreamEntry) -> "defer.Deferred[list[Address]]":
        if entry.kind is EntryKind.INET:
            assert entry.port is not None
            return resolve_host(name_resolver, entry.host, entry.port)
        if entry.kind is EntryKind.SRV:
            if srv_resolver is None:
                return defer.fail(ResolutionFailed(f"no SRV resolver for {entry.name}"))
            # IResolver declares ``timeout`` without the default every
            # resolver gives it; the resolver's own timeouts apply.
            return srv_resolver.lookupService(  # type: ignore[call-arg]
                entry.host).addCallback(_resolve_targets)
        return defer.succeed([])

    def _resolve_targets(result: Any) -> "defer.Deferred[list[Address]]":
        """Resolve the targets of ``(answers, authority, additional)``."""
        answers = [rr.payload for rr in result[0] if isinstance(rr.payload, dns.Record_SRV)]
        answers.sort(key=lambda srv: (srv.priority, -srv.weight))
        lookups: list[defer.Deferred[list[Address]]] = [
            resolve_host(name_resolver, str(srv.target), srv.port).addErrback(lambda _: [])
            for srv in answers
            if str(srv.target) not in ("", ".")
        ]

        def merge(lists: list[list[Address]]) -> list[Address]:
            merged = [address for addresses in lists for address in addresses]
            if not merged:
                raise ResolutionFailed("SRV targets do not resolve")
            return merged

        return defer.gatherResults(lookups).addCallback(merge)

    return resolve
