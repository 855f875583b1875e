"""Wegman–Carter tag over one block transcript: one-time Poly1305 under pool keys.

Family ``poly1305-v1``. Key: r (16 bytes) and s (16 bytes), both fresh pool bits, used for one
tag only. Tag over a message m of L bytes (RFC 8439, section 2.5):

    tag = (H_r(m) + s) mod 2^128,   H_r(m) = (c_1 r^q + ... + c_q r) mod (2^130 - 5),

c_i the i-th 16-byte chunk of m read little-endian with a 1 byte appended (q = ceil(L / 16)),
r clamped (22 of its 128 bits cleared, leaving 2^106 values). Computed by OpenSSL through
``cryptography``'s ``Poly1305``, fed incrementally as the transcript grows.

Bound: for distinct messages m, m' of at most L bytes and any g, the probability over a uniform
clamped r that H_r(m) - H_r(m') = g (mod 2^128) is at most 8 ceil(L / 16) / 2^106 (Bernstein,
"The Poly1305-AES message-authentication code", FSE 2005, LNCS 3557, section 3): the family is
epsilon-almost-Delta-universal for subtraction modulo 2^128. With s uniform and independent of
r, a tag hides H_r(m), and a forger who sees one (message, tag) pair and submits one other pair
of at most L bytes succeeds with probability at most epsilon = 8 ceil(L / 16) / 2^106,
unconditionally (Wegman & Carter, JCSS 22:265, 1981). Reusing r or s voids this; each
``OneTimeTag`` therefore tags or verifies exactly once.
"""

from __future__ import annotations

from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.poly1305 import Poly1305

from qkdnode.errors import AuthenticationFailed, ProtocolError

FAMILY: Final = "poly1305-v1"
KEY_PART_BYTES: Final = 16  # r and s each
TAG_BYTES: Final = 16
CHUNK_BYTES: Final = 16  # Poly1305 absorbs the message in 16-byte chunks


def forgery_bound(max_message_bytes: int) -> float:
    """epsilon = 8 ceil(L / 16) / 2^106 for messages of at most L bytes (see the module)."""
    if max_message_bytes < 0:
        raise ValueError("message length must be >= 0")
    return 8 * -(-max_message_bytes // CHUNK_BYTES) / 2.0**106


class OneTimeTag:
    """Streaming one-time Poly1305 over one message: ``update`` as the message grows, then
    ``finish`` (tag it) or ``verify`` (check a received tag) once; the key is spent then and
    any further use raises. ``message_bytes`` counts what was absorbed, for the caller's
    length limit (the bound above assumes one)."""

    __slots__ = ("_mac", "message_bytes")

    def __init__(self, r: bytes, s: bytes) -> None:
        if len(r) != KEY_PART_BYTES or len(s) != KEY_PART_BYTES:
            raise ProtocolError("Poly1305 r and s must be 16 bytes each", field="tag_key")
        self._mac: Poly1305 | None = Poly1305(r + s)
        self.message_bytes = 0

    def __repr__(self) -> str:
        spent = self._mac is None
        return f"OneTimeTag(family={FAMILY}, message_bytes={self.message_bytes}, spent={spent})"

    def update(self, data: bytes) -> None:
        self._live().update(data)
        self.message_bytes += len(data)

    def finish(self) -> bytes:
        """The tag of everything absorbed; spends the key."""
        mac = self._live()
        self._mac = None
        return mac.finalize()

    def verify(self, tag: bytes) -> None:
        """Constant-time check of ``tag``; spends the key; raises ``AuthenticationFailed``."""
        mac = self._live()
        self._mac = None
        try:
            mac.verify(tag)
        except InvalidSignature:
            raise AuthenticationFailed("block transcript tag does not verify") from None

    def _live(self) -> Poly1305:
        if self._mac is None:
            raise ProtocolError("a one-time tag key is used once only", field="transcript")
        return self._mac
