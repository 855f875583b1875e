"""A small, independent BB84 block generator for post-processing tests (not the link simulator).

Alice: uniform bits, key basis with probability ``p_key_basis``, intensity classes with the given
probabilities. Bob: each pulse detected with a per-intensity probability, his own biased basis,
and (when bases match) the bit flipped with probability ``qber``; random bit otherwise.
"""

from __future__ import annotations

import numpy as np

from qkdnode.postprocess.records import DetectionRecords, EmissionRecords


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
