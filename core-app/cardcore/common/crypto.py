"""Card and identity data protection: versioned keys, derived with HKDF from master keys.

Owns: the key ring (master keys by version, one of them current), everything derived from it,
and the only code that sees a full PAN after issuance:
- ``encrypt``/``decrypt``: AES-256-GCM, the ciphertext bound by its associated data to the row it
  belongs to (a card's ciphertext does not decrypt as another card's);
- ``tokens``: the keyed hash (HMAC-SHA-256) of a PAN for lookup, one per key version (during a
  rotation a card is found by either);
- ``id_hashes``: the keyed hash of a national id (a returning applicant), likewise;
- ``request_digest``: the keyed hash of a financial request kept with its idempotency record
  (so a PAN in a request body cannot be found again from it without the key);
- ``cvv2``: the card verification value, derived with a key and never stored.

Every ciphertext and keyed hash starts with its key version (2 bytes, big-endian), so keys rotate
without downtime: new data under the current version, old data found and read under its own
until it is rewrapped (the admin rewrap endpoint). Cards written before versions existed (key
version 0: a token and a ciphertext made from version 1's master key by plain SHA-256, without
associated data) are still found and read, until the rewrap moves them.
Never: log a PAN, a CVV2 or a key; return a PAN unmasked (the application's and the replacement's
answers are the exceptions, and do not come through here); derive anything without HKDF.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Mapping

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
NONCE_BYTES = 12
VERSION_BYTES = 2
VERSION_MAX = 65_535
_SALT = b"watertight card core key ring v1"
# the purposes each master key is split into (the HKDF info); a key serves one purpose only
PURPOSE_PAN_ENCRYPTION = b"pan encryption"
PURPOSE_PAN_TOKEN = b"pan token"
PURPOSE_ID_ENCRYPTION = b"national id encryption"
PURPOSE_ID_HASH = b"national id hash"
PURPOSE_REQUEST_DIGEST = b"idempotency request digest"
PURPOSE_CVV = b"card verification value"


class KeyRingError(ValueError):
    """The key ring is unusable; the message names what is wrong (never a key)."""


def derive(master: bytes, purpose: bytes) -> bytes:
    """A 32-byte key for one purpose, from a master key (HKDF-SHA-256)."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=_SALT, info=purpose).derive(master)


class _Version:
    """The keys derived from one master key."""

    def __init__(self, number: int, master: bytes) -> None:
        self.number = number
        self.prefix = struct.pack(">H", number)
        self.pan_aead = AESGCM(derive(master, PURPOSE_PAN_ENCRYPTION))
        self.id_aead = AESGCM(derive(master, PURPOSE_ID_ENCRYPTION))
        self.pan_token_key = derive(master, PURPOSE_PAN_TOKEN)
        self.id_hash_key = derive(master, PURPOSE_ID_HASH)
        self.request_key = derive(master, PURPOSE_REQUEST_DIGEST)
        self.cvv_key = derive(master, PURPOSE_CVV)

    def mac(self, key: bytes, data: bytes) -> bytes:
        return self.prefix + hmac.new(key, data, hashlib.sha256).digest()


def version_of(blob: bytes) -> int:
    """The key version a ciphertext or keyed hash was made with."""
    if len(blob) < VERSION_BYTES:
        raise KeyRingError("not a versioned ciphertext or hash")
    number: int = struct.unpack(">H", blob[:VERSION_BYTES])[0]
    return number


def _normalized_id(id_number: str) -> bytes:
    return id_number.strip().upper().encode("utf-8")


class PanVault:
    """The key ring of an app server: master keys by version, ``current`` for new data."""

    def __init__(self, keys: Mapping[int, bytes], current: int) -> None:
        if not keys:
            raise KeyRingError("the key ring is empty")
        for number, master in keys.items():
            if not 1 <= number <= VERSION_MAX:
                raise KeyRingError(f"key version {number} is not within 1..{VERSION_MAX}")
            if len(master) != KEY_BYTES:
                raise KeyRingError(
                    f"key version {number} must be {KEY_BYTES} bytes (64 hex characters), got {len(master)}"
                )
        if current not in keys:
            raise KeyRingError(f"the current key version {current} is not in the ring ({sorted(keys)})")
        self._versions = {number: _Version(number, master) for number, master in keys.items()}
        self.current = current
        # version 0: what the first release wrote with the master key that is now version 1
        self._legacy: tuple[AESGCM, bytes] | None = None
        if 1 in keys:
            self._legacy = (
                AESGCM(hashlib.sha256(b"enc" + keys[1]).digest()),
                hashlib.sha256(b"mac" + keys[1]).digest(),
            )
        # current first: the common case finds its row with the first token
        self.versions = [current, *sorted((v for v in keys if v != current), reverse=True)]

    @classmethod
    def single(cls, key: bytes) -> PanVault:
        """A ring of one master key, version 1 (``pan_key_hex`` in the settings)."""
        return cls({1: key}, 1)

    def _version(self, number: int) -> _Version:
        found = self._versions.get(number)
        if found is None:
            raise KeyRingError(
                f"key version {number} is not in this server's ring ({sorted(self._versions)})"
            )
        return found

    # ---- PANs --------------------------------------------------------------------------------

    def token(self, pan: str) -> bytes:
        """The lookup token of a PAN under the current key."""
        version = self._versions[self.current]
        return version.mac(version.pan_token_key, pan.encode("ascii"))

    def tokens(self, pan: str) -> list[bytes]:
        """Its token under every key of the ring, the current one first (and the version-0 token
        of a card not rewrapped yet)."""
        raw = pan.encode("ascii")
        found = [self._versions[v].mac(self._versions[v].pan_token_key, raw) for v in self.versions]
        if self._legacy is not None:
            found.append(hmac.new(self._legacy[1], raw, hashlib.sha256).digest())
        return found

    def encrypt(self, pan: str, card_id: str) -> bytes:
        """AES-GCM under the current key; the associated data binds it to ``card_id``."""
        version = self._versions[self.current]
        nonce = os.urandom(NONCE_BYTES)
        sealed = version.pan_aead.encrypt(nonce, pan.encode("ascii"), _pan_aad(card_id, version.prefix))
        return version.prefix + nonce + sealed

    def decrypt(self, blob: bytes, card_id: str, key_version: int) -> str:
        """The PAN of ``card_id``'s ciphertext (``key_version``: the card row's); InvalidTag when
        it is another card's or was altered."""
        if key_version == 0:
            if self._legacy is None:
                raise KeyRingError("a version-0 ciphertext needs key version 1 in the ring")
            return self._legacy[0].decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], None).decode("ascii")
        if version_of(blob) != key_version:
            raise KeyRingError(f"card {card_id}: its ciphertext is not of key version {key_version}")
        version = self._version(key_version)
        body = blob[VERSION_BYTES:]
        plain = version.pan_aead.decrypt(
            body[:NONCE_BYTES], body[NONCE_BYTES:], _pan_aad(card_id, version.prefix)
        )
        return plain.decode("ascii")

    # ---- national ids ------------------------------------------------------------------------

    def id_hash(self, id_number: str) -> bytes:
        version = self._versions[self.current]
        return version.mac(version.id_hash_key, _normalized_id(id_number))

    def id_hashes(self, id_number: str) -> list[bytes]:
        raw = _normalized_id(id_number)
        return [self._versions[v].mac(self._versions[v].id_hash_key, raw) for v in self.versions]

    def encrypt_id(self, id_number: str, customer_id: str) -> bytes:
        version = self._versions[self.current]
        nonce = os.urandom(NONCE_BYTES)
        sealed = version.id_aead.encrypt(
            nonce, _normalized_id(id_number), _id_aad(customer_id, version.prefix)
        )
        return version.prefix + nonce + sealed

    def decrypt_id(self, blob: bytes, customer_id: str) -> str:
        version = self._version(version_of(blob))
        body = blob[VERSION_BYTES:]
        return version.id_aead.decrypt(
            body[:NONCE_BYTES], body[NONCE_BYTES:], _id_aad(customer_id, version.prefix)
        ).decode("utf-8")

    # ---- idempotency -------------------------------------------------------------------------

    def request_digest(self, data: bytes, version: int | None = None) -> bytes:
        """The keyed digest of a request kept with its idempotency record (``version``: the one a
        stored record was made with, to compare a retry against it)."""
        chosen = self._version(self.current if version is None else version)
        return chosen.mac(chosen.request_key, data)

    def same_request(self, stored: bytes, data: bytes) -> bool:
        """Whether ``data`` is the request a stored digest was made of (constant time)."""
        try:
            version = version_of(stored)
            return hmac.compare_digest(stored, self.request_digest(data, version))
        except KeyRingError:
            return False

    # ---- card verification -------------------------------------------------------------------

    def cvv2(self, pan: str, expiry: str, version: int) -> str:
        """The 3-digit CVV2 of a card, under the key version it was issued with (it is printed on
        the card: a rotation does not change it): HMAC(pan, expiry) reduced to three digits."""
        key = self._version(version).cvv_key
        digest = hmac.new(key, f"{pan}|{expiry}|cvv2".encode("ascii"), hashlib.sha256).digest()
        return f"{int.from_bytes(digest[:8], 'big') % 1000:03d}"

    def cvv2_matches(self, pan: str, expiry: str, version: int, offered: str) -> bool:
        try:
            expected = self.cvv2(pan, expiry, version)
        except KeyRingError:
            return False
        return hmac.compare_digest(expected.encode("ascii"), offered.encode("ascii", "replace"))


def _pan_aad(card_id: str, prefix: bytes) -> bytes:
    return b"watertight pan|" + prefix + b"|" + card_id.encode("ascii")


def _id_aad(customer_id: str, prefix: bytes) -> bytes:
    return b"watertight national id|" + prefix + b"|" + customer_id.encode("ascii")


def parse_ring(document: Mapping[str, object]) -> PanVault:
    """A key ring file: ``{"current": 2, "keys": {"1": "<64 hex>", "2": "<64 hex>"}}``."""
    current = document.get("current")
    keys = document.get("keys")
    if not isinstance(current, int) or isinstance(current, bool):
        raise KeyRingError("current: must be the number of a key version")
    if not isinstance(keys, Mapping) or not keys:
        raise KeyRingError("keys: must map key versions to 64 hex characters")
    ring: dict[int, bytes] = {}
    for name, value in keys.items():
        if not isinstance(name, str) or not name.isdigit():
            raise KeyRingError(f"keys: {name!r} is not a key version number")
        if not isinstance(value, str):
            raise KeyRingError(f"keys.{name}: must be 64 hex characters")
        try:
            ring[int(name)] = bytes.fromhex(value)
        except ValueError:
            raise KeyRingError(f"keys.{name}: not hexadecimal") from None
    return PanVault(ring, current)
