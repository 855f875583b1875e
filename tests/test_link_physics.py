"""Physics of the simulated link against independent formulas (seeded, fast)."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from qkdnode.config.link import SimulatedLinkConfig
from qkdnode.link.interface import LinkParameters
from qkdnode.link.physics import (
    AfterpulseCarry,
    Receiver,
    Source,
    bernoulli_positions,
    encode_pulses,
)


def _params(**overrides: float) -> LinkParameters:
    return SimulatedLinkConfig(**overrides).nominal_parameters()  # type: ignore[arg-type]


def _within(observed: float, expected: float, sigma: float, label: str) -> None:
    assert sigma > 0
    assert abs(observed - expected) <= 4 * sigma, (
        f"{label}: observed {observed:.6g}, expected {expected:.6g} ± 4·{sigma:.3g}"
    )


def test_source_statistics_match_the_configured_distributions() -> None:
    params = _params(mu_signal=0.8, mu_decoy=0.3, mu_vacuum=0.05, p_key_basis=0.7)
    rng = np.random.default_rng(11)
    count = 1 << 21
    emission = Source(params).emit(count, rng)
    photons = emission.pulses >> 2
    # The fibre byte carries exactly Alice's basis and bit.
    assert np.array_equal(emission.pulses & 1, emission.bit)
    assert np.array_equal((emission.pulses >> 1) & 1, emission.basis)
    p_z = float(np.mean(emission.basis == 0))
    _within(p_z, 0.7, math.sqrt(0.21 / count), "P(basis Z)")
    _within(float(np.mean(emission.bit)), 0.5, math.sqrt(0.25 / count), "P(bit 1)")
    for cls, (mu, p) in enumerate(
        zip(params.intensities, params.intensity_probabilities, strict=True)
    ):
        in_class = emission.intensity == cls
        _within(float(np.mean(in_class)), p, math.sqrt(p * (1 - p) / count), f"P(class {cls})")
        n = int(np.count_nonzero(in_class))
        for k in range(4):  # Poisson pmf, written out independently of the source's table
            expected = math.exp(-mu) * mu**k / math.factorial(k)
            observed = float(np.mean(photons[in_class] == k))
            sigma = math.sqrt(max(expected * (1 - expected), 1.0 / n) / n)
            _within(observed, expected, sigma, f"P(n={k} | class {cls})")


def test_source_is_a_pure_function_of_the_generator() -> None:
    params = _params()
    first = Source(params).emit(10_000, np.random.default_rng(5))
    second = Source(params).emit(10_000, np.random.default_rng(5))
    assert np.array_equal(first.pulses, second.pulses)
    assert np.array_equal(first.intensity, second.intensity)
    assert "bit" not in repr(first) and "pulse_count=10000" in repr(first)


@pytest.mark.parametrize("p", [1e-4, 0.01, 0.2, 0.6])
def test_bernoulli_positions_count_and_shape(p: float) -> None:
    trials = 400_000
    positions = bernoulli_positions(trials, p, np.random.default_rng(2))
    assert positions.dtype == np.int64
    assert positions.size == 0 or (positions[0] >= 0 and positions[-1] < trials)
    assert bool(np.all(np.diff(positions) > 0))
    _within(positions.size, trials * p, math.sqrt(trials * p * (1 - p)), "successes")
    # Successes spread uniformly: half of them fall in the first half of the trials.
    if positions.size > 100:
        half = float(np.mean(positions < trials // 2))
        _within(half, 0.5, math.sqrt(0.25 / positions.size), "first-half share")


def test_bernoulli_positions_edge_cases() -> None:
    rng = np.random.default_rng(0)
    assert bernoulli_positions(0, 0.5, rng).size == 0
    assert bernoulli_positions(100, 0.0, rng).size == 0
    assert np.array_equal(bernoulli_positions(5, 1.0, rng), np.arange(5))


def test_double_clicks_are_resolved_by_a_random_bit() -> None:
    # Lossless, ideal receiver, Bob always in basis Z, 63 photons per pulse.
    params = _params(detector_efficiency=1.0, p_key_basis=1.0, misalignment_error=0.0)
    count = 20_000
    rng = np.random.default_rng(3)
    bit = rng.integers(0, 2, count, dtype=np.uint8)
    photons = np.full(count, 63, dtype=np.uint8)
    # Alice in Z: every photon reaches the detector of her bit, never a double click.
    same = encode_pulses(photons, np.zeros(count, dtype=np.uint8), bit)
    detections, _ = Receiver(params).detect(same, 1.0, rng, AfterpulseCarry())
    assert np.array_equal(detections.offset, np.arange(count))
    assert np.array_equal(detections.bit, bit)
    # Alice in X: both detectors click (probability 1 - 2^-62): bits are fair coin flips,
    # independent of Alice's bit.
    other = encode_pulses(photons, np.ones(count, dtype=np.uint8), bit)
    detections, _ = Receiver(params).detect(other, 1.0, rng, AfterpulseCarry())
    assert detections.offset.size == count
    _within(float(np.mean(detections.bit)), 0.5, math.sqrt(0.25 / count), "double-click bit")
    _within(float(np.mean(detections.bit == bit)), 0.5, math.sqrt(0.25 / count), "agreement")


def test_single_photons_in_the_other_basis_go_to_either_detector() -> None:
    params = _params(detector_efficiency=1.0, p_key_basis=1.0, misalignment_error=0.0)
    count = 20_000
    rng = np.random.default_rng(4)
    pulses = encode_pulses(
        np.ones(count, dtype=np.uint8),
        np.ones(count, dtype=np.uint8),
        np.zeros(count, dtype=np.uint8),
    )
    detections, _ = Receiver(params).detect(pulses, 1.0, rng, AfterpulseCarry())
    assert detections.offset.size == count
    _within(float(np.mean(detections.bit)), 0.5, math.sqrt(0.25 / count), "bit")


def test_afterpulse_carry_crosses_chunk_boundaries() -> None:
    params = _params(dark_count_probability_per_gate=0.0, afterpulse_probability=1 - 1e-12)
    receiver = Receiver(params)
    empty = np.zeros(10, dtype=np.uint8)
    rng = np.random.default_rng(5)
    quiet, carry = receiver.detect(empty, 1.0, rng, AfterpulseCarry())
    assert quiet.offset.size == 0 and carry == AfterpulseCarry()
    chained, carry = receiver.detect(empty, 1.0, rng, AfterpulseCarry(detector1=True))
    # The carried click after-pulses into gate 0 and chains through the run, in detector 1.
    assert np.array_equal(chained.offset, np.arange(10))
    assert np.all(chained.bit == 1)
    assert carry == AfterpulseCarry(detector0=False, detector1=True)


def test_afterpulse_probability_in_the_next_gate() -> None:
    # P(click in gate i+1 | click in gate i) = p_ap + (1 - p_ap) Q̄ (model of physics.py), with
    # Q̄ the mean gain without after-pulses; at 100 km double clicks are negligible.
    p_ap = 0.2
    params = _params(
        fiber_km=100.0,
        detector_efficiency=0.5,
        mu_signal=0.8,
        mu_decoy=0.3,
        mu_vacuum=0.05,
        dark_count_probability_per_gate=1e-4,
        afterpulse_probability=p_ap,
    )
    count = 1 << 22
    rng = np.random.default_rng(6)
    pulses = Source(params).emit(count, rng).pulses
    detections, _ = Receiver(params).detect(
        pulses, params.fibre_transmittance, rng, AfterpulseCarry()
    )
    clicked = np.zeros(count + 1, dtype=bool)
    clicked[detections.offset] = True
    after_click = clicked[1:][clicked[:-1]]
    eta = params.channel_transmittance
    y0 = 2 * params.dark_count_probability_per_gate
    gain = sum(
        p * (y0 + 1 - math.exp(-eta * mu))
        for mu, p in zip(params.intensities, params.intensity_probabilities, strict=True)
    )
    expected = p_ap + (1 - p_ap) * gain
    n = after_click.size
    assert n > 5_000
    _within(
        float(np.mean(after_click)), expected, math.sqrt(expected * (1 - expected) / n), "P(ap)"
    )


def test_pure_link_modules_import_no_io_library() -> None:
    code = (
        "import sys\n"
        "import qkdnode.link, qkdnode.link.physics, qkdnode.link.fibre, qkdnode.config.link\n"
        "io = ('trio', 'socket', 'asyncio', 'selectors')\n"
        "print(','.join(m for m in io if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == ""
