"""Polynomial-hash verification: agreement, bit flips, tag size, known answers, bad tags."""

from __future__ import annotations

import numpy as np
import pytest

from qkdnode.errors import ProtocolError
from qkdnode.postprocess import verification as ver
from qkdnode.postprocess.events import AbortReason
from qkdnode.postprocess.leakage import LeakageLedger

EPS_COR = 1e-12


def random_bits(seed: int, length: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, length, dtype=np.uint8)


def naive_hash(bits: list[int], r: int, p: int) -> int:
    """Independent big-int evaluation: sum of c_i r^(d - i) with c_0 = len, chunks of p - 1 bits."""
    q = (1 << p) - 1
    width = p - 1
    chunks = []
    for start in range(0, len(bits), width):
        value: int = 0
        for j, bit in enumerate(bits[start : start + width]):
            value += bit << j
        chunks.append(value)
    coefficients = [len(bits), *chunks]
    degree = len(coefficients) - 1
    total: int = 0
    for i, c in enumerate(coefficients):
        total += c * pow(r, degree - i, q)
    return total % q


@pytest.mark.parametrize("length", [0, 1, 60, 61, 1_000, 100_000])
def test_equal_strings_verify(length: int) -> None:
    bits = random_bits(length, length)
    alice_ledger, bob_ledger = LeakageLedger(), LeakageLedger()
    tag = ver.make_verification_tag(
        bits, eps_cor=EPS_COR, rng=np.random.default_rng(1), ledger=alice_ledger
    )
    ver.verify_tag(bits.copy(), tag, eps_cor=EPS_COR, ledger=bob_ledger)
    assert ver.check_verification(bits, tag, eps_cor=EPS_COR, ledger=LeakageLedger()) is None
    assert alice_ledger.verification_bits == bob_ledger.verification_bits == tag.field_bits


def test_any_single_flipped_bit_fails() -> None:
    bits = random_bits(2, 1_000)
    tag = ver.make_verification_tag(
        bits, eps_cor=EPS_COR, rng=np.random.default_rng(3), ledger=LeakageLedger()
    )
    for position in range(bits.size):
        flipped = bits.copy()
        flipped[position] ^= 1
        with pytest.raises(ver.VerificationMismatch):
            ver.verify_tag(flipped, tag, eps_cor=EPS_COR, ledger=LeakageLedger())
    event = ver.check_verification(flipped, tag, eps_cor=EPS_COR, ledger=LeakageLedger())
    assert event is not None and event.reason is AbortReason.VERIFICATION_FAILED


def test_flipped_bits_in_a_long_key_fail() -> None:
    bits = random_bits(4, 200_000)
    rng = np.random.default_rng(5)
    for position in rng.choice(bits.size, size=20, replace=False):
        tag = ver.make_verification_tag(bits, eps_cor=EPS_COR, rng=rng, ledger=LeakageLedger())
        flipped = bits.copy()
        flipped[position] ^= 1
        assert ver.check_verification(flipped, tag, eps_cor=EPS_COR, ledger=LeakageLedger())


def test_length_enters_the_hash() -> None:
    # Appending zero bits leaves every chunk value unchanged; only the length coefficient differs.
    bits = random_bits(6, 100)
    longer = np.concatenate([bits, np.zeros(3, dtype=np.uint8)])
    rng = np.random.default_rng(7)
    for _ in range(10):
        r = int(rng.integers(2, 2**61 - 1))
        assert ver.polynomial_hash(bits, r, 61) != ver.polynomial_hash(longer, r, 61)


@pytest.mark.parametrize("key_bits", [0, 1, 1_000, 10**6, 10**8])
@pytest.mark.parametrize("eps_cor", [1e-6, 1e-12, 1e-15, 1e-20, 1e-30, 1e-100])
def test_tag_size_is_the_smallest_field_meeting_the_bound(key_bits: int, eps_cor: float) -> None:
    p = ver.verification_tag_bits(key_bits, eps_cor)
    chunks = -(-key_bits // (p - 1))
    assert chunks / (2**p - 1) <= eps_cor
    smaller = [e for e in ver.MERSENNE_EXPONENTS if e < p]
    for e in smaller:
        assert -(-key_bits // (e - 1)) / (2**e - 1) > eps_cor


def test_tag_bits_selection_examples_and_limits() -> None:
    assert ver.verification_tag_bits(10**6, 1e-12) == 61  # 16,394 chunks / 2^61 ≈ 7e-15
    assert ver.verification_tag_bits(10**6, 1e-20) == 89
    with pytest.raises(ValueError):
        ver.verification_tag_bits(10**6, 1e-200)  # 2^521 is not enough
    for eps in (0.0, 1.0, -1e-3):
        with pytest.raises(ValueError):
            ver.verification_tag_bits(10, eps)
    with pytest.raises(ValueError):
        ver.verification_tag_bits(-1, 1e-12)


@pytest.mark.parametrize("p", ver.MERSENNE_EXPONENTS)
@pytest.mark.parametrize("length", [0, 1, 7, 88, 89, 520, 521, 3_001])
def test_known_answers_against_naive_big_int_evaluation(p: int, length: int) -> None:
    bits = random_bits(length + p, length)
    rng = np.random.default_rng(p * 1_000 + length)
    q = (1 << p) - 1
    for r in (0, 1, q - 1, int.from_bytes(rng.bytes(70), "little") % q):
        assert ver.polynomial_hash(bits, r, p) == naive_hash(bits.tolist(), r, p)


def test_tag_bytes_carry_the_naive_hash() -> None:
    bits = random_bits(8, 5_000)
    tag = ver.make_verification_tag(
        bits, eps_cor=1e-28, rng=np.random.default_rng(9), ledger=LeakageLedger()
    )
    assert tag.field_bits == 107
    assert len(tag.tag) == len(tag.hash_key) == 14
    r = int.from_bytes(tag.hash_key, "little")
    assert int.from_bytes(tag.tag, "little") == naive_hash(bits.tolist(), r, 107)


def test_hash_keys_are_fresh_and_in_range() -> None:
    rng = np.random.default_rng(10)
    bits = random_bits(11, 64)
    keys = set()
    for _ in range(200):
        tag = ver.make_verification_tag(bits, eps_cor=EPS_COR, rng=rng, ledger=LeakageLedger())
        keys.add(tag.hash_key)
        assert int.from_bytes(tag.hash_key, "little") < 2**61 - 1
    assert len(keys) == 200


def valid_tag() -> ver.VerificationTag:
    return ver.make_verification_tag(
        random_bits(12, 100), eps_cor=EPS_COR, rng=np.random.default_rng(13), ledger=LeakageLedger()
    )


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"field_bits": 64}, "field_bits"),
        ({"field_bits": True}, "field_bits"),
        ({"field_bits": 89}, "hash_key"),  # 8-byte values for a 12-byte field
        ({"hash_key": b"\x00" * 7}, "hash_key"),
        ({"tag": b"\x00" * 9}, "tag"),
        ({"hash_key": (2**61 - 1).to_bytes(8, "little")}, "hash_key"),  # r = q
        ({"tag": (2**64 - 1).to_bytes(8, "little")}, "tag"),
        ({"tag": "00" * 8}, "tag"),
    ],
)
def test_malformed_tags_raise_protocol_error(changes: dict[str, object], field: str) -> None:
    tag = valid_tag()
    fields: dict[str, object] = {
        "hash_key": tag.hash_key,
        "tag": tag.tag,
        "field_bits": tag.field_bits,
    }
    fields.update(changes)
    with pytest.raises(ProtocolError) as info:
        ver.VerificationTag(**fields)  # type: ignore[arg-type]
    assert info.value.field == field


def test_tag_for_a_weaker_field_is_rejected_before_the_ledger_moves() -> None:
    bits = random_bits(14, 1_000)
    tag = ver.make_verification_tag(
        bits, eps_cor=1e-12, rng=np.random.default_rng(15), ledger=LeakageLedger()
    )
    ledger = LeakageLedger()
    with pytest.raises(ProtocolError) as info:
        ver.verify_tag(bits, tag, eps_cor=1e-25, ledger=ledger)
    assert info.value.field == "field_bits"
    assert ledger.verification_bits == 0


def test_tag_repr_redacts_values() -> None:
    tag = valid_tag()
    text = repr(tag)
    assert "redacted" in text
    assert tag.tag.hex() not in text and tag.hash_key.hex() not in text
    assert str(tag.tag) not in text and str(tag.hash_key) not in text
