"""The relayed payload's cryptography: the one-time pad of a hop and the end-to-end confirmation.

The payload of a relay is the key K followed by a 256-bit one-time confirmation key r || s.
Each hop XORs it with as many pad bits (``one_time_pad``). The terminal answers the tag
``(H_r(key_id, route, K) + s) mod 2^128`` (``confirmation_tag``): the one-time Poly1305 of
``qkdnode.channel.wegman_carter`` under the fresh r and s (Wegman–Carter), so it is uniform
whatever K and may travel in the clear; the origin compares it with its own in constant time.
Each field is length-prefixed, so distinct (key ID, route, K) never give the same message.
``ciphertext_digest`` names a ciphertext so that a duplicate ``Forward`` is recognised without
keeping the pad.
"""

from __future__ import annotations

import hashlib
import struct
import uuid

from qkdnode.channel.wegman_carter import KEY_PART_BYTES, OneTimeTag
from qkdnode.relay.messages import CONFIRMATION_KEY_BITS


def confirmation_tag(
    key_id: uuid.UUID, route: tuple[str, ...], key: bytes, confirmation_key: bytes
) -> bytes:
    """The one-time Poly1305 tag of (key ID, route, key) under ``confirmation_key = r || s``
    (16 bytes each)."""
    if len(confirmation_key) != CONFIRMATION_KEY_BITS // 8:
        raise ValueError("the confirmation key is 32 bytes")
    tag = OneTimeTag(confirmation_key[:KEY_PART_BYTES], confirmation_key[KEY_PART_BYTES:])
    for field in (key_id.bytes, "/".join(route).encode("ascii"), key):
        tag.update(struct.pack(">I", len(field)))
        tag.update(field)
    return tag.finish()


def one_time_pad(data: bytes, pad: bytes) -> bytes:
    """``data XOR pad`` (equal lengths): encrypts and decrypts."""
    if len(data) != len(pad):
        raise ValueError("data and pad differ in length")
    return (int.from_bytes(data, "big") ^ int.from_bytes(pad, "big")).to_bytes(len(data), "big")


def ciphertext_digest(ciphertext: bytes) -> bytes:
    """SHA-256 of a ciphertext (public: it names a Forward, it hides nothing)."""
    return hashlib.sha256(ciphertext).digest()
