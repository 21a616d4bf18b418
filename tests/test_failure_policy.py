"""Tests for rspamd_tx.proxy.failure_policy: the failure class → action table."""

from __future__ import annotations

from twisted.trial import unittest

from rspamd_tx.config import ucl
from rspamd_tx.config.tree import UclObject
from rspamd_tx.config.workers import FailurePolicy, ProxyOptions, check_config
from rspamd_tx.protocols.legacy_reply import rspamc_body
from rspamd_tx.proxy.failure_policy import (
    SYNTHETIC_SYMBOL,
    FailurePolicyTable,
    synthetic_result,
)
from rspamd_tx.proxy.scanning import FailureAction, FailureClass, ScanFailure


def proxy_options(text: str) -> ProxyOptions:
    """The checked options of a proxy worker whose body is the UCL ``text``."""
    tree = UclObject(worker=UclObject(rspamd_proxy=ucl.loads(text)))
    config, diagnostics = check_config(tree)
    errors = [d for d in diagnostics if d.severity == "error"]
    assert not errors, errors
    options = config.workers[0].options
    assert isinstance(options, ProxyOptions)
    return options


TIMEOUT = ScanFailure(FailureClass.TIMEOUT, 408, "IO timeout", ("a", "b"))


class TableTests(unittest.TestCase):
    """The table built from arguments and from configuration."""

    def test_default_is_tempfail_everywhere(self) -> None:
        """Without configuration every class is tempfail, as Rspamd answers every failure."""
        table = FailurePolicyTable()
        self.assertEqual(
            dict(table.actions), {kind: FailureAction.TEMPFAIL for kind in FailureClass}
        )

    def test_partial_table_fills_default(self) -> None:
        """Classes not given take the default action."""
        table = FailurePolicyTable({FailureClass.TIMEOUT: FailureAction.ACCEPT}, FailureAction.REJECT)
        self.assertEqual(table.action_for(FailureClass.TIMEOUT), FailureAction.ACCEPT)
        self.assertEqual(table.action_for(FailureClass.NO_UPSTREAM), FailureAction.REJECT)

    def test_action_for_failure(self) -> None:
        """A ScanFailure is looked up by its class."""
        table = FailurePolicyTable({FailureClass.TIMEOUT: FailureAction.DISCARD})
        self.assertEqual(table.action_for(TIMEOUT), FailureAction.DISCARD)

    def test_from_default_options(self) -> None:
        """The configuration's defaults give the all-tempfail table."""
        self.assertEqual(FailurePolicyTable.from_options(FailurePolicy()), FailurePolicyTable())

    def test_from_configuration_block(self) -> None:
        """``failure_policy { }`` in a proxy worker sets the actions per class."""
        options = proxy_options(
            'failure_policy { timeout = "accept"; no_upstream = "reject"; oversize = "discard"; }'
        )
        table = FailurePolicyTable.from_options(options.failure_policy)
        self.assertEqual(
            dict(table.actions),
            {
                FailureClass.TIMEOUT: FailureAction.ACCEPT,
                FailureClass.NO_UPSTREAM: FailureAction.REJECT,
                FailureClass.OVERSIZE: FailureAction.DISCARD,
                FailureClass.BAD_REPLY: FailureAction.TEMPFAIL,
            },
        )

    def test_actions_read_only(self) -> None:
        """The table cannot be changed through ``actions``."""
        table = FailurePolicyTable()
        with self.assertRaises(TypeError):
            table.actions[FailureClass.TIMEOUT] = FailureAction.ACCEPT  # type: ignore[index]


class SyntheticResultTests(unittest.TestCase):
    """The verdict standing in for a failed scan."""

    def test_accept_is_no_action(self) -> None:
        """Accept gives ``no action`` with score 0 and the marker symbol naming the class."""
        result = synthetic_result(FailureAction.ACCEPT, TIMEOUT)
        self.assertEqual(result["action"], "no action")
        self.assertEqual(result["score"], 0.0)
        self.assertEqual(result["symbols"][SYNTHETIC_SYMBOL]["options"], ["timeout"])
        self.assertEqual(result["messages"], {})

    def test_reject_has_smtp_message(self) -> None:
        """Reject gives action ``reject`` and an smtp_message naming the failure."""
        result = synthetic_result(FailureAction.REJECT, TIMEOUT)
        self.assertEqual(result["action"], "reject")
        self.assertEqual(result["messages"], {"smtp_message": "Message not scanned: IO timeout"})

    def test_discard(self) -> None:
        """Discard gives action ``discard``."""
        self.assertEqual(synthetic_result(FailureAction.DISCARD, TIMEOUT)["action"], "discard")

    def test_tempfail_has_no_verdict(self) -> None:
        """Tempfail is answered with an error, never a verdict."""
        self.assertRaises(ValueError, synthetic_result, FailureAction.TEMPFAIL, TIMEOUT)

    def test_converts_to_legacy(self) -> None:
        """A synthetic verdict converts to the RSPAMC text like a scan result."""
        body = rspamc_body(synthetic_result(FailureAction.ACCEPT, TIMEOUT))
        self.assertEqual(
            body,
            b"Metric: default; False; 0.00 / 0.00 / 0.0\r\n"
            b"Action: no action\r\n"
            b"Symbol: PROXY_SCAN_FAILED(0.00)\r\n"
            b"Message-ID: undef\r\n",
        )
