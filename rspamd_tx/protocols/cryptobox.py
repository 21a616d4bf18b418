"""Rspamd's curve25519 cryptobox, as used by the fuzzy protocol and HTTPCrypt.

The construction (Rspamd ``src/libcryptobox/cryptobox.c``, curve25519 mode):

1. **Shared key** ("NM"): ``s = X25519(clamp(own_secret), peer_public)``,
   ``nm = HChaCha20(key=s, input=16 zero bytes)``.  This equals libsodium's
   ``crypto_box_curve25519xchacha20poly1305_beforenm`` and is *not* NaCl's
   HSalsa20-based ``crypto_box_beforenm``.
2. **Stream**: XChaCha20 with a 24-byte nonce: ``subkey = HChaCha20(nm,
   nonce[:16])``, then original (DJB) ChaCha20 with a 64-bit block counter and
   the 8-byte nonce ``nonce[16:]``.
3. **MAC key**: bytes 0..31 of keystream block 0 (bytes 32..63 are unused).
4. **Ciphertext**: plaintext XOR keystream from block 1 onwards.
5. **MAC**: Poly1305 over the ciphertext only (no associated data, no lengths).

It is neither NaCl secretbox nor the IETF XChaCha20-Poly1305 AEAD, so it is
assembled here from ``cryptography``'s ChaCha20 and Poly1305.  The module is
protocol-neutral: the fuzzy codec and the HTTPCrypt codec both build on it.
"""

from __future__ import annotations

import struct
from collections import OrderedDict

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.poly1305 import Poly1305

__all__ = [
    "KEY_BYTES",
    "MAC_BYTES",
    "NONCE_BYTES",
    "CryptoboxError",
    "NmKeyCache",
    "clamp_secret",
    "decrypt_nm",
    "encrypt_nm",
    "hchacha20",
    "nm_key",
    "open_sealed",
    "public_key_from_secret",
    "seal",
    "x25519",
]

KEY_BYTES = 32
"""Size of secret keys, public keys and NM keys."""
NONCE_BYTES = 24
"""Size of the XChaCha20 nonce that travels with every message."""
MAC_BYTES = 16
"""Size of the Poly1305 tag that travels with every message."""

_SIGMA = struct.unpack("<4I", b"expand 32-byte k")
_ZERO_INPUT = bytes(16)
_ZERO_BLOCK = bytes(64)


class CryptoboxError(ValueError):
    """Bad key or nonce size, an unusable public key, or a failed MAC check."""


def _check_size(name: str, value: bytes, size: int) -> None:
    if len(value) != size:
        raise CryptoboxError(f"{name} must be {size} bytes, got {len(value)}")


def _chacha20_xor(key: bytes, nonce8: bytes, counter: int, data: bytes) -> bytes:
    """DJB ChaCha20 (64-bit counter, 8-byte nonce) applied to ``data``."""
    state_tail = counter.to_bytes(8, "little") + nonce8
    encryptor = Cipher(algorithms.ChaCha20(key, state_tail), mode=None).encryptor()
    return encryptor.update(data) + encryptor.finalize()


def hchacha20(key: bytes, input16: bytes) -> bytes:
    """HChaCha20 (20 rounds) of a 16-byte input under a 32-byte key.

    Computed from one ChaCha20 block whose state words 12..15 are ``input16``:
    the final feed-forward addition is undone on the words HChaCha20 outputs
    (0..3 and 12..15).
    """
    _check_size("HChaCha20 key", key, KEY_BYTES)
    _check_size("HChaCha20 input", input16, 16)
    block = _chacha20_xor(key, input16[8:], int.from_bytes(input16[:8], "little"), _ZERO_BLOCK)
    words = struct.unpack("<16I", block)
    inputs = struct.unpack("<4I", input16)
    head = [(words[i] - _SIGMA[i]) & 0xFFFFFFFF for i in range(4)]
    tail = [(words[12 + i] - inputs[i]) & 0xFFFFFFFF for i in range(4)]
    return struct.pack("<8I", *head, *tail)


def clamp_secret(secret: bytes) -> bytes:
    """Clamp a 32-byte X25519 secret the way Rspamd does at generation and use."""
    _check_size("secret key", secret, KEY_BYTES)
    clamped = bytearray(secret)
    clamped[0] &= 248
    clamped[31] &= 127
    clamped[31] |= 64
    return bytes(clamped)


def public_key_from_secret(secret: bytes) -> bytes:
    """The X25519 public key of ``secret`` (clamped before use)."""
    _check_size("secret key", secret, KEY_BYTES)
    return X25519PrivateKey.from_private_bytes(secret).public_key().public_bytes_raw()


def x25519(secret: bytes, their_public: bytes) -> bytes:
    """Raw X25519 shared secret; ``secret`` is clamped before use.

    Raises :class:`CryptoboxError` for a public key of small order (the shared
    secret would be all zeros; Rspamd cannot use such a key either).
    """
    _check_size("secret key", secret, KEY_BYTES)
    _check_size("public key", their_public, KEY_BYTES)
    try:
        return X25519PrivateKey.from_private_bytes(secret).exchange(
            X25519PublicKey.from_public_bytes(their_public)
        )
    except ValueError as exc:
        raise CryptoboxError(f"unusable public key: {exc}") from None


def nm_key(their_public: bytes, my_secret: bytes) -> bytes:
    """Rspamd's precomputed shared key: HChaCha20(X25519(sk, pk), 0^16).

    Both directions of a conversation use the same NM key.  Raises
    :class:`CryptoboxError` for wrong sizes or an unusable public key.
    """
    return hchacha20(x25519(my_secret, their_public), _ZERO_INPUT)


def _stream_keys(nonce: bytes, nm: bytes) -> tuple[bytes, bytes, bytes]:
    """Return (subkey, 8-byte stream nonce, Poly1305 key) for one message."""
    _check_size("nonce", nonce, NONCE_BYTES)
    _check_size("NM key", nm, KEY_BYTES)
    subkey = hchacha20(nm, nonce[:16])
    nonce8 = nonce[16:]
    mac_key = _chacha20_xor(subkey, nonce8, 0, _ZERO_BLOCK[:32])
    return subkey, nonce8, mac_key


def encrypt_nm(plaintext: bytes, nonce: bytes, nm: bytes) -> tuple[bytes, bytes]:
    """Encrypt ``plaintext`` under ``nm`` with a 24-byte ``nonce``.

    Returns ``(ciphertext, mac)``; the ciphertext has the plaintext's length
    and the MAC is 16 bytes.  The caller must never reuse a nonce with the same
    NM key.
    """
    subkey, nonce8, mac_key = _stream_keys(nonce, nm)
    ciphertext = _chacha20_xor(subkey, nonce8, 1, bytes(plaintext))
    return ciphertext, Poly1305.generate_tag(mac_key, ciphertext)


def decrypt_nm(ciphertext: bytes, nonce: bytes, mac: bytes, nm: bytes) -> bytes:
    """Verify ``mac`` over ``ciphertext`` and return the plaintext.

    Raises :class:`CryptoboxError` when the MAC does not verify (wrong key,
    tampered data) or when a size is wrong.
    """
    _check_size("MAC", mac, MAC_BYTES)
    subkey, nonce8, mac_key = _stream_keys(nonce, nm)
    ciphertext = bytes(ciphertext)
    try:
        Poly1305.verify_tag(mac_key, ciphertext, mac)
    except InvalidSignature:
        raise CryptoboxError("MAC verification failed") from None
    return _chacha20_xor(subkey, nonce8, 1, ciphertext)


def seal(plaintext: bytes, nonce: bytes, nm: bytes) -> bytes:
    """``nonce ‖ mac ‖ ciphertext``: the layout of HTTPCrypt bodies and fuzzy replies."""
    ciphertext, mac = encrypt_nm(plaintext, nonce, nm)
    return bytes(nonce) + mac + ciphertext


def open_sealed(data: bytes, nm: bytes) -> bytes:
    """Inverse of :func:`seal`; raises :class:`CryptoboxError` if too short or forged."""
    header = NONCE_BYTES + MAC_BYTES
    if len(data) < header:
        raise CryptoboxError(f"sealed message shorter than {header} bytes")
    return decrypt_nm(data[header:], data[:NONCE_BYTES], data[NONCE_BYTES:header], nm)


class NmKeyCache:
    """A bounded LRU of NM keys keyed by (own secret key, peer public key).

    Clients reuse their key for many requests (Rspamd keeps 512 entries for the
    fuzzy storage and 1024 for HTTP), so the X25519 operation is done once per
    peer.  Not thread-safe; one cache per reactor thread.
    """

    def __init__(self, max_size: int = 512) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self.max_size = max_size
        self._entries: OrderedDict[tuple[bytes, bytes], bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, pair: object) -> bool:
        """``(their_public, my_secret) in cache``: whether that NM key is cached."""
        if not isinstance(pair, tuple) or len(pair) != 2:
            return False
        their_public, my_secret = pair
        return (bytes(my_secret), bytes(their_public)) in self._entries

    def get(self, their_public: bytes, my_secret: bytes) -> bytes:
        """The NM key for this pair, computed and cached on first use.

        Raises :class:`CryptoboxError` like :func:`nm_key` (failures are not
        cached).
        """
        cache_key = (bytes(my_secret), bytes(their_public))
        nm = self._entries.get(cache_key)
        if nm is not None:
            self._entries.move_to_end(cache_key)
            return nm
        nm = nm_key(their_public, my_secret)
        self._entries[cache_key] = nm
        if len(self._entries) > self.max_size:
            self._entries.popitem(last=False)
        return nm
