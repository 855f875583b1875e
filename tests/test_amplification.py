"""Toeplitz hashing by FFT: bit-exact against a dense product, linearity, bad input, FFT lengths."""

from __future__ import annotations

import numpy as np
import pytest

from qkdnode.errors import ProtocolError
from qkdnode.postprocess import amplification as amp


def dense_toeplitz_hash(bits: np.ndarray, seed: np.ndarray, m: int) -> np.ndarray:
    """Naive reference: build T[i, j] = seed[i - j + n - 1] explicitly and multiply mod 2."""
    n = bits.size
    rows = np.arange(m)[:, None]
    cols = np.arange(n)[None, :]
    matrix = seed[rows - cols + n - 1].astype(np.int64)
    product: np.ndarray = (matrix @ bits.astype(np.int64)) % 2
    return product.astype(np.uint8)


def row_parity(bits: np.ndarray, seed: np.ndarray, i: int) -> int:
    """Output bit i alone: XOR over j of seed[i - j + n - 1] & bits[j]."""
    n = bits.size
    diagonal = seed[i + n - 1 - np.arange(n)]
    return int(np.count_nonzero(diagonal & bits) % 2)


def test_indexing_convention_on_a_tiny_example() -> None:
    # n = 3, m = 2: T = [[s2, s1, s0], [s3, s2, s1]].
    seed = np.array([1, 0, 0, 1], dtype=np.uint8)  # s0..s3
    x = np.array([1, 1, 0], dtype=np.uint8)
    # row 0: s2 x0 + s1 x1 + s0 x2 = 0 + 0 + 0; row 1: s3 x0 + s2 x1 + s1 x2 = 1
    assert amp.toeplitz_hash(x, seed, 2).tolist() == [0, 1]


def test_bit_exact_against_dense_product_on_many_shapes() -> None:
    rng = np.random.default_rng(20)
    shapes = [
        (1, 1),
        (2, 1),
        (2, 2),
        (7, 1),
        (7, 7),
        (64, 32),
        (97, 96),
        (1_000, 1),
        (1_000, 1_000),
    ]
    shapes += [(int(n), int(rng.integers(1, n + 1))) for n in rng.integers(1, 700, size=60)]
    for n, m in shapes:
        bits = rng.integers(0, 2, n, dtype=np.uint8)
        seed = amp.draw_toeplitz_seed(n, m, rng)
        assert seed.size == n + m - 1
        assert np.array_equal(
            amp.toeplitz_hash(bits, seed, m), dense_toeplitz_hash(bits, seed, m)
        ), (n, m)


def test_all_ones_input_reaches_the_largest_sums() -> None:
    # Worst case for round-off: every sum is as large as possible.
    n = 3_000
    bits = np.ones(n, dtype=np.uint8)
    seed = np.ones(2 * n - 1, dtype=np.uint8)
    out = amp.toeplitz_hash(bits, seed, n)
    assert np.array_equal(out, dense_toeplitz_hash(bits, seed, n))
    assert out.tolist() == [n % 2] * n


@pytest.mark.parametrize(("n", "m"), [(200_000, 150_000), (1_000_000, 1_000_000)])
def test_large_inputs_match_directly_computed_rows(n: int, m: int) -> None:
    rng = np.random.default_rng(n)
    bits = rng.integers(0, 2, n, dtype=np.uint8)
    seed = amp.draw_toeplitz_seed(n, m, rng)
    out = amp.toeplitz_hash(bits, seed, m)
    assert out.shape == (m,) and out.dtype == np.uint8
    rows = [0, m - 1, *rng.integers(0, m, size=30).tolist()]
    for i in rows:
        assert int(out[i]) == row_parity(bits, seed, i), i
    assert 0.45 < float(out.mean()) < 0.55


def test_linearity() -> None:
    rng = np.random.default_rng(21)
    for n, m in ((1, 1), (50, 20), (5_000, 3_000), (4_096, 4_096)):
        a = rng.integers(0, 2, n, dtype=np.uint8)
        b = rng.integers(0, 2, n, dtype=np.uint8)
        seed = amp.draw_toeplitz_seed(n, m, rng)
        left = amp.toeplitz_hash(a ^ b, seed, m)
        right = amp.toeplitz_hash(a, seed, m) ^ amp.toeplitz_hash(b, seed, m)
        assert np.array_equal(left, right)
        assert not amp.toeplitz_hash(np.zeros(n, dtype=np.uint8), seed, m).any()


def test_bad_inputs() -> None:
    bits = np.zeros(10, dtype=np.uint8)
    seed = np.zeros(14, dtype=np.uint8)
    assert amp.toeplitz_hash(bits, seed, 5).size == 5
    with pytest.raises(ProtocolError) as info:
        amp.toeplitz_hash(bits, seed[:-1], 5)
    assert info.value.field == "seed_bits"
    with pytest.raises(ProtocolError) as info:
        amp.toeplitz_hash(bits, seed, 4)
    assert info.value.field == "seed_bits"
    for m in (0, -1, 11):
        with pytest.raises(ValueError):
            amp.toeplitz_hash(bits, np.zeros(max(10 + m - 1, 0), dtype=np.uint8), m)
    bad = bits.copy()
    bad[3] = 2
    with pytest.raises(ProtocolError) as info:
        amp.toeplitz_hash(bad, seed, 5)
    assert info.value.field == "bits"
    with pytest.raises(ProtocolError):
        amp.toeplitz_hash(bits.astype(np.int64), seed, 5)  # type: ignore[arg-type, unused-ignore]
    with pytest.raises(ProtocolError) as info:
        amp.toeplitz_hash(bits, seed.astype(np.float64), 5)  # type: ignore[arg-type, unused-ignore]
    assert info.value.field == "seed_bits"
    with pytest.raises(ProtocolError):
        amp.toeplitz_hash(bits.reshape(2, 5), seed, 5)
    with pytest.raises(ValueError):
        amp.toeplitz_hash(np.zeros(0, dtype=np.uint8), np.zeros(0, dtype=np.uint8), 1)


def test_seed_length() -> None:
    assert amp.toeplitz_seed_bits(10, 1) == 10
    assert amp.toeplitz_seed_bits(10, 10) == 19
    for n, m in ((10, 0), (10, 11), (0, 0)):
        with pytest.raises(ValueError):
            amp.toeplitz_seed_bits(n, m)


def test_fast_fft_length_is_the_smallest_5_smooth_number() -> None:
    def smooth(value: int) -> bool:
        for prime in (2, 3, 5):
            while value % prime == 0:
                value //= prime
        return value == 1

    for minimum in range(1, 3_000):
        expected = next(v for v in range(minimum, 2 * minimum + 2) if smooth(v))
        assert amp.fast_fft_length(minimum) == expected, minimum
    assert amp.fast_fft_length(2_000_000 - 1) == 2_000_000
    assert amp.fast_fft_length(1_500_001) == 1_518_750


def test_round_checked() -> None:
    values = np.array([0.0, 1.2, 2.9999, 7.24], dtype=np.float64)
    assert amp.round_checked(values.copy()).tolist() == [0.0, 1.0, 3.0, 7.0]
    for bad in (0.25, 0.5, 3.7, np.nan):
        with pytest.raises(FloatingPointError):
            amp.round_checked(np.array([1.0, bad], dtype=np.float64))


def test_seed_message_round_trip_and_validation() -> None:
    rng = np.random.default_rng(22)
    seed = amp.draw_toeplitz_seed(100, 40, rng)
    message = amp.ToeplitzSeed.from_bits(seed, input_bits=100, output_bits=40)
    assert np.array_equal(message.seed_bits(), seed)
    assert len(message.seed) == (139 + 7) // 8
    assert "seed=" not in repr(message)
    with pytest.raises(ProtocolError) as info:
        amp.ToeplitzSeed(input_bits=100, output_bits=50, seed=message.seed)
    assert info.value.field == "seed"
    with pytest.raises(ProtocolError) as info:
        amp.ToeplitzSeed(input_bits=100, output_bits=101, seed=message.seed)
    assert info.value.field == "output_bits"
    with pytest.raises(ProtocolError) as info:
        amp.ToeplitzSeed(input_bits=0, output_bits=1, seed=b"")
    assert info.value.field == "input_bits"
