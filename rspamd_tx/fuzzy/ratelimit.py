"""Leaky-bucket rate limiting of fuzzy CHECK requests, as Rspamd 3.4 does it.

``fuzzy-protocol.md`` §12.1: a bucket per source *network* (the address masked
to ``ratelimit_network_mask`` bits for IPv4, ``min(max(4 × mask, 64), 128)``
for IPv6), kept in an LRU of ``ratelimit_max_buckets`` entries that each live
``ratelimit_bucket_ttl`` seconds from creation.

* A new bucket starts at level 1.
* An existing bucket first leaks ``rate × elapsed`` (never below 0); then, if
  its level has reached ``burst``, it becomes *blocked* (the request that finds
  it full is still served), otherwise its level grows by 1.
* While blocked, every CHECK from the network is refused, until the bucket's
  lifetime ends and it is forgotten.

Sources in the whitelist are never limited.  With ``log_only`` the buckets are
kept and limits logged, but nothing is refused.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Container
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

__all__ = ["IPAddress", "RateLimiter", "bucket_network"]

log = Logger()

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
"""A client address."""


def bucket_network(address: IPAddress, mask: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """The network whose bucket ``address`` fills: ``/mask`` (IPv4, at most 32)
    or ``/min(max(4·mask, 64), 128)`` (IPv6)."""
    if isinstance(address, ipaddress.IPv4Address):
        return ipaddress.IPv4Network((address, min(mask, 32)), strict=False)
    return ipaddress.IPv6Network((address, min(max(mask * 4, 64), 128)), strict=False)


@dataclass(slots=True)
class _Bucket:
    level: float
    last: float
    created: float
    blocked: bool = False


class RateLimiter:
    """Per-network leaky buckets for CHECK requests.

    Attributes:
        rate: leak rate, requests per second.
        burst: bucket capacity.
        network_mask: IPv4 prefix length of a bucket (IPv6 derived from it).
        max_buckets: buckets kept; the least recently used one is dropped first.
        bucket_ttl: seconds a bucket lives after its creation.
        whitelist: addresses never limited (anything supporting ``in``).
        log_only: evaluate and log, never refuse.
        limited: requests refused (or, with ``log_only``, that would have been).
    """

    def __init__(
        self,
        rate: float,
        burst: float,
        clock: IReactorTime,
        *,
        network_mask: int = 24,
        max_buckets: int = 2000,
        bucket_ttl: float = 3600.0,
        whitelist: Container[IPAddress] = (),
        log_only: bool = False,
    ) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        self.network_mask = network_mask
        self.max_buckets = max(1, max_buckets)
        self.bucket_ttl = float(bucket_ttl)
        self.whitelist = whitelist
        self.log_only = log_only
        self.limited = 0
        self._clock = clock
        self._buckets: OrderedDict[
            ipaddress.IPv4Network | ipaddress.IPv6Network, _Bucket
        ] = OrderedDict()

    def __len__(self) -> int:
        """Number of buckets currently kept."""
        return len(self._buckets)

    def allow(self, address: IPAddress | None) -> bool:
        """Account one CHECK from ``address``; whether it may be served.

        ``None`` (a local socket without an address) and whitelisted
        addresses are always allowed and fill no bucket.
        """
        if address is None or address in self.whitelist:
            return True
        now = self._clock.seconds()
        network = bucket_network(address, self.network_mask)
        bucket = self._buckets.get(network)
        if bucket is not None and now - bucket.created >= self.bucket_ttl:
            del self._buckets[network]
            bucket = None
        if bucket is None:
            self._buckets[network] = _Bucket(level=1.0, last=now, created=now)
            while len(self._buckets) > self.max_buckets:
                self._buckets.popitem(last=False)
            return True
        self._buckets.move_to_end(network)
        if not bucket.blocked:
            if bucket.last < now:
                bucket.level = max(0.0, bucket.level - self.rate * (now - bucket.last))
            bucket.last = now
            if bucket.level >= self.burst:
                bucket.blocked = True
                log.info(
                    "rate limiting {address} ({network}): more than {burst} requests",
                    address=str(address),
                    network=str(network),
                    burst=self.burst,
                )
            else:
                bucket.level += 1.0
            return True
        self.limited += 1
        return self.log_only
