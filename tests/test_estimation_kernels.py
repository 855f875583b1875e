"""The compiled removal of sampled positions gives the numpy mask's key, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkdnode.postprocess import estimation, kernels
from qkdnode.postprocess.leakage import LeakageLedger


@settings(max_examples=300, derandomize=True, deadline=None)
@given(
    length=st.integers(min_value=0, max_value=3_000),
    fraction=st.floats(min_value=0.0, max_value=1.0),
    data_seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_kernel_removal_equals_the_mask(length: int, fraction: float, data_seed: int) -> None:
    rng = np.random.default_rng(data_seed)
    bits = rng.integers(0, 2, length, dtype=np.uint8)
    positions = np.sort(rng.choice(length, int(length * fraction), replace=False)).astype(np.int64)
    keep = np.ones(length, dtype=np.bool_)
    keep[positions] = False
    got = kernels.remove_sorted_positions(bits, positions)
    assert got.dtype == np.uint8
    assert np.array_equal(got, bits[keep])


@pytest.mark.parametrize("sample_bits", [0, 1, 1_000, 2**20])
def test_sample_exchange_is_the_same_with_and_without_the_kernel(sample_bits: int) -> None:
    rng = np.random.default_rng(sample_bits)
    alice = rng.integers(0, 2, 2**20 + 5, dtype=np.uint8)
    bob = alice ^ (rng.random(2**20 + 5) < 0.03).astype(np.uint8)
    results = []
    for threshold in (0, 2**62):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(estimation, "KERNEL_MIN_BITS", threshold)
            disclosure, alice_rest = estimation.disclose_key_sample(
                alice, sample_bits=sample_bits, rng=np.random.default_rng(9), ledger=LeakageLedger()
            )
            outcome, bob_rest = estimation.compare_key_sample(
                bob, disclosure, ledger=LeakageLedger()
            )
            results.append((disclosure, outcome, alice_rest, bob_rest))
    (d0, o0, a0, b0), (d1, o1, a1, b1) = results
    assert d0 == d1 and o0 == o1
    assert np.array_equal(a0, a1) and np.array_equal(b0, b1)
    assert a0.shape[0] == alice.shape[0] - sample_bits
