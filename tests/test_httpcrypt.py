"""HTTPCrypt requests and replies (httpcrypt.md §5, test vector §8)."""

from __future__ import annotations

import random
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial import unittest

from rspamd_tx.protocols import cryptobox, httpcrypt, zbase32
from rspamd_tx.protocols.http_codec import Data, HttpLimits, Response, ResponseParser
from rspamd_tx.protocols.httpcrypt import HttpCryptError
from rspamd_tx.protocols.keypair import Keypair

H = bytes.fromhex

SERVER = Keypair.from_secret(bytes(range(0x00, 0x20)))
CLIENT = Keypair.from_secret(bytes(range(0x20, 0x40)))
NONCE = bytes(range(0x40, 0x58))
NM = H("f829d921c627acb72402ac20fb0d9353fe184bf3a042933e305be08fcc25d07e")
PLAINTEXT = b"POST /checkv2 HTTP/1.0\r\nContent-Length: 5\r\nIP: 192.0.2.1\r\n\r\nhello"
CIPHERTEXT = H(
    "fdd896a8b6442371a439a9688eb2bce08b5f433383940f1b4bf952285c1de7a5"
    "6e96fe81da1baad50c50fb2626f6c162a841e01f05f2ed432aafdb224de1f95e2a"
)
TAG = H("5df69bf527a993f106caca0bf44d4a38")
KEY = "zqngc7me=ibyf8m5ganydpzk71tg97egrabqnis8rnidzu4f7fdwf7g5nndiy"
VECTOR_BODY = NONCE + TAG + CIPHERTEXT
DATE = "Mon, 23 Nov 2026 18:00:00 GMT"


def fixed(data: bytes) -> Callable[[int], bytes]:
    """A random source that always gives the first ``n`` bytes of ``data``."""
    return lambda n: data[:n]


def vector_request(
    host: str | None = None,
    keep_alive: bool = False,
    nm_cache: cryptobox.NmKeyCache | None = None,
) -> httpcrypt.EncryptedRequest:
    """The §8 request: POST /checkv2 with IP and 'hello', client key and nonce of the vector."""
    return httpcrypt.encrypt_request(
        "POST", "/checkv2", [("IP", "192.0.2.1")], b"hello", SERVER.public, CLIENT,
        host=host, keep_alive=keep_alive, nm_cache=nm_cache, random_bytes=fixed(NONCE),
    )


def parse_reply(data: bytes) -> tuple[Response, bytes]:
    """The outer reply and its body."""
    events = ResponseParser().feed(data)
    start = events[0]
    assert isinstance(start, Response)
    return start, b"".join(e.chunk for e in events if isinstance(e, Data))


class VectorTests(unittest.TestCase):
    """The §8 test vector, validated against Rspamd's decryptor."""

    def test_key_header(self) -> None:
        """The Key value is base32(server short id) '=' base32(client public key)."""
        self.assertEqual(httpcrypt.key_header_value(SERVER.public, CLIENT.public_key), KEY)

    def test_encrypted_body(self) -> None:
        """The encrypted body is nonce ‖ tag ‖ ciphertext of the vector, under its NM key."""
        request = vector_request()
        self.assertEqual(request.nm, NM)
        self.assertEqual(request.body, VECTOR_BODY)

    def test_outer_request_without_host(self) -> None:
        """Without a host the outer request is rspamc's HTTP/1.0 form."""
        self.assertEqual(
            vector_request().encode(),
            b"POST /post HTTP/1.0\r\nContent-Length: 105\r\n"
            b"Content-Type: application/octet-stream\r\nConnection: close\r\n"
            b"Key: " + KEY.encode() + b"\r\n\r\n" + VECTOR_BODY,
        )

    def test_outer_request_with_host(self) -> None:
        """With a host the outer request is the proxy's HTTP/1.1 form."""
        self.assertEqual(
            vector_request(host="10.0.0.5:11333", keep_alive=True).encode(),
            b"POST /post HTTP/1.1\r\nConnection: keep-alive\r\nHost: 10.0.0.5:11333\r\n"
            b"Content-Length: 105\r\nContent-Type: application/octet-stream\r\n"
            b"Key: " + KEY.encode() + b"\r\n\r\n" + VECTOR_BODY,
        )

    def test_server_opens_vector(self) -> None:
        """The server side opens the vector body to the inner request and the NM key."""
        inner = httpcrypt.decrypt_request([("Key", KEY)], VECTOR_BODY, SERVER)
        self.assertEqual((inner.method, inner.target), ("POST", "/checkv2"))
        self.assertEqual(inner.headers, (("Content-Length", "5"), ("IP", "192.0.2.1")))
        self.assertEqual(inner.get("ip"), "192.0.2.1")
        self.assertEqual((inner.body, inner.peer_key, inner.nm), (b"hello", CLIENT.public_key, NM))


class InnerRequestTests(unittest.TestCase):
    """The plaintext of an encrypted request."""

    def test_table(self) -> None:
        """Method from the body, Content-Length/Content-Type first, headers in order."""
        table = [
            (("POST", "/checkv2", [("IP", "192.0.2.1")], b"hello", None), PLAINTEXT),
            (("POST", "/ping", [], b"", None), b"GET /ping HTTP/1.0\r\n\r\n"),
            (
                ("GET", "/checkv2?x=1", [], b"m", None),
                b"POST /checkv2?x=1 HTTP/1.0\r\nContent-Length: 1\r\n\r\nm",
            ),
            (
                ("POST", "/checkv2", [("Compression", "zstd"), ("Content-Type", "x")], b"zz",
                 "application/x-compressed"),
                b"POST /checkv2 HTTP/1.0\r\nContent-Length: 2\r\n"
                b"Content-Type: application/x-compressed\r\nCompression: zstd\r\n\r\nzz",
            ),
            (
                ("POST", "/checkv2", [("Content-Length", "99"), ("Transfer-Encoding", "chunked"),
                                      ("Rcpt", "a"), ("Rcpt", "b")], b"x", None),
                b"POST /checkv2 HTTP/1.0\r\nContent-Length: 1\r\nRcpt: a\r\nRcpt: b\r\n\r\nx",
            ),
            (
                ("GET", "/ping", [("User-Agent", "rspamd-tx")], b"", "text/plain"),
                b"GET /ping HTTP/1.0\r\nUser-Agent: rspamd-tx\r\n\r\n",
            ),
        ]
        for args, expected in table:
            self.assertEqual(httpcrypt.encode_inner_request(*args), expected, args)

    def test_unwritable(self) -> None:
        """Parts that cannot be written are HttpCryptError."""
        table = [
            ("BAD METHOD", "/checkv2", [], None),
            ("POST", "/check v2", [], None),
            ("POST", "", [], None),
            ("POST", "/checkv2", [("Bad Name", "x")], None),
            ("POST", "/checkv2", [("IP", "1\r\nX: y")], None),
            ("POST", "/checkv2", [("From", "\u20ac")], None),
            ("POST", "/checkv2", [], "text/plain\r\nX: y"),
        ]
        for method, target, headers, content_type in table:
            with self.assertRaises(HttpCryptError, msg=(method, target, headers)):
                httpcrypt.encode_inner_request(method, target, headers, b"x", content_type)


class EncryptRequestTests(unittest.TestCase):
    """Client side: building the outer request."""

    def test_fresh_keypair_per_request(self) -> None:
        """Without a client keypair each request gets a new one (and a new nonce)."""
        first = httpcrypt.encrypt_request("POST", "/checkv2", [], b"m", SERVER.public)
        second = httpcrypt.encrypt_request("POST", "/checkv2", [], b"m", SERVER.public)
        keys = [dict(r.headers)["Key"] for r in (first, second)]
        self.assertNotEqual(keys[0], keys[1])
        self.assertTrue(all(k.startswith("zqngc7me=") for k in keys))
        self.assertNotEqual(first.body[:24], second.body[:24])

    def test_raw_server_key(self) -> None:
        """The server key may be given as 32 raw bytes."""
        self.assertEqual(vector_request().body, httpcrypt.encrypt_request(
            "POST", "/checkv2", [("IP", "192.0.2.1")], b"hello", SERVER.public_key, CLIENT,
            random_bytes=fixed(NONCE),
        ).body)

    def test_nm_cache(self) -> None:
        """With a cache the NM key is computed once per key pair."""
        cache = cryptobox.NmKeyCache(4)
        for _ in range(3):
            request = vector_request(nm_cache=cache)
        self.assertEqual((len(cache), request.nm), (1, NM))

    def test_unusable_server_key(self) -> None:
        """A server key of the wrong size or of small order is HttpCryptError."""
        for key in (bytes(31), bytes(32)):
            self.assertRaises(
                HttpCryptError, httpcrypt.encrypt_request, "POST", "/checkv2", [], b"m", key, CLIENT
            )

    def test_bad_host_or_random_source(self) -> None:
        """A host with CR/LF or outside ISO-8859-1, or a random source giving too few
        bytes (for the nonce or a fresh keypair) is HttpCryptError."""
        for host in ("a\r\nb", "scan\x00", "\u20ac"):
            self.assertRaises(HttpCryptError, vector_request, host=host)
        for keypair in (CLIENT, None):
            self.assertRaises(
                HttpCryptError, httpcrypt.encrypt_request, "POST", "/checkv2", [], b"m",
                SERVER.public, keypair, random_bytes=fixed(b"short"),
            )


class KeyHeaderTests(unittest.TestCase):
    """Parsing the Key header as Rspamd's server does."""

    def test_parse(self) -> None:
        """The id part gives at least 5 bytes, the key part exactly 32."""
        parsed = httpcrypt.parse_key_header(KEY)
        self.assertEqual((parsed.short_id, parsed.public_key), (SERVER.short_id, CLIENT.public_key))
        full = httpcrypt.parse_key_header(f"{SERVER.id_string}={CLIENT.public.encode()}")
        self.assertEqual((full.key_id, full.short_id), (SERVER.key_id, SERVER.short_id))

    def test_malformed(self) -> None:
        """Values Rspamd cannot use are HttpCryptError."""
        pk = CLIENT.public.encode()
        for value in ("", "zqngc7me", f"zqngc7me{pk}", f"yyyy={pk}", f"zqngc7me={pk[:-5]}",
                      f"zqngc7me={pk}y", f"ZQNGC7ME={pk}", f"zqngc7me= {pk}", f"={pk}"):
            self.assertRaises(HttpCryptError, httpcrypt.parse_key_header, value)

    def test_is_encrypted(self) -> None:
        """A request claims encryption when its Key header (any case) holds '='."""
        table = [
            ([], False),
            ([("Key", "abc")], False),
            ([("key", KEY)], True),
            ([("Key", "=")], True),
        ]
        for headers, expected in table:
            self.assertEqual(httpcrypt.is_encrypted(headers), expected, headers)


class DecryptRequestTests(unittest.TestCase):
    """Server side: opening encrypted requests."""

    def test_round_trip_with_full_id(self) -> None:
        """A request whose Key carries the full 64-byte id is accepted (5 bytes compared)."""
        request = vector_request(host="scan1")
        headers = [(n, f"{SERVER.id_string}={CLIENT.public.encode()}" if n == "Key" else v)
                   for n, v in request.headers]
        inner = httpcrypt.decrypt_request(headers, request.body, SERVER)
        self.assertEqual(inner.body, b"hello")

    def test_refused(self) -> None:
        """Every way a request cannot be opened is HttpCryptError."""
        other = Keypair.from_secret(bytes(range(0x60, 0x80)))
        forged_tag = NONCE + bytes(16) + CIPHERTEXT
        flipped = VECTOR_BODY[:-1] + bytes([VECTOR_BODY[-1] ^ 1])
        table = {
            "no Key": ([], VECTOR_BODY, SERVER),
            "Key without =": ([("Key", "zqngc7me")], VECTOR_BODY, SERVER),
            "another server": ([("Key", KEY)], VECTOR_BODY, other),
            "id of another server": (
                [("Key", "ybndrfg8=" + KEY.split("=")[1])], VECTOR_BODY, SERVER
            ),
            "short body": ([("Key", KEY)], VECTOR_BODY[:39], SERVER),
            "empty body": ([("Key", KEY)], b"", SERVER),
            "forged tag": ([("Key", KEY)], forged_tag, SERVER),
            "flipped bit": ([("Key", KEY)], flipped, SERVER),
            "small-order client key": ([("Key", "zqngc7me=" + "y" * 52)], VECTOR_BODY, SERVER),
        }
        for name, (headers, body, keypair) in table.items():
            with self.assertRaises(HttpCryptError, msg=name):
                httpcrypt.decrypt_request(headers, body, keypair)

    def test_inner_not_http(self) -> None:
        """A well-encrypted plaintext that is not a complete HTTP request is HttpCryptError."""
        plaintexts = (
            b"",
            b"hello",
            b"POST /checkv2 HTTP/1.0\r\nContent-Length: 9\r\n\r\nshort",
            b"CHECK RSPAMC/1.3\r\nContent-length: 1\r\n\r\nx",
            b"GET / HTTP/2.0\r\n\r\n",
        )
        for plaintext in plaintexts:
            body = cryptobox.seal(plaintext, NONCE, NM)
            with self.assertRaises(HttpCryptError, msg=plaintext):
                httpcrypt.decrypt_request([("Key", KEY)], body, SERVER)

    def test_inner_limits(self) -> None:
        """The inner body is bounded by the limits' max_message."""
        request = httpcrypt.encrypt_request(
            "POST", "/checkv2", [], b"x" * 100, SERVER.public, CLIENT
        )
        headers, body = request.headers, request.body
        self.assertRaises(
            HttpCryptError, httpcrypt.decrypt_request, headers, body, SERVER,
            limits=HttpLimits(max_message=99),
        )
        inner = httpcrypt.decrypt_request(
            headers, body, SERVER, limits=HttpLimits(max_message=100)
        )
        self.assertEqual(len(inner.body), 100)

    def test_nm_cache(self) -> None:
        """The server caches the NM key per client key."""
        cache = cryptobox.NmKeyCache(4)
        for _ in range(2):
            inner = httpcrypt.decrypt_request([("Key", KEY)], VECTOR_BODY, SERVER, nm_cache=cache)
        self.assertEqual((len(cache), inner.nm), (1, NM))

    @settings(max_examples=200, deadline=None)
    @given(
        st.sampled_from(["GET", "POST", "HEAD", "PUT"]),
        st.from_regex(r"/[a-z0-9?=&_]{0,20}", fullmatch=True),
        st.lists(
            st.tuples(st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,15}", fullmatch=True),
                      st.from_regex(r"[ -~]{0,30}", fullmatch=True).map(str.strip)),
            max_size=6,
        ),
        st.binary(max_size=300),
    )
    def test_round_trip(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> None:
        """Whatever a client encrypts, the server opens: same target, headers and body."""
        framing = ("content-length", "transfer-encoding", "connection")
        headers = [(n, v) for n, v in headers if n.lower() not in framing]
        request = httpcrypt.encrypt_request(
            method, target, headers, body, SERVER.public, host="scan"
        )
        inner = httpcrypt.decrypt_request(request.headers, request.body, SERVER)
        self.assertEqual(inner.method, "POST" if body else "GET")
        self.assertEqual((inner.target, inner.body), (target, body))
        expected = ([("Content-Length", str(len(body)))] if body else []) + headers
        self.assertEqual(list(inner.headers), expected)
        self.assertEqual(inner.nm, request.nm)

    @settings(max_examples=300, deadline=None)
    @given(st.one_of(st.just(KEY), st.text(max_size=120)), st.binary(max_size=200))
    def test_fuzz_outer(self, key: str, body: bytes) -> None:
        """Random Key values and bodies raise only HttpCryptError."""
        try:
            httpcrypt.decrypt_request([("Key", key)], body, SERVER)
        except HttpCryptError:
            pass

    @settings(max_examples=300, deadline=None)
    @given(st.one_of(st.binary(max_size=300), st.builds(
        lambda head, tail: head + tail,
        st.sampled_from(
            [b"POST /checkv2 HTTP/1.0\r\n", b"GET / HTTP/1.1\r\n", b"CHECK RSPAMC/1.3\r\n"]
        ),
        st.binary(max_size=200),
    )))
    def test_fuzz_inner(self, plaintext: bytes) -> None:
        """Any correctly encrypted plaintext either opens or raises HttpCryptError."""
        body = cryptobox.seal(plaintext, NONCE, NM)
        try:
            inner = httpcrypt.decrypt_request([("Key", KEY)], body, SERVER)
        except HttpCryptError:
            return
        self.assertLessEqual(len(inner.body), len(plaintext))


class ReplyTests(unittest.TestCase):
    """Encrypted replies: the server writes them, the client opens them."""

    def test_inner_reply_bytes(self) -> None:
        """The inner reply for /ping is the one observed from Rspamd 3.4."""
        self.assertEqual(
            httpcrypt.encode_inner_reply(200, "OK", [], b"pong\r\n", server="rspamd/3.4", date=DATE,
                                         content_type="text/plain"),
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nServer: rspamd/3.4\r\nDate: " + DATE.encode()
            + b"\r\nContent-Length: 6\r\nContent-Type: text/plain\r\n\r\npong\r\n",
        )

    def test_inner_reply_headers(self) -> None:
        """Extra headers follow the fixed ones in order; duplicates of those are dropped;
        the content type comes from the headers, else application/octet-stream."""
        table = [
            (
                [("Content-Type", "application/json"), ("Compression", "zstd"), ("Date", "x"),
                 ("Connection", "keep-alive")],
                b"Content-Type: application/json\r\nCompression: zstd\r\n",
            ),
            (
                [("Message-Offset", "10")],
                b"Content-Type: application/octet-stream\r\nMessage-Offset: 10\r\n",
            ),
        ]
        for headers, tail in table:
            inner = httpcrypt.encode_inner_reply(400, "Bad", headers, b"{}", server="s", date=DATE)
            self.assertEqual(
                inner,
                b"HTTP/1.1 400 Bad\r\nConnection: close\r\nServer: s\r\nDate: " + DATE.encode()
                + b"\r\nContent-Length: 2\r\n" + tail + b"\r\n{}",
            )

    def test_inner_reply_unwritable(self) -> None:
        """A bad status or text with CR/LF is HttpCryptError."""
        table = ((99, "OK", "s"), (1000, "OK", "s"), (200, "O\r\nK", "s"), (200, "OK", "s\n"))
        for status, reason, server in table:
            self.assertRaises(HttpCryptError, httpcrypt.encode_inner_reply, status, reason, [], b"",
                              server=server, date=DATE)

    def test_outer_reply(self) -> None:
        """The outer reply is always 200 OK octet-stream carrying nonce ‖ tag ‖ ciphertext."""
        data = httpcrypt.encrypt_reply(
            404, "Not Found", [], b"", NM, server="rspamd/3.4", date=DATE, random_bytes=fixed(NONCE)
        )
        start, body = parse_reply(data)
        self.assertEqual((start.status, start.reason), (200, "OK"))
        self.assertEqual(start.headers, (
            ("Connection", "close"), ("Server", "rspamd/3.4"), ("Date", DATE),
            ("Content-Length", str(len(body))), ("Content-Type", "application/octet-stream"),
        ))
        self.assertEqual(body[:24], NONCE)
        self.assertEqual(
            cryptobox.open_sealed(body, NM),
            httpcrypt.encode_inner_reply(404, "Not Found", [], b"", server="rspamd/3.4", date=DATE),
        )

    def test_round_trip(self) -> None:
        """The client opens the server's reply to the inner status, headers and body."""
        request = vector_request(host="scan1")
        inner = httpcrypt.decrypt_request(request.headers, request.body, SERVER)
        data = httpcrypt.encrypt_reply(
            200, "OK", [("Compression", "zstd")], b"\x28\xb5\x2f\xfd", inner.nm,
            server="rspamd/3.4", date=DATE, content_type="application/json",
        )
        start, body = parse_reply(data)
        reply = request.decrypt_reply(start.status, start.headers, body)
        self.assertEqual((reply.status, reply.reason, reply.body), (200, "OK", b"\x28\xb5\x2f\xfd"))
        self.assertEqual(reply.get("content-type"), "application/json")
        self.assertEqual(reply.get_all("Compression"), ["zstd"])

    def test_bad_nm(self) -> None:
        """encrypt_reply with an NM key of the wrong size is HttpCryptError."""
        self.assertRaises(HttpCryptError, httpcrypt.encrypt_reply, 200, "OK", [], b"", b"short",
                          server="s", date=DATE)

    def test_refused(self) -> None:
        """Replies the client cannot open are HttpCryptError, naming the outer status."""
        good = httpcrypt.encrypt_reply(200, "OK", [], b"pong", NM, server="s", date=DATE)
        _, body = parse_reply(good)
        other_nm = bytes(32)
        table = {
            "plaintext error page": (500, b"invalid command", NM),
            "empty": (200, b"", NM),
            "other key": (200, body, other_nm),
            "flipped bit": (200, body[:-1] + bytes([body[-1] ^ 0x80]), NM),
        }
        for name, (status, data, nm) in table.items():
            with self.assertRaises(HttpCryptError, msg=name) as caught:
                httpcrypt.decrypt_reply(status, [("Content-Type", "text/plain")], data, nm)
            self.assertIn(f"outer status {status}", str(caught.exception))

    def test_inner_reply_not_http(self) -> None:
        """A well-encrypted plaintext that is not an HTTP reply, or too large, is HttpCryptError."""
        for plaintext, limits in (
            (b"pong", None),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", None),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789", HttpLimits(max_message=9)),
        ):
            with self.assertRaises(HttpCryptError, msg=plaintext):
                httpcrypt.decrypt_reply(200, [], cryptobox.seal(plaintext, NONCE, NM), NM, limits)

    def test_inner_reply_until_close(self) -> None:
        """An inner reply without Content-Length takes the rest of the plaintext as body."""
        sealed = cryptobox.seal(b"HTTP/1.1 200 OK\r\n\r\nrest", NONCE, NM)
        reply = httpcrypt.decrypt_reply(200, [], sealed, NM)
        self.assertEqual(reply.body, b"rest")

    @settings(max_examples=300, deadline=None)
    @given(st.integers(min_value=0, max_value=999), st.binary(max_size=200))
    def test_fuzz_outer(self, status: int, body: bytes) -> None:
        """Random reply bodies raise only HttpCryptError."""
        try:
            httpcrypt.decrypt_reply(status, [], body, NM)
        except HttpCryptError:
            pass

    @settings(max_examples=300, deadline=None)
    @given(st.one_of(st.binary(max_size=300), st.builds(
        lambda head, tail: head + tail,
        st.sampled_from(
            [b"HTTP/1.1 200 OK\r\n", b"HTTP/1.0 100 Continue\r\n\r\n", b"HTTP/1.1 204 No\r\n"]
        ),
        st.binary(max_size=200),
    )))
    def test_fuzz_inner(self, plaintext: bytes) -> None:
        """Any correctly encrypted reply plaintext either opens or raises HttpCryptError."""
        try:
            reply = httpcrypt.decrypt_reply(200, [], cryptobox.seal(plaintext, NONCE, NM), NM)
        except HttpCryptError:
            return
        self.assertLessEqual(len(reply.body), len(plaintext))


class ClientKeysTests(unittest.TestCase):
    """The client keypair lifetime of Rspamd's HTTP context (§4.3)."""

    def keys(self, rotate_time: float = 120.0) -> tuple[Clock, httpcrypt.ClientKeys]:
        clock = Clock()
        return clock, httpcrypt.ClientKeys(clock, rotate_time=rotate_time, rng=random.Random(7))

    def test_fresh_before_first_rotation(self) -> None:
        """Until rotate_time has passed, every connection gets a fresh keypair."""
        clock, keys = self.keys()
        first = keys.keypair()
        clock.advance(119.9)
        self.assertNotEqual(keys.keypair().public_key, first.public_key)
        self.assertNotEqual(keys.keypair().public_key, keys.keypair().public_key)

    def test_shared_after_rotation(self) -> None:
        """After the jittered first rotation (120–240 s) one keypair is shared until the next."""
        clock, keys = self.keys()
        clock.advance(240.0)
        shared = keys.keypair()
        clock.advance(119.9)
        self.assertEqual(keys.keypair(), shared)
        clock.advance(120.2)
        rotated = keys.keypair()
        self.assertNotEqual(rotated.public_key, shared.public_key)
        self.assertEqual(keys.keypair(), rotated)

    def test_no_rotation(self) -> None:
        """rotate_time 0 never rotates: every connection gets a fresh keypair."""
        clock, keys = self.keys(rotate_time=0)
        clock.advance(10_000)
        self.assertNotEqual(keys.keypair().public_key, keys.keypair().public_key)

    def test_encrypt_request_uses_shared_key_and_cache(self) -> None:
        """Requests after the rotation carry the shared key and reuse its cached NM key."""
        clock, keys = self.keys()
        clock.advance(240.0)
        first = keys.encrypt_request("POST", "/checkv2", [], b"m", SERVER.public, host="scan")
        second = keys.encrypt_request("POST", "/checkv2", [], b"m", SERVER.public, host="scan")
        self.assertEqual(dict(first.headers)["Key"], dict(second.headers)["Key"])
        client_key = dict(first.headers)["Key"].split("=")[1]
        self.assertEqual(client_key, zbase32.encode(keys.keypair().public_key))
        self.assertEqual(len(keys.nm_cache), 1)
        self.assertNotEqual(first.body[:24], second.body[:24])
