"""Raw records of one block, as a quantum link hands them to post-processing.

Conventions shared by every backend and every stage:

- ``basis``: 0 = Z, the *key* basis (chosen with probability ``p_key_basis``, > 1/2 for
  efficient BB84); 1 = X, the *test* basis, whose disclosed bits estimate the phase error.
  (Lim et al. 2014 extract key from their "X" basis; their X is our key basis.)
- ``intensity``: 0 = signal (mu1), 1 = decoy (mu2), 2 = vacuum or weakest decoy (mu3).
- Pulse indices are absolute and agreed by both ends; a block covers the half-open range
  ``[first_pulse_index, first_pulse_index + pulse_count)``.

Alice's side comes in two shapes (``AliceRecords``): ``EmissionRecords``, dense, one entry per
pulse (3 bytes per pulse: right for blocks of up to about 10^8 pulses), or any
``EmissionLookup``, which holds no per-pulse array and gives the records of the pulses Bob
announced when sifting asks for them (a block of 10^9 pulses, 10^7 sifted bits, would need
3 GB of dense records).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from qkdnode.errors import ProtocolError
from qkdnode.postprocess import kernels

BASIS_KEY: Final = 0
BASIS_TEST: Final = 1
INTENSITY_SIGNAL: Final = 0
INTENSITY_DECOY: Final = 1
INTENSITY_VACUUM: Final = 2
INTENSITY_CLASSES: Final = 3

Bits = NDArray[np.uint8]


def _check_binary(name: str, values: NDArray[np.uint8], limit: int) -> None:
    if values.dtype != np.uint8:
        raise ProtocolError(f"expected dtype uint8, got {values.dtype}", field=name)
    if values.size and int(values.max()) >= limit:
        raise ProtocolError(f"values must be below {limit}", field=name)


def _check_emission_columns(bit: Bits, basis: Bits, intensity: Bits, *, count: int) -> None:
    """Each of Alice's record columns 1-D of ``count`` uint8 values within its range."""
    for name, values, limit in (
        ("bit", bit, 2),
        ("basis", basis, 2),
        ("intensity", intensity, INTENSITY_CLASSES),
    ):
        if values.ndim != 1 or values.shape[0] != count:
            raise ProtocolError(f"must be 1-D of length {count}", field=name)
        _check_binary(name, values, limit)


@dataclass(frozen=True, slots=True, kw_only=True)
class EmissionRecords:
    """Alice's side of a block: what she sent in every pulse of the range, densely indexed.

    Element ``i`` of each array describes pulse ``first_pulse_index + i``.
    """

    first_pulse_index: int
    bit: Bits
    basis: Bits
    intensity: Bits

    def __post_init__(self) -> None:
        if self.first_pulse_index < 0:
            raise ProtocolError("must be >= 0", field="first_pulse_index")
        _check_emission_columns(self.bit, self.basis, self.intensity, count=self.bit.shape[0])

    @property
    def pulse_count(self) -> int:
        return int(self.bit.shape[0])

    def records_at(self, offsets: NDArray[np.int64]) -> tuple[Bits, Bits, Bits]:
        """(bit, basis, intensity) of the pulses at ``offsets`` from ``first_pulse_index``."""
        check_offsets(offsets, self.pulse_count)
        return self.bit[offsets], self.basis[offsets], self.intensity[offsets]

    def __repr__(self) -> str:  # never print key material
        return (
            f"EmissionRecords(first_pulse_index={self.first_pulse_index}, "
            f"pulse_count={self.pulse_count})"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class DetectionRecords:
    """Bob's side of a block: one entry per detection, ordered by pulse index.

    Double clicks are already resolved (by random assignment of the bit) by the link.
    """

    first_pulse_index: int
    pulse_count: int
    pulse_index: NDArray[np.int64]
    basis: Bits
    bit: Bits

    def __post_init__(self) -> None:
        if self.first_pulse_index < 0 or self.pulse_count < 0:
            raise ProtocolError("must be >= 0", field="first_pulse_index/pulse_count")
        count = self.pulse_index.shape[0]
        if self.pulse_index.dtype != np.int64 or self.pulse_index.ndim != 1:
            raise ProtocolError("must be a 1-D int64 array", field="pulse_index")
        for name, values in (("basis", self.basis), ("bit", self.bit)):
            if values.ndim != 1 or values.shape[0] != count:
                raise ProtocolError(f"must be 1-D of length {count}", field=name)
            _check_binary(name, values, 2)
        if count:
            end = self.first_pulse_index + self.pulse_count
            if (
                int(self.pulse_index[0]) < self.first_pulse_index
                or int(self.pulse_index[-1]) >= end
            ):
                raise ProtocolError("outside the block's pulse range", field="pulse_index")
            # compared in place: no int64 array of differences beside the indices
            index = self.pulse_index
            if count > 1 and not bool(np.all(index[1:] > index[:-1])):
                raise ProtocolError("must be strictly increasing", field="pulse_index")

    @property
    def detection_count(self) -> int:
        return int(self.pulse_index.shape[0])

    def __repr__(self) -> str:
        return (
            f"DetectionRecords(first_pulse_index={self.first_pulse_index}, "
            f"pulse_count={self.pulse_count}, detections={self.detection_count})"
        )


def check_offsets(offsets: NDArray[np.int64], pulse_count: int) -> None:
    """Offsets of pulses in a block: 1-D int64, strictly increasing, in ``[0, pulse_count)``."""
    _check_offset_bounds(offsets, pulse_count)
    if offsets.size > 1 and not bool(np.all(offsets[1:] > offsets[:-1])):
        raise ProtocolError("must be strictly increasing", field="offsets")


def _check_offset_bounds(offsets: NDArray[np.int64], pulse_count: int) -> None:
    """:func:`check_offsets` but for the order: 1-D int64, first and last in the block."""
    if offsets.dtype != np.int64 or offsets.ndim != 1:
        raise ProtocolError("must be a 1-D int64 array", field="offsets")
    if offsets.size and (int(offsets[0]) < 0 or int(offsets[-1]) >= pulse_count):
        raise ProtocolError("outside the block's pulse range", field="offsets")


@runtime_checkable
class EmissionLookup(Protocol):
    """Alice's side of a block without any per-pulse array: the records of the pulses Bob
    announced are produced when sifting asks for them, streamed in chunks of the block.

    ``records_at(offsets)`` takes strictly increasing offsets from ``first_pulse_index`` below
    ``pulse_count`` and returns (bit, basis, intensity), one entry per offset, exactly what
    dense ``EmissionRecords`` of the same block hold there. Raises ``ProtocolError`` for an
    offset outside the block or one it has no record of.
    """

    @property
    def first_pulse_index(self) -> int: ...

    @property
    def pulse_count(self) -> int: ...

    def records_at(self, offsets: NDArray[np.int64]) -> tuple[Bits, Bits, Bits]: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class DetectedEmissionRecords:
    """Alice's records of the detected pulses of a block only (an ``EmissionLookup``).

    Element ``i`` of ``bit``, ``basis`` and ``intensity`` describes pulse
    ``first_pulse_index + offset[i]``; ``offset`` is strictly increasing. A pulse without a
    record was not detected, so Bob never announces it: asking for one raises ProtocolError.
    """

    first_pulse_index: int
    pulse_count: int
    offset: NDArray[np.int64]
    bit: Bits
    basis: Bits
    intensity: Bits

    def __post_init__(self) -> None:
        if self.first_pulse_index < 0 or self.pulse_count < 0:
            raise ProtocolError("must be >= 0", field="first_pulse_index/pulse_count")
        check_offsets(self.offset, self.pulse_count)
        _check_emission_columns(self.bit, self.basis, self.intensity, count=self.offset.shape[0])

    def records_at(self, offsets: NDArray[np.int64]) -> tuple[Bits, Bits, Bits]:
        _check_offset_bounds(offsets, self.pulse_count)
        # one walk through both sorted arrays; it checks that offsets increase as it goes
        found = np.empty((3, offsets.shape[0]), dtype=np.uint8)
        status = kernels.gather_records_at(
            self.offset, self.bit, self.basis, self.intensity, offsets, found
        )
        if status == kernels.RECORDS_NOT_INCREASING:
            raise ProtocolError("must be strictly increasing", field="offsets")
        if status == kernels.RECORDS_MISSING:
            raise ProtocolError("a pulse without a record of Alice's", field="offsets")
        return found[0], found[1], found[2]

    def __repr__(self) -> str:
        return (
            f"DetectedEmissionRecords(first_pulse_index={self.first_pulse_index}, "
            f"pulse_count={self.pulse_count}, records={self.offset.shape[0]})"
        )


AliceRecords = EmissionRecords | EmissionLookup
