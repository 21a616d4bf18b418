"""Replication wire codec: message layouts as (message, bytes) tables, every split point,
sealing, and fuzzing that only ever raises the declared error."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from rspamd_tx.protocols import replication_codec as rc
from rspamd_tx.protocols.cryptobox import encrypt_nm
from rspamd_tx.protocols.keypair import Keypair

H = bytes.fromhex
DIGEST_A = bytes(range(64))
DIGEST_B = bytes(range(64, 128))
SHINGLES = tuple(range(1, 33))
NM = bytes(range(0x20, 0x40))
OTHER_NM = bytes(range(0x40, 0x60))
KEY = bytes(range(0x60, 0x80))

ADD = rc.UpdateRecord(kind=1, digest=DIGEST_A, flag=7, value=10)
DEL = rc.UpdateRecord(kind=2, digest=DIGEST_B, flag=1, value=0)
ADD_SHINGLES = rc.UpdateRecord(kind=1, digest=DIGEST_B, flag=2, value=-3, shingles=SHINGLES)

ADD_BYTES = H("01" "00000007" "000000000000000a") + DIGEST_A + H("00")
DEL_BYTES = H("02" "00000001" "0000000000000000") + DIGEST_B + H("00")
ADD_SHINGLES_BYTES = (
    H("01" "00000002" "fffffffffffffffd") + DIGEST_B + H("01")
    + b"".join(value.to_bytes(8, "big") for value in SHINGLES)
)
WEAK = rc.UpdateRecord(kind=1, digest=DIGEST_A, flag=7, value=10, weak=True)
WEAK_SHINGLES = rc.UpdateRecord(kind=1, digest=DIGEST_B, flag=2, value=-3, shingles=SHINGLES,
                                weak=True)
WEAK_BYTES = ADD_BYTES[:-1] + H("02")
WEAK_SHINGLES_BYTES = (
    H("01" "00000002" "fffffffffffffffd") + DIGEST_B + H("03")
    + b"".join(value.to_bytes(8, "big") for value in SHINGLES)
)

# (message, body bytes) for every message type.
BODIES: list[tuple[object, bytes]] = [
    (rc.Hello(KEY), b"RTXR" + H("01") + KEY),
    (rc.Auth(KEY), KEY),
    (rc.State(epoch=0x0102030405060708, revision=9),
     H("0102030405060708" "0000000000000009")),
    (rc.Batch(revision=5, updates=(ADD, DEL)),
     H("0000000000000005" "00000002") + ADD_BYTES + DEL_BYTES),
    (rc.Batch(revision=6, updates=(ADD_SHINGLES,)),
     H("0000000000000006" "00000001") + ADD_SHINGLES_BYTES),
    (rc.Batch(revision=7, updates=()), H("0000000000000007" "00000000")),
    (rc.Batch(revision=8, updates=(WEAK, WEAK_SHINGLES)),
     H("0000000000000008" "00000002") + WEAK_BYTES + WEAK_SHINGLES_BYTES),
    (rc.Ack(revision=2**64 - 1), H("ffffffffffffffff")),
    (rc.ResyncBegin(epoch=3, revision=4), H("0000000000000003" "0000000000000004")),
    (rc.ResyncChunk(updates=(ADD,)), H("00000001") + ADD_BYTES),
    (rc.ResyncFix(updates=(ADD_SHINGLES, DEL)), H("00000002") + ADD_SHINGLES_BYTES + DEL_BYTES),
    (rc.ResyncEnd(epoch=3, revision=4), H("0000000000000003" "0000000000000004")),
]

SEALED_MESSAGES = [message for message, _ in BODIES
                   if not isinstance(message, (rc.Hello, rc.Auth))]


def _sealed_stream(messages: list[object]) -> bytes:
    channel = rc.SealedChannel(NM, master=True)
    return b"".join(channel.seal(message) for message in messages)  # type: ignore[arg-type]


class MessageLayoutTests(unittest.TestCase):
    """Every message's body bytes, both ways."""

    def test_encode_bodies(self) -> None:
        """Each message encodes to the documented body layout."""
        for message, body in BODIES:
            self.assertEqual(message.encode_body(), body, message)  # type: ignore[attr-defined]

    def test_decode_bodies(self) -> None:
        """Each documented body decodes to its message."""
        for message, body in BODIES:
            decoded = type(message).decode_body(body)  # type: ignore[attr-defined]
            self.assertEqual(decoded, message)

    def test_plain_frames(self) -> None:
        """Handshake frames are u32 length, type byte, body."""
        self.assertEqual(rc.encode_plain(rc.Hello(KEY)),
                         H("00000026" "01") + b"RTXR" + H("01") + KEY)
        self.assertEqual(rc.encode_plain(rc.Auth(KEY)), H("00000021" "02") + KEY)

    def test_sealed_frame_layout(self) -> None:
        """A sealed frame carries the MAC then the ciphertext of type and body; nonce implied."""
        frame = rc.SealedChannel(NM, master=True).seal(rc.Ack(1))
        nonce = b"M" + bytes(15) + bytes(8)
        ciphertext, mac = encrypt_nm(H("22" "0000000000000001"), nonce, NM)
        self.assertEqual(frame, H("0000001a" "7f") + mac + ciphertext)

    def test_slave_direction_nonce(self) -> None:
        """The slave seals with direction byte S and its own counter."""
        channel = rc.SealedChannel(NM, master=False)
        channel.seal(rc.Ack(1))
        frame = channel.seal(rc.Ack(2))
        nonce = b"S" + bytes(15) + (1).to_bytes(8, "big")
        ciphertext, mac = encrypt_nm(H("22" "0000000000000002"), nonce, NM)
        self.assertEqual(frame[5:], mac + ciphertext)

    def test_sealed_round_trip(self) -> None:
        """Every sealed message survives seal on one side and open on the other."""
        decoder = rc.FrameDecoder()
        slave = rc.SealedChannel(NM, master=False)
        frames = decoder.feed(_sealed_stream(SEALED_MESSAGES))
        self.assertEqual([slave.open(frame) for frame in frames], SEALED_MESSAGES)


class SplitPointTests(unittest.TestCase):
    """Frames are recovered whatever way the stream is cut."""

    def test_every_split_point(self) -> None:
        """Feeding a stream in two pieces at every offset yields the same frames."""
        stream = rc.encode_plain(rc.Hello(KEY)) + _sealed_stream(SEALED_MESSAGES[:4])
        expected = rc.FrameDecoder().feed(stream)
        self.assertEqual(len(expected), 5)
        for cut in range(len(stream) + 1):
            decoder = rc.FrameDecoder()
            frames = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
            self.assertEqual(frames, expected, cut)
            self.assertEqual(decoder.pending, 0)

    def test_byte_by_byte(self) -> None:
        """One byte at a time also yields every frame, each when its last byte arrives."""
        stream = _sealed_stream(SEALED_MESSAGES)
        decoder = rc.FrameDecoder()
        frames: list[rc.Frame] = []
        for index in range(len(stream)):
            frames += decoder.feed(stream[index:index + 1])
        self.assertEqual(frames, rc.FrameDecoder().feed(stream))


class ErrorTests(unittest.TestCase):
    """Malformed data raises ReplicationCodecError."""

    def test_zero_length(self) -> None:
        """A zero length field is refused."""
        self.assertRaises(rc.ReplicationCodecError, rc.FrameDecoder().feed, H("00000000"))

    def test_oversized_length_before_body(self) -> None:
        """A length over the bound is refused from the header alone."""
        decoder = rc.FrameDecoder(max_length=100)
        self.assertRaises(rc.ReplicationCodecError, decoder.feed, H("00000065" "7f"))

    def test_bad_bodies(self) -> None:
        """Truncated, padded or inconsistent bodies are refused."""
        cases: list[tuple[type, bytes]] = [
            (rc.Hello, b"XTXR" + H("01") + KEY),
            (rc.Hello, b"RTXR" + H("01") + KEY[:-1]),
            (rc.Auth, KEY + b"\x00"),
            (rc.State, bytes(15)),
            (rc.Ack, bytes(9)),
            (rc.Batch, bytes(7)),
            (rc.Batch, H("0000000000000001")),
            (rc.Batch, H("0000000000000001" "00000002") + ADD_BYTES),
            (rc.Batch, H("0000000000000001" "ffffffff") + ADD_BYTES),
            (rc.Batch, H("0000000000000001" "00000001") + ADD_BYTES + b"\x00"),
            (rc.Batch, H("0000000000000001" "00000001") + H("03") + ADD_BYTES[1:]),
            (rc.Batch, H("0000000000000001" "00000001") + ADD_BYTES[:-1] + H("04")),
            (rc.Batch, H("0000000000000001" "00000001") + ADD_BYTES[:-1] + H("80")),
            (rc.Batch, H("0000000000000001" "00000001") + ADD_SHINGLES_BYTES[:-1]),
            (rc.ResyncChunk, H("00000001")),
            (rc.ResyncFix, H("00000000") + b"\x00"),
            (rc.ResyncBegin, bytes(17)),
            (rc.ResyncEnd, bytes(3)),
        ]
        for kind, body in cases:
            self.assertRaises(rc.ReplicationCodecError, kind.decode_body, body)

    def test_plain_refuses_sealed_types(self) -> None:
        """decode_plain refuses a sealed frame and unknown types."""
        for frame_type in (rc.SEALED_FRAME, rc.Ack.TYPE, 0x00, 0xFF):
            self.assertRaises(rc.ReplicationCodecError, rc.decode_plain, rc.Frame(frame_type, KEY))

    def test_wrong_key(self) -> None:
        """A frame sealed under another key fails its MAC."""
        frame = rc.FrameDecoder().feed(rc.SealedChannel(OTHER_NM, master=True).seal(rc.Ack(1)))[0]
        self.assertRaises(rc.ReplicationCodecError,
                          rc.SealedChannel(NM, master=False).open, frame)

    def test_replay(self) -> None:
        """The same frame received twice fails the second time (counter moved on)."""
        frame = rc.FrameDecoder().feed(rc.SealedChannel(NM, master=True).seal(rc.Ack(1)))[0]
        slave = rc.SealedChannel(NM, master=False)
        slave.open(frame)
        self.assertRaises(rc.ReplicationCodecError, slave.open, frame)

    def test_reorder(self) -> None:
        """A frame received before its predecessor fails."""
        frames = rc.FrameDecoder().feed(_sealed_stream([rc.Ack(1), rc.Ack(2)]))
        self.assertRaises(rc.ReplicationCodecError,
                          rc.SealedChannel(NM, master=False).open, frames[1])

    def test_reflection(self) -> None:
        """A master's frame sent back to the master does not verify (direction in nonce)."""
        master = rc.SealedChannel(NM, master=True)
        frame = rc.FrameDecoder().feed(master.seal(rc.Ack(1)))[0]
        self.assertRaises(rc.ReplicationCodecError, rc.SealedChannel(NM, master=True).open, frame)

    def test_handshake_inside_sealed(self) -> None:
        """A sealed frame whose inner type is a handshake message is refused."""
        nonce = b"M" + bytes(23)
        ciphertext, mac = encrypt_nm(bytes([rc.Auth.TYPE]) + KEY, nonce, NM)
        frame = rc.Frame(rc.SEALED_FRAME, mac + ciphertext)
        self.assertRaises(rc.ReplicationCodecError, rc.SealedChannel(NM, master=False).open, frame)

    def test_plain_frame_to_channel(self) -> None:
        """The channel refuses a plaintext frame type."""
        self.assertRaises(rc.ReplicationCodecError, rc.SealedChannel(NM, master=False).open,
                          rc.Frame(rc.Hello.TYPE, b"RTXR" + H("01") + KEY))

    def test_invalid_values(self) -> None:
        """Out-of-range fields are refused when building messages."""
        self.assertRaises(rc.ReplicationCodecError, rc.Ack, -1)
        self.assertRaises(rc.ReplicationCodecError, rc.State, 2**64, 0)
        self.assertRaises(rc.ReplicationCodecError, rc.UpdateRecord, 3, DIGEST_A, 0)
        self.assertRaises(rc.ReplicationCodecError, rc.UpdateRecord, 1, DIGEST_A[:-1], 0)
        self.assertRaises(rc.ReplicationCodecError, rc.UpdateRecord, 1, DIGEST_A, 2**32)
        self.assertRaises(rc.ReplicationCodecError, rc.UpdateRecord, 1, DIGEST_A, 0, 2**63)
        self.assertRaises(rc.ReplicationCodecError, rc.UpdateRecord, 1, DIGEST_A, 0, 0, (1,) * 31)
        self.assertRaises(rc.ReplicationCodecError, rc.UpdateRecord, 1, DIGEST_A, 0, 0, (-1,) * 32)
        self.assertRaises(rc.ReplicationCodecError, rc.Hello, KEY, 256)

    def test_too_many_updates_to_encode(self) -> None:
        """A batch over MAX_UPDATES_PER_FRAME cannot be encoded."""
        batch = rc.Batch(1, (ADD,) * (rc.MAX_UPDATES_PER_FRAME + 1))
        self.assertRaises(rc.ReplicationCodecError, batch.encode_body)

    def test_largest_batch_fits_a_frame(self) -> None:
        """MAX_UPDATES_PER_FRAME shingle records fit one sealed frame."""
        batch = rc.Batch(1, (ADD_SHINGLES,) * rc.MAX_UPDATES_PER_FRAME)
        frame = rc.SealedChannel(NM, master=True).seal(batch)
        self.assertLessEqual(len(frame) - 4, rc.MAX_FRAME_LENGTH)


records = st.builds(
    rc.UpdateRecord,
    kind=st.sampled_from(sorted(rc.KINDS)),
    digest=st.binary(min_size=64, max_size=64),
    flag=st.integers(0, 2**32 - 1),
    value=st.integers(-(2**63), 2**63 - 1),
    shingles=st.none() | st.tuples(*[st.integers(0, 2**64 - 1)] * 32),
)
u64 = st.integers(0, 2**64 - 1)
sealed_messages = st.one_of(
    st.builds(rc.State, u64, u64),
    st.builds(rc.Batch, u64, st.lists(records, max_size=4).map(tuple)),
    st.builds(rc.Ack, u64),
    st.builds(rc.ResyncBegin, u64, u64),
    st.builds(rc.ResyncChunk, st.lists(records, max_size=4).map(tuple)),
    st.builds(rc.ResyncFix, st.lists(records, max_size=4).map(tuple)),
    st.builds(rc.ResyncEnd, u64, u64),
)


class FuzzTests(unittest.TestCase):
    """Random input raises only ReplicationCodecError; valid messages round-trip."""

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.binary(max_size=64), max_size=8))
    def test_frame_decoder(self, chunks: list[bytes]) -> None:
        """Random chunks fed to the frame decoder raise nothing but the declared error."""
        decoder = rc.FrameDecoder(max_length=1024)
        try:
            for chunk in chunks:
                decoder.feed(chunk)
        except rc.ReplicationCodecError:
            pass

    @settings(max_examples=300, deadline=None)
    @given(st.integers(0, 255), st.binary(max_size=400))
    def test_plain_decoder(self, frame_type: int, body: bytes) -> None:
        """Random plaintext frames raise nothing but the declared error."""
        try:
            rc.decode_plain(rc.Frame(frame_type, body))
        except rc.ReplicationCodecError:
            pass

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=800))
    def test_sealed_with_random_plaintext(self, plaintext: bytes) -> None:
        """Correctly sealed random plaintexts raise nothing but the declared error."""
        ciphertext, mac = encrypt_nm(plaintext, b"M" + bytes(23), NM)
        try:
            rc.SealedChannel(NM, master=False).open(rc.Frame(rc.SEALED_FRAME, mac + ciphertext))
        except rc.ReplicationCodecError:
            pass

    @settings(max_examples=300, deadline=None)
    @given(st.integers(0, 255), st.binary(max_size=100))
    def test_sealed_with_random_frames(self, frame_type: int, body: bytes) -> None:
        """Random frames given to an established channel raise nothing but the declared error."""
        try:
            rc.SealedChannel(NM, master=False).open(rc.Frame(frame_type, body))
        except rc.ReplicationCodecError:
            pass

    @settings(max_examples=200, deadline=None)
    @given(sealed_messages)
    def test_round_trip(self, message: rc.SealedMessage) -> None:
        """Any valid sealed message survives sealing, framing and opening."""
        frames = rc.FrameDecoder().feed(rc.SealedChannel(NM, master=True).seal(message))
        self.assertEqual(rc.SealedChannel(NM, master=False).open(frames[0]), message)

    def test_handshake_key_agreement(self) -> None:
        """Master (static secret) and slave (ephemeral secret) derive the same channel key."""
        master = Keypair.from_secret(bytes(range(32)))
        ephemeral = Keypair.from_secret(bytes(range(1, 33)))
        self.assertEqual(master.nm(ephemeral.public_key), ephemeral.nm(master.public_key))
