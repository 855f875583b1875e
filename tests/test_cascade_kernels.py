"""The compiled Cascade roles equal the numpy reference bit for bit.

Both implementations run on the same seeded frames in lock step: every query, every answer, the
corrected key, the number of corrected errors and the leak must be identical (the reference is
``tests/helpers_cascade_reference.py``, the numpy formulation the kernels replaced). Frames cover
every variant, lengths from 1 to 2 * 10**5 bits, error rates from none to 30 % and estimates that
are right, too low and too high.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from qkdnode.postprocess.cascade import (
    CascadeReconciler,
    CascadeResponder,
    CascadeVariant,
    ParityQuery,
    cascade_permutation,
    kernels,
)
from qkdnode.postprocess.cascade import permutation as permutation_module
from qkdnode.postprocess.cascade.reconciler import length_class, length_class_thresholds
from tests.helpers_cascade_reference import ReferenceReconciler, ReferenceResponder

ALL_VARIANTS = list(CascadeVariant)


def _frame(
    data_seed: int, n: int, error_rate: float
) -> tuple[NDArray[np.uint8], NDArray[np.uint8], bytes]:
    rng = np.random.default_rng(data_seed)
    alice = rng.integers(0, 2, n, dtype=np.uint8)
    bob = alice ^ (rng.random(n) < error_rate).astype(np.uint8)
    return alice, bob, rng.bytes(32)


def _lock_step(
    n: int, qber: float, error_rate: float, variant: CascadeVariant, data_seed: int
) -> int:
    """Run reference and compiled roles side by side; assert every output equal; return rounds."""
    alice, bob, seed = _frame(data_seed, n, error_rate)
    reference_bob = ReferenceReconciler(bob, seed=seed, variant=variant, qber_estimate=qber)
    reference_alice = ReferenceResponder(alice, seed=seed, variant=variant)
    compiled_bob = CascadeReconciler(bob, seed=seed, variant=variant, qber_estimate=qber)
    compiled_alice = CascadeResponder(alice, seed=seed, variant=variant)
    rounds = 0
    while True:
        expected = reference_bob.next_query()
        query = compiled_bob.next_query()
        if expected is None:
            assert query is None, f"round {rounds}: the compiled role asks more"
            break
        assert query == expected, f"round {rounds}: queries differ"
        answer = compiled_alice.answer(query)
        assert answer == reference_alice.answer(expected), f"round {rounds}: answers differ"
        reference_bob.receive_answer(answer)
        compiled_bob.receive_answer(answer)
        rounds += 1
        assert rounds < 10_000
    assert np.array_equal(compiled_bob.corrected_bits, reference_bob.corrected_bits)
    assert compiled_bob.errors_corrected == reference_bob.errors_corrected
    assert compiled_bob.parity_bits_received == reference_bob.parity_bits_received
    assert compiled_alice.parity_bits_sent == reference_alice.parity_bits_sent
    assert compiled_bob.round_trips == reference_bob.round_trips == rounds
    assert compiled_bob.passes_active == reference_bob.passes_active
    assert compiled_bob.finished
    return rounds


@settings(
    max_examples=400,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    n=st.integers(min_value=1, max_value=2_000),
    qber=st.floats(min_value=0.002, max_value=0.3),
    error_rate=st.floats(min_value=0.0, max_value=0.3),
    data_seed=st.integers(min_value=0, max_value=2**32 - 1),
    variant=st.sampled_from(ALL_VARIANTS),
)
def test_compiled_roles_equal_the_reference_on_small_frames(
    n: int, qber: float, error_rate: float, data_seed: int, variant: CascadeVariant
) -> None:
    _lock_step(n, qber, error_rate, variant, data_seed)


# (n, Q estimate, actual error rate): large frames, estimates right, low and high; the weighted
# cuts, 4-way cuts and wide tail passes of sub-block reuse only appear from ~10**4 bits on.
LARGE_CASES = [
    (10_000, 0.01, 0.01),
    (30_000, 0.05, 0.08),
    (40_000, 0.08, 0.03),
    (70_000, 0.02, 0.02),
    (200_000, 0.02, 0.02),
    (200_000, 0.08, 0.08),
]


@pytest.mark.parametrize("variant", ALL_VARIANTS)
@pytest.mark.parametrize(("n", "qber", "error_rate"), LARGE_CASES)
def test_compiled_roles_equal_the_reference_on_large_frames(
    n: int, qber: float, error_rate: float, variant: CascadeVariant
) -> None:
    seed = n + int(qber * 1e4) + 7 * ALL_VARIANTS.index(variant)
    assert _lock_step(n, qber, error_rate, variant, seed) > 3


def test_compiled_reconciler_with_a_cold_and_a_warm_permutation_cache() -> None:
    permutation_module.clear_permutation_cache()
    cold = _lock_step(50_000, 0.03, 0.03, CascadeVariant.SUBBLOCK_REUSE, 5)
    warm = _lock_step(50_000, 0.03, 0.03, CascadeVariant.SUBBLOCK_REUSE, 5)
    assert cold == warm


def test_cached_permutations_are_read_only_and_equal_a_fresh_draw() -> None:
    seed = bytes(range(32))
    first = cascade_permutation(seed, 5_000, 3)
    assert np.shares_memory(cascade_permutation(seed, 5_000, 3), first)
    assert not first.flags.writeable
    permutation_module.clear_permutation_cache()
    again = cascade_permutation(seed, 5_000, 3)
    assert not np.shares_memory(again, first) and np.array_equal(again, first)
    inverse = permutation_module.cascade_inverse_permutation(seed, 5_000, 3)
    assert np.array_equal(inverse[first], np.arange(5_000))


def test_permutation_cache_stays_within_its_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    # one set of 1,000 bits holds 4,000 bytes per pass drawn: three sets of one pass fit
    monkeypatch.setattr(permutation_module, "PERMUTATION_CACHE_BYTES", 3 * 4_000)
    monkeypatch.setattr(permutation_module, "PERMUTATION_CACHE_SETS", 8)
    permutation_module.clear_permutation_cache()
    for first_byte in range(5):
        cascade_permutation(bytes([first_byte]) + bytes(31), 1_000, 0)
    kept = sum(entry.nbytes for entry in permutation_module._cache.values())
    assert kept <= 3 * 4_000 and len(permutation_module._cache) == 3
    # and at most PERMUTATION_CACHE_SETS sets, whatever their size: a node, which draws a fresh
    # seed per block, keeps the last two
    monkeypatch.setattr(permutation_module, "PERMUTATION_CACHE_SETS", 2)
    for first_byte in range(5, 9):
        cascade_permutation(bytes([first_byte]) + bytes(31), 100, 0)
    assert [key[0][0] for key in permutation_module._cache] == [7, 8]
    # a set larger than the budget is not kept, but still answers
    perm = cascade_permutation(bytes(32), 10_000, 1)
    assert perm.shape == (10_000,) and len(permutation_module._cache) == 0
    permutation_module.clear_permutation_cache()


def test_cross_map_links_passes_zero_and_one() -> None:
    permutations = permutation_module.permutation_set(bytes(range(32)), 3_000)
    cross = permutations.cross01()
    perm0, perm1 = permutations.perm(0), permutations.perm(1)
    assert np.array_equal(perm1[cross[:3_000]], perm0)
    assert np.array_equal(perm0[cross[3_000:]], perm1)


def test_length_class_thresholds_give_numpys_length_class() -> None:
    lengths = np.arange(1, 2**23, dtype=np.int64)
    counted = np.where(
        lengths <= kernels.EXACT_LENGTHS,
        lengths,
        kernels.EXACT_LENGTHS + np.searchsorted(length_class_thresholds(), lengths, side="right"),
    )
    assert np.array_equal(counted, length_class(lengths))


def test_compiled_helpers_equal_their_python_form() -> None:
    """The part codes the kernels compute equal numpy's on every length class boundary."""
    thresholds = length_class_thresholds()
    lengths = np.unique(np.concatenate((np.arange(1, 200), thresholds - 1, thresholds)))
    for odd in (0, 1):
        got = [int(kernels._code(int(length), odd, thresholds)) for length in lengths]
        want = (length_class(lengths) | (128 * odd)).tolist()
        assert got == want


@settings(max_examples=50, derandomize=True, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=500),
    data_seed=st.integers(min_value=0, max_value=2**32 - 1),
    variant=st.sampled_from(ALL_VARIANTS),
)
def test_compiled_responder_equals_reference_on_arbitrary_valid_queries(
    n: int, data_seed: int, variant: CascadeVariant
) -> None:
    alice, _, seed = _frame(data_seed, n, 0.0)
    rng = np.random.default_rng(data_seed)
    compiled = CascadeResponder(alice, seed=seed, variant=variant)
    reference = ReferenceResponder(alice, seed=seed, variant=variant)
    for round_index in range(3):
        size = int(rng.integers(1, n + 1))
        blocks = -(-n // size)
        # a query never asks more than every parity of every pass
        count = min(int(rng.integers(1, 40)), variant.passes * n - blocks)
        passes = rng.integers(0, variant.passes, count)
        starts = rng.integers(0, n, count)
        ends = starts + 1 + (rng.integers(0, n, count) % (n - starts))
        ranges = np.column_stack((passes, starts, ends)).astype("<i4").tobytes()
        tops = np.array([[int(rng.integers(variant.passes)), size, blocks]], dtype="<i4")
        query = ParityQuery(round_index=round_index, top_blocks=tops.tobytes(), ranges=ranges)
        assert compiled.answer(query) == reference.answer(query)
    assert compiled.parity_bits_sent == reference.parity_bits_sent


def test_state_arrays_are_reused_by_the_next_frame_with_the_same_results() -> None:
    from qkdnode.postprocess.cascade import reconciler as reconciler_module

    reconciler_module._Workspace._pool.clear()
    # a classic frame may finish with odd parts left in even blocks; the next frame, reusing
    # its arrays, must still equal the reference
    for index, variant in enumerate([*ALL_VARIANTS, *ALL_VARIANTS]):
        _lock_step(20_000 + 37 * index, 0.04, 0.05, variant, 100 + index)
        assert len(reconciler_module._Workspace._pool) >= 1
    pooled = reconciler_module._Workspace._pool[-1]
    _, bob, seed = _frame(3, 20_000, 0.04)  # as long as the last frame, of its variant
    reused = CascadeReconciler(bob, seed=seed, variant=ALL_VARIANTS[-1], qber_estimate=0.04)
    assert reused._workspace is pooled


def test_warm_up_runs_every_variant_and_changes_no_later_result() -> None:
    from qkdnode.postprocess.cascade.warmup import compile_kernels

    compile_kernels()
    assert _lock_step(30_000, 0.05, 0.05, CascadeVariant.SUBBLOCK_REUSE, 77) > 3


def test_lowest_bit_of_every_single_and_mixed_word() -> None:
    for i in range(64):
        assert int(kernels._lowest_bit(np.uint64(1) << np.uint64(i))) == i
        above = np.uint64(2**64 - 1) << np.uint64(i)
        assert int(kernels._lowest_bit(above)) == i


@pytest.mark.parametrize("positions", [0, 1, 4096, 3 * 4096])
def test_odd_parts_lists_the_odd_flags_in_order(positions: int) -> None:
    padded = max(4096, positions)
    rng = np.random.default_rng(positions)
    odd = np.zeros(padded, dtype=np.uint8)
    odd_bits = np.zeros(padded // 64, dtype=np.uint64)
    odd_words = np.zeros(padded // 4096, dtype=np.uint64)
    for value, count in ((1, 3 * positions // 4), (0, positions // 2), (1, positions // 8)):
        for g in rng.integers(0, max(positions, 1), count).tolist():
            kernels._set_odd(odd_bits, odd_words, g, value)
            odd[g] = value
            assert int(kernels._bit(odd_bits, g)) == value
        listed = kernels._odd_parts(odd_bits, odd_words)
        assert listed.tolist() == np.flatnonzero(odd).tolist()
    for g in np.flatnonzero(odd).tolist():  # every flag cleared: every summary bit too
        kernels._set_odd(odd_bits, odd_words, g, 0)
    assert not odd_bits.any() and not odd_words.any()


@pytest.mark.parametrize("qber", [5e-6, 0.001, 0.02, 0.1, 0.3, 0.49])
def test_exp_exponent_of_code_is_the_exp_of_the_log_odds_kernels(qber: float) -> None:
    """While two passes are active a bit's weight depends only on its part's code in the other
    pass: the table must hold numpy's exp of what ``bob_log_odds`` gives for the log-odds of
    that code (but for the known-right code, whose weight is 0 whatever the table holds)."""
    bob = np.zeros(1000, dtype=np.uint8)
    variant = CascadeVariant.SUBBLOCK_REUSE
    reconciler = CascadeReconciler(bob, seed=bytes(32), variant=variant, qber_estimate=qber)
    q = reconciler._q_now()
    log_odds = reconciler._lr_table() + np.float32(np.log(q / (1.0 - q)))
    exponent = np.array([kernels._exponent(x) for x in log_odds], dtype=np.float32)
    expected = np.exp(exponent)
    got = reconciler._exp_exponent_of_code()
    assert got.dtype == np.float32
    others = np.arange(256) != kernels.KNOWN_RIGHT
    assert got[others].view(np.uint32).tolist() == expected[others].view(np.uint32).tolist()
    assert np.array_equal(reconciler._lr_table(), -reconciler._negated_lr_table())


def test_a_part_spans_from_its_marked_start_to_the_next_mark() -> None:
    rng = np.random.default_rng(11)
    for size in (64, 4096, 3 * 4096):
        part_starts = np.zeros(size // 64 + 1, dtype=np.uint64)
        marked = np.unique(np.concatenate(([0], rng.integers(0, size, size // 50))))
        for g in marked.tolist():
            kernels._mark_start(part_starts, g)
        kernels._mark_start(part_starts, size)  # the end (``bob_activate``)
        for g in range(size):
            expected = int(marked[np.searchsorted(marked, g, side="right") - 1])
            assert int(kernels._part_start(part_starts, g)) == expected
        ends = np.append(marked[1:], size)
        for start, end in zip(marked.tolist(), ends.tolist(), strict=True):
            assert int(kernels._part_end(part_starts, start)) == end
            assert bool(kernels._is_start(part_starts, start + 1)) == (end == start + 1)
    for i in range(64):
        assert int(kernels._highest_bit(np.uint64(1) << np.uint64(i))) == i
        below = np.uint64(2**64 - 1) >> np.uint64(63 - i)
        assert int(kernels._highest_bit(below)) == i


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 4099])
def test_gather_bits_equals_numpy_fancy_indexing(n: int) -> None:
    rng = np.random.default_rng(n)
    bits = rng.integers(0, 2, n, dtype=np.uint8)
    perm = rng.permutation(n).astype(np.int32)
    out = np.empty(n, dtype=np.uint8)
    kernels._gather_bits(bits, perm, out)
    assert np.array_equal(out, bits[perm])


def test_bitmap_gather_and_range_parities() -> None:
    rng = np.random.default_rng(5)
    for n, base in ((1, 0), (63, 1), (64, 64), (1000, 37), (4099, 4099)):
        bits = rng.integers(0, 2, n, dtype=np.uint8)
        perm = rng.permutation(n).astype(np.int32)
        words = np.zeros((base + n + 63) // 64 + 1, dtype=np.uint64)
        below = rng.integers(0, 2, base, dtype=np.uint8)  # bits of an earlier pass: kept
        for g in np.flatnonzero(below).tolist():
            words[g >> 6] |= np.uint64(1) << np.uint64(g & 63)
        kernels._gather_bitmap(bits, perm, words, base)
        unpacked = np.unpackbits(words.view(np.uint8), bitorder="little")
        assert np.array_equal(unpacked[:base], below)
        assert np.array_equal(unpacked[base : base + n], bits[perm])
        assert not unpacked[base + n :].any()
        for start, end in rng.integers(0, base + n + 1, (200, 2)).tolist():
            expected = int(unpacked[start:end].sum() & 1) if start < end else 0
            assert int(kernels._parity(words, start, end)) == expected
