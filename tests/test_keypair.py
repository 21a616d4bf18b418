"""Keypairs: ids as Rspamd computes them, config forms, and real ``rspamadm keypair``."""

from __future__ import annotations

import json
import shutil
import subprocess

from twisted.trial import unittest

from rspamd_tx.config.tree import ConfigError, Location, UclObject
from rspamd_tx.protocols import zbase32
from rspamd_tx.protocols.keypair import Keypair, KeypairError, PublicKey, decode_key, encode_key

# fuzzy-client-and-controller.md §10 (the fuzzy protocol's test key).
FUZZY_SECRET = bytes(range(0x10, 0x30))
FUZZY_PRIVKEY = "oerrtjoniofqbcrd4agatqad9yenntcrrjjc1uyfjtksnswfq3my"
FUZZY_PUBKEY = "as8zusgxdk9h5cd9dkogeno6y59mod59bw9iwk6qefbshj6c9z3y"
FUZZY_ID = (
    "zq8hzy8aut6uoxx58tzquxfpctpri1981ps86o7s4bxu5mm9gwif7etjqrr84ifmqw1m"
    "c9xqs6eoe6i59pi3mtky7a86bmd1cpei6fb"
)
# httpcrypt.md §8.
HTTP_SECRET = bytes(range(0x20))
HTTP_KEY_ID = bytes.fromhex(
    "d709c3fa421aa7b05b7c469cc0727a9cfb7804a9564d09698cfbc6ae077567e6"
    "b96c4b9c2ece9d31e309debed7a3c3f2c155ac2c78102ebe4edfd37841bd98c4"
)


class IdentifierTests(unittest.TestCase):
    """Key ids derived from the public key."""

    def test_fuzzy_vector(self) -> None:
        """The fuzzy test key gives the spec's pubkey, privkey, id and labels."""
        keypair = Keypair.from_secret(FUZZY_SECRET)
        self.assertEqual(keypair.public.encode(), FUZZY_PUBKEY)
        self.assertEqual(encode_key(keypair.secret_key), FUZZY_PRIVKEY)
        self.assertEqual(keypair.id_string, FUZZY_ID)
        self.assertEqual(keypair.fuzzy_key_id, bytes.fromhex("d89e3bad79437dbe"))
        self.assertEqual(zbase32.encode(keypair.fuzzy_key_id), "as8zusgxdk9hm")

    def test_http_vector(self) -> None:
        """The HTTPCrypt key id is BLAKE2b-512 of the public key; short id base32 zqngc7me."""
        keypair = Keypair.from_secret(HTTP_SECRET)
        self.assertEqual(keypair.key_id, HTTP_KEY_ID)
        self.assertEqual(keypair.short_id, HTTP_KEY_ID[:5])
        self.assertEqual(zbase32.encode(keypair.short_id), "zqngc7me")

    def test_short_id_is_id_prefix(self) -> None:
        """The short id's base32 is the first 8 characters of the id string."""
        keypair = Keypair.generate()
        self.assertEqual(zbase32.encode(keypair.short_id), keypair.id_string[:8])

    def test_generated_secret_is_clamped(self) -> None:
        """generate() clamps the secret like rspamadm and derives the public key."""
        keypair = Keypair.generate(lambda size: b"\xff" * size)
        self.assertEqual(keypair.secret_key[0] & 7, 0)
        self.assertEqual(keypair.secret_key[31] & 0xC0, 0x40)
        self.assertEqual(keypair, Keypair.from_secret(keypair.secret_key))

    def test_repr_hides_secret(self) -> None:
        """repr() shows the public key only."""
        keypair = Keypair.from_secret(FUZZY_SECRET)
        self.assertNotIn(FUZZY_PRIVKEY, repr(keypair))
        self.assertIn(FUZZY_PUBKEY, repr(keypair))

    def test_nm_matches_peer(self) -> None:
        """Two keypairs agree on the shared NM key."""
        server, client = Keypair.from_secret(FUZZY_SECRET), Keypair.from_secret(HTTP_SECRET)
        self.assertEqual(server.nm(client.public_key), client.nm(server.public_key))


class ConfigFormTests(unittest.TestCase):
    """Parsing the ``keypair { }`` forms Rspamd reads."""

    def test_wrapped_base32(self) -> None:
        """``keypair { pubkey; privkey; }`` in base32 parses."""
        keypair = Keypair.from_ucl({"keypair": {"pubkey": FUZZY_PUBKEY, "privkey": FUZZY_PRIVKEY}})
        self.assertEqual(keypair, Keypair.from_secret(FUZZY_SECRET))

    def test_aliases(self) -> None:
        """``public_key``/``secret_key`` aliases work unwrapped."""
        keypair = Keypair.from_ucl({"public_key": FUZZY_PUBKEY, "secret_key": FUZZY_PRIVKEY})
        self.assertEqual(keypair.secret_key, FUZZY_SECRET)

    def test_hex_and_base64(self) -> None:
        """``encoding = "hex"`` and ``"base64"`` decode keys in that form."""
        original = Keypair.from_secret(FUZZY_SECRET)
        for encoding in ("hex", "base64", "HEX"):
            mapping = original.as_mapping(encoding.lower())
            mapping["encoding"] = encoding
            self.assertEqual(Keypair.from_ucl(mapping), original, encoding)

    def test_configured_public_key_is_kept(self) -> None:
        """Like Rspamd, the configured pubkey is used as written (not re-derived)."""
        other = Keypair.from_secret(HTTP_SECRET).public.encode()
        keypair = Keypair.from_ucl({"pubkey": other, "privkey": FUZZY_PRIVKEY})
        self.assertEqual(keypair.public.encode(), other)

    def test_round_trip_through_mapping(self) -> None:
        """as_mapping() output parses back to the same keypair."""
        keypair = Keypair.generate()
        self.assertEqual(Keypair.from_ucl({"keypair": keypair.as_mapping()}), keypair)

    def test_to_ucl_text(self) -> None:
        """to_ucl() prints the rspamadm layout with every field."""
        text = Keypair.from_secret(FUZZY_SECRET).to_ucl()
        self.assertTrue(text.startswith("keypair {\n"))
        for line in (
            f'    pubkey = "{FUZZY_PUBKEY}";',
            f'    privkey = "{FUZZY_PRIVKEY}";',
            f'    id = "{FUZZY_ID}";',
            '    type = "kex";',
            '    algorithm = "curve25519";',
            '    encoding = "base32";',
        ):
            self.assertIn(line, text.splitlines())

    def test_to_json(self) -> None:
        """to_json() is the ``rspamadm keypair -j`` shape."""
        keypair = Keypair.from_secret(FUZZY_SECRET)
        self.assertEqual(json.loads(keypair.to_json()), {"keypair": keypair.as_mapping()})

    def test_missing_private_key(self) -> None:
        """A keypair without a private key is a KeypairError (a ConfigError)."""
        with self.assertRaises(ConfigError):
            Keypair.from_ucl({"pubkey": FUZZY_PUBKEY})

    def test_bad_key_carries_location(self) -> None:
        """A malformed key reports where it was written."""
        obj = UclObject(pubkey="short", privkey=FUZZY_PRIVKEY)
        obj.locations["pubkey"] = Location("local.d/worker-fuzzy.inc", 3, 5)
        with self.assertRaises(KeypairError) as caught:
            Keypair.from_ucl(obj)
        self.assertEqual(caught.exception.location, Location("local.d/worker-fuzzy.inc", 3, 5))

    def test_rejects_sign_and_nist(self) -> None:
        """Signing keys and NIST keys are refused."""
        for extra in ({"type": "sign"}, {"algorithm": "nistp256"}):
            mapping = {"pubkey": FUZZY_PUBKEY, "privkey": FUZZY_PRIVKEY, **extra}
            self.assertRaises(KeypairError, Keypair.from_ucl, mapping)

    def test_unknown_encoding(self) -> None:
        """An unknown ``encoding`` is refused."""
        mapping = {"pubkey": FUZZY_PUBKEY, "privkey": FUZZY_PRIVKEY, "encoding": "base58"}
        self.assertRaises(KeypairError, Keypair.from_ucl, mapping)

    def test_not_an_object(self) -> None:
        """A non-object is refused."""
        self.assertRaises(KeypairError, Keypair.from_ucl, "keypair")


class PublicKeyTests(unittest.TestCase):
    """Peer public keys (``encryption_key``, upstream ``key``)."""

    def test_parse(self) -> None:
        """A 52-character base32 key parses to 32 bytes."""
        self.assertEqual(PublicKey.parse(FUZZY_PUBKEY).raw[:4], bytes.fromhex("d89e3bad"))

    def test_wrong_length(self) -> None:
        """Keys that do not decode to 32 bytes are refused."""
        self.assertRaises(KeypairError, PublicKey.parse, FUZZY_PUBKEY[:40])
        self.assertRaises(KeypairError, PublicKey, bytes(31))

    def test_decode_key_errors(self) -> None:
        """Bad hex, base64 and base32 all raise KeypairError."""
        for text, encoding in (("zz", "hex"), ("!!!!", "base64"), ("ABC", "base32")):
            self.assertRaises(KeypairError, decode_key, text, encoding)


class RspamadmTests(unittest.TestCase):
    """Keys made by the real ``rspamadm keypair``."""

    skip = None if shutil.which("rspamadm") else "rspamadm is not installed"

    def test_rspamadm_json(self) -> None:
        """For an ``rspamadm keypair -j`` key, our id and public key equal Rspamd's."""
        printed = json.loads(subprocess.run(
            ["rspamadm", "keypair", "-j"], check=True, capture_output=True, timeout=30
        ).stdout)["keypair"]  # fmt: skip
        keypair = Keypair.from_ucl({"keypair": printed})
        self.assertEqual(keypair.id_string, printed["id"])
        self.assertEqual(Keypair.from_secret(keypair.secret_key).public, keypair.public)

    def test_rspamadm_ucl(self) -> None:
        """The default UCL output has the fields we print, with our id for its key."""
        text = subprocess.run(
            ["rspamadm", "keypair"], check=True, capture_output=True, timeout=30, text=True
        ).stdout
        fields = {}
        for line in text.splitlines():
            name, sep, value = line.strip().partition(" = ")
            if sep:
                fields[name] = value.rstrip(";").strip('"')
        keypair = Keypair.from_ucl(fields)
        self.assertEqual(set(fields), set(keypair.as_mapping()))
        self.assertEqual(keypair.as_mapping(), fields)
