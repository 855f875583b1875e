"""An independent implementation of the hybrid delivery key (docs/delivery.md), with hmac and
hashlib only, to check ``qkdnode.delivery.hybrid`` against (RFC 5869 written out by hand)."""

from __future__ import annotations

import hashlib
import hmac
import struct
import uuid


def hkdf_expand(prk: bytes, info: bytes, length_bytes: int) -> bytes:
    """RFC 5869, 2.3: T(i) = HMAC(PRK, T(i-1) || info || i), the first L bytes of T(1)T(2)..."""
    block, out, counter = b"", b"", 1
    while len(out) < length_bytes:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length_bytes]


def per_key_secret(shared: bytes, key_id: uuid.UUID) -> bytes:
    return hkdf_expand(
        shared, b"qkdnode hybrid delivery v1 per-key mlkem secret\x00" + key_id.bytes, 32
    )


def confirmation(shared: bytes, mlkem_public: bytes, ciphertext: bytes) -> bytes:
    info = b"qkdnode hybrid delivery v1 confirm\x00" + hashlib.sha256(mlkem_public).digest()
    return hkdf_expand(shared, info + ciphertext, 32)


def hybrid_key(
    qkd_key: bytes,
    mlkem_secret: bytes,
    *,
    key_id: uuid.UUID,
    master_sae: str,
    slave_sae: str,
    master_kme_id: str,
    slave_kme_id: str,
) -> bytes:
    """HKDF-Extract(salt = ML-KEM secret, IKM = QKD key), then Expand with the context."""
    prk = hmac.new(mlkem_secret, qkd_key, hashlib.sha256).digest()
    info = b"qkdnode hybrid delivery v1 key\x00"
    for field in (
        key_id.bytes,
        master_sae.encode(),
        slave_sae.encode(),
        master_kme_id.encode(),
        slave_kme_id.encode(),
    ):
        info += struct.pack(">H", len(field)) + field
    info += struct.pack(">I", 8 * len(qkd_key))
    return hkdf_expand(prk, info, len(qkd_key))
