"""Wire format of fuzzy storage master/slave replication (rspamd-tx's own protocol).

Rspamd has had no storage-to-storage protocol since 2.0 (``fuzzy-storage.md``
§7); this one is ours. It runs over one TCP connection that the **master**
opens to each slave. This module is pure: bytes in, typed messages out, and
back; :mod:`rspamd_tx.fuzzy.replication` moves the bytes.

Framing
    Every frame is ``u32 length ‖ u8 type ‖ body`` where ``length`` counts the
    type byte and the body (network byte order throughout). A frame longer
    than :data:`MAX_FRAME_LENGTH` is refused from its header, before anything
    is buffered.

Handshake (plaintext frames)
    1. slave → master :class:`Hello`: magic ``RTXR``, protocol version and a
       fresh X25519 public key the slave generated for this connection only.
    2. master → slave :class:`Auth`: the master's static public key.

    Both sides then derive the cryptobox NM key
    (:func:`~rspamd_tx.protocols.cryptobox.nm_key`): the slave from the
    master's public key and its ephemeral secret, the master from the
    ephemeral public key and its static secret. Only the holder of the
    master's secret key can produce frames that verify, so the slave
    authenticates the master (it compares :class:`Auth` with its configured
    ``master_key``); the ephemeral key makes every connection's key fresh, so
    recorded frames cannot be replayed into another connection.

Sealed frames (type :data:`SEALED_FRAME`)
    Body = Poly1305 MAC (16 bytes) ‖ ciphertext of ``u8 inner type ‖ inner
    body`` (:func:`~rspamd_tx.protocols.cryptobox.encrypt_nm`). The 24-byte
    nonce is not sent: it is a direction byte (``M`` master → slave, ``S``
    slave → master), 15 zero bytes and a u64 frame counter starting at 0 in
    each direction, so a dropped, replayed or reordered frame fails its MAC.

Sealed messages
    ``State(epoch, revision)`` slave → master: what the slave last applied.
    ``Batch(revision, updates)`` master → slave: one flushed batch.
    ``Ack(revision)`` slave → master: the batch (or resync) is stored.
    ``ResyncBegin(epoch, revision)``, ``ResyncChunk(updates)`` … (every
    stored hash, in ascending digest order), ``ResyncFix(updates)`` … (the
    current state of digests that batches changed while the copy was read),
    ``ResyncEnd(epoch, revision)`` master → slave: a full copy of the
    master's hashes, equal to the master's state at the end ``revision``.

An update record is ``u8 kind ‖ u32 flag ‖ i64 value ‖ 64-byte digest ‖ u8
marks ‖ [32 × u64 shingles]`` (78 or 334 bytes); ``marks`` bit 0: shingles
follow, bit 1: a weak update (its flag never replaces another); other bits zero.

Every decoding failure raises :class:`ReplicationCodecError` and nothing else.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar, Self, Union

from rspamd_tx.protocols.cryptobox import (
    KEY_BYTES,
    MAC_BYTES,
    NONCE_BYTES,
    CryptoboxError,
    decrypt_nm,
    encrypt_nm,
)

__all__ = [
    "DIGEST_BYTES",
    "KINDS",
    "MAGIC",
    "MAX_FRAME_LENGTH",
    "MAX_UPDATES_PER_FRAME",
    "PROTOCOL_VERSION",
    "SEALED_FRAME",
    "SHINGLE_COUNT",
    "Ack",
    "Auth",
    "Batch",
    "Frame",
    "FrameDecoder",
    "Hello",
    "Message",
    "ReplicationCodecError",
    "ResyncBegin",
    "ResyncChunk",
    "ResyncEnd",
    "ResyncFix",
    "SealedChannel",
    "State",
    "UpdateRecord",
    "decode_plain",
    "encode_plain",
]

MAGIC = b"RTXR"
"""First bytes of a :class:`Hello` body."""
PROTOCOL_VERSION = 1
"""The only protocol version spoken."""
MAX_FRAME_LENGTH = 32 * 1024 * 1024
"""Largest accepted ``length`` field (type byte plus body)."""
DIGEST_BYTES = 64
SHINGLE_COUNT = 32
KINDS = frozenset({1, 2, 100})
"""Valid update kinds: ADD, DEL, REFRESH (the fuzzy command codes)."""
SEALED_FRAME = 0x7F
"""Frame type of every frame after the handshake."""

_HEADER = struct.Struct("!IB")
_RECORD_HEAD = struct.Struct("!BIq")
_U64 = struct.Struct("!Q")
_U32 = struct.Struct("!I")
_PAIR = struct.Struct("!QQ")
_SHINGLES = struct.Struct(f"!{SHINGLE_COUNT}Q")
_HAS_SHINGLES = 1
_WEAK = 2
_RECORD_MIN = _RECORD_HEAD.size + DIGEST_BYTES + 1
_RECORD_MAX = _RECORD_MIN + _SHINGLES.size
MAX_UPDATES_PER_FRAME = (MAX_FRAME_LENGTH - 1 - MAC_BYTES - 1 - _PAIR.size) // _RECORD_MAX
"""Updates that always fit one sealed frame, whatever their shingles."""

_U64_LIMIT = 1 << 64
_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1
_MASTER_DIRECTION = b"M"
_SLAVE_DIRECTION = b"S"


class ReplicationCodecError(ValueError):
    """Malformed, oversized, out-of-place or forged replication data."""


def _check_u64(name: str, value: int) -> None:
    if not isinstance(value, int) or not 0 <= value < _U64_LIMIT:
        raise ReplicationCodecError(f"{name} must be an unsigned 64-bit integer")


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame as cut from the stream: its type byte and body."""

    type: int
    body: bytes

    def encode(self) -> bytes:
        """``length ‖ type ‖ body``; raises if the frame would be too long."""
        if len(self.body) + 1 > MAX_FRAME_LENGTH:
            raise ReplicationCodecError("frame longer than MAX_FRAME_LENGTH")
        return _HEADER.pack(len(self.body) + 1, self.type) + self.body


class FrameDecoder:
    """Cuts a byte stream into :class:`Frame` objects.

    Per connection; :meth:`feed` accepts any split of the stream. The length
    header is checked against ``max_length`` before its body is buffered.
    """

    def __init__(self, max_length: int = MAX_FRAME_LENGTH) -> None:
        self.max_length = max_length
        self._buffer = bytearray()

    @property
    def pending(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Frame]:
        """Add ``data``; return the frames completed by it, in order.

        :raises ReplicationCodecError: a zero or oversized length field.
        """
        self._buffer += data
        frames: list[Frame] = []
        while len(self._buffer) >= _U32.size:
            (length,) = _U32.unpack_from(self._buffer)
            if length == 0 or length > self.max_length:
                raise ReplicationCodecError(f"bad frame length {length}")
            if len(self._buffer) < 4 + length:
                break
            frame_type = self._buffer[4]
            frames.append(Frame(frame_type, bytes(self._buffer[_HEADER.size:4 + length])))
            del self._buffer[:4 + length]
        return frames


@dataclass(frozen=True, slots=True)
class UpdateRecord:
    """One replicated modification (the wire form of a backend ``Update``).

    Attributes:
        kind: 1 ADD, 2 DEL, 100 REFRESH.
        digest: 64 bytes.
        flag: unsigned 32-bit list number.
        value: signed 64-bit weight (ADD adds it; ignored otherwise).
        shingles: 32 unsigned 64-bit values or ``None``.
        weak: an ADD under one of the master's ``weak_ids``.
    """

    kind: int
    digest: bytes
    flag: int
    value: int = 0
    shingles: tuple[int, ...] | None = None
    weak: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ReplicationCodecError(f"unknown update kind {self.kind}")
        if not isinstance(self.digest, bytes) or len(self.digest) != DIGEST_BYTES:
            raise ReplicationCodecError(f"a digest is {DIGEST_BYTES} bytes")
        if not isinstance(self.flag, int) or not 0 <= self.flag < 1 << 32:
            raise ReplicationCodecError("flag must be an unsigned 32-bit integer")
        if not isinstance(self.value, int) or not _I64_MIN <= self.value <= _I64_MAX:
            raise ReplicationCodecError("value must be a signed 64-bit integer")
        if self.shingles is not None:
            shingles = tuple(self.shingles)
            if len(shingles) != SHINGLE_COUNT:
                raise ReplicationCodecError(f"a shingle set has {SHINGLE_COUNT} values")
            for shingle in shingles:
                _check_u64("shingle", shingle)
            object.__setattr__(self, "shingles", shingles)

    def encode(self) -> bytes:
        """The record's bytes (78, or 334 with shingles)."""
        head = _RECORD_HEAD.pack(self.kind, self.flag, self.value) + self.digest
        marks = _WEAK if self.weak else 0
        if self.shingles is None:
            return head + bytes((marks,))
        return head + bytes((marks | _HAS_SHINGLES,)) + _SHINGLES.pack(*self.shingles)


def _encode_records(records: tuple[UpdateRecord, ...]) -> bytes:
    if len(records) > MAX_UPDATES_PER_FRAME:
        raise ReplicationCodecError(f"more than {MAX_UPDATES_PER_FRAME} updates in one frame")
    return _U32.pack(len(records)) + b"".join(record.encode() for record in records)


def _decode_records(body: bytes, offset: int) -> tuple[UpdateRecord, ...]:
    if len(body) < offset + _U32.size:
        raise ReplicationCodecError("truncated update count")
    (count,) = _U32.unpack_from(body, offset)
    offset += _U32.size
    if count > (len(body) - offset) // _RECORD_MIN:
        raise ReplicationCodecError(f"{count} updates cannot fit in {len(body) - offset} bytes")
    records: list[UpdateRecord] = []
    for _ in range(count):
        if len(body) < offset + _RECORD_MIN:
            raise ReplicationCodecError("truncated update record")
        kind, flag, value = _RECORD_HEAD.unpack_from(body, offset)
        offset += _RECORD_HEAD.size
        digest = body[offset:offset + DIGEST_BYTES]
        offset += DIGEST_BYTES
        marks = body[offset]
        offset += 1
        if marks & ~(_HAS_SHINGLES | _WEAK):
            raise ReplicationCodecError(f"bad record marks {marks:#x}")
        shingles: tuple[int, ...] | None = None
        if marks & _HAS_SHINGLES:
            if len(body) < offset + _SHINGLES.size:
                raise ReplicationCodecError("truncated shingles")
            shingles = _SHINGLES.unpack_from(body, offset)
            offset += _SHINGLES.size
        records.append(UpdateRecord(kind, digest, flag, value, shingles, bool(marks & _WEAK)))
    if offset != len(body):
        raise ReplicationCodecError(f"{len(body) - offset} trailing bytes after the updates")
    return tuple(records)


def _exact(body: bytes, size: int, what: str) -> None:
    if len(body) != size:
        raise ReplicationCodecError(f"{what} body is {len(body)} bytes, expected {size}")


@dataclass(frozen=True, slots=True)
class Hello:
    """Slave → master, plaintext: version and this connection's ephemeral public key."""

    TYPE: ClassVar[int] = 0x01
    ephemeral_key: bytes
    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.ephemeral_key, bytes) or len(self.ephemeral_key) != KEY_BYTES:
            raise ReplicationCodecError(f"a public key is {KEY_BYTES} bytes")
        if not isinstance(self.version, int) or not 0 <= self.version < 256:
            raise ReplicationCodecError("version must fit one byte")

    def encode_body(self) -> bytes:
        return MAGIC + bytes([self.version]) + self.ephemeral_key

    @classmethod
    def decode_body(cls, body: bytes) -> Hello:
        _exact(body, len(MAGIC) + 1 + KEY_BYTES, "hello")
        if body[:len(MAGIC)] != MAGIC:
            raise ReplicationCodecError("not a replication hello")
        return cls(ephemeral_key=body[len(MAGIC) + 1:], version=body[len(MAGIC)])


@dataclass(frozen=True, slots=True)
class Auth:
    """Master → slave, plaintext: the master's static public key."""

    TYPE: ClassVar[int] = 0x02
    master_key: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.master_key, bytes) or len(self.master_key) != KEY_BYTES:
            raise ReplicationCodecError(f"a public key is {KEY_BYTES} bytes")

    def encode_body(self) -> bytes:
        return self.master_key

    @classmethod
    def decode_body(cls, body: bytes) -> Auth:
        _exact(body, KEY_BYTES, "auth")
        return cls(master_key=body)


@dataclass(frozen=True, slots=True)
class _EpochRevision:
    """A frame whose body is a history (epoch) and a revision, two u64."""

    NAME: ClassVar[str]
    epoch: int
    revision: int

    def __post_init__(self) -> None:
        _check_u64("epoch", self.epoch)
        _check_u64("revision", self.revision)

    def encode_body(self) -> bytes:
        return _PAIR.pack(self.epoch, self.revision)

    @classmethod
    def decode_body(cls, body: bytes) -> Self:
        _exact(body, _PAIR.size, cls.NAME)
        return cls(*_PAIR.unpack(body))


@dataclass(frozen=True, slots=True)
class State(_EpochRevision):
    """Slave → master: the history (epoch) and revision the slave last applied.

    ``epoch`` 0 and ``revision`` 0 mean the slave holds nothing replicated.
    """

    TYPE: ClassVar[int] = 0x20
    NAME: ClassVar[str] = "state"


@dataclass(frozen=True, slots=True)
class Batch:
    """Master → slave: one batch the master flushed, numbered ``revision``."""

    TYPE: ClassVar[int] = 0x21
    revision: int
    updates: tuple[UpdateRecord, ...]

    def __post_init__(self) -> None:
        _check_u64("revision", self.revision)
        object.__setattr__(self, "updates", tuple(self.updates))

    def encode_body(self) -> bytes:
        return _U64.pack(self.revision) + _encode_records(self.updates)

    @classmethod
    def decode_body(cls, body: bytes) -> Batch:
        if len(body) < _U64.size:
            raise ReplicationCodecError("truncated batch revision")
        return cls(_U64.unpack_from(body)[0], _decode_records(body, _U64.size))


@dataclass(frozen=True, slots=True)
class Ack:
    """Slave → master: everything up to ``revision`` is stored."""

    TYPE: ClassVar[int] = 0x22
    revision: int

    def __post_init__(self) -> None:
        _check_u64("revision", self.revision)

    def encode_body(self) -> bytes:
        return _U64.pack(self.revision)

    @classmethod
    def decode_body(cls, body: bytes) -> Ack:
        _exact(body, _U64.size, "ack")
        return cls(_U64.unpack(body)[0])


@dataclass(frozen=True, slots=True)
class ResyncBegin(_EpochRevision):
    """Master → slave: a full copy of the master's hashes, read from ``revision`` on, follows."""

    TYPE: ClassVar[int] = 0x23
    NAME: ClassVar[str] = "resync begin"


@dataclass(frozen=True, slots=True)
class _Records:
    """A frame whose body is a list of update records and nothing else."""

    updates: tuple[UpdateRecord, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "updates", tuple(self.updates))

    def encode_body(self) -> bytes:
        return _encode_records(self.updates)

    @classmethod
    def decode_body(cls, body: bytes) -> Self:
        return cls(_decode_records(body, 0))


@dataclass(frozen=True, slots=True)
class ResyncChunk(_Records):
    """Master → slave: stored hashes (ADD records carrying the stored weight)."""

    TYPE: ClassVar[int] = 0x24


@dataclass(frozen=True, slots=True)
class ResyncFix(_Records):
    """Master → slave, within a resync: current state of digests changed during the copy.

    ADD records carry the weight stored now (the slave replaces its copy);
    DEL records name digests that are gone.
    """

    TYPE: ClassVar[int] = 0x26


@dataclass(frozen=True, slots=True)
class ResyncEnd:
    """Master → slave: the copy is complete and equals the master at ``revision``.

    ``revision`` is at least the one :class:`ResyncBegin` announced.
    """

    TYPE: ClassVar[int] = 0x25
    epoch: int
    revision: int

    def __post_init__(self) -> None:
        _check_u64("epoch", self.epoch)
        _check_u64("revision", self.revision)

    def encode_body(self) -> bytes:
        return _PAIR.pack(self.epoch, self.revision)

    @classmethod
    def decode_body(cls, body: bytes) -> ResyncEnd:
        _exact(body, _PAIR.size, "resync end")
        return cls(*_PAIR.unpack(body))


PlainMessage = Union[Hello, Auth]
SealedMessage = Union[State, Batch, Ack, ResyncBegin, ResyncChunk, ResyncFix, ResyncEnd]
Message = Union[PlainMessage, SealedMessage]

_PLAIN: dict[int, type[Hello] | type[Auth]] = {Hello.TYPE: Hello, Auth.TYPE: Auth}
_SEALED: dict[int, type[State] | type[Batch] | type[Ack] | type[ResyncBegin]
              | type[ResyncChunk] | type[ResyncFix] | type[ResyncEnd]] = {
    kind.TYPE: kind
    for kind in (State, Batch, Ack, ResyncBegin, ResyncChunk, ResyncFix, ResyncEnd)
}


def encode_plain(message: PlainMessage) -> bytes:
    """The frame of a handshake message."""
    if type(message) not in _PLAIN.values():
        raise ReplicationCodecError(f"{type(message).__name__} is not a handshake message")
    return Frame(message.TYPE, message.encode_body()).encode()


def decode_plain(frame: Frame) -> PlainMessage:
    """The handshake message in ``frame``.

    :raises ReplicationCodecError: a sealed or unknown frame type, a bad body.
    """
    kind = _PLAIN.get(frame.type)
    if kind is None:
        raise ReplicationCodecError(f"frame type {frame.type:#04x} is not a handshake message")
    return kind.decode_body(frame.body)


class SealedChannel:
    """Seals outgoing and opens incoming messages of one connection after the handshake.

    Owns the two frame counters the nonces are built from.

    Args:
        nm: the connection's shared key (32 bytes).
        master: ``True`` on the master's side (it sends with direction ``M``
            and receives ``S``), ``False`` on the slave's.
    """

    def __init__(self, nm: bytes, *, master: bool) -> None:
        if len(nm) != KEY_BYTES:
            raise ReplicationCodecError(f"an NM key is {KEY_BYTES} bytes")
        self._nm = bytes(nm)
        self._send_direction = _MASTER_DIRECTION if master else _SLAVE_DIRECTION
        self._receive_direction = _SLAVE_DIRECTION if master else _MASTER_DIRECTION
        self.sent = 0
        self.received = 0

    @staticmethod
    def _nonce(direction: bytes, counter: int) -> bytes:
        return direction + bytes(NONCE_BYTES - 1 - _U64.size) + _U64.pack(counter)

    def seal(self, message: SealedMessage) -> bytes:
        """The sealed frame carrying ``message``; advances the send counter."""
        if type(message) not in _SEALED.values():
            raise ReplicationCodecError(f"{type(message).__name__} cannot be sealed")
        plaintext = bytes([message.TYPE]) + message.encode_body()
        nonce = self._nonce(self._send_direction, self.sent)
        ciphertext, mac = encrypt_nm(plaintext, nonce, self._nm)
        frame = Frame(SEALED_FRAME, mac + ciphertext).encode()
        self.sent += 1
        return frame

    def open(self, frame: Frame) -> SealedMessage:
        """The message in a sealed ``frame``; advances the receive counter.

        :raises ReplicationCodecError: not a sealed frame, a MAC that does not
            verify (wrong key, tampering, replay, reordering), an unknown or
            handshake inner type, a bad body.
        """
        if frame.type != SEALED_FRAME:
            raise ReplicationCodecError(f"expected a sealed frame, got type {frame.type:#04x}")
        if len(frame.body) < MAC_BYTES + 1:
            raise ReplicationCodecError("sealed frame too short")
        nonce = self._nonce(self._receive_direction, self.received)
        try:
            plaintext = decrypt_nm(frame.body[MAC_BYTES:], nonce, frame.body[:MAC_BYTES], self._nm)
        except CryptoboxError as error:
            raise ReplicationCodecError(f"sealed frame rejected: {error}") from None
        self.received += 1
        kind = _SEALED.get(plaintext[0])
        if kind is None:
            raise ReplicationCodecError(f"unknown sealed message type {plaintext[0]:#04x}")
        return kind.decode_body(plaintext[1:])
