"""The selectable decoy analyses: Chernoff deviations, ordering against the asymptotic rate,
no key at a phase-error bound of 1/2, the Tupkary-Lutkenhaus vacuum term, the decoy estimates
against realised counts of a simulated photon-number model, and the key-rate picture.

Paper reproductions live in test_finitekey.py (Tomamichel et al. 2012 Fig. 2; Lim et al. 2014
Fig. 1) and at the end of this file (Rusca et al. 2018: its stated 1- vs 2-decoy result and the
reach of its Fig. 1 at n_Z = 10^7, with the paper's parameters). ``lim2014-chernoff`` and
``lim2014-kl`` are Lim et al. 2014 with another deviation; their deviations are checked here
against exact Poisson and binomial tails.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkdnode.config.link import SimulatedLinkConfig
from qkdnode.ops.keyrate import one_decoy_theory_bits_per_pulse, simulate_keyrate_versus_distance
from qkdnode.ops.report import plot_keyrate_versus_distance
from qkdnode.postprocess.finitekey import (
    DecoyObservation,
    FiniteKeyAnalysis,
    asymptotic_bb84_rate,
    asymptotic_decoy_bits_per_pulse,
    asymptotic_decoy_length,
    binary_entropy,
    channel_transmittance,
    decoy_key_length_for,
    expected_decoy_observation,
    optimise_decoy_settings,
    tomamichel_key_length,
)
from qkdnode.postprocess.keylength.decoy import no_deviation
from qkdnode.postprocess.keylength.lim2014_chernoff import chernoff_mean_lower, chernoff_mean_upper
from qkdnode.postprocess.keylength.lim2014_kl import (
    binary_relative_entropy,
    relative_entropy_mean_lower,
    relative_entropy_mean_upper,
)
from qkdnode.postprocess.keylength.selection import deviation_for
from tests.helpers_decoy_mc import mc_failures
from tests.helpers_finitekey import LIM_SECURITY, SETTINGS

SECURITY = LIM_SECURITY
ANALYSES = list(FiniteKeyAnalysis)


# ---- the Chernoff deviation against exact Poisson tails ---------------------------------------


def _poisson_log_pmf(k: int, mean: float) -> float:
    if mean == 0.0:
        return 0.0 if k == 0 else -math.inf
    return -mean + k * math.log(mean) - math.lgamma(k + 1)


def _poisson_at_least(x: int, mean: float) -> float:
    """P(X >= x), summed term by term upward until the terms vanish."""
    total, k = 0.0, x
    while True:
        term = math.exp(_poisson_log_pmf(k, mean))
        total += term
        k += 1
        if k > mean and term <= total * 1e-17:
            return total


def _poisson_at_most(x: int, mean: float) -> float:
    total = 0.0
    for k in range(x, -1, -1):
        term = math.exp(_poisson_log_pmf(k, mean))
        total += term
        if k < mean and term <= total * 1e-17:
            break
    return total


@pytest.mark.parametrize("observed", [1, 3, 10, 100, 1000, 10**5, 10**7])
@pytest.mark.parametrize("eps", [1e-3, 1e-10 / 21])
def test_chernoff_bounds_hold_for_the_poisson_limit(observed: int, eps: float) -> None:
    # A Poisson count is the limit of sums of independent Bernoulli trials; Chernoff's tail
    # bound holds for it too, so at the bound's own mean the exact tail must not exceed eps.
    # Chernoff's slack is at most a factor 100 here (the bound is not loose beyond that).
    log_inverse = math.log(1.0 / eps)
    low = chernoff_mean_lower(observed, log_inverse)
    high = chernoff_mean_upper(observed, log_inverse)
    assert 0.0 < low < observed < high
    assert eps / 100 < _poisson_at_least(observed, low) <= eps
    assert eps / 100 < _poisson_at_most(observed, high) <= eps


def test_chernoff_bounds_at_zero_and_monotone() -> None:
    log_inverse = math.log(21 / 1e-10)
    assert chernoff_mean_lower(0, log_inverse) == 0.0
    # P(X = 0) = e^-m <= eps exactly when m >= ln(1/eps)
    assert chernoff_mean_upper(0, log_inverse) == pytest.approx(log_inverse)
    values = [0, 1, 2, 5, 50, 500, 10**6, 10**9, 10**12]
    lows = [chernoff_mean_lower(x, log_inverse) for x in values]
    highs = [chernoff_mean_upper(x, log_inverse) for x in values]
    assert lows == sorted(lows) and highs == sorted(highs)
    # relative width shrinks like 1/sqrt(x): sqrt(2 x ln(1/eps)) to leading order
    x = 10**12
    assert (highs[-1] - x) / math.sqrt(2 * x * log_inverse) == pytest.approx(1.0, rel=1e-3)
    assert (x - lows[-1]) / math.sqrt(2 * x * log_inverse) == pytest.approx(1.0, rel=1e-3)


def test_chernoff_bounds_lie_inside_the_relaxed_closed_form_interval() -> None:
    # The closed-form inversions use the relaxed exponents (Mitzenmacher & Upfal, Probability
    # and Computing, Thms 4.4 and 4.5): P(X >= (1+d) m) <= exp(-d^2 m / (2+d)) and
    # P(X <= (1-d) m) <= exp(-d^2 m / 2). Set to L at m = x/(1+d1), resp. m = x/(1-d2):
    #   (x - L) d1^2 - 3 L d1 - 2 L = 0,   x d2^2 + 2 L d2 - 2 L = 0.
    # The exact exponents are larger for every d > 0, so the module's interval must lie inside.
    rng = random.Random(2017)
    for _ in range(500):
        log_inverse = math.log(10.0 ** rng.uniform(2.0, 15.0))
        # x > L, where the relaxed upper-tail inversion exists; up to 10^9 L
        x = log_inverse * 10.0 ** rng.uniform(1e-3, 9.0)
        d1 = (3 * log_inverse + math.sqrt(log_inverse**2 + 8 * log_inverse * x)) / (
            2 * (x - log_inverse)
        )
        d2 = (-log_inverse + math.sqrt(log_inverse**2 + 2 * log_inverse * x)) / x
        assert x / (1 + d1) <= chernoff_mean_lower(x, log_inverse) < x
        assert x < chernoff_mean_upper(x, log_inverse) <= x / (1 - d2)


# ---- no analysis exceeds the asymptotic rate of the same counts --------------------------------


def _model_counts(fiber_km: float, pulses: int, misalignment: float) -> DecoyObservation:
    eta = channel_transmittance(
        fiber_km=fiber_km, attenuation_db_per_km=0.2, detector_efficiency=0.1
    )
    return expected_decoy_observation(
        settings=SETTINGS,
        transmittance=eta,
        dark_count_probability=6e-7,
        misalignment_error=misalignment,
        pulses=pulses,
    )


@settings(max_examples=300, deadline=None)
@given(
    fiber_km=st.floats(0.0, 160.0),
    log10_pulses=st.floats(5.0, 12.0),
    misalignment=st.floats(0.0, 0.2),
    noise=st.tuples(*(st.floats(0.8, 1.25),) * 9),
    leak_fraction=st.floats(0.0, 0.3),
    disclosed=st.booleans(),
)
def test_no_analysis_exceeds_the_asymptotic_length_of_the_same_counts(
    fiber_km: float,
    log10_pulses: float,
    misalignment: float,
    noise: tuple[float, ...],
    leak_fraction: float,
    disclosed: bool,
) -> None:
    model = _model_counts(fiber_km, round(10**log10_pulses), misalignment)

    def noisy(values: tuple[int, int, int], offset: int) -> tuple[int, int, int]:
        return (
            round(values[0] * noise[offset]),
            round(values[1] * noise[offset + 1]),
            round(values[2] * noise[offset + 2]),
        )

    test = noisy(model.test_basis_counts, 3)
    errors = noisy(model.test_basis_errors, 6)
    obs = DecoyObservation(
        key_basis_counts=noisy(model.key_basis_counts, 0),
        test_basis_counts=test,
        test_basis_errors=(
            min(errors[0], test[0]),
            min(errors[1], test[1]),
            min(errors[2], test[2]),
        ),
    )
    leak = round(leak_fraction * sum(obs.key_basis_counts))
    ceiling = asymptotic_decoy_length(
        obs, SETTINGS, leak_ec_bits=leak, error_positions_disclosed=disclosed
    )
    for analysis in ANALYSES:
        bound = decoy_key_length_for(
            analysis,
            obs,
            SETTINGS,
            leak_ec_bits=leak,
            security=SECURITY,
            error_positions_disclosed=disclosed,
        )
        assert 0 <= bound.length_bits <= ceiling, analysis
        if bound.phase_error_rate >= 0.5:
            assert bound.length_bits == 0


@pytest.mark.parametrize("analysis", ANALYSES)
@pytest.mark.parametrize("error_fraction", [0.5, 0.6, 1.0])
def test_every_analysis_gives_no_key_at_a_phase_error_bound_of_one_half(
    analysis: FiniteKeyAnalysis, error_fraction: float
) -> None:
    good = _model_counts(10.0, 10**11, 0.005)
    obs = DecoyObservation(
        key_basis_counts=good.key_basis_counts,
        test_basis_counts=good.test_basis_counts,
        test_basis_errors=tuple(  # type: ignore[arg-type]
            round(c * error_fraction) for c in good.test_basis_counts
        ),
    )
    # vacuum term counted, no leak: only the phase-error bound can take the key away
    bound = decoy_key_length_for(
        analysis,
        obs,
        SETTINGS,
        leak_ec_bits=0,
        security=SECURITY,
        error_positions_disclosed=False,
    )
    assert bound.length_bits == 0
    assert bound.phase_error_rate == 0.5
    assert bound.single_photon_events > 10**8  # the estimate itself is fine


@settings(max_examples=300, deadline=None)
@given(
    key_bits=st.integers(0, 10**9),
    sample_bits=st.integers(0, 10**8),
    qber_tolerance=st.floats(0.0, 0.6),
    leak_fraction=st.floats(0.0, 1.0),
)
def test_tomamichel_never_exceeds_the_asymptotic_length(
    key_bits: int, sample_bits: int, qber_tolerance: float, leak_fraction: float
) -> None:
    leak = round(leak_fraction * key_bits * binary_entropy(min(qber_tolerance, 0.5)))
    length = tomamichel_key_length(
        key_bits=key_bits,
        sample_bits=sample_bits,
        qber_tolerance=qber_tolerance,
        leak_ec_bits=leak,
        security=SECURITY,
    )
    # asymptotic on the same data: n (1 - h(Q)) - leak (Shor-Preskill with the actual leak)
    ceiling = key_bits * (1.0 - binary_entropy(min(qber_tolerance, 0.5))) - leak
    assert 0 <= length <= max(0.0, ceiling)
    if qber_tolerance >= 0.5:
        assert length == 0
    assert asymptotic_bb84_rate(0.11, 1.0) < 0.001  # the 11 % threshold, as a sanity anchor


# ---- two-way reconciliation: the vacuum term -------------------------------------------------


@pytest.mark.parametrize("analysis", ANALYSES)
def test_disclosed_error_positions_drop_exactly_the_vacuum_term(
    analysis: FiniteKeyAnalysis,
) -> None:
    obs = _model_counts(100.0, 10**11, 0.005)
    one_way = decoy_key_length_for(
        analysis, obs, SETTINGS, leak_ec_bits=0, security=SECURITY, error_positions_disclosed=False
    )
    two_way = decoy_key_length_for(
        analysis, obs, SETTINGS, leak_ec_bits=0, security=SECURITY, error_positions_disclosed=True
    )
    assert two_way.vacuum_events == one_way.vacuum_events
    assert one_way.length_bits - two_way.length_bits == pytest.approx(
        one_way.vacuum_events, abs=1.0
    )


# ---- the default analysis against Lim 2014 (expected counts, optimised settings) -------------


def _optimum(analysis: FiniteKeyAnalysis, pulses: int) -> float:
    eta = channel_transmittance(fiber_km=25.0, attenuation_db_per_km=0.2, detector_efficiency=0.1)
    return optimise_decoy_settings(
        transmittance=eta,
        dark_count_probability=6e-7,
        misalignment_error=0.005,
        reconciliation_efficiency=1.16,
        security=SECURITY,
        pulses=pulses,
        analysis=analysis,
    ).bits_per_pulse


@pytest.mark.parametrize("pulses", [10**8, 10**10])
def test_per_class_analyses_give_more_key_than_lim_at_25_km(pulses: int) -> None:
    lim = _optimum(FiniteKeyAnalysis.LIM2014, pulses)
    chernoff = _optimum(FiniteKeyAnalysis.LIM2014_CHERNOFF, pulses)
    relative_entropy = _optimum(FiniteKeyAnalysis.LIM2014_KL, pulses)
    eta = channel_transmittance(fiber_km=25.0, attenuation_db_per_km=0.2, detector_efficiency=0.1)
    asymptotic = asymptotic_decoy_bits_per_pulse(
        transmittance=eta,
        dark_count_probability=6e-7,
        misalignment_error=0.005,
        reconciliation_efficiency=1.16,
    )
    assert 0 < lim < chernoff <= relative_entropy < asymptotic


# ---- the relative-entropy deviation against exact binomial tails ------------------------------


def _naive_relative_entropy(a: float, b: float) -> float:
    terms = 0.0
    if a > 0:
        terms += a * math.log(a / b)
    if a < 1:
        terms += (1 - a) * math.log((1 - a) / (1 - b))
    return terms


@pytest.mark.parametrize(
    ("a", "b"), [(0.3, 0.1), (0.1, 0.3), (0.0, 0.2), (1.0, 0.9), (0.5, 0.5), (1e-6, 2e-6)]
)
def test_binary_relative_entropy_matches_the_definition(a: float, b: float) -> None:
    assert binary_relative_entropy(a, b) == pytest.approx(
        _naive_relative_entropy(a, b), rel=1e-8, abs=1e-300
    )


def _binomial_log_pmf(k: int, n: int, p: float) -> float:
    if p == 0.0:
        return 0.0 if k == 0 else -math.inf
    if p == 1.0:
        return 0.0 if k == n else -math.inf
    return (
        math.lgamma(n + 1)
        - math.lgamma(k + 1)
        - math.lgamma(n - k + 1)
        + k * math.log(p)
        + (n - k) * math.log1p(-p)
    )


def _binomial_tail(n: int, p: float, ks: range) -> float:
    return sum(math.exp(_binomial_log_pmf(k, n, p)) for k in ks)


@pytest.mark.parametrize(
    ("observed", "trials"), [(1, 50), (5, 200), (40, 100), (300, 2000), (950, 1000), (0, 500)]
)
@pytest.mark.parametrize("eps", [1e-3, 1e-10 / 21])
def test_relative_entropy_bounds_hold_for_the_binomial(
    observed: int, trials: int, eps: float
) -> None:
    # Identical trials are one case of Hoeffding's Theorem 1; at the bound's own mean the exact
    # binomial tail must not exceed eps, and is not smaller than eps / (50 sqrt(trials)).
    log_inverse = math.log(1.0 / eps)
    low = relative_entropy_mean_lower(observed, trials, log_inverse)
    high = relative_entropy_mean_upper(observed, trials, log_inverse)
    assert 0.0 <= low <= observed <= high <= trials
    slack = eps / (50 * math.sqrt(trials))
    if observed > 0:
        at_least = _binomial_tail(trials, low / trials, range(observed, trials + 1))
        assert slack < at_least <= eps
    at_most = _binomial_tail(trials, high / trials, range(0, observed + 1))
    assert slack < at_most <= eps
    # inside the Chernoff and the Hoeffding intervals
    assert low >= chernoff_mean_lower(observed, log_inverse)
    assert high <= chernoff_mean_upper(observed, log_inverse)
    hoeffding = math.sqrt(trials / 2 * log_inverse)
    assert low >= observed - hoeffding and high <= observed + hoeffding


# ---- the key-rate picture: the selected analysis, Lim 2014 beside it --------------------------


def test_keyrate_picture_uses_the_selected_analysis_and_draws_lim_beside_it(
    tmp_path: Path,
) -> None:
    # `qkdnode report` and scripts/plot_keyrate.py both draw from these two functions.
    pytest.importorskip("matplotlib")
    pulses = 1 << 22
    # not the default, to see the selection go through
    analysis = FiniteKeyAnalysis.LIM2014_CHERNOFF
    points, curve = simulate_keyrate_versus_distance(
        SimulatedLinkConfig(),
        distances_km=[0.0],
        curve_km=[0.0, 10.0],
        pulses=pulses,
        analysis=analysis,
    )
    (point,) = points
    line = curve[0]
    assert point["analysis"] == analysis.value
    assert point["key_bits"] > 0
    # the point's theory and the curve's come from the same analysis and settings
    assert point["theory_bits_per_pulse"] == pytest.approx(line["theory"], rel=1e-12)
    # Lim 2014 with its own optimised settings, beside it and below it; one decoy with the
    # same statistics beside it
    for c in curve:
        assert 0 < c["theory_lim2014"] < c["theory"]
        assert c["theory_one_decoy"] == one_decoy_theory_bits_per_pulse(
            SimulatedLinkConfig(), c["distance_km"], pulses, analysis
        )
        assert 0 < c["theory_one_decoy"] < c["theory"]
    labels = plot_keyrate_versus_distance(points, curve, pulses, tmp_path / "a.png", analysis)
    assert f"{analysis.value} theory, N = {pulses:.2e}" in labels
    assert f"{analysis.value} one decoy, same N" in labels
    assert "lim2014 theory, same N" in labels
    lim_only = plot_keyrate_versus_distance(
        points, curve, pulses, tmp_path / "b.png", FiniteKeyAnalysis.LIM2014
    )
    assert "lim2014 theory, same N" not in lim_only


# ---- soundness of the decoy estimates on simulated counts -------------------------------------
#
# A model with known photon-number statistics: every pulse draws its intensity class k and its
# photon number n (Poisson(mu_k)); an n-photon pulse clicks with Y_n = 1 - (1 - Y0)(1 - eta)^n
# and is an error with e_n (1/2 for vacuum). The estimates bound the *realised* counts: s_0 and
# s_1 of the key basis (lower bounds) and v_1, the single-photon errors of the test basis (upper
# bound). [LCWXZ14] Eqs. (2)-(4): s_0 uses 2 one-sided deviations, s_1 those 2 and 3 more, v_1 2,
# each failing w.p. <= eps = eps_sec/21; union bound: P(s_0 fails) <= 2 eps,
# P(s_1 fails) <= 5 eps, P(v_1 fails) <= 2 eps.


def test_the_simulated_estimates_fail_often_without_a_deviation() -> None:
    # The check below has power: with expected counts taken as observed, each estimate fails
    # in roughly half of the draws (measured 45-49 % with this seed).
    failures = mc_failures(no_deviation, 0.42, 200, 10**6)
    assert (failures > 0.25 * 200).all()


@pytest.mark.parametrize("analysis", ANALYSES)
def test_every_decoy_estimate_holds_on_simulated_counts(analysis: FiniteKeyAnalysis) -> None:
    # eps_sec = 0.42: each one-sided deviation may fail w.p. 0.02, so the union bounds allow
    # 2 / 5 / 2 x 0.02 x 300 = 12 / 30 / 12 failures (+3 sigma); we measured none.
    draws, eps = 300, 0.02
    failures = mc_failures(deviation_for(analysis), 21 * eps, draws, 10**6)
    allowed = [terms * eps * draws for terms in (2, 5, 2)]
    for observed, expected in zip(failures, allowed, strict=True):
        assert observed <= expected + 3 * math.sqrt(expected)


# ---- one-decoy BB84 (keylength.one_decoy) -----------------------------------------------------
