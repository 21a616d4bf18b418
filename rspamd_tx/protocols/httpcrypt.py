"""HTTPCrypt: Rspamd's encrypted HTTP between clients, proxies and scanners.

Wire format (httpcrypt.md §5).  A client encrypts a whole HTTP request (the
*inner* message) under the NM key it shares with the server and sends it as the
body of a plaintext *outer* request::

    POST /post HTTP/1.1                        (HTTP/1.0 without Host when no host name)
    Connection: close
    Host: <host>
    Content-Length: <40 + inner length>
    Content-Type: application/octet-stream
    Key: <base32 server short id>=<base32 client public key>

    <nonce 24><Poly1305 tag 16><ciphertext>

The inner request is ``<METHOD> <target> HTTP/1.0``, ``Content-Length`` (and
``Content-Type`` when given) if the body is not empty, the message headers, a
blank line and the body; METHOD is ``POST`` with a body and ``GET`` without.
The server decrypts with NM(client public key, its secret) and answers with an
outer ``200 OK`` whose body is the encrypted inner reply (``HTTP/1.1 <code>
<reason>``, ``Connection``, ``Server``, ``Date``, ``Content-Length``,
``Content-Type``, the reply headers, the body) under the same NM key and a
fresh nonce.  Compression (:mod:`rspamd_tx.protocols.compression`) applies to
the inner body before encryption.

Client side: :func:`encrypt_request` gives an :class:`EncryptedRequest` (outer
request parts plus the NM key); :func:`decrypt_reply` (or
:meth:`EncryptedRequest.decrypt_reply`) gives the inner :class:`DecryptedReply`.
:class:`ClientKeys` keeps the client keypair the way Rspamd's HTTP context does.

Server side: :func:`decrypt_request` checks the ``Key`` header against the
server keypair and gives the inner :class:`DecryptedRequest`;
:func:`encrypt_reply` gives the bytes of the encrypted reply.

Pure: no I/O, randomness and clocks are injected.  Every failure is an
:class:`HttpCryptError`.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from rspamd_tx.protocols import zbase32
from rspamd_tx.protocols.cryptobox import (
    KEY_BYTES,
    MAC_BYTES,
    NONCE_BYTES,
    CryptoboxError,
    NmKeyCache,
    nm_key,
    open_sealed,
    seal,
)
from rspamd_tx.protocols.http_codec import (
    Data,
    EndOfMessage,
    Event,
    Headers,
    HttpLimits,
    HttpProtocolError,
    Request,
    RequestParser,
    Response,
    ResponseParser,
    encode_request,
    encode_response,
    header_value,
    header_values,
)
from rspamd_tx.protocols.keypair import SHORT_ID_BYTES, Keypair, KeypairError, PublicKey

__all__ = [
    "ENCRYPTED_CONTENT_TYPE",
    "KEY_HEADER",
    "OUTER_METHOD",
    "OUTER_TARGET",
    "OVERHEAD",
    "ClientKeys",
    "DecryptedReply",
    "DecryptedRequest",
    "EncryptedRequest",
    "HttpCryptError",
    "KeyHeader",
    "decrypt_reply",
    "decrypt_request",
    "encode_inner_reply",
    "encode_inner_request",
    "encrypt_reply",
    "encrypt_request",
    "is_encrypted",
    "key_header_value",
    "parse_key_header",
]

KEY_HEADER = "Key"
"""The outer header that carries the key ids."""
OUTER_METHOD = "POST"
"""Method of every outer request."""
OUTER_TARGET = "/post"
"""Target of every outer request."""
ENCRYPTED_CONTENT_TYPE = "application/octet-stream"
"""Content type of every outer message (and the inner reply's default)."""
OVERHEAD = NONCE_BYTES + MAC_BYTES
"""Bytes an encrypted body adds to the inner message: nonce and tag."""

_INNER_VERSION = "1.0"
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FORBIDDEN_VALUE = re.compile(r"[\x00\r\n]")
_FORBIDDEN_TARGET = re.compile(r"[\x00-\x20\x7f]")
#: Headers the inner request's first lines carry; callers' copies are dropped.
_INNER_REQUEST_OWN = frozenset({"content-length", "transfer-encoding"})
#: Headers the inner reply's first lines carry; callers' copies are dropped.
_INNER_REPLY_OWN = frozenset(
    {"connection", "server", "date", "content-length", "content-type", "transfer-encoding"}
)


class HttpCryptError(Exception):
    """An HTTPCrypt message that cannot be built, opened or parsed.

    Raised for a missing or malformed ``Key`` header, a key id that is not the
    server's, an unusable public key, a body too short or whose tag does not
    verify, an inner message that is not valid HTTP (or passes a bound), and
    for arguments that cannot be encoded.  Rspamd's scanner closes the
    connection without a reply on any such request.
    """


@dataclass(frozen=True)
class KeyHeader:
    """A parsed ``Key`` header.

    Attributes:
        key_id: the decoded id part (at least 5 bytes; only the first 5, the
            short id, are compared with the server's).
        public_key: the sender's 32-byte public key.
    """

    key_id: bytes
    public_key: bytes

    @property
    def short_id(self) -> bytes:
        """The first 5 bytes of :attr:`key_id`."""
        return self.key_id[:SHORT_ID_BYTES]


class _HeaderLookup:
    """Header lookups shared by the decrypted messages."""

    headers: Headers

    def get(self, name: str) -> str | None:
        """First value of header ``name`` (case-insensitive), or ``None``."""
        return header_value(self.headers, name)

    def get_all(self, name: str) -> list[str]:
        """All values of header ``name`` (case-insensitive), in wire order."""
        return header_values(self.headers, name)


@dataclass(frozen=True)
class DecryptedReply(_HeaderLookup):
    """The inner reply of an encrypted exchange.

    Attributes:
        status: the inner status code (the outer one is always 200).
        reason: the inner reason phrase (Rspamd puts error messages there).
        headers: the inner headers in wire order, ``Content-Length`` included.
        body: the inner body (still compressed if the headers say so).
    """

    status: int
    reason: str
    headers: Headers
    body: bytes


@dataclass(frozen=True)
class DecryptedRequest(_HeaderLookup):
    """The inner request of an encrypted exchange, as a server sees it.

    Attributes:
        method: the inner method (``POST`` or ``GET`` from Rspamd clients).
        target: the inner target, query string included (``/checkv2``).
        headers: the inner headers in wire order.
        body: the inner body (still compressed if the headers say so).
        peer_key: the client's public key (from the ``Key`` header).
        nm: the shared key; pass it to :func:`encrypt_reply`.
    """

    method: str
    target: str
    headers: Headers
    body: bytes
    peer_key: bytes
    nm: bytes


@dataclass(frozen=True)
class EncryptedRequest:
    """An encrypted request ready to send, with the key that opens its reply.

    Attributes:
        method: always ``POST``.
        target: always ``/post``.
        version: ``"1.1"`` when a host was given, else ``"1.0"``.
        headers: the outer headers in Rspamd's order, ``Content-Length`` included.
        body: ``nonce ‖ tag ‖ ciphertext``.
        nm: the shared key of this exchange.
    """

    method: str
    target: str
    version: str
    headers: Headers
    body: bytes
    nm: bytes

    def encode(self) -> bytes:
        """The whole outer request as bytes."""
        return encode_request(self.method, self.target, self.headers, self.body, self.version)

    def decrypt_reply(
        self,
        status: int,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        limits: HttpLimits | None = None,
    ) -> DecryptedReply:
        """:func:`decrypt_reply` with this request's NM key."""
        return decrypt_reply(status, headers, body, self.nm, limits)


class _Clock(Protocol):
    def seconds(self) -> float: ...


def _check_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    checked: list[tuple[str, str]] = []
    for name, value in headers:
        if not _TOKEN.fullmatch(name):
            raise HttpCryptError(f"invalid header name {name!r}")
        if _FORBIDDEN_VALUE.search(value):
            raise HttpCryptError(f"invalid value for header {name!r}")
        checked.append((name, value))
    return checked


def _latin1(text: str, what: str) -> bytes:
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        raise HttpCryptError(f"{what} is not ISO-8859-1 text") from None


def _header_lines(headers: Iterable[tuple[str, str]], skipped: frozenset[str]) -> bytes:
    out = bytearray()
    for name, value in _check_headers(headers):
        if name.lower() not in skipped:
            out += _latin1(f"{name}: {value}\r\n", f"header {name!r}")
    return bytes(out)


def _public_raw(key: PublicKey | bytes) -> bytes:
    raw = key.raw if isinstance(key, PublicKey) else bytes(key)
    if len(raw) != KEY_BYTES:
        raise HttpCryptError(f"public key must be {KEY_BYTES} bytes, got {len(raw)}")
    return raw


# -- Key header ----------------------------------------------------------------


def key_header_value(server_key: PublicKey | bytes, client_public: bytes) -> str:
    """``<base32 short id of server_key>=<base32 client_public>``, as Rspamd writes it."""
    server = PublicKey(_public_raw(server_key))
    return f"{zbase32.encode(server.short_id)}={zbase32.encode(_public_raw(client_public))}"


def parse_key_header(value: str) -> KeyHeader:
    """Parse a ``Key`` header value as Rspamd's server does.

    The value splits at its first ``=``; the id part must decode to at least
    5 bytes and the key part to exactly 32.  Raises :class:`HttpCryptError`
    otherwise (a value without ``=`` included).
    """
    id_text, equals, key_text = value.partition("=")
    if not equals:
        raise HttpCryptError("Key header has no '='")
    try:
        key_id = zbase32.decode(id_text)
        public_key = zbase32.decode(key_text, KEY_BYTES)
    except zbase32.Base32Error as exc:
        raise HttpCryptError(f"malformed Key header: {exc}") from None
    if len(key_id) < SHORT_ID_BYTES:
        raise HttpCryptError(f"Key header id shorter than {SHORT_ID_BYTES} bytes")
    return KeyHeader(key_id, public_key)


def is_encrypted(headers: Iterable[tuple[str, str]]) -> bool:
    """Whether a request claims to be encrypted: it has a ``Key`` header with ``=``.

    Rspamd's server treats such a request as encrypted (and fails it unless
    it can decrypt it) whenever it has a keypair; a server without one
    ignores the header.
    """
    value = header_value(headers, KEY_HEADER)
    return value is not None and "=" in value


# -- client side ----------------------------------------------------------------


def encode_inner_request(
    method: str,
    target: str,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    content_type: str | None = None,
) -> bytes:
    """The plaintext Rspamd's client encrypts for a request.

    ``<METHOD> <target> HTTP/1.0``, then ``Content-Length`` and
    ``Content-Type`` (when given) if ``body`` is not empty, then ``headers``
    in order (without ``Content-Length``/``Transfer-Encoding``), a blank line
    and ``body``.  METHOD is ``POST`` for a non-empty body and ``GET``
    otherwise, whatever ``method`` says (Rspamd overrides it too); ``method``
    is only checked.  Raises :class:`HttpCryptError` for a method, target,
    content type or header that cannot be written.
    """
    if not _TOKEN.fullmatch(method):
        raise HttpCryptError(f"invalid method {method!r}")
    if not target or _FORBIDDEN_TARGET.search(target):
        raise HttpCryptError(f"invalid target {target!r}")
    inner_method = "POST" if body else "GET"
    out = bytearray(_latin1(f"{inner_method} {target} HTTP/{_INNER_VERSION}\r\n", "target"))
    if body:
        out += f"Content-Length: {len(body)}\r\n".encode("ascii")
        if content_type is not None:
            if _FORBIDDEN_VALUE.search(content_type):
                raise HttpCryptError(f"invalid content type {content_type!r}")
            out += _latin1(f"Content-Type: {content_type}\r\n", "content type")
    own = _INNER_REQUEST_OWN | {"content-type"} if content_type is not None else _INNER_REQUEST_OWN
    out += _header_lines(headers, own)
    out += b"\r\n"
    out += body
    return bytes(out)


def encrypt_request(
    method: str,
    target: str,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    server_key: PublicKey | bytes,
    client_keypair: Keypair | None = None,
    *,
    host: str | None = None,
    content_type: str | None = None,
    keep_alive: bool = False,
    nm_cache: NmKeyCache | None = None,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> EncryptedRequest:
    """Encrypt a request to the server whose public key is ``server_key``.

    Args:
        method, target, headers, body, content_type: the inner request (see
            :func:`encode_inner_request`).
        server_key: the server's public key (``key`` of an ``upstream`` block).
        client_keypair: the client keypair; ``None`` makes a fresh one for
            this request (see :class:`ClientKeys` for Rspamd's rotation).
        host: the outer ``Host`` (Rspamd sends the upstream's name); without
            it the outer request is HTTP/1.0 without ``Host``, like ``rspamc``.
        keep_alive: outer ``Connection: keep-alive`` instead of ``close``.
        nm_cache: where to look up and keep the NM key.
        random_bytes: the source of the nonce (and of a fresh keypair).

    Returns the outer request (``POST /post`` with ``Content-Length``,
    ``Content-Type: application/octet-stream`` and ``Key``) and the NM key
    that opens the reply.  Raises :class:`HttpCryptError` for an unusable
    server key or inner request parts that cannot be written.
    """
    server_raw = _public_raw(server_key)
    if host is not None:
        if not host.isprintable():
            raise HttpCryptError(f"invalid host {host!r}")
        _latin1(host, "host")
    keypair = client_keypair
    if keypair is None:
        try:
            keypair = Keypair.generate(random_bytes)
        except (KeypairError, CryptoboxError) as exc:
            raise HttpCryptError(f"cannot make a client keypair: {exc}") from None
    try:
        if nm_cache is not None:
            nm = nm_cache.get(server_raw, keypair.secret_key)
        else:
            nm = nm_key(server_raw, keypair.secret_key)
    except CryptoboxError as exc:
        raise HttpCryptError(f"unusable server key: {exc}") from None
    inner = encode_inner_request(method, target, headers, body, content_type)
    nonce = random_bytes(NONCE_BYTES)
    if len(nonce) != NONCE_BYTES:
        raise HttpCryptError(f"random source gave {len(nonce)} bytes, need {NONCE_BYTES}")
    sealed = seal(inner, nonce, nm)
    connection = "keep-alive" if keep_alive else "close"
    length = str(len(sealed))
    key = key_header_value(server_raw, keypair.public_key)
    outer: Headers
    if host is not None:
        outer = (
            ("Connection", connection),
            ("Host", host),
            ("Content-Length", length),
            ("Content-Type", ENCRYPTED_CONTENT_TYPE),
            (KEY_HEADER, key),
        )
        version = "1.1"
    else:
        outer = (
            ("Content-Length", length),
            ("Content-Type", ENCRYPTED_CONTENT_TYPE),
            ("Connection", connection),
            (KEY_HEADER, key),
        )
        version = "1.0"
    return EncryptedRequest(OUTER_METHOD, OUTER_TARGET, version, outer, sealed, nm)


def _open(body: bytes, nm: bytes, what: str) -> bytes:
    if len(body) < OVERHEAD:
        raise HttpCryptError(f"encrypted {what} shorter than {OVERHEAD} bytes")
    try:
        return open_sealed(body, nm)
    except CryptoboxError as exc:
        raise HttpCryptError(f"cannot decrypt {what}: {exc}") from None


def _collect(events: list[Event]) -> tuple[Request | Response, bytes]:
    """The first complete message in parser events: its start and body."""
    start: Request | Response | None = None
    body = bytearray()
    for event in events:
        if isinstance(event, (Request, Response)):
            start = event
        elif isinstance(event, Data):
            body += event.chunk
        elif isinstance(event, EndOfMessage):
            assert start is not None
            return start, bytes(body)
    raise HttpCryptError("incomplete inner message")


def decrypt_reply(
    status: int,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    nm: bytes,
    limits: HttpLimits | None = None,
) -> DecryptedReply:
    """Open the reply to an encrypted request and parse the inner reply.

    ``status`` and ``headers`` are the outer reply's (``200`` and
    ``application/octet-stream`` from Rspamd; like Rspamd's client, the body
    is decrypted whatever they say); ``body`` is ``nonce ‖ tag ‖
    ciphertext``; ``nm`` is :attr:`EncryptedRequest.nm`.  ``limits`` bound
    the inner reply (its body by ``max_message``).

    Raises :class:`HttpCryptError` when the body is too short, the tag does
    not verify (a plaintext error page, a reply under another key, tampering)
    or the plaintext is not a complete HTTP reply within ``limits``.
    """
    try:
        plaintext = _open(body, nm, "reply")
    except HttpCryptError as exc:
        outer = header_value(list(headers), "Content-Type")
        raise HttpCryptError(f"{exc} (outer status {status}, content type {outer})") from None
    parser = ResponseParser(limits)
    try:
        events = parser.feed(plaintext)
        events += parser.feed_eof()
    except HttpProtocolError as exc:
        raise HttpCryptError(f"invalid inner reply: {exc.reason}") from None
    start, inner_body = _collect(events)
    assert isinstance(start, Response)
    return DecryptedReply(start.status, start.reason, start.headers, inner_body)


# -- server side ----------------------------------------------------------------


def decrypt_request(
    headers: Iterable[tuple[str, str]],
    body: bytes,
    server_keypair: Keypair,
    *,
    nm_cache: NmKeyCache | None = None,
    limits: HttpLimits | None = None,
) -> DecryptedRequest:
    """Open an encrypted request addressed to ``server_keypair``.

    ``headers`` are the outer request's (only ``Key`` matters: the outer
    method, target and other headers are discarded, as Rspamd does); ``body``
    is the outer body.  The inner request is parsed with ``limits`` (its body
    bounded by ``max_message``); bytes after it are ignored.

    Raises :class:`HttpCryptError` for a missing or malformed ``Key``, a short
    id that is not the server's, an unusable client key, a short or forged
    body, or an inner request that is not complete valid HTTP.
    """
    value = header_value(list(headers), KEY_HEADER)
    if value is None:
        raise HttpCryptError("no Key header")
    key = parse_key_header(value)
    if key.short_id != server_keypair.short_id:
        raise HttpCryptError("Key header names another server key")
    try:
        if nm_cache is not None:
            nm = nm_cache.get(key.public_key, server_keypair.secret_key)
        else:
            nm = nm_key(key.public_key, server_keypair.secret_key)
    except CryptoboxError as exc:
        raise HttpCryptError(f"unusable client key: {exc}") from None
    plaintext = _open(body, nm, "request")
    parser = RequestParser(limits)
    try:
        events = parser.feed(plaintext)
        events += parser.feed_eof()
    except HttpProtocolError as exc:
        raise HttpCryptError(f"invalid inner request: {exc.reason}") from None
    start, inner_body = _collect(events)
    assert isinstance(start, Request)
    if start.legacy is not None:
        raise HttpCryptError("legacy request inside an encrypted request")
    return DecryptedRequest(
        start.method, start.target, start.headers, inner_body, key.public_key, nm
    )


def encode_inner_reply(
    status: int,
    reason: str,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    *,
    server: str,
    date: str,
    content_type: str | None = None,
) -> bytes:
    """The plaintext Rspamd's server encrypts for a reply.

    ``HTTP/1.1 <status> <reason>``, ``Connection: close``, ``Server``,
    ``Date``, ``Content-Length``, ``Content-Type``, then ``headers`` in order
    (without the ones already written), a blank line and ``body``.  The
    content type is ``content_type``, else the ``Content-Type`` in
    ``headers``, else ``application/octet-stream``.  Raises
    :class:`HttpCryptError` for a status outside 100–999 or text that cannot
    be written.
    """
    if not 100 <= status <= 999:
        raise HttpCryptError(f"invalid status {status}")
    checked = _check_headers(headers)
    if content_type is None:
        content_type = header_value(checked, "Content-Type") or ENCRYPTED_CONTENT_TYPE
    texts = (("reason", reason), ("server", server), ("date", date), ("content type", content_type))
    for name, text in texts:
        if _FORBIDDEN_VALUE.search(text):
            raise HttpCryptError(f"invalid {name} {text!r}")
    start = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Connection: close\r\n"
        f"Server: {server}\r\n"
        f"Date: {date}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Content-Type: {content_type}\r\n"
    )
    return _latin1(start, "reply start") + _header_lines(checked, _INNER_REPLY_OWN) + b"\r\n" + body


def encrypt_reply(
    status: int,
    reason: str,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    nm: bytes,
    *,
    server: str,
    date: str,
    content_type: str | None = None,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> bytes:
    """The bytes of an encrypted reply, as Rspamd's server writes it.

    The inner reply is :func:`encode_inner_reply`; the outer one is
    ``HTTP/1.1 200 OK`` with ``Connection: close``, ``Server``, ``Date``,
    ``Content-Length`` and ``Content-Type: application/octet-stream``.
    ``nm`` is :attr:`DecryptedRequest.nm`; ``server`` is the ``Server``
    value (``rspamd/3.4``); ``date`` an RFC 1123 date from the caller's clock.
    Raises :class:`HttpCryptError` like :func:`encode_inner_reply` or for an
    NM key of the wrong size.
    """
    inner = encode_inner_reply(
        status, reason, headers, body, server=server, date=date, content_type=content_type
    )
    nonce = random_bytes(NONCE_BYTES)
    try:
        sealed = seal(inner, nonce, nm)
    except CryptoboxError as exc:
        raise HttpCryptError(f"cannot encrypt reply: {exc}") from None
    outer = (
        ("Connection", "close"),
        ("Server", server),
        ("Date", date),
        ("Content-Length", str(len(sealed))),
        ("Content-Type", ENCRYPTED_CONTENT_TYPE),
    )
    return encode_response(200, "OK", outer, sealed)


# -- client keypair lifetime ------------------------------------------------------


class ClientKeys:
    """The client keypair of an HTTP client, kept like Rspamd's HTTP context.

    Until the first rotation (``rotate_time`` plus a random ``0..rotate_time``
    seconds after creation) every :meth:`keypair` call gives a fresh keypair;
    from then on one shared keypair is used and replaced after each further
    jittered ``rotate_time``.  ``rotate_time <= 0`` never rotates: every call
    gives a fresh keypair.  NM keys are cached (``cache_size`` entries).

    Args:
        clock: anything with ``seconds()`` (an ``IReactorTime``).
        rotate_time: ``http { client { rotate_time } }``, seconds (120).
        cache_size: ``http { client { cache_size } }`` (1024).
        rng: source of the jitter.
        random_bytes: source of key material.
    """

    def __init__(
        self,
        clock: _Clock,
        rotate_time: float = 120.0,
        cache_size: int = 1024,
        rng: random.Random | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.clock = clock
        self.rotate_time = rotate_time
        self.rng = rng if rng is not None else random.Random()
        self.random_bytes = random_bytes
        self.nm_cache = NmKeyCache(cache_size)
        self._shared: Keypair | None = None
        self._next_rotation: float | None = (
            clock.seconds() + self._jittered() if rotate_time > 0 else None
        )

    def _jittered(self) -> float:
        return self.rotate_time + self.rng.random() * self.rotate_time

    def keypair(self) -> Keypair:
        """The keypair to use for the next connection."""
        if self._next_rotation is not None:
            now = self.clock.seconds()
            if now >= self._next_rotation:
                self._shared = Keypair.generate(self.random_bytes)
                self._next_rotation = now + self._jittered()
        if self._shared is not None:
            return self._shared
        return Keypair.generate(self.random_bytes)

    def encrypt_request(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        server_key: PublicKey | bytes,
        *,
        host: str | None = None,
        content_type: str | None = None,
        keep_alive: bool = False,
    ) -> EncryptedRequest:
        """:func:`encrypt_request` with :meth:`keypair` and the NM cache."""
        return encrypt_request(
            method,
            target,
            headers,
            body,
            server_key,
            self.keypair(),
            host=host,
            content_type=content_type,
            keep_alive=keep_alive,
            nm_cache=self.nm_cache,
            random_bytes=self.random_bytes,
        )
