"""Sifting through the compiled kernels gives the numpy path's messages and blocks bit for bit.

Each case sifts the same seeded records twice, once with the kernels forced on (threshold 0) and
once with them off (threshold above any block), and compares the reply bytes and every array of
both sides' sifted blocks.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkdnode.postprocess import sifting
from qkdnode.postprocess.records import DetectionRecords, EmissionRecords


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
    emissions: EmissionRecords, detected: DetectionRecords, threshold: int
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


def test_large_block_uses_the_kernels_and_matches_numpy() -> None:
    emissions, detected = _records(7, 3 * 2**21, sifting.KERNEL_MIN_DETECTIONS, 0.1)
    reply, alice, bob = _sift(emissions, detected, threshold=sifting.KERNEL_MIN_DETECTIONS)
    expected_reply, expected_alice, expected_bob = _sift(emissions, detected, threshold=2**62)
    assert reply == expected_reply
    _assert_same(alice, expected_alice)
    _assert_same(bob, expected_bob)
