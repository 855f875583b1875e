"""Sifting through the compiled kernels gives the numpy path's messages and blocks bit for bit.

Each case sifts the same seeded records twice, once with the kernels forced on (threshold 0) and
once with them off (threshold above any block), and compares the reply bytes and every array of
both sides' sifted blocks. Alice's lookup of her records of the detected pulses is compared
with the numpy lookup it replaced.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from qkdnode.errors import ProtocolError
from qkdnode.postprocess import kernels, sifting
from qkdnode.postprocess.bitpack import Bits
from qkdnode.postprocess.records import (
    AliceRecords,
    DetectedEmissionRecords,
    DetectionRecords,
    EmissionRecords,
)
from tests.helpers_blocks import detected_records


def _records(
    data_seed: int, pulses: int, detections: int, p_test: float
) -> tuple[EmissionRecords, DetectionRecords]:
    rng = np.random.default_rng(data_seed)
    first = int(rng.integers(0, 10**9))
    emissions = EmissionRecords(
        first_pulse_index=first,
        bit=rng.integers(0, 2, pulses, dtype=np.uint8),
        basis=(rng.random(pulses) < p_test).astype(np.uint8),
        intensity=rng.integers(0, 3, pulses, dtype=np.uint8),
    )
    offsets = np.sort(rng.choice(pulses, detections, replace=False)).astype(np.int64)
    detected = DetectionRecords(
        first_pulse_index=first,
        pulse_count=pulses,
        pulse_index=offsets + first,
        basis=(rng.random(detections) < p_test).astype(np.uint8),
        bit=rng.integers(0, 2, detections, dtype=np.uint8),
    )
    return emissions, detected


def _sift(
    emissions: AliceRecords, detected: DetectionRecords, threshold: int
) -> tuple[sifting.SiftReply, sifting.SiftedBlock, sifting.SiftedBlock]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sifting, "KERNEL_MIN_DETECTIONS", threshold)
        reply, alice = sifting.sift_alice(emissions, sifting.announce_detections(detected))
        return reply, alice, sifting.sift_bob(detected, reply)


def _assert_same(left: sifting.SiftedBlock, right: sifting.SiftedBlock) -> None:
    for name in ("key_bits", "key_intensity", "test_bits", "test_intensity"):
        a, b = getattr(left, name), getattr(right, name)
        assert a.dtype == b.dtype == np.uint8, name
        assert np.array_equal(a, b), name


@settings(max_examples=200, derandomize=True, deadline=None)
@given(
    pulses=st.integers(min_value=1, max_value=5_000),
    fraction=st.floats(min_value=0.0, max_value=1.0),
    p_test=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]),
    data_seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_kernel_sifting_equals_numpy_sifting(
    pulses: int, fraction: float, p_test: float, data_seed: int
) -> None:
    emissions, detected = _records(data_seed, pulses, int(pulses * fraction), p_test)
    reply, alice, bob = _sift(emissions, detected, threshold=0)
    expected_reply, expected_alice, expected_bob = _sift(emissions, detected, threshold=2**62)
    assert reply == expected_reply
    _assert_same(alice, expected_alice)
    _assert_same(bob, expected_bob)
    assert alice.key_length == bob.key_length and alice.test_length == bob.test_length


@settings(max_examples=100, derandomize=True, deadline=None)
@given(
    pulses=st.integers(min_value=1, max_value=5_000),
    fraction=st.floats(min_value=0.0, max_value=1.0),
    p_test=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    data_seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_kernel_sifting_of_detected_records_equals_numpy_sifting(
    pulses: int, fraction: float, p_test: float, data_seed: int
) -> None:
    emissions, detected = _records(data_seed, pulses, int(pulses * fraction), p_test)
    offsets = detected.pulse_index - detected.first_pulse_index
    lookup = detected_records(emissions, offsets)
    reply, alice, bob = _sift(lookup, detected, threshold=0)
    expected_reply, expected_alice, expected_bob = _sift(emissions, detected, threshold=2**62)
    assert reply == expected_reply
    _assert_same(alice, expected_alice)
    _assert_same(bob, expected_bob)


def test_large_block_uses_the_kernels_and_matches_numpy() -> None:
    emissions, detected = _records(7, 3 * 2**21, sifting.KERNEL_MIN_DETECTIONS, 0.1)
    reply, alice, bob = _sift(emissions, detected, threshold=sifting.KERNEL_MIN_DETECTIONS)
    expected_reply, expected_alice, expected_bob = _sift(emissions, detected, threshold=2**62)
    assert reply == expected_reply
    _assert_same(alice, expected_alice)
    _assert_same(bob, expected_bob)


# ---- records of the detected pulses ----------------------------------------------------------


def _reference_records_at(
    record_offsets: NDArray[np.int64], records: tuple[Bits, Bits, Bits], offsets: NDArray[np.int64]
) -> tuple[Bits, Bits, Bits]:
    """The numpy ``DetectedEmissionRecords.records_at`` the kernel replaced, after its checks."""
    where = np.searchsorted(record_offsets, offsets)
    if where.size and (
        int(where[-1]) >= record_offsets.shape[0]
        or not np.array_equal(record_offsets[where], offsets)
    ):
        raise ProtocolError("a pulse without a record of Alice's", field="offsets")
    bit, basis, intensity = records
    return bit[where], basis[where], intensity[where]


def _outcome(function: Callable[..., Any], *args: Any) -> tuple[str, Any]:
    """("ok", result as lists) or ("error", (field, message)) of ``function(*args)``."""
    try:
        result = function(*args)
    except ProtocolError as exc:
        return "error", (exc.field, str(exc))
    return "ok", np.asarray(result).tolist()


def _offsets(values: list[int]) -> NDArray[np.int64]:
    return np.array(sorted(set(values)), dtype=np.int64)


def _detected(seed: int, pulses: int, records: int) -> DetectedEmissionRecords:
    rng = np.random.default_rng(seed)
    return DetectedEmissionRecords(
        first_pulse_index=int(rng.integers(0, 10**9)),
        pulse_count=pulses,
        offset=np.sort(rng.choice(pulses, records, replace=False)).astype(np.int64),
        bit=rng.integers(0, 2, records, dtype=np.uint8),
        basis=rng.integers(0, 2, records, dtype=np.uint8),
        intensity=rng.integers(0, 3, records, dtype=np.uint8),
    )


@settings(max_examples=300)
@given(
    pulses=st.integers(1, 3_000),
    kept=st.floats(0.0, 1.0),
    asked=st.floats(0.0, 1.0),
    strays=st.integers(0, 2),
    data_seed=st.integers(0, 2**32 - 1),
)
def test_records_at_equals_the_reference(
    pulses: int, kept: float, asked: float, strays: int, data_seed: int
) -> None:
    detected = _detected(data_seed, pulses, int(pulses * kept))
    rng = np.random.default_rng(data_seed + 1)
    wanted = detected.offset[rng.random(detected.offset.shape[0]) < asked]
    # pulses without a record, anywhere in the block
    offsets = _offsets([*wanted.tolist(), *rng.integers(0, pulses, strays).tolist()])
    records = (detected.bit, detected.basis, detected.intensity)
    got = _outcome(detected.records_at, offsets)
    assert got == _outcome(_reference_records_at, detected.offset, records, offsets)
    if got[0] == "ok":
        assert all(found.dtype == np.uint8 for found in detected.records_at(offsets))


def test_records_at_far_apart_and_at_the_ends() -> None:
    detected = _detected(5, 10**7, 20_000)
    records = (detected.bit, detected.basis, detected.intensity)
    for offsets in (
        detected.offset[[0, -1]],
        detected.offset[::997],
        detected.offset[-3:],
        detected.offset[:0],
        detected.offset.copy(),
    ):
        got = detected.records_at(offsets)
        for mine, theirs in zip(
            got, _reference_records_at(detected.offset, records, offsets), strict=True
        ):
            assert np.array_equal(mine, theirs)
    past = np.array([int(detected.offset[-1]) + 1], dtype=np.int64)
    with pytest.raises(ProtocolError, match="without a record"):
        detected.records_at(past)


@pytest.mark.parametrize(
    ("asked", "message"),
    [
        ([3, 3], "strictly increasing"),
        ([5, 3], "strictly increasing"),
        ([1, 4, 2, 9], "strictly increasing"),  # after a pulse without a record
        ([-1, 3], "outside"),
        ([3, 10], "outside"),
        ([2], "without a record"),
    ],
)
def test_records_at_rejects_bad_offsets(asked: list[int], message: str) -> None:
    detected = DetectedEmissionRecords(
        first_pulse_index=0,
        pulse_count=10,
        offset=np.array([1, 3, 5, 9], dtype=np.int64),
        bit=np.zeros(4, dtype=np.uint8),
        basis=np.zeros(4, dtype=np.uint8),
        intensity=np.zeros(4, dtype=np.uint8),
    )
    with pytest.raises(ProtocolError, match=message) as info:
        detected.records_at(np.array(asked, dtype=np.int64))
    assert info.value.field == "offsets"


def test_records_kernel_reports_disorder_before_missing_records() -> None:
    found = np.empty((3, 3), dtype=np.uint8)
    records = np.array([1, 5], dtype=np.int64)
    flags = np.zeros(2, dtype=np.uint8)
    asked = np.array([2, 5, 4], dtype=np.int64)
    status = kernels.gather_records_at(records, flags, flags, flags, asked, found)
    assert status == kernels.RECORDS_NOT_INCREASING
