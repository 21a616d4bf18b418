"""End to end: swaks → a throwaway Postfix → our milter listener → a real Rspamd 3.4 normal worker.

Our proxy worker is built by :func:`rspamd_tx.proxy.server.build_worker` with
``milter = yes`` and listens in process; Postfix (``tests/peers/postfix.py``)
uses it as its ``smtpd_milters`` and delivers accepted mail into files.  The
scanner has network modules off, a ``regexp`` rule scoring a Subject (with
the client's ``X-Spam: yes`` flag that makes an ``add header`` verdict) and
``milter_headers`` routines that ask for headers.

Run inside ``unshare -n`` as CI does.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial import unittest

from rspamd_tx.config import ucl
from rspamd_tx.config.tree import UclObject
from rspamd_tx.config.workers import check_config
from rspamd_tx.proxy.milter_listener import MilterFactory
from rspamd_tx.proxy.server import ProxyWorker, build_worker

from tests.peers.postfix import (
    PostfixPeer, SwaksResult, skip_unless_postfix, smtp_session, start_postfix, swaks,
)
from tests.peers.rspamd import RspamdPeer, skip_unless_rspamd, start_rspamd
from tests.helpers.serving import serve_on_loopback
from tests.test_milter_frames_vs_rspamd import use_private_hs_cache

GTUBE = (
    b"From: spammer@example.net\r\nTo: rcpt@example.org\r\nSubject: test\r\n"
    b"Message-ID: <gtube@example.net>\r\n\r\n"
    b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X\r\n"
)
HAM = (
    b"From: Sender <sender@example.net>\r\nTo: <rcpt@example.org>\r\n"
    b"Subject: Lunch tomorrow\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <ham1@example.net>\r\n\r\n"
    b"Hi,\r\n\r\nshall we have lunch tomorrow at noon?\r\n\r\nSender\r\n"
)
SPAMMY = (
    b"From: Sender <sender@example.net>\r\nTo: <rcpt@example.org>\r\n"
    b"Subject: tx-add-header offer\r\nX-Spam: yes\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <spammy1@example.net>\r\n\r\n"
    b"Hi,\r\n\r\nan offer.\r\n"
)
REGEXP_RULES = 'TX_ADD_HEADER { re = "Subject=/tx-add-header/H"; score = 2.0; description = "test"; }\n'
MILTER_HEADERS = """
use = ["x-rspamd-queue-id", "x-spam-status"];
skip_local = false;
skip_authenticated = false;
"""


def proxy_worker(upstream: str, extra: str = "") -> ProxyWorker:
    """Our proxy worker in milter mode in front of ``upstream``."""
    text = (
        'worker "rspamd_proxy" { milter = yes; timeout = 10s; max_retries = 2;'
        f' upstream {{ local {{ default = yes; hosts = "{upstream}"; }} }} {extra} }}'
    )
    config, diagnostics = check_config(UclObject(ucl.loads(text)))
    errors = [d for d in diagnostics if d.severity == "error"]
    assert not errors, errors
    return build_worker(config, config.workers[0], reactor)


def closed_port() -> int:
    """A loopback port nothing listens on (bound and released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PostfixCase(unittest.TestCase):
    """Postfix in front of our milter listener."""

    skip = skip_unless_postfix() or skip_unless_rspamd()
    timeout = 240

    @defer.inlineCallbacks
    def start_milter(self, worker: ProxyWorker) -> Any:
        """Start ``worker``'s services and listener and a Postfix using it; return the Postfix."""
        self.assertIsInstance(worker.stream_factory(), MilterFactory)
        for service in worker.services():
            service.startService()
            self.addCleanup(service.stopService)
        port, number = serve_on_loopback(reactor, worker.stream_factory())
        self.addCleanup(port.stopListening)
        mta: PostfixPeer = yield start_postfix(reactor, f"inet:127.0.0.1:{number}")
        self.addCleanup(mta.stop)
        return mta

    @defer.inlineCallbacks
    def send(self, mta: PostfixPeer, message: bytes) -> Any:
        result: SwaksResult = yield swaks(reactor, mta.port, message)
        return result


class PostfixScanTests(PostfixCase):
    """Verdicts of a real Rspamd reach the SMTP client through Postfix."""

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        use_private_hs_cache(self, "milter-postfix")
        rspamd: RspamdPeer = yield start_rspamd(
            reactor, workers=("normal",),
            local={"regexp.conf": REGEXP_RULES, "milter_headers.conf": MILTER_HEADERS})
        self.addCleanup(rspamd.stop)
        self.mta = yield self.start_milter(proxy_worker(rspamd.address("normal")))

    @defer.inlineCallbacks
    def test_gtube_rejected(self) -> Any:
        """GTUBE is refused at the end of DATA with 554 5.7.1 Gtube pattern."""
        result = yield self.send(self.mta, GTUBE)
        self.assertEqual(result.data_reply, "554 5.7.1 Gtube pattern", result.output)

    @defer.inlineCallbacks
    def test_ham_delivered_with_headers(self) -> Any:
        """A ham is delivered with the headers Rspamd asked for (queue id, spam status)."""
        result = yield self.send(self.mta, HAM)
        self.assertTrue(result.data_reply.startswith("250 "), result.output)
        assert result.queue_id is not None
        delivered: bytes = yield self.mta.wait_delivered(result.queue_id)
        head = delivered.split(b"\n\n", 1)[0]
        self.assertIn(b"X-Rspamd-Queue-Id: " + result.queue_id.encode(), head.split(b"\n"))
        self.assertRegex(head, rb"(?m)^X-Spam-Status: No, score=-?[0-9.]+$")
        self.assertIn(b"shall we have lunch tomorrow at noon?", delivered)

    @defer.inlineCallbacks
    def test_add_header_replaces_spam_header(self) -> Any:
        """add header: the client's X-Spam is replaced by exactly one X-Spam: Yes."""
        result = yield self.send(self.mta, SPAMMY)
        self.assertTrue(result.data_reply.startswith("250 "), result.output)
        assert result.queue_id is not None
        delivered: bytes = yield self.mta.wait_delivered(result.queue_id)
        head = delivered.split(b"\n\n", 1)[0]
        spam_headers = [line for line in head.split(b"\n") if line.lower().startswith(b"x-spam:")]
        self.assertEqual(spam_headers, [b"X-Spam: Yes"], head)

    @defer.inlineCallbacks
    def test_several_messages_one_session(self) -> Any:
        """Messages in a row through the same Postfix all get their own verdict."""
        first = yield self.send(self.mta, GTUBE)
        second = yield self.send(self.mta, HAM)
        third = yield self.send(self.mta, GTUBE)
        self.assertEqual(
            [first.data_reply, second.data_reply[:4], third.data_reply],
            ["554 5.7.1 Gtube pattern", "250 ", "554 5.7.1 Gtube pattern"])


    @defer.inlineCallbacks
    def test_one_smtp_session_with_rset(self) -> Any:
        """One SMTP session: a rejected GTUBE, an RSET (Postfix aborts the milter
        message) and a ham on the same milter connection, each with its own verdict."""
        def transaction(message: bytes, rset: bool = False) -> list[bytes]:
            commands = [b"MAIL FROM:<sender@example.net>\r\n", b"RCPT TO:<rcpt@example.org>\r\n"]
            if rset:
                return commands + [b"RSET\r\n"]
            return commands + [b"DATA\r\n", message + b".\r\n"]

        replies: list[str] = yield smtp_session(reactor, self.mta.port, [
            b"EHLO client.rspamd-tx.test\r\n", *transaction(GTUBE), *transaction(HAM, rset=True),
            *transaction(HAM), b"QUIT\r\n"])
        data_replies = [replies[5], replies[12]]
        self.assertEqual(data_replies[0], "554 5.7.1 Gtube pattern", replies)
        self.assertTrue(data_replies[1].startswith("250 2.0.0 Ok: queued as "), replies)
        delivered: bytes = yield self.mta.wait_delivered(data_replies[1].rsplit(" ", 1)[1])
        self.assertIn(b"Subject: Lunch tomorrow", delivered)


class PostfixFailureTests(PostfixCase):
    """Every upstream down: the configured failure action reaches the SMTP client."""

    @defer.inlineCallbacks
    def test_default_tempfail(self) -> Any:
        """By default the milter answers t and Postfix tempfails the message (451 4.7.1)."""
        mta = yield self.start_milter(proxy_worker(f"127.0.0.1:{closed_port()}"))
        result = yield self.send(mta, HAM)
        self.assertTrue(result.data_reply.startswith("451 4.7.1 "), result.output)

    @defer.inlineCallbacks
    def test_configured_reject(self) -> Any:
        """failure_policy reject: 554 5.7.1 naming the failure."""
        policy = "failure_policy { no_upstream = reject; bad_reply = reject; timeout = reject; }"
        mta = yield self.start_milter(proxy_worker(f"127.0.0.1:{closed_port()}", policy))
        result = yield self.send(mta, HAM)
        self.assertRegex(result.data_reply, r"^554 5\.7\.1 Message not scanned: ", result.output)

    @defer.inlineCallbacks
    def test_configured_accept(self) -> Any:
        """failure_policy accept: the message is delivered unscanned."""
        policy = "failure_policy { no_upstream = accept; bad_reply = accept; timeout = accept; }"
        mta = yield self.start_milter(proxy_worker(f"127.0.0.1:{closed_port()}", policy))
        result = yield self.send(mta, HAM)
        self.assertTrue(result.data_reply.startswith("250 "), result.output)
        assert result.queue_id is not None
        delivered: bytes = yield mta.wait_delivered(result.queue_id)
        self.assertNotIn(b"X-Spam-Status", delivered)
