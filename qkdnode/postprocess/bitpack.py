"""Packing bits, small labels and sorted indices into bytes for classical-channel messages.

Wire conventions (shared by every message of the post-processing stages):

- **Bits** (dtype uint8, values 0/1) are packed 8 per byte, *little-endian bit order*: element
  ``i`` is bit ``i % 8`` (value ``1 << (i % 8)``) of byte ``i // 8``. Unused high bits of the last
  byte must be zero, so every bit string has exactly one encoding.
- **Small labels** (e.g. intensity classes 0..2) are packed ``width`` bits each, least-significant
  bit first, into the same bit stream as above.
- **Sorted index sets** (pulse indices of detections, sample positions) are sent as *gaps*: for
  strictly increasing offsets ``o_0 < o_1 < ...`` the gaps are ``o_0`` and ``o_i - o_{i-1} - 1``
  (the number of skipped indices), each encoded as an unsigned LEB128 varint (7 bits per byte,
  least-significant group first, high bit set on every byte but the last; the shortest form only).

Every decoder validates its input completely and raises ``ProtocolError(field=...)``; no numpy
indexing or broadcasting error escapes on malformed data.
"""

from __future__ import annotations

from typing import Final

import numpy as np
from numpy.typing import NDArray

from qkdnode.errors import ProtocolError
from qkdnode.postprocess import bitpack_kernels

Bits = NDArray[np.uint8]


def check_bits(bits: NDArray[np.uint8], *, field: str) -> None:
    """Raise ProtocolError unless ``bits`` is a 1-D uint8 array holding only 0 and 1."""
    if not isinstance(bits, np.ndarray) or bits.dtype != np.uint8 or bits.ndim != 1:
        raise ProtocolError("expected a 1-D numpy uint8 array", field=field)
    if bits.size and int(bits.max()) > 1:
        raise ProtocolError("values must be 0 or 1", field=field)


def packed_length(bit_count: int) -> int:
    """Number of bytes that hold ``bit_count`` packed bits."""
    return (bit_count + 7) // 8


def pack_bits(bits: Bits) -> bytes:
    """Pack 0/1 values into bytes, little-endian bit order (see the module docstring)."""
    return np.packbits(bits, bitorder="little").tobytes()


def unpack_bits(data: bytes, bit_count: int, *, field: str) -> Bits:
    """Inverse of :func:`pack_bits`; checks the byte length and that padding bits are zero."""
    return np.unpackbits(
        _packed_bytes(data, bit_count, field=field), count=bit_count, bitorder="little"
    )


def _packed_bytes(data: bytes, bit_count: int, *, field: str) -> Bits:
    """``data`` as a uint8 array after checking it holds exactly ``bit_count`` packed bits."""
    if not isinstance(data, bytes):
        raise ProtocolError("expected bytes", field=field)
    if bit_count < 0:
        raise ProtocolError("bit count must be >= 0", field=field)
    if len(data) != packed_length(bit_count):
        raise ProtocolError(
            f"expected {packed_length(bit_count)} bytes for {bit_count} bits, got {len(data)}",
            field=field,
        )
    raw = np.frombuffer(data, dtype=np.uint8)
    spare = len(data) * 8 - bit_count
    if spare and int(raw[-1]) >> (8 - spare):
        raise ProtocolError("padding bits of the last byte must be zero", field=field)
    return raw


def pack_labels(values: NDArray[np.uint8], width: int) -> bytes:
    """Pack the low ``width`` bits (1..8) of each label, LSB first (module docstring)."""
    if not 1 <= width <= 8:
        raise ValueError("label width must be 1..8 bits")
    packed = np.empty(packed_length(values.shape[0] * width), dtype=np.uint8)
    bitpack_kernels.pack_label_bits(values, width, packed)
    return packed.tobytes()


def unpack_labels(data: bytes, count: int, width: int, limit: int, *, field: str) -> Bits:
    """Inverse of :func:`pack_labels`; every label must be below ``limit``."""
    if not 1 <= width <= 8:
        raise ValueError("label width must be 1..8 bits")
    raw = _packed_bytes(data, count * width, field=field)
    values = np.empty(count, dtype=np.uint8)
    largest = bitpack_kernels.unpack_label_bits(raw, width, values)
    if count and largest >= limit:
        raise ProtocolError(f"labels must be below {limit}", field=field)
    return values


def encode_gaps(offsets: NDArray[np.int64]) -> bytes:
    """Encode strictly increasing non-negative offsets as varint gaps (module docstring).

    Raises ValueError for negative or not strictly increasing offsets."""
    coded, increasing = bitpack_kernels.encode_gap_varints(offsets.astype(np.int64, copy=False))
    if not increasing:
        raise ValueError("offsets must be non-negative and strictly increasing")
    data: bytes = coded.tobytes()
    return data


# ProtocolError messages of the decode_gap_varints statuses.
_GAP_ERRORS: Final = {
    bitpack_kernels.GAPS_OVERLONG: "varint longer than 9 bytes",
    bitpack_kernels.GAPS_NON_CANONICAL: "non-canonical varint (trailing zero group)",
}


def decode_gaps(data: bytes, count: int, limit: int, *, field: str) -> NDArray[np.int64]:
    """Decode ``count`` strictly increasing offsets, every one in ``[0, limit)``.

    ``data`` must be exactly ``count`` canonical varints (module docstring), each at most 9
    bytes; offsets are int64, so a ``limit`` above 2**63 allows no more than 2**63."""
    if not isinstance(data, bytes):
        raise ProtocolError("expected bytes", field=field)
    if count == 0 and data:
        raise ProtocolError("expected no data for zero values", field=field)
    # every varint takes a byte at least: no array for more values than there are bytes
    if not 0 <= count <= len(data):
        raise ProtocolError(f"expected exactly {count} varints filling the data", field=field)
    max_offset = max(min(limit, 1 << 63) - 1, -1)
    offsets = np.empty(count, dtype=np.int64)
    status = bitpack_kernels.decode_gap_varints(
        np.frombuffer(data, dtype=np.uint8), max_offset, offsets
    )
    if status == bitpack_kernels.GAPS_WRONG_COUNT:
        raise ProtocolError(f"expected exactly {count} varints filling the data", field=field)
    if status == bitpack_kernels.GAPS_OUT_OF_RANGE:
        raise ProtocolError(f"offsets must be below {limit}", field=field)
    if status != bitpack_kernels.GAPS_OK:
        raise ProtocolError(_GAP_ERRORS[status], field=field)
    return offsets
