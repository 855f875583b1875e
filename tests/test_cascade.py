"""Cascade roles: correctness, leak accounting, permutation vectors, malformed messages."""

from __future__ import annotations

import hashlib
import math
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from qkdnode.errors import ProtocolError
from qkdnode.postprocess.cascade import (
    CascadeReconciler,
    CascadeResponder,
    CascadeVariant,
    ParityAnswer,
    ParityQuery,
    cascade_permutation,
)
from qkdnode.postprocess.cascade import permutation as permutation_module
from qkdnode.postprocess.cascade.messages import encode_triples
from tests import helpers_cascade_reference as reference_module

ALL_VARIANTS = list(CascadeVariant)
SEED = bytes(range(32))


def _entropy(x: float) -> float:
    return -x * math.log2(x) - (1 - x) * math.log2(1 - x)


def _frame(
    rng: np.random.Generator, n: int, qber: float
) -> tuple[NDArray[np.uint8], NDArray[np.uint8], bytes]:
    alice = rng.integers(0, 2, n, dtype=np.uint8)
    bob = alice ^ (rng.random(n) < qber).astype(np.uint8)
    return alice, bob, rng.bytes(32)


class _Run:
    """Both roles driven to the end through an in-memory shuttle, recording every answer."""

    def __init__(
        self,
        alice: NDArray[np.uint8],
        bob: NDArray[np.uint8],
        seed: bytes,
        variant: CascadeVariant,
        qber: float,
    ) -> None:
        self.responder = CascadeResponder(alice, seed=seed, variant=variant)
        self.reconciler = CascadeReconciler(bob, seed=seed, variant=variant, qber_estimate=qber)
        self.answer_bits = 0
        self.rounds = 0
        while (query := self.reconciler.next_query()) is not None:
            assert query.round_index == self.rounds
            answer = self.responder.answer(query)
            self.answer_bits += answer.count
            self.reconciler.receive_answer(answer)
            self.rounds += 1
            assert self.rounds < 10_000, "Cascade did not terminate"


# ------------------------------------------------------------------ correctness and leak


@pytest.mark.parametrize("variant", ALL_VARIANTS)
@pytest.mark.parametrize("qber", [0.01, 0.02, 0.05, 0.08])
@pytest.mark.slow  # runs long
def test_frames_are_reconciled_with_sane_efficiency(variant: CascadeVariant, qber: float) -> None:
    rng = np.random.default_rng(1000 + int(qber * 1000) + 7 * ALL_VARIANTS.index(variant))
    n, frames = 4000, 12
    residual_frames = 0
    efficiencies = []
    for _ in range(frames):
        alice, bob, seed = _frame(rng, n, qber)
        run = _Run(alice, bob, seed, variant, qber)
        rec = run.reconciler
        corrected = rec.corrected_bits
        errors = int(np.count_nonzero(alice ^ bob))
        residual_frames += int(np.count_nonzero(corrected ^ alice) > 0)
        # Leak accounting: distinct parities received == sent == bits carried by the answers.
        assert rec.parity_bits_received == run.responder.parity_bits_sent == run.answer_bits
        assert rec.round_trips == run.rounds
        # Every flip corrected a real error: flips are a subset of the error positions.
        flipped = corrected ^ bob
        assert not np.any(flipped & (1 - (alice ^ bob)))
        assert rec.errors_corrected == int(np.count_nonzero(flipped)) <= errors
        if errors:
            efficiencies.append(rec.parity_bits_received / (n * _entropy(errors / n)))
    # At most one residual frame in 12 (FER well below 10 %), and f in a sane band: above the
    # Slepian-Wolf limit, below what a disclosure of ~1/4 of the bits would give.
    assert residual_frames <= 1
    mean_f = float(np.mean(efficiencies))
    assert 1.0 < mean_f < 1.35


def test_original_variant_matches_published_efficiency() -> None:
    # Martinez-Mateo et al., arXiv:1407.3257: f = 1.16 at Q = 2 % for the original protocol.
    rng = np.random.default_rng(5)
    n, qber = 10_000, 0.02
    fs = []
    for _ in range(6):
        alice, bob, seed = _frame(rng, n, qber)
        rec = _Run(alice, bob, seed, CascadeVariant.ORIGINAL, qber).reconciler
        assert np.array_equal(rec.corrected_bits, alice)
        fs.append(rec.parity_bits_received / (n * _entropy(float(np.mean(alice ^ bob)))))
    assert 1.12 < float(np.mean(fs)) < 1.20


def test_reuse_variant_beats_original_at_larger_frames() -> None:
    rng = np.random.default_rng(9)
    n, qber = 100_000, 0.02
    alice, bob, seed = _frame(rng, n, qber)
    h = n * _entropy(float(np.mean(alice ^ bob)))
    leaks = {}
    for variant in (CascadeVariant.ORIGINAL, CascadeVariant.SUBBLOCK_REUSE):
        rec = _Run(alice, bob, seed, variant, qber).reconciler
        assert np.array_equal(rec.corrected_bits, alice)
        leaks[variant] = rec.parity_bits_received / h
    assert leaks[CascadeVariant.SUBBLOCK_REUSE] < 1.06 < leaks[CascadeVariant.ORIGINAL]


def test_frame_without_errors_and_tiny_qber_estimate() -> None:
    rng = np.random.default_rng(3)
    alice = rng.integers(0, 2, 1000, dtype=np.uint8)
    for variant in ALL_VARIANTS:
        run = _Run(alice, alice.copy(), SEED, variant, 1e-4)
        # Q = 1e-4 clamps the first blocks to the whole frame; no error means no search, so
        # only top-level parities are asked, and the last block of passes >= 1 is derived.
        sizes = run.reconciler.block_sizes
        assert sizes[0] == 1000
        assert run.reconciler.errors_corrected == 0 and run.rounds == 1
        asked = 1 + sum(-(-1000 // size) - 1 for size in sizes[1:])
        assert run.reconciler.parity_bits_received == asked
        assert np.array_equal(run.reconciler.corrected_bits, alice)


@settings(max_examples=60)
@given(
    n=st.integers(min_value=1, max_value=300),
    qber=st.floats(min_value=0.005, max_value=0.3),
    error_rate=st.floats(min_value=0.0, max_value=0.4),
    data_seed=st.integers(min_value=0, max_value=2**32 - 1),
    variant=st.sampled_from(ALL_VARIANTS),
)
def test_property_small_frames(
    n: int, qber: float, error_rate: float, data_seed: int, variant: CascadeVariant
) -> None:
    rng = np.random.default_rng(data_seed)
    alice, bob, seed = _frame(rng, n, error_rate)
    run = _Run(alice, bob, seed, variant, qber)
    rec = run.reconciler
    assert rec.next_query() is None
    assert rec.parity_bits_received == run.responder.parity_bits_sent == run.answer_bits
    corrected = rec.corrected_bits
    # Every flipped bit was an error, so each flip lowered the error count.
    flipped = corrected ^ bob
    assert not np.any(flipped & (1 - (alice ^ bob)))
    # What is left is consistent with the parities: every pass-0 top-level block is even.
    size = rec.block_sizes[0]
    perm = cascade_permutation(seed, n, 0)
    residual = (corrected ^ alice)[perm]
    for start in range(0, n, size):
        assert int(residual[start : start + size].sum()) % 2 == 0
    # A frame with a single error is always fixed.
    if int(np.count_nonzero(alice ^ bob)) == 1:
        assert np.array_equal(corrected, alice)


# ------------------------------------------------------------------ permutation specification


def _naive_permutation(seed: bytes, n: int, pass_index: int) -> list[int]:
    """The module docstring's specification v3, in plain Python integers, written from the text.

    PCG64 XSL-RR (O'Neill 2014) 32-bit draws (low half of each word first), then Fisher-Yates
    (Durstenfeld) of the power-of-two base from the top with masked rejection sampling, then the
    values below n in their order.
    """
    size = 1
    while size < n:
        size *= 2
    digest = hashlib.sha256(
        b"qkdnode/cascade/permutation/v3"
        + seed
        + struct.pack("<I", pass_index)
        + struct.pack("<Q", size)
    ).digest()
    state = int.from_bytes(digest[:16], "little")
    inc = int.from_bytes(digest[16:], "little") | 1
    mask64 = (1 << 64) - 1
    draws: list[int] = []

    def draw32() -> int:
        nonlocal state
        if not draws:
            state = (state * 0x2360ED051FC65DA44385DF649FCCF645 + inc) % (1 << 128)
            rot = state >> 122
            x = ((state >> 64) ^ state) & mask64
            word = ((x >> rot) | (x << (64 - rot))) & mask64
            draws.extend([word >> 32, word & 0xFFFFFFFF])  # popped from the end: low first
        return draws.pop()

    base = list(range(size))
    for i in range(size - 1, 0, -1):
        mask = 1
        while mask < i:
            mask = 2 * mask + 1
        j = draw32() & mask
        while j > i:
            j = draw32() & mask
        base[i], base[j] = base[j], base[i]
    return [value for value in base if value < n]


@pytest.mark.parametrize(
    ("n", "pass_index"), [(1, 0), (2, 1), (3, 2), (7, 3), (1000, 0), (1024, 4), (4097, 15)]
)
def test_permutation_matches_naive_specification(n: int, pass_index: int) -> None:
    perm = cascade_permutation(SEED, n, pass_index)
    assert perm.dtype == np.int32
    assert perm.tolist() == _naive_permutation(SEED, n, pass_index)


def test_permutation_at_full_size_matches_specification() -> None:
    n = 200_000
    perm = cascade_permutation(b"\xa5" * 32, n, 2)
    assert perm.tolist() == _naive_permutation(b"\xa5" * 32, n, 2)


def test_python_specification_equals_compiled_path() -> None:
    state, inc = permutation_module.pcg64_state(SEED, 4096, 5)
    base = permutation_module._python_permutation(state, inc, 4096)
    assert base == permutation_module.base_permutation(SEED, 4096, 5).tolist()
    assert [v for v in base if v < 3000] == cascade_permutation(SEED, 3000, 5).tolist()


def test_compiled_permutation_equals_numpy_at_a_million() -> None:
    # numpy's Generator.permutation with PCG64 implements the same base shuffle
    assert permutation_module.numpy_follows_specification()
    size = 2**20
    for pass_index in (0, 3):
        state, inc = permutation_module.pcg64_state(b"\x5a" * 32, size, pass_index)
        expected = permutation_module._numpy_permutation(state, inc, size)
        assert np.array_equal(
            cascade_permutation(b"\x5a" * 32, 10**6, pass_index), expected[expected < 10**6]
        )


@pytest.mark.parametrize("n", [3, 4])
def test_permutation_is_uniform_on_small_sizes(n: int) -> None:
    # Fisher-Yates with exact rejection, restricted from the base of 4: each of the n! orders
    # equally likely over many seeds (chi-square with n! - 1 degrees of freedom; the bound is
    # far beyond the 0.9999 quantile, ~21 for 5 and ~50 for 23).
    counts: dict[tuple[int, ...], int] = {}
    orders = math.factorial(n)
    trials = 200 * orders
    for t in range(trials):
        key = tuple(cascade_permutation(t.to_bytes(32, "little"), n, 0).tolist())
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == orders
    expected = trials / orders
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < (30 if n == 3 else 60)


def test_permutations_differ_by_seed_and_pass_and_restrict_one_base() -> None:
    base = cascade_permutation(SEED, 1000, 1)
    assert not np.array_equal(base, cascade_permutation(SEED, 1000, 2))
    assert not np.array_equal(base, cascade_permutation(b"\x01" + SEED[1:], 1000, 1))
    assert np.array_equal(np.sort(base), np.arange(1000))
    # lengths within one power of two restrict the same base (what a session's blocks reuse)
    assert np.array_equal(cascade_permutation(SEED, 999, 1), base[base < 999])
    full = cascade_permutation(SEED, 1024, 1)
    assert np.array_equal(full[full < 1000], base)
    # the next power of two is another base
    other = cascade_permutation(SEED, 1025, 1)
    assert not np.array_equal(other[other < 1000], base)


@pytest.mark.parametrize(("size", "n"), [(1, 1), (8, 8), (8, 5), (1024, 1000), (2**16, 40_001)])
def test_restriction_kernel_equals_numpy(size: int, n: int) -> None:
    base = np.random.default_rng(size + n).permutation(size).astype(np.int32)
    expected = base[base < n]
    expected_inverse = np.empty(n, dtype=np.int32)
    expected_inverse[expected] = np.arange(n, dtype=np.int32)
    perm, inverse = np.full(n, -1, np.int32), np.full(n, -1, np.int32)
    permutation_module.restrict_permutation(base, n, perm, inverse)
    assert np.array_equal(perm, expected) and np.array_equal(inverse, expected_inverse)
    # without an inverse, and inverting a drawn permutation in place
    only = np.full(n, -1, np.int32)
    permutation_module.restrict_permutation(base, n, only, np.empty(0, np.int32))
    assert np.array_equal(only, expected)
    inverse_again = np.full(n, -1, np.int32)
    permutation_module.restrict_permutation(only, n, only, inverse_again)
    assert np.array_equal(only, expected) and np.array_equal(inverse_again, expected_inverse)


def test_cross_map_kernel_equals_numpy() -> None:
    rng = np.random.default_rng(7)
    n = 10_007
    perm0, perm1 = (rng.permutation(n).astype(np.int32) for _ in range(2))
    inverse0 = np.empty(n, dtype=np.int32)
    inverse0[perm0] = np.arange(n, dtype=np.int32)
    expected = np.empty(2 * n, dtype=np.int32)
    expected[n:] = inverse0[perm1]
    expected[expected[n:]] = np.arange(n, dtype=np.int32)
    cross = np.full(2 * n, -1, np.int32)
    permutation_module.cross_map(inverse0, perm1, cross)
    assert np.array_equal(cross, expected)
    # through the set: pass 0's bit at j sits at cross[j] in pass 1, and back
    sets = permutation_module.permutation_set(SEED, 3000)
    cross01 = sets.cross01()
    assert np.array_equal(sets.perm(1)[cross01[:3000]], sets.perm(0))
    assert np.array_equal(sets.perm(0)[cross01[3000:]], sets.perm(1))


def test_base_permutations_are_kept_across_lengths_within_budget() -> None:
    permutation_module.clear_permutation_cache()
    seed = bytes(range(32))
    first = cascade_permutation(seed, 900_000, 0)
    base = permutation_module.base_permutation(seed, 2**20, 0)
    assert not base.flags.writeable
    # another length of the same power of two reuses the kept base, drawing nothing
    permutation_module.forget_permutations(seed, 900_000)
    assert np.shares_memory(permutation_module.base_permutation(seed, 2**20, 0), base)
    assert np.array_equal(cascade_permutation(seed, 950_000, 0), base[base < 950_000])
    assert np.array_equal(first, base[base < 900_000])
    # a set keeps no more passes than the budget holds: the others are drawn per use
    size = permutation_module.BASE_CACHE_MAX_SIZE
    fit = permutation_module.BASE_CACHE_BYTES // (4 * size)
    kept = [permutation_module.base_permutation(seed, size, index) for index in range(fit)]
    assert all(
        np.shares_memory(permutation_module.base_permutation(seed, size, index), kept[index])
        for index in range(fit)
    )
    beyond = permutation_module.base_permutation(seed, size, fit)
    assert not np.shares_memory(permutation_module.base_permutation(seed, size, fit), beyond)
    # bases above the largest kept size are drawn per use
    large = permutation_module.BASE_CACHE_MAX_SIZE * 2
    drawn = permutation_module.base_permutation(seed, large, 0)
    assert not np.shares_memory(permutation_module.base_permutation(seed, large, 0), drawn)


# ------------------------------------------------------------------ variants


def test_variant_parameters_follow_the_papers() -> None:
    assert CascadeVariant.from_name("original") is CascadeVariant.ORIGINAL
    assert CascadeVariant.ORIGINAL.block_sizes(0.01, 10**6) == (73, 146, 292, 584)
    yan = CascadeVariant.YAN.block_sizes(0.02, 10**6)
    assert yan[:3] == (40, 200, 500_000) and len(yan) == 10
    best = CascadeVariant.from_name(CascadeVariant.SUBBLOCK_REUSE.value)
    assert best.sub_block_reuse and not CascadeVariant.YAN.sub_block_reuse
    # Martinez-Mateo et al. opt. (7)/(8): a = log2(1/Q) - 0.5, k1 = 2**ceil(a). From n = 2**15
    # on, k2 is the optimum measured at n = 10**6 (variants._K2_AT), times 2**0.25 below 2**19:
    # Q = 5 %, n = 10**5: k1 = 16, k2 = 8 * round(96 * 2**0.25 / 8) = 112.
    assert best.block_sizes(0.05, 10**5)[:2] == (16, 112)
    # Q = 2 %: a = 5.14, k1 = 64, k2 = 184 at n = 10**6, and (leak budget n h(Q) / 500 = 283
    # bits) the tail is 2 passes of 128 blocks. At n = 10**4 k2 = 2**ceil((a + 8) / 2) and the
    # tail keeps 2**-18 per hidden error pair: 9 passes of 4 blocks.
    assert best.block_sizes(0.02, 10**6) == (64, 184, 7813, 7813)
    assert best.block_sizes(0.02, 10**4) == (64, 128) + (2500,) * 9
    with pytest.raises(ProtocolError, match="original") as info:
        CascadeVariant.from_name("turbo")
    assert info.value.field == "variant"
    for bad in (0.0, 0.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="qber_estimate"):
            CascadeVariant.ORIGINAL.block_sizes(bad, 100)


@pytest.mark.parametrize("n", [1, 7, 1000, 10**4, 10**5, 10**6, 10**8])
@pytest.mark.parametrize("qber", [1e-4, 0.01, 0.05, 0.2, 0.45])
def test_block_sizes_stay_within_the_variant(n: int, qber: float) -> None:
    for variant in ALL_VARIANTS:
        sizes = variant.block_sizes(qber, n)
        assert 1 <= len(sizes) <= variant.passes  # the responder accepts every pass asked
        assert all(1 <= size <= n for size in sizes)
    reuse = CascadeVariant.SUBBLOCK_REUSE.block_sizes(qber, n)
    if n > 1:
        # Tail passes: 2**b blocks each, and b * T >= 14 (a residual pair survives <= 2**-14).
        tail = reuse[2:]
        blocks = -(-n // tail[0])
        assert len(set(tail)) == 1
        assert blocks ** len(tail) >= 2**14


def test_wide_tail_frame_is_reconciled() -> None:
    # n = 150 000 at Q = 5 %: a tail of 4 passes of 16 blocks (not opt. (8)'s n/2 passes).
    rng = np.random.default_rng(21)
    n, qber = 150_000, 0.05
    alice, bob, seed = _frame(rng, n, qber)
    run = _Run(alice, bob, seed, CascadeVariant.SUBBLOCK_REUSE, qber)
    rec = run.reconciler
    assert len(rec.block_sizes) == 6 and rec.block_sizes[2] == -(-n // 16)
    assert rec.passes_active == 6
    assert np.array_equal(rec.corrected_bits, alice)
    assert rec.parity_bits_received == run.responder.parity_bits_sent
    assert rec.parity_bits_received / (n * _entropy(float(np.mean(alice ^ bob)))) < 1.06


@pytest.mark.parametrize("count", [1, 5, 32, 33, 400])
def test_insert_after_matches_numpy_insert(count: int) -> None:
    rng = np.random.default_rng(count)
    size = 1000
    starts = np.sort(rng.choice(10**6, size, replace=False)).astype(np.int64)
    flags = rng.integers(0, 2, size, dtype=np.uint8)
    after = np.sort(rng.choice(size, count, replace=False)).astype(np.int64)
    new_starts = starts[after] + 1
    new_flags = rng.integers(0, 2, count, dtype=np.uint8)
    got = reference_module._insert_after((starts, flags), after, (new_starts, new_flags))
    assert got[0].tolist() == np.insert(starts, after + 1, new_starts).tolist()
    assert got[1].tolist() == np.insert(flags, after + 1, new_flags).tolist()


# ------------------------------------------------------------------ malformed input


def _fresh_pair(
    n: int = 200,
) -> tuple[CascadeResponder, CascadeReconciler, NDArray[np.uint8], bytes]:
    rng = np.random.default_rng(11)
    alice, bob, seed = _frame(rng, n, 0.05)
    variant = CascadeVariant.SUBBLOCK_REUSE
    return (
        CascadeResponder(alice, seed=seed, variant=variant),
        CascadeReconciler(bob, seed=seed, variant=variant, qber_estimate=0.05),
        alice,
        seed,
    )


def _ranges(*triples: tuple[int, int, int]) -> bytes:
    return encode_triples(np.array(triples, dtype=np.int64))


@pytest.mark.parametrize(
    ("query", "field"),
    [
        (ParityQuery(round_index=1, ranges=_ranges((0, 0, 4))), "round_index"),
        (ParityQuery(round_index=0, ranges=_ranges((16, 0, 4))), "ranges"),
        (ParityQuery(round_index=0, ranges=_ranges((-1, 0, 4))), "ranges"),
        (ParityQuery(round_index=0, ranges=_ranges((0, 5, 5))), "ranges"),
        (ParityQuery(round_index=0, ranges=_ranges((0, -1, 5))), "ranges"),
        (ParityQuery(round_index=0, ranges=_ranges((0, 0, 201))), "ranges"),
        (ParityQuery(round_index=0, top_blocks=_ranges((0, 0, 1))), "top_blocks"),
        (ParityQuery(round_index=0, top_blocks=_ranges((0, 201, 1))), "top_blocks"),
        (ParityQuery(round_index=0, top_blocks=_ranges((0, 10, 21))), "top_blocks"),
        (ParityQuery(round_index=0, top_blocks=_ranges((0, 10, 0))), "top_blocks"),
        (ParityQuery(round_index=0, top_blocks=_ranges((99, 10, 1))), "top_blocks"),
    ],
)
def test_responder_rejects_out_of_range_queries(query: ParityQuery, field: str) -> None:
    responder, _, _, _ = _fresh_pair()
    with pytest.raises(ProtocolError) as info:
        responder.answer(query)
    assert info.value.field == field
    assert responder.parity_bits_sent == 0 and responder.rounds_answered == 0


def test_responder_answers_a_valid_hand_made_query_correctly() -> None:
    responder, _, alice, seed = _fresh_pair()
    perm = cascade_permutation(seed, 200, 3)
    answer = responder.answer(
        ParityQuery(
            round_index=0, top_blocks=_ranges((3, 64, 4)), ranges=_ranges((3, 5, 77), (3, 0, 1))
        )
    )
    permuted = alice[perm]
    expected = [int(permuted[s : s + 64].sum()) % 2 for s in (0, 64, 128, 192)]
    expected += [int(permuted[5:77].sum()) % 2, int(permuted[0])]
    assert answer.count == 6 and answer.bits().tolist() == expected
    # Little-endian bit order: parity i is bit (i % 8) of byte i // 8.
    assert answer.parities[0] == sum(bit << i for i, bit in enumerate(expected))


def test_responder_answers_ranges_of_many_passes_in_one_query() -> None:
    responder, _, alice, seed = _fresh_pair()
    asked = [(15, 0, 200), (0, 3, 9), (7, 100, 101), (0, 0, 200), (15, 50, 60)]
    answer = responder.answer(ParityQuery(round_index=0, ranges=_ranges(*asked)))
    expected = []
    for pass_index, start, end in asked:
        permuted = alice[cascade_permutation(seed, 200, pass_index)]
        expected.append(int(permuted[start:end].sum()) % 2)
    assert answer.bits().tolist() == expected


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"round_index": -1, "ranges": b"\0" * 12}, "round_index"),
        ({"round_index": True, "ranges": b"\0" * 12}, "round_index"),
        ({"round_index": 0, "ranges": b"\0" * 11}, "ranges"),
        ({"round_index": 0, "top_blocks": b"\0" * 13}, "top_blocks"),
        ({"round_index": 0, "ranges": "abc"}, "ranges"),
        ({"round_index": 0}, "ranges"),
    ],
)
def test_malformed_query_construction(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ProtocolError) as info:
        ParityQuery(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"round_index": 0, "count": 9, "parities": b"\0"}, "parities"),  # truncated
        ({"round_index": 0, "count": 3, "parities": b"\x08"}, "parities"),  # padding bit set
        ({"round_index": 0, "count": -1, "parities": b""}, "count"),
        ({"round_index": 0, "count": 1, "parities": bytearray(b"\0")}, "parities"),
        ({"round_index": 1.0, "count": 1, "parities": b"\0"}, "round_index"),
    ],
)
def test_malformed_answer_construction(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ProtocolError) as info:
        ParityAnswer(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


def test_reconciler_rejects_wrong_answers_without_changing_state() -> None:
    responder, reconciler, _, _ = _fresh_pair()
    query = reconciler.next_query()
    assert query is not None
    good = responder.answer(query)
    wrong_round = ParityAnswer(round_index=1, count=good.count, parities=good.parities)
    short = ParityAnswer.from_bits(round_index=0, bits=good.bits()[:-1])
    for bad, field in ((wrong_round, "round_index"), (short, "count"), ("x", "answer")):
        with pytest.raises(ProtocolError) as info:
            reconciler.receive_answer(bad)  # type: ignore[arg-type]
        assert info.value.field == field
        assert reconciler.parity_bits_received == 0 and reconciler.next_query() is query
    reconciler.receive_answer(good)
    assert reconciler.round_trips == 1
    with pytest.raises(ProtocolError):
        reconciler.receive_answer(good)  # replayed: wrong round now


@pytest.mark.parametrize(
    ("bits", "seed", "field"),
    [
        (np.zeros(0, dtype=np.uint8), SEED, "bits"),
        (np.array([0, 1, 2], dtype=np.uint8), SEED, "bits"),
        (np.array([0, 1, 1], dtype=np.int64), SEED, "bits"),
        (np.zeros((2, 2), dtype=np.uint8), SEED, "bits"),
        ([0, 1], SEED, "bits"),
        (np.zeros(8, dtype=np.uint8), SEED[:31], "seed"),
        (np.zeros(8, dtype=np.uint8), "x" * 32, "seed"),
    ],
)
def test_bad_role_inputs(bits: object, seed: object, field: str) -> None:
    for make in (
        lambda: CascadeResponder(bits, seed=seed, variant=CascadeVariant.YAN),  # type: ignore[arg-type]
        lambda: CascadeReconciler(
            bits,  # type: ignore[arg-type]
            seed=seed,  # type: ignore[arg-type]
            variant=CascadeVariant.YAN,
            qber_estimate=0.02,
        ),
    ):
        with pytest.raises(ProtocolError) as info:
            make()
        assert info.value.field == field


def test_reconciler_rejects_bad_qber_and_repr_redacts() -> None:
    bits = np.ones(64, dtype=np.uint8)
    for bad in (0.0, 0.5, 0.7):
        with pytest.raises(ValueError, match="qber_estimate"):
            CascadeReconciler(bits, seed=SEED, variant=CascadeVariant.YAN, qber_estimate=bad)
    reconciler = CascadeReconciler(bits, seed=SEED, variant=CascadeVariant.YAN, qber_estimate=0.1)
    responder = CascadeResponder(bits, seed=SEED, variant=CascadeVariant.YAN)
    for text in (repr(reconciler), repr(responder)):
        assert (
            SEED.hex() not in text
            and "1, 1" not in text
            and "bits=" not in text.replace("n_bits=", "")
        )
