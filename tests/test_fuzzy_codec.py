"""Fuzzy wire codec: every request and reply layout as (event, bytes) tables."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from rspamd_tx.protocols import fuzzy_codec as fc
from rspamd_tx.protocols.cryptobox import NmKeyCache
from rspamd_tx.protocols.keypair import Keypair

H = bytes.fromhex
DATA_DIR = os.path.join(os.path.dirname(__file__), "data", "fuzzy")

# fuzzy-protocol.md §14.
EXAMPLE_DIGEST = hashlib.blake2b(
    b"example message body", key=hashlib.blake2b(b"rspamd").digest()
).digest()
EXAMPLE_REQUEST = H(
    "04000000000000004d3c2b1a55c03e2b402533882ec12fede7eafd9deee21062"
    "14abca36ae8b545b5b5e13bf1db11acb402a073a2b7f160a88ecd1b495f04b99"
    "1044b7718a9fd8a3c0459e1c"
)
EXAMPLE_REPLY = H(
    "0a000000010000004d3c2b1a0000803f55c03e2b402533882ec12fede7eafd9d"
    "eee2106214abca36ae8b545b5b5e13bf1db11acb402a073a2b7f160a88ecd1b4"
    "95f04b991044b7718a9fd8a3c0459e1c00f15365000000000000000000000000"
)
EXAMPLE_COMMAND = fc.FuzzyCommand(
    version=4, command=fc.Command.CHECK, tag=0x1A2B3C4D, digest=EXAMPLE_DIGEST
)
EXAMPLE_HIT = fc.FuzzyReply(
    value=10, flag=1, tag=0x1A2B3C4D, prob=1.0, digest=EXAMPLE_DIGEST, ts=1700000000
)

# fuzzy-protocol.md §11.8.
SERVER = Keypair.from_secret(bytes(range(0x10, 0x30)))
CLIENT = Keypair.from_secret(bytes(range(0x40, 0x60)))
REQUEST_NONCE = bytes(range(0x80, 0x98))
REPLY_NONCE = bytes(range(0xA0, 0xB8))
ENCRYPTED_REQUEST = H(
    "72736665d89e3bad79437dbe79a631eede1bf9c98f12032cdeadd0e7a079398f"
    "c786b88cc846ec89af85a51a808182838485868788898a8b8c8d8e8f90919293"
    "94959697e17e8fc87b81174609b043699bedffc3d456f411164881127f9ecdbf"
    "8fefe422dbc1cb419a5c63de8f23cfbaf19d59e1ae08cc3f9eaf6c6b4c3ddecb"
    "2fdebc9dc8ec20a424e120ece1a5165bdea781487a7d5e3359a54bb016ed8bb8"
)
ENCRYPTED_REPLY = H(
    "a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7652c668f2aba031e"
    "8596bdf3d0d752d9678206add9fd917ce6d35f9dc8b2fbc980900388b62aab88"
    "7349fc2d8c258d2b661b27c6b9a316e2ab7b1bb2b98d44b1732e93d3116a5ae6"
    "7c70c157ac84bcbe8db376c08c5a4e8370796ea110d92e887f32cd30010b8025"
    "fb928df8029174de"
)

DIGEST = bytes(range(64))
SHINGLES = tuple(range(1, 33))
SHINGLE_BYTES = struct.pack("<32Q", *SHINGLES)


def header(
    version: int, cmd: int, shingles: int = 0, flag: int = 0, value: int = 0, tag: int = 7
) -> bytes:
    """The fixed 76-byte command with DIGEST."""
    return struct.pack("<BBBBiI", version, cmd, shingles, flag, value, tag) + DIGEST


def key_for_server(key_id: bytes) -> Keypair:
    """A server key lookup that falls back to its only key, like Rspamd's default key."""
    return SERVER


# (description, command, wire bytes, epoch)
REQUEST_TABLE: list[tuple[str, fc.FuzzyCommand, bytes, fc.Epoch]] = [
    (
        "v3 CHECK",
        fc.FuzzyCommand(3, fc.Command.CHECK, 7, DIGEST),
        header(3, 0),
        fc.Epoch.EPOCH10,
    ),
    (
        "v3 CHECK with shingles",
        fc.FuzzyCommand(3, fc.Command.CHECK, 7, DIGEST, shingles=SHINGLES),
        header(3, 0, 32) + SHINGLE_BYTES,
        fc.Epoch.EPOCH10,
    ),
    (
        "v4 WRITE flag 1 weight 10",
        fc.FuzzyCommand(4, fc.Command.WRITE, 7, DIGEST, flag=1, value=10),
        header(4, 1, flag=1, value=10),
        fc.Epoch.EPOCH11,
    ),
    (
        "v4 DEL with shingles",
        fc.FuzzyCommand(4, fc.Command.DEL, 7, DIGEST, flag=2, shingles=SHINGLES),
        header(4, 2, 32, flag=2) + SHINGLE_BYTES,
        fc.Epoch.EPOCH11,
    ),
    (
        "v4 STAT",
        fc.FuzzyCommand(4, fc.Command.STAT, 7, DIGEST),
        header(4, 3),
        fc.Epoch.EPOCH11,
    ),
    (
        "v4 PING with a negative value",
        fc.FuzzyCommand(4, fc.Command.PING, 7, DIGEST, value=-5),
        header(4, 4, value=-5),
        fc.Epoch.EPOCH11,
    ),
    (
        "v4 REFRESH (internal code)",
        fc.FuzzyCommand(4, fc.Command.REFRESH, 7, DIGEST),
        header(4, 100),
        fc.Epoch.EPOCH11,
    ),
    (
        "v4 DUP (internal code)",
        fc.FuzzyCommand(4, fc.Command.DUP, 7, DIGEST),
        header(4, 101),
        fc.Epoch.EPOCH11,
    ),
    (
        "v4 unknown command code stays an int",
        fc.FuzzyCommand(4, 42, 7, DIGEST),
        header(4, 42),
        fc.Epoch.EPOCH11,
    ),
    (
        "v4 with a non-standard shingles_count byte",
        fc.FuzzyCommand(4, fc.Command.CHECK, 7, DIGEST, shingles=SHINGLES, shingles_count=1),
        header(4, 0, 1) + SHINGLE_BYTES,
        fc.Epoch.EPOCH11,
    ),
    (
        "v4 with domain, IPv4 and IPv6 extensions",
        fc.FuzzyCommand(
            4, fc.Command.CHECK, 7, DIGEST,
            extensions=(
                fc.SourceDomain(b"example.org"),
                fc.SourceIPv4(ipaddress.IPv4Address("192.0.2.1")),
                fc.SourceIPv6(ipaddress.IPv6Address("2001:db8::1")),
            ),
        ),
        header(4, 0) + b"d\x0bexample.org" + b"4\xc0\x00\x02\x01"
        + b"6" + ipaddress.IPv6Address("2001:db8::1").packed,
        fc.Epoch.EPOCH11,
    ),
    (
        "v4 shingles then an empty domain",
        fc.FuzzyCommand(
            4, fc.Command.CHECK, 7, DIGEST, shingles=SHINGLES, extensions=(fc.SourceDomain(b""),)
        ),
        header(4, 0, 32) + SHINGLE_BYTES + b"d\x00",
        fc.Epoch.EPOCH11,
    ),
    (
        "v4 with 4.1.5 sender facts and an unknown skippable extension",
        fc.FuzzyCommand(
            4, fc.Command.CHECK, 7, DIGEST,
            extensions=(fc.SenderFacts(0x00010203), fc.UnknownExtension(0x9F, b"xyz")),
        ),
        header(4, 0) + b"\x80\x04\x00\x01\x02\x03" + b"\x9f\x03xyz",
        fc.Epoch.EPOCH11,
    ),
    (
        "v5 (4.x) answered in epoch 11 by default",
        fc.FuzzyCommand(5, fc.Command.CHECK, 7, DIGEST),
        header(5, 0),
        fc.Epoch.EPOCH11,
    ),
    (
        "0x14 (4.x capability bit) answered in epoch 11 by default",
        fc.FuzzyCommand(0x14, fc.Command.CHECK, 7, DIGEST),
        header(0x14, 0),
        fc.Epoch.EPOCH11,
    ),
    (
        "0x84 (weak bit) is version 4",
        fc.FuzzyCommand(0x84, fc.Command.WRITE, 7, DIGEST),
        header(0x84, 1),
        fc.Epoch.EPOCH11,
    ),
]  # fmt: skip

# (description, invalid datagram)
INVALID_REQUESTS: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("75 bytes", header(4, 0)[:75]),
    ("version 2", header(2, 0)),
    ("version 6", header(6, 0)),
    ("version 0", header(0, 0)),
    ("v3 with extra bytes", header(3, 0) + b"d\x00"),
    ("v3 shingles with extra bytes", header(3, 0, 32) + SHINGLE_BYTES + b"\x00"),
    ("v3 shingles truncated", header(3, 0, 32) + SHINGLE_BYTES[:-1]),
    ("v4 shingles truncated", header(4, 0, 32) + SHINGLE_BYTES[:100]),
    ("lone extension type byte", header(4, 0) + b"4"),
    ("domain without length", header(4, 0) + b"d"),
    ("domain truncated", header(4, 0) + b"d\x05abc"),
    ("IPv4 truncated", header(4, 0) + b"4\x01\x02\x03"),
    ("IPv6 truncated", header(4, 0) + b"6" + bytes(15)),
    ("unknown legacy type", header(4, 0) + b"x\x00"),
    ("sender facts of length 3", header(4, 0) + b"\x80\x03abc"),
    ("skippable type without length", header(4, 0) + b"\x81"),
    ("skippable type truncated", header(4, 0) + b"\x81\x05ab"),
    ("rsfe magic, no keypair", b"rsfe" + bytes(156)),
    ("rsfe magic under 160 bytes is parsed as plain", b"rsfe" + bytes(150)),
]


class RequestTableTests(unittest.TestCase):
    """Plain requests: bytes ↔ commands for every layout."""

    def test_decode_table(self) -> None:
        """Each wire form decodes to its command and epoch."""
        for name, command, wire, epoch in REQUEST_TABLE:
            request = fc.decode_request(wire)
            self.assertEqual(request.command, command, name)
            self.assertEqual(request.epoch, epoch, name)
            self.assertFalse(request.encrypted, name)
            self.assertIsNone(request.nm, name)

    def test_encode_table(self) -> None:
        """Each command encodes to its wire form."""
        for name, command, wire, _ in REQUEST_TABLE:
            self.assertEqual(fc.encode_request(command), wire, name)

    def test_known_codes_become_enum(self) -> None:
        """A decoded known command code is a Command member."""
        self.assertIs(fc.decode_request(header(4, 1)).command.command, fc.Command.WRITE)

    def test_invalid_table(self) -> None:
        """Each malformed datagram raises FuzzyProtocolError."""
        for name, wire in INVALID_REQUESTS:
            try:
                fc.decode_request(wire)
            except fc.FuzzyProtocolError:
                continue
            self.fail(f"{name}: decoded without error")

    def test_worked_example_request(self) -> None:
        """§14: the example CHECK decodes and encodes byte for byte."""
        request = fc.decode_request(EXAMPLE_REQUEST)
        self.assertEqual(request.command, EXAMPLE_COMMAND)
        self.assertEqual(fc.encode_request(EXAMPLE_COMMAND), EXAMPLE_REQUEST)

    def test_multi_flag_epoch(self) -> None:
        """With multi_flag, version 5 and the 0x10 bit select epoch 12; version 4 does not."""
        for version, epoch in (
            (5, fc.Epoch.EPOCH12),
            (0x14, fc.Epoch.EPOCH12),
            (4, fc.Epoch.EPOCH11),
            (3, fc.Epoch.EPOCH10),
        ):
            wire = header(version, 0)
            self.assertEqual(fc.decode_request(wire, multi_flag=True).epoch, epoch, hex(version))


class CommandValidationTests(unittest.TestCase):
    """Commands refuse fields that do not fit the wire."""

    def test_out_of_range_fields(self) -> None:
        """Flag > 255, tag > u32, value > i32, wrong digest size and bad shingles are refused."""
        bad: list[dict[str, object]] = [
            dict(flag=256),
            dict(tag=2**32),
            dict(value=2**31),
            dict(digest=bytes(63)),
            dict(shingles=(1, 2, 3)),
            dict(shingles=(2**64,) * 32),
            dict(shingles_count=32),
            dict(shingles=SHINGLES, shingles_count=0),
        ]
        for fields in bad:
            arguments: dict[str, object] = dict(version=4, command=0, tag=1, digest=DIGEST)
            arguments.update(fields)
            self.assertRaises(fc.FuzzyProtocolError, fc.FuzzyCommand, **arguments)

    def test_extension_limits(self) -> None:
        """Extension payloads over 255 bytes, low unknown types and big facts are refused."""
        self.assertRaises(fc.FuzzyProtocolError, fc.SourceDomain, b"x" * 256)
        self.assertRaises(fc.FuzzyProtocolError, fc.UnknownExtension, 0x50, b"")
        self.assertRaises(fc.FuzzyProtocolError, fc.UnknownExtension, 0x80, b"abcd")
        self.assertRaises(fc.FuzzyProtocolError, fc.UnknownExtension, 0x81, b"x" * 256)
        self.assertRaises(fc.FuzzyProtocolError, fc.SenderFacts, 2**32)


# (description, reply, epoch, wire bytes)
REPLY_TABLE: list[tuple[str, fc.FuzzyReply, fc.Epoch, bytes]] = [
    (
        "epoch 10 miss",
        fc.FuzzyReply(0, 0, 7, 0.0),
        fc.Epoch.EPOCH10,
        struct.pack("<iIIf", 0, 0, 7, 0.0),
    ),
    (
        "epoch 10 refusal 403",
        fc.FuzzyReply(fc.ReplyCode.FORBIDDEN, 0, 7, 0.0),
        fc.Epoch.EPOCH10,
        struct.pack("<iIIf", 403, 0, 7, 0.0),
    ),
    (
        "epoch 11 shingle hit",
        fc.FuzzyReply(5, 2, 7, 0.96875, DIGEST, 1234),
        fc.Epoch.EPOCH11,
        struct.pack("<iIIf", 5, 2, 7, 0.96875) + DIGEST + struct.pack("<I", 1234) + bytes(12),
    ),
    (
        "epoch 11 STAT with a 32-bit count in flag",
        fc.FuzzyReply(0, 0xFFFFFFFF, 7, 1.0, DIGEST),
        fc.Epoch.EPOCH11,
        struct.pack("<iIIf", 0, 0xFFFFFFFF, 7, 1.0) + DIGEST + bytes(16),
    ),
    (
        "epoch 11 with the 4.1.3 matched-digest bit",
        fc.FuzzyReply(1, 1, 7, 1.0, DIGEST, 9, matched_digest=True),
        fc.Epoch.EPOCH11,
        struct.pack("<iIIf", 1, 1, 7, 1.0) + DIGEST + struct.pack("<I", 9) + b"\x01" + bytes(11),
    ),
    (
        "epoch 12 with two extra flags",
        fc.FuzzyReply(10, 1, 7, 1.0, DIGEST, 9, True, ((20, 2), (-1, 3))),
        fc.Epoch.EPOCH12,
        struct.pack("<iIIf", 10, 1, 7, 1.0) + DIGEST + struct.pack("<I", 9)
        + b"\x02\x01\x00\x00" + struct.pack("<iIiI", 20, 2, -1, 3) + bytes(40),
    ),
    (
        "epoch 12 without extra flags",
        fc.FuzzyReply(0, 0, 7, 0.0),
        fc.Epoch.EPOCH12,
        struct.pack("<iIIf", 0, 0, 7, 0.0) + bytes(64 + 4 + 4 + 56),
    ),
]  # fmt: skip


class ReplyTableTests(unittest.TestCase):
    """Replies: bytes ↔ replies for every epoch."""

    def test_encode_table(self) -> None:
        """Each reply encodes to its wire form for its epoch."""
        for name, reply, epoch, wire in REPLY_TABLE:
            self.assertEqual(fc.encode_reply_body(reply, epoch), wire, name)

    def test_decode_table(self) -> None:
        """Each wire form decodes back to its reply."""
        for name, reply, _, wire in REPLY_TABLE:
            self.assertEqual(fc.decode_reply(wire), reply, name)

    def test_sizes_per_version(self) -> None:
        """Version 3 gets 16 bytes, 4/5/0x14 get 96; encrypted adds 40; multi_flag 144."""
        cases = [
            (3, False, 16), (4, False, 96), (5, False, 96), (0x14, False, 96),
            (5, True, 144), (0x14, True, 144), (4, True, 96), (3, True, 16),
        ]  # fmt: skip
        reply = fc.FuzzyReply(0, 0, 7, 0.0)
        for version, multi_flag, size in cases:
            plain = fc.decode_request(header(version, 0), multi_flag=multi_flag)
            self.assertEqual(len(fc.encode_reply(plain, reply)), size, (version, multi_flag))
            self.assertEqual(fc.REPLY_SIZES[plain.epoch], size)
            command = fc.FuzzyCommand(version, 0, 7, DIGEST)
            datagram = fc.encode_request(command, fc.ClientEncryption(SERVER.public_key, CLIENT))
            encrypted = fc.decode_request(datagram, key_for_server, multi_flag=multi_flag)
            self.assertEqual(
                len(fc.encode_reply(encrypted, reply)), size + 40, (version, multi_flag)
            )

    def test_epoch10_drops_digest(self) -> None:
        """An epoch 10 reply carries only the v1 fields."""
        reply = fc.FuzzyReply(3, 1, 7, 1.0, DIGEST, 55)
        decoded = fc.decode_reply(fc.encode_reply_body(reply, fc.Epoch.EPOCH10))
        self.assertEqual(decoded, fc.FuzzyReply(3, 1, 7, 1.0))

    def test_worked_example_reply(self) -> None:
        """§14: the exact-hit reply encodes and decodes byte for byte."""
        request = fc.decode_request(EXAMPLE_REQUEST)
        self.assertEqual(fc.encode_reply(request, EXAMPLE_HIT), EXAMPLE_REPLY)
        self.assertEqual(fc.decode_reply(EXAMPLE_REPLY), EXAMPLE_HIT)

    def test_invalid_sizes(self) -> None:
        """Sizes that are no reply layout raise FuzzyProtocolError."""
        for size in (0, 15, 17, 95, 97, 143, 145, 192):
            self.assertRaises(fc.FuzzyProtocolError, fc.decode_reply, bytes(size))

    def test_too_many_extra_flags(self) -> None:
        """An epoch 12 reply claiming 8 extra flags is invalid; so is building one."""
        wire = bytearray(fc.encode_reply_body(fc.FuzzyReply(0, 0, 7, 0.0), fc.Epoch.EPOCH12))
        wire[84] = 8
        self.assertRaises(fc.FuzzyProtocolError, fc.decode_reply, bytes(wire))
        self.assertRaises(
            fc.FuzzyProtocolError, fc.FuzzyReply, 0, 0, 7, 0.0, extra_flags=((1, 1),) * 8
        )

    def test_invalid_reply_fields(self) -> None:
        """Out-of-range reply fields are refused."""
        for arguments in (
            (2**31, 0, 0, 0.0),
            (0, -1, 0, 0.0),
            (0, 0, 2**32, 0.0),
            (0, 0, 0, 1e300),
        ):
            self.assertRaises(fc.FuzzyProtocolError, fc.FuzzyReply, *arguments)


class EncryptionTests(unittest.TestCase):
    """``rsfe`` requests and encrypted replies."""

    def test_vector_request_encodes(self) -> None:
        """§11.8: the example CHECK encrypts to the 160-byte vector."""
        encryption = fc.ClientEncryption(SERVER.public_key, CLIENT)
        wire = fc.encode_request(EXAMPLE_COMMAND, encryption, lambda size: REQUEST_NONCE)
        self.assertEqual(wire, ENCRYPTED_REQUEST)

    def test_vector_request_decodes(self) -> None:
        """§11.8: the vector decrypts to the example CHECK with its key material."""
        request = fc.decode_request(ENCRYPTED_REQUEST, key_for_server)
        self.assertEqual(request.command, EXAMPLE_COMMAND)
        self.assertTrue(request.encrypted)
        assert request.encryption is not None
        self.assertEqual(request.encryption.key_id, SERVER.fuzzy_key_id)
        self.assertEqual(request.encryption.client_public, CLIENT.public_key)
        self.assertEqual(request.encryption.keypair, SERVER)
        self.assertEqual(
            request.nm, H("5f42b74f374241f3a733511c95d8970911a1b67199825db295503aa2695ab496")
        )

    def test_vector_reply_encodes(self) -> None:
        """§11.8: the exact-hit reply encrypts to the 136-byte vector."""
        request = fc.decode_request(ENCRYPTED_REQUEST, key_for_server)
        self.assertEqual(
            fc.encode_reply(request, EXAMPLE_HIT, lambda size: REPLY_NONCE), ENCRYPTED_REPLY
        )

    def test_vector_reply_decodes(self) -> None:
        """§11.8: the client decrypts the vector reply with its NM key."""
        encryption = fc.ClientEncryption(SERVER.public_key, CLIENT)
        self.assertEqual(fc.decode_reply(ENCRYPTED_REPLY, encryption.nm), EXAMPLE_HIT)

    def test_key_lookup_receives_key_id(self) -> None:
        """The lookup is called with the header's 8-byte key id."""
        seen: list[bytes] = []

        def key_for(key_id: bytes) -> Keypair:
            seen.append(key_id)
            return SERVER

        fc.decode_request(ENCRYPTED_REQUEST, key_for)
        self.assertEqual(seen, [SERVER.fuzzy_key_id])

    def test_no_key(self) -> None:
        """Without a key (lookup returns None) the request is invalid."""
        self.assertRaises(
            fc.FuzzyProtocolError, fc.decode_request, ENCRYPTED_REQUEST, lambda key_id: None
        )
        self.assertRaises(fc.FuzzyProtocolError, fc.decode_request, ENCRYPTED_REQUEST)

    def test_wrong_key(self) -> None:
        """Another server key fails the MAC check."""
        other = Keypair.from_secret(bytes(range(0x60, 0x80)))
        self.assertRaises(
            fc.FuzzyProtocolError, fc.decode_request, ENCRYPTED_REQUEST, lambda key_id: other
        )

    def test_tampered(self) -> None:
        """A flipped ciphertext byte fails."""
        wire = bytearray(ENCRYPTED_REQUEST)
        wire[100] ^= 0x40
        self.assertRaises(fc.FuzzyProtocolError, fc.decode_request, bytes(wire), key_for_server)

    def test_small_order_client_key(self) -> None:
        """An all-zero client public key is refused as a protocol error."""
        wire = ENCRYPTED_REQUEST[:12] + bytes(32) + ENCRYPTED_REQUEST[44:]
        self.assertRaises(fc.FuzzyProtocolError, fc.decode_request, wire, key_for_server)

    def test_nm_cache_used(self) -> None:
        """With a cache the client's NM key is stored for the next request."""
        cache = NmKeyCache(4)
        fc.decode_request(ENCRYPTED_REQUEST, key_for_server, cache)
        self.assertIn((CLIENT.public_key, SERVER.secret_key), cache)

    def test_encrypted_reply_wrong_nm(self) -> None:
        """A reply under another NM key is refused by the client."""
        self.assertRaises(fc.FuzzyProtocolError, fc.decode_reply, ENCRYPTED_REPLY, bytes(32))

    def test_encrypted_reply_bad_size(self) -> None:
        """An encrypted reply must be 40 + 16/96/144 bytes."""
        self.assertRaises(fc.FuzzyProtocolError, fc.decode_reply, ENCRYPTED_REPLY[:-1], bytes(32))

    def test_encrypted_extensions(self) -> None:
        """Extensions and shingles travel inside the encrypted region."""
        command = fc.FuzzyCommand(
            4, fc.Command.WRITE, 9, DIGEST, flag=1, value=10, shingles=SHINGLES,
            extensions=(fc.SourceDomain(b"example.org"),),
        )  # fmt: skip
        wire = fc.encode_request(command, fc.ClientEncryption(SERVER.public_key, CLIENT))
        self.assertEqual(len(wire), 84 + 332 + 13)
        self.assertEqual(fc.decode_request(wire, key_for_server).command, command)

    def test_client_encryption_bad_server_key(self) -> None:
        """ClientEncryption refuses a server key of the wrong size or small order."""
        self.assertRaises(fc.FuzzyProtocolError, fc.ClientEncryption, bytes(31), CLIENT)
        self.assertRaises(fc.FuzzyProtocolError, fc.ClientEncryption, bytes(32), CLIENT)


class CapturedDatagramTests(unittest.TestCase):
    """Datagrams captured from real Rspamd 3.4 (see tests/data/fuzzy/README.md)."""

    def load(self, name: str) -> bytes:
        with open(os.path.join(DATA_DIR, name), "rb") as handle:
            return handle.read()

    def check(
        self, name: str, command: int, flag: int, value: int, encrypted: bool
    ) -> fc.FuzzyRequest:
        request = fc.decode_request(self.load(name), key_for_server)
        self.assertEqual(request.encrypted, encrypted)
        self.assertEqual(request.command.version, 4)
        self.assertEqual(request.command.command, command)
        self.assertEqual(request.command.flag, flag)
        self.assertEqual(request.command.value, value)
        self.assertEqual(request.command.shingles_count, 32)
        self.assertEqual(request.command.extensions, (fc.SourceDomain(b"example.org"),))
        return request

    def test_plain_check(self) -> None:
        """A scan's CHECK: version 4, shingles, source domain."""
        self.check("plain-check-0.bin", fc.Command.CHECK, 0, 0, False)

    def test_plain_write(self) -> None:
        """``fuzzy_add -f 1 -w 10``: WRITE, flag 1, value 10."""
        self.check("plain-write-0.bin", fc.Command.WRITE, 1, 10, False)

    def test_encrypted_check(self) -> None:
        """The encrypted CHECK decrypts with the test key to the same digest as plain."""
        request = self.check("encrypted-check-0.bin", fc.Command.CHECK, 0, 0, True)
        plain = fc.decode_request(self.load("plain-check-0.bin"))
        self.assertEqual(request.command.digest, plain.command.digest)
        self.assertEqual(request.command.shingles, plain.command.shingles)

    def test_encrypted_write(self) -> None:
        """The encrypted WRITE decrypts with the test key."""
        self.check("encrypted-write-0.bin", fc.Command.WRITE, 1, 10, True)

    def test_storage_replies(self) -> None:
        """The storage's 96-byte replies: WRITE accepted; exact hit with value, flag, ts 0."""
        digest = bytes(range(64, 128))
        client = fc.ClientEncryption(SERVER.public_key, CLIENT)
        for prefix, nm in (("storage-plain", None), ("storage-encrypted", client.nm)):
            write = fc.decode_reply(self.load(f"{prefix}-write-reply.bin"), nm)
            self.assertEqual((write.value, write.flag, write.tag, write.prob), (0, 3, 11, 1.0))
            hit = fc.decode_reply(self.load(f"{prefix}-check-hit-reply.bin"), nm)
            self.assertEqual(hit, fc.FuzzyReply(7, 3, 12, 1.0, digest, 0), prefix)

    def test_plain_reencodes_identically(self) -> None:
        """Decoding then encoding a captured plain datagram gives the same bytes."""
        for name in ("plain-check-0.bin", "plain-write-0.bin"):
            wire = self.load(name)
            self.assertEqual(fc.encode_request(fc.decode_request(wire).command), wire, name)


class StreamDecoderTests(unittest.TestCase):
    """TCP framing: u16 LE length prefix, pipelining, bounds."""

    def test_every_split_point(self) -> None:
        """Two pipelined frames come out whole wherever the bytes are split."""
        stream = fc.encode_frame(EXAMPLE_REQUEST) + fc.encode_frame(ENCRYPTED_REQUEST)
        for cut in range(len(stream) + 1):
            decoder = fc.FuzzyStreamDecoder()
            frames = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
            self.assertEqual(frames, [EXAMPLE_REQUEST, ENCRYPTED_REQUEST], cut)
            self.assertEqual(decoder.buffered, 0)

    def test_byte_at_a_time(self) -> None:
        """Feeding one byte at a time yields the frame on its last byte."""
        decoder = fc.FuzzyStreamDecoder()
        stream = fc.encode_frame(b"abc")
        self.assertEqual(
            [decoder.feed(stream[i : i + 1]) for i in range(len(stream))],
            [[], [], [], [], [b"abc"]],
        )

    def test_length_little_endian(self) -> None:
        """The prefix is little-endian."""
        self.assertEqual(fc.encode_frame(bytes(258))[:2], b"\x02\x01")

    def test_zero_length(self) -> None:
        """A zero length closes the connection (error) and the decoder stays failed."""
        decoder = fc.FuzzyStreamDecoder()
        self.assertRaises(fc.FuzzyProtocolError, decoder.feed, b"\x00\x00")
        self.assertRaises(fc.FuzzyProtocolError, decoder.feed, fc.encode_frame(b"x"))

    def test_too_long(self) -> None:
        """A length above the maximum is refused before any payload is buffered."""
        decoder = fc.FuzzyStreamDecoder(max_frame_length=100)
        self.assertRaises(fc.FuzzyProtocolError, decoder.feed, b"\x65\x00")
        self.assertRaises(
            fc.FuzzyProtocolError, fc.FuzzyStreamDecoder().feed, (8193).to_bytes(2, "little")
        )

    def test_maximum_accepted(self) -> None:
        """A frame of exactly the maximum length passes."""
        decoder = fc.FuzzyStreamDecoder()
        self.assertEqual(decoder.feed(fc.encode_frame(bytes(8192))), [bytes(8192)])

    def test_encode_frame_bounds(self) -> None:
        """Empty or oversized payloads cannot be framed."""
        self.assertRaises(fc.FuzzyProtocolError, fc.encode_frame, b"")
        self.assertRaises(fc.FuzzyProtocolError, fc.encode_frame, bytes(8193))

    def test_invalid_maximum(self) -> None:
        """A maximum outside 1..65535 is a programming error."""
        self.assertRaises(ValueError, fc.FuzzyStreamDecoder, 0)
        self.assertRaises(ValueError, fc.FuzzyStreamDecoder, 65536)


# --- property tests ---------------------------------------------------------

extensions = st.one_of(
    st.builds(fc.SourceDomain, st.binary(max_size=255)),
    st.builds(fc.SourceIPv4, st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1))),
    st.builds(fc.SourceIPv6, st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1))),
    st.builds(fc.SenderFacts, st.integers(0, 2**32 - 1)),
    st.builds(fc.UnknownExtension, st.integers(0x81, 0xFF), st.binary(max_size=255)),
)

commands = st.builds(
    fc.FuzzyCommand,
    version=st.sampled_from([4, 5, 0x14, 0x84]),
    command=st.integers(0, 255),
    tag=st.integers(0, 2**32 - 1),
    digest=st.binary(min_size=64, max_size=64),
    flag=st.integers(0, 255),
    value=st.integers(-(2**31), 2**31 - 1),
    shingles=st.one_of(st.just(()), st.tuples(*[st.integers(0, 2**64 - 1)] * 32)),
    extensions=st.lists(extensions, max_size=4).map(tuple),
)


class PropertyTests(unittest.TestCase):
    """Round trips and fuzzing of every decoder."""

    @settings(max_examples=200, deadline=None)
    @given(commands)
    def test_command_round_trip(self, command: fc.FuzzyCommand) -> None:
        """Any version 4+ command survives encode → decode."""
        self.assertEqual(fc.decode_request(fc.encode_request(command)).command, command)

    @settings(max_examples=60, deadline=None)
    @given(commands)
    def test_encrypted_round_trip(self, command: fc.FuzzyCommand) -> None:
        """Any command survives encryption to the server and back."""
        wire = fc.encode_request(command, fc.ClientEncryption(SERVER.public_key, CLIENT))
        self.assertEqual(fc.decode_request(wire, key_for_server).command, command)

    @settings(max_examples=300, deadline=None)
    @given(st.one_of(
        st.binary(max_size=600),
        st.binary(max_size=300).map(lambda tail: header(4, 0) + tail),
        st.binary(min_size=156, max_size=500).map(lambda tail: b"rsfe" + tail),
    ))  # fmt: skip
    def test_fuzz_decode_request(self, data: bytes) -> None:
        """Random datagrams decode or raise FuzzyProtocolError, nothing else."""
        try:
            request = fc.decode_request(data, key_for_server)
        except fc.FuzzyProtocolError:
            return
        self.assertEqual(len(request.command.digest), 64)

    @settings(max_examples=300, deadline=None)
    @given(
        st.one_of(st.binary(max_size=200), st.sampled_from([16, 96, 144, 56, 136, 184]).flatmap(
            lambda size: st.binary(min_size=size, max_size=size))),
        st.booleans(),
    )  # fmt: skip
    def test_fuzz_decode_reply(self, data: bytes, encrypted: bool) -> None:
        """Random replies decode or raise FuzzyProtocolError, nothing else."""
        try:
            reply = fc.decode_reply(data, bytes(32) if encrypted else None)
        except fc.FuzzyProtocolError:
            return
        self.assertFalse(encrypted)
        epoch = next(epoch for epoch, size in fc.REPLY_SIZES.items() if size == len(data))
        self.assertEqual(len(fc.encode_reply_body(reply, epoch)), len(data))

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.binary(max_size=40), max_size=12), st.integers(1, 64))
    def test_fuzz_stream_decoder(self, chunks: list[bytes], maximum: int) -> None:
        """Random chunks yield frames within bounds or raise FuzzyProtocolError."""
        decoder = fc.FuzzyStreamDecoder(max_frame_length=maximum)
        try:
            for chunk in chunks:
                for frame in decoder.feed(chunk):
                    self.assertTrue(1 <= len(frame) <= maximum)
        except fc.FuzzyProtocolError:
            return
        self.assertLessEqual(decoder.buffered, maximum + 2)


class FastPathTests(unittest.TestCase):
    """The server's fast paths give exactly what the general code gives."""

    @settings(max_examples=200, deadline=None)
    @given(commands)
    def test_decoded_command_as_if_validated(self, command: fc.FuzzyCommand) -> None:
        """A decoded command is a plain FuzzyCommand equal to one built field by field
        through the validating constructor, known codes as Command members."""
        decoded = fc.decode_request(fc.encode_request(command)).command
        self.assertIs(type(decoded), fc.FuzzyCommand)
        rebuilt = fc.FuzzyCommand(
            version=decoded.version, command=decoded.command, tag=decoded.tag,
            digest=decoded.digest, flag=decoded.flag, value=decoded.value,
            shingles=decoded.shingles, shingles_count=decoded.shingles_count,
            extensions=decoded.extensions)
        self.assertEqual((decoded, hash(decoded), repr(decoded)),
                         (rebuilt, hash(rebuilt), repr(rebuilt)))
        self.assertIs(type(decoded.command), type(rebuilt.command))

    def test_epoch_of_every_version_byte(self) -> None:
        """decode_command answers every version byte as epoch_for_version does."""
        for multi_flag in (False, True):
            for version in range(256):
                try:
                    expected: fc.Epoch | None = fc.epoch_for_version(version, multi_flag)
                except fc.FuzzyProtocolError:
                    expected = None
                try:
                    epoch: fc.Epoch | None = fc.decode_command(header(version, 0), multi_flag)[1]
                except fc.FuzzyProtocolError:
                    epoch = None
                self.assertEqual(epoch, expected, (version, multi_flag))

    @settings(max_examples=300, deadline=None)
    @given(
        st.sampled_from([3, 4, 5, 0x14]), st.booleans(), st.booleans(),
        st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([-(2**31) - 1, 2**31])),
        st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([-1, 2**32])),
        st.one_of(st.sampled_from([0.0, 1.0, 0.5, 27 / 32, 1e300, -1e300]),
                  st.floats(allow_nan=False)),
        st.one_of(st.just(DIGEST), st.binary(max_size=70)),
        st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([-1, 2**32])),
    )  # fmt: skip
    def test_encode_reply_values(self, version: int, multi_flag: bool, encrypted: bool,
                                 value: int, flag: int, prob: float, digest: bytes,
                                 ts: int) -> None:
        """encode_reply_values gives encode_reply's bytes, or raises as FuzzyReply does."""
        datagram = fc.encode_request(
            fc.FuzzyCommand(version, 0, 0xDEADBEEF, DIGEST),
            fc.ClientEncryption(SERVER.public_key, CLIENT) if encrypted else None)
        request = fc.decode_request(datagram, key_for_server, multi_flag=multi_flag)

        def nonce(size: int) -> bytes:
            return bytes(range(size))

        try:
            expected = fc.encode_reply(
                request, fc.FuzzyReply(value, flag, request.command.tag, prob, digest, ts), nonce)
        except fc.FuzzyProtocolError as error:
            with self.assertRaises(fc.FuzzyProtocolError) as raised:
                fc.encode_reply_values(request, value, flag, prob, digest, ts, nonce)
            self.assertEqual(str(raised.exception), str(error))
            return
        self.assertEqual(fc.encode_reply_values(request, value, flag, prob, digest, ts, nonce),
                         expected)
