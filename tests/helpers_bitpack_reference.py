"""The numpy wire coding the compiled kernels of ``bitpack`` replaced (test reference).

These are the implementations ``qkdnode.postprocess.bitpack`` used before its numba kernels,
unchanged but for the chunk size being a parameter: whole-array numpy passes over ``chunk``
offsets (encoding) or varint bytes (decoding) at a time. The tests compare bytes, arrays and
errors with them.
"""

from __future__ import annotations

from typing import Final

import numpy as np
from numpy.typing import NDArray

from qkdnode.errors import ProtocolError
from qkdnode.postprocess.bitpack import Bits, pack_bits, unpack_bits

_MAX_VARINT_BYTES: Final = 9
CHUNK: Final = 1 << 20


def pack_labels(values: NDArray[np.uint8], width: int) -> bytes:
    shifts = np.arange(width, dtype=np.uint8)
    bits = ((values[:, None] >> shifts) & 1).astype(np.uint8).ravel()
    return pack_bits(bits)


def unpack_labels(data: bytes, count: int, width: int, limit: int, *, field: str) -> Bits:
    bits = unpack_bits(data, count * width, field=field).reshape(count, width)
    weights = (1 << np.arange(width, dtype=np.uint8)).astype(np.uint8)
    values: Bits = (bits * weights).sum(axis=1, dtype=np.uint8)
    if values.size and int(values.max()) >= limit:
        raise ProtocolError(f"labels must be below {limit}", field=field)
    return values


def encode_varints(values: NDArray[np.uint64]) -> bytes:
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


def encode_gaps(offsets: NDArray[np.int64], chunk: int = CHUNK) -> bytes:
    if offsets.size == 0:
        return b""
    parts = []
    previous = -1
    for start in range(0, offsets.shape[0], chunk):
        part = offsets[start : start + chunk]
        gaps = np.diff(part, prepend=np.int64(previous)) - 1
        if int(gaps.min()) < 0:
            raise ValueError("offsets must be non-negative and strictly increasing")
        parts.append(encode_varints(gaps.astype(np.uint64)))
        previous = int(part[-1])
    return parts[0] if len(parts) == 1 else b"".join(parts)


def decode_gaps(
    data: bytes, count: int, limit: int, *, field: str, chunk: int = CHUNK
) -> NDArray[np.int64]:
    """Valid for ``limit <= 2**63`` only: above, offsets past 2**63 - 1 wrapped negative."""
    if count <= chunk:
        return _decode_gap_run(data, count, limit, field=field)
    if not isinstance(data, bytes):
        raise ProtocolError("expected bytes", field=field)
    raw = np.frombuffer(data, dtype=np.uint8)
    out = np.empty(count, dtype=np.int64)
    filled = 0
    position = 0
    after = 0
    while position < raw.shape[0]:
        window = raw[position : position + chunk]
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
