"""Verification of the reconciled key: a polynomial universal hash with a fresh key per block.

Construction (polynomial evaluation hashing: Wegman & Carter, JCSS 22, 265 (1981); Shoup,
CRYPTO '96, "On fast and provably secure message authentication based on universal hashing"):

- the field is GF(q) with q = 2^p − 1 a Mersenne prime, p in ``MERSENNE_EXPONENTS``;
- the n key bits are cut into d = ceil(n / w) chunks of w = p − 1 bits. Chunk i holds bits
  ``[i·w, (i+1)·w)`` with bit ``i·w + j`` of weight 2^j (little-endian); the last chunk is padded
  with zeros. (Chunks of p bits would not do: the all-ones chunk equals q ≡ 0, a certain
  collision with the all-zeros chunk. With w = p − 1 every chunk is a distinct field element.)
- the coefficients are c_0 = n (the length, so strings of different length never collide
  trivially) followed by the chunks c_1..c_d, and the hash is evaluated by Horner's rule at a
  uniformly random point r in [0, q):  H_r = Σ_{i=0}^{d} c_i · r^(d−i)  mod q.

Collision bound: for two different strings the difference H_r − H'_r is a nonzero polynomial in r
of degree at most d (if the lengths differ, the leading coefficient is n ≠ 0 mod q; otherwise
some chunk differs), which has at most d roots, so Pr_r[collision] <= d / q (the standard bound
for degree-d polynomial hashing, e.g. Shoup 1996, Sec. 3; Bernstein, "The Poly1305-AES MAC",
2005). ``verification_tag_bits`` picks the smallest p with d / q <= ε_cor; the tag leaks at most
p bits, recorded with ``LeakageLedger.record_verification``. The hash key r is drawn after the key
is fixed and independently of it, so it discloses nothing about the key.

Alice sends :class:`VerificationTag` (r and H_r); Bob recomputes H_r on his key and compares in
constant time. A mismatch is an expected outcome: :func:`check_verification` turns it into
``BlockAborted(VERIFICATION_FAILED)``; :func:`verify_tag` raises :class:`VerificationMismatch`.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Final

import numpy as np

from qkdnode.errors import ProtocolError, QkdError
from qkdnode.postprocess.bitpack import Bits, check_bits
from qkdnode.postprocess.events import AbortReason, BlockAborted
from qkdnode.postprocess.leakage import LeakageLedger

MERSENNE_EXPONENTS: Final = (61, 89, 107, 127, 521)


class VerificationMismatch(QkdError):
    """The verification tag does not match our key: the keys differ (expected, not an attack)."""


def _modulus(field_bits: int) -> int:
    return (1 << field_bits) - 1


def _value_bytes(field_bits: int) -> int:
    return (field_bits + 7) // 8


def chunk_count(key_bits: int, field_bits: int) -> int:
    """Number d of (p − 1)-bit chunks of a ``key_bits``-bit string (the polynomial's degree)."""
    width = field_bits - 1
    return (key_bits + width - 1) // width


def collision_bound(key_bits: int, field_bits: int) -> float:
    """Pr[tags of two different ``key_bits``-bit strings collide] <= d / (2^p − 1)."""
    return chunk_count(key_bits, field_bits) / _modulus(field_bits)


def verification_tag_bits(key_bits: int, eps_cor: float) -> int:
    """Smallest Mersenne exponent p with d / (2^p − 1) <= eps_cor; the tag then has p bits.

    Raises ValueError for ``key_bits < 0``, ``eps_cor`` outside (0, 1), or when even p = 521
    cannot reach ``eps_cor``.
    """
    if key_bits < 0:
        raise ValueError(f"key_bits must be >= 0, got {key_bits}")
    if not 0.0 < eps_cor < 1.0:
        raise ValueError(f"eps_cor must be in (0, 1), got {eps_cor}")
    for field_bits in MERSENNE_EXPONENTS:
        if collision_bound(key_bits, field_bits) <= eps_cor:
            return field_bits
    raise ValueError(f"no supported field reaches eps_cor={eps_cor} for {key_bits} bits")


def _chunks(bits: Bits, field_bits: int) -> list[int]:
    width = field_bits - 1
    count = chunk_count(bits.shape[0], field_bits)
    padded = np.zeros(count * width, dtype=np.uint8)
    padded[: bits.shape[0]] = bits
    rows = np.packbits(padded.reshape(count, width), axis=1, bitorder="little")
    row_bytes = rows.shape[1]
    data = rows.tobytes()
    return [
        int.from_bytes(data[start : start + row_bytes], "little")
        for start in range(0, count * row_bytes, row_bytes)
    ]


def polynomial_hash(bits: Bits, hash_key: int, field_bits: int) -> int:
    """H_r of ``bits`` at r = ``hash_key`` over GF(2^field_bits − 1) (module docstring)."""
    check_bits(bits, field="bits")
    if field_bits not in MERSENNE_EXPONENTS:
        raise ValueError(f"field_bits must be one of {MERSENNE_EXPONENTS}, got {field_bits}")
    modulus = _modulus(field_bits)
    if not 0 <= hash_key < modulus:
        raise ValueError("hash_key out of range for the field")
    acc = int(bits.shape[0])
    for chunk in _chunks(bits, field_bits):
        acc = (acc * hash_key + chunk) % modulus
    return acc


@dataclass(frozen=True, slots=True, kw_only=True)
class VerificationTag:
    """Alice -> Bob: the hash key r and the tag H_r, each little-endian in ceil(p/8) bytes.

    ``field_bits`` is the Mersenne exponent p. Both values must be below 2^p − 1. ``repr`` shows
    only ``field_bits``.
    """

    hash_key: bytes
    tag: bytes
    field_bits: int

    def __post_init__(self) -> None:
        if isinstance(self.field_bits, bool) or self.field_bits not in MERSENNE_EXPONENTS:
            raise ProtocolError(f"must be one of {MERSENNE_EXPONENTS}", field="field_bits")
        size = _value_bytes(self.field_bits)
        modulus = _modulus(self.field_bits)
        for name in ("hash_key", "tag"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != size:
                raise ProtocolError(f"expected {size} bytes", field=name)
            if int.from_bytes(value, "little") >= modulus:
                raise ProtocolError("not below the field modulus", field=name)

    @property
    def hash_key_value(self) -> int:
        return int.from_bytes(self.hash_key, "little")

    def __repr__(self) -> str:
        return f"VerificationTag(field_bits={self.field_bits}, hash_key=<redacted>, tag=<redacted>)"


def _draw_hash_key(field_bits: int, rng: np.random.Generator) -> int:
    # Uniform on [0, 2^p − 1): draw p random bits, reject the single value 2^p − 1.
    modulus = _modulus(field_bits)
    size = _value_bytes(field_bits)
    while True:
        value = int.from_bytes(rng.bytes(size), "little") & modulus
        if value < modulus:
            return value


def make_verification_tag(
    bits: Bits, *, eps_cor: float, rng: np.random.Generator, ledger: LeakageLedger
) -> VerificationTag:
    """Alice: draw a fresh hash key, hash her key, record the tag bits in ``ledger``.

    The bound needs r unpredictable to the adversary until the keys are fixed: seed ``rng`` from
    OS entropy for each block (numpy's generators are not cryptographic; reusing one across blocks
    would let an observer of earlier hash keys predict later ones).
    """
    check_bits(bits, field="bits")
    field_bits = verification_tag_bits(int(bits.shape[0]), eps_cor)
    hash_key = _draw_hash_key(field_bits, rng)
    size = _value_bytes(field_bits)
    tag = VerificationTag(
        hash_key=hash_key.to_bytes(size, "little"),
        tag=polynomial_hash(bits, hash_key, field_bits).to_bytes(size, "little"),
        field_bits=field_bits,
    )
    ledger.record_verification(field_bits)
    return tag


def verify_tag(bits: Bits, tag: VerificationTag, *, eps_cor: float, ledger: LeakageLedger) -> None:
    """Bob: raise VerificationMismatch unless ``tag`` matches his key (constant-time compare).

    The tag bits are recorded in ``ledger`` whatever the outcome (they were disclosed). Raises
    ProtocolError, with the ledger untouched, if the peer used another field size than the one
    ``eps_cor`` requires for this key length.
    """
    check_bits(bits, field="bits")
    if tag.field_bits != verification_tag_bits(int(bits.shape[0]), eps_cor):
        raise ProtocolError("does not match eps_cor for this key length", field="field_bits")
    ledger.record_verification(tag.field_bits)
    expected = polynomial_hash(bits, tag.hash_key_value, tag.field_bits)
    if not hmac.compare_digest(expected.to_bytes(len(tag.tag), "little"), tag.tag):
        raise VerificationMismatch("verification tag mismatch: the keys differ")


def check_verification(
    bits: Bits, tag: VerificationTag, *, eps_cor: float, ledger: LeakageLedger
) -> BlockAborted | None:
    """Bob: as :func:`verify_tag`, but a mismatch returns ``BlockAborted(VERIFICATION_FAILED)``."""
    try:
        verify_tag(bits, tag, eps_cor=eps_cor, ledger=ledger)
    except VerificationMismatch:
        return BlockAborted(
            reason=AbortReason.VERIFICATION_FAILED, detail="verification tag mismatch"
        )
    return None
