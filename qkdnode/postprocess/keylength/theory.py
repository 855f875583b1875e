"""Theory for plots and optimisers: channel model, expected counts, key-rate curves, PLOB.

Pure: ``math`` only. Not used to size any key: the pipeline calls the bounds on observed counts.

Sources:

- [LCWXZ14] C. C. W. Lim et al., PRA 89, 022307 (2014): system model of its Sec. IV.
- [LMC05] H.-K. Lo, X. Ma, K. Chen, PRL 94, 230504 (2005); [MQZL05] X. Ma, B. Qi, Y. Zhao,
  H.-K. Lo, PRA 72, 012326 (2005): gain and error gain of phase-randomised weak coherent pulses.
- [PLOB17] S. Pirandola, R. Laurenza, C. Ottaviani, L. Banchi, Nat. Commun. 8, 15043 (2017):
  repeaterless bound -log2(1 - eta).

``dark_count_probability`` is per detector and per gate; Bob has two detectors, so the vacuum
yield is Y0 = 2 p_dc, exactly as in [LCWXZ14] Sec. IV (D_k = 1 - (1 - 2 p_dc) exp(-eta k)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, NamedTuple

from qkdnode.postprocess.keylength.common import (
    DEFAULT_FINITE_KEY_ANALYSIS,
    DecoyObservation,
    DecoySettings,
    FiniteKeyAnalysis,
    SecurityParameters,
    binary_entropy,
    check_count,
    check_nonneg_finite,
    check_open_unit,
    check_probability,
    entropy_capped,
)
from qkdnode.postprocess.keylength.decoy import DecoyBound, decoy_bound
from qkdnode.postprocess.keylength.selection import deviation_for

# Background (dark-count) errors are random: e0 = 1/2 ([LMC05]).
_BACKGROUND_ERROR_RATE: Final = 0.5


def vacuum_yield(dark_count_probability: float) -> float:
    """Y0 = 2 p_dc: probability of a click with no photon, two detectors each with p_dc per gate.

    This is [LCWXZ14] Sec. IV (D_k = 1 - (1 - 2 p_dc) e^{-eta k}); the exact
    1 - (1 - p_dc)^2 differs by p_dc^2 (4e-13 at their p_dc = 6e-7).
    """
    return 2.0 * check_probability("dark_count_probability", dark_count_probability)


def channel_transmittance(
    *,
    fiber_km: float,
    attenuation_db_per_km: float,
    detector_efficiency: float,
    insertion_loss_db: float = 0.0,
) -> float:
    """System transmittance eta = eta_Bob * 10^(-(alpha L + insertion loss)/10).

    [LCWXZ14] Sec. IV: eta_ch = 10^(-alpha L/10), eta_sys = eta_ch eta_Bob; the optional
    insertion loss (connectors, filters at Bob) is one more attenuation in dB.
    """
    length_km = check_nonneg_finite("fiber_km", fiber_km)
    alpha = check_nonneg_finite("attenuation_db_per_km", attenuation_db_per_km)
    efficiency = check_probability("detector_efficiency", detector_efficiency)
    loss_db = check_nonneg_finite("insertion_loss_db", insertion_loss_db)
    return efficiency * math.pow(10.0, -(alpha * length_km + loss_db) / 10.0)


def _click_probability(mu: float, transmittance: float, y0: float) -> float:
    # 1 - P(no click) = 1 - (1 - Y0) e^{-eta mu}: [MQZL05] yields Y_i = 1 - (1-Y0)(1-eta)^i summed
    # over the Poisson photon number; equals [LMC05]'s Y0 + 1 - e^{-eta mu} to first order in Y0.
    return 1.0 - (1.0 - y0) * math.exp(-transmittance * mu)


def expected_gain(*, mu: float, transmittance: float, dark_count_probability: float) -> float:
    """Gain Q_mu: probability of a click per pulse of mean photon number mu.

    Q_mu = 1 - (1 - Y0) e^{-eta mu} with Y0 = vacuum_yield(p_dc) = 2 p_dc; this is
    [LMC05]'s Y0 + 1 - e^{-eta mu} without dropping the Y0 (1 - e^{-eta mu}) cross term, and is
    exactly D_k of [LCWXZ14] Sec. IV.
    """
    mu = check_nonneg_finite("mu", mu)
    eta = check_probability("transmittance", transmittance)
    return _click_probability(mu, eta, vacuum_yield(dark_count_probability))


def expected_error_gain(
    *,
    mu: float,
    transmittance: float,
    dark_count_probability: float,
    misalignment_error: float,
) -> float:
    """Error gain E_mu Q_mu = e0 Y0 + e_det (1 - e^{-eta mu}), e0 = 1/2 ([LMC05], [MQZL05]).

    With Y0 = 2 p_dc this is p_dc + e_mis (1 - e^{-eta mu}), [LCWXZ14] Sec. IV without
    after-pulses.
    """
    mu = check_nonneg_finite("mu", mu)
    eta = check_probability("transmittance", transmittance)
    e_det = check_probability("misalignment_error", misalignment_error)
    y0 = vacuum_yield(dark_count_probability)
    return _BACKGROUND_ERROR_RATE * y0 + e_det * (1.0 - math.exp(-eta * mu))


class _ClassRates(NamedTuple):
    detections: tuple[float, float, float]  # R_k per pulse of class k
    errors: tuple[float, float, float]  # error probability per pulse of class k


def _class_rates(
    settings: DecoySettings,
    transmittance: float,
    dark_count_probability: float,
    misalignment_error: float,
    afterpulse_probability: float,
) -> _ClassRates:
    """Per-pulse detection and error probabilities per intensity, [LCWXZ14] Sec. IV:
    D_k = 1 - (1 - 2 p_dc) e^{-eta k}, R_k = D_k (1 + p_ap),
    e_k = p_dc + e_mis (1 - e^{-eta k}) + p_ap D_k / 2 (the paper prints eta_ch inside the
    misalignment term; with eta_ch the QBER would be e_mis/eta_Bob, so we read it as eta_sys)."""
    y0 = 2.0 * dark_count_probability
    detections: list[float] = []
    errors: list[float] = []
    for mu in settings.intensities:
        clicks = _click_probability(mu, transmittance, y0)
        detections.append(clicks * (1.0 + afterpulse_probability))
        errors.append(
            _BACKGROUND_ERROR_RATE * y0
            + misalignment_error * (1.0 - math.exp(-transmittance * mu))
            + afterpulse_probability * clicks / 2.0
        )
    return _ClassRates(
        (detections[0], detections[1], detections[2]), (errors[0], errors[1], errors[2])
    )


class _ExpectedCounts(NamedTuple):
    key: tuple[float, float, float]
    test: tuple[float, float, float]
    test_errors: tuple[float, float, float]
    key_error_rate: float


def _expected_counts(settings: DecoySettings, rates: _ClassRates, pulses: float) -> _ExpectedCounts:
    q_key = settings.p_key_basis * settings.p_key_basis  # both choose the key basis
    q_test = (1.0 - settings.p_key_basis) ** 2
    probs = settings.probabilities
    key = tuple(pulses * q_key * p * r for p, r in zip(probs, rates.detections, strict=True))
    test = tuple(pulses * q_test * p * r for p, r in zip(probs, rates.detections, strict=True))
    errs = tuple(pulses * q_test * p * e for p, e in zip(probs, rates.errors, strict=True))
    detected = sum(p * r for p, r in zip(probs, rates.detections, strict=True))
    erred = sum(p * e for p, e in zip(probs, rates.errors, strict=True))
    return _ExpectedCounts(
        (key[0], key[1], key[2]),
        (test[0], test[1], test[2]),
        (errs[0], errs[1], errs[2]),
        min(0.5, erred / detected) if detected > 0.0 else 0.5,
    )


def check_channel(
    transmittance: float,
    dark_count_probability: float,
    misalignment_error: float,
    afterpulse_probability: float,
) -> None:
    check_probability("transmittance", transmittance)
    check_probability("dark_count_probability", dark_count_probability)
    check_probability("misalignment_error", misalignment_error)
    check_probability("afterpulse_probability", afterpulse_probability)


def expected_decoy_observation(
    *,
    settings: DecoySettings,
    transmittance: float,
    dark_count_probability: float,
    misalignment_error: float,
    pulses: int,
    afterpulse_probability: float = 0.0,
) -> DecoyObservation:
    """Expected counts (rounded to the nearest int) of a block of ``pulses`` pulses.

    n_{X,k} = N p_k q^2 R_k, n_{Z,k} = N p_k (1-q)^2 R_k, m_{Z,k} = N p_k (1-q)^2 e_k with the
    [LCWXZ14] Sec. IV model (see expected_gain, expected_error_gain; after-pulses optional).
    """
    check_channel(transmittance, dark_count_probability, misalignment_error, afterpulse_probability)
    n_pulses = check_count("pulses", pulses)
    rates = _class_rates(
        settings,
        transmittance,
        dark_count_probability,
        misalignment_error,
        afterpulse_probability,
    )
    counts = _expected_counts(settings, rates, float(n_pulses))

    def rounded(values: tuple[float, float, float]) -> tuple[int, int, int]:
        return (round(values[0]), round(values[1]), round(values[2]))

    test = rounded(counts.test)
    errors = rounded(counts.test_errors)
    # The additive error model can exceed the click model by O(p_dc) when e_mis ~ 1.
    errors = (min(errors[0], test[0]), min(errors[1], test[1]), min(errors[2], test[2]))
    return DecoyObservation(
        key_basis_counts=rounded(counts.key), test_basis_counts=test, test_basis_errors=errors
    )


def pulses_for_key_block(
    *,
    key_block_bits: int,
    settings: DecoySettings,
    transmittance: float,
    dark_count_probability: float,
    afterpulse_probability: float = 0.0,
) -> float:
    """Expected number of pulses N until n_X = key_block_bits key-basis detections:
    N = n_X / (q^2 sum_k p_k R_k) ([LCWXZ14] Fig. 1 fixes n_X and reports l/N)."""
    block = check_count("key_block_bits", key_block_bits)
    check_channel(transmittance, dark_count_probability, 0.0, afterpulse_probability)
    rates = _class_rates(
        settings, transmittance, dark_count_probability, 0.0, afterpulse_probability
    )
    per_pulse = settings.p_key_basis**2 * sum(
        p * r for p, r in zip(settings.probabilities, rates.detections, strict=True)
    )
    return math.inf if per_pulse <= 0.0 else block / per_pulse


@dataclass(frozen=True, slots=True, kw_only=True)
class TheoryModel:
    transmittance: float
    dark_count_probability: float
    misalignment_error: float
    afterpulse_probability: float
    reconciliation_efficiency: float
    eps_sec: float
    eps_cor: float
    secrecy_per_key_bit: float | None
    key_block_bits: int | None
    pulses: float | None
    analysis: FiniteKeyAnalysis
    error_positions_disclosed: bool


class TheoryPoint(NamedTuple):
    real_length: float
    pulses: float
    eps_sec: float


def theory_point(model: TheoryModel, settings: DecoySettings) -> TheoryPoint:
    """Expected l (real-valued) and N for one setting, optionally with eps_sec = kappa * l."""
    rates = _class_rates(
        settings,
        model.transmittance,
        model.dark_count_probability,
        model.misalignment_error,
        model.afterpulse_probability,
    )
    if model.pulses is not None:
        pulses = model.pulses
    else:
        assert model.key_block_bits is not None
        per_pulse = settings.p_key_basis**2 * sum(
            p * r for p, r in zip(settings.probabilities, rates.detections, strict=True)
        )
        pulses = model.key_block_bits / per_pulse if per_pulse > 0.0 else math.inf
    if not math.isfinite(pulses) or pulses <= 0.0:
        return TheoryPoint(-math.inf, pulses, model.eps_sec)
    counts = _expected_counts(settings, rates, pulses)
    # lambda_EC = f n_X h(e_obs), [LCWXZ14] Sec. IV.
    leak = model.reconciliation_efficiency * sum(counts.key) * entropy_capped(counts.key_error_rate)
    eps_sec = model.eps_sec
    kappa = model.secrecy_per_key_bit
    if kappa is not None:
        # [LCWXZ14] Sec. IV: eps_sec = kappa * l. Start from l <= n_X and iterate
        # l <- L(kappa l): the sequence decreases monotonically and settles in a few steps.
        eps_sec = min(0.5, kappa * max(1.0, sum(counts.key)))

    def bound_at(eps_sec: float) -> DecoyBound:
        return decoy_bound(
            counts.key,
            counts.test,
            counts.test_errors,
            settings,
            leak,
            eps_sec,
            model.eps_cor,
            deviation=deviation_for(model.analysis),
            count_vacuum=not model.error_positions_disclosed,
        )

    bound = bound_at(eps_sec)
    if kappa is not None:
        # A fixed number of steps (no early exit) keeps l/N continuous in the settings, which
        # the optimiser needs; four steps leave eps_sec within a few per cent of kappa * l.
        for _ in range(4):
            if not math.isfinite(bound.real_length):
                break
            eps_sec = min(0.5, kappa * max(1.0, bound.real_length))
            bound = bound_at(eps_sec)
    return TheoryPoint(bound.real_length, pulses, eps_sec)


def make_model(
    *,
    transmittance: float,
    dark_count_probability: float,
    misalignment_error: float,
    afterpulse_probability: float,
    reconciliation_efficiency: float,
    security: SecurityParameters,
    secrecy_per_key_bit: float | None,
    key_block_bits: int | None,
    pulses: int | None,
    analysis: FiniteKeyAnalysis,
    error_positions_disclosed: bool,
) -> TheoryModel:
    check_channel(transmittance, dark_count_probability, misalignment_error, afterpulse_probability)
    if not reconciliation_efficiency >= 1.0 or math.isinf(reconciliation_efficiency):
        raise ValueError(
            f"reconciliation_efficiency: must be finite and >= 1, got {reconciliation_efficiency!r}"
        )
    if secrecy_per_key_bit is not None:
        check_open_unit("secrecy_per_key_bit", secrecy_per_key_bit)
    if (key_block_bits is None) == (pulses is None):
        raise ValueError("key_block_bits/pulses: give exactly one of them")
    if key_block_bits is not None and check_count("key_block_bits", key_block_bits) == 0:
        raise ValueError("key_block_bits: must be > 0")
    if pulses is not None and check_count("pulses", pulses) == 0:
        raise ValueError("pulses: must be > 0")
    return TheoryModel(
        transmittance=transmittance,
        dark_count_probability=dark_count_probability,
        misalignment_error=misalignment_error,
        afterpulse_probability=afterpulse_probability,
        reconciliation_efficiency=reconciliation_efficiency,
        eps_sec=security.eps_sec,
        eps_cor=security.eps_cor,
        secrecy_per_key_bit=secrecy_per_key_bit,
        key_block_bits=key_block_bits,
        pulses=None if pulses is None else float(pulses),
        analysis=FiniteKeyAnalysis(analysis),
        error_positions_disclosed=error_positions_disclosed,
    )


def decoy_secret_bits_per_pulse(
    *,
    settings: DecoySettings,
    fiber_km: float,
    attenuation_db_per_km: float,
    detector_efficiency: float,
    dark_count_probability: float,
    misalignment_error: float,
    pulses: int,
    reconciliation_efficiency: float,
    security: SecurityParameters,
    afterpulse_probability: float = 0.0,
    insertion_loss_db: float = 0.0,
    secrecy_per_key_bit: float | None = None,
    analysis: FiniteKeyAnalysis = DEFAULT_FINITE_KEY_ANALYSIS,
    error_positions_disclosed: bool = True,
) -> float:
    """Finite-key theory curve: floor(l)/N for N pulses at the expected counts.

    Counts are the (unrounded) expectations of the [LCWXZ14] Sec. IV model; the
    error-correction leak is f n_X h(e_obs). ``analysis`` selects the bound;
    ``error_positions_disclosed`` (two-way Cascade) drops
    the vacuum term. With secrecy_per_key_bit = kappa, eps_sec = kappa * l as in [LCWXZ14]
    Fig. 1 (security.eps_sec is then ignored). Returns 0.0 when there is no key.
    """
    eta = channel_transmittance(
        fiber_km=fiber_km,
        attenuation_db_per_km=attenuation_db_per_km,
        detector_efficiency=detector_efficiency,
        insertion_loss_db=insertion_loss_db,
    )
    model = make_model(
        transmittance=eta,
        dark_count_probability=dark_count_probability,
        misalignment_error=misalignment_error,
        afterpulse_probability=afterpulse_probability,
        reconciliation_efficiency=reconciliation_efficiency,
        security=security,
        secrecy_per_key_bit=secrecy_per_key_bit,
        key_block_bits=None,
        pulses=pulses,
        analysis=analysis,
        error_positions_disclosed=error_positions_disclosed,
    )
    point = theory_point(model, settings)
    if not math.isfinite(point.real_length) or point.real_length < 1.0:
        return 0.0
    return math.floor(point.real_length) / point.pulses


def asymptotic_decoy_bits_per_pulse(
    *,
    transmittance: float,
    dark_count_probability: float,
    misalignment_error: float,
    reconciliation_efficiency: float,
    error_positions_disclosed: bool = True,
) -> float:
    """Asymptotic decoy-state BB84 rate (infinitely many decoys, key basis chosen always),
    maximised over the signal intensity mu:

        R = Y0 e^-mu + mu e^-mu Y1 (1 - h(e1)) - f Q_mu h(E_mu)

    (GLLP with [LMC05] Eq. (1), the [LCWXZ14] Sec. IV channel: Y1 = 1 - (1 - Y0)(1 - eta),
    e1 Y1 = Y0/2 + e_mis eta). The vacuum term is dropped when the error positions are
    disclosed (see ``decoy``). The reference every finite-key rate is compared with.
    """
    check_channel(transmittance, dark_count_probability, misalignment_error, 0.0)
    y0 = vacuum_yield(dark_count_probability)
    eta = transmittance
    y1 = 1.0 - (1.0 - y0) * (1.0 - eta)
    e1 = min(0.5, (_BACKGROUND_ERROR_RATE * y0 + misalignment_error * eta) / y1) if y1 > 0 else 0.5

    def rate(mu: float) -> float:
        gain = _click_probability(mu, eta, y0)
        error_gain = _BACKGROUND_ERROR_RATE * y0 + misalignment_error * (1.0 - math.exp(-eta * mu))
        vacuum = 0.0 if error_positions_disclosed else y0 * math.exp(-mu)
        single = mu * math.exp(-mu) * y1 * (1.0 - binary_entropy(e1))
        leak = reconciliation_efficiency * gain * entropy_capped(error_gain / gain)
        return vacuum + single - leak

    # Unimodal in mu on (0, 2]: golden-section search.
    low, high = 1e-6, 2.0
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    for _ in range(80):
        a = high - ratio * (high - low)
        b = low + ratio * (high - low)
        if rate(a) < rate(b):
            low = a
        else:
            high = b
    return max(0.0, rate((low + high) / 2.0))


# ---------------------------------------------------------------------------------------------
# Limits no software can pass
# ---------------------------------------------------------------------------------------------


def plob_bound_bits_per_pulse(transmittance: float) -> float:
    """Repeaterless secret-key capacity of a pure-loss channel, -log2(1 - eta) bits per use.

    [PLOB17], the two-way assisted secret-key capacity of the lossy channel (main result; also
    the abstract of arXiv:1510.08863). No repeaterless QKD protocol beats it at transmittance
    eta. +inf at eta = 1; ValueError outside [0, 1].
    """
    eta = check_probability("transmittance", transmittance)
    if eta == 1.0:
        return math.inf
    return -math.log2(1.0 - eta)
