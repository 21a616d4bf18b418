"""Tests for :mod:`rspamd_tx.fuzzy.ratelimit` (Rspamd 3.4 leaky buckets)."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import Any

from twisted.internet.task import Clock
from twisted.trial import unittest

from rspamd_tx.fuzzy.ratelimit import RateLimiter, bucket_network

CLIENT = ip_address("192.0.2.10")
NEIGHBOUR = ip_address("192.0.2.200")
OTHER_NET = ip_address("198.51.100.1")


class BucketNetworkTests(unittest.TestCase):
    def test_ipv4_mask(self) -> None:
        """IPv4 sources share a bucket per /mask network."""
        self.assertEqual(bucket_network(CLIENT, 24), IPv4Network("192.0.2.0/24"))

    def test_ipv4_mask_capped_at_32(self) -> None:
        """An IPv4 mask above 32 means the single address."""
        self.assertEqual(bucket_network(CLIENT, 40), IPv4Network("192.0.2.10/32"))

    def test_ipv6_default_mask(self) -> None:
        """IPv6 uses four times the IPv4 mask: /96 by default."""
        self.assertEqual(bucket_network(ip_address("2001:db8::1:2:3"), 24),
                         IPv6Network("2001:db8::1:0:0/96"))

    def test_ipv6_mask_at_least_64(self) -> None:
        """IPv6 buckets are never wider than /64."""
        self.assertEqual(bucket_network(ip_address("2001:db8::1"), 8).prefixlen, 64)


class RateLimiterTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def limiter(self, **kwargs: object) -> RateLimiter:
        settings: dict[str, Any] = {"rate": 1.0, "burst": 3.0}
        settings.update(kwargs)
        return RateLimiter(settings.pop("rate"), settings.pop("burst"), self.clock, **settings)

    def test_burst_then_block(self) -> None:
        """A bucket at its burst blocks, still serving the request that found it full."""
        limiter = self.limiter()
        answers = [limiter.allow(CLIENT) for _ in range(5)]
        # levels: new=1, 2, 3, full (served, now blocked), refused
        self.assertEqual(answers, [True, True, True, True, False])
        self.assertEqual(limiter.limited, 1)

    def test_network_shares_bucket(self) -> None:
        """Addresses in the same /24 fill the same bucket; another network does not."""
        limiter = self.limiter(burst=1.0)
        self.assertTrue(limiter.allow(CLIENT))
        self.assertTrue(limiter.allow(NEIGHBOUR))  # finds the bucket full: blocks it
        self.assertFalse(limiter.allow(CLIENT))
        self.assertTrue(limiter.allow(OTHER_NET))

    def test_leak(self) -> None:
        """The level drains at ``rate`` per second, so a steady client is not blocked."""
        limiter = self.limiter(rate=1.0, burst=2.0)
        for _ in range(20):
            self.assertTrue(limiter.allow(CLIENT))
            self.clock.advance(1.0)

    def test_blocked_until_ttl(self) -> None:
        """A blocked bucket stays blocked until its lifetime since creation ends."""
        limiter = self.limiter(burst=1.0, bucket_ttl=100.0)
        limiter.allow(CLIENT)
        limiter.allow(CLIENT)
        self.clock.advance(99.0)
        self.assertFalse(limiter.allow(CLIENT))
        self.clock.advance(1.0)
        self.assertTrue(limiter.allow(CLIENT))

    def test_whitelist(self) -> None:
        """Whitelisted sources are never limited and make no bucket."""
        limiter = self.limiter(burst=1.0, whitelist={CLIENT})
        self.assertTrue(all(limiter.allow(CLIENT) for _ in range(10)))
        self.assertEqual(len(limiter), 0)

    def test_local_socket_exempt(self) -> None:
        """A source without an address (unix socket) is never limited."""
        limiter = self.limiter(burst=1.0)
        self.assertTrue(all(limiter.allow(None) for _ in range(10)))

    def test_log_only(self) -> None:
        """With ``log_only`` the limit is counted but nothing is refused."""
        limiter = self.limiter(burst=1.0, log_only=True)
        self.assertTrue(all(limiter.allow(CLIENT) for _ in range(5)))
        self.assertEqual(limiter.limited, 3)

    def test_lru_bound(self) -> None:
        """At most ``max_buckets`` are kept; the least recently used goes first."""
        limiter = self.limiter(burst=1.0, max_buckets=2)
        limiter.allow(CLIENT)
        limiter.allow(CLIENT)  # blocked
        for other in ("198.51.100.1", "203.0.113.1"):
            limiter.allow(ip_address(other))
        self.assertEqual(len(limiter), 2)
        self.assertTrue(limiter.allow(CLIENT))  # its blocked bucket was evicted
