"""Rspamd curve25519 keypairs: generation, the config/``rspamadm keypair`` forms, ids.

Identifiers derived from a public key ``pk`` (32 raw bytes):

* ``key_id`` = BLAKE2b-512(pk), 64 bytes; printed by ``rspamadm keypair`` as
  ``id`` (103 base32 characters) and listed in ``allow_update_keys``;
* ``short_id`` = the first 5 bytes of ``key_id``; HTTPCrypt's ``Key`` header
  carries it (its base32 is the first 8 characters of the ``id`` string);
* ``fuzzy_key_id`` = the first 8 bytes of ``pk`` itself; the ``key_id`` field of
  the fuzzy ``rsfe`` request header and, base32-encoded, the label of the
  storage's per-key statistics.

The configuration form (``rspamd_keypair_from_ucl``) is an object, optionally
wrapped in ``keypair { }``, with ``pubkey|public|public_key``,
``privkey|private|private_key|secret|secret_key``, optional ``type`` (``kex``),
``algorithm`` (``curve25519``) and ``encoding`` (``base32`` default, ``hex``,
``base64``).  Like Rspamd, the ids come from the *configured* public key, which
is not checked against the secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from rspamd_tx.config.tree import ConfigError, Location
from rspamd_tx.protocols import zbase32
from rspamd_tx.protocols.cryptobox import (
    KEY_BYTES,
    clamp_secret,
    nm_key,
    public_key_from_secret,
)

__all__ = [
    "ENCODINGS",
    "FUZZY_KEY_ID_BYTES",
    "SHORT_ID_BYTES",
    "Keypair",
    "KeypairError",
    "PublicKey",
    "decode_key",
    "encode_key",
]

SHORT_ID_BYTES = 5
"""Length of the short key id (``RSPAMD_KEYPAIR_SHORT_ID_LEN``)."""
FUZZY_KEY_ID_BYTES = 8
"""Length of the fuzzy request header's key id (``RSPAMD_FUZZY_KEYLEN``)."""
ENCODINGS = ("base32", "hex", "base64")
"""Key text encodings accepted in configuration."""

_PUBLIC_NAMES = ("pubkey", "public", "public_key")
_SECRET_NAMES = ("privkey", "private", "private_key", "secret", "secret_key")


class KeypairError(ConfigError):
    """A key or keypair that cannot be used (bad encoding, size, type or algorithm)."""


def encode_key(raw: bytes, encoding: str = "base32") -> str:
    """Text form of raw key bytes in one of :data:`ENCODINGS`.

    Raises :class:`KeypairError` for an encoding not in :data:`ENCODINGS`.
    """
    if encoding == "base32":
        return zbase32.encode(raw)
    if encoding == "hex":
        return raw.hex()
    if encoding == "base64":
        return base64.b64encode(raw).decode("ascii")
    raise KeypairError(f"unknown key encoding {encoding!r}")


def decode_key(
    text: str,
    encoding: str = "base32",
    length: int = KEY_BYTES,
    location: Location | None = None,
) -> bytes:
    """Decode a key written in ``encoding``; it must give exactly ``length`` bytes.

    ``encoding`` is matched case-insensitively as Rspamd does.  Raises
    :class:`KeypairError` (carrying ``location`` if given) on failure.
    """
    kind = encoding.lower()
    try:
        if kind == "base32":
            raw = zbase32.decode(text)
        elif kind == "hex":
            raw = bytes.fromhex(text)
        elif kind == "base64":
            raw = base64.b64decode(text, validate=True)
        else:
            raise KeypairError(f"unknown key encoding {encoding!r}", location)
    except (ValueError, binascii.Error) as exc:
        raise KeypairError(f"invalid {kind} key: {exc}", location) from None
    if len(raw) != length:
        raise KeypairError(f"{kind} key decodes to {len(raw)} bytes, expected {length}", location)
    return raw


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A peer's curve25519 public key (e.g. a fuzzy rule's ``encryption_key``)."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != KEY_BYTES:
            raise KeypairError(f"public key must be {KEY_BYTES} bytes, got {len(self.raw)}")

    @classmethod
    def parse(cls, text: str, encoding: str = "base32") -> PublicKey:
        """Parse the text form; raises :class:`KeypairError`."""
        return cls(decode_key(text, encoding))

    @property
    def key_id(self) -> bytes:
        """BLAKE2b-512 of the raw key (64 bytes)."""
        return hashlib.blake2b(self.raw, digest_size=64).digest()

    @property
    def short_id(self) -> bytes:
        """First 5 bytes of :attr:`key_id`."""
        return self.key_id[:SHORT_ID_BYTES]

    @property
    def fuzzy_key_id(self) -> bytes:
        """First 8 bytes of the raw key: the fuzzy ``rsfe`` header's key id."""
        return self.raw[:FUZZY_KEY_ID_BYTES]

    @property
    def id_string(self) -> str:
        """Base32 of :attr:`key_id`: the ``id`` printed by ``rspamadm keypair``."""
        return zbase32.encode(self.key_id)

    def encode(self, encoding: str = "base32") -> str:
        """Text form of the key."""
        return encode_key(self.raw, encoding)


@dataclass(frozen=True, slots=True)
class Keypair:
    """A curve25519 key-exchange keypair.

    Attributes:
        secret_key: 32 raw secret bytes (clamped by Rspamd at use, so any 32
            bytes work).
        public: the public key; taken from configuration as written.
    """

    secret_key: bytes
    public: PublicKey

    def __post_init__(self) -> None:
        if len(self.secret_key) != KEY_BYTES:
            raise KeypairError(f"secret key must be {KEY_BYTES} bytes, got {len(self.secret_key)}")

    @classmethod
    def generate(cls, random_bytes: Callable[[int], bytes] = os.urandom) -> Keypair:
        """A fresh keypair with a clamped secret, as ``rspamadm keypair`` makes."""
        return cls.from_secret(clamp_secret(random_bytes(KEY_BYTES)))

    @classmethod
    def from_secret(cls, secret_key: bytes) -> Keypair:
        """The keypair whose public key is derived from ``secret_key``.

        Raises :class:`KeypairError` unless ``secret_key`` is 32 bytes.
        """
        if len(secret_key) != KEY_BYTES:
            raise KeypairError(f"secret key must be {KEY_BYTES} bytes, got {len(secret_key)}")
        return cls(bytes(secret_key), PublicKey(public_key_from_secret(secret_key)))

    @classmethod
    def from_ucl(cls, obj: Mapping[str, Any]) -> Keypair:
        """Parse a configured keypair (a UCL object or the JSON of ``rspamadm keypair -j``).

        Raises :class:`KeypairError` for missing keys, unsupported ``type`` or
        ``algorithm``, an unknown ``encoding`` or keys of the wrong size.
        """
        if not isinstance(obj, Mapping):
            raise KeypairError("keypair must be an object")
        inner = obj.get("keypair")
        if isinstance(inner, Mapping):
            obj = inner
        locations: Mapping[str, Location] = getattr(obj, "locations", {})

        def lookup(names: tuple[str, ...], what: str) -> tuple[str, Location | None]:
            for name in names:
                if name in obj:
                    value = obj[name]
                    if not isinstance(value, str):
                        raise KeypairError(f"keypair {name} must be a string", locations.get(name))
                    return value, locations.get(name)
            raise KeypairError(f"keypair has no {what} ({' / '.join(names)})")

        def option(name: str, default: str) -> str:
            value = obj.get(name, default)
            if not isinstance(value, str):
                return default
            return value.lower()

        key_type = option("type", "kex")
        if key_type != "kex":
            raise KeypairError(
                f"keypair type {key_type!r} is not supported (need 'kex')", locations.get("type")
            )
        algorithm = option("algorithm", "curve25519")
        if algorithm != "curve25519":
            raise KeypairError(
                f"keypair algorithm {algorithm!r} is not supported (need 'curve25519')",
                locations.get("algorithm"),
            )
        encoding = option("encoding", "base32")
        if encoding not in ENCODINGS:
            raise KeypairError(f"unknown keypair encoding {encoding!r}", locations.get("encoding"))
        public_text, public_location = lookup(_PUBLIC_NAMES, "public key")
        secret_text, secret_location = lookup(_SECRET_NAMES, "private key")
        secret = decode_key(secret_text, encoding, location=secret_location)
        public = decode_key(public_text, encoding, location=public_location)
        return cls(secret, PublicKey(public))

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte public key."""
        return self.public.raw

    @property
    def key_id(self) -> bytes:
        """BLAKE2b-512 of the public key."""
        return self.public.key_id

    @property
    def short_id(self) -> bytes:
        """First 5 bytes of :attr:`key_id`."""
        return self.public.short_id

    @property
    def fuzzy_key_id(self) -> bytes:
        """First 8 bytes of the public key (fuzzy ``rsfe`` header key id)."""
        return self.public.fuzzy_key_id

    @property
    def id_string(self) -> str:
        """The ``id`` string ``rspamadm keypair`` prints."""
        return self.public.id_string

    def nm(self, their_public: bytes) -> bytes:
        """The shared NM key with a peer; raises ``CryptoboxError`` for a bad peer key."""
        return nm_key(their_public, self.secret_key)

    def as_mapping(self, encoding: str = "base32") -> dict[str, str]:
        """The fields ``rspamadm keypair`` prints, in ``encoding``."""
        return {
            "pubkey": encode_key(self.public_key, encoding),
            "privkey": encode_key(self.secret_key, encoding),
            "id": self.id_string,
            "type": "kex",
            "algorithm": "curve25519",
            "encoding": encoding,
        }

    def to_ucl(self, encoding: str = "base32") -> str:
        """UCL text like ``rspamadm keypair``: ``keypair { pubkey = "…"; … }``."""
        lines = ["keypair {"]
        lines += [f'    {name} = "{value}";' for name, value in self.as_mapping(encoding).items()]
        lines.append("}")
        return "\n".join(lines) + "\n"

    def to_json(self, encoding: str = "base32") -> str:
        """JSON like ``rspamadm keypair -j``."""
        return json.dumps({"keypair": self.as_mapping(encoding)}, indent=4)

    def __repr__(self) -> str:
        return f"Keypair(public={self.public.encode()!r})"
