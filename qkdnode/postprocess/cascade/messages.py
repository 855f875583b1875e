"""Cascade wire messages: one ParityQuery (Bob -> Alice) and one ParityAnswer per round trip.

Fields are only ``int`` and ``bytes`` so the channel can msgpack them directly.

``ParityQuery``
    ``round_index``: 0, 1, 2, ... in order; the responder rejects any other.
    ``top_blocks``: int32 little-endian triples ``(pass, block_size, count)``: the parities of
    the first ``count`` top-level blocks of that pass, block ``j`` being the permuted positions
    ``[j * block_size, min((j + 1) * block_size, n))``. A whole pass costs 12 bytes.
    ``ranges``: int32 little-endian triples ``(pass, start, end)``: the parity of the permuted
    positions ``[start, end)`` of that pass (binary-search steps, any pass, any block).

``ParityAnswer``
    ``round_index``: the query's.
    ``count``: number of parity bits: the sum of the ``count`` of every top-level request, then
    one per range.
    ``parities``: the bits in that order (top-level requests first, each block by block, then the
    ranges), packed with ``numpy.packbits(bitorder="little")``: bit ``i`` is bit ``i % 8``
    (value ``1 << (i % 8)``) of byte ``i // 8``, as in ``qkdnode.postprocess.bitpack``. Unused
    high bits of the last byte must be zero, so every answer has exactly one encoding.

Constructors check types and lengths; ``ParityQuery.validate(n_bits, passes)`` checks every value
against the frame. Both raise ``ProtocolError(field=...)``, never an IndexError.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from qkdnode.errors import ProtocolError

_TRIPLE_BYTES: Final = 12
_WIRE_INT32: Final = np.dtype("<i4")


def _check_int(value: object, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError("must be an int", field=field)
    if value < 0:
        raise ProtocolError("must be >= 0", field=field)
    return value


def _check_bytes(value: object, field: str) -> bytes:
    if not isinstance(value, bytes):
        raise ProtocolError("must be bytes", field=field)
    return value


def encode_triples(triples: NDArray[np.signedinteger[Any]]) -> bytes:
    """(k, 3) integer array -> int32 little-endian bytes."""
    return np.ascontiguousarray(triples, dtype=_WIRE_INT32).tobytes()


def _decode_triples(raw: bytes, field: str) -> NDArray[np.int64]:
    if len(raw) % _TRIPLE_BYTES:
        raise ProtocolError(f"length {len(raw)} is not a multiple of {_TRIPLE_BYTES}", field=field)
    return np.frombuffer(raw, dtype=_WIRE_INT32).reshape(-1, 3).astype(np.int64)


@dataclass(frozen=True, slots=True, kw_only=True)
class ParityQuery:
    """Bob's parity questions of one round (see the module docstring for the encoding)."""

    round_index: int
    top_blocks: bytes = b""
    ranges: bytes = b""

    def __post_init__(self) -> None:
        _check_int(self.round_index, "round_index")
        for field in ("top_blocks", "ranges"):
            raw = _check_bytes(getattr(self, field), field)
            if len(raw) % _TRIPLE_BYTES:
                raise ProtocolError(
                    f"length {len(raw)} is not a multiple of {_TRIPLE_BYTES}", field=field
                )
        if not self.top_blocks and not self.ranges:
            raise ProtocolError("a query must ask at least one parity", field="ranges")

    def validate(
        self, n_bits: int, passes: int
    ) -> tuple[NDArray[np.int64], NDArray[np.int64], int]:
        """Decode and range-check against a frame of ``n_bits`` and a variant of ``passes``.

        Returns (top_blocks (k, 3), ranges (m, 3), answer bit count).
        """
        tops = _decode_triples(self.top_blocks, "top_blocks")
        ranges = _decode_triples(self.ranges, "ranges")
        limit = passes * n_bits  # never more than every parity of every pass
        if tops.shape[0]:
            pass_index, block_size, count = tops[:, 0], tops[:, 1], tops[:, 2]
            if bool(np.any((pass_index < 0) | (pass_index >= passes))):
                raise ProtocolError(f"pass index outside [0, {passes})", field="top_blocks")
            if bool(np.any((block_size < 1) | (block_size > n_bits))):
                raise ProtocolError(f"block size outside [1, {n_bits}]", field="top_blocks")
            blocks = (n_bits + np.maximum(block_size, 1) - 1) // np.maximum(block_size, 1)
            if bool(np.any((count < 1) | (count > blocks))):
                raise ProtocolError("block count outside [1, blocks in frame]", field="top_blocks")
        if ranges.shape[0]:
            pass_index, start, end = ranges[:, 0], ranges[:, 1], ranges[:, 2]
            if bool(np.any((pass_index < 0) | (pass_index >= passes))):
                raise ProtocolError(f"pass index outside [0, {passes})", field="ranges")
            if bool(np.any((start < 0) | (end > n_bits) | (start >= end))):
                raise ProtocolError(f"need 0 <= start < end <= {n_bits}", field="ranges")
        total = int(tops[:, 2].sum()) + int(ranges.shape[0])
        if total > limit:
            raise ProtocolError(f"asks {total} parities, more than {limit}", field="ranges")
        return tops, ranges, total


@dataclass(frozen=True, slots=True, kw_only=True)
class ParityAnswer:
    """Alice's parities for one query (see the module docstring for the bit order)."""

    round_index: int
    count: int
    parities: bytes

    def __post_init__(self) -> None:
        _check_int(self.round_index, "round_index")
        count = _check_int(self.count, "count")
        raw = _check_bytes(self.parities, "parities")
        if len(raw) != (count + 7) // 8:
            raise ProtocolError(
                f"expected {(count + 7) // 8} bytes for {count} bits", field="parities"
            )
        if count % 8 and raw[-1] >> (count % 8):
            raise ProtocolError("padding bits must be zero", field="parities")

    @classmethod
    def from_bits(cls, *, round_index: int, bits: NDArray[np.uint8]) -> ParityAnswer:
        """Pack 0/1 parity bits into an answer."""
        packed = np.packbits(bits.astype(np.uint8, copy=False), bitorder="little")
        return cls(round_index=round_index, count=int(bits.shape[0]), parities=packed.tobytes())

    def bits(self) -> NDArray[np.uint8]:
        """The ``count`` parity bits, unpacked (values 0/1)."""
        raw = np.frombuffer(self.parities, dtype=np.uint8)
        return np.unpackbits(raw, count=self.count, bitorder="little")
