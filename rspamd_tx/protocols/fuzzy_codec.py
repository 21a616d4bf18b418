"""Rspamd fuzzy storage wire protocol: requests, replies, encryption, TCP framing.

Pure codec (no I/O, no clock).  All integers are little-endian, structures are
packed; layouts follow Rspamd's ``src/libserver/fuzzy_wire.h``:

* command (76 bytes): ``version u8, cmd u8, shingles_count u8, flag u8,
  value i32, tag u32, digest[64]``;
* optional shingle block (256 bytes, 32 × u64) when ``shingles_count`` ≠ 0;
* extensions (versions 4+): ``'d' len domain``, ``'4' ipv4[4]``,
  ``'6' ipv6[16]``, ``0x80 4 facts[4]``, any type ≥ ``0x80`` with a length byte;
* encrypted request: ``"rsfe" key_id[8] client_pk[32] nonce[24] mac[16]``
  followed by the encrypted command (see :mod:`rspamd_tx.protocols.cryptobox`);
* reply: v1 (16 bytes: ``value i32, flag u32, tag u32, prob f32``), epoch 11
  (96 bytes: v1, digest[64], ts u32, reserved[12]) or epoch 12 (144 bytes:
  v1, digest, ts, ``n_extra`` u8, reserved[3], 7 × ``{value i32, flag u32}``);
  encrypted replies are ``nonce[24] mac[16]`` + encrypted body.

The server side is :func:`decode_request` and :func:`encode_reply`; the client
side (what Rspamd's ``fuzzy_check`` does) is :func:`encode_request` and
:func:`decode_reply`.  TCP transport (Rspamd 3.14+) frames each payload with a
u16 little-endian length: :func:`encode_frame` and :class:`FuzzyStreamDecoder`.

Every decoding failure raises :class:`FuzzyProtocolError` and nothing else.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from rspamd_tx.protocols.cryptobox import (
    KEY_BYTES,
    MAC_BYTES,
    NONCE_BYTES,
    CryptoboxError,
    NmKeyCache,
    decrypt_nm,
    encrypt_nm,
)
from rspamd_tx.protocols.keypair import FUZZY_KEY_ID_BYTES, Keypair

__all__ = [
    "COMMAND_SIZE",
    "DIGEST_SIZE",
    "ENCRYPTED_MAGIC",
    "ENCRYPTED_REPLY_HEADER_SIZE",
    "ENCRYPTED_REQUEST_HEADER_SIZE",
    "MAX_EXTRA_FLAGS",
    "MAX_FRAME_LENGTH",
    "REPLY_SIZES",
    "SHINGLE_BLOCK_SIZE",
    "SHINGLE_COUNT",
    "ClientEncryption",
    "Command",
    "Epoch",
    "Extension",
    "FuzzyCommand",
    "FuzzyProtocolError",
    "FuzzyReply",
    "FuzzyRequest",
    "FuzzyStreamDecoder",
    "KeyLookup",
    "ReplyCode",
    "RequestEncryption",
    "SenderFacts",
    "SourceDomain",
    "SourceIPv4",
    "SourceIPv6",
    "UnknownExtension",
    "VERSION_CAPABILITY_V2",
    "VERSION_MASK",
    "decode_command",
    "decode_reply",
    "decode_request",
    "encode_command",
    "encode_frame",
    "encode_reply",
    "encode_reply_body",
    "encode_reply_values",
    "encode_request",
    "epoch_for_version",
    "is_encrypted",
]

DIGEST_SIZE = 64
"""Every digest is a 64-byte BLAKE2b-512 value."""
SHINGLE_COUNT = 32
"""A shingle block holds 32 u64 hashes."""
COMMAND_SIZE = 76
"""Size of the fixed command (``struct rspamd_fuzzy_cmd``)."""
SHINGLE_BLOCK_SIZE = SHINGLE_COUNT * 8
"""Size of the shingle block that follows the command when ``shingles_count`` ≠ 0."""
ENCRYPTED_MAGIC = b"rsfe"
"""First four bytes of an encrypted request."""
ENCRYPTED_REQUEST_HEADER_SIZE = 4 + FUZZY_KEY_ID_BYTES + KEY_BYTES + NONCE_BYTES + MAC_BYTES
"""84 bytes: magic, key id, client public key, nonce, MAC."""
ENCRYPTED_REPLY_HEADER_SIZE = NONCE_BYTES + MAC_BYTES
"""40 bytes: nonce and MAC."""
MAX_EXTRA_FLAGS = 7
"""Extra (value, flag) slots of an epoch 12 reply."""
MAX_FRAME_LENGTH = 8192
"""Largest TCP frame payload Rspamd accepts."""

VERSION_MASK = 0x0F
"""Low nibble of the version byte is the protocol version (Rspamd 3.6+)."""
VERSION_CAPABILITY_V2 = 0x10
"""Version bit set by 4.x clients that understand epoch 12 replies."""

_COMMAND = struct.Struct("<BBBBiI64s")
_SHINGLES = struct.Struct(f"<{SHINGLE_COUNT}Q")
_REPLY_V1 = struct.Struct("<iIIf")
_REPLY_TAIL = struct.Struct("<64sI")
_EXTRA_FLAG = struct.Struct("<iI")
_REPLY_EPOCH11 = struct.Struct("<iIIf64sIB11x")
_REPLY_EPOCH12_PLAIN = struct.Struct("<iIIf64sI60x")
"""An epoch 12 reply without extra flags or matched-digest marker."""
_F32 = struct.Struct("<f")
_COMMON_PROBS = frozenset((0.0, 1.0))
"""Probabilities known to fit a float32 (exact hits, misses, acknowledgements)."""

_U8 = 0xFF
_U32 = 0xFFFFFFFF
_I32_MIN = -(2**31)
_I32_MAX = 2**31 - 1
_U64 = 2**64 - 1

_EXT_DOMAIN = 0x64  # 'd'
_EXT_IPV4 = 0x34  # '4'
_EXT_IPV6 = 0x36  # '6'
_EXT_SENDER_FACTS = 0x80
_EXT_SKIPPABLE_MIN = 0x80


class FuzzyProtocolError(ValueError):
    """A datagram, frame or message that is not valid fuzzy protocol.

    The one error type every decoder in this module raises; messages given to
    the encoders with out-of-range fields raise it as well.
    """


class Command(enum.IntEnum):
    """Command codes (``cmd`` byte)."""

    CHECK = 0
    WRITE = 1
    DEL = 2
    STAT = 3
    PING = 4
    """Rspamd 3.8+ only; 3.4 storages queue it as an update."""
    REFRESH = 100
    """Internal: extend a hash's lifetime (never sent by clients)."""
    DUP = 101
    """Internal: a duplicate in the update queue (never sent by clients)."""


_COMMANDS: dict[int, Command] = {int(command): command for command in Command}


class Epoch(enum.IntEnum):
    """Protocol epoch: decides the reply layout."""

    EPOCH10 = 10
    """Version 3: exact-length requests, 16-byte replies."""
    EPOCH11 = 11
    """Version 4: extensions allowed, 96-byte replies."""
    EPOCH12 = 12
    """Rspamd 4.x multi-flag: 144-byte replies."""


REPLY_SIZES: dict[Epoch, int] = {Epoch.EPOCH10: 16, Epoch.EPOCH11: 96, Epoch.EPOCH12: 144}
"""Plain reply body size per epoch; encrypted replies add 40 bytes."""
_EPOCH_BY_REPLY_SIZE = {size: epoch for epoch, size in REPLY_SIZES.items()}


class ReplyCode(enum.IntEnum):
    """``value`` of a reply whose ``prob`` is ≤ 0.5."""

    OK = 0
    """Miss, or nothing to report."""
    SKIPPED = 401
    """Digest is in ``skip_hashes``."""
    FORBIDDEN = 403
    """Rate-limited CHECK; before 3.10 also write refused / encryption required."""
    ENCRYPTION_REQUIRED = 415
    """3.10+: plaintext refused by ``encrypted_only``."""
    INTERNAL_ERROR = 500
    """Invalid command."""
    NOT_ALLOWED = 503
    """3.10+: write/delete not permitted, key expired, blocked source."""


def epoch_for_version(version: int, multi_flag: bool = False) -> Epoch:
    """The epoch a request with this version byte is answered in.

    The low nibble selects the version (3 → epoch 10; 4 and 5 → epoch 11).
    With ``multi_flag`` (a server offering Rspamd 4.x v2 replies) version 5 or
    the capability bit ``0x10`` selects epoch 12.  Raises
    :class:`FuzzyProtocolError` for any other version.
    """
    low = version & VERSION_MASK
    if low == 3:
        return Epoch.EPOCH10
    if low in (4, 5):
        if multi_flag and (low == 5 or version & VERSION_CAPABILITY_V2):
            return Epoch.EPOCH12
        return Epoch.EPOCH11
    raise FuzzyProtocolError(f"unsupported protocol version {version:#04x}")


def _epochs(multi_flag: bool) -> dict[int, Epoch]:
    """:func:`epoch_for_version` of every valid version byte."""
    return {version: epoch_for_version(version, multi_flag)
            for version in range(_U8 + 1) if version & VERSION_MASK in (3, 4, 5)}


_EPOCHS = _epochs(False)
_EPOCHS_MULTI_FLAG = _epochs(True)


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise FuzzyProtocolError(f"{name} {value} out of range [{low}, {high}]")


# --- extensions -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SourceDomain:
    """Extension ``'d'``: the MIME From domain (≤ 255 bytes; clients send ≤ 64)."""

    TYPE: ClassVar[int] = _EXT_DOMAIN
    domain: bytes

    def __post_init__(self) -> None:
        if len(self.domain) > _U8:
            raise FuzzyProtocolError("source domain longer than 255 bytes")

    def encode(self) -> bytes:
        """Wire form: type, length, domain."""
        return bytes((self.TYPE, len(self.domain))) + self.domain


@dataclass(frozen=True, slots=True)
class SourceIPv4:
    """Extension ``'4'``: the sender's IPv4 address."""

    TYPE: ClassVar[int] = _EXT_IPV4
    address: ipaddress.IPv4Address

    def encode(self) -> bytes:
        """Wire form: type, 4 address bytes in network order."""
        return bytes((self.TYPE,)) + self.address.packed


@dataclass(frozen=True, slots=True)
class SourceIPv6:
    """Extension ``'6'``: the sender's IPv6 address."""

    TYPE: ClassVar[int] = _EXT_IPV6
    address: ipaddress.IPv6Address

    def encode(self) -> bytes:
        """Wire form: type, 16 address bytes in network order."""
        return bytes((self.TYPE,)) + self.address.packed


@dataclass(frozen=True, slots=True)
class SenderFacts:
    """Extension ``0x80`` (Rspamd 4.1.5+): a big-endian u32 bit field of sender facts."""

    TYPE: ClassVar[int] = _EXT_SENDER_FACTS
    bits: int

    def __post_init__(self) -> None:
        _check_range("sender facts", self.bits, 0, _U32)

    def encode(self) -> bytes:
        """Wire form: type, length 4, big-endian bits."""
        return bytes((self.TYPE, 4)) + self.bits.to_bytes(4, "big")


@dataclass(frozen=True, slots=True)
class UnknownExtension:
    """An extension type ≥ ``0x80`` this codec does not interpret (skipped by length)."""

    type: int
    payload: bytes

    def __post_init__(self) -> None:
        _check_range("skippable extension type", self.type, _EXT_SKIPPABLE_MIN + 1, _U8)
        if len(self.payload) > _U8:
            raise FuzzyProtocolError("extension payload longer than 255 bytes")

    def encode(self) -> bytes:
        """Wire form: type, length, payload."""
        return bytes((self.type, len(self.payload))) + self.payload


Extension = SourceDomain | SourceIPv4 | SourceIPv6 | SenderFacts | UnknownExtension
"""Any request extension."""


def _decode_extensions(data: bytes) -> tuple[Extension, ...]:
    """Parse the extensions area; any truncation or unknown legacy type is an error."""
    extensions: list[Extension] = []
    position = 0
    end = len(data)
    while position < end:
        kind = data[position]
        position += 1
        if kind == _EXT_IPV4:
            length = 4
        elif kind == _EXT_IPV6:
            length = 16
        elif kind == _EXT_DOMAIN or kind >= _EXT_SKIPPABLE_MIN:
            if position >= end:
                raise FuzzyProtocolError(f"extension {kind:#04x} has no length byte")
            length = data[position]
            position += 1
            if kind == _EXT_SENDER_FACTS and length != 4:
                raise FuzzyProtocolError(f"sender facts extension of length {length}")
        else:
            raise FuzzyProtocolError(f"unknown extension type {kind:#04x}")
        if length > end - position:
            raise FuzzyProtocolError(f"extension {kind:#04x} truncated")
        payload = data[position : position + length]
        position += length
        if kind == _EXT_IPV4:
            extensions.append(SourceIPv4(ipaddress.IPv4Address(payload)))
        elif kind == _EXT_IPV6:
            extensions.append(SourceIPv6(ipaddress.IPv6Address(payload)))
        elif kind == _EXT_DOMAIN:
            extensions.append(SourceDomain(payload))
        elif kind == _EXT_SENDER_FACTS:
            extensions.append(SenderFacts(int.from_bytes(payload, "big")))
        else:
            extensions.append(UnknownExtension(kind, payload))
    return tuple(extensions)


# --- commands ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FuzzyCommand:
    """One fuzzy command as carried in a (decrypted) request.

    Attributes:
        version: the raw version byte (3, 4, 5, ``0x14``…).
        command: command code; a :class:`Command` when known, else the raw int.
        flag: list/flag number (u8) for WRITE/DEL.
        value: weight for WRITE, timestamp for PING, else 0 (i32).
        tag: request id echoed in the reply (u32).
        digest: 64-byte digest.
        shingles: the 32 shingle hashes, or ``()`` when no block is sent.
        shingles_count: the raw ``shingles_count`` byte; non-zero exactly
            when ``shingles`` is given.  Left as ``None`` it becomes 32 with
            shingles (what clients send) and 0 without.
        extensions: extensions in wire order (versions 4+ only).
    """

    version: int
    command: int
    tag: int
    digest: bytes
    flag: int = 0
    value: int = 0
    shingles: tuple[int, ...] = ()
    shingles_count: int | None = None
    extensions: tuple[Extension, ...] = ()

    def __post_init__(self) -> None:
        if not (0 <= self.version <= _U8 and 0 <= self.command <= _U8 and 0 <= self.flag <= _U8
                and _I32_MIN <= self.value <= _I32_MAX and 0 <= self.tag <= _U32):
            _check_range("version", self.version, 0, _U8)
            _check_range("command", self.command, 0, _U8)
            _check_range("flag", self.flag, 0, _U8)
            _check_range("value", self.value, _I32_MIN, _I32_MAX)
            _check_range("tag", self.tag, 0, _U32)
        if len(self.digest) != DIGEST_SIZE:
            raise FuzzyProtocolError(f"digest must be {DIGEST_SIZE} bytes")
        if self.shingles:
            if len(self.shingles) != SHINGLE_COUNT:
                raise FuzzyProtocolError(f"a shingle block has exactly {SHINGLE_COUNT} hashes")
            if not (0 <= min(self.shingles) and max(self.shingles) <= _U64):
                for shingle in self.shingles:
                    _check_range("shingle", shingle, 0, _U64)
        count = self.shingles_count
        if count is None:
            count = SHINGLE_COUNT if self.shingles else 0
            object.__setattr__(self, "shingles_count", count)
        _check_range("shingles_count", count, 0, _U8)
        if bool(count) != bool(self.shingles):
            raise FuzzyProtocolError("shingles_count and the shingle block disagree")
        if not isinstance(self.command, Command):
            known = _COMMANDS.get(self.command)
            if known is not None:  # an unknown code stays a plain int
                object.__setattr__(self, "command", known)


def encode_command(command: FuzzyCommand) -> bytes:
    """Plaintext wire form: command, shingle block if any, extensions."""
    parts = [
        _COMMAND.pack(
            command.version,
            command.command,
            command.shingles_count or 0,
            command.flag,
            command.value,
            command.tag,
            command.digest,
        )
    ]
    if command.shingles:
        parts.append(_SHINGLES.pack(*command.shingles))
    parts.extend(extension.encode() for extension in command.extensions)
    return b"".join(parts)


def decode_command(payload: bytes, multi_flag: bool = False) -> tuple[FuzzyCommand, Epoch]:
    """Parse a plaintext (or decrypted) command and the epoch to answer it in.

    Length rules: version 3 must be exactly 76 bytes (332 with shingles);
    versions 4/5 at least that, the rest being extensions.  Raises
    :class:`FuzzyProtocolError`.
    """
    size = len(payload)
    if size < COMMAND_SIZE:
        raise FuzzyProtocolError(f"command of {size} bytes is truncated")
    version, code, shingles_count, flag, value, tag, digest = _COMMAND.unpack_from(payload)
    epoch = (_EPOCHS_MULTI_FLAG if multi_flag else _EPOCHS).get(version)
    if epoch is None:
        epoch = epoch_for_version(version, multi_flag)  # raises for this version
    shingles: tuple[int, ...] = ()
    fixed = COMMAND_SIZE
    if shingles_count:
        fixed += SHINGLE_BLOCK_SIZE
        if size < fixed:
            raise FuzzyProtocolError(f"shingle command of {size} bytes is truncated")
        shingles = _SHINGLES.unpack_from(payload, COMMAND_SIZE)
    extensions: tuple[Extension, ...] = ()
    if size > fixed:
        if epoch is Epoch.EPOCH10:
            raise FuzzyProtocolError(f"version 3 command must be exactly {fixed} bytes")
        extensions = _decode_extensions(payload[fixed:])
    command = _new_command(version, _COMMANDS.get(code, code), tag, digest, flag, value,
                           shingles, shingles_count, extensions)
    return command, epoch


_new_object = object.__new__
_COMMAND_SLOTS = vars(FuzzyCommand)  # the slot descriptors of the fields
_set_version = _COMMAND_SLOTS["version"].__set__
_set_command = _COMMAND_SLOTS["command"].__set__
_set_tag = _COMMAND_SLOTS["tag"].__set__
_set_digest = _COMMAND_SLOTS["digest"].__set__
_set_flag = _COMMAND_SLOTS["flag"].__set__
_set_value = _COMMAND_SLOTS["value"].__set__
_set_shingles = _COMMAND_SLOTS["shingles"].__set__
_set_shingles_count = _COMMAND_SLOTS["shingles_count"].__set__
_set_extensions = _COMMAND_SLOTS["extensions"].__set__


def _new_command(version: int, command: int, tag: int, digest: bytes, flag: int, value: int,
                 shingles: tuple[int, ...], shingles_count: int,
                 extensions: tuple[Extension, ...]) -> FuzzyCommand:
    """A :class:`FuzzyCommand` from fields that are valid by construction.

    For :func:`decode_command` only: the struct formats already bound every
    field to its range, the shingle block is present exactly when
    ``shingles_count`` is non-zero and ``command`` is already a
    :class:`Command` when known, so ``__post_init__`` would check nothing new.
    """
    result: FuzzyCommand = _new_object(FuzzyCommand)
    _set_version(result, version)
    _set_command(result, command)
    _set_tag(result, tag)
    _set_digest(result, digest)
    _set_flag(result, flag)
    _set_value(result, value)
    _set_shingles(result, shingles)
    _set_shingles_count(result, shingles_count)
    _set_extensions(result, extensions)
    return result


# --- requests ---------------------------------------------------------------


KeyLookup = Callable[[bytes], Keypair | None]
"""``key_for(key_id)``: the server keypair for an 8-byte key id.

Rspamd falls back to its default key (the last configured one) for unknown ids,
so a server's lookup should do the same; ``None`` means no keypair at all and
the encrypted request is dropped.
"""


@dataclass(frozen=True, slots=True)
class RequestEncryption:
    """How an encrypted request was protected, and what is needed to answer it.

    Attributes:
        key_id: the 8-byte key id the client sent (may name an unknown key).
        client_public: the client's 32-byte public key.
        keypair: the server keypair that decrypted the request.
        nm: the shared key; replies are encrypted with it.
    """

    key_id: bytes
    client_public: bytes
    keypair: Keypair
    nm: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class FuzzyRequest:
    """A decoded request.

    Attributes:
        command: the command with its shingles and extensions.
        epoch: the epoch the reply must use (decides its size).
        encryption: set when the request was encrypted.
    """

    command: FuzzyCommand
    epoch: Epoch
    encryption: RequestEncryption | None = None

    @property
    def encrypted(self) -> bool:
        """Whether the request was encrypted (and the reply must be)."""
        return self.encryption is not None

    @property
    def nm(self) -> bytes | None:
        """The shared key for the encrypted reply, if encrypted."""
        return None if self.encryption is None else self.encryption.nm


_ENCRYPTED_MIN = ENCRYPTED_REQUEST_HEADER_SIZE + COMMAND_SIZE


def is_encrypted(datagram: bytes) -> bool:
    """Rspamd's detection: at least 160 bytes starting with ``rsfe``."""
    return len(datagram) >= _ENCRYPTED_MIN and datagram[:4] == ENCRYPTED_MAGIC


def decode_request(
    datagram: bytes,
    key_for: KeyLookup | None = None,
    nm_cache: NmKeyCache | None = None,
    multi_flag: bool = False,
) -> FuzzyRequest:
    """Decode one request datagram (or TCP frame payload), decrypting it if needed.

    ``key_for`` selects the server keypair by the request's 8-byte key id
    (see :data:`KeyLookup`); without it encrypted requests are refused.
    ``nm_cache`` avoids repeating X25519 for recurring clients.
    ``multi_flag`` lets version 5 / bit ``0x10`` requests be answered with
    144-byte epoch 12 replies.

    Raises :class:`FuzzyProtocolError` for anything Rspamd would drop without
    a reply: truncation, bad version or length, bad extensions, no key, bad
    public key, MAC failure.
    """
    data = bytes(datagram)
    size = len(data)
    if size < COMMAND_SIZE:
        raise FuzzyProtocolError(f"request of {size} bytes is truncated")
    if size < _ENCRYPTED_MIN or data[:4] != ENCRYPTED_MAGIC:  # is_encrypted(), inlined
        command, epoch = decode_command(data, multi_flag)
        return FuzzyRequest(command, epoch)
    key_id = data[4:12]
    client_public = data[12:44]
    nonce = data[44:68]
    mac = data[68:84]
    keypair = key_for(key_id) if key_for is not None else None
    if keypair is None:
        raise FuzzyProtocolError("encrypted request but no keypair is configured")
    try:
        if nm_cache is not None:
            nm = nm_cache.get(client_public, keypair.secret_key)
        else:
            nm = keypair.nm(client_public)
        payload = decrypt_nm(data[ENCRYPTED_REQUEST_HEADER_SIZE:], nonce, mac, nm)
    except CryptoboxError as exc:
        raise FuzzyProtocolError(f"cannot decrypt request: {exc}") from None
    command, epoch = decode_command(payload, multi_flag)
    return FuzzyRequest(command, epoch, RequestEncryption(key_id, client_public, keypair, nm))


@dataclass(frozen=True, slots=True)
class ClientEncryption:
    """Client side of encryption: the storage's public key and our keypair.

    Attributes:
        server_public: the storage's raw public key (rule ``encryption_key``).
        client: our keypair; Rspamd clients keep one per rule and process.
    """

    server_public: bytes
    client: Keypair
    nm: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.server_public) != KEY_BYTES:
            raise FuzzyProtocolError(f"server public key must be {KEY_BYTES} bytes")
        try:
            object.__setattr__(self, "nm", self.client.nm(self.server_public))
        except CryptoboxError as exc:
            raise FuzzyProtocolError(f"unusable server key: {exc}") from None


def encode_request(
    command: FuzzyCommand,
    encryption: ClientEncryption | None = None,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> bytes:
    """Client side: the datagram for ``command``, encrypted when ``encryption`` is given.

    ``random_bytes`` supplies the 24-byte nonce (injectable for fixed vectors).
    """
    payload = encode_command(command)
    if encryption is None:
        return payload
    nonce = random_bytes(NONCE_BYTES)
    ciphertext, mac = encrypt_nm(payload, nonce, encryption.nm)
    return b"".join(
        (
            ENCRYPTED_MAGIC,
            encryption.server_public[:FUZZY_KEY_ID_BYTES],
            encryption.client.public_key,
            nonce,
            mac,
            ciphertext,
        )
    )


# --- replies ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FuzzyReply:
    """A reply to one command.

    Attributes:
        value: stored weight on a hit, a :class:`ReplyCode` on refusal, else 0.
        flag: stored flag on a hit, request flag for writes (u32).
        tag: the request's tag.
        prob: match probability (sent as float32; 1.0 exact / accepted).
        digest: the matched digest (epoch 11+), 64 bytes.
        ts: time stored with the hash (epoch 11+), u32.
        matched_digest: Rspamd 4.1.3+ marker bit: ``digest`` is the matched one.
        extra_flags: epoch 12 additional ``(value, flag)`` pairs (at most 7).
    """

    value: int
    flag: int
    tag: int
    prob: float
    digest: bytes = bytes(DIGEST_SIZE)
    ts: int = 0
    matched_digest: bool = False
    extra_flags: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if not (_I32_MIN <= self.value <= _I32_MAX and 0 <= self.flag <= _U32
                and 0 <= self.tag <= _U32 and 0 <= self.ts <= _U32):
            _check_range("value", self.value, _I32_MIN, _I32_MAX)
            _check_range("flag", self.flag, 0, _U32)
            _check_range("tag", self.tag, 0, _U32)
            _check_range("ts", self.ts, 0, _U32)
        if len(self.digest) != DIGEST_SIZE:
            raise FuzzyProtocolError(f"digest must be {DIGEST_SIZE} bytes")
        if self.extra_flags:
            if len(self.extra_flags) > MAX_EXTRA_FLAGS:
                raise FuzzyProtocolError(f"at most {MAX_EXTRA_FLAGS} extra flags")
            for extra_value, extra_flag in self.extra_flags:
                _check_range("extra value", extra_value, _I32_MIN, _I32_MAX)
                _check_range("extra flag", extra_flag, 0, _U32)
        if self.prob not in _COMMON_PROBS:
            try:
                _F32.pack(self.prob)
            except (OverflowError, struct.error):
                raise FuzzyProtocolError(
                    f"prob {self.prob!r} does not fit a float32") from None


def encode_reply_body(reply: FuzzyReply, epoch: Epoch) -> bytes:
    """The plaintext reply body for ``epoch`` (16, 96 or 144 bytes).

    Fields the epoch has no room for (digest/ts in epoch 10, extra flags before
    epoch 12) are left out.
    """
    marker = 1 if reply.matched_digest else 0
    if epoch is Epoch.EPOCH11:
        return _REPLY_EPOCH11.pack(reply.value, reply.flag, reply.tag, reply.prob,
                                   reply.digest, reply.ts, marker)
    head = _REPLY_V1.pack(reply.value, reply.flag, reply.tag, reply.prob)
    if epoch is Epoch.EPOCH10:
        return head
    tail = _REPLY_TAIL.pack(reply.digest, reply.ts)
    slots = list(reply.extra_flags) + [(0, 0)] * (MAX_EXTRA_FLAGS - len(reply.extra_flags))
    return (
        head
        + tail
        + bytes((len(reply.extra_flags), marker, 0, 0))
        + b"".join(_EXTRA_FLAG.pack(v, f) for v, f in slots)
    )


def encode_reply(
    request: FuzzyRequest,
    reply: FuzzyReply,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> bytes:
    """Server side: the reply datagram for ``request``.

    The body has the request epoch's size; when the request was encrypted it is
    encrypted with the same NM key under a fresh nonce from ``random_bytes``
    and sent as ``nonce ‖ mac ‖ ciphertext``.
    """
    body = encode_reply_body(reply, request.epoch)
    if request.encryption is None:
        return body
    nonce = random_bytes(NONCE_BYTES)
    ciphertext, mac = encrypt_nm(body, nonce, request.encryption.nm)
    return nonce + mac + ciphertext


def encode_reply_values(
    request: FuzzyRequest,
    value: int,
    flag: int,
    prob: float,
    digest: bytes,
    ts: int,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> bytes:
    """Server side: ``encode_reply(request, FuzzyReply(value, flag, tag, prob, digest, ts))``
    with the request's tag, without building the :class:`FuzzyReply`.

    The same bytes and the same errors: a field out of range, a digest that
    is not 64 bytes or a ``prob`` that does not fit a float32 raises
    :class:`FuzzyProtocolError` (the fields are checked by :class:`FuzzyReply`
    only when the fast checks fail).  No matched-digest marker, no extra flags.
    """
    tag = request.command.tag
    if not (_I32_MIN <= value <= _I32_MAX and 0 <= flag <= _U32 and 0 <= tag <= _U32
            and 0 <= ts <= _U32 and len(digest) == DIGEST_SIZE):
        FuzzyReply(value, flag, tag, prob, digest, ts)  # raises the precise error
    epoch = request.epoch
    try:
        if epoch is Epoch.EPOCH11:
            body = _REPLY_EPOCH11.pack(value, flag, tag, prob, digest, ts, 0)
        elif epoch is Epoch.EPOCH10:
            body = _REPLY_V1.pack(value, flag, tag, prob)
        else:
            body = _REPLY_EPOCH12_PLAIN.pack(value, flag, tag, prob, digest, ts)
    except (OverflowError, struct.error):
        FuzzyReply(value, flag, tag, prob, digest, ts)  # raises the precise error
        raise
    encryption = request.encryption
    if encryption is None:
        return body
    nonce = random_bytes(NONCE_BYTES)
    ciphertext, mac = encrypt_nm(body, nonce, encryption.nm)
    return nonce + mac + ciphertext


def decode_reply(datagram: bytes, nm: bytes | None = None) -> FuzzyReply:
    """Client side: decode one reply; its epoch is recognised by its size.

    With ``nm`` the reply must be encrypted (40-byte header + body) and is
    verified and decrypted first.  Raises :class:`FuzzyProtocolError` for a
    size that is no reply layout, a MAC failure, or inconsistent fields.
    """
    data = bytes(datagram)
    if nm is not None:
        if len(data) - ENCRYPTED_REPLY_HEADER_SIZE not in _EPOCH_BY_REPLY_SIZE:
            raise FuzzyProtocolError(f"encrypted reply of {len(data)} bytes")
        try:
            data = decrypt_nm(
                data[ENCRYPTED_REPLY_HEADER_SIZE:],
                data[:NONCE_BYTES],
                data[NONCE_BYTES:ENCRYPTED_REPLY_HEADER_SIZE],
                nm,
            )
        except CryptoboxError as exc:
            raise FuzzyProtocolError(f"cannot decrypt reply: {exc}") from None
    epoch = _EPOCH_BY_REPLY_SIZE.get(len(data))
    if epoch is None:
        raise FuzzyProtocolError(f"reply of {len(data)} bytes")
    value, flag, tag, prob = _REPLY_V1.unpack_from(data)
    if epoch is Epoch.EPOCH10:
        return FuzzyReply(value, flag, tag, prob)
    digest, ts = _REPLY_TAIL.unpack_from(data, _REPLY_V1.size)
    reserved_at = _REPLY_V1.size + _REPLY_TAIL.size
    if epoch is Epoch.EPOCH11:
        matched = bool(data[reserved_at] & 1)
        return FuzzyReply(value, flag, tag, prob, digest, ts, matched)
    extra_count = data[reserved_at]
    if extra_count > MAX_EXTRA_FLAGS:
        raise FuzzyProtocolError(f"reply claims {extra_count} extra flags")
    matched = bool(data[reserved_at + 1] & 1)
    extra = tuple(
        _EXTRA_FLAG.unpack_from(data, reserved_at + 4 + i * _EXTRA_FLAG.size)
        for i in range(extra_count)
    )
    return FuzzyReply(value, flag, tag, prob, digest, ts, matched, extra)


# --- TCP framing ------------------------------------------------------------


def encode_frame(payload: bytes, max_frame_length: int = MAX_FRAME_LENGTH) -> bytes:
    """Prefix ``payload`` with its u16 little-endian length (TCP transport).

    Raises :class:`FuzzyProtocolError` when ``payload`` is empty or longer
    than ``max_frame_length``.
    """
    if not 1 <= len(payload) <= max_frame_length:
        raise FuzzyProtocolError(f"frame payload of {len(payload)} bytes")
    return len(payload).to_bytes(2, "little") + payload


class FuzzyStreamDecoder:
    """Incremental decoder of the TCP transport's length-prefixed frames.

    One decoder per connection.  :meth:`feed` returns every complete frame
    payload so far (possibly none) and buffers the rest; it never holds more
    than one frame plus its 2-byte prefix.  A length of 0 or above
    ``max_frame_length`` raises :class:`FuzzyProtocolError`: the connection
    must then be closed, and the decoder stays failed.
    """

    def __init__(self, max_frame_length: int = MAX_FRAME_LENGTH) -> None:
        if not 1 <= max_frame_length <= 0xFFFF:
            raise ValueError("max_frame_length must be within 1..65535")
        self.max_frame_length = max_frame_length
        self._buffer = bytearray()
        self._failed: FuzzyProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received that are not yet part of a complete frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the complete frame payloads in order.

        Raises :class:`FuzzyProtocolError` for a frame length of 0 or above
        ``max_frame_length``, and again on every later call.
        """
        if self._failed is not None:
            raise self._failed
        frames: list[bytes] = []
        view = memoryview(data)
        while view:
            if len(self._buffer) < 2:
                take = 2 - len(self._buffer)
                self._buffer += view[:take]
                view = view[take:]
                if len(self._buffer) < 2:
                    break
                length = int.from_bytes(self._buffer[:2], "little")
                if not 1 <= length <= self.max_frame_length:
                    self._failed = FuzzyProtocolError(f"frame length {length} not allowed")
                    raise self._failed
            length = int.from_bytes(self._buffer[:2], "little")
            missing = length - (len(self._buffer) - 2)
            self._buffer += view[:missing]
            view = view[missing:]
            if len(self._buffer) - 2 == length:
                frames.append(bytes(self._buffer[2:]))
                self._buffer.clear()
        return frames
