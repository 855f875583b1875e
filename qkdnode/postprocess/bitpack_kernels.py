"""Compiled kernels of the wire coding in ``qkdnode.postprocess.bitpack`` (numba, see ``jit``).

Each kernel codes a whole message in one or two passes with no temporary array beside its
result; the bytes and arrays are those of the numpy formulation, bit for bit (checked against it
in the tests). Kernels validate and return a status code instead of raising: ``bitpack`` turns
it into the ``ProtocolError`` naming the message field. Large results are allocated by the caller
with numpy, whose allocator asks for huge pages: writing 200 MB that numba allocated costs
about three times as long in page faults as the decoding itself.
"""

from __future__ import annotations

from typing import Final

import numpy as np
from numpy.typing import NDArray

from qkdnode.postprocess.jit import kernel

# Statuses of decode_gap_varints, in the order bitpack reports them when several apply.
GAPS_OK: Final = 0
GAPS_WRONG_COUNT: Final = 1  # not exactly ``count`` varints, or data left after the last one
GAPS_OVERLONG: Final = 2  # a varint of more than MAX_VARINT_BYTES bytes
GAPS_NON_CANONICAL: Final = 3  # a varint of several bytes ending in a zero group
GAPS_OUT_OF_RANGE: Final = 4  # an offset above ``max_offset``

# 9 varint bytes carry 63 bits: every value fits in int64, so offsets never wrap.
MAX_VARINT_BYTES: Final = 9


@kernel
def encode_gap_varints(offsets: NDArray[np.int64]) -> tuple[NDArray[np.uint8], bool]:
    """Gaps of strictly increasing non-negative ``offsets`` as LEB128 varints (``bitpack``).

    Returns (bytes as uint8, True), or (empty, False) if the offsets are negative or not
    strictly increasing. Two passes: the length, then the bytes.
    """
    total = 0
    previous = -1
    for i in range(offsets.shape[0]):
        offset = offsets[i]
        if offset <= previous:
            return np.empty(0, dtype=np.uint8), False
        # previous + 1 <= offset: the difference stays in [0, 2**63)
        gap = offset - (previous + 1)
        total += 1
        while gap >= 0x80:
            gap >>= 7
            total += 1
        previous = offset
    out = np.empty(total, dtype=np.uint8)
    position = 0
    previous = -1
    for i in range(offsets.shape[0]):
        offset = offsets[i]
        gap = offset - (previous + 1)
        while gap >= 0x80:
            out[position] = (gap & 0x7F) | 0x80
            gap >>= 7
            position += 1
        out[position] = gap
        position += 1
        previous = offset
    return out, True


@kernel
def decode_gap_varints(raw: NDArray[np.uint8], max_offset: int, out: NDArray[np.int64]) -> int:
    """Fill ``out`` with the offsets of varint gaps filling ``raw``, each offset at most
    ``max_offset`` (>= -1); there must be exactly as many varints as ``out`` holds.

    Returns GAPS_OK, or the status of the first failed check in the order of the GAPS_* codes
    over the whole data (``out`` then holds partial results).
    """
    count = out.shape[0]
    filled = 0
    value = np.int64(0)
    length = 0
    previous = np.int64(-1)
    overlong = False
    non_canonical = False
    out_of_range = False
    for i in range(raw.shape[0]):
        byte = np.int64(raw[i])
        if length < MAX_VARINT_BYTES:  # 7 bits a byte: at most 63, no int64 overflow
            value |= (byte & 0x7F) << (7 * length)
        length += 1
        if byte < 0x80:
            if filled == count:
                return GAPS_WRONG_COUNT
            if length > MAX_VARINT_BYTES:
                overlong = True
            elif length > 1 and byte == 0:
                non_canonical = True
            # previous <= max_offset: neither side of the comparison can overflow
            elif value > max_offset - 1 - previous:
                out_of_range = True
            else:
                previous = previous + value + 1  # <= max_offset: no overflow
                out[filled] = previous
            filled += 1
            value = np.int64(0)
            length = 0
    if length or filled != count:
        return GAPS_WRONG_COUNT
    if overlong:
        return GAPS_OVERLONG
    if non_canonical:
        return GAPS_NON_CANONICAL
    if out_of_range:
        return GAPS_OUT_OF_RANGE
    return GAPS_OK


@kernel
def pack_label_bits(values: NDArray[np.uint8], width: int, out: NDArray[np.uint8]) -> None:
    """Write the low ``width`` bits (1..8) of each value, LSB first, packed LSB first into the
    bytes of ``out`` (exactly long enough); the padding bits of the last byte are zero."""
    mask = (1 << width) - 1
    pending = np.int64(0)  # bits not yet written, the oldest lowest
    pending_count = 0
    position = 0
    for i in range(values.shape[0]):
        pending |= (np.int64(values[i]) & mask) << pending_count
        pending_count += width
        if pending_count >= 8:
            out[position] = pending & 0xFF
            position += 1
            pending >>= 8
            pending_count -= 8
    if pending_count:
        out[position] = pending


@kernel
def unpack_label_bits(raw: NDArray[np.uint8], width: int, out: NDArray[np.uint8]) -> int:
    """Inverse of :func:`pack_label_bits`: fill ``out`` with labels of ``width`` bits read from
    ``raw`` (long enough). Returns the largest label (0 if ``out`` is empty)."""
    mask = (1 << width) - 1
    largest = np.int64(0)
    pending = np.int64(0)
    pending_count = 0
    position = 0
    for i in range(out.shape[0]):
        if pending_count < width:
            pending |= np.int64(raw[position]) << pending_count
            position += 1
            pending_count += 8
        label = pending & mask
        pending >>= width
        pending_count -= width
        out[i] = label
        if label > largest:
            largest = label
    return int(largest)
