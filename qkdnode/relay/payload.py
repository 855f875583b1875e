"""The relayed payload's cryptography: the one-time pad of a hop and the end-to-end confirmation.

The payload of a relay is the key K followed by a 256-bit one-time confirmation key r || s.
Each hop XORs it with as many pad bits (``one_time_pad``). The terminal answers the tag
``H_r(key_id, route, K) XOR s`` (``confirmation_tag``): the GF(2^128) polynomial hash of
``qkdnode.channel.polyhash`` under a fresh key r, masked by a fresh s (Wegman–Carter), so it is
uniform whatever K and may travel in the clear; the origin compares it with its own in constant
time. ``ciphertext_digest`` names a ciphertext so that a duplicate ``Forward`` is recognised
without keeping the pad.
"""

from __future__ import annotations

import hashlib
import uuid

from qkdnode.channel.polyhash import PolyHash, wegman_carter_tag
from qkdnode.relay.messages import CONFIRMATION_KEY_BITS


def confirmation_tag(
    key_id: uuid.UUID, route: tuple[str, ...], key: bytes, confirmation_key: bytes
) -> bytes:
    """``H_r(key_id, route, key) XOR s`` with ``confirmation_key = r || s`` (16 bytes each)."""
    if len(confirmation_key) != CONFIRMATION_KEY_BITS // 8:
        raise ValueError("the confirmation key is 32 bytes")
    hasher = PolyHash(confirmation_key[:16])
    hasher.absorb(key_id.bytes)
    hasher.absorb("/".join(route).encode("ascii"))
    hasher.absorb(key)
    return wegman_carter_tag(hasher.finish(), confirmation_key[16:])


def one_time_pad(data: bytes, pad: bytes) -> bytes:
    """``data XOR pad`` (equal lengths): encrypts and decrypts."""
    if len(data) != len(pad):
        raise ValueError("data and pad differ in length")
    return (int.from_bytes(data, "big") ^ int.from_bytes(pad, "big")).to_bytes(len(data), "big")


def ciphertext_digest(ciphertext: bytes) -> bytes:
    """SHA-256 of a ciphertext (public: it names a Forward, it hides nothing)."""
    return hashlib.sha256(ciphertext).digest()
