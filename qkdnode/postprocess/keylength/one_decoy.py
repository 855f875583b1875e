"""One-decoy BB84 (a signal and one decoy intensity, no vacuum): key length, theory, optimiser.

[RBGMZ18] D. Rusca, A. Boaron, F. Grunenfelder, A. Martin, H. Zbinden, "Finite-key analysis for
the 1-decoy state QKD protocol", APL 112, 171104 (2018), arXiv:1801.03443.

What is taken from [RBGMZ18]: the protocol (two intensities mu1 > mu2 > 0, no vacuum) and the
shape of its estimate: without a vacuum intensity, the vacuum detections are bounded from above
through the decoy class's errors (a vacuum detection is an error with probability 1/2), and that
upper bound enters the single-photon lower bound. What is ours: every inequality below is derived
here, step by step, in the [LCWXZ14] framework (C. C. W. Lim et al., PRA 89, 022307 (2014); see
``decoy``), and so is the eps split. The paper's text was not available to check its equations,
constants and figures against: no figure of [RBGMZ18] is reproduced, and this module is named
after the protocol, not the paper. It sizes no key in the node (the simulated link and the
pipeline send three intensities, and the pipeline does not disclose the key-basis errors per
intensity that step 2 needs); it serves the theory curves and ``scripts/bench_keyrate.py``.

Notation as in ``decoy``: conditioned on the photon number of every detection, the intensity
labels are independent with P(k | n) = p_k e^-k k^n / (n! tau_n), tau_n = sum_k p_k e^-k k^n/n!;
N_k = (e^k / p_k) n*_k = sum_n k^n / n! * s_n / tau_n, with n*_k the expected count of class k
given the photon numbers, s_n the detections with n photons; likewise M_k = (e^k / p_k) m*_k for
the errors, M_k = sum_n k^n / n! * v_n / tau_n, v_n the errors among the s_n. N^-+, M^-+ are the
deviation bounds of the selected statistics (``lim2014``, ``zhang2017`` or ``lim2014_kl``), each
side failing with probability <= eps = eps_sec / 19. Per basis:

1. vacuum, lower bound (one-way reconciliation only):
   mu1 N_mu2 - mu2 N_mu1 = (mu1 - mu2) s_0 / tau_0
                           + sum_{n>=2} mu1 mu2 (mu2^(n-1) - mu1^(n-1)) s_n / (n! tau_n),
   and every term of the sum is <= 0, so s_0 >= tau_0 (mu1 N^-_mu2 - mu2 N^+_mu1) / (mu1 - mu2).
2. vacuum, upper bound: the error flag of a detection depends on its photon number, not on its
   label (the n-photon state is the same for both intensities), so given the photon numbers and
   the error flags the labels of the errors are independent with P(k | n) too, and
   m*_mu2 >= P(mu2 | 0) v_0, i.e. v_0 <= tau_0 M^+_mu2. On a vacuum detection Bob's bit is
   independent of Alice's, so given s_0, v_0 is Binomial(s_0, 1/2); Hoeffding: with
   probability >= 1 - eps, v_0 > s_0 / 2 - a sqrt(s_0), a = sqrt(ln(1/eps) / 2). Solving
   s_0 / 2 - a sqrt(s_0) <= tau_0 M^+_mu2 for sqrt(s_0):
   s_0 <= s_0^U = (a + sqrt(a^2 + 2 tau_0 M^+_mu2))^2.
3. single photons, lower bound:
   N_mu2 - (mu2/mu1)^2 N_mu1 = (1 - mu2^2/mu1^2) s_0 / tau_0 + mu2 (mu1 - mu2) / mu1 * s_1 / tau_1
                               + sum_{n>=3} mu2^2 (mu2^(n-2) - mu1^(n-2)) s_n / (n! tau_n)
   (the n = 2 term vanishes, the others are <= 0), so
   s_1 >= tau_1 mu1 / (mu2 (mu1 - mu2))
          * [N^-_mu2 - (mu2/mu1)^2 N^+_mu1 - (1 - mu2^2/mu1^2) s_0^U / tau_0].

In the test basis only:

4. single-photon errors, upper bound: M_mu1 - M_mu2 = sum_n (mu1^n - mu2^n) / n! * v_n / tau_n
   >= (mu1 - mu2) v_1 / tau_1, so v_1 <= tau_1 (M^+_mu1 - M^-_mu2) / (mu1 - mu2).

Then, as [LCWXZ14] Eqs. (5) and (1) with 19 in place of 21:

5. phi_X <= v_Z1 / s_Z1 + gamma(eps_sec, v_Z1 / s_Z1, s_Z1, s_X1);
6. l = floor( [s_X0 if one-way] + s_X1 (1 - h(phi_X)) - lambda_EC - 6 log2(19 / eps_sec)
   - log2(2 / eps_cor) ). Two-way Cascade drops s_X0 as in ``decoy`` (s_X0^U still enters 3).

eps split: ``decoy.EPS_SPLIT`` reads [LCWXZ14] Eq. (B4) as 9 terms for smoothing, privacy
amplification and the phase-error sampling plus 12 one-sided deviations. Here there are 10
one-sided deviations: per basis N^-_mu2, N^+_mu1, M^+_mu2 and the vacuum binomial of step 2
(step 1 reuses the first two events); in the test basis also M^+_mu1 and M^-_mu2 (step 4).
Hence eps_sec = 19 eps. Every deviation is a statement about independent trials that holds
whatever the counts (checked against realised counts of a simulated photon-number model in
tests/test_keylength_analyses.py).
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

ONE_DECOY_EPS_SPLIT: Final = 19.0
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


def vacuum_upper_bound(
    errors: Sequence[float],
    settings: OneDecoySettings,
    eps_sec: float,
    *,
    deviation: Deviation,
    asymptotic: bool = False,
) -> float:
    """Step 2 for one basis, from its errors per class: s_0^U = (a + sqrt(a^2 + 2 tau_0
    M^+_mu2))^2, a = sqrt(ln(1/eps)/2) (a = 0 when ``asymptotic``: s_0 = 2 v_0 on average)."""
    eps = eps_sec / ONE_DECOY_EPS_SPLIT
    tau0, _ = _taus(settings)
    _, upper = deviation(errors, eps)
    weight = math.exp(settings.mu_decoy) / settings.probabilities[1]
    v0_upper = tau0 * weight * max(0.0, upper[1])
    a = 0.0 if asymptotic else math.sqrt(math.log(1.0 / eps) / 2.0)
    return (a + math.sqrt(a * a + 2.0 * v0_upper)) ** 2


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
    """Steps 1-6 of the module docstring on real-valued counts; -inf length when no bound.

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
        s0_lower = max(0.0, tau0 * (mu1 * minus[1] - mu2 * plus[0]) / (mu1 - mu2))  # step 1
        s0_upper = vacuum_upper_bound(  # step 2
            errors, settings, eps_sec, deviation=deviation, asymptotic=asymptotic
        )
        s1 = (  # step 3
            tau1
            * mu1
            / (mu2 * (mu1 - mu2))
            * (minus[1] - (mu2 / mu1) ** 2 * plus[0] - (1.0 - (mu2 / mu1) ** 2) * s0_upper / tau0)
        )
        return s0_lower, s1

    s_x0, s_x1 = vacuum_and_single(key_counts, key_errors)
    s_z0, s_z1 = vacuum_and_single(test_counts, test_errors)
    err_minus, err_plus = scaled(test_errors)
    v_z1 = max(0.0, tau1 * (err_plus[0] - err_minus[1]) / (mu1 - mu2))  # step 4

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
        phi = error_rate + lim_gamma(
            eps_sec, gamma_rate, s_z1, s_x1, split=ONE_DECOY_EPS_SPLIT
        )  # step 5
        security_bits = 6.0 * math.log2(ONE_DECOY_EPS_SPLIT / eps_sec) + math.log2(2.0 / eps_cor)
    if not phi < 0.5:
        return no_key
    vacuum_term = s_x0 if count_vacuum else 0.0
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
    """Key length of one one-decoy block: step 6 with the deviations of ``statistics``
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


def one_decoy_real_length(
    settings: OneDecoySettings,
    *,
    transmittance: float,
    dark_count_probability: float,
    misalignment_error: float,
    reconciliation_efficiency: float,
    security: SecurityParameters,
    pulses: float,
    statistics: FiniteKeyAnalysis,
    error_positions_disclosed: bool = True,
) -> float:
    """Expected l (before the floor) for N pulses; lambda_EC = f n_X h(E_X) ([LCWXZ14] Sec. IV)."""
    counts = expected_one_decoy_counts(
        settings,
        transmittance=transmittance,
        dark_count_probability=dark_count_probability,
        misalignment_error=misalignment_error,
        pulses=pulses,
    )
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
    ).real_length


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
    pulses: int,
    statistics: FiniteKeyAnalysis = FiniteKeyAnalysis.LIM2014_KL,
    error_positions_disclosed: bool = True,
    max_evaluations: int = 1200,
) -> OneDecoyOptimum:
    """Maximise the expected l/N over {q_x, p_mu1, mu1, mu2}, as ``optimise_decoy_settings``:
    deterministic, the best of fixed starting points, then two Nelder-Mead runs."""
    n_pulses = check_count("pulses", pulses)
    if n_pulses == 0:
        raise ValueError("pulses: must be > 0")

    def real_length(settings: OneDecoySettings) -> float:
        return one_decoy_real_length(
            settings,
            transmittance=transmittance,
            dark_count_probability=dark_count_probability,
            misalignment_error=misalignment_error,
            reconciliation_efficiency=reconciliation_efficiency,
            security=security,
            pulses=float(n_pulses),
            statistics=statistics,
            error_positions_disclosed=error_positions_disclosed,
        )

    def objective(x: list[float]) -> float:
        settings = _settings_from_vector(x)
        if settings is None:
            return -math.inf
        length = real_length(settings)
        return length / n_pulses if math.isfinite(length) else -math.inf

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
    length_real = real_length(best)
    length = max(0, math.floor(length_real)) if math.isfinite(length_real) else 0
    return OneDecoyOptimum(
        settings=best, bits_per_pulse=length / n_pulses if length > 0 else 0.0, length_bits=length
    )
