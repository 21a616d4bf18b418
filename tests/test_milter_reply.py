"""Scan results to milter replies, as Rspamd's proxy sends them (milter.md §6)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from rspamd_tx.config.workers import ProxyOptions
from rspamd_tx.protocols.milter_events import (
    Accept, AddHeader, AddRecipient, ChangeFrom, ChangeHeader, DeleteRecipient,
    Discard, InsertHeader, Quarantine, ReplaceBody, ReplyCode, Response, Tempfail,
)
from rspamd_tx.proxy.milter_reply import (
    STANDARD_ACTIONS, ConnectionFlags, ParsedReply, ReceivedHeaders, ReplySettings,
    failure_replies, parse_reply, result_replies,
)
from rspamd_tx.proxy.scanning import FailureAction, FailureClass, ScanFailure, ScanReply

JSON = ((b"Content-Type", b"application/json"),)
ALL_ACTIONS = STANDARD_ACTIONS | {"discard", "quarantine"}
#: The 8 headers of the spec's add_headers example: X-Spam twice, Subject once.
EIGHT = ReceivedHeaders({b"x-spam": 2, b"subject": 1, b"received": 5}, 8)


def replies(result: dict[str, Any], *, headers: ReceivedHeaders = EIGHT,
            flags: ConnectionFlags | None = None, body: bytes | None = None,
            **overrides: Any) -> list[Response]:
    """The replies for ``result`` with all actions registered."""
    overrides.setdefault("actions", ALL_ACTIONS)
    return result_replies(ParsedReply(result, body), headers=headers,
                          flags=flags if flags is not None else ConnectionFlags(),
                          settings=ReplySettings(**overrides))


def scan_reply(body: bytes, headers: tuple[tuple[bytes, bytes], ...] = JSON) -> ScanReply:
    return ScanReply(200, b"OK", headers, body, "127.0.0.1:11333")


class ParseReplyTests(unittest.TestCase):
    """Which scanner replies are results."""

    def test_json_object(self) -> None:
        """An application/json reply is parsed into its object."""
        self.assertEqual(parse_reply(scan_reply(b'{"action": "reject"}')),
                         ParsedReply({"action": "reject"}))

    def test_content_type_case(self) -> None:
        """The content type is compared case-insensitively."""
        reply = scan_reply(b"{}", ((b"content-type", b"Application/JSON"),))
        self.assertEqual(parse_reply(reply).result, {})

    def test_content_type_with_parameters(self) -> None:
        """A content type with parameters is not a result (Rspamd compares it exactly)."""
        reply = scan_reply(b"{}", ((b"Content-Type", b"application/json; charset=utf-8"),))
        self.assertIsNone(parse_reply(reply).result)

    def test_text_plain(self) -> None:
        """A text/plain reply is not a result and says why."""
        parsed = parse_reply(scan_reply(b"{}", ((b"Content-Type", b"text/plain"),)))
        self.assertEqual((parsed.result, parsed.error), (None, "reply content type is 'text/plain'"))

    def test_bad_json(self) -> None:
        """Broken JSON is not a result."""
        self.assertIsNone(parse_reply(scan_reply(b'{"action":')).result)

    def test_deeply_nested(self) -> None:
        """JSON nested past the parser's recursion limit is not a result (no exception)."""
        self.assertIsNone(parse_reply(scan_reply(b"[" * 100000 + b"]" * 100000)).result)

    def test_not_an_object(self) -> None:
        """A JSON array is not a result."""
        self.assertIsNone(parse_reply(scan_reply(b"[1]")).result)

    def test_message_offset(self) -> None:
        """Message-Offset splits the JSON from the replacement body."""
        body = b'{"action":"no action"}new body\r\n'
        parsed = parse_reply(scan_reply(body, JSON + ((b"Message-Offset", b"22"),)))
        self.assertEqual(parsed, ParsedReply({"action": "no action"}, b"new body\r\n"))

    def test_message_offset_past_end(self) -> None:
        """An offset at or past the end leaves the whole body as JSON."""
        body = b'{"action":"no action"}'
        parsed = parse_reply(scan_reply(body, JSON + ((b"Message-Offset", b"22"),)))
        self.assertEqual(parsed, ParsedReply({"action": "no action"}))

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=200), st.binary(max_size=20), st.binary(max_size=30))
    def test_never_raises(self, body: bytes, offset: bytes, content_type: bytes) -> None:
        """Any body, offset and content type give a ParsedReply, never an exception."""
        reply = scan_reply(body, ((b"Content-Type", content_type), (b"Message-Offset", offset)))
        self.assertIsInstance(parse_reply(reply), ParsedReply)


class PreconditionTests(unittest.TestCase):
    """Results that are answered with a single tempfail (§6.1)."""

    def test_no_result(self) -> None:
        """No parsed result: t."""
        self.assertEqual(result_replies(ParsedReply(None), headers=EIGHT, flags=ConnectionFlags(),
                                        settings=ReplySettings()), [Tempfail()])

    def test_no_action(self) -> None:
        """A result without action: t."""
        self.assertEqual(replies({"score": 1}), [Tempfail()])

    def test_unregistered_action(self) -> None:
        """discard is not registered by default: t, as with Rspamd's stock config."""
        self.assertEqual(replies({"action": "discard"}, actions=STANDARD_ACTIONS), [Tempfail()])

    def test_custom_action(self) -> None:
        """A registered custom action is accepted."""
        self.assertEqual(replies({"action": "my action"}, actions=ALL_ACTIONS | {"my action"}),
                         [Accept()])


class ActionTests(unittest.TestCase):
    """The final disposition per action (§6.5)."""

    def test_no_action(self) -> None:
        """no action: a."""
        self.assertEqual(replies({"action": "no action"}), [Accept()])

    def test_greylist(self) -> None:
        """greylist: a (the scanner's soft reject does the greylisting)."""
        self.assertEqual(replies({"action": "greylist"}), [Accept()])

    def test_add_header(self) -> None:
        """add header: delete every X-Spam (high to low), set X-Spam: Yes, a."""
        self.assertEqual(replies({"action": "add header"}), [
            ChangeHeader(2, b"X-Spam", b""), ChangeHeader(1, b"X-Spam", b""),
            ChangeHeader(1, b"X-Spam", b"Yes"), Accept()])

    def test_add_header_configured_name(self) -> None:
        """add header uses the configured spam_header."""
        self.assertEqual(replies({"action": "add header"}, spam_header="X-Junk"), [
            ChangeHeader(1, b"X-Junk", b"Yes"), Accept()])

    def test_rewrite_subject(self) -> None:
        """rewrite subject: change Subject to the result's subject, a."""
        self.assertEqual(replies({"action": "rewrite subject", "subject": "[SPAM] hi"}), [
            ChangeHeader(1, b"Subject", b"[SPAM] hi"), Accept()])

    def test_rewrite_subject_without_subject(self) -> None:
        """rewrite subject without a subject: only a."""
        self.assertEqual(replies({"action": "rewrite subject"}), [Accept()])

    def test_soft_reject(self) -> None:
        """soft reject: 451 4.7.1 with tempfail_message."""
        self.assertEqual(replies({"action": "soft reject"}, tempfail_message="Later"),
                         [ReplyCode(b"451", b"4.7.1", b"Later")])

    def test_soft_reject_smtp_message(self) -> None:
        """soft reject: smtp_message beats tempfail_message."""
        result = {"action": "soft reject", "messages": {"smtp_message": "Try again"}}
        self.assertEqual(replies(result), [ReplyCode(b"451", b"4.7.1", b"Try again")])

    def test_reject(self) -> None:
        """reject: 554 5.7.1 with reject_message."""
        self.assertEqual(replies({"action": "reject"}),
                         [ReplyCode(b"554", b"5.7.1", b"Spam message rejected")])

    def test_reject_smtp_message(self) -> None:
        """reject: smtp_message is the text (GTUBE's 'Gtube pattern')."""
        result = {"action": "reject", "messages": {"smtp_message": "Gtube pattern"}}
        self.assertEqual(replies(result), [ReplyCode(b"554", b"5.7.1", b"Gtube pattern")])

    def test_discard_on_reject(self) -> None:
        """reject with discard_on_reject: d."""
        flags = ConnectionFlags(discard_on_reject=True, quarantine_on_reject=True)
        self.assertEqual(replies({"action": "reject"}, flags=flags), [Discard()])

    def test_quarantine_on_reject(self) -> None:
        """reject with quarantine_on_reject: q with quarantine_message, then a."""
        flags = ConnectionFlags(quarantine_on_reject=True)
        self.assertEqual(replies({"action": "reject"}, flags=flags, quarantine_message="held"),
                         [Quarantine(b"held"), Accept()])

    def test_quarantine(self) -> None:
        """quarantine (registered): q then a."""
        self.assertEqual(replies({"action": "quarantine"}),
                         [Quarantine(b"Spam message quarantined"), Accept()])

    def test_quarantine_with_smtp_message(self) -> None:
        """quarantine with an smtp_message: only a (Rspamd 3.9+)."""
        result = {"action": "quarantine", "messages": {"smtp_message": "x"}}
        self.assertEqual(replies(result), [Accept()])

    def test_discard(self) -> None:
        """discard (registered): d."""
        self.assertEqual(replies({"action": "discard"}), [Discard()])

    def test_nul_in_text_cut(self) -> None:
        """A NUL in the reply text ends it, as in a C string."""
        result = {"action": "reject", "messages": {"smtp_message": "bad\u0000tail"}}
        self.assertEqual(replies(result), [ReplyCode(b"554", b"5.7.1", b"bad")])


class MilterBlockTests(unittest.TestCase):
    """The result's milter object (§6.3)."""

    def test_remove_headers_index(self) -> None:
        """remove_headers N > 0 deletes the Nth occurrence if it exists."""
        result = {"action": "no action", "milter": {"remove_headers": {"X-Spam": 2, "Subject": 2}}}
        self.assertEqual(replies(result), [ChangeHeader(2, b"X-Spam", b""), Accept()])

    def test_remove_headers_all(self) -> None:
        """remove_headers 0 deletes all occurrences, highest first; the key keeps its case."""
        result = {"action": "no action", "milter": {"remove_headers": {"x-spam": 0}}}
        self.assertEqual(replies(result), [
            ChangeHeader(2, b"x-spam", b""), ChangeHeader(1, b"x-spam", b""), Accept()])

    def test_remove_headers_from_end(self) -> None:
        """remove_headers -1 deletes the last occurrence; beyond the count nothing."""
        result = {"action": "no action", "milter": {"remove_headers": {"X-Spam": -1, "Subject": -2}}}
        self.assertEqual(replies(result), [ChangeHeader(2, b"X-Spam", b""), Accept()])

    def test_remove_headers_list(self) -> None:
        """remove_headers with a list removes each listed occurrence (3.14)."""
        result = {"action": "no action", "milter": {"remove_headers": {"X-Spam": [1, 2]}}}
        self.assertEqual(replies(result), [
            ChangeHeader(1, b"X-Spam", b""), ChangeHeader(2, b"X-Spam", b""), Accept()])

    def test_remove_unknown_header(self) -> None:
        """remove_headers of a header never received sends nothing; non-integers are skipped."""
        result = {"action": "no action",
                  "milter": {"remove_headers": {"X-Other": 0, "X-Spam": "1", "Subject": 1.0}}}
        self.assertEqual(replies(result), [Accept()])

    def test_add_headers_order_rules(self) -> None:
        """The spec's observed example: h X-A, i 0 X-B, h X-C, i 10 X-D."""
        result = {"action": "no action", "milter": {"add_headers": {
            "X-A": "a", "X-B": {"value": "b0", "order": 0}, "X-C": {"value": "c", "order": -1},
            "X-D": {"value": "d", "order": -2}}}}
        self.assertEqual(replies(result), [
            AddHeader(b"X-A", b"a"), InsertHeader(0, b"X-B", b"b0"), AddHeader(b"X-C", b"c"),
            InsertHeader(10, b"X-D", b"d"), Accept()])

    def test_add_headers_far_negative(self) -> None:
        """An order below minus the header count inserts at 0; index is an alias of order."""
        result = {"action": "no action", "milter": {"add_headers": {
            "X-E": {"value": "e", "index": -50}, "X-F": {"value": "f", "order": 3.7}}}}
        self.assertEqual(replies(result), [
            InsertHeader(0, b"X-E", b"e"), InsertHeader(3, b"X-F", b"f"), Accept()])

    def test_add_headers_array(self) -> None:
        """An array of objects adds one header each; objects without a string value are ignored."""
        result = {"action": "no action", "milter": {"add_headers": {"X-M": [
            {"value": "1"}, {"value": 2}, {"value": "3", "order": 1}]}}}
        self.assertEqual(replies(result), [
            AddHeader(b"X-M", b"1"), InsertHeader(1, b"X-M", b"3"), Accept()])

    def test_add_headers_repeated_key(self) -> None:
        """A repeated string key adds every value, grouped by key as UCL iterates."""
        body = (b'{"action": "no action", "milter": {"add_headers":'
                b' {"X-A": "1", "X-B": "2", "X-A": "3"}}}')
        parsed = parse_reply(scan_reply(body))
        self.assertEqual(result_replies(parsed, headers=EIGHT, flags=ConnectionFlags(),
                                        settings=ReplySettings()), [
            AddHeader(b"X-A", b"1"), AddHeader(b"X-A", b"3"), AddHeader(b"X-B", b"2"), Accept()])

    def test_repeated_key_lookup_first(self) -> None:
        """Elsewhere a repeated key means its first value, as UCL's lookup does."""
        parsed = parse_reply(scan_reply(b'{"action": "reject", "action": "no action"}'))
        self.assertEqual(parsed.result, {"action": "reject"})

    def test_removal_lowers_counter(self) -> None:
        """Removals lower the counter negative orders count from."""
        result = {"action": "no action", "milter": {
            "remove_headers": {"X-Spam": 0},
            "add_headers": {"X-D": {"value": "d", "order": -2}}}}
        self.assertEqual(replies(result)[2], InsertHeader(6, b"X-D", b"d"))

    def test_envelope_changes(self) -> None:
        """change_from, add_rcpt and del_rcpt, in that order after the headers."""
        result = {"action": "no action", "milter": {
            "del_rcpt": ["<old@example.org>"], "add_rcpt": ["<a@example.org>", "<b@example.org>"],
            "change_from": "<new@example.net>", "add_headers": {"X-A": "a"}}}
        self.assertEqual(replies(result), [
            AddHeader(b"X-A", b"a"), ChangeFrom(b"<new@example.net>"),
            AddRecipient(b"<a@example.org>"), AddRecipient(b"<b@example.org>"),
            DeleteRecipient(b"<old@example.org>"), Accept()])

    def test_reject_discard_is_sticky(self) -> None:
        """milter.reject = discard turns a later plain reject into d."""
        flags = ConnectionFlags()
        replies({"action": "no action", "milter": {"reject": "discard"}}, flags=flags)
        self.assertEqual(replies({"action": "reject"}, flags=flags), [Discard()])

    def test_reject_quarantine(self) -> None:
        """milter.reject = quarantine turns reject into q + a."""
        result = {"action": "reject", "milter": {"reject": "quarantine"}}
        self.assertEqual(replies(result), [Quarantine(b"Spam message quarantined"), Accept()])

    def test_reject_other_clears(self) -> None:
        """Any other milter.reject string switches both flags off, even configured ones."""
        flags = ConnectionFlags(discard_on_reject=True, quarantine_on_reject=True)
        result = {"action": "reject", "milter": {"reject": "reject"}}
        self.assertEqual(replies(result, flags=flags),
                         [ReplyCode(b"554", b"5.7.1", b"Spam message rejected")])

    def test_no_action_flag(self) -> None:
        """milter.no_action: X-Rspamd-Action with the action, then a, whatever the action."""
        result = {"action": "reject", "milter": {"no_action": True}}
        self.assertEqual(replies(result), [AddHeader(b"X-Rspamd-Action", b"reject"), Accept()])

    def test_no_action_flag_is_sticky(self) -> None:
        """The no-action flag stays for later messages of the connection."""
        flags = ConnectionFlags()
        replies({"action": "no action", "milter": {"no_action": True}}, flags=flags)
        self.assertEqual(replies({"action": "soft reject"}, flags=flags),
                         [AddHeader(b"X-Rspamd-Action", b"soft reject"), Accept()])

    def test_spam_header_string(self) -> None:
        """spam_header string with add header: delete, set with that value, a."""
        result = {"action": "add header", "milter": {"spam_header": "Yes, score 9"}}
        self.assertEqual(replies(result), [
            ChangeHeader(2, b"X-Spam", b""), ChangeHeader(1, b"X-Spam", b""),
            ChangeHeader(1, b"X-Spam", b"Yes, score 9"), Accept()])

    def test_spam_header_object(self) -> None:
        """spam_header object: each name deleted and set; body and no_action skipped."""
        result = {"action": "add header",
                  "milter": {"spam_header": {"X-Junk": "yes"}, "no_action": True}}
        self.assertEqual(replies(result, body=b"new"), [ChangeHeader(1, b"X-Junk", b"yes"), Accept()])

    def test_spam_header_other_action(self) -> None:
        """spam_header is ignored unless the action is add header."""
        result = {"action": "no action", "milter": {"spam_header": "x"}}
        self.assertEqual(replies(result), [Accept()])

    def test_spam_header_then_dkim(self) -> None:
        """With spam_header, DKIM inserts come before the a (documented deviation)."""
        result = {"action": "add header", "milter": {"spam_header": {"X-Junk": "yes"}},
                  "dkim-signature": "v=1"}
        self.assertEqual(replies(result), [
            ChangeHeader(1, b"X-Junk", b"yes"), InsertHeader(1, b"DKIM-Signature", b"v=1"), Accept()])


class DkimAndBodyTests(unittest.TestCase):
    """DKIM signatures and body replacement (§6.4)."""

    def test_dkim_string(self) -> None:
        """A dkim-signature string is inserted at 1."""
        result = {"action": "no action", "dkim-signature": "v=1; a=rsa\n\tb=x"}
        self.assertEqual(replies(result), [
            InsertHeader(1, b"DKIM-Signature", b"v=1; a=rsa\n\tb=x"), Accept()])

    def test_dkim_array(self) -> None:
        """A dkim-signature array is inserted at 1, 2, ... in order."""
        result = {"action": "no action", "dkim-signature": ["s1", "s2"]}
        self.assertEqual(replies(result), [
            InsertHeader(1, b"DKIM-Signature", b"s1"), InsertHeader(2, b"DKIM-Signature", b"s2"),
            Accept()])

    def test_body_replacement(self) -> None:
        """A replacement body is one b packet after the milter block, before the action."""
        result = {"action": "add header", "milter": {"add_headers": {"X-A": "a"}}}
        self.assertEqual(replies(result, headers=ReceivedHeaders(), body=b"x" * 70000), [
            AddHeader(b"X-A", b"a"), ReplaceBody(b"x" * 70000),
            ChangeHeader(1, b"X-Spam", b"Yes"), Accept()])


class ExtendedHeadersTests(unittest.TestCase):
    """rmilter's extended_spam_headers."""

    def test_added_before_accept(self) -> None:
        """X-Spamd-Result and X-Rspamd-Server precede the final a."""
        result = {"action": "no action", "score": 1.5, "required_score": 15,
                  "symbols": {"B": {"score": 1.0, "options": ["x", "y"]}, "A": {"score": 0.5}}}
        self.assertEqual(replies(result, extended_spam_headers=True, server_name="mx1"), [
            AddHeader(b"X-Spamd-Result",
                      b"default: False [1.50 / 15.00];\n\tA(0.50)[];\n\tB(1.00)[x, y]"),
            AddHeader(b"X-Rspamd-Server", b"mx1"), Accept()])

    def test_not_on_reject(self) -> None:
        """A rejected message gets no extended headers."""
        self.assertEqual(replies({"action": "reject"}, extended_spam_headers=True),
                         [ReplyCode(b"554", b"5.7.1", b"Spam message rejected")])


class FailureTests(unittest.TestCase):
    """Replies for failed scans per the failure policy."""

    failure = ScanFailure(FailureClass.NO_UPSTREAM, 404, "Backend not found")

    def test_tempfail(self) -> None:
        """tempfail: t."""
        self.assertEqual(failure_replies(FailureAction.TEMPFAIL, self.failure, ReplySettings()),
                         [Tempfail()])

    def test_accept(self) -> None:
        """accept: a."""
        self.assertEqual(failure_replies(FailureAction.ACCEPT, self.failure, ReplySettings()),
                         [Accept()])

    def test_discard(self) -> None:
        """discard: d."""
        self.assertEqual(failure_replies(FailureAction.DISCARD, self.failure, ReplySettings()),
                         [Discard()])

    def test_reject(self) -> None:
        """reject: 554 5.7.1 naming the failure, like the HTTP listener's synthetic verdict."""
        self.assertEqual(failure_replies(FailureAction.REJECT, self.failure, ReplySettings()),
                         [ReplyCode(b"554", b"5.7.1", b"Message not scanned: Backend not found")])


class SettingsTests(unittest.TestCase):
    """Reply settings from the proxy options."""

    def test_from_options(self) -> None:
        """Every milter reply option is taken over."""
        options = ProxyOptions(spam_header="X-S", reject_message="no", tempfail_message="later",
                               quarantine_message="held", extended_spam_headers=True)
        self.assertEqual(ReplySettings.from_options(options, actions={"reject"}, server_name="h"),
                         ReplySettings("X-S", "no", "later", "held", frozenset({"reject"}), True, "h"))


class FuzzTests(unittest.TestCase):
    """Arbitrary results never break the reply builder."""

    json_values = st.recursive(
        st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
        | st.text(max_size=10),
        lambda children: st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8), children, max_size=4),
        max_leaves=20)

    @settings(max_examples=300, deadline=None)
    @given(st.sampled_from(sorted(ALL_ACTIONS)), json_values, json_values, st.booleans())
    def test_any_milter_block(self, action: str, block: Any, dkim: Any, extended: bool) -> None:
        """Any JSON milter block yields encodable replies ending with one disposition."""
        result = json.loads(json.dumps({"action": action, "milter": block, "dkim-signature": dkim,
                                        "messages": {"smtp_message": "m"}}))
        out = replies(result, extended_spam_headers=extended)
        for reply in out:
            reply.encode()
        final = (Accept, Discard, ReplyCode, Tempfail)
        self.assertIsInstance(out[-1], final)
        self.assertFalse(any(isinstance(r, final) for r in out[:-1]))
