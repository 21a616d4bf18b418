"""``dynamic_keys_map``: loading keypairs from file and HTTP maps, and how the storage uses them."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from zope.interface import implementer

from rspamd_tx.config.workers import FuzzyOptions
from rspamd_tx.fuzzy.key_maps import (
    FETCH_TIMEOUT,
    MAX_MAP_SIZE,
    DynamicKeys,
    KeyMapError,
    parse_keypairs,
)
from rspamd_tx.fuzzy.storage import FuzzyPolicy, FuzzyStorage, key_label
from rspamd_tx.protocols.fuzzy_codec import (
    ClientEncryption,
    Command,
    decode_reply,
    encode_request,
)
from rspamd_tx.protocols.keypair import Keypair
from tests.test_fuzzy_storage import CLIENT, ListQueue, MemoryBackend
from tests.test_fuzzy_worker import command

INTERVAL = 60.0
FILE_INTERVAL = 6.0


def map_text(*pairs: Keypair, extra: str = "") -> str:
    """A map holding ``pairs`` (the first bare, the others wrapped in ``keypair { }``)."""
    elements = []
    for number, pair in enumerate(pairs):
        mapping = pair.as_mapping()
        body = f'pubkey = "{mapping["pubkey"]}"; privkey = "{mapping["privkey"]}";'
        elements.append(f"{{ {body} }}" if number == 0 else f"{{ keypair {{ {body} }} }}")
    return "# dynamic keys\n[\n  " + ",\n  ".join([*elements, *([extra] if extra else [])]) + "\n]\n"


@implementer(ILogObserver)
class LogCapture:
    """Formatted messages of the key map module."""

    def __init__(self, test: unittest.TestCase) -> None:
        self.lines: list[str] = []
        globalLogPublisher.addObserver(self)
        test.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_namespace") == "rspamd_tx.fuzzy.key_maps":
            self.lines.append(formatEvent(event))


class ParseTests(unittest.TestCase):
    def test_array_of_keypairs(self) -> None:
        """Bare and wrapped keypair objects load, in order; comments are allowed."""
        first, second = Keypair.generate(), Keypair.generate()
        loaded = parse_keypairs(map_text(first, second), "keys.map")
        self.assertEqual([k.public_key for k in loaded], [first.public_key, second.public_key])

    def test_bad_element_skipped(self) -> None:
        """An element that is no usable keypair is logged and skipped; the rest load."""
        logs = LogCapture(self)
        good = Keypair.generate()
        loaded = parse_keypairs(map_text(good, extra='{ pubkey = "short"; }'), "keys.map")
        self.assertEqual([k.public_key for k in loaded], [good.public_key])
        self.assertTrue(any("keys.map: keypair 2 skipped" in line for line in logs.lines),
                        logs.lines)

    def test_not_an_array(self) -> None:
        """An object, a scalar, broken or absurdly nested UCL is refused as a whole."""
        for text in ('{ pubkey = "x"; }', '"text"', "[ { pubkey = ", "", "[" * 100_000):
            self.assertRaises(KeyMapError, parse_keypairs, text, "keys.map")


class FileMapTests(unittest.TestCase):
    """A local map checked on a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.path = os.path.abspath(self.mktemp())
        self.loads: list[tuple[bytes, ...]] = []
        self.logs = LogCapture(self)

    def write(self, text: str) -> None:
        with open(self.path, "w", encoding="utf-8") as handle:
            handle.write(text)

    def watcher(self, url: str | None = None) -> DynamicKeys:
        keys = DynamicKeys(url or self.path, self.use, self.clock, INTERVAL, FILE_INTERVAL)
        keys.startService()
        self.addCleanup(keys.stopService)
        return keys

    def use(self, keypairs: tuple[Keypair, ...]) -> None:
        self.loads.append(tuple(k.public_key for k in keypairs))

    def test_loaded_at_start_and_on_change(self) -> None:
        """The map loads at start, again only after it changed, at the file interval."""
        first, second = Keypair.generate(), Keypair.generate()
        self.write(map_text(first))
        keys = self.watcher("file://" + self.path)
        self.clock.advance(FILE_INTERVAL)
        self.write(map_text(first, second))
        self.clock.advance(FILE_INTERVAL - 1)
        before = list(self.loads)
        self.clock.advance(1)
        self.assertEqual(before, [(first.public_key,)])
        self.assertEqual(self.loads[1:], [(first.public_key, second.public_key)])
        self.assertEqual(len(keys.keypairs), 2)

    def test_bad_content_keeps_keys(self) -> None:
        """Content that is not an array keeps the loaded keys; the problem is logged once."""
        pair = Keypair.generate()
        self.write(map_text(pair))
        keys = self.watcher()
        self.write("{ not = an_array; }\n")
        self.clock.advance(FILE_INTERVAL)
        self.clock.advance(FILE_INTERVAL)
        self.assertEqual((self.loads, [k.public_key for k in keys.keypairs]),
                         ([(pair.public_key,)], [pair.public_key]))
        self.assertEqual(sum("keeping the loaded keys" in line for line in self.logs.lines), 1)

    def test_missing_file_keeps_keys_until_it_returns(self) -> None:
        """A removed map keeps the keys (logged once); when it comes back it loads again."""
        pair, other = Keypair.generate(), Keypair.generate()
        self.write(map_text(pair))
        keys = self.watcher()
        os.unlink(self.path)
        self.clock.advance(FILE_INTERVAL)
        self.clock.advance(FILE_INTERVAL)
        kept = [k.public_key for k in keys.keypairs]
        self.write(map_text(other))
        self.clock.advance(FILE_INTERVAL)
        self.assertEqual((kept, self.loads[-1]), ([pair.public_key], (other.public_key,)))
        self.assertEqual(sum("No such file" in line for line in self.logs.lines), 1)

    def test_stop_ends_checks(self) -> None:
        """After stopService the map is no longer read."""
        self.write(map_text(Keypair.generate()))
        keys = self.watcher()
        keys.stopService()
        self.write(map_text(Keypair.generate(), Keypair.generate()))
        self.clock.advance(10 * FILE_INTERVAL)
        self.assertEqual(len(self.loads), 1)


class _Body:
    """The body side of a fake response: delivers ``chunks`` then the end."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.stopped = False

    def stopProducing(self) -> None:  # noqa: N802 (Twisted API)
        self.stopped = True


class FakeResponse:
    """Just what DynamicKeys reads of an ``IResponse``."""

    def __init__(self, code: int, chunks: list[bytes] = [], headers: dict[bytes, bytes] = {},
                 length: Any = None) -> None:
        self.code = code
        self.headers = Headers({name: [value] for name, value in headers.items()})
        self.length = length
        self.body = _Body(list(chunks))

    def deliverBody(self, protocol: Any) -> None:  # noqa: N802 (Twisted API)
        protocol.makeConnection(self.body)
        for chunk in self.body.chunks:
            if self.body.stopped:
                break
            protocol.dataReceived(chunk)
        protocol.connectionLost(Failure(ResponseDone()))


class StalledResponse(FakeResponse):
    """A 200 whose body starts and never ends."""

    def deliverBody(self, protocol: Any) -> None:  # noqa: N802 (Twisted API)
        protocol.makeConnection(self.body)
        protocol.dataReceived(b"[")


class FakeAgent:
    """An ``IAgent`` answering from a list; remembers the requests' headers."""

    def __init__(self, responses: list[FakeResponse]) -> None:
        self.responses = responses
        self.requests: list[tuple[bytes, Headers]] = []

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None,
                body: Any = None) -> Deferred[FakeResponse]:
        self.requests.append((uri, headers or Headers()))
        return succeed(self.responses.pop(0))


class HttpMapTests(unittest.TestCase):
    URL = "https://keys.example.net/fuzzy.map"

    def setUp(self) -> None:
        self.clock = Clock()
        self.loads: list[tuple[bytes, ...]] = []
        self.logs = LogCapture(self)

    def watcher(self, agent: FakeAgent) -> DynamicKeys:
        keys = DynamicKeys(self.URL, lambda k: self.loads.append(tuple(p.public_key for p in k)),
                           self.clock, INTERVAL, FILE_INTERVAL, agent=agent)
        keys.startService()
        self.addCleanup(keys.stopService)
        return keys

    def test_fetch_then_not_modified(self) -> None:
        """200 loads and remembers the validators; the next fetch sends them; 304 keeps keys."""
        pair = Keypair.generate()
        agent = FakeAgent([
            FakeResponse(200, [map_text(pair).encode()],
                         {b"Last-Modified": b"Mon, 23 Nov 2026 10:00:00 GMT", b"ETag": b'"v1"'}),
            FakeResponse(304),
        ])
        keys = self.watcher(agent)
        self.clock.advance(INTERVAL)
        _, second = agent.requests[1]
        self.assertEqual(
            (second.getRawHeaders("If-Modified-Since"), second.getRawHeaders("If-None-Match")),
            (["Mon, 23 Nov 2026 10:00:00 GMT"], ['"v1"']))
        self.assertEqual((self.loads, len(keys.keypairs)), ([(pair.public_key,)], 1))

    def test_failures_keep_keys(self) -> None:
        """A 500, a declared oversize body and a streamed oversize body keep the keys."""
        pair = Keypair.generate()
        streamed = FakeResponse(200, [b"[" + b" " * MAX_MAP_SIZE, b"]"])
        agent = FakeAgent([
            FakeResponse(200, [map_text(pair).encode()]),
            FakeResponse(500, [b"oops"]),
            FakeResponse(200, [b"[]"], length=MAX_MAP_SIZE + 1),
            streamed,
        ])
        keys = self.watcher(agent)
        for _ in range(3):
            self.clock.advance(INTERVAL)
        self.assertEqual((self.loads, [k.public_key for k in keys.keypairs]),
                         ([(pair.public_key,)], [pair.public_key]))
        self.assertTrue(streamed.body.stopped)
        self.assertEqual([("HTTP status 500" in line, "larger than" in line)
                          for line in self.logs.lines if "keeping" in line],
                         [(True, False), (False, True)])


    def test_stalled_body_times_out(self) -> None:
        """A body that stops coming is given up after FETCH_TIMEOUT (transfer stopped,
        logged); the next interval fetches again."""
        pair = Keypair.generate()
        stalled = StalledResponse(200)
        agent = FakeAgent([stalled, FakeResponse(200, [map_text(pair).encode()])])
        keys = self.watcher(agent)
        self.clock.advance(FETCH_TIMEOUT)
        timed_out = (stalled.body.stopped, len(agent.requests), keys.keypairs)
        self.clock.advance(INTERVAL - FETCH_TIMEOUT)
        self.assertEqual(timed_out, (True, 1, ()))
        self.assertEqual((len(agent.requests), self.loads), (2, [(pair.public_key,)]))
        self.assertTrue(any("keeping the loaded keys" in line for line in self.logs.lines),
                        self.logs.lines)


class PolicyTests(unittest.TestCase):
    """How static and dynamic keys are found."""

    def test_lookup_order(self) -> None:
        """Static by id, then dynamic by id, else the last static key; a dynamic key is
        never the default."""
        static, default, dynamic = Keypair.generate(), Keypair.generate(), Keypair.generate()
        policy = FuzzyPolicy(keypairs=(static, default), dynamic_keypairs=(dynamic,))
        only_dynamic = FuzzyPolicy(dynamic_keypairs=(dynamic,))
        unknown = Keypair.generate().fuzzy_key_id
        self.assertEqual(
            [policy.key_for(static.fuzzy_key_id), policy.key_for(dynamic.fuzzy_key_id),
             policy.key_for(unknown), only_dynamic.key_for(dynamic.fuzzy_key_id),
             only_dynamic.key_for(unknown)],
            [static, dynamic, default, dynamic, None])

    def test_static_wins_same_id(self) -> None:
        """A dynamic key with a static key's id does not replace it."""
        static = Keypair.generate()
        twin = Keypair.from_secret(static.secret_key)
        policy = FuzzyPolicy(keypairs=(static,), dynamic_keypairs=(twin,))
        self.assertIs(policy.key_for(static.fuzzy_key_id), static)

    def test_dynamic_key_label_and_write_permission(self) -> None:
        """A dynamic key gets its statistics label and allow_update_keys permission."""
        dynamic = Keypair.generate()
        policy = FuzzyPolicy(dynamic_keypairs=(dynamic,),
                             allow_update_keys=frozenset({dynamic.id_string}))
        self.assertEqual((policy.label(dynamic), policy.may_write(CLIENT, dynamic)),
                         (key_label(dynamic), True))


class StorageTests(unittest.TestCase):
    def test_reconfigure_keeps_dynamic_keys(self) -> None:
        """A reload with new static keys keeps the dynamic ones; an encrypted request
        with a dynamic key id is answered."""
        dynamic = Keypair.generate()
        storage = FuzzyStorage(FuzzyOptions(), MemoryBackend(), ListQueue(), Clock())
        storage.use_dynamic_keys((dynamic,))
        storage.reconfigure(FuzzyOptions(keypairs=(Keypair.generate(),)))
        client = ClientEncryption(dynamic.public_key, Keypair.generate())
        reply = storage.handle(encode_request(command(Command.PING, value=7), client), CLIENT)
        assert isinstance(reply, bytes)
        self.assertEqual(decode_reply(reply, client.nm).value, 7)
