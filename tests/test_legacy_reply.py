"""Tests for rspamd_tx.protocols.legacy_reply: checkv2 JSON to RSPAMC/SPAMC text."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.trial import unittest

from rspamd_tx.protocols.http_codec import LegacyVariant
from rspamd_tx.protocols.legacy_reply import (
    LegacyReplyError,
    legacy_reply,
    parse_reply,
    rspamc_body,
    spamc_body,
)
from rspamd_tx.upstreams.http_client import ScannerClient
from tests.helpers.messages import GTUBE_MESSAGE
from tests.peers.rspamd import skip_unless_rspamd, start_rspamd

# The observed 3.4 reply of http-protocol.md section 5.3 (two symbols kept).
GREYLIST_REPLY: dict[str, Any] = {
    "is_skipped": False,
    "score": 4.5,
    "required_score": 15.0,
    "action": "greylist",
    "symbols": {
        "ARC_NA": {
            "name": "ARC_NA",
            "score": 0.0,
            "metric_score": 0.0,
            "description": "ARC signature absent",
        },
        "RDNS_NONE": {"name": "RDNS_NONE", "score": 1.0, "metric_score": 1.0, "options": ["x"]},
    },
    "messages": {},
    "urls": ["example.com"],
    "emails": ["joe@example.net"],
    "message-id": "t1@example.com",
    "time_real": 1.214761,
    "milter": {"remove_headers": {"X-Spam": 0}},
}

# The observed GTUBE reply (http-protocol.md section 5.3).
GTUBE_JSON = (
    b'{"is_skipped":true,"score":15.0,"required_score":15.0,"action":"reject",'
    b'"symbols":{"GTUBE":{"name":"GTUBE","score":0.0,"metric_score":0.0}},'
    b'"messages":{"smtp_message":"Gtube pattern"},"message-id":"undef","time_real":0.000346}'
)


class RspamcTests(unittest.TestCase):
    """RSPAMC (Exim variant=rspamd) reply text."""

    def test_spec_example(self) -> None:
        """The observed greylist reply converts to the spec's RSPAMC text."""
        self.assertEqual(
            legacy_reply(LegacyVariant.RSPAMC, GREYLIST_REPLY),
            b"RSPAMD/1.3 0 EX_OK\r\n"
            b"Metric: default; False; 4.50 / 15.00 / 0.0\r\n"
            b"Action: greylist\r\n"
            b"Symbol: ARC_NA(0.00)\r\n"
            b"Symbol: RDNS_NONE(1.00)\r\n"
            b"Message-ID: t1@example.com\r\n",
        )

    def test_gtube_from_json_bytes(self) -> None:
        """The GTUBE JSON bytes convert with its smtp_message as a Message line."""
        self.assertEqual(
            legacy_reply(LegacyVariant.RSPAMC, GTUBE_JSON),
            b"RSPAMD/1.3 0 EX_OK\r\n"
            b"Metric: default; False; 15.00 / 15.00 / 0.0\r\n"
            b"Action: reject\r\n"
            b"Symbol: GTUBE(0.00)\r\n"
            b"Message: Gtube pattern\r\n"
            b"Message-ID: undef\r\n",
        )

    def test_subject_line_after_action(self) -> None:
        """A rewrite-subject reply has its Subject line right after Action."""
        reply = {
            "score": 7.25,
            "required_score": 15,
            "action": "rewrite subject",
            "subject": "*** SPAM *** hi",
            "symbols": {},
            "message-id": "m@x",
        }
        self.assertEqual(
            rspamc_body(reply),
            b"Metric: default; False; 7.25 / 15.00 / 0.0\r\n"
            b"Action: rewrite subject\r\n"
            b"Subject: *** SPAM *** hi\r\n"
            b"Message-ID: m@x\r\n",
        )

    def test_is_spam_key_sets_true(self) -> None:
        """The True word appears only when the reply has is_spam: true (v1 replies)."""
        self.assertTrue(rspamc_body({"is_spam": True}).startswith(b"Metric: default; True;"))
        self.assertTrue(rspamc_body({"is_spam": 1}).startswith(b"Metric: default; False;"))

    def test_missing_and_odd_values(self) -> None:
        """Missing numbers print 0.00; non-string action/message-id print (NULL)."""
        self.assertEqual(
            rspamc_body(
                {
                    "score": "9",
                    "action": 3,
                    "message-id": None,
                    "symbols": {"A": {"score": True}, "B": "not an object"},
                }
            ),
            b"Metric: default; False; 0.00 / 0.00 / 0.0\r\n"
            b"Action: (NULL)\r\n"
            b"Symbol: A(0.00)\r\n"
            b"Message-ID: (NULL)\r\n",
        )

    def test_compat_messages_array(self) -> None:
        """Messages given as an array (compat_messages) print one line per string."""
        body = rspamc_body({"messages": ["one", 2, "three"]})
        self.assertIn(b"Message: one\r\nMessage: three\r\n", body)
        self.assertNotIn(b"Message: 2", body)

    def test_rounding(self) -> None:
        """Scores are rounded with %.2f, negative scores keep their sign."""
        body = rspamc_body(
            {"score": -0.105, "required_score": 14.999, "symbols": {"S": {"score": -1.0}}}
        )
        self.assertEqual(
            body,
            b"Metric: default; False; -0.10 / 15.00 / 0.0\r\nSymbol: S(-1.00)\r\n",
        )

    def test_utf8_text(self) -> None:
        """Non-ASCII subjects are written as UTF-8."""
        body = rspamc_body({"subject": "Привет"})
        self.assertIn("Subject: Привет\r\n".encode(), body)


class SpamcTests(unittest.TestCase):
    """SPAMC (spamc) reply text."""

    def test_spec_example(self) -> None:
        """Symbols are listed comma-separated after the blank line; Content-length counts them."""
        self.assertEqual(
            legacy_reply(LegacyVariant.SPAMC, GREYLIST_REPLY),
            b"SPAMD/1.1 0 EX_OK\r\n"
            b"Content-length: 18\r\n"
            b"Spam: False ; 4.50 / 15.00\r\n"
            b"\r\n"
            b"ARC_NA,RDNS_NONE\r\n",
        )

    def test_no_symbols(self) -> None:
        """Without symbols there is no symbol line and Content-length is the whole text."""
        self.assertEqual(
            legacy_reply(LegacyVariant.SPAMC, {"score": 0, "required_score": 15, "symbols": {}}),
            b"SPAMD/1.1 0 EX_OK\r\nContent-length: 30\r\nSpam: False ; 0.00 / 15.00\r\n\r\n",
        )

    def test_body_only(self) -> None:
        """spamc_body writes the Spam line, blank line and symbol line."""
        self.assertEqual(
            spamc_body(json.loads(GTUBE_JSON)),
            b"Spam: False ; 15.00 / 15.00\r\n\r\nGTUBE\r\n",
        )


class ParseTests(unittest.TestCase):
    """Reply decoding."""

    def test_rejects_non_object(self) -> None:
        """JSON that is not an object, invalid JSON and invalid UTF-8 raise LegacyReplyError."""
        for text in (b"[1, 2]", b"{", b"\xff\xfe", b"", "null"):
            self.assertRaises(LegacyReplyError, parse_reply, text)

    def test_mapping_passes_through(self) -> None:
        """A mapping is used as is."""
        self.assertIs(parse_reply(GREYLIST_REPLY), GREYLIST_REPLY)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=12,
)
_reply_keys = st.sampled_from(
    ["score", "required_score", "action", "subject", "symbols", "messages", "message-id", "is_spam"]
)


class FuzzTests(unittest.TestCase):
    """Any input converts or raises only LegacyReplyError."""

    @settings(max_examples=300, deadline=None)
    @given(
        st.dictionaries(_reply_keys, _json_values, max_size=8), st.sampled_from(list(LegacyVariant))
    )
    def test_any_reply_object(self, reply: dict[str, Any], variant: LegacyVariant) -> None:
        """Any JSON object converts to bytes starting with the variant's status line."""
        wire = legacy_reply(variant, reply)
        prefix = (
            b"SPAMD/1.1 0 EX_OK\r\n"
            if variant is LegacyVariant.SPAMC
            else b"RSPAMD/1.3 0 EX_OK\r\n"
        )
        self.assertTrue(wire.startswith(prefix))

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=200))
    def test_any_bytes(self, data: bytes) -> None:
        """Random bytes convert or raise LegacyReplyError."""
        try:
            legacy_reply(LegacyVariant.RSPAMC, data)
        except LegacyReplyError:
            pass


class _RawExchange(Protocol):
    """Writes a request and collects everything until the server closes."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = bytearray()
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done.callback(bytes(self.received))


def _sorted_symbol_lines(reply: bytes) -> bytes:
    """RSPAMC text with its Symbol lines sorted (Rspamd prints them in hash order)."""
    lines = reply.split(b"\r\n")
    symbols = iter(sorted(line for line in lines if line.startswith(b"Symbol: ")))
    return b"\r\n".join(next(symbols) if line.startswith(b"Symbol: ") else line for line in lines)


def _sorted_spamc_symbols(reply: bytes) -> bytes:
    """SPAMC text with its comma-separated symbol list sorted."""
    head, separator, names = reply.partition(b"\r\n\r\n")
    return head + separator + b",".join(sorted(names.rstrip(b"\r\n").split(b","))) + b"\r\n"


SCAN_MESSAGE = (
    b"From: Sender <sender@example.com>\r\nTo: rcpt@example.net\r\nSubject: hello\r\n"
    b"Message-ID: <t1@example.com>\r\nDate: Mon, 23 Nov 2026 17:00:00 +0000\r\n\r\n"
    b"Hello, see http://example.com/ for details.\r\n"
)


class RealRspamdTests(unittest.TestCase):
    """Our conversion of a /checkv2 reply equals Rspamd 3.4's own legacy reply."""

    skip = skip_unless_rspamd()
    timeout = 300

    @inlineCallbacks
    def test_matches_rspamd_legacy_output(self) -> Any:
        """RSPAMC and SPAMC text from the checkv2 JSON equal what Rspamd answers legacy clients."""
        from twisted.internet import reactor
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        peer = yield start_rspamd(reactor, workers=("normal",), wait_hyperscan=False)
        self.addCleanup(peer.stop)
        port = peer.ports["normal"]
        envelope = [("From", "sender@example.com"), ("Rcpt", "rcpt@example.net")]
        client = ScannerClient(reactor)
        self.addCleanup(client.close)
        for message in (SCAN_MESSAGE, GTUBE_MESSAGE):
            reply = yield client.request(
                ("127.0.0.1", port), "POST", "/checkv2", envelope, message, timeout=30
            )
            head = "".join(f"{name}: {value}\r\n" for name, value in envelope)
            head += f"Content-length: {len(message)}\r\n\r\n"
            for variant, line in (
                (LegacyVariant.RSPAMC, "CHECK RSPAMC/1.3"),
                (LegacyVariant.SPAMC, "SYMBOLS SPAMC/1.2"),
            ):
                exchange = _RawExchange(f"{line}\r\n{head}".encode() + message)
                endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10)
                yield connectProtocol(endpoint, exchange)
                real = yield exchange.done
                ours = legacy_reply(variant, reply.body)
                if variant is LegacyVariant.RSPAMC:
                    self.assertTrue(real.startswith(b"RSPAMD/1.3 0 EX_OK\r\nMetric: default; "))
                    self.assertEqual(_sorted_symbol_lines(ours), _sorted_symbol_lines(real))
                else:
                    self.assertTrue(real.startswith(b"SPAMD/1.1 0 EX_OK\r\nContent-length: "))
                    self.assertEqual(_sorted_spamc_symbols(ours), _sorted_spamc_symbols(real))
