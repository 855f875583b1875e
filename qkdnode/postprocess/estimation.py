"""Parameter estimation: QBER of the key basis, errors of the test basis, abort decisions.

Key basis (Z). Alice draws ``sample_bits`` positions of the sifted key uniformly without
replacement (injected generator) and discloses her bits there (:class:`SampleDisclosure`). Bob
counts disagreements and answers with the count (:class:`SampleOutcome`). Both drop the sampled
positions from the key, and both record the disclosed bits with
``LeakageLedger.record_estimation_sample``: they are public now, which is exactly why they leave
the key (random sampling, Tomamichel et al., Nat. Commun. 3, 634 (2012), the "k bits used for
parameter estimation").

Test basis (X). Bob discloses every test-basis bit (:class:`TestBasisDisclosure`); Alice counts
errors per intensity class (:func:`count_test_basis_errors`) -> :class:`TestBasisStatistics`, the
m_{Z,k} and n_{Z,k} of the decoy bound of Lim et al., PRA 89, 022307 (2014), Eq. (4) (their Z
basis is our test basis). These bits are *not* recorded in the key's leakage ledger: a pulse is
measured in one basis only, so test-basis bits come from pulses disjoint from the key pulses and
carry no information about the key bits; the security proof already treats the whole test basis
as public (it only bounds the phase error from it).

After reconciliation, the QBER actually seen is ``errors_corrected / key_bits``
(:func:`qber_after_reconciliation`).

Abort decisions are events (:class:`~qkdnode.postprocess.events.BlockAborted`), never exceptions.

Keys of at least ``KERNEL_MIN_BITS`` bits drop the sampled positions with a compiled kernel
(``qkdnode.postprocess.kernels``: the runs between positions copied, no mask; same bits); the
sample positions themselves stay numpy's ``Generator.choice``, so a seed gives the same sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray

from qkdnode.errors import ProtocolError
from qkdnode.postprocess import kernels
from qkdnode.postprocess.bitpack import (
    Bits,
    check_bits,
    decode_gaps,
    encode_gaps,
    pack_bits,
    unpack_bits,
)
from qkdnode.postprocess.events import AbortReason, BlockAborted
from qkdnode.postprocess.leakage import LeakageLedger
from qkdnode.postprocess.records import INTENSITY_CLASSES
from qkdnode.postprocess.sifting import SiftedBlock

# Defaults of qber_estimate_for_reconciliation (see there).
RECONCILIATION_QBER_Z: Final = 1.0
RECONCILIATION_QBER_FLOOR: Final = 1e-4
RECONCILIATION_QBER_CEILING: Final = 0.49
# From this key length on, sampled positions are removed by the compiled kernel (module doc).
KERNEL_MIN_BITS: Final = 2**20


def _check_count(value: int, *, field: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ProtocolError("must be an int >= 0", field=field)


# --------------------------------------------------------------------------------------------
# Key-basis sample
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SampleDisclosure:
    """Alice -> Bob: sampled key positions and Alice's bits there.

    - ``key_length``: length of the sifted key the positions index (must equal Bob's);
    - ``sample_count``: number of positions;
    - ``positions``: strictly increasing positions in ``[0, key_length)``, varint gaps
      (:mod:`qkdnode.postprocess.bitpack`);
    - ``bits``: Alice's key bits at those positions, packed bits.
    """

    key_length: int
    sample_count: int
    positions: bytes
    bits: bytes

    def __post_init__(self) -> None:
        _check_count(self.key_length, field="key_length")
        _check_count(self.sample_count, field="sample_count")
        if self.sample_count > self.key_length:
            raise ProtocolError("larger than key_length", field="sample_count")
        unpack_bits(self.bits, self.sample_count, field="bits")
        self.sample_positions()

    def sample_positions(self) -> NDArray[np.int64]:
        """Sampled positions (int64, strictly increasing)."""
        return decode_gaps(self.positions, self.sample_count, self.key_length, field="positions")

    def sample_bits(self) -> Bits:
        """Alice's bits at the sampled positions."""
        return unpack_bits(self.bits, self.sample_count, field="bits")

    def __repr__(self) -> str:
        return f"SampleDisclosure(key_length={self.key_length}, sample_count={self.sample_count})"


@dataclass(frozen=True, slots=True, kw_only=True)
class SampleOutcome:
    """Bob -> Alice: how many of the sampled bits disagreed."""

    sample_bits: int
    errors: int

    def __post_init__(self) -> None:
        _check_count(self.sample_bits, field="sample_bits")
        _check_count(self.errors, field="errors")
        if self.errors > self.sample_bits:
            raise ProtocolError("more errors than sampled bits", field="errors")

    @property
    def qber(self) -> float:
        """Point estimate errors / sample_bits; raises ValueError on an empty sample."""
        if self.sample_bits == 0:
            raise ValueError("no sampled bits: QBER undefined")
        return self.errors / self.sample_bits


def remove_positions(values: Bits, positions: NDArray[np.int64]) -> Bits:
    """``values`` (key bits, or their intensity classes) without the strictly increasing
    ``positions``."""
    if values.shape[0] >= KERNEL_MIN_BITS:
        kept: Bits = kernels.remove_sorted_positions(values, positions)
        return kept
    keep = np.ones(values.shape[0], dtype=np.bool_)
    keep[positions] = False
    return values[keep]


def disclose_key_sample(
    key_bits: Bits, *, sample_bits: int, rng: np.random.Generator, ledger: LeakageLedger
) -> tuple[SampleDisclosure, Bits]:
    """Alice: disclose ``sample_bits`` random key positions; return message and remaining key.

    Records ``sample_bits`` disclosed bits in ``ledger``. Raises ValueError if ``sample_bits`` is
    negative or larger than the key.
    """
    check_bits(key_bits, field="key_bits")
    length = int(key_bits.shape[0])
    if isinstance(sample_bits, bool) or not isinstance(sample_bits, int):
        raise TypeError("sample_bits must be an int")
    if not 0 <= sample_bits <= length:
        raise ValueError(f"sample_bits must be in [0, {length}], got {sample_bits}")
    positions = np.sort(rng.choice(length, size=sample_bits, replace=False).astype(np.int64))
    disclosure = SampleDisclosure(
        key_length=length,
        sample_count=sample_bits,
        positions=encode_gaps(positions),
        bits=pack_bits(key_bits[positions]),
    )
    ledger.record_estimation_sample(sample_bits)
    return disclosure, remove_positions(key_bits, positions)


def compare_key_sample(
    key_bits: Bits, disclosure: SampleDisclosure, *, ledger: LeakageLedger
) -> tuple[SampleOutcome, Bits]:
    """Bob: count disagreements with Alice's sample; return the answer and his key without them.

    Raises ProtocolError if the disclosure refers to a key of another length (ledger untouched).
    """
    check_bits(key_bits, field="key_bits")
    if disclosure.key_length != key_bits.shape[0]:
        raise ProtocolError("does not match the sifted key length", field="key_length")
    positions = disclosure.sample_positions()
    errors = int(np.count_nonzero(key_bits[positions] != disclosure.sample_bits()))
    ledger.record_estimation_sample(disclosure.sample_count)
    outcome = SampleOutcome(sample_bits=disclosure.sample_count, errors=errors)
    return outcome, remove_positions(key_bits, positions)


def confirm_sample_outcome(disclosure: SampleDisclosure, outcome: SampleOutcome) -> None:
    """Alice: raise ProtocolError unless Bob's outcome answers this disclosure."""
    if outcome.sample_bits != disclosure.sample_count:
        raise ProtocolError("does not match the disclosed sample", field="sample_bits")


# --------------------------------------------------------------------------------------------
# Test basis
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TestBasisDisclosure:
    """Bob -> Alice: all of Bob's test-basis bits, packed, in sifted (pulse) order."""

    __test__ = False  # not a pytest test class despite the name

    test_count: int
    bits: bytes

    def __post_init__(self) -> None:
        _check_count(self.test_count, field="test_count")
        unpack_bits(self.bits, self.test_count, field="bits")

    def test_bits(self) -> Bits:
        return unpack_bits(self.bits, self.test_count, field="bits")

    def __repr__(self) -> str:
        return f"TestBasisDisclosure(test_count={self.test_count})"


@dataclass(frozen=True, slots=True, kw_only=True)
class TestBasisStatistics:
    """Test-basis counts n_{Z,k} and errors m_{Z,k} per intensity class (Lim et al. 2014).

    Computed by Alice; plain ints, so it can be sent to Bob as is, who checks the counts against
    his own with :func:`confirm_test_basis_statistics`.
    """

    __test__ = False  # not a pytest test class despite the name

    count_signal: int
    count_decoy: int
    count_vacuum: int
    errors_signal: int
    errors_decoy: int
    errors_vacuum: int

    def __post_init__(self) -> None:
        for name in ("signal", "decoy", "vacuum"):
            count = getattr(self, f"count_{name}")
            errors = getattr(self, f"errors_{name}")
            _check_count(count, field=f"count_{name}")
            _check_count(errors, field=f"errors_{name}")
            if errors > count:
                raise ProtocolError("more errors than bits", field=f"errors_{name}")

    @property
    def counts(self) -> tuple[int, int, int]:
        """n_{Z,k} for k = signal, decoy, vacuum."""
        return self.count_signal, self.count_decoy, self.count_vacuum

    @property
    def errors(self) -> tuple[int, int, int]:
        """m_{Z,k} for k = signal, decoy, vacuum."""
        return self.errors_signal, self.errors_decoy, self.errors_vacuum


def disclose_test_basis(sifted: SiftedBlock) -> TestBasisDisclosure:
    """Bob: disclose all his test-basis bits (no ledger entry: see the module docstring)."""
    return TestBasisDisclosure(test_count=sifted.test_length, bits=pack_bits(sifted.test_bits))


def count_test_basis_errors(
    sifted: SiftedBlock, disclosure: TestBasisDisclosure
) -> TestBasisStatistics:
    """Alice: compare Bob's test bits with hers; counts and errors per intensity class."""
    if disclosure.test_count != sifted.test_length:
        raise ProtocolError("does not match the sifted test-basis length", field="test_count")
    wrong = sifted.test_bits != disclosure.test_bits()
    counts = np.bincount(sifted.test_intensity, minlength=INTENSITY_CLASSES)
    errors = np.bincount(sifted.test_intensity[wrong], minlength=INTENSITY_CLASSES)
    return TestBasisStatistics(
        count_signal=int(counts[0]),
        count_decoy=int(counts[1]),
        count_vacuum=int(counts[2]),
        errors_signal=int(errors[0]),
        errors_decoy=int(errors[1]),
        errors_vacuum=int(errors[2]),
    )


def confirm_test_basis_statistics(sifted: SiftedBlock, statistics: TestBasisStatistics) -> None:
    """Bob: raise ProtocolError unless Alice's counts per intensity equal his own."""
    if statistics.counts != sifted.test_counts_per_intensity():
        raise ProtocolError("test-basis counts differ from ours", field="count")


# --------------------------------------------------------------------------------------------
# QBER values and abort decisions
# --------------------------------------------------------------------------------------------


def qber_after_reconciliation(errors_corrected: int, key_bits: int) -> float:
    """QBER of the reconciled key: errors actually corrected / key length."""
    if key_bits <= 0:
        raise ValueError(f"key_bits must be > 0, got {key_bits}")
    if not 0 <= errors_corrected <= key_bits:
        raise ValueError(f"errors_corrected must be in [0, {key_bits}], got {errors_corrected}")
    return errors_corrected / key_bits


def qber_estimate_for_reconciliation(
    errors: int,
    sample_bits: int,
    *,
    z: float = RECONCILIATION_QBER_Z,
    floor: float = RECONCILIATION_QBER_FLOOR,
    ceiling: float = RECONCILIATION_QBER_CEILING,
) -> float:
    """A QBER for sizing Cascade's blocks, in ``[floor, ceiling]`` within (0, 0.5).

    The Wilson score upper bound (E. B. Wilson, JASA 22, 209 (1927); Eq. for the interval limits
    (p + z²/2n ± z sqrt(p(1−p)/n + z²/4n²)) / (1 + z²/n)) with ``z`` standard deviations
    (default 1, about an 84 % one-sided level). Unlike the point estimate it is > 0 even when the
    sample saw no error (≈ z²/n), so Cascade's first block size 0.73/Q stays finite; it leans
    high, which costs a few parities but avoids under-sized correction. Clamped to
    ``[floor, ceiling]``. This value sizes reconciliation only; security uses the finite-key bound.
    """
    if sample_bits <= 0:
        raise ValueError("sample_bits must be > 0 to estimate a QBER")
    if not 0 <= errors <= sample_bits:
        raise ValueError(f"errors must be in [0, {sample_bits}], got {errors}")
    if not (z > 0 and 0 < floor <= ceiling < 0.5):
        raise ValueError("need z > 0 and 0 < floor <= ceiling < 0.5")
    n = sample_bits
    p = errors / n
    z2 = z * z
    centre = p + z2 / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    upper = (centre + spread) / (1 + z2 / n)
    return min(max(upper, floor), ceiling)


def check_block_not_empty(key_bits: int) -> BlockAborted | None:
    """Abort with EMPTY_BLOCK when no key bit is left to work on."""
    if key_bits < 0:
        raise ValueError(f"key_bits must be >= 0, got {key_bits}")
    if key_bits == 0:
        return BlockAborted(reason=AbortReason.EMPTY_BLOCK, detail="no key bits in the block")
    return None


def check_qber(qber: float, threshold: float) -> BlockAborted | None:
    """Abort with QBER_ABOVE_THRESHOLD when ``qber > threshold`` or ``qber >= 0.5``.

    At QBER >= 0.5 Bob's bits are uncorrelated with Alice's (or anti-correlated, which an
    adversary could arrange), so no threshold may let such a block through.
    """
    if not 0.0 <= qber <= 1.0:  # also rejects NaN
        raise ValueError(f"qber must be in [0, 1], got {qber}")
    if not 0.0 <= threshold <= 0.5:
        raise ValueError(f"threshold must be in [0, 0.5], got {threshold}")
    if qber >= 0.5:
        return BlockAborted(
            reason=AbortReason.QBER_ABOVE_THRESHOLD, detail=f"qber {qber:.4f} >= 0.5"
        )
    if qber > threshold:
        return BlockAborted(
            reason=AbortReason.QBER_ABOVE_THRESHOLD,
            detail=f"qber {qber:.4f} above threshold {threshold:.4f}",
        )
    return None


def check_sample(outcome: SampleOutcome, threshold: float) -> BlockAborted | None:
    """Abort decision on the key-basis sample: EMPTY_BLOCK if nothing was sampled, else QBER."""
    if outcome.sample_bits == 0:
        return BlockAborted(reason=AbortReason.EMPTY_BLOCK, detail="empty estimation sample")
    return check_qber(outcome.qber, threshold)
