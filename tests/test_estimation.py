"""Key-basis sampling, test-basis statistics, QBER values and abort decisions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qkdnode.errors import ProtocolError
from qkdnode.postprocess import estimation
from qkdnode.postprocess.bitpack import encode_gaps, pack_bits
from qkdnode.postprocess.events import AbortReason
from qkdnode.postprocess.leakage import LeakageLedger
from qkdnode.postprocess.sifting import SiftedBlock


def noisy_pair(seed: int, length: int, flip_probability: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    alice = rng.integers(0, 2, length, dtype=np.uint8)
    flips = (rng.random(length) < flip_probability).astype(np.uint8)
    return alice, alice ^ flips


def test_sample_counts_errors_at_sampled_positions_and_both_drop_them() -> None:
    alice_key, bob_key = noisy_pair(1, 50_000, 0.03)
    alice_ledger, bob_ledger = LeakageLedger(), LeakageLedger()
    disclosure, alice_rest = estimation.disclose_key_sample(
        alice_key, sample_bits=5_000, rng=np.random.default_rng(2), ledger=alice_ledger
    )
    outcome, bob_rest = estimation.compare_key_sample(bob_key, disclosure, ledger=bob_ledger)
    estimation.confirm_sample_outcome(disclosure, outcome)

    positions = disclosure.sample_positions()
    assert len(set(positions.tolist())) == 5_000
    assert disclosure.sample_bits().tolist() == [int(alice_key[p]) for p in positions]
    naive_errors = sum(int(alice_key[p] != bob_key[p]) for p in positions)
    assert outcome.errors == naive_errors
    assert outcome.qber == pytest.approx(naive_errors / 5_000)
    assert 0.02 < outcome.qber < 0.04

    sampled = set(positions.tolist())
    kept = [i for i in range(alice_key.size) if i not in sampled]
    assert alice_rest.tolist() == alice_key[kept].tolist()
    assert bob_rest.tolist() == bob_key[kept].tolist()
    assert alice_ledger.estimation_sample_bits == bob_ledger.estimation_sample_bits == 5_000
    # Sampled bits leave the key: they are not part of the privacy-amplification leak term.
    assert alice_ledger.leak_ec_bits == 0


def test_sample_positions_come_from_the_injected_generator() -> None:
    key, _ = noisy_pair(3, 1_000, 0.0)
    first = estimation.disclose_key_sample(
        key, sample_bits=100, rng=np.random.default_rng(5), ledger=LeakageLedger()
    )[0]
    again = estimation.disclose_key_sample(
        key, sample_bits=100, rng=np.random.default_rng(5), ledger=LeakageLedger()
    )[0]
    other = estimation.disclose_key_sample(
        key, sample_bits=100, rng=np.random.default_rng(6), ledger=LeakageLedger()
    )[0]
    assert first == again
    assert first.positions != other.positions


@pytest.mark.parametrize("sample_bits", [-1, 1_001])
def test_sample_size_out_of_range_raises(sample_bits: int) -> None:
    key, _ = noisy_pair(3, 1_000, 0.0)
    ledger = LeakageLedger()
    with pytest.raises(ValueError):
        estimation.disclose_key_sample(
            key, sample_bits=sample_bits, rng=np.random.default_rng(0), ledger=ledger
        )
    assert ledger.estimation_sample_bits == 0


def test_disclosure_for_another_key_length_is_rejected_without_touching_the_ledger() -> None:
    alice_key, bob_key = noisy_pair(4, 1_000, 0.01)
    disclosure, _ = estimation.disclose_key_sample(
        alice_key, sample_bits=10, rng=np.random.default_rng(0), ledger=LeakageLedger()
    )
    ledger = LeakageLedger()
    with pytest.raises(ProtocolError) as info:
        estimation.compare_key_sample(bob_key[:-1], disclosure, ledger=ledger)
    assert info.value.field == "key_length"
    assert ledger.total_bits == 0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"key_length": 5, "sample_count": 6, "positions": b"", "bits": b""}, "sample_count"),
        ({"key_length": 5, "sample_count": 2, "positions": bytes([0, 0]), "bits": b""}, "bits"),
        (
            {"key_length": 5, "sample_count": 2, "positions": bytes([1, 3]), "bits": b"\x00"},
            "positions",
        ),
        ({"key_length": 5, "sample_count": 1, "positions": bytes([0]), "bits": b"\x02"}, "bits"),
        ({"key_length": -1, "sample_count": 0, "positions": b"", "bits": b""}, "key_length"),
    ],
)
def test_malformed_sample_disclosure_raises(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ProtocolError) as info:
        estimation.SampleDisclosure(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


def test_sample_outcome_validation() -> None:
    with pytest.raises(ProtocolError) as info:
        estimation.SampleOutcome(sample_bits=3, errors=4)
    assert info.value.field == "errors"
    disclosure = estimation.SampleDisclosure(
        key_length=10,
        sample_count=2,
        positions=encode_gaps(np.array([1, 4], dtype=np.int64)),
        bits=pack_bits(np.array([1, 0], dtype=np.uint8)),
    )
    with pytest.raises(ProtocolError) as info:
        estimation.confirm_sample_outcome(
            disclosure, estimation.SampleOutcome(sample_bits=3, errors=0)
        )
    assert info.value.field == "sample_bits"
    with pytest.raises(ValueError):
        _ = estimation.SampleOutcome(sample_bits=0, errors=0).qber


# ---- test basis --------------------------------------------------------------------------------


def sifted_pair(seed: int, test_length: int) -> tuple[SiftedBlock, SiftedBlock]:
    rng = np.random.default_rng(seed)
    intensity = rng.choice(3, size=test_length, p=[0.6, 0.3, 0.1]).astype(np.uint8)
    alice_bits = rng.integers(0, 2, test_length, dtype=np.uint8)
    # Error rate depends on the intensity class, as for decoy states (vacuum ~ 50 %).
    flip_probability = np.array([0.02, 0.05, 0.5])[intensity]
    bob_bits = alice_bits ^ (rng.random(test_length) < flip_probability).astype(np.uint8)
    key = rng.integers(0, 2, 100, dtype=np.uint8)
    key_intensity = np.zeros(100, dtype=np.uint8)
    alice = SiftedBlock(
        key_bits=key, key_intensity=key_intensity, test_bits=alice_bits, test_intensity=intensity
    )
    bob = SiftedBlock(
        key_bits=key, key_intensity=key_intensity, test_bits=bob_bits, test_intensity=intensity
    )
    return alice, bob


def test_test_basis_errors_per_intensity_match_naive_count() -> None:
    alice, bob = sifted_pair(8, 20_000)
    disclosure = estimation.disclose_test_basis(bob)
    stats = estimation.count_test_basis_errors(alice, disclosure)
    for k in range(3):
        count = sum(1 for i in range(alice.test_length) if alice.test_intensity[i] == k)
        errors = sum(
            1
            for i in range(alice.test_length)
            if alice.test_intensity[i] == k and alice.test_bits[i] != bob.test_bits[i]
        )
        assert stats.counts[k] == count
        assert stats.errors[k] == errors
    assert stats.errors[2] / stats.counts[2] > 0.4  # vacuum is noise
    assert stats.errors[0] / stats.counts[0] < 0.04
    estimation.confirm_test_basis_statistics(bob, stats)


def test_test_basis_mismatches_raise() -> None:
    alice, bob = sifted_pair(9, 500)
    short = estimation.TestBasisDisclosure(test_count=499, bits=pack_bits(bob.test_bits[:-1]))
    with pytest.raises(ProtocolError) as info:
        estimation.count_test_basis_errors(alice, short)
    assert info.value.field == "test_count"
    stats = estimation.count_test_basis_errors(alice, estimation.disclose_test_basis(bob))
    wrong = estimation.TestBasisStatistics(
        count_signal=stats.count_signal + 1,
        count_decoy=stats.count_decoy,
        count_vacuum=stats.count_vacuum,
        errors_signal=stats.errors_signal,
        errors_decoy=stats.errors_decoy,
        errors_vacuum=stats.errors_vacuum,
    )
    with pytest.raises(ProtocolError):
        estimation.confirm_test_basis_statistics(bob, wrong)
    with pytest.raises(ProtocolError) as info:
        estimation.TestBasisStatistics(
            count_signal=1,
            count_decoy=0,
            count_vacuum=0,
            errors_signal=2,
            errors_decoy=0,
            errors_vacuum=0,
        )
    assert info.value.field == "errors_signal"
    with pytest.raises(ProtocolError) as info:
        estimation.TestBasisDisclosure(test_count=9, bits=b"\x00")
    assert info.value.field == "bits"


# ---- QBER values -------------------------------------------------------------------------------


def test_qber_after_reconciliation() -> None:
    assert estimation.qber_after_reconciliation(25, 1_000) == 0.025
    assert estimation.qber_after_reconciliation(0, 1) == 0.0
    for errors, bits in ((1, 0), (-1, 10), (11, 10)):
        with pytest.raises(ValueError):
            estimation.qber_after_reconciliation(errors, bits)


def test_reconciliation_estimate_is_positive_below_half_and_leans_high() -> None:
    # Zero observed errors: the Wilson upper limit is z²/(n + z²) (set p = 0 in the formula).
    for n in (10, 1_000, 100_000):
        value = estimation.qber_estimate_for_reconciliation(0, n)
        assert value == pytest.approx(max(1.0 / (n + 1.0), estimation.RECONCILIATION_QBER_FLOOR))
        assert 0 < value < 0.5
    assert (
        estimation.qber_estimate_for_reconciliation(0, 10**9)
        == estimation.RECONCILIATION_QBER_FLOOR
    )
    assert (
        estimation.qber_estimate_for_reconciliation(600, 1_000)
        == estimation.RECONCILIATION_QBER_CEILING
    )
    previous = 0.0
    for errors in range(0, 200, 10):
        value = estimation.qber_estimate_for_reconciliation(errors, 1_000)
        assert value >= errors / 1_000
        assert value > previous
        previous = value
    with pytest.raises(ValueError):
        estimation.qber_estimate_for_reconciliation(0, 0)
    with pytest.raises(ValueError):
        estimation.qber_estimate_for_reconciliation(5, 4)


def test_reconciliation_estimate_covers_the_true_qber_about_84_percent_of_the_time() -> None:
    rng = np.random.default_rng(12)
    true_qber, n = 0.02, 2_000
    errors = rng.binomial(n, true_qber, size=3_000)
    covered = np.mean(
        [estimation.qber_estimate_for_reconciliation(int(e), n) >= true_qber for e in errors]
    )
    # One-sided level of z = 1 is Φ(1) ≈ 0.841; binomial discreteness moves it a little.
    assert 0.78 < covered < 0.92
    assert math.isclose(float(np.mean(errors)) / n, true_qber, rel_tol=0.05)


# ---- abort decisions ---------------------------------------------------------------------------


def test_check_qber() -> None:
    assert estimation.check_qber(0.05, 0.11) is None
    assert estimation.check_qber(0.11, 0.11) is None
    event = estimation.check_qber(0.12, 0.11)
    assert event is not None and event.reason is AbortReason.QBER_ABOVE_THRESHOLD
    event = estimation.check_qber(0.5, 0.5)
    assert event is not None and event.reason is AbortReason.QBER_ABOVE_THRESHOLD
    event = estimation.check_qber(0.9, 0.5)
    assert event is not None and event.reason is AbortReason.QBER_ABOVE_THRESHOLD
    for qber, threshold in ((math.nan, 0.1), (-0.1, 0.1), (0.1, 0.6)):
        with pytest.raises(ValueError):
            estimation.check_qber(qber, threshold)


def test_check_block_not_empty_and_check_sample() -> None:
    event = estimation.check_block_not_empty(0)
    assert event is not None and event.reason is AbortReason.EMPTY_BLOCK
    assert estimation.check_block_not_empty(1) is None
    event = estimation.check_sample(estimation.SampleOutcome(sample_bits=0, errors=0), 0.1)
    assert event is not None and event.reason is AbortReason.EMPTY_BLOCK
    assert estimation.check_sample(estimation.SampleOutcome(sample_bits=100, errors=5), 0.1) is None
    event = estimation.check_sample(estimation.SampleOutcome(sample_bits=100, errors=20), 0.1)
    assert event is not None and event.reason is AbortReason.QBER_ABOVE_THRESHOLD


def test_disclosure_repr_has_no_bits() -> None:
    key = np.ones(64, dtype=np.uint8)
    disclosure, _ = estimation.disclose_key_sample(
        key, sample_bits=8, rng=np.random.default_rng(0), ledger=LeakageLedger()
    )
    assert "bits=" not in repr(disclosure).replace("sample_count", "")
    assert repr(estimation.TestBasisDisclosure(test_count=8, bits=b"\xff")).count("xff") == 0
