"""A small, independent BB84 block generator for post-processing tests (not the link simulator).

Alice: uniform bits, key basis with probability ``p_key_basis``, intensity classes with the given
probabilities. Bob: each pulse detected with a per-intensity probability, his own biased basis,
and (when bases match) the bit flipped with probability ``qber``; random bit otherwise.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from qkdnode.postprocess.cascade import CascadeVariant
from qkdnode.postprocess.finitekey import (
    DecoySettings,
    SecurityParameters,
)
from qkdnode.postprocess.pipeline import (
    PipelineParameters,
)
from qkdnode.postprocess.records import (
    DetectedEmissionRecords,
    DetectionRecords,
    EmissionRecords,
)


def make_block(
    rng: np.random.Generator,
    *,
    pulse_count: int,
    detection_probability: tuple[float, float, float] = (0.05, 0.02, 0.001),
    qber: float = 0.02,
    p_key_basis: float = 0.9,
    p_intensity: tuple[float, float, float] = (0.7, 0.2, 0.1),
    first_pulse_index: int = 0,
    vacuum_qber: float = 0.5,
) -> tuple[EmissionRecords, DetectionRecords]:
    bit = rng.integers(0, 2, pulse_count, dtype=np.uint8)
    basis = (rng.random(pulse_count) >= p_key_basis).astype(np.uint8)
    intensity = rng.choice(3, size=pulse_count, p=p_intensity).astype(np.uint8)
    emissions = EmissionRecords(
        first_pulse_index=first_pulse_index, bit=bit, basis=basis, intensity=intensity
    )
    detected = rng.random(pulse_count) < np.asarray(detection_probability)[intensity]
    offsets = np.flatnonzero(detected)
    bob_basis = (rng.random(offsets.size) >= p_key_basis).astype(np.uint8)
    error_rate = np.where(intensity[offsets] == 2, vacuum_qber, qber)
    flips = (rng.random(offsets.size) < error_rate).astype(np.uint8)
    bob_bit = bit[offsets] ^ flips
    mismatched = bob_basis != basis[offsets]
    bob_bit[mismatched] = rng.integers(0, 2, int(mismatched.sum()), dtype=np.uint8)
    detections = DetectionRecords(
        first_pulse_index=first_pulse_index,
        pulse_count=pulse_count,
        pulse_index=(offsets + first_pulse_index).astype(np.int64),
        basis=bob_basis,
        bit=bob_bit,
    )
    return emissions, detections


SECURITY = SecurityParameters(eps_sec=1e-10, eps_cor=1e-12)


SINGLE_PHOTON = PipelineParameters(
    cascade_variant=CascadeVariant.SUBBLOCK_REUSE,
    security=SECURITY,
    qber_threshold=0.05,
    sample_bits=2000,
)


DECOY = DecoySettings(
    mu_signal=0.5,
    mu_decoy=0.15,
    mu_vacuum=0.0002,
    p_signal=0.5,
    p_decoy=0.35,
    p_vacuum=0.15,
    p_key_basis=0.5,
)


def detected_records(
    emissions: EmissionRecords, offsets: NDArray[np.int64]
) -> DetectedEmissionRecords:
    """Alice's records of the pulses at ``offsets`` only, taken from her dense ``emissions``."""
    return DetectedEmissionRecords(
        first_pulse_index=emissions.first_pulse_index,
        pulse_count=emissions.pulse_count,
        offset=offsets,
        bit=emissions.bit[offsets],
        basis=emissions.basis[offsets],
        intensity=emissions.intensity[offsets],
    )
