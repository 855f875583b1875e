"""Wegman–Carter authentication: a polynomial hash over GF(2^128), one-time-pad encrypted.

Field: GF(2)[x] / (x^128 + x^7 + x^2 + x + 1); an element is a Python int whose bit i is the
coefficient of x^i; a 16-byte chunk maps to an element with ``int.from_bytes(chunk, "big")``.

Hash of a message of L 16-byte chunks m_1..m_L (zero-padded) under key h, with the byte length
as a final chunk m_{L+1}:  H_h(M) = sum_{i=1}^{L+1} m_i h^{L+2-i}  (Horner: y <- (y + m_i) h).
The family is epsilon-almost-XOR-universal with epsilon = (L+1) / 2^128 for messages of at most
L chunks (McGrew & Viega, "The Security and Performance of the Galois/Counter Mode", 2004,
Lemma 2; den Boer 1993). Wegman & Carter (JCSS 22:265, 1981, Sect. 4): tag = H_h(M) XOR pad with
a fresh uniform h and pad per message forges with probability at most epsilon, unconditionally.

Speed: multiplication by the fixed h uses 16 tables of 256 entries (Shoup's method, one table
per byte of the multiplicand). Long records are evaluated in lock step over lanes with numpy:
sum_i c_i h^(n-i) with i = r L + j equals sum_j h^(L-j) [sum_r c_(r,j) (h^L)^(m-1-r)], the inner
sums a Horner scheme in h^L run on all L lanes at once, the outer one the same problem again
with n = L (levels of 256 and 16 lanes, then the scalar loop).
"""

from __future__ import annotations

import hmac
import struct
from typing import Final

import numpy as np
from numpy.typing import NDArray

from qkdnode.errors import AuthenticationFailed, ProtocolError

BLOCK_BYTES: Final = 16
_MASK128: Final = (1 << 128) - 1
_REDUCE: Final = 0x87  # x^7 + x^2 + x + 1
_TOP: Final = 1 << 128


def gf_mul(a: int, b: int) -> int:
    """Product in GF(2^128) by shift-and-add (slow; used to build tables and in self-tests)."""
    result = 0
    while b:
        if b & 1:
            result ^= a
        b >>= 1
        a <<= 1
        if a & _TOP:
            a ^= _TOP | _REDUCE
    return result


def forgery_bound(chunks: int) -> float:
    """epsilon = (chunks + 1) / 2^128 for a message of ``chunks`` 16-byte chunks (see module)."""
    return (chunks + 1) / 2.0**128


class PolyHash:
    """Streaming H_h over a sequence of records; each record is length-prefixed and padded.

    ``absorb(record)`` appends ``u64 len || record || zero pad`` (an injective encoding of the
    record sequence), ``finish()`` appends the total byte length and returns the 16-byte hash.
    ``chunks`` counts absorbed chunks, so callers can bound epsilon.
    """

    __slots__ = ("_lanes", "_tables", "_y", "chunks", "total_bytes")

    def __init__(self, key: bytes) -> None:
        if len(key) != BLOCK_BYTES:
            raise ProtocolError("hash key must be 16 bytes", field="hash_key")
        h = int.from_bytes(key, "big")
        basis = []
        for _ in range(128):
            basis.append(h)
            h <<= 1
            if h & _TOP:
                h ^= _TOP | _REDUCE
        tables: list[list[int]] = []
        for k in range(16):
            table = [0]
            for bit in range(8):
                v = basis[8 * k + bit]
                table.extend([t ^ v for t in table])
            tables.append(table)
        self._tables = tables
        self._lanes: list[tuple[int, NDArray[np.uint64]]] | None = None
        self._y = 0
        self.chunks = 0
        self.total_bytes = 0

    def __repr__(self) -> str:
        return f"PolyHash(chunks={self.chunks})"

    def copy(self) -> PolyHash:
        """An independent hasher in the same state (the tables are shared, read-only)."""
        twin = PolyHash.__new__(PolyHash)
        twin._tables = self._tables
        twin._lanes = self._lanes
        twin._y = self._y
        twin.chunks = self.chunks
        twin.total_bytes = self.total_bytes
        return twin

    def absorb(self, record: bytes) -> None:
        pad = -(len(record) + 8) % BLOCK_BYTES
        data = struct.pack(">Q", len(record)) + record + bytes(pad)
        self._absorb_aligned(data)

    def finish(self) -> bytes:
        self._absorb_aligned(struct.pack(">QQ", 0, self.total_bytes))
        return self._y.to_bytes(BLOCK_BYTES, "big")

    def _absorb_aligned(self, data: bytes) -> None:
        count = len(data) // BLOCK_BYTES
        if count < VECTOR_MIN_CHUNKS:
            self._y = self._horner(self._y, data)
        else:
            chunks = np.frombuffer(data, dtype=np.uint8).reshape(count, BLOCK_BYTES).copy()
            chunks[0] ^= np.frombuffer(self._y.to_bytes(BLOCK_BYTES, "big"), dtype=np.uint8)
            self._y = self._evaluate(chunks, 0)
        self.chunks += count
        self.total_bytes += len(data)

    def _evaluate(self, chunks: NDArray[np.uint8], level: int) -> int:
        """sum_i c_i h^(n-i) over the rows of ``chunks`` (n x 16 bytes, big-endian elements)."""
        lanes = self._lane_tables()
        if level >= len(lanes) or chunks.shape[0] < 2 * lanes[level][0]:
            return self._horner(0, chunks.tobytes())
        width, table = lanes[level]
        rows = -(-chunks.shape[0] // width)
        padded = np.zeros((rows * width, BLOCK_BYTES), dtype=np.uint8)
        padded[rows * width - chunks.shape[0] :] = chunks  # leading zeros add nothing
        words = padded.view(np.uint64).reshape(rows, width, 2)
        acc = np.zeros((width, 2), dtype=np.uint64)
        for r in range(rows):
            # acc <- acc * h^width: per byte position p, look up T[p, byte] and XOR them up
            looked_up = np.take(table, acc.view(np.uint8).T + _TABLE_OFFSETS, axis=0)
            acc = looked_up[0] ^ words[r]
            for p in range(1, BLOCK_BYTES):
                acc ^= looked_up[p]
        return self._evaluate(acc.view(np.uint8), level + 1)

    def _lane_tables(self) -> list[tuple[int, NDArray[np.uint64]]]:
        if self._lanes is None:
            lanes = []
            for width in LANE_WIDTHS:
                power = self._horner(0, (1).to_bytes(BLOCK_BYTES, "big"))  # (0 + 1) h = h
                for _ in range(width - 1):
                    power = self._horner(0, power.to_bytes(BLOCK_BYTES, "big"))
                lanes.append((width, _byte_tables(power)))
            self._lanes = lanes
        return self._lanes

    def _horner(self, y: int, data: bytes) -> int:
        t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14, t15 = self._tables
        from_bytes = int.from_bytes
        for start in range(0, len(data), BLOCK_BYTES):
            y ^= from_bytes(data[start : start + BLOCK_BYTES], "big")
            y = (
                t0[y & 255]
                ^ t1[(y >> 8) & 255]
                ^ t2[(y >> 16) & 255]
                ^ t3[(y >> 24) & 255]
                ^ t4[(y >> 32) & 255]
                ^ t5[(y >> 40) & 255]
                ^ t6[(y >> 48) & 255]
                ^ t7[(y >> 56) & 255]
                ^ t8[(y >> 64) & 255]
                ^ t9[(y >> 72) & 255]
                ^ t10[(y >> 80) & 255]
                ^ t11[(y >> 88) & 255]
                ^ t12[(y >> 96) & 255]
                ^ t13[(y >> 104) & 255]
                ^ t14[(y >> 112) & 255]
                ^ t15[y >> 120]
            )
        return y


VECTOR_MIN_CHUNKS: Final = 64
LANE_WIDTHS: Final = (256, 16)
_TABLE_OFFSETS: Final = (np.arange(BLOCK_BYTES, dtype=np.intp) * 256)[:, None]


def _byte_tables(c: int) -> NDArray[np.uint64]:
    """Row 256 p + v: (v placed at big-endian byte p) * c, 16 bytes viewed as two uint64."""
    basis = []
    v = c
    for _ in range(128):
        basis.append(np.frombuffer(v.to_bytes(BLOCK_BYTES, "big"), dtype=np.uint8))
        v <<= 1
        if v & _TOP:
            v ^= _TOP | _REDUCE
    tables = np.zeros((BLOCK_BYTES, 256, BLOCK_BYTES), dtype=np.uint8)
    for p in range(BLOCK_BYTES):
        k = BLOCK_BYTES - 1 - p  # byte p of a big-endian element holds bits 8k .. 8k+7
        for bit in range(8):
            size = 1 << bit
            tables[p, size : 2 * size] = tables[p, :size] ^ basis[8 * k + bit]
    return tables.view(np.uint64).reshape(BLOCK_BYTES * 256, 2)


def wegman_carter_tag(hash_value: bytes, pad: bytes) -> bytes:
    """tag = H XOR pad (both 16 bytes)."""
    if len(hash_value) != BLOCK_BYTES or len(pad) != BLOCK_BYTES:
        raise ProtocolError("hash and pad must be 16 bytes", field="pad")
    return (int.from_bytes(hash_value, "big") ^ int.from_bytes(pad, "big")).to_bytes(16, "big")


def verify_tag(expected: bytes, received: bytes) -> None:
    """Constant-time comparison; raises ``AuthenticationFailed`` on mismatch."""
    if not hmac.compare_digest(expected, received):
        raise AuthenticationFailed("Wegman-Carter block tag does not verify")
