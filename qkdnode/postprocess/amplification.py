"""Privacy amplification by Toeplitz hashing, computed as a float64 FFT convolution.

Toeplitz hashing is two-universal (Carter & Wegman, JCSS 18, 143 (1979); Krawczyk, CRYPTO '94),
so the leftover hash lemma applies (Tomamichel et al., Nat. Commun. 3, 634 (2012)).

Indexing convention (both peers and the tests rely on it). For an input ``x`` of n bits, an output
of m bits (1 <= m <= n) and a seed ``s`` of n + m − 1 bits, the m × n Toeplitz matrix is

    T[i, j] = s[i − j + n − 1],     0 <= i < m, 0 <= j < n,

so ``s[n − 1]`` is the main diagonal, ``s[0]`` the top-right corner ``T[0, n−1]`` and
``s[n + m − 2]`` the bottom-left corner ``T[m−1, 0]``; the output is

    out[i] = XOR_j T[i, j] · x[j].

Computation: out[i] = (Σ_j s[i + n − 1 − j] x[j]) mod 2 is entry i + n − 1 of the linear
convolution s * x. A cyclic convolution of length L >= n + m − 1 wraps only into entries below
n − 1, so entries [n − 1, n + m − 1) are exact. The cyclic convolution is done with numpy's real
FFT in float64 at a fast length L (2^a 3^b 5^c), rounded to integers and reduced mod 2. Every
entry is an integer <= n before rounding; the round-off must stay below 0.25 or
:class:`FloatingPointError` is raised (:func:`round_checked`); float32 fails at 10^7 bits,
float64 has a wide margin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray

from qkdnode.errors import ProtocolError
from qkdnode.postprocess.bitpack import Bits, check_bits, pack_bits, unpack_bits

# Largest allowed distance of an FFT result from the nearest integer.
ROUNDING_MARGIN: Final = 0.25


def toeplitz_seed_bits(input_bits: int, output_bits: int) -> int:
    """Seed length n + m − 1 for an m × n Toeplitz matrix; requires 1 <= m <= n."""
    _check_shape(input_bits, output_bits)
    return input_bits + output_bits - 1


def _check_shape(input_bits: int, output_bits: int) -> None:
    if input_bits < 1:
        raise ValueError(f"input_bits must be >= 1, got {input_bits}")
    if not 1 <= output_bits <= input_bits:
        raise ValueError(f"output_bits must be in [1, {input_bits}], got {output_bits}")


def fast_fft_length(minimum: int) -> int:
    """Smallest 2^a · 3^b · 5^c >= ``minimum`` (pocketfft is fastest on such lengths)."""
    if minimum <= 1:
        return 1
    best = 1 << (minimum - 1).bit_length()  # a power of two always qualifies
    power5 = 1
    while power5 < best:
        power35 = power5
        while power35 < best:
            # smallest power of two p with power35 · p >= minimum
            quotient = -(-minimum // power35)
            candidate = power35 << (quotient - 1).bit_length()
            best = min(best, candidate)
            power35 *= 3
        power5 *= 5
    return best


def round_checked(values: NDArray[np.float64]) -> NDArray[np.float64]:
    """Round to the nearest integers; FloatingPointError if any value is >= 0.25 away from one.

    Overwrites ``values`` with the distances to keep the peak memory down.
    """
    rounded = np.rint(values)
    np.subtract(values, rounded, out=values)
    np.abs(values, out=values)
    worst = float(values.max()) if values.size else 0.0
    if not worst < ROUNDING_MARGIN:  # also catches NaN
        raise FloatingPointError(
            f"FFT round-off {worst:.3g} exceeds {ROUNDING_MARGIN}: Toeplitz result unreliable"
        )
    return rounded


def toeplitz_hash(bits: Bits, seed_bits: Bits, output_bits: int) -> Bits:
    """Hash n input bits to ``output_bits`` bits with the Toeplitz matrix of ``seed_bits``.

    See the module docstring for the exact indexing. ``bits`` and ``seed_bits`` are 1-D uint8
    arrays of 0/1 (else ProtocolError); ``seed_bits`` must have n + output_bits − 1 entries
    (else ProtocolError(field="seed_bits")); ``output_bits`` must be in [1, n] (else ValueError).
    """
    check_bits(bits, field="bits")
    check_bits(seed_bits, field="seed_bits")
    input_bits = int(bits.shape[0])
    _check_shape(input_bits, output_bits)
    if seed_bits.shape[0] != input_bits + output_bits - 1:
        raise ProtocolError(
            f"expected {input_bits + output_bits - 1} bits, got {seed_bits.shape[0]}",
            field="seed_bits",
        )
    length = fast_fft_length(input_bits + output_bits - 1)
    # One float64 work buffer, reused for both inputs and for the result, keeps the peak at
    # about three arrays of 8·L bytes (the buffer and two half-length complex spectra).
    work = np.zeros(length, dtype=np.float64)
    work[:input_bits] = bits
    spectrum = np.fft.rfft(work)
    work[: input_bits + output_bits - 1] = seed_bits  # covers every input position
    spectrum *= np.fft.rfft(work)
    np.fft.irfft(spectrum, n=length, out=work)
    del spectrum
    window = work[input_bits - 1 : input_bits - 1 + output_bits]
    counts = round_checked(window)
    return (counts.astype(np.int64) & 1).astype(np.uint8)


def draw_toeplitz_seed(input_bits: int, output_bits: int, rng: np.random.Generator) -> Bits:
    """Uniformly random seed of ``toeplitz_seed_bits(input_bits, output_bits)`` bits.

    The leftover hash lemma needs the seed independent of the key and of the adversary's
    information: seed ``rng`` from OS entropy for each block, as for the verification hash key.
    """
    return rng.integers(0, 2, size=toeplitz_seed_bits(input_bits, output_bits), dtype=np.uint8)


@dataclass(frozen=True, slots=True, kw_only=True)
class ToeplitzSeed:
    """Alice -> Bob: the Toeplitz seed of one block, packed bits (see bitpack), and its shape.

    ``seed`` holds ``input_bits + output_bits − 1`` bits. The seed is public once sent (the
    leftover hash lemma allows a public seed), but ``repr`` still shows only the shape.
    """

    input_bits: int
    output_bits: int
    seed: bytes

    def __post_init__(self) -> None:
        for name in ("input_bits", "output_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ProtocolError("must be an int", field=name)
        if self.input_bits < 1:
            raise ProtocolError("must be >= 1", field="input_bits")
        if not 1 <= self.output_bits <= self.input_bits:
            raise ProtocolError("must be in [1, input_bits]", field="output_bits")
        self.seed_bits()

    @classmethod
    def from_bits(cls, seed_bits: Bits, *, input_bits: int, output_bits: int) -> ToeplitzSeed:
        """Pack a seed drawn by :func:`draw_toeplitz_seed`."""
        check_bits(seed_bits, field="seed_bits")
        return cls(input_bits=input_bits, output_bits=output_bits, seed=pack_bits(seed_bits))

    def seed_bits(self) -> Bits:
        """The unpacked seed (uint8 0/1)."""
        return unpack_bits(self.seed, self.input_bits + self.output_bits - 1, field="seed")

    def __repr__(self) -> str:
        return f"ToeplitzSeed(input_bits={self.input_bits}, output_bits={self.output_bits})"
