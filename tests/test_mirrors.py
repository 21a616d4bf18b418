"""Tests for rspamd_tx.proxy.mirrors: mirror copies, the coin, compare scripts around the master scan."""

from __future__ import annotations

import os
import random
from typing import Any

import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent, globalLogPublisher
from twisted.trial import unittest

from rspamd_tx.config.workers import GlobalOptions
from rspamd_tx.protocols.httpcrypt import decrypt_request, encrypt_reply
from rspamd_tx.protocols.keypair import Keypair, PublicKey
from rspamd_tx.proxy import server
from rspamd_tx.proxy.compare_scripts import LuaEnvironment, ReplyParser
from rspamd_tx.proxy.http_listener import HttpListenerFactory
from rspamd_tx.proxy.mirrors import (
    CANNOT_PARSE,
    UNKNOWN_ERROR,
    MirroringScanner,
    ReplyParseError,
    parse_reply,
)
from rspamd_tx.proxy.scanning import IScanner, ScanReply, ScanRequest
from rspamd_tx.proxy.upstream_scanner import UpstreamScanner
from rspamd_tx.upstreams.http_client import ConnectError, ScannerResponse, ScannerTimeout
from tests.test_upstream_scanner import JSON_REPLY, Call, FakeClient, collect, proxy_options

MIRROR_KEYPAIR = Keypair.generate()

CONFIG = f"""
max_retries = 3;
upstream {{ scan {{ default = yes; hosts = "192.0.2.1,192.0.2.2"; }} }}
mirror {{
  always {{ hosts = "198.51.100.1"; settings_id = "mirror-sid"; compression = yes; timeout = 5s; }}
  rare {{
    hosts = "198.51.100.2"; probability = 0.1;
    key = "{PublicKey(MIRROR_KEYPAIR.public_key).encode()}";
  }}
}}
"""

REQUEST = ScanRequest(
    headers=((b"Settings-ID", b"client"), (b"Rcpt", b"a@example.com")),
    body=b"message body",
    log_tag="tag01",
    client_address="192.0.2.100:5000",
)

MIRROR_REPLY = ScannerResponse(
    200, "OK", (("Content-Type", "application/json"),), b'{"action":"no action","score":1.5}'
)


class ScriptedCoin(random.Random):
    """A Random whose random() returns the given values in turn."""

    def __init__(self, *coins: float) -> None:
        super().__init__(0)
        self.coins = list(coins)

    def random(self) -> float:
        return self.coins.pop(0)


class MirrorTestCase(unittest.TestCase):
    """A mirroring scanner over a fake client with a fake clock."""

    config = CONFIG
    coins: tuple[float, ...] = (0.5,)

    def setUp(self) -> None:
        self.clock = Clock()
        self.client = FakeClient()
        self.options = proxy_options(self.config)
        self.master = UpstreamScanner(
            self.options, GlobalOptions(), self.clock, client=self.client  # type: ignore[arg-type]
        )
        self.events: list[dict[str, Any]] = []
        self.lua = LuaEnvironment(Logger(observer=self.events.append))
        self.scanner = MirroringScanner(
            self.master, GlobalOptions(), rng=ScriptedCoin(*self.coins), environment=self.lua
        )
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def scan(self, request: ScanRequest = REQUEST) -> list[Any]:
        seen = collect(self.scanner.scan(request))
        self.clock.advance(0)
        return seen

    def calls_to(self, prefix: str) -> list[Call]:
        return [call for call in self.client.calls if call.address.host.startswith(prefix)]

    def master_calls(self) -> list[Call]:
        return self.calls_to("192.0.2.")

    def mirror_calls(self) -> list[Call]:
        return self.calls_to("198.51.100.")

    def log_text(self) -> str:
        return "\n".join(formatEvent(event) for event in self.events)


class CoinTests(MirrorTestCase):
    """One coin per session decides which mirrors get a copy (spec §4.5)."""

    coins = (0.5, 0.05, 0.1, 0.99)

    def test_provides_interface(self) -> None:
        """The mirroring scanner is an IScanner."""
        self.assertTrue(IScanner.providedBy(self.scanner))

    def test_probability_against_coin(self) -> None:
        """A mirror is used when its probability is at least the session's coin."""
        chosen = []
        for _ in self.coins:
            before = len(self.mirror_calls())
            self.scan()
            chosen.append(sorted(c.address.host for c in self.mirror_calls()[before:]))
        self.assertEqual(
            chosen,
            [
                ["198.51.100.1"],
                ["198.51.100.1", "198.51.100.2"],
                ["198.51.100.1", "198.51.100.2"],
                ["198.51.100.1"],
            ],
        )


class SeededCoinTests(unittest.TestCase):
    """The coin with a seeded generator."""

    def test_one_coin_per_session(self) -> None:
        """Two mirrors with the same probability are always chosen together."""
        options = proxy_options(
            'upstream { scan { default = yes; hosts = "192.0.2.1"; } }'
            ' mirror { a { hosts = "198.51.100.1"; probability = 0.3; }'
            ' b { hosts = "198.51.100.2"; probability = 0.3; } }'
        )
        client = FakeClient()
        clock = Clock()
        master = UpstreamScanner(options, GlobalOptions(), clock, client=client)  # type: ignore[arg-type]
        scanner = MirroringScanner(master, GlobalOptions(), rng=random.Random(7))
        sessions = []
        for _ in range(200):
            before = len(client.calls)
            scanner.scan(REQUEST)
            clock.advance(0)
            sessions.append(len([c for c in client.calls[before:] if c.address.host.startswith("198.")]))
        self.assertEqual(set(sessions), {0, 2})
        self.assertTrue(30 < sessions.count(2) < 90, sessions.count(2))


class MirrorRequestTests(MirrorTestCase):
    """Copies are transformed with the mirror's own options."""

    coins = (0.05,)

    def test_settings_and_compression(self) -> None:
        """The mirror's settings_id replaces the client's; its compression applies."""
        self.scan()
        [call] = self.calls_to("198.51.100.1")
        self.assertEqual([v for n, v in call.headers if n == "Settings-ID"], ["mirror-sid"])
        self.assertEqual(dict(call.headers)["Compression"], "zstd")
        self.assertEqual(zstandard.ZstdDecompressor().decompress(call.body), b"message body")
        self.assertEqual(call.timeout, 5.0)

    def test_encrypted_mirror(self) -> None:
        """A mirror with a key gets an HTTPCrypt request it can open."""
        self.scan()
        [call] = self.calls_to("198.51.100.2")
        self.assertEqual(call.target, "/post")
        inner = decrypt_request(call.headers, call.body, MIRROR_KEYPAIR)
        self.assertEqual(inner.body, b"message body")
        self.assertEqual(inner.get("Settings-ID"), "client")
        self.assertEqual(call.timeout, self.options.timeout)

    def test_master_untouched(self) -> None:
        """The master request keeps the client's settings and is not compressed."""
        self.scan()
        [call] = self.master_calls()
        self.assertEqual([v for n, v in call.headers if n == "Settings-ID"], ["client"])
        self.assertEqual(call.body, b"message body")


class IsolationTests(MirrorTestCase):
    """Mirrors never affect or delay the client's answer."""

    coins = (0.05,)

    def test_master_not_delayed_by_slow_mirror(self) -> None:
        """The master reply is delivered while the mirrors are still pending."""
        seen = self.scan()
        self.master_calls()[0].deferred.callback(JSON_REPLY)
        [reply] = seen
        self.assertIsInstance(reply, ScanReply)
        self.assertEqual(reply.result(), {"action": "reject"})
        self.assertFalse(any(call.deferred.called for call in self.mirror_calls()))

    def test_mirror_failure_does_not_affect_client(self) -> None:
        """Failed mirrors leave the master reply as it is."""
        seen = self.scan()
        for call in self.mirror_calls():
            call.deferred.errback(ConnectError(500, "IO write error: Connection refused"))
        self.clock.advance(0)
        self.master_calls()[0].deferred.callback(JSON_REPLY)
        [reply] = seen
        self.assertEqual(reply.body, b'{"action":"reject"}')

    def test_no_retries(self) -> None:
        """A failed mirror gets no second attempt."""
        self.scan()
        self.calls_to("198.51.100.1")[0].deferred.errback(ScannerTimeout())
        self.clock.advance(10)
        self.assertEqual(len(self.calls_to("198.51.100.1")), 1)

    def test_failure_counted_on_mirror_balancer(self) -> None:
        """A mirror failure is an error of the mirror's upstream, not of the master's."""
        self.scan()
        self.calls_to("198.51.100.1")[0].deferred.errback(ScannerTimeout())
        self.clock.advance(0)
        [mirror_upstream] = self.scanner.balancers()["always"].upstreams
        self.assertEqual(mirror_upstream.errors, 1)
        self.assertTrue(all(u.errors == 0 for u in self.master.balancers()["scan"].upstreams))

    def test_mirror_failure_logged(self) -> None:
        """A mirror failure is logged with the session's tag."""
        self.scan()
        self.calls_to("198.51.100.1")[0].deferred.errback(ScannerTimeout())
        self.assertIn("<tag01> mirror always failed: IO timeout", self.log_text())


SCRIPT = """
return function(results, log_tag)
  calls = (calls or 0) + 1
  seen = {}
  for name, value in pairs(results) do
    if type(value) == 'table' then seen[name] = value.action else seen[name] = value end
  end
  seen.tag = log_tag
end
"""


class CompareScriptTests(MirrorTestCase):
    """Compare scripts see the master and mirror results once the session ends (spec §4.6)."""

    config = CONFIG + f"script =<<EOD\n{SCRIPT}\nEOD;\n"
    coins = (0.05,)

    def seen(self) -> Any:
        return self.lua.from_lua(self.lua.runtime.globals().seen)

    def test_results(self) -> None:
        """results.master and results[mirror] hold the parsed replies, or the mirror's error."""
        self.scan()
        self.master_calls()[0].deferred.callback(JSON_REPLY)
        self.calls_to("198.51.100.1")[0].deferred.callback(MIRROR_REPLY)
        self.calls_to("198.51.100.2")[0].deferred.errback(
            ConnectError(500, "IO write error: Connection refused")
        )
        self.clock.advance(0)
        self.assertEqual(
            self.seen(),
            {
                "master": "reject",
                "always": "no action",
                "rare": "IO write error: Connection refused",
                "tag": "tag01",
            },
        )

    def test_runs_after_client_answered(self) -> None:
        """The script runs on a later reactor turn, after every mirror finished."""
        seen = self.scan()
        self.master_calls()[0].deferred.callback(JSON_REPLY)
        self.calls_to("198.51.100.1")[0].deferred.callback(MIRROR_REPLY)
        self.assertEqual(len(seen), 1)
        self.assertIsNone(self.lua.runtime.globals().calls)
        self.calls_to("198.51.100.2")[0].deferred.errback(ScannerTimeout())
        self.assertIsNone(self.lua.runtime.globals().calls)
        self.clock.advance(0)
        self.assertEqual(self.lua.runtime.globals().calls, 1)

    def test_not_run_without_master_results(self) -> None:
        """Without master results (no JSON reply) the scripts are not called."""
        self.scan()
        self.master_calls()[0].deferred.callback(
            ScannerResponse(200, "OK", (("Content-Type", "text/plain"),), b"x")
        )
        for call in self.mirror_calls():
            call.deferred.callback(MIRROR_REPLY)
        self.clock.advance(0)
        self.assertIsNone(self.lua.runtime.globals().calls)

    def test_unparsable_mirror_replies(self) -> None:
        """Bad JSON is "cannot parse ucl"; a reply without results "unknown error"."""
        self.scan()
        self.master_calls()[0].deferred.callback(JSON_REPLY)
        self.calls_to("198.51.100.1")[0].deferred.callback(
            ScannerResponse(200, "OK", (("Content-Type", "application/json"),), b"{not json")
        )
        rare = self.calls_to("198.51.100.2")[0]
        opened = decrypt_request(rare.headers, rare.body, MIRROR_KEYPAIR)
        outer = encrypt_reply(
            200, "OK", [], b"plain text", opened.nm, server="rspamd/3.4",
            date="Mon, 23 Nov 2026 17:00:00 GMT", content_type="text/plain",
        )
        rare.deferred.callback(
            ScannerResponse(200, "OK", (), outer.split(b"\r\n\r\n", 1)[1])
        )
        self.clock.advance(0)
        self.assertEqual((self.seen()["always"], self.seen()["rare"]), (CANNOT_PARSE, UNKNOWN_ERROR))

    def test_script_error_contained(self) -> None:
        """A failing script is logged; the client's reply is unaffected."""
        self.scanner.update(
            proxy_options(CONFIG + 'script = "return function() error(\\"cmp failed\\") end";')
        )
        seen = self.scan()
        self.master_calls()[0].deferred.callback(JSON_REPLY)
        for call in self.mirror_calls():
            call.deferred.callback(MIRROR_REPLY)
        self.clock.advance(0)
        [reply] = seen
        self.assertEqual(reply.result(), {"action": "reject"})
        self.assertIn("<tag01> cannot run lua compare script", self.log_text())
        self.assertIn("cmp failed", self.log_text())


class ParserOptionTests(MirrorTestCase):
    """The parser option of mirrors and upstreams (spec §4.7)."""

    config = (
        'upstream { scan { default = yes; hosts = "192.0.2.1";'
        ' parser = "return function(s) return {action = \\"master:\\" .. s} end"; } }'
        ' mirror { m { hosts = "198.51.100.1";'
        ' parser = "return {from = function(s) return {action = s:upper()} end}"; } }'
        f"script =<<EOD\n{SCRIPT}\nEOD;\n"
    )
    coins = (0.5,)

    def test_parsers_replace_json(self) -> None:
        """Both replies go through their block's parser, whatever their content type."""
        self.scan()
        self.master_calls()[0].deferred.callback(ScannerResponse(200, "OK", (), b"ok"))
        self.mirror_calls()[0].deferred.callback(ScannerResponse(200, "OK", (), b"spam"))
        self.clock.advance(0)
        seen = self.lua.from_lua(self.lua.runtime.globals().seen)
        self.assertEqual(seen, {"master": "master:ok", "m": "SPAM", "tag": "tag01"})


class ParseReplyTests(unittest.TestCase):
    """parse_reply."""

    def test_message_offset(self) -> None:
        """The body is cut at Message-Offset before parsing."""
        headers = [("Content-Type", "application/json"), ("Message-Offset", "12")]
        self.assertEqual(parse_reply(headers, b'{"score":1}\nRewritten message', None), {"score": 1})

    def test_only_json(self) -> None:
        """Without a parser only application/json (any case) is parsed."""
        self.assertEqual(parse_reply([("Content-Type", "Application/JSON")], b"{}", None), {})
        self.assertIsNone(parse_reply([("Content-Type", "application/json; charset=utf-8")], b"{}", None))
        self.assertIsNone(parse_reply([], b"{}", None))

    def test_empty_body(self) -> None:
        """An empty body has no results."""
        self.assertIsNone(parse_reply([("Content-Type", "application/json")], b"", None))

    def test_parser(self) -> None:
        """A parser gets the body as a string."""
        parser = ReplyParser(LuaEnvironment(), "return function(s) return {n = #s} end")
        self.assertEqual(parse_reply([], b"abc", parser), {"n": 3})

    @settings(max_examples=300, deadline=None)
    @given(
        st.binary(max_size=200) | st.just(b"[" * 50000),
        st.sampled_from(["application/json", "text/plain"]),
    )
    def test_fuzz(self, body: bytes, content_type: str) -> None:
        """Any body gives results, None or ReplyParseError, never another exception."""
        try:
            parse_reply([("Content-Type", content_type)], body, None)
        except ReplyParseError:
            pass

    def test_unknown_error_constant(self) -> None:
        """The error strings are Rspamd's."""
        self.assertEqual((CANNOT_PARSE, UNKNOWN_ERROR), ("cannot parse ucl", "unknown error"))


class WorkerWiringTests(unittest.TestCase):
    """build_worker puts the mirroring scanner in front of the listener when needed."""

    def build(self, text: str) -> server.ProxyWorker:
        from rspamd_tx.config import ucl
        from rspamd_tx.config.tree import UclObject
        from rspamd_tx.config.workers import check_config

        tree = UclObject(worker=UclObject(rspamd_proxy=ucl.loads(text)))
        config, _ = check_config(tree)
        return server.build_worker(config, config.workers[0], Clock())

    def test_with_mirrors(self) -> None:
        """With a mirror the listener scans through the MirroringScanner."""
        builder = self.build(CONFIG)
        factory = builder.stream_factory()
        assert isinstance(factory, HttpListenerFactory)
        self.assertIsInstance(factory.scanner, MirroringScanner)
        self.assertIs(factory.scanner, builder.mirrors)
        assert builder.mirrors is not None
        self.assertEqual(list(builder.mirrors.mirrors), ["always", "rare"])

    def test_seed(self) -> None:
        """The seed's mirror and compare script are served; the milter listener scans through them."""
        from rspamd_tx.config import ucl
        from rspamd_tx.config.tree import UclObject
        from rspamd_tx.config.workers import check_config

        seed = os.path.join(os.path.dirname(__file__), "data", "seeds", "worker-proxy.inc")
        config, _ = check_config(UclObject(worker=UclObject(rspamd_proxy=ucl.load(seed))))
        builder = server.build_worker(config, config.workers[0], Clock())
        assert builder.mirrors is not None
        mirror = builder.mirrors.mirrors["test"]
        self.assertEqual(mirror.block.probability, 0.1)
        self.assertTrue(mirror.block.compression)
        self.assertIsNotNone(mirror.block.key)
        assert builder.mirrors.scripts is not None
        self.assertEqual(len(builder.mirrors.scripts.functions), 1)
        self.assertIs(getattr(builder.stream_factory(), "scanner"), builder.mirrors)

    def test_without_mirrors(self) -> None:
        """Without mirrors or scripts the listener scans through the upstream scanner."""
        builder = self.build('upstream { scan { default = yes; hosts = "192.0.2.1"; } }')
        self.assertIsNone(builder.mirrors)
