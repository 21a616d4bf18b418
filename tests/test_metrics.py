"""Tests for rspamd_tx.metrics: the proxy's Prometheus metrics and their endpoint."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web.test.requesthelper import DummyRequest

from rspamd_tx.metrics import MetricsResource, MetricsService, ProxyMetrics
from rspamd_tx.upstreams.balancer import AttemptOutcome, Balancer, StateChange, UpstreamState
from rspamd_tx.upstreams.hosts import parse_upstreams

from tests.helpers.net import http_get


class ProxyMetricsTests(unittest.TestCase):
    """Counters, gauges and the histogram."""

    def setUp(self) -> None:
        self.metrics = ProxyMetrics()

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)

    def test_registry_per_instance(self) -> None:
        """Two instances do not share metrics (one registry per process, never the global one)."""
        other = ProxyMetrics()
        self.metrics.request_finished("local")
        self.assertEqual(self.sample("rspamd_tx_proxy_requests_total", outcome="local"), 1.0)
        self.assertIsNone(other.registry.get_sample_value("rspamd_tx_proxy_requests_total", {"outcome": "local"}))

    def test_track_initial_states(self) -> None:
        """Tracking a balancer shows each upstream alive."""
        balancer = Balancer(parse_upstreams("127.0.0.1,127.0.0.2"), clock=Clock())
        self.metrics.track("local", balancer)
        self.assertEqual(self.sample("rspamd_tx_proxy_upstream_state", block="local", upstream="127.0.0.1", state="alive"), 1.0)
        self.assertEqual(self.sample("rspamd_tx_proxy_upstream_state", block="local", upstream="127.0.0.2", state="down"), 0.0)

    def test_state_change_from_balancer(self) -> None:
        """Marking an upstream down through the balancer moves its gauge to down."""
        balancer = Balancer(parse_upstreams("127.0.0.1,127.0.0.2"), clock=Clock())
        balancer.observers.append(lambda event: self.metrics.observe("local", event))
        balancer.mark_down(balancer.get("127.0.0.1"), "test")
        self.assertEqual(self.sample("rspamd_tx_proxy_upstream_state", block="local", upstream="127.0.0.1", state="down"), 1.0)
        self.assertEqual(self.sample("rspamd_tx_proxy_upstream_state", block="local", upstream="127.0.0.1", state="alive"), 0.0)

    def test_probing_state(self) -> None:
        """A probing state event shows as probing."""
        self.metrics.observe("b", StateChange("u", UpstreamState.DOWN, UpstreamState.PROBING, "probe"))
        self.assertEqual(self.sample("rspamd_tx_proxy_upstream_state", block="b", upstream="u", state="probing"), 1.0)

    def test_attempt_outcomes(self) -> None:
        """Successful attempts feed the latency histogram, failed ones the failure counter."""
        self.metrics.observe("b", AttemptOutcome("u", None, True, 0.02))
        self.metrics.observe("b", AttemptOutcome("u", None, False, 1.0))
        self.assertEqual(self.sample("rspamd_tx_proxy_upstream_latency_seconds_count", block="b", upstream="u"), 1.0)
        self.assertEqual(self.sample("rspamd_tx_proxy_upstream_latency_seconds_bucket", block="b", upstream="u", le="0.025"), 1.0)
        self.assertEqual(self.sample("rspamd_tx_proxy_upstream_failures_total", block="b", upstream="u"), 1.0)

    def test_requests_in_flight_and_retries(self) -> None:
        """In-flight follows started/finished scans; attempts beyond the first are retries."""
        self.metrics.request_started()
        self.metrics.request_started()
        self.assertEqual(self.sample("rspamd_tx_proxy_requests_in_flight"), 2.0)
        self.metrics.request_finished("scanned", block="local", tried=3, scanned=True)
        self.assertEqual(self.sample("rspamd_tx_proxy_requests_in_flight"), 1.0)
        self.assertEqual(self.sample("rspamd_tx_proxy_retries_total", block="local"), 2.0)
        self.assertEqual(self.sample("rspamd_tx_proxy_requests_total", outcome="scanned"), 1.0)

    def test_unknown_outcome(self) -> None:
        """An outcome outside the list is a programming error."""
        self.assertRaises(ValueError, self.metrics.request_finished, "weird")

    def test_resource_renders_text_format(self) -> None:
        """The resource answers with the Prometheus text format of the registry."""
        self.metrics.request_finished("local")
        request = DummyRequest([b""])
        body = MetricsResource(self.metrics.registry).render_GET(request)
        self.assertIn(b'rspamd_tx_proxy_requests_total{outcome="local"} 1.0', body)
        self.assertTrue(request.responseHeaders.getRawHeaders(b"content-type")[0].startswith(b"text/plain"))


class MetricsServiceTests(unittest.TestCase):
    """The endpoint on a loopback port."""

    @inlineCallbacks
    def test_serves_metrics(self) -> Any:
        """GET /metrics on the configured address returns the registry; other paths 404."""
        metrics = ProxyMetrics()
        metrics.request_finished("policy")
        service = MetricsService("127.0.0.1:0", metrics.registry, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        [port] = service.ports
        status, body = yield http_get(reactor, "127.0.0.1", port.getHost().port, "/metrics")
        self.assertEqual(status, 200)
        self.assertIn(b'rspamd_tx_proxy_requests_total{outcome="policy"} 1.0', body)
        status, _ = yield http_get(reactor, "127.0.0.1", port.getHost().port, "/other")
        self.assertEqual(status, 404)

    def test_bad_address_logged(self) -> None:
        """An address that cannot be bound is logged; the service runs without endpoint."""
        service = MetricsService("/nonexistent-dir/metrics.sock", ProxyMetrics().registry, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(service.ports, [])
