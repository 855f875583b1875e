"""One-decoy BB84 (a signal and one decoy intensity, no vacuum): key length, theory, optimiser.

[RBGMZ18] D. Rusca, A. Boaron, F. Grunenfelder, A. Martin, H. Zbinden, "Finite-key analysis for
the 1-decoy state QKD protocol", APL 112, 171104 (2018), arXiv:1801.03443, Appendix A
("Calculation of the SKR"), Eqs. (A1)-(A25).

Provenance of the equations. The stored copy of the paper served here gave its abstract only;
the Appendix A equations below were read from a public equation-by-equation transcription of
the appendix (with its two printing notes, see (A16) and (A18) below) and checked against a
second public implementation of the same appendix and against [LCWXZ14] (C. C. W. Lim et al.,
PRA 89, 022307 (2014); see ``decoy``), which the appendix follows. Each bound below is the
paper's equation; the code is ours. Paper notation: Z is the key basis, X the test basis; here
``key`` / ``test``. mu1 > mu2 > 0, p_k the probability of intensity k, per basis:

(A5)  tau_n = sum_k p_k e^-k k^n / n!, and P(k | n) = p_k e^-k k^n / (n! tau_n).
(A1)-(A4) n*_k = sum_n P(k | n) s_n, m*_k = sum_n P(k | n) v_n: expected count (errors) of
      class k given the photon numbers (s_n detections with n photons, v_n errors among them).
      The paper bounds |n*_k - n_k| <= delta(n_basis, eps), delta(n, eps) = sqrt(n ln(1/eps)/2)
      (Hoeffding with the basis total, = ``lim2014``); here the deviation is that of the
      selected statistics (``lim2014``, ``lim2014_chernoff`` or ``lim2014_kl``), each side
      failing with probability <= eps = eps_sec / 19. n^{+-}_k = (e^k / p_k) (bound on n*_k):
      the weighted form of (A18) (as printed, (A18) lacks the e^k / p_k factor that (A10) and
      [LCWXZ14] need; we use the weighted form).
(A19) vacuum, lower bound: s_0 >= tau_0 (mu1 n^-_mu2 - mu2 n^+_mu1) / (mu1 - mu2).
(A16) vacuum, upper bound (the paper's "second route", from the errors of one intensity class):
      m*_k >= P(k | 0) v_0 (A15), and errors on vacuum detections occur with probability 1/2
      (A12), so with Hoeffding on v_0 and s_0 <= n_basis (A13):
      s_0 <= s_0^U = 2 [ tau_0 (e^k / p_k) m^+_k + delta(n_basis, eps) ].
      We take k = mu2 (fixed before the data: the class with the smaller weighted error count
      in any channel where errors grow with intensity), one deviation per basis as the eps
      count (A24) assumes (the second public implementation takes the smaller bound over both
      classes, which would need a further deviation per basis). (As printed, (A16) writes the
      error deviation with eps1, (A4) with eps2; the split sets both to eps.)
(A17) single photons, lower bound:
      s_1 >= tau_1 mu1 / (mu2 (mu1 - mu2))
             * [ n^-_mu2 - (mu2/mu1)^2 n^+_mu1 - (mu1^2 - mu2^2) / mu1^2 * s_0^U / tau_0 ].

In the test basis only:

(A22) single-photon errors, upper bound: v_1 <= tau_1 (m^+_mu1 - m^-_mu2) / (mu1 - mu2).
(A20), (A21), (A23) phase error: phi <= v_1 / s_1 + gamma(eps_sec, v_1 / s_1, s_key1, s_test1),
      gamma as [LCWXZ14] Eq. (5), with the constant 21^2 / a^2 that (A21) keeps from
      [LCWXZ14] as transcribed (the second implementation uses 19^2, matching the split; the
      larger constant is the conservative one, and the difference is below 1 % of gamma).
(A25) l = floor( s_key0 + s_key1 (1 - h(phi)) - lambda_EC - 6 log2(19 / eps_sec)
      - log2(2 / eps_cor) ). Two-way Cascade drops s_key0 as in ``decoy`` (s_0^U still enters
      (A17)).
(A24) eps_sec = 2 (a1 + 2 a2 + a3) + nu + 6 eps1 + 4 eps2 = 19 eps: 10 one-sided deviations,
      per basis n^-_mu2, n^+_mu1 and the vacuum Hoeffding of (A13) (eps1), m^+_mu2 of (A16)
      (eps2); in the test basis also m^+_mu1 and m^-_mu2 of (A22).

Ours, not the paper's: the two guards shared with ``decoy`` (gamma evaluated at no fewer than
one single-photon error; no key when the lower bounds exceed the detections), and the choice of
statistics. Every deviation is a statement about independent trials that holds whatever the
counts (checked against realised counts of a simulated photon-number model in
tests/test_keylength_analyses.py).

Wiesemann et al. (arXiv:2405.16578, abstract) single out the 1-decoy protocol as one "where
statistics are computed after error correction": (A16) uses the key-basis errors per class,
known only after error correction, to size the key. Their treatment of that step is not applied
here (see ``decoy``). In the node (``security_model = "one_decoy"``, a link with p_vacuum = 0)
Bob reports the errors Cascade corrected per intensity class when it ends
(``ReconciliationDone``): a function of the error positions W, which two-way Cascade discloses
anyway, and the public class labels, so the report discloses nothing more (``leakage``).
Alice sizes the key from it and Bob re-derives the length from his own count. The module also
serves the theory curves, ``scripts/bench_keyrate.py`` and the reproduction test of
[RBGMZ18]'s stated result (tests/test_keylength_analyses.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from qkdnode.postprocess.keylength.common import (
    DecoyKeyBound,
    FiniteKeyAnalysis,
    SecurityParameters,
    binary_entropy,
    check_count,
    check_nonneg_finite,
    check_open_unit,
    check_probability,
    entropy_capped,
)
from qkdnode.postprocess.keylength.decoy import DecoyBound, Deviation, lim_gamma, no_deviation
from qkdnode.postprocess.keylength.optimiser import nelder_mead_max
from qkdnode.postprocess.keylength.selection import deviation_for

# [RBGMZ18] (A24): eps_sec = 19 eps; the 19 in the deviations and in 6 log2(19 / eps_sec).
ONE_DECOY_EPS_SPLIT: Final = 19.0
# [RBGMZ18] (A21): the constant of gamma, 21^2 / a^2, as in [LCWXZ14] Eq. (5).
GAMMA_CONSTANT: Final = 21.0
_BACKGROUND_ERROR_RATE: Final = 0.5
_MAX_MEAN_PHOTON_NUMBER: Final = 50.0


@dataclass(frozen=True, slots=True, kw_only=True)
class OneDecoySettings:
    """Alice's two intensities mu_signal > mu_decoy > 0, the probability p_signal of the signal
    (the decoy has 1 - p_signal) and p_key_basis, each probability in (0, 1)."""

    mu_signal: float
    mu_decoy: float
    p_signal: float
    p_key_basis: float

    def __post_init__(self) -> None:
        for name in ("mu_signal", "mu_decoy"):
            value = check_nonneg_finite(name, getattr(self, name))
            if not 0.0 < value <= _MAX_MEAN_PHOTON_NUMBER:
                raise ValueError(
                    f"{name}: must be in (0, {_MAX_MEAN_PHOTON_NUMBER}], got {value!r}"
                )
        if not self.mu_signal > self.mu_decoy:
            raise ValueError(
                f"mu_signal: must exceed mu_decoy, got {self.mu_signal!r} <= {self.mu_decoy!r}"
            )
        check_open_unit("p_signal", self.p_signal)
        check_open_unit("p_key_basis", self.p_key_basis)

    @property
    def intensities(self) -> tuple[float, float]:
        return (self.mu_signal, self.mu_decoy)

    @property
    def probabilities(self) -> tuple[float, float]:
        return (self.p_signal, 1.0 - self.p_signal)


def _pair(name: str, values: object) -> tuple[int, int]:
    if not isinstance(values, tuple) or len(values) != 2:
        raise ValueError(f"{name}: must be a tuple of 2 counts (signal, decoy)")
    return (check_count(f"{name}[0]", values[0]), check_count(f"{name}[1]", values[1]))


@dataclass(frozen=True, slots=True, kw_only=True)
class OneDecoyObservation:
    """Counts of one block per intensity class (0 signal, 1 decoy), in both bases; the
    key-basis errors are known after error correction. ValueError names a bad field."""

    key_basis_counts: tuple[int, int]
    key_basis_errors: tuple[int, int]
    test_basis_counts: tuple[int, int]
    test_basis_errors: tuple[int, int]

    def __post_init__(self) -> None:
        for counts, errors in (
            ("key_basis_counts", "key_basis_errors"),
            ("test_basis_counts", "test_basis_errors"),
        ):
            n = _pair(counts, getattr(self, counts))
            m = _pair(errors, getattr(self, errors))
            for i in range(2):
                if m[i] > n[i]:
                    raise ValueError(f"{errors}[{i}]: {m[i]} errors exceed {n[i]} detections")
            object.__setattr__(self, counts, n)
            object.__setattr__(self, errors, m)


def _taus(settings: OneDecoySettings) -> tuple[float, float]:
    """tau_0, tau_1: probabilities that Alice sends 0, 1 photons."""
    pairs = list(zip(settings.intensities, settings.probabilities, strict=True))
    tau0 = sum(p * math.exp(-mu) for mu, p in pairs)
    tau1 = sum(p * math.exp(-mu) * mu for mu, p in pairs)
    return tau0, tau1


def hoeffding_delta(total: float, eps: float) -> float:
    """delta(n, eps) = sqrt(n ln(1/eps) / 2) of [RBGMZ18] (A2)."""
    return math.sqrt(max(0.0, total) * math.log(1.0 / eps) / 2.0)


def vacuum_upper_bound(
    counts: Sequence[float],
    errors: Sequence[float],
    settings: OneDecoySettings,
    eps_sec: float,
    *,
    deviation: Deviation,
    asymptotic: bool = False,
) -> float:
    """[RBGMZ18] (A16) for one basis with k = mu2: s_0^U = 2 [tau_0 (e^mu2 / p_mu2) m^+_mu2
    + delta(n_basis, eps)], n_basis = sum(counts) (delta = 0 when ``asymptotic``)."""
    eps = eps_sec / ONE_DECOY_EPS_SPLIT
    tau0, _ = _taus(settings)
    _, upper = deviation(errors, eps)
    weight = math.exp(settings.mu_decoy) / settings.probabilities[1]
    v0_upper = tau0 * weight * max(0.0, upper[1])  # (A15)
    delta = 0.0 if asymptotic else hoeffding_delta(sum(counts), eps)  # (A13)
    return 2.0 * (v0_upper + delta)


def one_decoy_bound(
    key_counts: Sequence[float],
    key_errors: Sequence[float],
    test_counts: Sequence[float],
    test_errors: Sequence[float],
    settings: OneDecoySettings,
    leak_ec_bits: float,
    eps_sec: float,
    eps_cor: float,
    *,
    deviation: Deviation,
    count_vacuum: bool,
    asymptotic: bool = False,
) -> DecoyBound:
    """[RBGMZ18] (A16)-(A25) on real-valued counts; -inf length when no bound.

    ``asymptotic`` (with ``no_deviation``) drops every finite-size term: the upper limit of
    every finite analysis on the same counts. s_x0 / s_z0 in the result are the lower bounds.
    """
    mu1, mu2 = settings.intensities
    weights = [
        math.exp(mu) / p for mu, p in zip(settings.intensities, settings.probabilities, strict=True)
    ]
    tau0, tau1 = _taus(settings)
    eps = eps_sec / ONE_DECOY_EPS_SPLIT

    def scaled(counts: Sequence[float]) -> tuple[list[float], list[float]]:
        lower, upper = deviation(counts, eps)
        return (
            [w * c for w, c in zip(weights, lower, strict=True)],
            [w * c for w, c in zip(weights, upper, strict=True)],
        )

    def vacuum_and_single(counts: Sequence[float], errors: Sequence[float]) -> tuple[float, float]:
        minus, plus = scaled(counts)
        s0_lower = max(0.0, tau0 * (mu1 * minus[1] - mu2 * plus[0]) / (mu1 - mu2))  # (A19)
        s0_upper = vacuum_upper_bound(  # (A16)
            counts, errors, settings, eps_sec, deviation=deviation, asymptotic=asymptotic
        )
        s1 = (  # (A17)
            tau1
            * mu1
            / (mu2 * (mu1 - mu2))
            * (minus[1] - (mu2 / mu1) ** 2 * plus[0] - (1.0 - (mu2 / mu1) ** 2) * s0_upper / tau0)
        )
        return s0_lower, s1

    s_x0, s_x1 = vacuum_and_single(key_counts, key_errors)
    s_z0, s_z1 = vacuum_and_single(test_counts, test_errors)
    err_minus, err_plus = scaled(test_errors)
    v_z1 = max(0.0, tau1 * (err_plus[0] - err_minus[1]) / (mu1 - mu2))  # (A22)

    no_key = DecoyBound(-math.inf, s_x0, s_x1, 0.5, s_z0, s_z1, v_z1)
    if not (s_x1 > 0.0 and s_z1 > 0.0 and math.isfinite(s_x1) and math.isfinite(s_z1)):
        return no_key
    if not asymptotic and (s_x0 + s_x1 > sum(key_counts) or s_z0 + s_z1 > sum(test_counts)):
        return no_key  # lower bounds above the detections: the estimate itself failed
    error_rate = v_z1 / s_z1
    if asymptotic:
        phi, security_bits = error_rate, 0.0
    else:
        gamma_rate = max(error_rate, 1.0 / s_z1)  # as in ``decoy``: never fewer than one error
        if not gamma_rate < 0.5:
            return no_key
        # (A23) with gamma of (A21), which keeps [LCWXZ14]'s 21^2 / a^2
        phi = error_rate + lim_gamma(eps_sec, gamma_rate, s_z1, s_x1, split=GAMMA_CONSTANT)
        security_bits = 6.0 * math.log2(ONE_DECOY_EPS_SPLIT / eps_sec) + math.log2(2.0 / eps_cor)
    if not phi < 0.5:
        return no_key
    vacuum_term = s_x0 if count_vacuum else 0.0
    # (A25)
    real_length = vacuum_term + s_x1 - s_x1 * binary_entropy(phi) - leak_ec_bits - security_bits
    if not math.isfinite(real_length):
        return no_key
    return DecoyBound(real_length, s_x0, s_x1, phi, s_z0, s_z1, v_z1)


def one_decoy_key_length(
    observation: OneDecoyObservation,
    settings: OneDecoySettings,
    *,
    leak_ec_bits: int,
    security: SecurityParameters,
    statistics: FiniteKeyAnalysis = FiniteKeyAnalysis.LIM2014_KL,
    error_positions_disclosed: bool = True,
    asymptotic: bool = False,
) -> DecoyKeyBound:
    """Key length of one one-decoy block: (A25) with the deviations of ``statistics``
    (``asymptotic``: none, and no eps terms). Bad statistics give length 0, never NaN."""
    leak = check_count("leak_ec_bits", leak_ec_bits)
    bound = one_decoy_bound(
        [float(c) for c in observation.key_basis_counts],
        [float(c) for c in observation.key_basis_errors],
        [float(c) for c in observation.test_basis_counts],
        [float(c) for c in observation.test_basis_errors],
        settings,
        float(leak),
        0.5 if asymptotic else security.eps_sec,
        0.5 if asymptotic else security.eps_cor,
        deviation=no_deviation if asymptotic else deviation_for(statistics),
        count_vacuum=not error_positions_disclosed,
        asymptotic=asymptotic,
    )
    length = max(0, math.floor(bound.real_length)) if math.isfinite(bound.real_length) else 0

    def finite(x: float, fallback: float) -> float:
        return x if math.isfinite(x) else fallback

    return DecoyKeyBound(
        length_bits=length,
        vacuum_events=finite(bound.s_x0, 0.0),
        single_photon_events=max(0.0, finite(bound.s_x1, 0.0)),
        phase_error_rate=finite(bound.phi, 0.5),
        test_vacuum_events=finite(bound.s_z0, 0.0),
        test_single_photon_events=max(0.0, finite(bound.s_z1, 0.0)),
        test_single_photon_errors=finite(bound.v_z1, 0.0),
    )


# ---------------------------------------------------------------------------------------------
# Theory: expected counts of the [LCWXZ14] Sec. IV channel, and the optimiser
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class OneDecoyCounts:
    """Expected (real-valued) counts of a block of ``pulses`` pulses."""

    key_counts: tuple[float, float]
    key_errors: tuple[float, float]
    test_counts: tuple[float, float]
    test_errors: tuple[float, float]


def expected_one_decoy_counts(
    settings: OneDecoySettings,
    *,
    transmittance: float,
    dark_count_probability: float,
    misalignment_error: float,
    pulses: float,
) -> OneDecoyCounts:
    """[LCWXZ14] Sec. IV model without after-pulses (as ``theory``): per pulse of intensity k,
    D_k = 1 - (1 - 2 p_dc) e^(-eta k) detections and p_dc + e_mis (1 - e^(-eta k)) errors;
    n_X,k = N q^2 p_k D_k, n_Z,k = N (1-q)^2 p_k D_k, errors alike."""
    eta = check_probability("transmittance", transmittance)
    p_dc = check_probability("dark_count_probability", dark_count_probability)
    e_mis = check_probability("misalignment_error", misalignment_error)
    q = settings.p_key_basis
    key: list[float] = []
    key_err: list[float] = []
    test: list[float] = []
    test_err: list[float] = []
    for mu, p in zip(settings.intensities, settings.probabilities, strict=True):
        clicks = 1.0 - (1.0 - 2.0 * p_dc) * math.exp(-eta * mu)
        wrong = _BACKGROUND_ERROR_RATE * 2.0 * p_dc + e_mis * (1.0 - math.exp(-eta * mu))
        wrong = min(wrong, clicks)
        key.append(pulses * q * q * p * clicks)
        key_err.append(pulses * q * q * p * wrong)
        test.append(pulses * (1 - q) ** 2 * p * clicks)
        test_err.append(pulses * (1 - q) ** 2 * p * wrong)
    return OneDecoyCounts(
        key_counts=(key[0], key[1]),
        key_errors=(key_err[0], key_err[1]),
        test_counts=(test[0], test[1]),
        test_errors=(test_err[0], test_err[1]),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class OneDecoyOptimum:
    settings: OneDecoySettings
    bits_per_pulse: float  # floor(l) / N, 0.0 when no key
    length_bits: int
    pulses: float  # N (given, or following from key_block_bits)


def one_decoy_real_length(
    settings: OneDecoySettings,
    *,
    transmittance: float,
    dark_count_probability: float,
    misalignment_error: float,
    reconciliation_efficiency: float,
    security: SecurityParameters,
    pulses: float | None = None,
    key_block_bits: float | None = None,
    statistics: FiniteKeyAnalysis,
    error_positions_disclosed: bool = True,
) -> tuple[float, float]:
    """Expected (l before the floor, N): for N = ``pulses``, or for the N whose expected
    key-basis detections are ``key_block_bits`` ([RBGMZ18]'s block size n_Z); exactly one of
    the two. lambda_EC = f n_X h(E_X) ([LCWXZ14] Sec. IV)."""
    if (pulses is None) == (key_block_bits is None):
        raise ValueError("pulses/key_block_bits: give exactly one of them")
    channel = {
        "transmittance": transmittance,
        "dark_count_probability": dark_count_probability,
        "misalignment_error": misalignment_error,
    }
    if key_block_bits is not None:
        per_pulse = sum(expected_one_decoy_counts(settings, pulses=1.0, **channel).key_counts)
        if not per_pulse > 0.0:
            return -math.inf, math.inf
        pulses = key_block_bits / per_pulse
    assert pulses is not None
    counts = expected_one_decoy_counts(settings, pulses=pulses, **channel)
    n_x = sum(counts.key_counts)
    error_rate = sum(counts.key_errors) / n_x if n_x > 0 else 0.5
    leak = reconciliation_efficiency * n_x * entropy_capped(error_rate)
    return one_decoy_bound(
        counts.key_counts,
        counts.key_errors,
        counts.test_counts,
        counts.test_errors,
        settings,
        leak,
        security.eps_sec,
        security.eps_cor,
        deviation=deviation_for(statistics),
        count_vacuum=not error_positions_disclosed,
    ).real_length, pulses


def _settings_from_vector(x: Sequence[float]) -> OneDecoySettings | None:
    try:
        mu_decoy = math.exp(x[2])
        return OneDecoySettings(
            mu_signal=mu_decoy + math.exp(x[3]),
            mu_decoy=mu_decoy,
            p_signal=1.0 / (1.0 + math.exp(-x[1])),
            p_key_basis=1.0 / (1.0 + math.exp(-x[0])),
        )
    except (OverflowError, ValueError):
        return None


def optimise_one_decoy_settings(
    *,
    transmittance: float,
    dark_count_probability: float,
    misalignment_error: float,
    reconciliation_efficiency: float,
    security: SecurityParameters,
    pulses: int | None = None,
    key_block_bits: int | None = None,
    statistics: FiniteKeyAnalysis = FiniteKeyAnalysis.LIM2014_KL,
    error_positions_disclosed: bool = True,
    max_evaluations: int = 1200,
) -> OneDecoyOptimum:
    """Maximise the expected l/N over {q_x, p_mu1, mu1, mu2}, as ``optimise_decoy_settings``:
    deterministic, the best of fixed starting points, then two Nelder-Mead runs. Give exactly
    one of ``pulses`` (N fixed) or ``key_block_bits`` (n_X fixed, N follows; below zero the
    objective is l / n_X, as in ``optimise_decoy_settings``)."""
    if (pulses is None) == (key_block_bits is None):
        raise ValueError("pulses/key_block_bits: give exactly one of them")
    size = check_count(
        "pulses" if pulses is not None else "key_block_bits",
        pulses if pulses is not None else key_block_bits,
    )
    if size == 0:
        raise ValueError(f"{'pulses' if pulses is not None else 'key_block_bits'}: must be > 0")

    def real_length(settings: OneDecoySettings) -> tuple[float, float]:
        return one_decoy_real_length(
            settings,
            transmittance=transmittance,
            dark_count_probability=dark_count_probability,
            misalignment_error=misalignment_error,
            reconciliation_efficiency=reconciliation_efficiency,
            security=security,
            pulses=None if pulses is None else float(size),
            key_block_bits=None if key_block_bits is None else float(size),
            statistics=statistics,
            error_positions_disclosed=error_positions_disclosed,
        )

    def objective(x: list[float]) -> float:
        settings = _settings_from_vector(x)
        if settings is None:
            return -math.inf
        length, n = real_length(settings)
        if not (math.isfinite(length) and math.isfinite(n)):
            return -math.inf
        return length / n if length > 0.0 or pulses is not None else length / size

    starts = [
        [
            math.log(q / (1 - q)),
            math.log(p / (1 - p)),
            math.log(mu_decoy),
            math.log(mu_signal - mu_decoy),
        ]
        for q in (0.5, 0.7, 0.9)
        for p in (0.3, 0.5, 0.7, 0.85)
        for mu_signal, mu_decoy in ((0.4, 0.1), (0.6, 0.2))
    ]
    best_value, best_index = max((objective(v), i) for i, v in enumerate(starts))
    x = starts[best_index]
    if math.isfinite(best_value):
        per_run = max(50, (max_evaluations - len(starts)) // 2)
        x, _ = nelder_mead_max(objective, x, 0.3, per_run)
        x, _ = nelder_mead_max(objective, x, 0.1, per_run)
    best = _settings_from_vector(x)
    assert best is not None
    length_real, n_pulses = real_length(best)
    length = max(0, math.floor(length_real)) if math.isfinite(length_real) else 0
    return OneDecoyOptimum(
        settings=best,
        bits_per_pulse=length / n_pulses if length > 0 else 0.0,
        length_bits=length,
        pulses=n_pulses,
    )
