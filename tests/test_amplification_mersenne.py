"""Multiply-add modulo a Mersenne prime (mersenne-gmp-v1): bit-exact against Python integers,
the exponent table, the collision probability δ <= 2^-m by enumerating every seed, the key sized
as for any two-universal family, the seed's checks, both nodes' keys, and the wire's refusal of
another or an unknown family."""

from __future__ import annotations

import dataclasses
import itertools
from fractions import Fraction

import gmpy2
import msgpack
import numpy as np
import pytest

from qkdnode.errors import ProtocolError
from qkdnode.postprocess import amplification_mersenne as mers
from qkdnode.postprocess.amplification import ToeplitzSeed
from qkdnode.postprocess.amplification_family import (
    AmplificationFamily,
    amplify,
    draw_amplification_seed,
)
from qkdnode.postprocess.amplification_mersenne import AmplificationSeed
from qkdnode.postprocess.block_parameters import estimation_decision
from qkdnode.postprocess.estimation import SampleOutcome, TestBasisStatistics
from qkdnode.postprocess.events import AbortReason, BlockAborted
from qkdnode.postprocess.keylength.tomamichel2012 import tomamichel_key_length
from qkdnode.postprocess.pipeline import (
    AliceBlock,
    BlockKey,
    BlockMessage,
    BlockOutcome,
    BobBlock,
    Transcript,
    run_block,
)
from qkdnode.postprocess.wire import decode_block_message, encode_block_message
from tests.helpers_blocks import SECURITY, SINGLE_PHOTON, make_block

MERSENNE = dataclasses.replace(SINGLE_PHOTON, pa_family=AmplificationFamily.MERSENNE_GMP_V1)


def reference_hash(bits: np.ndarray, a: int, b: int, exponent: int, m: int) -> list[int]:
    """Naive reference in Python integers: x = Σ bits[j] 2^j, ((a x + b) mod p) mod 2^m."""
    x = int("".join(str(int(v)) for v in bits[::-1]) or "0", 2)
    prime = (1 << exponent) - 1
    y = ((a * x + b) % prime) % (1 << m)
    return [(y >> i) & 1 for i in range(m)]


def _split(seed: bytes, input_bits: int) -> tuple[int, int]:
    size = mers.seed_part_bytes(input_bits)
    return int.from_bytes(seed[:size], "little"), int.from_bytes(seed[size:], "little")


def _shapes() -> list[tuple[int, int]]:
    rng = np.random.default_rng(40)
    shapes: list[tuple[int, int]] = []
    # just below, at and just above each small exponent: the prime in use changes at n = k
    for k in mers.MERSENNE_EXPONENTS[:16]:
        for n in (k - 1, k, k + 1):
            if n >= 1:
                shapes += [(n, m) for m in sorted({0, 1, n // 2, n})]
    shapes += [(int(n), int(rng.integers(0, n + 1))) for n in rng.integers(1, 5_000, size=40)]
    shapes += [(86_242, 86_242), (86_243, 40_000), (110_000, 1)]
    return shapes


def test_bit_exact_against_python_integers_on_many_shapes() -> None:
    rng = np.random.default_rng(41)
    for n, m in _shapes():
        bits = rng.integers(0, 2, n, dtype=np.uint8)
        seed = mers.draw_mersenne_seed(n, rng)
        a, b = _split(seed, n)
        exponent = mers.mersenne_exponent(n)
        got = mers.mersenne_hash(bits, seed, m)
        assert got.dtype == np.uint8 and got.shape == (m,)
        assert got.tolist() == reference_hash(bits, a, b, exponent, m), (n, m)


def test_extreme_inputs_and_seeds_are_bit_exact() -> None:
    # all-ones input and the largest a and b: the reduction's sum reaches its largest values
    for n in (1, 126, 127, 128, 1279, 4_000):
        exponent = mers.mersenne_exponent(n)
        size = mers.seed_part_bytes(n)
        largest = ((1 << exponent) - 2).to_bytes(size, "little")
        one = (1).to_bytes(size, "little")
        for a, b in ((largest, largest), (one, largest), (largest, bytes(size))):
            for bits in (np.ones(n, dtype=np.uint8), np.zeros(n, dtype=np.uint8)):
                got = mers.mersenne_hash(bits, a + b, n)
                expected = reference_hash(
                    bits, int.from_bytes(a, "little"), int.from_bytes(b, "little"), exponent, n
                )
                assert got.tolist() == expected, n


def test_the_exponent_is_the_smallest_one_above_the_input() -> None:
    table = mers.MERSENNE_EXPONENTS
    assert len(table) == 52 and list(table) == sorted(set(table))
    for low, high in itertools.pairwise(table):
        assert mers.mersenne_exponent(low - 1) == low
        assert mers.mersenne_exponent(low) == high
    assert mers.mersenne_exponent(10**6) == 1_257_787
    assert mers.mersenne_exponent(10**7) == 13_466_917
    assert mers.mersenne_exponent(10**8) == 136_279_841
    assert mers.mersenne_exponent(mers.MAX_INPUT_BITS) == 136_279_841
    for bad in (0, mers.MAX_INPUT_BITS + 1):
        with pytest.raises(ValueError, match="input_bits"):
            mers.mersenne_exponent(bad)


def test_the_exponents_up_to_21701_pass_the_lucas_lehmer_test() -> None:
    # the larger ones are too costly to test here; their primality is GIMPS's published result
    def lucas_lehmer(k: int) -> bool:
        if k == 2:
            return True
        prime = gmpy2.mpz(2) ** k - 1
        s = gmpy2.mpz(4)
        for _ in range(k - 2):
            s = (s * s - 2) % prime
        return bool(s == 0)

    small = [k for k in mers.MERSENNE_EXPONENTS if k <= 21_701]
    assert all(lucas_lehmer(k) for k in small)
    # and the table misses none of them: every other prime exponent below 1279 gives a composite
    others = [q for q in range(3, 1279) if gmpy2.is_prime(q) and q not in small]
    assert not any(lucas_lehmer(q) for q in others)


@pytest.mark.parametrize("exponent", [5, 7])
def test_collision_probability_by_enumerating_every_seed(exponent: int) -> None:
    prime = (1 << exponent) - 1
    # every seed of the family: a in Z_p* (1 .. p-1), b in Z_p
    a, b = np.meshgrid(np.arange(1, prime), np.arange(prime), indexing="ij")
    rng = np.random.default_rng(exponent)
    for m in range(exponent):
        delta = mers.collision_probability(exponent, m)
        assert delta == Fraction(2 ** (exponent - m) - 1, prime)
        assert delta <= Fraction(1, 2**m)  # two-universal
        for _ in range(6):
            x, y = (int(v) for v in rng.choice(prime, size=2, replace=False))
            hx = ((a * x + b) % prime) % (1 << m)
            hy = ((a * y + b) % prime) % (1 << m)
            # the same for every pair x != y, and exactly the formula
            assert Fraction(int(np.count_nonzero(hx == hy)), a.size) == delta, (x, y, m)


def test_with_a_zero_multiplier_allowed_the_family_would_not_be_two_universal() -> None:
    # why a = 0 is excluded: over all of Z_p x Z_p the collision probability exceeds 2^-m
    prime, m = 31, 2
    a, b = np.meshgrid(np.arange(prime), np.arange(prime), indexing="ij")
    hx, hy = ((a * 3 + b) % prime) % 4, ((a * 17 + b) % prime) % 4
    assert Fraction(int(np.count_nonzero(hx == hy)), a.size) > Fraction(1, 2**m)


def test_both_nodes_get_the_same_key_of_the_two_universal_length() -> None:
    emissions, detections = make_block(
        np.random.default_rng(51), pulse_count=2_000_000, vacuum_qber=0.02, p_key_basis=0.7
    )
    transcript = Transcript()
    alice, bob = run_block(
        emissions, detections, MERSENNE, np.random.default_rng(52), transcript=transcript
    )
    assert isinstance(alice, BlockKey) and isinstance(bob, BlockKey), (alice, bob)
    assert np.array_equal(alice.key, bob.key) and alice.statistics == bob.statistics
    stats = alice.statistics
    bound = tomamichel_key_length(
        key_bits=stats.reconciled_bits,
        sample_bits=stats.test_bits,
        qber_tolerance=MERSENNE.qber_threshold,
        leak_ec_bits=stats.reconciliation_bits + stats.verification_bits,
        security=SECURITY,
    )
    # two-universal: no charge, the key is as long as with Toeplitz hashing
    assert stats.final_key_bits == bound == alice.key.shape[0] > 0
    toeplitz_params = dataclasses.replace(
        SINGLE_PHOTON, pa_family=AmplificationFamily.TOEPLITZ_FFT_V1
    )
    toeplitz, _ = run_block(emissions, detections, toeplitz_params, np.random.default_rng(52))
    assert isinstance(toeplitz, BlockKey)
    assert toeplitz.statistics == stats
    assert not np.array_equal(toeplitz.key, alice.key)
    seeds = [m for _, m in transcript.messages if isinstance(m, AmplificationSeed)]
    assert len(seeds) == 1 and not any(isinstance(m, ToeplitzSeed) for _, m in transcript.messages)
    assert seeds[0].input_bits == stats.reconciled_bits


def test_the_seed_message_round_trips_through_msgpack_and_hashes_the_same() -> None:
    rng = np.random.default_rng(53)
    bits = rng.integers(0, 2, 3_000, dtype=np.uint8)
    message = draw_amplification_seed(
        AmplificationFamily.MERSENNE_GMP_V1, input_bits=3_000, output_bits=1_000, rng=rng
    )
    kind, body = encode_block_message(message)
    assert kind == "amplification_seed" and body["family"] == "mersenne-gmp-v1"
    kind2, body2 = msgpack.unpackb(msgpack.packb([kind, body], use_bin_type=True), raw=False)
    received = decode_block_message(kind2, body2)
    assert received == message
    assert np.array_equal(amplify(bits, received), amplify(bits, message))
    assert "seed" not in repr(message).replace("AmplificationSeed", "")


def _seed_body(**changes: object) -> dict[str, object]:
    seed = mers.draw_mersenne_seed(600, np.random.default_rng(54))
    body: dict[str, object] = {
        "family": "mersenne-gmp-v1",
        "input_bits": 600,
        "output_bits": 300,
        "seed": seed,
    }
    body.update(changes)
    return body


@pytest.mark.parametrize("family", ["mersenne-gmp-v2", "toeplitz-fft-v1", "", "MERSENNE-GMP-V1"])
def test_the_wire_refuses_an_unknown_family(family: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_block_message("amplification_seed", _seed_body(family=family))
    assert info.value.field == "amplification_seed.family"
    assert "unknown privacy-amplification family" in str(info.value)


def test_seeds_outside_z_p_or_of_the_wrong_size_are_refused() -> None:
    size = mers.seed_part_bytes(600)  # k = 607: 76 bytes, 1 padding bit
    prime = ((1 << 607) - 1).to_bytes(size, "little")
    padded = bytearray(bytes(size))
    padded[-1] = 0x80
    good = _seed_body()["seed"]
    assert isinstance(good, bytes)
    zero = bytes(size)
    bad_seeds = (
        prime + good[size:],
        good[:size] + prime,
        bytes(padded) + good[size:],
        good[1:],
        zero + good[size:],  # a = 0
    )
    for seed in bad_seeds:
        with pytest.raises(ProtocolError) as info:
            decode_block_message("amplification_seed", _seed_body(seed=seed))
        assert info.value.field == "amplification_seed.seed"
        with pytest.raises(ProtocolError):
            mers.mersenne_hash(np.zeros(600, dtype=np.uint8), seed, 300)
    for name, value in (("output_bits", 601), ("output_bits", 0), ("input_bits", 0)):
        with pytest.raises(ProtocolError) as info:
            decode_block_message("amplification_seed", _seed_body(**{name: value}))
        assert info.value.field == f"amplification_seed.{name}"


def test_the_draw_rejects_p_and_a_zero_multiplier() -> None:
    class Scripted:
        """A generator whose byte strings come from a script."""

        def __init__(self, script: list[bytes]) -> None:
            self.script = script

        def bytes(self, size: int) -> bytes:
            return self.script.pop(0)[:size].ljust(size, b"\x00")

    size = mers.seed_part_bytes(100)  # k = 107: 14 bytes, 5 padding bits masked off
    ones, zero, five = b"\xff" * size, bytes(size), b"\x05" * size
    scripted = Scripted([ones, zero, five, zero])
    seed = mers.draw_mersenne_seed(100, scripted)  # type: ignore[arg-type]
    assert scripted.script == []  # a: p and 0 drawn again; b = 0 kept
    a, b = _split(seed, 100)
    assert (a, b) == (int.from_bytes(five, "little") & ((1 << 107) - 1), 0)


def _run_with(
    alice_family: AmplificationFamily, bob_family: AmplificationFamily
) -> tuple[BlockOutcome | None, BlockOutcome | None]:
    """One block whose two sides are configured with different families."""
    emissions, detections = make_block(
        np.random.default_rng(55), pulse_count=2_000_000, vacuum_qber=0.02, p_key_basis=0.7
    )
    alice = AliceBlock(
        emissions,
        dataclasses.replace(SINGLE_PHOTON, pa_family=alice_family),
        np.random.default_rng(56),
    )
    bob = BobBlock(detections, dataclasses.replace(SINGLE_PHOTON, pa_family=bob_family))
    outgoing: list[BlockMessage] = bob.start()
    to_alice = True
    while outgoing:
        outgoing = (alice if to_alice else bob).receive(outgoing)
        to_alice = not to_alice
    return alice.outcome, bob.outcome


@pytest.mark.parametrize(
    ("alice_family", "bob_family"),
    [
        (AmplificationFamily.MERSENNE_GMP_V1, AmplificationFamily.TOEPLITZ_FFT_V1),
        (AmplificationFamily.TOEPLITZ_FFT_V1, AmplificationFamily.MERSENNE_GMP_V1),
    ],
)
def test_a_peer_of_another_family_is_refused_by_name(
    alice_family: AmplificationFamily, bob_family: AmplificationFamily
) -> None:
    alice, bob = _run_with(alice_family, bob_family)
    assert isinstance(bob, BlockAborted) and bob.reason is AbortReason.BAD_PEER_MESSAGE
    assert "pa_family" in bob.detail
    assert alice_family.value in bob.detail and bob_family.value in bob.detail
    assert isinstance(alice, BlockAborted) and alice.reason is AbortReason.PEER_ABORTED


def test_a_block_larger_than_the_largest_prime_aborts_before_reconciliation() -> None:
    statistics = TestBasisStatistics(
        count_signal=10**6,
        count_decoy=0,
        count_vacuum=0,
        errors_signal=0,
        errors_decoy=0,
        errors_vacuum=0,
    )
    outcome = SampleOutcome(sample_bits=0, errors=0)
    decision = estimation_decision(
        MERSENNE,
        key_bits=mers.MAX_INPUT_BITS + 1,
        key_counts=(mers.MAX_INPUT_BITS + 1, 0, 0),
        outcome=outcome,
        statistics=statistics,
    )
    assert decision is not None and decision.reason is AbortReason.NO_POSITIVE_KEY
    assert "mersenne-gmp-v1" in decision.detail
