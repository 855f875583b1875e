"""Raw records of one block, as a quantum link hands them to post-processing.

Conventions shared by every backend and every stage:

- ``basis``: 0 = Z, the *key* basis (chosen with probability ``p_key_basis``, > 1/2 for
  efficient BB84); 1 = X, the *test* basis, whose disclosed bits estimate the phase error.
  (Lim et al. 2014 extract key from their "X" basis; their X is our key basis.)
- ``intensity``: 0 = signal (mu1), 1 = decoy (mu2), 2 = vacuum or weakest decoy (mu3).
- Pulse indices are absolute and agreed by both ends; a block covers the half-open range
  ``[first_pulse_index, first_pulse_index + pulse_count)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray

from qkdnode.errors import ProtocolError

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
        count = self.bit.shape[0]
        for name, values, limit in (
            ("bit", self.bit, 2),
            ("basis", self.basis, 2),
            ("intensity", self.intensity, INTENSITY_CLASSES),
        ):
            if values.ndim != 1 or values.shape[0] != count:
                raise ProtocolError(f"must be 1-D of length {count}", field=name)
            _check_binary(name, values, limit)

    @property
    def pulse_count(self) -> int:
        return int(self.bit.shape[0])

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
            if count > 1 and not bool(np.all(np.diff(self.pulse_index) > 0)):
                raise ProtocolError("must be strictly increasing", field="pulse_index")

    @property
    def detection_count(self) -> int:
        return int(self.pulse_index.shape[0])

    def __repr__(self) -> str:
        return (
            f"DetectionRecords(first_pulse_index={self.first_pulse_index}, "
            f"pulse_count={self.pulse_count}, detections={self.detection_count})"
        )
