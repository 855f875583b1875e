"""The one-decoy analysis (Rusca et al. 2018): soundness on simulated counts, no key beyond the
asymptotic length or at a phase-error bound of 1/2, and the paper's stated results."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkdnode.postprocess.finitekey import (
    FiniteKeyAnalysis,
    SecurityParameters,
    channel_transmittance,
    optimise_decoy_settings,
)
from qkdnode.postprocess.keylength.decoy import no_deviation
from qkdnode.postprocess.keylength.one_decoy import (
    OneDecoyCounts,
    OneDecoyObservation,
    OneDecoySettings,
    expected_one_decoy_counts,
    one_decoy_bound,
    one_decoy_key_length,
    optimise_one_decoy_settings,
    vacuum_upper_bound,
)
from qkdnode.postprocess.keylength.selection import deviation_for
from tests.helpers_decoy_mc import MC_MAX_PHOTONS, mc_model

SECURITY = SecurityParameters(eps_sec=1e-10, eps_cor=1e-15)
ANALYSES = list(FiniteKeyAnalysis)


_ONE_DECOY = OneDecoySettings(mu_signal=0.3, mu_decoy=0.08, p_signal=0.6, p_key_basis=0.5)


def _one_decoy_failures(
    statistics: FiniteKeyAnalysis | None, eps_sec: float, draws: int, pulses: int
) -> np.ndarray:
    """As ``mc_failures`` (tests.helpers_decoy_mc) for the one-decoy bounds (A16), (A17),
    (A22) (s_0 upper, s_1 lower, v_1 upper); ``statistics`` None: no deviation (expected counts
    taken as observed)."""
    # no misalignment: errors come from dark counts, so the m^+_mu2 part of (A16) is nearly tight
    _, yields, errors = mc_model(misalignment=0.0)
    photons = np.arange(MC_MAX_PHOTONS + 1)
    cells = np.array(
        [
            [p * math.exp(-mu) * mu**n / math.factorial(n) for n in photons]
            for mu, p in zip(_ONE_DECOY.intensities, _ONE_DECOY.probabilities, strict=True)
        ]
    )
    cells /= cells.sum()
    rng = np.random.default_rng(2018)
    failures = np.zeros(3, dtype=int)
    deviation = no_deviation if statistics is None else deviation_for(statistics)
    for _ in range(draws):
        key = rng.binomial(rng.multinomial(pulses, cells.ravel()).reshape(cells.shape), yields)
        key_errors = rng.binomial(key, errors)
        test = rng.binomial(rng.multinomial(pulses, cells.ravel()).reshape(cells.shape), yields)
        test_errors = rng.binomial(test, errors)
        bound = one_decoy_bound(
            key.sum(axis=1).tolist(),
            key_errors.sum(axis=1).tolist(),
            test.sum(axis=1).tolist(),
            test_errors.sum(axis=1).tolist(),
            _ONE_DECOY,
            0.0,
            eps_sec,
            1e-15,
            deviation=deviation,
            count_vacuum=True,
            asymptotic=statistics is None,
        )
        s0_upper = vacuum_upper_bound(
            key.sum(axis=1).tolist(),
            key_errors.sum(axis=1).tolist(),
            _ONE_DECOY,
            eps_sec,
            deviation=deviation,
            asymptotic=statistics is None,
        )
        failures += [
            s0_upper < key[:, 0].sum(),
            bound.s_x1 > key[:, 1].sum(),
            bound.v_z1 < test_errors[:, 1].sum(),
        ]
    return failures


def test_the_one_decoy_estimates_fail_often_without_a_deviation() -> None:
    # The check below has some power: with expected counts taken as observed, v_1^U fails in
    # about a third of the draws; s_0^U and s_1^L, which drop multi-photon terms, in a few
    # per cent (measured 7 / 23 / 60 of 200; with each analysis' deviations: none of 300).
    failures = _one_decoy_failures(None, 0.38, 200, 10**6)
    assert failures[0] > 0 and failures[1] > 0 and failures[2] > 0.15 * 200


@pytest.mark.parametrize("analysis", ANALYSES)
def test_every_one_decoy_estimate_holds_on_simulated_counts(analysis: FiniteKeyAnalysis) -> None:
    # eps_sec = 19 x 0.02: s_0^U (A16) / s_1^L (A17) / v_1^U (A22) use 2 / 4 / 2 one-sided
    # deviations of 0.02 each
    draws, eps = 300, 0.02
    failures = _one_decoy_failures(analysis, 19 * eps, draws, 10**6)
    allowed = [terms * eps * draws for terms in (2, 4, 2)]
    for observed, expected in zip(failures, allowed, strict=True):
        assert observed <= expected + 3 * math.sqrt(expected)


def _one_decoy_model_counts(fiber_km: float, pulses: int, misalignment: float) -> OneDecoyCounts:
    eta = channel_transmittance(
        fiber_km=fiber_km, attenuation_db_per_km=0.2, detector_efficiency=0.1
    )
    return expected_one_decoy_counts(
        _ONE_DECOY,
        transmittance=eta,
        dark_count_probability=6e-7,
        misalignment_error=misalignment,
        pulses=pulses,
    )


@settings(max_examples=200, deadline=None)
@given(
    fiber_km=st.floats(0.0, 160.0),
    log10_pulses=st.floats(5.0, 12.0),
    misalignment=st.floats(0.0, 0.2),
    noise=st.tuples(*(st.floats(0.8, 1.25),) * 8),
    leak_fraction=st.floats(0.0, 0.3),
    disclosed=st.booleans(),
)
def test_one_decoy_never_exceeds_the_asymptotic_length_of_the_same_counts(
    fiber_km: float,
    log10_pulses: float,
    misalignment: float,
    noise: tuple[float, ...],
    leak_fraction: float,
    disclosed: bool,
) -> None:
    model = _one_decoy_model_counts(fiber_km, round(10**log10_pulses), misalignment)

    def noisy(values: tuple[float, float], offset: int) -> tuple[int, int]:
        return (round(values[0] * noise[offset]), round(values[1] * noise[offset + 1]))

    key, test = noisy(model.key_counts, 0), noisy(model.test_counts, 2)
    key_errors, test_errors = noisy(model.key_errors, 4), noisy(model.test_errors, 6)
    obs = OneDecoyObservation(
        key_basis_counts=key,
        key_basis_errors=(min(key_errors[0], key[0]), min(key_errors[1], key[1])),
        test_basis_counts=test,
        test_basis_errors=(min(test_errors[0], test[0]), min(test_errors[1], test[1])),
    )
    leak = round(leak_fraction * sum(obs.key_basis_counts))
    common = {"leak_ec_bits": leak, "security": SECURITY, "error_positions_disclosed": disclosed}
    ceiling = one_decoy_key_length(obs, _ONE_DECOY, asymptotic=True, **common)  # type: ignore[arg-type]
    for analysis in ANALYSES:
        bound = one_decoy_key_length(obs, _ONE_DECOY, statistics=analysis, **common)  # type: ignore[arg-type]
        assert 0 <= bound.length_bits <= ceiling.length_bits, analysis
        if bound.phase_error_rate >= 0.5:
            assert bound.length_bits == 0


@pytest.mark.parametrize("analysis", ANALYSES)
@pytest.mark.parametrize("error_fraction", [0.5, 0.6, 1.0])
def test_one_decoy_gives_no_key_at_a_phase_error_bound_of_one_half(
    analysis: FiniteKeyAnalysis, error_fraction: float
) -> None:
    good = _one_decoy_model_counts(10.0, 10**11, 0.005)
    test = (round(good.test_counts[0]), round(good.test_counts[1]))
    obs = OneDecoyObservation(
        key_basis_counts=(round(good.key_counts[0]), round(good.key_counts[1])),
        key_basis_errors=(round(good.key_errors[0]), round(good.key_errors[1])),
        test_basis_counts=test,
        test_basis_errors=(round(test[0] * error_fraction), round(test[1] * error_fraction)),
    )
    bound = one_decoy_key_length(
        obs,
        _ONE_DECOY,
        leak_ec_bits=0,
        security=SECURITY,
        statistics=analysis,
        error_positions_disclosed=False,
    )
    assert bound.length_bits == 0
    assert bound.phase_error_rate == 0.5
    assert bound.single_photon_events > 10**8


def test_one_decoy_inputs_are_validated() -> None:
    with pytest.raises(ValueError, match="mu_signal"):
        OneDecoySettings(mu_signal=0.1, mu_decoy=0.2, p_signal=0.5, p_key_basis=0.5)
    with pytest.raises(ValueError, match="mu_decoy"):
        OneDecoySettings(mu_signal=0.5, mu_decoy=0.0, p_signal=0.5, p_key_basis=0.5)
    with pytest.raises(ValueError, match="p_signal"):
        OneDecoySettings(mu_signal=0.5, mu_decoy=0.1, p_signal=1.0, p_key_basis=0.5)
    with pytest.raises(ValueError, match=r"key_basis_errors\[1\]"):
        OneDecoyObservation(
            key_basis_counts=(10, 10),
            key_basis_errors=(1, 11),
            test_basis_counts=(10, 10),
            test_basis_errors=(1, 1),
        )


def _best_rates(pulses: int) -> tuple[float, float]:
    eta = channel_transmittance(fiber_km=25.0, attenuation_db_per_km=0.2, detector_efficiency=0.1)
    channel = {
        "transmittance": eta,
        "dark_count_probability": 6e-7,
        "misalignment_error": 0.005,
        "reconciliation_efficiency": 1.16,
        "security": SECURITY,
        "pulses": pulses,
    }
    one = optimise_one_decoy_settings(statistics=FiniteKeyAnalysis.LIM2014_KL, **channel)  # type: ignore[arg-type]
    two = optimise_decoy_settings(analysis=FiniteKeyAnalysis.LIM2014_KL, **channel)  # type: ignore[arg-type]
    return one.bits_per_pulse, two.bits_per_pulse


def test_one_decoy_does_not_pay_on_the_node_channel() -> None:
    # Computed here, not a published point. On the node's model channel (10 % detector,
    # 6e-7 dark counts, 25 km) with lim2014-kl statistics, the paper's vacuum bound (A16) adds
    # 2 delta(n_X, eps) to s_0^U (thousands of events against tens of dark-count vacuum
    # detections), so one decoy gives less key than two: measured 3.32e-3 vs 3.54e-3 bits/pulse
    # at N = 10^8 (ratio 0.939) and 8.51e-3 vs 8.84e-3 at N = 10^14 (0.963); at 10^9-10^10 the
    # two are equal within 0.1 %. (Before following (A16), a binomial bound on s_0 itself gave
    # one decoy x1.17 at 10^8.) Tolerance: strict inequality.
    one, two = _best_rates(10**8)
    assert 0.0 < one < two
    one, two = _best_rates(10**14)
    assert 0.0 < one < two


# ---- Rusca et al. 2018: the stated result, with the paper's simulation parameters ----------
#
# [RBGMZ18] D. Rusca et al., APL 112, 171104 (2018), arXiv:1801.03443. Simulation parameters of
# its Figs. 1-2 (read from two independent public re-implementations of the paper, which agree;
# the stored copy of the paper gave its abstract only): detector efficiency 50 %, dark-count
# probability P_DC = 1e-8 per gate for the detection pair (5e-9 per detector here, errors
# P_DC / 2 as in its (B4)), misalignment 1 %, f_EC = 1.16, eps_sec = 1e-9, eps_cor = 1e-15;
# block size n_Z = key-basis detections; settings {p_Z, p_mu1, mu1, mu2} optimised per point,
# as in the paper. Both protocols use the paper's statistics (Hoeffding with the basis total,
# (A2)/(A4) = ``lim2014``); the 2-decoy protocol is [LCWXZ14] (vacuum intensity 2e-4). The
# 1 GHz clock and 100 ns dead time only rescale rates per second (the dead time saturates the
# detector at low loss); they do not enter key per pulse or reach and are omitted here.

_RUSCA_SECURITY = SecurityParameters(eps_sec=1e-9, eps_cor=1e-15)


def _rusca_rates(key_block_bits: int, attenuation_db: float) -> tuple[float, float]:
    channel = {
        "transmittance": 0.5 * 10.0 ** (-attenuation_db / 10.0),
        "dark_count_probability": 5e-9,
        "misalignment_error": 0.01,
        "reconciliation_efficiency": 1.16,
        "security": _RUSCA_SECURITY,
        "key_block_bits": key_block_bits,
    }
    one = optimise_one_decoy_settings(statistics=FiniteKeyAnalysis.LIM2014, **channel)
    two = optimise_decoy_settings(analysis=FiniteKeyAnalysis.LIM2014, **channel)
    return one.bits_per_pulse, two.bits_per_pulse


@pytest.mark.parametrize("key_block_bits", [10**6, 10**8])
@pytest.mark.parametrize("attenuation_db", [10.0, 30.0])
def test_rusca_one_decoy_beats_two_decoys_up_to_1e8_bits(
    key_block_bits: int, attenuation_db: float
) -> None:
    # Stated result, not a figure point (a qualitative fallback: the figure values could not
    # be read here). [RBGMZ18] abstract: "for practical block sizes of up to 10^8 bits, the
    # 1-decoy protocol achieves for almost all experimental settings higher secret key rates
    # than the 2-decoy protocol" (its Fig. 2 plots that ratio against attenuation).
    # Tolerance: ratio > 1. Measured 1.174 / 1.176 (n_Z = 10^6, 10 / 30 dB) and 1.116 / 1.118
    # (n_Z = 10^8).
    one, two = _rusca_rates(key_block_bits, attenuation_db)
    assert one > two > 0.0


def test_rusca_two_decoys_win_for_large_blocks() -> None:
    # [RBGMZ18] abstract: "in the asymptotic case of infinite-key length, the 2-decoy state QKD
    # protocol outperforms the 1-decoy state protocol". At n_Z = 10^12, 20 dB: measured
    # 9.86e-4 vs 9.95e-4 bits/pulse (ratio 0.991); the crossing lies between 10^10 (1.05) and
    # 10^12 here, above the paper's "up to 10^8", which the statement above leaves open.
    one, two = _rusca_rates(10**12, 20.0)
    assert 0.0 < one < two


def test_rusca_reach_at_1e7_bits() -> None:
    # [RBGMZ18] Fig. 1, curve n_Z = 10^7: reach (largest attenuation with key) read as "about
    # 60-64 dB" by a public re-implementation of the figure (third-party reading of the plot,
    # not a number printed in the paper). Tolerance: that range. Measured: key up to 63.1 dB.
    one_at_60, _ = _rusca_rates(10**7, 60.0)
    one_at_64, _ = _rusca_rates(10**7, 64.0)
    assert one_at_60 > 0.0
    assert one_at_64 == 0.0


def test_rusca_key_rate_at_26_db_and_1e7_bits() -> None:
    # [RBGMZ18] Fig. 1, curve n_Z = 10^7 at 26 dB (100 km): secret key rate read as "about
    # 2e5 Hz" by the same third-party reading of the log-scale plot. Rate per second: 1 GHz
    # clock, 100 ns dead time applied as the paper's (B3) factor c_dt = 1 / (1 + R P_det t_DT)
    # with P_det the detection probability per pulse. Tolerance: a factor 2 either way (the
    # precision of a reading of a log-scale plot, not a printed number). Measured: 1.23e5 Hz
    # (1.29e5 before the dead-time factor), 0.21 decades below the reading.
    eta = 0.5 * 10.0 ** (-26.0 / 10.0)
    best = optimise_one_decoy_settings(
        transmittance=eta,
        dark_count_probability=5e-9,
        misalignment_error=0.01,
        reconciliation_efficiency=1.16,
        security=_RUSCA_SECURITY,
        key_block_bits=10**7,
        statistics=FiniteKeyAnalysis.LIM2014,
    )
    detection = sum(
        p * (1.0 - (1.0 - 2 * 5e-9) * math.exp(-eta * mu))
        for mu, p in zip(best.settings.intensities, best.settings.probabilities, strict=True)
    )
    rate_hz = best.bits_per_pulse * 1e9 / (1.0 + 1e9 * detection * 100e-9)
    assert 1e5 <= rate_hz <= 4e5
