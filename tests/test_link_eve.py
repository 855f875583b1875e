"""Eve on the fibre: intercept-resend raises the QBER to 25 %; photon-number splitting keeps the
signal gain and QBER but shifts the decoy gains, and the decoy bound then leaves no key."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qkdnode.config.link import EveConfig, SimulatedLinkConfig
from qkdnode.errors import BadDeviceData
from qkdnode.link.eve import (
    EveAttack,
    PnsPlan,
    intercept_resend,
    photon_number_split,
    plan_pns,
    pns_signal_gain,
    run_eve_proxy,
)
from qkdnode.link.fibre import PulseFrame
from qkdnode.link.physics import encode_pulses
from qkdnode.link.simulated import memory_fibre
from qkdnode.postprocess.finitekey import (
    DecoyObservation,
    DecoySettings,
    SecurityParameters,
    binary_entropy,
    lim_key_length,
)
from tests.helpers_link import ClassCounts, count_by_class, run_blocks

BRIGHT = SimulatedLinkConfig(
    fiber_km=0.0,
    detector_efficiency=0.5,
    dark_count_probability_per_gate=1e-7,
    misalignment_error=0.0,
    p_key_basis=0.5,
)


def _qber(counts: list[ClassCounts]) -> tuple[float, int]:
    sifted = sum(c.sifted for c in counts)
    return sum(c.errors for c in counts) / sifted, sifted


@pytest.mark.parametrize("fraction", [1.0, 0.5])
async def test_intercept_resend_raises_the_qber(fraction: float) -> None:
    eve = EveConfig(intercept_resend_fraction=fraction)
    pairs = await run_blocks(BRIGHT, blocks=1, pulse_count=1 << 20, seed=21, eve=eve)
    qber, sifted = _qber(count_by_class(pairs))
    # An attacked non-empty pulse: Eve guesses the basis right half the time (no error), else
    # Bob's sifted bit is a coin flip, so 1/4 of its sifted detections are errors. She resends
    # one photon (detected with probability η) where Alice's pulse had Poisson(μ) photons
    # (detected with 1 − e^(−ημ)); dark counts (1e-7) are negligible.
    params = BRIGHT.nominal_parameters()
    eta = params.channel_transmittance
    attacked = unattacked = 0.0
    for mu, p in zip(params.intensities, params.intensity_probabilities, strict=True):
        attacked += p * fraction * (1 - math.exp(-mu)) * eta
        unattacked += p * (1 - fraction) * (1 - math.exp(-eta * mu))
    expected = 0.25 * attacked / (attacked + unattacked)
    assert abs(qber - expected) <= 4 * math.sqrt(expected * (1 - expected) / sifted), qber
    if fraction == 1.0:
        assert expected == 0.25


async def test_without_eve_the_bright_link_has_almost_no_errors() -> None:
    pairs = await run_blocks(BRIGHT, blocks=1, pulse_count=1 << 20, seed=21, eve=EveConfig())
    qber, _ = _qber(count_by_class(pairs))
    assert qber < 1e-3


def test_intercept_resend_sends_single_photons_in_eves_basis() -> None:
    rng = np.random.default_rng(1)
    count = 50_000
    photons = rng.poisson(0.5, count).astype(np.uint8)
    basis = rng.integers(0, 2, count, dtype=np.uint8)
    bit = rng.integers(0, 2, count, dtype=np.uint8)
    pulses = encode_pulses(photons, basis, bit)
    attacked = intercept_resend(pulses, 1.0, rng)
    out_photons = attacked >> 2
    assert np.array_equal(out_photons, np.minimum(photons, 1))
    nonempty = photons > 0
    same_basis = ((attacked >> 1) & 1) == basis
    right = (attacked & 1) == bit
    assert np.all(right[nonempty & same_basis])  # right basis: Alice's bit, exactly
    wrong = nonempty & ~same_basis
    _within_half = abs(float(np.mean(right[wrong])) - 0.5) <= 4 * math.sqrt(0.25 / wrong.sum())
    assert _within_half
    assert np.array_equal(attacked[~nonempty], pulses[~nonempty])


def test_pns_keeps_one_photon_and_blocks_single_photons() -> None:
    rng = np.random.default_rng(2)
    photons = np.array([0, 1, 1, 2, 3, 63], dtype=np.uint8)
    pulses = encode_pulses(photons, np.array([0, 1, 0, 1, 0, 1], np.uint8), np.ones(6, np.uint8))
    plan = PnsPlan(single_photon_block_fraction=1.0, forward_transmittance=1.0)
    out = photon_number_split(pulses, plan, rng)
    assert list(out >> 2) == [0, 0, 0, 1, 2, 62]
    assert np.array_equal(out & 3, pulses & 3)  # polarisation untouched: no disturbance
    keep = PnsPlan(single_photon_block_fraction=0.0, forward_transmittance=1.0)
    assert list(photon_number_split(pulses, keep, rng) >> 2) == [0, 1, 1, 1, 2, 62]


@pytest.mark.parametrize("fiber_km", [25.0, 50.0, 100.0])
def test_pns_plan_matches_the_nominal_signal_gain(fiber_km: float) -> None:
    params = SimulatedLinkConfig(fiber_km=fiber_km).nominal_parameters()
    span = params.fibre_transmittance
    plan = plan_pns(params, span, None)
    target = 1 - math.exp(-params.channel_transmittance * params.mu_signal)
    gain = pns_signal_gain(params.mu_signal, params.receiver_transmittance, plan)
    assert gain == pytest.approx(target, rel=1e-9)
    assert 0.0 <= plan.single_photon_block_fraction <= 1.0
    assert 0.0 < plan.forward_transmittance <= 1.0


@pytest.mark.slow  # runs long
async def test_pns_keeps_signal_gain_and_qber_but_the_decoy_bound_leaves_no_key() -> None:
    # At 50 km Eve blocks every single photon (b = 1) and forwards the rest through a channel
    # of transmittance t < 1 chosen so that the signal gain is the nominal one.
    config = SimulatedLinkConfig(
        fiber_km=50.0,
        detector_efficiency=0.6,
        misalignment_error=0.01,
        dark_count_probability_per_gate=1e-6,
        p_key_basis=0.6,
        mu_signal=0.5,
        mu_decoy=0.2,
        mu_vacuum=0.0002,
        p_signal=0.5,
        p_decoy=0.3,
        p_vacuum=0.2,
        chunk_pulses=1 << 20,
    )
    pulses = 1 << 24
    honest = count_by_class(await run_blocks(config, blocks=1, pulse_count=pulses, seed=31))
    attacked = count_by_class(
        await run_blocks(
            config,
            blocks=1,
            pulse_count=pulses,
            seed=32,
            eve=EveConfig(photon_number_splitting=True),
        )
    )
    signal, decoy = attacked[0], attacked[1]
    eta = config.nominal_parameters().channel_transmittance
    y0 = 2 * 1e-6
    nominal_signal = y0 + 1 - math.exp(-eta * 0.5)
    nominal_decoy = y0 + 1 - math.exp(-eta * 0.2)
    sigma_signal = math.sqrt(nominal_signal / signal.pulses)
    assert abs(signal.detections / signal.pulses - nominal_signal) <= 4 * sigma_signal
    # Signal QBER unchanged: e_det + small dark-count share, as without Eve.
    qber_signal = signal.errors / signal.sifted
    expected_qber = (0.5 * y0 + 0.01 * (1 - math.exp(-eta * 0.5))) / nominal_signal
    assert abs(qber_signal - expected_qber) <= 4 * math.sqrt(expected_qber / signal.sifted)
    # Decoy gain collapses: its pulses are mostly single photons, which Eve blocks.
    sigma_decoy = math.sqrt(nominal_decoy / decoy.pulses)
    assert decoy.detections / decoy.pulses < nominal_decoy - 20 * sigma_decoy

    settings = DecoySettings(
        mu_signal=0.5,
        mu_decoy=0.2,
        mu_vacuum=0.0002,
        p_signal=0.5,
        p_decoy=0.3,
        p_vacuum=0.2,
        p_key_basis=0.6,
    )
    security = SecurityParameters(eps_sec=1e-10, eps_cor=1e-15)

    def key_length(counts: list[ClassCounts]) -> int:
        key_sifted = sum(c.key_sifted for c in counts)
        key_qber = sum(c.key_errors for c in counts) / key_sifted
        observation = DecoyObservation(
            key_basis_counts=(counts[0].key_sifted, counts[1].key_sifted, counts[2].key_sifted),
            test_basis_counts=(
                counts[0].test_sifted,
                counts[1].test_sifted,
                counts[2].test_sifted,
            ),
            test_basis_errors=(
                counts[0].test_errors,
                counts[1].test_errors,
                counts[2].test_errors,
            ),
        )
        leak = math.ceil(1.16 * key_sifted * binary_entropy(key_qber))
        return lim_key_length(
            observation, settings, leak_ec_bits=leak, security=security
        ).length_bits

    assert key_length(honest) > 0
    assert key_length(attacked) == 0


async def test_proxy_forwards_and_rejects_garbage() -> None:
    upstream_send, upstream_receive = memory_fibre()
    downstream_send, _downstream_receive = memory_fibre()
    attack = EveAttack(
        EveConfig(intercept_resend_fraction=1.0),
        SimulatedLinkConfig().nominal_parameters(),
        np.random.default_rng(0),
    )
    await upstream_send.send_all(b"QF\x07\x01" + bytes(64))
    with pytest.raises(BadDeviceData):
        await run_eve_proxy(attack, upstream_receive, downstream_send)


def test_attack_apply_rewrites_span_only_for_pns() -> None:
    params = SimulatedLinkConfig(fiber_km=80.0).nominal_parameters()
    rng = np.random.default_rng(3)
    frame = PulseFrame(
        first_pulse_index=10,
        span_transmittance=params.fibre_transmittance,
        pulses=encode_pulses(
            np.full(100, 2, np.uint8), np.zeros(100, np.uint8), np.zeros(100, np.uint8)
        ),
    )
    pns = EveAttack(EveConfig(photon_number_splitting=True), params, rng).apply(frame)
    assert pns.first_pulse_index == 10
    assert (
        pns.span_transmittance
        == plan_pns(params, frame.span_transmittance, None).forward_transmittance
    )
    assert pns.span_transmittance > frame.span_transmittance  # her channel beats the fibre
    resent = EveAttack(EveConfig(intercept_resend_fraction=1.0), params, rng).apply(frame)
    assert resent.span_transmittance == frame.span_transmittance
    assert EveAttack(EveConfig(), params, rng).apply(frame) is frame
