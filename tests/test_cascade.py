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
from qkdnode.postprocess.cascade.messages import encode_triples
from qkdnode.postprocess.cascade.permutation import permutation_keys

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
    """The module docstring's specification, in plain Python integers."""
    digest = hashlib.sha256(
        b"qkdnode/cascade/permutation/v1"
        + seed
        + struct.pack("<I", pass_index)
        + struct.pack("<Q", n)
    ).digest()
    state = int.from_bytes(digest[:16], "little")
    inc = int.from_bytes(digest[16:], "little") | 1
    mask64 = (1 << 64) - 1
    keys: list[int] = []
    while len(keys) < n:
        state = (state * 0x2360ED051FC65DA44385DF649FCCF645 + inc) % (1 << 128)
        rot = state >> 122
        x = ((state >> 64) ^ state) & mask64
        word = ((x >> rot) | (x << (64 - rot))) & mask64
        keys += [word & 0xFFFFFFFF, word >> 32]
    keys = keys[:n]
    return sorted(range(n), key=lambda j: (keys[j], j))


@pytest.mark.parametrize(("n", "pass_index"), [(1, 0), (2, 1), (7, 3), (1000, 0), (4097, 15)])
def test_permutation_matches_naive_specification(n: int, pass_index: int) -> None:
    perm = cascade_permutation(SEED, n, pass_index)
    assert perm.dtype == np.int32
    assert perm.tolist() == _naive_permutation(SEED, n, pass_index)


def test_permutation_first_elements_at_full_size_and_ties() -> None:
    n = 200_000
    naive = _naive_permutation(b"\xa5" * 32, n, 2)
    perm = cascade_permutation(b"\xa5" * 32, n, 2)
    assert perm[:16].tolist() == naive[:16]
    assert perm.tolist() == naive  # includes any ties of the 32-bit keys, broken by index
    keys = permutation_keys(b"\xa5" * 32, n, 2)
    assert np.all(np.diff(keys[perm].astype(np.int64)) >= 0)


def test_permutations_differ_by_seed_pass_and_size() -> None:
    base = cascade_permutation(SEED, 1000, 1)
    assert not np.array_equal(base, cascade_permutation(SEED, 1000, 2))
    assert not np.array_equal(base, cascade_permutation(b"\x01" + SEED[1:], 1000, 1))
    assert not np.array_equal(base[:999], cascade_permutation(SEED, 999, 1))
    assert np.array_equal(np.sort(base), np.arange(1000))


# ------------------------------------------------------------------ variants


def test_variant_parameters_follow_the_papers() -> None:
    assert CascadeVariant.from_name("original") is CascadeVariant.ORIGINAL
    assert CascadeVariant.ORIGINAL.block_sizes(0.01, 10**6) == (73, 146, 292, 584)
    yan = CascadeVariant.YAN.block_sizes(0.02, 10**6)
    assert yan[:3] == (40, 200, 500_000) and len(yan) == 10
    best = CascadeVariant.from_name(CascadeVariant.SUBBLOCK_REUSE.value)
    assert best.sub_block_reuse and not CascadeVariant.YAN.sub_block_reuse
    with pytest.raises(ProtocolError, match="original") as info:
        CascadeVariant.from_name("turbo")
    assert info.value.field == "variant"
    for bad in (0.0, 0.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="qber_estimate"):
            CascadeVariant.ORIGINAL.block_sizes(bad, 100)


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
