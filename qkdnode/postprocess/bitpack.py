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

Bits = NDArray[np.uint8]

# 9 varint bytes carry 63 bits: every value fits in int64, so offsets never wrap.
_MAX_VARINT_BYTES: Final = 9
# Gap coding works through this many offsets (encoding) or varint bytes (decoding) at a time.
GAP_CHUNK: Final = 1 << 20


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
    return np.unpackbits(raw, count=bit_count, bitorder="little")


def pack_labels(values: NDArray[np.uint8], width: int) -> bytes:
    """Pack small unsigned labels (each < 2**width) ``width`` bits each, LSB first."""
    shifts = np.arange(width, dtype=np.uint8)
    bits = ((values[:, None] >> shifts) & 1).astype(np.uint8).ravel()
    return pack_bits(bits)


def unpack_labels(data: bytes, count: int, width: int, limit: int, *, field: str) -> Bits:
    """Inverse of :func:`pack_labels`; every label must be below ``limit``."""
    bits = unpack_bits(data, count * width, field=field).reshape(count, width)
    weights = (1 << np.arange(width, dtype=np.uint8)).astype(np.uint8)
    values: Bits = (bits * weights).sum(axis=1, dtype=np.uint8)
    if values.size and int(values.max()) >= limit:
        raise ProtocolError(f"labels must be below {limit}", field=field)
    return values


def encode_varints(values: NDArray[np.uint64]) -> bytes:
    """Encode non-negative integers (< 2**63) as concatenated unsigned LEB128 varints."""
    if values.size == 0:
        return b""
    values = values.astype(np.uint64, copy=False)
    lengths = np.ones(values.shape[0], dtype=np.int64)
    for k in range(1, _MAX_VARINT_BYTES + 1):
        lengths += values >= np.uint64(1 << (7 * k))
    if int(lengths.max()) > _MAX_VARINT_BYTES:
        raise ValueError("varint values must be below 2**63")
    ends = np.cumsum(lengths)
    starts = ends - lengths
    out = np.empty(int(ends[-1]), dtype=np.uint8)
    for k in range(int(lengths.max())):
        if k == 0:
            sel_values, sel_lengths, sel_starts = values, lengths, starts
        else:
            sel = np.flatnonzero(lengths > k)
            sel_values, sel_lengths, sel_starts = values[sel], lengths[sel], starts[sel]
        group = ((sel_values >> np.uint64(7 * k)) & np.uint64(0x7F)).astype(np.uint8)
        group |= (sel_lengths > k + 1).astype(np.uint8) << 7
        out[sel_starts + k] = group
    return out.tobytes()


def decode_varints(data: bytes, count: int, *, field: str) -> NDArray[np.uint64]:
    """Decode exactly ``count`` canonical LEB128 varints filling ``data``, each < 2**63."""
    if not isinstance(data, bytes):
        raise ProtocolError("expected bytes", field=field)
    raw = np.frombuffer(data, dtype=np.uint8)
    if count == 0:
        if raw.size:
            raise ProtocolError("expected no data for zero values", field=field)
        return np.zeros(0, dtype=np.uint64)
    ends = np.flatnonzero(raw < 0x80)
    if ends.size != count or int(ends[-1]) != raw.size - 1:
        raise ProtocolError(f"expected exactly {count} varints filling the data", field=field)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    longest = int(lengths.max())
    if longest > _MAX_VARINT_BYTES:
        raise ProtocolError("varint longer than 9 bytes", field=field)
    if longest > 1 and bool(np.any((lengths > 1) & (raw[ends] == 0))):
        raise ProtocolError("non-canonical varint (trailing zero group)", field=field)
    values = (raw[starts] & 0x7F).astype(np.uint64)
    for k in range(1, longest):
        sel = np.flatnonzero(lengths > k)
        values[sel] |= (raw[starts[sel] + k] & 0x7F).astype(np.uint64) << np.uint64(7 * k)
    return values


def encode_gaps(offsets: NDArray[np.int64]) -> bytes:
    """Encode strictly increasing non-negative offsets as varint gaps (module docstring).

    Works through ``GAP_CHUNK`` offsets at a time (a large block announces 10^7 detections):
    varints are self-delimiting, so the bytes are those of the whole array at once."""
    if offsets.size == 0:
        return b""
    parts = []
    previous = -1
    for start in range(0, offsets.shape[0], GAP_CHUNK):
        chunk = offsets[start : start + GAP_CHUNK]
        gaps = np.diff(chunk, prepend=np.int64(previous)) - 1
        if int(gaps.min()) < 0:
            raise ValueError("offsets must be non-negative and strictly increasing")
        parts.append(encode_varints(gaps.astype(np.uint64)))
        previous = int(chunk[-1])
    return parts[0] if len(parts) == 1 else b"".join(parts)


def decode_gaps(data: bytes, count: int, limit: int, *, field: str) -> NDArray[np.int64]:
    """Decode ``count`` strictly increasing offsets, every one in ``[0, limit)``.

    More than ``GAP_CHUNK`` offsets are decoded ``GAP_CHUNK`` bytes of varints at a time, so
    the temporary arrays stay small beside the result."""
    if count <= GAP_CHUNK:
        return _decode_gap_run(data, count, limit, field=field)
    if not isinstance(data, bytes):
        raise ProtocolError("expected bytes", field=field)
    raw = np.frombuffer(data, dtype=np.uint8)
    out = np.empty(count, dtype=np.int64)
    filled = 0
    position = 0
    after = 0  # the offset after the last one decoded: where the next gap counts from
    while position < raw.shape[0]:
        window = raw[position : position + GAP_CHUNK]
        terminators = np.flatnonzero(window < 0x80)
        if terminators.size == 0 or filled + terminators.size > count:
            raise ProtocolError(f"expected exactly {count} varints filling the data", field=field)
        cut = int(terminators[-1]) + 1
        offsets = _decode_gap_run(
            window[:cut].tobytes(), int(terminators.size), limit - after, field=field
        )
        out[filled : filled + offsets.shape[0]] = offsets
        out[filled : filled + offsets.shape[0]] += after
        filled += offsets.shape[0]
        after = int(out[filled - 1]) + 1
        position += cut
    if filled != count:
        raise ProtocolError(f"expected exactly {count} varints filling the data", field=field)
    return out


def _decode_gap_run(data: bytes, count: int, limit: int, *, field: str) -> NDArray[np.int64]:
    gaps = decode_varints(data, count, field=field)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    # Each gap below limit keeps every step <= 2**63; a wrap of the uint64 running sum would
    # show as a decrease, which is checked only when the sum could overflow at all.
    if int(gaps.max()) >= limit:
        raise ProtocolError(f"offsets must be below {limit}", field=field)
    steps = gaps + np.uint64(1)
    ends = np.cumsum(steps, dtype=np.uint64)
    if count * limit >= 1 << 64 and count > 1 and bool(np.any(ends[1:] <= ends[:-1])):
        raise ProtocolError(f"offsets must be below {limit}", field=field)
    if int(ends[-1]) > limit:
        raise ProtocolError(f"offsets must be below {limit}", field=field)
    ends -= np.uint64(1)
    return ends.astype(np.int64)
