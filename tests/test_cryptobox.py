"""Rspamd's curve25519 cryptobox against the spec vectors (httpcrypt §8, fuzzy §11.8)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from rspamd_tx.protocols import cryptobox

H = bytes.fromhex


# Each vector: own secret, peer secret, X25519 shared, NM, nonce, subkey,
# Poly1305 key, plaintext, ciphertext (None = not given), MAC.
HTTPCRYPT = {
    "server_sk": bytes(range(0x00, 0x20)),
    "server_pk": H("8f40c5adb68f25624ae5b214ea767a6ec94d829d3d7b5e1ad1ba6f3e2138285f"),
    "client_sk": bytes(range(0x20, 0x40)),
    "client_pk": H("358072d6365880d1aeea329adf9121383851ed21a28e3b75e965d0d2cd166254"),
    "shared": H("9663aa1da97e848a914a436d04163dfbb89178f107f1b5b77ed3854203382854"),
    "nm": H("f829d921c627acb72402ac20fb0d9353fe184bf3a042933e305be08fcc25d07e"),
    "nonce": bytes(range(0x40, 0x58)),
    "subkey": H("6fb10fd26859f34be969ce53dfe03dd5d81e59e257f4b1a0ff2104ae4ecedafa"),
    "poly_key": H("d1241d4d0abb3afe4cf1a095f9d0760b94837528a85085c40f9a5c23cf66a57a"),
    "plaintext": b"POST /checkv2 HTTP/1.0\r\nContent-Length: 5\r\nIP: 192.0.2.1\r\n\r\nhello",
    "ciphertext": H(
        "fdd896a8b6442371a439a9688eb2bce08b5f433383940f1b4bf952285c1de7a5"
        "6e96fe81da1baad50c50fb2626f6c162a841e01f05f2ed432aafdb224de1f95e2a"
    ),
    "mac": H("5df69bf527a993f106caca0bf44d4a38"),
}

FUZZY = {
    "server_sk": bytes(range(0x10, 0x30)),
    "server_pk": H("d89e3bad79437dbed9f843418304f460ff05c7fe81fe4a9577a804cb9367ff66"),
    "client_sk": bytes(range(0x40, 0x60)),
    "client_pk": H("79a631eede1bf9c98f12032cdeadd0e7a079398fc786b88cc846ec89af85a51a"),
    "shared": H("0b7480daab7ce8926aaf208e30ef89c8403f7d00aa3db0428f914ead05c85e09"),
    "nm": H("5f42b74f374241f3a733511c95d8970911a1b67199825db295503aa2695ab496"),
    "nonce": bytes(range(0x80, 0x98)),
    "subkey": H("0d08fb1a9eff087963863eda3ead376866047cc9925401e47265c2cac4a4f377"),
    "poly_key": H("b7101d193c69c8267ba40b34aab7b384e9de2655272739f1b9fc08b0be3712e6"),
    "mac": H("e17e8fc87b81174609b043699bedffc3"),
}

VECTORS = [("httpcrypt §8", HTTPCRYPT), ("fuzzy §11.8", FUZZY)]


class KeyAgreementTests(unittest.TestCase):
    """Public keys, X25519 and the HChaCha20 NM key."""

    def test_public_keys(self) -> None:
        """Public keys derive from (unclamped) secrets as in the vectors."""
        for name, vector in VECTORS:
            for side in ("server", "client"):
                self.assertEqual(
                    cryptobox.public_key_from_secret(vector[f"{side}_sk"]),
                    vector[f"{side}_pk"],
                    name,
                )

    def test_shared_secret(self) -> None:
        """X25519 gives the vector's shared secret."""
        for name, vector in VECTORS:
            self.assertEqual(
                cryptobox.x25519(vector["server_sk"], vector["client_pk"]), vector["shared"], name
            )

    def test_nm_key_both_sides(self) -> None:
        """Server and client compute the same NM key, equal to the vector."""
        for name, vector in VECTORS:
            self.assertEqual(
                cryptobox.nm_key(vector["client_pk"], vector["server_sk"]), vector["nm"], name
            )
            self.assertEqual(
                cryptobox.nm_key(vector["server_pk"], vector["client_sk"]), vector["nm"], name
            )

    def test_hchacha20_subkey(self) -> None:
        """HChaCha20(nm, nonce[:16]) is the vector's XChaCha20 subkey."""
        for name, vector in VECTORS:
            self.assertEqual(
                cryptobox.hchacha20(vector["nm"], vector["nonce"][:16]), vector["subkey"], name
            )

    def test_hchacha20_rfc_vector(self) -> None:
        """HChaCha20 matches draft-irtf-cfrg-xchacha §2.2.1."""
        key = bytes(range(32))
        nonce = H("000000090000004a0000000031415927")
        self.assertEqual(
            cryptobox.hchacha20(key, nonce),
            H("82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc"),
        )

    def test_clamping_is_idempotent_for_keys(self) -> None:
        """A clamped secret has the same public key as the raw one."""
        secret = bytes(range(0x10, 0x30))
        self.assertEqual(
            cryptobox.public_key_from_secret(cryptobox.clamp_secret(secret)),
            cryptobox.public_key_from_secret(secret),
        )

    def test_small_order_public_key(self) -> None:
        """An all-zero (small order) public key raises CryptoboxError."""
        self.assertRaises(cryptobox.CryptoboxError, cryptobox.nm_key, bytes(32), bytes(range(32)))

    def test_wrong_sizes(self) -> None:
        """Keys of the wrong size raise CryptoboxError."""
        self.assertRaises(cryptobox.CryptoboxError, cryptobox.nm_key, bytes(31), bytes(32))
        self.assertRaises(cryptobox.CryptoboxError, cryptobox.nm_key, bytes(32), bytes(33))


class EncryptionTests(unittest.TestCase):
    """Encrypt-then-MAC exactly as ``rspamd_cryptobox_encryptv_nm_inplace``."""

    def test_httpcrypt_vector(self) -> None:
        """The HTTPCrypt plaintext encrypts to the vector's ciphertext and MAC."""
        v = HTTPCRYPT
        self.assertEqual(
            cryptobox.encrypt_nm(v["plaintext"], v["nonce"], v["nm"]), (v["ciphertext"], v["mac"])
        )

    def test_httpcrypt_vector_decrypts(self) -> None:
        """The vector's ciphertext decrypts to the plaintext."""
        v = HTTPCRYPT
        self.assertEqual(
            cryptobox.decrypt_nm(v["ciphertext"], v["nonce"], v["mac"], v["nm"]), v["plaintext"]
        )

    def test_fuzzy_request_mac(self) -> None:
        """The fuzzy §14 command encrypts with the §11.8 request MAC."""
        command = H(
            "04000000000000004d3c2b1a55c03e2b402533882ec12fede7eafd9deee21062"
            "14abca36ae8b545b5b5e13bf1db11acb402a073a2b7f160a88ecd1b495f04b99"
            "1044b7718a9fd8a3c0459e1c"
        )
        ciphertext, mac = cryptobox.encrypt_nm(command, FUZZY["nonce"], FUZZY["nm"])
        self.assertEqual(mac, FUZZY["mac"])
        self.assertEqual(ciphertext[:4], H("d456f411"))

    def test_poly1305_key_is_block_zero(self) -> None:
        """The MAC of an empty message uses keystream block 0 (vector poly key)."""
        from cryptography.hazmat.primitives.poly1305 import Poly1305

        for name, vector in VECTORS:
            _, mac = cryptobox.encrypt_nm(b"", vector["nonce"], vector["nm"])
            self.assertEqual(mac, Poly1305.generate_tag(vector["poly_key"], b""), name)

    def test_tampered_ciphertext(self) -> None:
        """A flipped ciphertext bit fails the MAC check."""
        v = HTTPCRYPT
        bad = bytes([v["ciphertext"][0] ^ 1]) + v["ciphertext"][1:]
        self.assertRaises(
            cryptobox.CryptoboxError, cryptobox.decrypt_nm, bad, v["nonce"], v["mac"], v["nm"]
        )

    def test_wrong_key(self) -> None:
        """Decrypting with another NM key fails."""
        v = HTTPCRYPT
        self.assertRaises(
            cryptobox.CryptoboxError,
            cryptobox.decrypt_nm,
            v["ciphertext"],
            v["nonce"],
            v["mac"],
            FUZZY["nm"],
        )

    def test_wrong_nonce_size(self) -> None:
        """A nonce that is not 24 bytes raises CryptoboxError."""
        self.assertRaises(
            cryptobox.CryptoboxError, cryptobox.encrypt_nm, b"x", bytes(16), bytes(32)
        )

    def test_seal_layout(self) -> None:
        """seal() is nonce ‖ mac ‖ ciphertext and open_sealed() inverts it."""
        v = HTTPCRYPT
        sealed = cryptobox.seal(v["plaintext"], v["nonce"], v["nm"])
        self.assertEqual(sealed, v["nonce"] + v["mac"] + v["ciphertext"])
        self.assertEqual(cryptobox.open_sealed(sealed, v["nm"]), v["plaintext"])

    def test_open_sealed_too_short(self) -> None:
        """Fewer than 40 bytes cannot be a sealed message."""
        self.assertRaises(cryptobox.CryptoboxError, cryptobox.open_sealed, bytes(39), bytes(32))

    @settings(max_examples=100, deadline=None)
    @given(
        st.binary(max_size=300),
        st.binary(min_size=24, max_size=24),
        st.binary(min_size=32, max_size=32),
    )
    def test_round_trip(self, plaintext: bytes, nonce: bytes, nm: bytes) -> None:
        """Anything encrypted decrypts back, and the ciphertext keeps the length."""
        ciphertext, mac = cryptobox.encrypt_nm(plaintext, nonce, nm)
        self.assertEqual(len(ciphertext), len(plaintext))
        self.assertEqual(cryptobox.decrypt_nm(ciphertext, nonce, mac, nm), plaintext)

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=200), st.binary(min_size=32, max_size=32))
    def test_fuzz_open_sealed(self, data: bytes, nm: bytes) -> None:
        """Random data never opens and raises only CryptoboxError."""
        self.assertRaises(cryptobox.CryptoboxError, cryptobox.open_sealed, data, nm)


class NmKeyCacheTests(unittest.TestCase):
    """The bounded LRU of NM keys."""

    def test_returns_nm_key(self) -> None:
        """The cache gives the same key as nm_key()."""
        cache = cryptobox.NmKeyCache(2)
        self.assertEqual(cache.get(FUZZY["client_pk"], FUZZY["server_sk"]), FUZZY["nm"])

    def test_bounded_least_recently_used(self) -> None:
        """Beyond max_size the least recently used entry is dropped."""
        cache = cryptobox.NmKeyCache(2)
        sk = FUZZY["server_sk"]
        peers = [cryptobox.public_key_from_secret(bytes([i]) * 32) for i in (1, 2, 3)]
        cache.get(peers[0], sk)
        cache.get(peers[1], sk)
        cache.get(peers[0], sk)
        cache.get(peers[2], sk)
        self.assertEqual(len(cache), 2)
        self.assertIn((peers[0], sk), cache)
        self.assertNotIn((peers[1], sk), cache)
        self.assertIn((peers[2], sk), cache)

    def test_failures_not_cached(self) -> None:
        """A bad peer key raises and leaves the cache empty."""
        cache = cryptobox.NmKeyCache(2)
        self.assertRaises(cryptobox.CryptoboxError, cache.get, bytes(32), FUZZY["server_sk"])
        self.assertEqual(len(cache), 0)

    def test_size_must_be_positive(self) -> None:
        """max_size 0 is refused."""
        self.assertRaises(ValueError, cryptobox.NmKeyCache, 0)
