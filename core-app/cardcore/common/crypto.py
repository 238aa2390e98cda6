"""Card number protection: AES-GCM ciphertext for recovery, HMAC token for lookup.

Owns: the only code that sees a full PAN after issuance. Never: log a PAN, return it unmasked
(the application response is the one exception, and it does not come through here).
"""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32


class PanVault:
    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"pan_key must be {KEY_BYTES} bytes (64 hex characters), got {len(key)}")
        self._aead = AESGCM(hashlib.sha256(b"enc" + key).digest())
        self._mac_key = hashlib.sha256(b"mac" + key).digest()

    def token(self, pan: str) -> bytes:
        return hmac.new(self._mac_key, pan.encode("ascii"), hashlib.sha256).digest()

    def encrypt(self, pan: str) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, pan.encode("ascii"), None)

    def decrypt(self, blob: bytes) -> str:
        return self._aead.decrypt(blob[:12], blob[12:], None).decode("ascii")


def hash_id_number(id_number: str) -> bytes:
    """National ids are stored only as a hash: enough to find a returning applicant."""
    return hashlib.sha256(b"id:" + id_number.strip().upper().encode("utf-8")).digest()
