"""Our milter listener against a real MTA-side peer: OpenDKIM's ``miltertest``.

The listener runs in process on a free loopback port with a fake scanner
whose result depends on the message's Subject; ``tests/data/milter/session.lua``
plays eight messages on one connection (one aborted) and checks what
miltertest decoded; a :class:`~tests.peers.miltertest.FrameRelay` between the
two records every frame so the replies can be compared exactly.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from zope.interface import implementer

from rspamd_tx.config.workers import ProxyOptions
from rspamd_tx.protocols.milter_events import (
    Accept, AddRecipient, ChangeHeader, DeleteRecipient, Discard, InsertHeader,
    OptionNegotiationReply, Progress, Quarantine, ReplaceBody, ReplyCode, Tempfail,
)
from rspamd_tx.proxy.failure_policy import FailurePolicyTable
from rspamd_tx.proxy.milter_listener import MilterFactory
from rspamd_tx.proxy.milter_reply import STANDARD_ACTIONS
from rspamd_tx.proxy.scanning import FailureClass, IScanner, ScanFailure, ScanReply, ScanRequest

from tests.peers.miltertest import FrameRelay, run_miltertest, skip_unless_miltertest
from tests.helpers.serving import serve_on_loopback

SCRIPT = os.path.join(os.path.dirname(__file__), "data", "milter", "session.lua")

MODIFY_RESULT = {
    "action": "add header",
    "milter": {
        "add_headers": {"X-Added": {"value": "first", "order": 0}},
        "remove_headers": {"X-Old": 1},
        "add_rcpt": ["<bcc@example.org>"],
        "del_rcpt": ["<rcpt@example.org>"],
    },
}
RESULTS: dict[str, dict[str, Any]] = {
    "modify": MODIFY_RESULT,
    "reject": {"action": "reject", "messages": {"smtp_message": "Gtube pattern"}},
    "soft": {"action": "soft reject"},
    "discard": {"action": "discard"},
    "quarantine": {"action": "quarantine"},
    "slow": {"action": "no action"},
}
#: Seconds the fake scanner takes for the "slow" message (miltertest waits 3 s per read).
SLOW_SCAN = 4.5
PROGRESS_INTERVAL = 1.0


@implementer(IScanner)
class SubjectScanner:
    """Answers by the Subject of the message; ``slow`` after a delay, ``fail`` fails."""

    name = "subject"

    def __init__(self) -> None:
        self.requests: list[ScanRequest] = []

    def scan(self, request: ScanRequest) -> defer.Deferred[ScanReply]:
        self.requests.append(request)
        match = re.search(rb"^Subject: (\w+)\r\n", request.body, re.M)
        subject = match.group(1).decode() if match else ""
        if subject == "fail":
            return defer.fail(ScanFailure(FailureClass.BAD_REPLY, 500, "IO read error"))
        headers: tuple[tuple[bytes, bytes], ...] = ((b"Content-Type", b"application/json"),)
        body = json.dumps(RESULTS[subject]).encode()
        if subject == "modify":
            headers += ((b"Message-Offset", str(len(body)).encode()),)
            body += b"replaced body\r\n"
        reply = ScanReply(200, b"OK", headers, body, "fake")
        if subject == "slow":
            return task.deferLater(reactor, SLOW_SCAN, lambda: reply)
        return defer.succeed(reply)


class MiltertestSessionTests(unittest.TestCase):
    """miltertest drives our listener through a whole connection."""

    skip = skip_unless_miltertest()
    timeout = 60

    def setUp(self) -> None:
        self.scanner = SubjectScanner()
        factory = MilterFactory(self.scanner, ProxyOptions(), FailurePolicyTable(), reactor,
                                actions=STANDARD_ACTIONS | {"discard", "quarantine"},
                                progress_interval=PROGRESS_INTERVAL)
        port, number = serve_on_loopback(reactor, factory)
        self.addCleanup(port.stopListening)
        self.relay = FrameRelay(reactor, "127.0.0.1", number)
        self.relay_port = self.relay.listen()
        self.addCleanup(self.relay.stop)

    @defer.inlineCallbacks
    def test_session(self) -> Any:
        """Every message gets the replies its result calls for; miltertest accepts them all."""
        code, out, err = yield run_miltertest(reactor, SCRIPT, {"port": str(self.relay_port)})
        self.assertEqual(code, 0, (out, err, self.relay.errors))
        self.assertIn(b"session script done", out)
        self.assertEqual(self.relay.errors, [])
        responses = self.relay.responses
        progress = [r for r in responses if isinstance(r, Progress)]
        self.assertGreaterEqual(len(progress), int(SLOW_SCAN / PROGRESS_INTERVAL) - 1)
        self.assertEqual([r for r in responses if not isinstance(r, Progress)], [
            OptionNegotiationReply(6, 0x1FF, 0x000FF080),
            ChangeHeader(1, b"X-Old", b""), InsertHeader(0, b"X-Added", b"first"),
            AddRecipient(b"<bcc@example.org>"), DeleteRecipient(b"<rcpt@example.org>"),
            ReplaceBody(b"replaced body\r\n"),
            ChangeHeader(1, b"X-Spam", b""), ChangeHeader(1, b"X-Spam", b"Yes"), Accept(),
            ReplyCode(b"554", b"5.7.1", b"Gtube pattern"),
            ReplyCode(b"451", b"4.7.1", b"Try again later"),
            Discard(),
            Quarantine(b"Spam message quarantined"), Accept(),
            Accept(),
            Tempfail(),
        ])

    @defer.inlineCallbacks
    def test_requests(self) -> Any:
        """The aborted message is never scanned; the others carry the connection's data."""
        code, out, err = yield run_miltertest(reactor, SCRIPT, {"port": str(self.relay_port)})
        self.assertEqual(code, 0, (out, err))
        subjects = [re.findall(rb"Subject: (\w+)", r.body)[0] for r in self.scanner.requests]
        self.assertEqual(subjects, [b"modify", b"reject", b"soft", b"discard", b"quarantine",
                                    b"slow", b"fail"])
        last = dict(self.scanner.requests[-1].headers)
        self.assertEqual(
            (last[b"Queue-ID"], last[b"Helo"], last[b"MTA-Name"], last[b"Hostname"], last[b"From"]),
            (b"QID8", b"client.example.net", b"mx.example.org", b"client.example.net",
             b"<sender@example.net>"))
        self.assertTrue(last[b"IP"].startswith(b"192.0.2.10:"))
