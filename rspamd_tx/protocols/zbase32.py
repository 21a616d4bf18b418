"""Rspamd's base32 ("zbase32"): the text form of keys, key ids and hashes.

Rspamd uses the z-base-32 alphabet ``ybndrfg8ejkmcpqxot1uwisza345h769`` but
reads the input as a **little-endian bit stream**: each byte contributes its
bits from the least significant upwards and every character takes the next five
bits, least significant first.  A final partial group becomes one more
character.  This is neither RFC 4648 nor standard z-base-32 (which is
MSB-first), so neither ``base64.b32encode`` nor a z-base-32 library can be used.

Decoding mirrors Rspamd's ``rspamd_decode_base32_buf``: only the 32 lower-case
alphabet characters are accepted, bits are accumulated LSB-first and whatever is
left after the last character is flushed as one final byte.  Callers that need a
particular size (a 32-byte public key, a 5-byte short id) pass
``expected_length``.
"""

from __future__ import annotations

__all__ = ["ALPHABET", "Base32Error", "decode", "encode", "encoded_length"]

ALPHABET = "ybndrfg8ejkmcpqxot1uwisza345h769"

_DECODE_TABLE: dict[str, int] = {char: index for index, char in enumerate(ALPHABET)}


class Base32Error(ValueError):
    """The text is not valid Rspamd base32 (bad character or wrong length)."""


def encoded_length(byte_count: int) -> int:
    """Number of characters :func:`encode` produces for ``byte_count`` bytes."""
    return (byte_count * 8 + 4) // 5


def encode(data: bytes) -> str:
    """Encode ``data`` the way Rspamd prints keys and ids.

    Returns ``encoded_length(len(data))`` characters; ``b""`` encodes to ``""``.
    """
    out: list[str] = []
    acc = 0
    bits = 0
    for byte in data:
        acc |= byte << bits
        bits += 8
        while bits >= 5:
            out.append(ALPHABET[acc & 0x1F])
            acc >>= 5
            bits -= 5
    if bits:
        out.append(ALPHABET[acc & 0x1F])
    return "".join(out)


def decode(text: str | bytes, expected_length: int | None = None) -> bytes:
    """Decode Rspamd base32 ``text``.

    Accepts exactly the inputs Rspamd's decoder accepts: lower-case alphabet
    characters only (no padding, whitespace or upper case).  With
    ``expected_length`` the decoded value must have exactly that many bytes.

    Raises :class:`Base32Error` for any invalid input.
    """
    if isinstance(text, (bytes, bytearray, memoryview)):
        try:
            text = bytes(text).decode("ascii")
        except UnicodeDecodeError:
            raise Base32Error("non-ASCII byte in base32 text") from None
    # Rspamd decodes into a buffer of len * 5 / 8 + 1 bytes and fails when a
    # byte would be written past it.
    capacity = len(text) * 5 // 8 + 1
    out = bytearray()
    acc = 0
    bits = 0
    for position, char in enumerate(text):
        if bits >= 8:
            out.append(acc & 0xFF)
            acc >>= 8
            bits -= 8
        value = _DECODE_TABLE.get(char)
        if value is None:
            raise Base32Error(f"invalid base32 character {char!r} at offset {position}")
        if len(out) >= capacity:
            raise Base32Error("base32 text overflows its decoded size")
        acc |= value << bits
        bits += 5
    if bits and len(out) < capacity:
        out.append(acc & 0xFF)
    if expected_length is not None and len(out) != expected_length:
        raise Base32Error(f"base32 text decodes to {len(out)} bytes, expected {expected_length}")
    return bytes(out)
