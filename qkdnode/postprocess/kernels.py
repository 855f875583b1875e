"""Compiled kernels of sifting (numba, see ``qkdnode.postprocess.jit``).

Each kernel does in one pass over the detections what the numpy formulation does in several
whole-array passes with temporary masks and index arrays; the results are the same arrays, bit
for bit (checked against the numpy formulation in the tests).
"""

from __future__ import annotations

from typing import Final

import numpy as np
from numpy.typing import NDArray

from qkdnode.postprocess.jit import helper, kernel

# Statuses of gather_records_at.
RECORDS_FOUND: Final = 0
RECORDS_NOT_INCREASING: Final = 1  # the offsets asked for are not strictly increasing
RECORDS_MISSING: Final = 2  # an offset asked for has no record


@kernel
def sift_alice_split(
    offsets: NDArray[np.int64],
    bob_basis: NDArray[np.uint8],
    alice_basis: NDArray[np.uint8],
    alice_bit: NDArray[np.uint8],
    alice_intensity: NDArray[np.uint8],
    key_basis: int,
) -> tuple[
    NDArray[np.uint8],
    NDArray[np.uint8],
    NDArray[np.uint8],
    NDArray[np.uint8],
    NDArray[np.uint8],
    NDArray[np.uint8],
]:
    """Alice's sifting of announced detections, in pulse order.

    Returns (match per detection, intensity per matched detection, key-basis bits and
    intensities, test-basis bits and intensities): a detection matches where Alice's basis at
    its offset equals Bob's; matched detections in ``key_basis`` go to the key, the others to
    the test basis.
    """
    count = offsets.shape[0]
    match = np.empty(count, dtype=np.uint8)
    matched = 0
    keys = 0
    for i in range(count):
        basis = alice_basis[offsets[i]]
        same = basis == bob_basis[i]
        match[i] = same
        if same:
            matched += 1
            if basis == key_basis:
                keys += 1
    intensity = np.empty(matched, dtype=np.uint8)
    key_bits = np.empty(keys, dtype=np.uint8)
    key_intensity = np.empty(keys, dtype=np.uint8)
    test_bits = np.empty(matched - keys, dtype=np.uint8)
    test_intensity = np.empty(matched - keys, dtype=np.uint8)
    j = 0
    k = 0
    t = 0
    for i in range(count):
        if match[i]:
            pulse = offsets[i]
            label = alice_intensity[pulse]
            intensity[j] = label
            j += 1
            if bob_basis[i] == key_basis:
                key_bits[k] = alice_bit[pulse]
                key_intensity[k] = label
                k += 1
            else:
                test_bits[t] = alice_bit[pulse]
                test_intensity[t] = label
                t += 1
    return match, intensity, key_bits, key_intensity, test_bits, test_intensity


@kernel
def split_matched(
    match: NDArray[np.uint8],
    bits: NDArray[np.uint8],
    basis: NDArray[np.uint8],
    intensity: NDArray[np.uint8],
    key_basis: int,
) -> tuple[NDArray[np.uint8], NDArray[np.uint8], NDArray[np.uint8], NDArray[np.uint8]]:
    """The matched detections split by basis, in pulse order: ``bits`` and ``basis`` hold one
    entry per detection, ``intensity`` one per matched detection (Bob's from the reply,
    Alice's from her records of the announced pulses). Returns (key bits, key intensities,
    test bits, test intensities)."""
    keys = 0
    matched = 0
    for i in range(match.shape[0]):
        if match[i]:
            matched += 1
            if basis[i] == key_basis:
                keys += 1
    key_bits = np.empty(keys, dtype=np.uint8)
    key_intensity = np.empty(keys, dtype=np.uint8)
    test_bits = np.empty(matched - keys, dtype=np.uint8)
    test_intensity = np.empty(matched - keys, dtype=np.uint8)
    j = 0
    k = 0
    t = 0
    for i in range(match.shape[0]):
        if match[i]:
            if basis[i] == key_basis:
                key_bits[k] = bits[i]
                key_intensity[k] = intensity[j]
                k += 1
            else:
                test_bits[t] = bits[i]
                test_intensity[t] = intensity[j]
                t += 1
            j += 1
    return key_bits, key_intensity, test_bits, test_intensity


@kernel
def remove_sorted_positions(
    bits: NDArray[np.uint8], positions: NDArray[np.int64]
) -> NDArray[np.uint8]:
    """``bits`` without the elements at ``positions`` (strictly increasing, in range), in order."""
    out = np.empty(bits.shape[0] - positions.shape[0], dtype=np.uint8)
    j = 0
    k = 0
    skip = positions[0] if positions.shape[0] else bits.shape[0]
    for i in range(bits.shape[0]):
        if i == skip:
            j += 1
            skip = positions[j] if j < positions.shape[0] else bits.shape[0]
        else:
            out[k] = bits[i]
            k += 1
    return out


@helper
def _first_at_least(values: NDArray[np.int64], start: int, target: int) -> int:
    """The first index ``>= start`` of sorted ``values`` holding at least ``target`` (or the
    length): a galloping search, O(1) when it is ``start`` and O(log d) for a distance d."""
    end: int = values.shape[0]
    if start >= end or values[start] >= target:
        return start
    below = start  # values[below] < target
    step = 1
    above = start + 1
    while above < end and values[above] < target:
        below = above
        step *= 2
        above = below + step
    above = min(above, end)  # above == end or values[above] >= target
    while above - below > 1:
        middle = (below + above) // 2
        if values[middle] < target:
            below = middle
        else:
            above = middle
    return above


@kernel
def gather_records_at(
    record_offsets: NDArray[np.int64],
    bit: NDArray[np.uint8],
    basis: NDArray[np.uint8],
    intensity: NDArray[np.uint8],
    offsets: NDArray[np.int64],
    found: NDArray[np.uint8],
) -> int:
    """Fill ``found`` (shape (3, len(offsets))) with the ``bit``, ``basis`` and ``intensity``
    records at ``offsets``, looked up in the sorted ``record_offsets`` by one forward walk (the
    offsets asked for are sorted too).

    Returns RECORDS_FOUND, or RECORDS_NOT_INCREASING if ``offsets`` are not strictly increasing
    (checked over all of them first), else RECORDS_MISSING if one has no record.
    """
    missing = False
    at = 0
    for i in range(offsets.shape[0]):
        offset = offsets[i]
        if i and offset <= offsets[i - 1]:
            return RECORDS_NOT_INCREASING
        at = _first_at_least(record_offsets, at, offset)
        if at == record_offsets.shape[0] or record_offsets[at] != offset:
            missing = True
            continue
        found[0, i] = bit[at]
        found[1, i] = basis[at]
        found[2, i] = intensity[at]
    return RECORDS_MISSING if missing else RECORDS_FOUND
