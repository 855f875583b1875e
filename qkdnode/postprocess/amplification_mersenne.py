"""Privacy amplification by multiply-add modulo a Mersenne prime, truncated (``mersenne-gmp-v1``).

The family. For an input x of n bits (the integer Σ_j x[j] 2^j, bit order as in ``bitpack``),
an output of m bits (0 <= m <= n) and the Mersenne prime p = 2^k − 1 with k the smallest exponent
of :data:`MERSENNE_EXPONENTS` above n (so 0 <= x < 2^n <= p − 1), the seed is a pair (a, b)
drawn uniformly from Z_p* × Z_p (a ≠ 0) and

    h_{a,b}(x) = ((a·x + b) mod p) mod 2^m,    out[i] = bit i of h_{a,b}(x).

Universality: the family H_1 of Carter & Wegman, JCSS 18, 143 (1979), Section 3, as proved in
Cormen, Leiserson, Rivest, Stein, "Introduction to Algorithms", 3rd ed., Theorem 11.5, step by
step for our p and 2^m:

1. For x ≠ y in Z_p let r = (a·x + b) mod p and s = (a·y + b) mod p. Then r − s ≡ a·(x − y)
   (mod p) is non-zero, since p is prime and neither a nor x − y is 0 mod p (x, y < p).
2. Given (r, s), a = (r − s)·(x − y)^−1 mod p and b = (r − a·x) mod p are unique, so
   (a, b) ↦ (r, s) is a bijection from Z_p* × Z_p (p(p − 1) seeds) onto the p(p − 1) pairs
   r ≠ s: for a uniform seed, (r, s) is uniform on them.
3. The outputs collide iff r ≡ s (mod 2^m). Among 0 .. p − 1 = 2^k − 2 every m-bit pattern
   occurs L = 2^(k−m) times, except the all-ones pattern, L − 1 times (2^k − 1 is missing). The
   ordered pairs r ≠ s with the same pattern number (2^m − 1)·L(L − 1) + (L − 1)(L − 2)
   = (L − 1)(2^k − 2), so

       δ = Pr[h(x) = h(y)] = (L − 1)(2^k − 2) / ((2^k − 1)(2^k − 2)) = (2^(k−m) − 1) / (2^k − 1)

   for every pair x ≠ y (:func:`collision_probability`), and δ <= 2^(k−m) / 2^k = 2^−m.

So the family is two-universal in the sense the leftover hash lemma needs (collision
probability at most 2^−m for every pair; Tomamichel et al., Nat. Commun. 3, 634 (2012) and
Tomamichel, Schaffner, Smith, Renner, IEEE TIT 57, 5524 (2011), whose δ-almost two-universal
term 2^m·δ − 1 is <= 0 here): the finite-key analyses size its key exactly as Toeplitz's, with
no charge. (Drawing a from all of Z_p, a = 0 included, would give δ = 2^−m + (1 − 2^−m)/p²,
slightly above 2^−m.)

Computation (GMP through gmpy2): y = a·x + b < p·2^k; since 2^k ≡ 1 (mod p),
y ≡ (y mod 2^k) + ⌊y / 2^k⌋ < 2p, and one conditional subtraction of p gives y mod p. Memory is
a few integers of 2k bits; time is one GMP product of k × n bits.

Version 1 pins the exponent table below (the 52 Mersenne primes known in 2024, OEIS A000043; the
largest, 2^136279841 − 1, was found by GIMPS in October 2024): n <= 136 279 840 bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Final

import numpy as np

from qkdnode.errors import ProtocolError
from qkdnode.postprocess.bitpack import Bits, check_bits, packed_length

#: The family's name on the wire.
MERSENNE_FAMILY: Final = "mersenne-gmp-v1"

#: Exponents k of the Mersenne primes 2^k − 1 known in 2024 (OEIS A000043), in increasing order.
MERSENNE_EXPONENTS: Final[tuple[int, ...]] = (
    2, 3, 5, 7, 13, 17, 19, 31, 61, 89, 107, 127, 521, 607, 1279, 2203, 2281, 3217, 4253, 4423,
    9689, 9941, 11213, 19937, 21701, 23209, 44497, 86243, 110503, 132049, 216091, 756839, 859433,
    1257787, 1398269, 2976221, 3021377, 6972593, 13466917, 20996011, 24036583, 25964951, 30402457,
    32582657, 37156667, 42643801, 43112609, 57885161, 74207281, 77232917, 82589933, 136279841,
)  # fmt: skip

#: Largest input the family hashes (the input must be below the largest prime of the table).
MAX_INPUT_BITS: Final = MERSENNE_EXPONENTS[-1] - 1


def mersenne_exponent(input_bits: int) -> int:
    """The exponent k of the prime 2^k − 1 for ``input_bits`` bits: the smallest k > input_bits.

    ValueError if ``input_bits`` < 1 or > :data:`MAX_INPUT_BITS`.
    """
    if input_bits < 1 or input_bits > MAX_INPUT_BITS:
        raise ValueError(f"input_bits must be in [1, {MAX_INPUT_BITS}], got {input_bits}")
    return next(k for k in MERSENNE_EXPONENTS if k > input_bits)


def seed_part_bytes(input_bits: int) -> int:
    """Bytes of each of a and b on the wire: ⌈k/8⌉ for k = :func:`mersenne_exponent`."""
    return packed_length(mersenne_exponent(input_bits))


def collision_probability(exponent: int, output_bits: int) -> Fraction:
    """δ = (2^(k−m) − 1) / (2^k − 1) exactly, k = ``exponent``, m = ``output_bits`` < k."""
    if not 0 <= output_bits < exponent:
        raise ValueError(f"output_bits must be in [0, {exponent}), got {output_bits}")
    return Fraction((1 << (exponent - output_bits)) - 1, (1 << exponent) - 1)


def _check_part(part: bytes, exponent: int, *, nonzero: bool, field: str) -> None:
    """A k-bit little-endian value below 2^k − 1 (and not 0 when ``nonzero``)."""
    spare = len(part) * 8 - exponent
    if spare and part[-1] >> (8 - spare):
        raise ProtocolError("padding bits of the last byte must be zero", field=field)
    top = (1 << (8 - spare)) - 1 if spare else 0xFF
    if part[:-1].count(0xFF) == len(part) - 1 and part[-1] == top:
        raise ProtocolError("must be below the prime 2^k − 1", field=field)
    if nonzero and not part.strip(b"\x00"):
        raise ProtocolError("the multiplier must not be 0", field=field)


def _check_seed(seed: bytes, exponent: int, *, field: str) -> None:
    size = packed_length(exponent)
    _check_part(seed[:size], exponent, nonzero=True, field=field)
    _check_part(seed[size:], exponent, nonzero=False, field=field)


def draw_mersenne_seed(input_bits: int, rng: np.random.Generator) -> bytes:
    """a ‖ b, a uniform on Z_p* and b on Z_p (k-bit little-endian, ⌈k/8⌉ bytes each).

    Each is drawn as k uniform bits and drawn again when it falls outside its range (the value
    p, or 0 for a: probability at most 2^(1−k)). The leftover hash lemma needs the seed
    independent of the key and of Eve's information: seed ``rng`` from OS entropy for each
    block, as for the Toeplitz seed.
    """
    exponent = mersenne_exponent(input_bits)
    size = packed_length(exponent)
    spare = size * 8 - exponent
    parts: list[bytes] = []
    while len(parts) < 2:
        raw = bytearray(rng.bytes(size))
        if spare:
            raw[-1] &= (1 << (8 - spare)) - 1
        try:
            _check_part(bytes(raw), exponent, nonzero=not parts, field="seed")
        except ProtocolError:
            continue
        parts.append(bytes(raw))
    return parts[0] + parts[1]


def mersenne_hash(bits: Bits, seed: bytes, output_bits: int) -> Bits:
    """((a·x + b) mod p) mod 2^m of the n input ``bits``, as m bits (see the module docstring).

    ``bits``: 1-D uint8 0/1 (else ProtocolError); ``seed``: a ‖ b as made by
    :func:`draw_mersenne_seed` (else ProtocolError(field="seed")); ``output_bits`` in [0, n]
    (else ValueError).
    """
    check_bits(bits, field="bits")
    input_bits = int(bits.shape[0])
    exponent = mersenne_exponent(input_bits)
    if not 0 <= output_bits <= input_bits:
        raise ValueError(f"output_bits must be in [0, {input_bits}], got {output_bits}")
    size = packed_length(exponent)
    if not isinstance(seed, bytes) or len(seed) != 2 * size:
        raise ProtocolError(f"expected {2 * size} bytes", field="seed")
    _check_seed(seed, exponent, field="seed")
    # imported here: gmpy2's import loads importlib.metadata and with it socket and selectors,
    # which a pure module must not pull in when it is merely imported
    import gmpy2

    prime = gmpy2.mpz(1) << exponent
    prime -= 1
    x = gmpy2.mpz.from_bytes(np.packbits(bits, bitorder="little").tobytes(), "little")
    y = gmpy2.mpz.from_bytes(seed[:size], "little") * x
    del x
    y += gmpy2.mpz.from_bytes(seed[size:], "little")
    reduced = gmpy2.f_mod_2exp(y, exponent) + (y >> exponent)
    del y
    if reduced >= prime:
        reduced -= prime
    out = gmpy2.f_mod_2exp(reduced, output_bits)
    del reduced
    data = out.to_bytes(packed_length(output_bits), "little")
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=output_bits, bitorder="little")


@dataclass(frozen=True, slots=True, kw_only=True)
class AmplificationSeed:
    """Alice -> Bob: the privacy-amplification family of one block by name, its shape and seed.

    ``family`` names the family and its version; this release knows only ``mersenne-gmp-v1``
    (the Toeplitz family travels as ``ToeplitzSeed``). For it ``seed`` is a ‖ b, each ⌈k/8⌉
    bytes, k-bit little-endian and below 2^k − 1, a not 0. An unknown family is refused with
    ProtocolError(field="family"). The seed is public once sent; ``repr`` shows only the shape.
    """

    family: str
    input_bits: int
    output_bits: int
    seed: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.family, str) or self.family != MERSENNE_FAMILY:
            raise ProtocolError(
                f"unknown privacy-amplification family (this side knows {MERSENNE_FAMILY!r})",
                field="family",
            )
        for name in ("input_bits", "output_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ProtocolError("must be an int", field=name)
        if not 1 <= self.input_bits <= MAX_INPUT_BITS:
            raise ProtocolError(f"must be in [1, {MAX_INPUT_BITS}]", field="input_bits")
        if not 1 <= self.output_bits <= self.input_bits:
            raise ProtocolError("must be in [1, input_bits]", field="output_bits")
        if not isinstance(self.seed, bytes):
            raise ProtocolError("expected bytes", field="seed")
        size = seed_part_bytes(self.input_bits)
        if len(self.seed) != 2 * size:
            raise ProtocolError(
                f"expected {2 * size} bytes for {self.input_bits} input bits", field="seed"
            )
        _check_seed(self.seed, mersenne_exponent(self.input_bits), field="seed")

    def __repr__(self) -> str:
        return (
            f"AmplificationSeed(family={self.family!r}, input_bits={self.input_bits}, "
            f"output_bits={self.output_bits})"
        )
