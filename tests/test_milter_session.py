"""Milter sessions over a StringTransport with a fake scanner and an injected clock."""

from __future__ import annotations

import ipaddress
import json
import os
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.trial import unittest
from zope.interface import implementer

from rspamd_tx.config import ucl
from rspamd_tx.config.schema import parse_network_entry
from rspamd_tx.config.tree import UclObject
from rspamd_tx.config.workers import FailurePolicy, ProxyOptions, check_config
from rspamd_tx.protocols.milter_codec import MtaDecoder
from rspamd_tx.protocols.milter_events import (
    Abort, Accept, AddHeader, AddRecipient, BodyChunk, ChangeFrom, ChangeHeader, Command,
    Connect, Data, DeleteRecipient, Discard, EndOfHeaders, EndOfMessage, Header, Helo,
    InsertHeader, Macro, MailFrom, OptionNegotiation, OptionNegotiationReply, Progress,
    Quarantine, Quit, QuitNewConnection, RcptTo, ReplaceBody, ReplyCode, Response, Tempfail,
)
from rspamd_tx.proxy.failure_policy import FailurePolicyTable
from rspamd_tx.proxy.milter_listener import MilterFactory, MilterProtocol
from rspamd_tx.proxy.milter_reply import STANDARD_ACTIONS
from rspamd_tx.proxy.milter_session import MessageBuffer
from rspamd_tx.proxy.scanning import (
    FailureAction, FailureClass, IScanner, ScanFailure, ScanReply, ScanRequest,
)
from rspamd_tx.proxy.server import WhitelistNames, build_worker
from tests.test_balancer import FakeNameResolver

JSON = ((b"Content-Type", b"application/json"),)

#: The spec's section 10 conversation up to the end of the body.
CONVERSATION: list[Command] = [
    Macro(b"C", ((b"j", b"mx.example.org"), (b"{daemon_name}", b"mx.example.org"))),
    Connect(b"client.example.net", "4", 45678, b"192.0.2.10"),
    Helo(b"client.example.net"),
    Macro(b"M", ((b"i", b"ABCDEF1234"),)),
    MailFrom(b"<sender@example.net>", (b"SIZE=123",)),
    RcptTo(b"<rcpt@example.org>"),
    Data(),
    Header(b"Subject", b"hello"),
    Header(b"X-Spam", b"yes"),
    EndOfHeaders(),
    BodyChunk(b"Hello world\r\n"),
]

#: The second message of a connection: no macros, no connect.
SECOND: list[Command] = [
    MailFrom(b"<second@example.net>"), RcptTo(b"<a@example.org>"), RcptTo(b"<b@example.org>"),
    Data(), Header(b"Subject", b"two"), EndOfHeaders(), BodyChunk(b"body two\r\n"),
]


@implementer(IScanner)
class FakeScanner:
    """Records scan requests; each answer is a Deferred the test fires."""

    name = "fake"

    def __init__(self) -> None:
        self.requests: list[ScanRequest] = []
        self.pending: list[Deferred[ScanReply]] = []
        self.cancelled = 0

    def scan(self, request: ScanRequest) -> Deferred[ScanReply]:
        self.requests.append(request)

        def cancel(d: Deferred[ScanReply]) -> None:
            self.cancelled += 1
            self.pending.remove(d)

        d: Deferred[ScanReply] = Deferred(cancel)
        self.pending.append(d)
        return d

    def answer(self, result: dict[str, Any], headers: tuple[tuple[bytes, bytes], ...] = JSON,
               extra: bytes = b"") -> None:
        """Fire the oldest pending scan with ``result`` as JSON (plus ``extra`` bytes)."""
        self.pending.pop(0).callback(
            ScanReply(200, b"OK", headers, json.dumps(result).encode() + extra, "127.0.0.1:11333"))


def frames(*commands: Command) -> bytes:
    return b"".join(command.encode() for command in commands)


def decode(data: bytes) -> list[Response]:
    decoder = MtaDecoder()
    decoder.feed(data)
    return list(decoder)


class SessionCase(unittest.TestCase):
    """A factory over a fake scanner, a clock and connections on StringTransports."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.scanner = FakeScanner()
        self.logged: list[str] = []

        def observe(event: LogEvent) -> None:
            namespace = event.get("log_namespace", "")
            if namespace.startswith(("rspamd_tx.proxy", "rspamd_tx.address_lists")):
                self.logged.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def factory(self, policy: FailurePolicyTable | None = None, **options: Any) -> MilterFactory:
        extra = {key: options.pop(key) for key in ("actions", "spill_threshold", "progress_interval")
                 if key in options}
        extra.setdefault("actions", STANDARD_ACTIONS | {"discard", "quarantine"})
        return MilterFactory(self.scanner, ProxyOptions(**options), policy or FailurePolicyTable(),
                             self.clock, server_name="test", **extra)

    def connect(self, factory: MilterFactory | None = None) -> tuple[MilterProtocol, StringTransport]:
        factory = factory if factory is not None else self.factory()
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        assert isinstance(protocol, MilterProtocol)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        protocol.makeConnection(transport)
        protocol.dataReceived(OptionNegotiation(6, 0x1FF, 0x1FFFFF).encode())
        self.assertEqual(decode(transport.value()), [OptionNegotiationReply(6, 0x1FF, 0x000FF080)])
        transport.clear()
        return protocol, transport

    def message(self, protocol: MilterProtocol, commands: list[Command] = CONVERSATION) -> None:
        protocol.dataReceived(frames(*commands, EndOfMessage()))

    def verdict(self, result: dict[str, Any], commands: list[Command] = CONVERSATION,
                factory: MilterFactory | None = None) -> list[Response]:
        """The replies to one message answered with ``result``."""
        protocol, transport = self.connect(factory)
        self.message(protocol, commands)
        self.scanner.answer(result)
        return decode(transport.value())


class RequestTests(SessionCase):
    """What the scanner is asked (milter.md §4–§5)."""

    def test_spec_example_request(self) -> None:
        """The section 10 conversation maps to Rspamd's headers and message."""
        protocol, transport = self.connect()
        self.message(protocol)
        request = self.scanner.requests[0]
        self.assertEqual(request.headers, (
            (b"Hostname", b"client.example.net"), (b"Helo", b"client.example.net"),
            (b"From", b"<sender@example.net>"), (b"Rcpt", b"<rcpt@example.org>"),
            (b"IP", b"192.0.2.10:45678"), (b"Queue-ID", b"ABCDEF1234"),
            (b"MTA-Name", b"mx.example.org"), (b"Flags", b"milter,body_block"),
            (b"X-Rspamd-Mail-Esmtp-Args", b"SIZE=123")))
        self.assertEqual(request.body, b"Subject: hello\r\nX-Spam: yes\r\n\r\nHello world\r\n")
        self.assertEqual((request.method, request.target, request.route),
                         (b"POST", b"/checkv2", None))
        self.assertEqual(request.hash_key, ipaddress.ip_address("192.0.2.10").packed)
        self.assertEqual(request.client_address, "192.0.2.10:45678")
        self.assertEqual(transport.value(), b"")

    def test_macro_headers(self) -> None:
        """TLS, auth, mailer, version and queue-id macros become their headers."""
        protocol, _ = self.connect()
        self.message(protocol, [
            Macro(b"C", ((b"{daemon_name}", b"mx1"), (b"j", b"other"), (b"v", b"Postfix 3.7"))),
            Connect(b"", "6", 25, b"IPv6:2001:db8::5"),
            Macro(b"M", ((b"{I}", b"QID"), (b"{cipher}", b"TLS_AES"), (b"{tls_version}", b"TLSv1.3"),
                         (b"{auth_authen}", b""), (b"{rcpt_mailer}", b"smtp"),
                         (b"{cert_issuer}", b"CA"), (b"{client_name}", b"mail.example.net"))),
            MailFrom(b"<>"), RcptTo(b"<r@example.org>", (b"NOTIFY=NEVER",)), Data(), EndOfHeaders()])
        self.assertEqual(self.scanner.requests[0].headers, (
            (b"From", b"<>"), (b"Rcpt", b"<r@example.org>"), (b"IP", b"[2001:db8::5]:25"),
            (b"Queue-ID", b"QID"), (b"User-Agent", b"Postfix 3.7"), (b"TLS-Cipher", b"TLS_AES"),
            (b"TLS-Version", b"TLSv1.3"), (b"User", b""), (b"Mailer", b"smtp"),
            (b"TLS-Cert-Issuer", b"CA"), (b"Hostname", b"mail.example.net"),
            (b"MTA-Name", b"mx1"), (b"Flags", b"milter,body_block"),
            (b"X-Rspamd-Rcpt-Esmtp-Args", b"0:NOTIFY=NEVER")))

    def test_client_ca_name(self) -> None:
        """With client_ca_name matching {cert_issuer}, {cert_subject} is sent as User."""
        protocol, _ = self.connect(self.factory(client_ca_name="Our CA"))
        self.message(protocol, [
            Connect(b"h", "U"),
            Macro(b"M", ((b"{cert_issuer}", b"Our CA"), (b"{cert_subject}", b"client1"))),
            MailFrom(b"<a@b>"), RcptTo(b"<c@d>"), Data(), EndOfHeaders()])
        headers = dict(self.scanner.requests[0].headers)
        self.assertEqual(headers[b"User"], b"client1")

    def test_unknown_hostname(self) -> None:
        """A C hostname 'unknown' is not sent, and {client_name} does not replace it."""
        protocol, _ = self.connect()
        self.message(protocol, [
            Macro(b"C", ((b"{client_name}", b"x.example"),)), Connect(b"unknown", "4", 1, b"10.0.0.1"),
            MailFrom(b"<a@b>"), RcptTo(b"<c@d>"), Data(), EndOfHeaders()])
        self.assertNotIn(b"Hostname", dict(self.scanner.requests[0].headers))

    def test_unix_client(self) -> None:
        """A unix-socket client is sent as its path; no balancing key."""
        protocol, _ = self.connect()
        self.message(protocol, [Connect(b"localhost", "L", 0, b"/run/smtp"), MailFrom(b"<a@b>"),
                                RcptTo(b"<c@d>"), Data(), EndOfHeaders()])
        request = self.scanner.requests[0]
        self.assertEqual((dict(request.headers)[b"IP"], request.hash_key), (b"/run/smtp", None))

    def test_connection_state_kept_across_messages(self) -> None:
        """A second message keeps connect data, HELO and macros; envelope and headers are new."""
        protocol, transport = self.connect()
        self.message(protocol)
        self.scanner.answer({"action": "no action"})
        self.message(protocol, SECOND)
        request = self.scanner.requests[1]
        self.assertEqual(request.headers, (
            (b"Hostname", b"client.example.net"), (b"Helo", b"client.example.net"),
            (b"From", b"<second@example.net>"), (b"Rcpt", b"<a@example.org>"),
            (b"Rcpt", b"<b@example.org>"), (b"IP", b"192.0.2.10:45678"),
            (b"Queue-ID", b"ABCDEF1234"), (b"MTA-Name", b"mx.example.org"),
            (b"Flags", b"milter,body_block")))
        self.assertEqual(request.body, b"Subject: two\r\n\r\nbody two\r\n")

    def test_abort_clears_message(self) -> None:
        """A clears the envelope and message but keeps the connection data."""
        protocol, transport = self.connect()
        protocol.dataReceived(frames(*CONVERSATION[:-1], Abort()))
        self.message(protocol, SECOND)
        request = self.scanner.requests[0]
        self.assertEqual(request.body, b"Subject: two\r\n\r\nbody two\r\n")
        self.assertEqual(dict(request.headers)[b"From"], b"<second@example.net>")
        self.assertEqual(dict(request.headers)[b"IP"], b"192.0.2.10:45678")
        self.assertEqual(transport.value(), b"")

    def test_quit_new_connection(self) -> None:
        """K forgets address, hostname and macros; HELO survives it."""
        protocol, _ = self.connect()
        self.message(protocol)
        self.scanner.answer({"action": "no action"})
        protocol.dataReceived(frames(QuitNewConnection(), Connect(b"", "U")))
        self.message(protocol, SECOND)
        self.assertEqual(self.scanner.requests[1].headers, (
            (b"Helo", b"client.example.net"), (b"From", b"<second@example.net>"),
            (b"Rcpt", b"<a@example.org>"), (b"Rcpt", b"<b@example.org>"),
            (b"Flags", b"milter,body_block")))


class VerdictTests(SessionCase):
    """Scan results become replies on the wire; one test per action and milter key."""

    def test_no_action(self) -> None:
        """no action: a."""
        self.assertEqual(self.verdict({"action": "no action"}), [Accept()])

    def test_greylist(self) -> None:
        """greylist: a."""
        self.assertEqual(self.verdict({"action": "greylist"}), [Accept()])

    def test_add_header(self) -> None:
        """add header replaces the received X-Spam with X-Spam: Yes (spec section 10)."""
        self.assertEqual(self.verdict({"action": "add header"}), [
            ChangeHeader(1, b"X-Spam", b""), ChangeHeader(1, b"X-Spam", b"Yes"), Accept()])

    def test_rewrite_subject(self) -> None:
        """rewrite subject changes Subject."""
        self.assertEqual(self.verdict({"action": "rewrite subject", "subject": "[SPAM] hello"}),
                         [ChangeHeader(1, b"Subject", b"[SPAM] hello"), Accept()])

    def test_soft_reject(self) -> None:
        """soft reject: 451 4.7.1 with the configured tempfail_message."""
        self.assertEqual(self.verdict({"action": "soft reject"},
                                      factory=self.factory(tempfail_message="Busy")),
                         [ReplyCode(b"451", b"4.7.1", b"Busy")])

    def test_reject(self) -> None:
        """reject: 554 5.7.1 with smtp_message."""
        result = {"action": "reject", "messages": {"smtp_message": "Gtube pattern"}}
        self.assertEqual(self.verdict(result), [ReplyCode(b"554", b"5.7.1", b"Gtube pattern")])

    def test_reject_message_option(self) -> None:
        """reject without smtp_message: reject_message."""
        self.assertEqual(self.verdict({"action": "reject"}, factory=self.factory(reject_message="Go")),
                         [ReplyCode(b"554", b"5.7.1", b"Go")])

    def test_discard_on_reject_option(self) -> None:
        """discard_on_reject = yes: reject becomes d."""
        self.assertEqual(self.verdict({"action": "reject"},
                                      factory=self.factory(discard_on_reject=True)), [Discard()])

    def test_quarantine_on_reject_option(self) -> None:
        """quarantine_on_reject = yes: reject becomes q (quarantine_message) + a."""
        factory = self.factory(quarantine_on_reject=True, quarantine_message="Held")
        self.assertEqual(self.verdict({"action": "reject"}, factory=factory),
                         [Quarantine(b"Held"), Accept()])

    def test_discard(self) -> None:
        """discard: d."""
        self.assertEqual(self.verdict({"action": "discard"}), [Discard()])

    def test_quarantine(self) -> None:
        """quarantine: q + a."""
        self.assertEqual(self.verdict({"action": "quarantine"}),
                         [Quarantine(b"Spam message quarantined"), Accept()])

    def test_unregistered_action(self) -> None:
        """With Rspamd's standard actions only, discard is answered t."""
        factory = self.factory(actions=STANDARD_ACTIONS)
        self.assertEqual(self.verdict({"action": "discard"}, factory=factory), [Tempfail()])

    def test_spam_header_option(self) -> None:
        """add header uses spam_header from the options."""
        self.assertEqual(self.verdict({"action": "add header"}, factory=self.factory(spam_header="X-J")),
                         [ChangeHeader(1, b"X-J", b"Yes"), Accept()])

    def test_add_headers(self) -> None:
        """milter.add_headers with order: negative orders count the received headers."""
        result = {"action": "no action", "milter": {"add_headers": {
            "X-A": "a", "X-B": {"value": "b", "order": 0}, "X-D": {"value": "d", "order": -2}}}}
        self.assertEqual(self.verdict(result), [
            AddHeader(b"X-A", b"a"), InsertHeader(0, b"X-B", b"b"), InsertHeader(3, b"X-D", b"d"),
            Accept()])

    def test_remove_headers(self) -> None:
        """milter.remove_headers addresses the occurrences the MTA sent (case-insensitive)."""
        result = {"action": "no action", "milter": {"remove_headers": {"x-spam": 1, "Subject": 2}}}
        self.assertEqual(self.verdict(result), [ChangeHeader(1, b"x-spam", b""), Accept()])

    def test_change_from(self) -> None:
        """milter.change_from: e."""
        result = {"action": "no action", "milter": {"change_from": "<new@example.net>"}}
        self.assertEqual(self.verdict(result), [ChangeFrom(b"<new@example.net>"), Accept()])

    def test_add_rcpt(self) -> None:
        """milter.add_rcpt: one + each."""
        result = {"action": "no action", "milter": {"add_rcpt": ["<x@example.org>"]}}
        self.assertEqual(self.verdict(result), [AddRecipient(b"<x@example.org>"), Accept()])

    def test_del_rcpt(self) -> None:
        """milter.del_rcpt: one - each."""
        result = {"action": "no action", "milter": {"del_rcpt": ["<rcpt@example.org>"]}}
        self.assertEqual(self.verdict(result), [DeleteRecipient(b"<rcpt@example.org>"), Accept()])

    def test_body_replacement(self) -> None:
        """A Message-Offset body block becomes one b packet."""
        protocol, transport = self.connect()
        self.message(protocol)
        result = json.dumps({"action": "no action"}).encode()
        self.scanner.answer({"action": "no action"},
                            JSON + ((b"Message-Offset", str(len(result)).encode()),), b"new\r\n")
        self.assertEqual(decode(transport.value()), [ReplaceBody(b"new\r\n"), Accept()])

    def test_no_action_flag_sticky(self) -> None:
        """milter.no_action applies to the later messages of the connection too."""
        protocol, transport = self.connect()
        self.message(protocol)
        self.scanner.answer({"action": "no action", "milter": {"no_action": True}})
        transport.clear()
        self.message(protocol, SECOND)
        self.scanner.answer({"action": "reject"})
        self.assertEqual(decode(transport.value()),
                         [AddHeader(b"X-Rspamd-Action", b"reject"), Accept()])

    def test_reject_discard_sticky(self) -> None:
        """milter.reject = discard makes a later reject on the connection a d."""
        protocol, transport = self.connect()
        self.message(protocol)
        self.scanner.answer({"action": "no action", "milter": {"reject": "discard"}})
        transport.clear()
        self.message(protocol, SECOND)
        self.scanner.answer({"action": "reject"})
        self.assertEqual(decode(transport.value()), [Discard()])

    def test_flags_per_connection(self) -> None:
        """Sticky flags of one connection do not leak into another."""
        factory = self.factory()
        first, _ = self.connect(factory)
        self.message(first)
        self.scanner.answer({"action": "no action", "milter": {"reject": "discard"}})
        self.assertEqual(self.verdict({"action": "reject"}, factory=factory),
                         [ReplyCode(b"554", b"5.7.1", b"Spam message rejected")])

    def test_extended_spam_headers(self) -> None:
        """extended_spam_headers adds X-Spamd-Result and X-Rspamd-Server."""
        result = {"action": "no action", "score": 0.5, "required_score": 15, "symbols": {}}
        self.assertEqual(self.verdict(result, factory=self.factory(extended_spam_headers=True)), [
            AddHeader(b"X-Spamd-Result", b"default: False [0.50 / 15.00]"),
            AddHeader(b"X-Rspamd-Server", b"test"), Accept()])

    def test_whitelist(self) -> None:
        """A client in a whitelist network is accepted without a scan."""
        factory = self.factory(whitelist=(ipaddress.ip_network("192.0.2.0/24"),))
        protocol, transport = self.connect(factory)
        self.message(protocol)
        self.assertEqual((decode(transport.value()), self.scanner.requests), ([Accept()], []))

    def test_whitelist_host_name(self) -> None:
        """A whitelist host name matches its addresses once they are handed over, not before."""
        factory = self.factory(whitelist=(parse_network_entry("mail.example.net"),))
        before = factory.whitelisted(ipaddress.ip_address("192.0.2.10"))
        factory.use_hosts({"mail.example.net": [ipaddress.ip_address("192.0.2.10")]})
        self.assertEqual((before, factory.whitelist_names(),
                          factory.whitelisted(ipaddress.ip_address("192.0.2.10")),
                          factory.whitelisted(ipaddress.ip_address("192.0.2.11"))),
                         (False, {"mail.example.net"}, True, False))

    def test_whitelist_map_file(self) -> None:
        """A whitelist map file's networks match (IPv4-mapped clients too); a bad line is
        logged and skipped; the file is read again on update."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("# relays\n192.0.2.0/28  office\n\n2001:db8::1\nnot-an-address\n")
        factory = self.factory(whitelist=(parse_network_entry(path),))
        matched = [factory.whitelisted(ipaddress.ip_address(ip)) for ip in
                   ("192.0.2.5", "::ffff:192.0.2.5", "2001:db8::1", "192.0.2.100")]
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("192.0.2.100\n")
        factory.update(factory.options, factory.policy)
        self.assertEqual((matched, factory.whitelisted(ipaddress.ip_address("192.0.2.100")),
                          factory.whitelisted(ipaddress.ip_address("192.0.2.5"))),
                         ([True, True, True, False], True, False))
        self.assertTrue(any("not-an-address" in line for line in self.logged), self.logged)

    def test_whitelist_map_change_read_by_worker(self) -> None:
        """The proxy worker watches the whitelist's map files: a change is read at the next
        check, without a reload."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("192.0.2.0/28\n")
        config, _ = check_config(UclObject(ucl.loads(
            f'worker "rspamd_proxy" {{ milter = yes; whitelist = "{path}"; }}')))
        worker = build_worker(config, config.workers[0], self.clock)
        factory = worker.factory
        assert isinstance(factory, MilterFactory)
        before = factory.whitelisted(ipaddress.ip_address("198.51.100.1"))
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("192.0.2.0/28\n198.51.100.0/24\n")
        worker.map_files.check()
        self.assertEqual((worker.map_files.paths, before,
                          factory.whitelisted(ipaddress.ip_address("198.51.100.1"))),
                         ({path}, False, True))

    def test_whitelist_names_resolved_by_worker_service(self) -> None:
        """WhitelistNames resolves the names at start and again after a reload."""
        factory = self.factory(whitelist=(parse_network_entry("mail.example.net"),))
        resolver = FakeNameResolver({"mail.example.net": ["192.0.2.10"],
                                     "relay.example.net": ["2001:db8::25"]})
        names = WhitelistNames(factory, resolver)
        names.startService()
        self.addCleanup(names.stopService)
        started = factory.whitelisted(ipaddress.ip_address("192.0.2.10"))
        factory.update(ProxyOptions(whitelist=(parse_network_entry("relay.example.net"),)),
                       factory.policy)
        names.refresh()
        self.assertEqual((started, factory.whitelisted(ipaddress.ip_address("192.0.2.10")),
                          factory.whitelisted(ipaddress.ip_address("2001:db8::25"))),
                         (True, False, True))

    def test_log_line(self) -> None:
        """Each answered message is logged with its sender, outcome and reply codes."""
        result = {"action": "reject", "score": 20.5, "messages": {"smtp_message": "Gtube pattern"}}
        self.verdict(result)
        self.assertIn("milter 127.0.0.1 from <sender@example.net> (44 bytes): reject (score 20.5,"
                      " upstream 127.0.0.1:11333), replies y, 0.000s", self.logged)

    def test_non_json_reply(self) -> None:
        """A reply that is not a JSON result gets the bad_reply action (default t)."""
        protocol, transport = self.connect()
        self.message(protocol)
        self.scanner.pending.pop(0).callback(
            ScanReply(500, b"Error", ((b"Content-Type", b"text/plain"),), b"oops", "u"))
        self.assertEqual(decode(transport.value()), [Tempfail()])

    def test_answered_in_one_write(self) -> None:
        """All replies of a verdict reach the transport in one write, after nothing else."""
        protocol, transport = self.connect()
        writes: list[bytes] = []
        transport.write = writes.append  # type: ignore[method-assign]
        self.message(protocol)
        self.scanner.answer({"action": "add header"})
        self.assertEqual(len(writes), 1)


class FailurePolicyTests(SessionCase):
    """Failed scans get the failure policy's action."""

    def fail_with(self, failure: ScanFailure, policy: FailurePolicyTable | None = None) -> list[Response]:
        protocol, transport = self.connect(self.factory(policy))
        self.message(protocol)
        self.scanner.pending.pop(0).errback(failure)
        return decode(transport.value())

    def test_default_tempfail(self) -> None:
        """By default every failure is answered t."""
        failure = ScanFailure(FailureClass.BAD_REPLY, 500, "IO write error: Connection refused")
        self.assertEqual(self.fail_with(failure), [Tempfail()])

    def test_accept(self) -> None:
        """timeout = accept: a."""
        policy = FailurePolicyTable({FailureClass.TIMEOUT: FailureAction.ACCEPT})
        self.assertEqual(self.fail_with(ScanFailure(FailureClass.TIMEOUT, 408, "IO timeout"), policy),
                         [Accept()])

    def test_reject(self) -> None:
        """no_upstream = reject: 554 5.7.1 naming the failure."""
        policy = FailurePolicyTable.from_options(FailurePolicy(no_upstream="reject"))
        failure = ScanFailure(FailureClass.NO_UPSTREAM, 404, "Backend not found")
        self.assertEqual(self.fail_with(failure, policy),
                         [ReplyCode(b"554", b"5.7.1", b"Message not scanned: Backend not found")])

    def test_discard(self) -> None:
        """bad_reply = discard: d."""
        policy = FailurePolicyTable({FailureClass.BAD_REPLY: FailureAction.DISCARD})
        self.assertEqual(self.fail_with(ScanFailure(FailureClass.BAD_REPLY, 500, "x"), policy),
                         [Discard()])

    def test_unexpected_error(self) -> None:
        """A scanner raising something else is a bad_reply failure, logged."""
        protocol, transport = self.connect()
        self.message(protocol)
        self.scanner.pending.pop(0).errback(RuntimeError("boom"))
        self.assertEqual(decode(transport.value()), [Tempfail()])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_internal_error_closes(self) -> None:
        """A fault while building the replies is logged and closes the connection."""
        protocol, transport = self.connect()
        self.message(protocol)
        self.patch(protocol.milter, "send", lambda response: 1 / 0)
        self.scanner.answer({"action": "no action"})
        self.assertEqual((transport.value(), transport.disconnecting), (b"", True))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_oversize(self) -> None:
        """A message over max_message is not scanned; oversize = reject answers 554."""
        policy = FailurePolicyTable({FailureClass.OVERSIZE: FailureAction.REJECT})
        protocol, transport = self.connect(self.factory(policy, max_message=20))
        self.message(protocol)
        self.assertEqual(self.scanner.requests, [])
        [reply] = decode(transport.value())
        assert isinstance(reply, ReplyCode)
        self.assertEqual(reply.smtp_code, b"554")
        self.assertIn(b"exceeds max_message 20", reply.text)

    def test_next_message_after_failure(self) -> None:
        """After a failed scan the connection takes the next message."""
        protocol, transport = self.connect()
        self.message(protocol)
        self.scanner.pending.pop(0).errback(ScanFailure(FailureClass.TIMEOUT, 408, "IO timeout"))
        transport.clear()
        self.message(protocol, SECOND)
        self.scanner.answer({"action": "no action"})
        self.assertEqual(decode(transport.value()), [Accept()])


class ProgressTests(SessionCase):
    """Progress replies while the scanner works."""

    def test_progress_every_interval(self) -> None:
        """p goes out every progress_interval seconds until the verdict."""
        protocol, transport = self.connect(self.factory(progress_interval=5.0))
        self.message(protocol)
        self.clock.advance(4.9)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0.1)
        self.clock.advance(5.0)
        self.assertEqual(decode(transport.value()), [Progress(), Progress()])
        self.scanner.answer({"action": "no action"})
        self.clock.advance(30.0)
        self.assertEqual(decode(transport.value()), [Progress(), Progress(), Accept()])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_progress_for_quick_scan(self) -> None:
        """A scan answered at once leaves no timer behind."""
        self.assertEqual(self.verdict({"action": "no action"}), [Accept()])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_disabled(self) -> None:
        """progress_interval 0 sends no progress."""
        protocol, transport = self.connect(self.factory(progress_interval=0))
        self.message(protocol)
        self.clock.advance(1000)
        self.assertEqual(transport.value(), b"")


class AbortTests(SessionCase):
    """The MTA giving up on a message or the connection while a scan is pending."""

    def test_abort_cancels_scan(self) -> None:
        """A after E cancels the scan and stops progress; the next message is scanned."""
        protocol, transport = self.connect()
        self.message(protocol)
        protocol.dataReceived(Abort().encode())
        self.assertEqual((self.scanner.cancelled, self.clock.getDelayedCalls()), (1, []))
        self.message(protocol, SECOND)
        self.scanner.answer({"action": "no action"})
        self.assertEqual(decode(transport.value()), [Accept()])

    def test_quit_closes(self) -> None:
        """Q closes the connection (after what was written) and cancels a pending scan."""
        protocol, transport = self.connect()
        self.message(protocol)
        protocol.dataReceived(Quit().encode())
        self.assertEqual((transport.disconnecting, self.scanner.cancelled), (True, 1))

    def test_lost_connection_cancels_scan(self) -> None:
        """Losing the connection during a scan cancels it; nothing is written later."""
        factory = self.factory()
        protocol, transport = self.connect(factory)
        self.message(protocol)
        protocol.connectionLost()
        self.assertEqual((self.scanner.cancelled, factory.connections), (1, set()))


class MalformedTests(SessionCase):
    """Broken input closes only that connection, with a logged reason and no reply."""

    def test_bad_frame(self) -> None:
        """An unknown command closes the connection without a reply."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"\x00\x00\x00\x01Z")
        self.assertEqual((transport.value(), transport.disconnecting), (b"", True))
        self.assertTrue(any("milter protocol error: Invalid command: 'Z'" in line
                            for line in self.logged), self.logged)

    def test_out_of_order(self) -> None:
        """A body chunk before any message is a protocol error."""
        protocol, transport = self.connect()
        protocol.dataReceived(frames(Connect(b"h", "U"), BodyChunk(b"x")))
        self.assertEqual((transport.value(), transport.disconnecting), (b"", True))

    def test_other_connections_unaffected(self) -> None:
        """A broken connection does not disturb another one on the same factory."""
        factory = self.factory()
        bad, bad_transport = self.connect(factory)
        good, good_transport = self.connect(factory)
        self.message(good)
        bad.dataReceived(b"\x00\x00\x00\x00X")
        self.scanner.answer({"action": "no action"})
        self.assertEqual((bad_transport.disconnecting, decode(good_transport.value())),
                         (True, [Accept()]))

    def test_old_version(self) -> None:
        """Version 2 is refused by closing."""
        protocol = self.factory().buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(OptionNegotiation(2, 0, 0).encode())
        self.assertEqual((transport.value(), transport.disconnecting), (b"", True))

    def test_eof_mid_message_logged(self) -> None:
        """A close in the middle of a message is logged with the stage."""
        protocol, _ = self.connect()
        protocol.dataReceived(frames(*CONVERSATION))
        protocol.connectionLost()
        self.assertTrue(any("closed in the middle of a message (stage body)" in line
                            for line in self.logged), self.logged)

    def test_http_ping(self) -> None:
        """GET /ping gets Rspamd's pong and a close."""
        protocol = self.factory().buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET /ping HTTP/1.0\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertTrue(transport.disconnecting)


class FuzzTests(unittest.TestCase):
    """Arbitrary input never raises out of the protocol."""

    command_frames = st.sampled_from(
        [c.encode() for c in CONVERSATION + SECOND]
        + [EndOfMessage().encode(), Abort().encode(), QuitNewConnection().encode(),
           frames(*CONVERSATION, EndOfMessage()), frames(*SECOND, EndOfMessage())])

    @settings(max_examples=300, deadline=None)
    @given(st.lists(command_frames | st.binary(max_size=40), max_size=25),
           st.integers(min_value=1, max_value=64))
    def test_random_input(self, pieces: list[bytes], split: int) -> None:
        """Valid frames mixed with garbage, cut anywhere: no exception, replies always decode."""
        scanner = FakeScanner()
        factory = MilterFactory(scanner, ProxyOptions(), FailurePolicyTable(), Clock())
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport()
        protocol.makeConnection(transport)
        data = OptionNegotiation(6, 0x1FF, 0x1FFFFF).encode() + b"".join(pieces)
        for start in range(0, len(data), split):
            protocol.dataReceived(data[start:start + split])
            while scanner.pending:
                scanner.answer({"action": "add header"})
        protocol.connectionLost()
        self.assertIsInstance(decode(transport.value())[0], OptionNegotiationReply)
        self.assertEqual(factory.connections, set())


class BufferTests(unittest.TestCase):
    """The message buffer's bounds."""

    def test_memory_below_threshold(self) -> None:
        """Up to the threshold the message stays in memory."""
        buffer = MessageBuffer(100, spill_threshold=10)
        buffer.append(b"0123456789")
        self.assertEqual((buffer.spilled, buffer.getvalue()), (False, b"0123456789"))

    def test_spills_past_threshold(self) -> None:
        """Past the threshold the whole message moves to a temporary file."""
        buffer = MessageBuffer(100, spill_threshold=10, spill_dir=self.mktemp_dir())
        buffer.append(b"0123456789")
        buffer.append(b"abc")
        buffer.append(b"def")
        self.assertEqual((buffer.spilled, buffer.getvalue(), buffer.size),
                         (True, b"0123456789abcdef", 16))

    def test_oversize_stops_storing(self) -> None:
        """Past max_size nothing more is kept but the size keeps counting."""
        buffer = MessageBuffer(12, spill_threshold=4, spill_dir=self.mktemp_dir())
        buffer.append(b"0123456789")
        buffer.append(b"abc")
        buffer.append(b"d")
        self.assertEqual((buffer.oversize, buffer.spilled, buffer.getvalue(), buffer.size),
                         (True, False, b"", 14))

    def test_clear(self) -> None:
        """clear forgets the message and its file."""
        buffer = MessageBuffer(100, spill_threshold=1, spill_dir=self.mktemp_dir())
        buffer.append(b"abc")
        buffer.clear()
        self.assertEqual((buffer.spilled, buffer.getvalue(), buffer.size, buffer.oversize),
                         (False, b"", 0, False))

    def test_session_spills_large_body(self) -> None:
        """A session's body past the spill threshold is read back whole for the scan."""
        scanner = FakeScanner()
        factory = MilterFactory(scanner, ProxyOptions(), FailurePolicyTable(), Clock(),
                                spill_threshold=1000, spill_dir=self.mktemp_dir())
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        protocol.makeConnection(StringTransport())
        chunks = [BodyChunk(bytes([65 + i]) * 600) for i in range(3)]
        protocol.dataReceived(frames(OptionNegotiation(6, 0, 0), Connect(b"h", "U"),
                                     MailFrom(b"<a@b>"), RcptTo(b"<c@d>"), Data(), EndOfHeaders(),
                                     *chunks[:2]))
        assert isinstance(protocol, MilterProtocol) and protocol.session is not None
        self.assertTrue(protocol.session.message.spilled)
        protocol.dataReceived(frames(chunks[2], EndOfMessage()))
        self.assertEqual(scanner.requests[0].body, b"\r\n" + b"A" * 600 + b"B" * 600 + b"C" * 600)

    def test_message_joined_once(self) -> None:
        """The pieces of a message are joined once; later reads return the same bytes."""
        buffer = MessageBuffer(100)
        for piece in (b"ab", b"cd", b"ef"):
            buffer.append(piece)
        value = buffer.getvalue()
        self.assertEqual(value, b"abcdef")
        self.assertIs(buffer.getvalue(), value)
        buffer.append(b"gh")
        self.assertEqual((buffer.getvalue(), buffer.size), (b"abcdefgh", 8))

    def mktemp_dir(self) -> str:
        import os
        path = self.mktemp()
        os.makedirs(path)
        return path


class SocketTransport(FileDescriptor):
    """A socket-like transport: a FileDescriptor whose written bytes are kept."""

    def __init__(self) -> None:
        super().__init__(MemoryReactor())
        self.connected = 1
        self.written = b""

    def writeSomeData(self, data: bytes) -> int:
        self.written += bytes(data)
        return len(data)

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 40000)

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 11332)


class ReadSizeTests(SessionCase):
    """Socket reads grow while a large message arrives."""

    def test_large_reads_during_large_message(self) -> None:
        """A full read raises the read size; the answer brings the default back."""
        protocol = self.factory().buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = SocketTransport()
        protocol.makeConnection(transport)
        default = transport.bufferSize
        protocol.dataReceived(frames(OptionNegotiation(6, 0x1FF, 0x1FFFFF), *CONVERSATION))
        self.assertEqual(transport.bufferSize, default)
        body = frames(*[BodyChunk(b"x" * 60000) for _ in range(3)], EndOfMessage())
        protocol.dataReceived(body[:default])
        self.assertGreater(transport.bufferSize, default)
        protocol.dataReceived(body[default:])
        self.assertEqual(self.scanner.requests[0].body[-180002:], b"\r\n" + b"x" * 180000)
        self.scanner.answer({"action": "no action"})
        self.assertEqual(transport.bufferSize, default)
        transport.doWrite()
        self.assertEqual(decode(transport.written)[-1], Accept())


class FactoryTests(SessionCase):
    """The factory's shared state."""

    def test_update(self) -> None:
        """update() changes the reply settings of open connections."""
        factory = self.factory()
        protocol, transport = self.connect(factory)
        factory.update(ProxyOptions(reject_message="Changed"), FailurePolicyTable())
        self.message(protocol)
        self.scanner.answer({"action": "reject"})
        self.assertEqual(decode(transport.value()), [ReplyCode(b"554", b"5.7.1", b"Changed")])

    def test_drain(self) -> None:
        """drain fires once the last connection closes."""
        factory = self.factory()
        protocol, _ = self.connect(factory)
        drained = factory.drain()
        self.assertNoResult(drained)
        protocol.connectionLost()
        self.successResultOf(drained)

    def test_drain_idle(self) -> None:
        """drain of an idle factory fires at once."""
        self.successResultOf(self.factory().drain())
