"""Finite-key secret-key length: single-photon BB84, decoy-state BB84, channel model, PLOB bound.

Pure: ``math`` only; no I/O, no clock, no randomness. Everything here is a deterministic function
of its arguments.

Sources (every formula below names its equation):

- [TLGR12] M. Tomamichel, C. C. W. Lim, N. Gisin, R. Renner, "Tight finite-key analysis for
  quantum cryptography", Nat. Commun. 3, 634 (2012), arXiv:1103.4130. Single-photon BB84.
- [LCWXZ14] C. C. W. Lim, M. Curty, N. Walenta, F. Xu, H. Zbinden, "Concise security bounds for
  practical decoy-state quantum key distribution", PRA 89, 022307 (2014), arXiv:1311.7129.
  Decoy-state BB84 with three intensities, Eqs. (1)-(5); system model of its Sec. IV.
- [LMC05] H.-K. Lo, X. Ma, K. Chen, PRL 94, 230504 (2005); [MQZL05] X. Ma, B. Qi, Y. Zhao,
  H.-K. Lo, PRA 72, 012326 (2005): gain and error gain of phase-randomised weak coherent pulses.
- [PLOB17] S. Pirandola, R. Laurenza, C. Ottaviani, L. Banchi, Nat. Commun. 8, 15043 (2017):
  repeaterless bound -log2(1 - eta).

Conventions: our key basis Z (basis 0) is the basis Lim et al. call X; our test basis X is their
Z. Intensity classes 0/1/2 = signal/decoy/vacuum are their mu1/mu2/mu3 (mu3 may be a weak decoy
rather than true vacuum). ``dark_count_probability`` is per detector and per gate; Bob has two
detectors, so the vacuum yield is Y0 = 2 p_dc, exactly as in [LCWXZ14] Sec. IV
(D_k = 1 - (1 - 2 p_dc) exp(-eta k)).

Known limits of the published bounds we implement (read before relying on them):

- [TLGR12] Eq. (2) is implemented with the constant of its Supplementary Eq. (S4),
  mu = sqrt((n+k)/(nk) (k+1)/k ln(4/eps_sec)): Theorem 2 (Suppl. Eq. (S3)) needs
  2 eps + eps_PA <= eps_sec, and the
  key-length term log2(2/(eps_sec^2 eps_cor)) spends eps_PA = eps_sec/2, leaving eps = eps_sec/4
  for the Serfling estimate. (The project guide recalled ln(2/eps_sec); that is 1 % more key at
  N = 10^4 and not what the paper's accounting allows.)
- [LCWXZ14] is a fixed-length analysis with Hoeffding bounds for "independent events";
  Wiesemann et al., arXiv:2405.16578, point out technical flaws in that treatment (fixed-length
  protocols, acceptance testing, conditioning on events) and give a corrected proof with a
  slightly different key length. We implement Lim et al. as published, without those
  corrections, and have not quantified the difference.
- Lower bounds with s_0 + s_1 above the number of detections of their basis cannot hold;
  such counts give no key (the paper's formulas would return more key than raw bits).
- The random-sampling term gamma of [LCWXZ14] Eq. (5) vanishes when the single-photon error
  estimate is exactly zero. We never evaluate it below one estimated error (b >= 1/s_Z1), which
  only enlarges the phase-error bound (gamma grows with b on (0, 1/2)).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

__all__ = [
    "DecoyKeyBound",
    "DecoyObservation",
    "DecoyOptimum",
    "DecoySettings",
    "SecurityParameters",
    "asymptotic_bb84_rate",
    "binary_entropy",
    "channel_transmittance",
    "decoy_secret_bits_per_pulse",
    "expected_decoy_observation",
    "expected_error_gain",
    "expected_gain",
    "lim_key_length",
    "optimal_sample_bits",
    "optimise_decoy_settings",
    "plob_bound_bits_per_pulse",
    "pulses_for_key_block",
    "tomamichel_key_length",
    "tomamichel_statistical_deviation",
    "vacuum_yield",
]

# [LCWXZ14] Eq. (B4): eps_sec = 2(2a1 + a2 + a3) + nu + 10 eps1 + 2 eps2, every term set to a
# common eps, gives eps_sec = 21 eps; hence the 21 in the deviation and key-length terms.
_LIM_EPS_SPLIT: Final = 21.0
# Background (dark-count) errors are random: e0 = 1/2 ([LMC05]).
_BACKGROUND_ERROR_RATE: Final = 0.5
_PROBABILITY_SUM_TOLERANCE: Final = 1e-9
# Far above any useful intensity; keeps e^mu / p_k (Eq. (2)) finite.
_MAX_MEAN_PHOTON_NUMBER: Final = 50.0


# ---------------------------------------------------------------------------------------------
# Entropy and asymptotic rate
# ---------------------------------------------------------------------------------------------


def binary_entropy(x: float) -> float:
    """h(x) = -x log2 x - (1-x) log2(1-x), with h(0) = h(1) = 0.

    Raises ValueError when x is outside [0, 1] (NaN included).
    """
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"binary_entropy: argument must be in [0, 1], got {x!r}")
    if x == 0.0 or x == 1.0:
        return 0.0
    return -x * math.log2(x) - (1.0 - x) * math.log2(1.0 - x)


def _entropy_capped(x: float) -> float:
    """h(min(x, 1/2)) for x >= 0: the entropy bound saturates at one bit per error position."""
    return 1.0 if x >= 0.5 else binary_entropy(x)


def asymptotic_bb84_rate(qber: float, reconciliation_efficiency: float = 1.0) -> float:
    """Asymptotic BB84 secret bits per sifted bit, r = 1 - h(Q) - f h(Q) (Shor-Preskill).

    Not clamped: a negative value means no key. ValueError for Q outside [0, 1] or f < 1.
    """
    if not reconciliation_efficiency >= 1.0 or math.isinf(reconciliation_efficiency):
        raise ValueError(
            f"reconciliation_efficiency: must be finite and >= 1, got {reconciliation_efficiency!r}"
        )
    entropy = binary_entropy(qber)
    return 1.0 - entropy - reconciliation_efficiency * entropy


# ---------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------


def _check_open_unit(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 < value < 1.0):
        raise ValueError(f"{name}: must be in (0, 1), got {value!r}")


def _check_count(name: str, value: object) -> int:
    """An int >= 0; numpy integers are accepted (``__index__``), bool and float are not."""
    # bool is an int subclass; a count given as True is a bug, not 1.
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ValueError(f"{name}: must be an int, got {type(value).__name__}")
    count = operator.index(value)
    if count < 0:
        raise ValueError(f"{name}: must be >= 0, got {count}")
    return count


def _check_nonneg_finite(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)):
        raise ValueError(f"{name}: must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{name}: must be finite and >= 0, got {value!r}")
    return float(value)


def _check_probability(name: str, value: float) -> float:
    value = _check_nonneg_finite(name, value)
    if value > 1.0:
        raise ValueError(f"{name}: must be in [0, 1], got {value!r}")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class SecurityParameters:
    """Composable security parameters: the key is eps_sec-secret and eps_cor-correct.

    Both must lie in (0, 1); ValueError names the field otherwise.
    """

    eps_sec: float
    eps_cor: float

    def __post_init__(self) -> None:
        _check_open_unit("eps_sec", self.eps_sec)
        _check_open_unit("eps_cor", self.eps_cor)


# ---------------------------------------------------------------------------------------------
# Single-photon BB84: Tomamichel, Lim, Gisin, Renner 2012
# ---------------------------------------------------------------------------------------------


def tomamichel_statistical_deviation(*, key_bits: int, sample_bits: int, eps_sec: float) -> float:
    """The statistical deviation mu of [TLGR12] Eq. (2) / Supplementary Eq. (S4).

    mu = sqrt( (n + k)/(n k) * (k + 1)/k * ln(4/eps_sec) ), n = key_bits, k = sample_bits:
    with probability >= 1 - (eps_sec/4)^2 (Serfling, without replacement) the error rate on the
    n key bits exceeds the one measured on the k sample bits by less than mu.
    Returns +inf when n or k is 0 (nothing can be estimated).
    """
    n = _check_count("key_bits", key_bits)
    k = _check_count("sample_bits", sample_bits)
    _check_open_unit("eps_sec", eps_sec)
    if n == 0 or k == 0:
        return math.inf
    return math.sqrt((n + k) / (n * k) * (k + 1) / k * math.log(4.0 / eps_sec))


def _tomamichel_real_length(
    key_bits: int,
    sample_bits: int,
    qber_tolerance: float,
    leak_ec_bits: float,
    eps_sec: float,
    eps_cor: float,
) -> float:
    """Right-hand side of [TLGR12] Eq. (2) with q = 1, before the floor (may be negative)."""
    mu = tomamichel_statistical_deviation(
        key_bits=key_bits, sample_bits=sample_bits, eps_sec=eps_sec
    )
    entropy = _entropy_capped(qber_tolerance + mu)
    # log2(2 / (eps_sec^2 eps_cor)) as a sum of logs: the product underflows for tiny eps.
    security_bits = 1.0 - 2.0 * math.log2(eps_sec) - math.log2(eps_cor)
    return key_bits * (1.0 - entropy) - leak_ec_bits - security_bits


def tomamichel_key_length(
    *,
    key_bits: int,
    sample_bits: int,
    qber_tolerance: float,
    leak_ec_bits: int,
    security: SecurityParameters,
) -> int:
    """Secret key length of single-photon BB84, [TLGR12] Eq. (2) with preparation quality q = 1.

        l = floor( n (1 - h(Q_tol + mu)) - leak_EC - log2( 2 / (eps_sec^2 eps_cor) ) ),  l >= 0

    n = key_bits kept for the key, k = sample_bits disclosed in the test basis to estimate the
    error rate, Q_tol = the error rate the protocol accepted (the block aborts above it),
    leak_EC = every bit disclosed by reconciliation and verification. Returns 0 when there is no
    key (n or k zero, Q_tol + mu >= 1/2, or a negative length).
    """
    _check_count("key_bits", key_bits)
    _check_count("sample_bits", sample_bits)
    _check_probability("qber_tolerance", qber_tolerance)
    leak = _check_count("leak_ec_bits", leak_ec_bits)
    if key_bits == 0 or sample_bits == 0 or qber_tolerance >= 0.5:
        return 0
    real = _tomamichel_real_length(
        key_bits, sample_bits, qber_tolerance, leak, security.eps_sec, security.eps_cor
    )
    return max(0, math.floor(real))


def optimal_sample_bits(
    total_bits: int,
    qber: float,
    *,
    reconciliation_efficiency: float,
    security: SecurityParameters,
) -> int:
    """Sample size k that maximises the [TLGR12] key length of a block of N = n + k sifted bits.

    Model: Q_tol = qber and leak_EC = f n h(qber) (the paper's own model, with f =
    reconciliation_efficiency). Integer ternary search (the length is unimodal in k) and a final
    scan of the last few candidates; about 80 evaluations at N = 10^7. Returns the maximiser
    even when its length is not positive: check the length. ValueError if N < 2.
    """
    n_total = _check_count("total_bits", total_bits)
    if n_total < 2:
        raise ValueError(f"total_bits: must be >= 2 to split into key and sample, got {n_total}")
    _check_probability("qber", qber)
    if not reconciliation_efficiency >= 1.0 or math.isinf(reconciliation_efficiency):
        raise ValueError(
            f"reconciliation_efficiency: must be finite and >= 1, got {reconciliation_efficiency!r}"
        )
    leak_per_bit = reconciliation_efficiency * _entropy_capped(qber)

    def length(k: int) -> float:
        n = n_total - k
        return _tomamichel_real_length(
            n, k, qber, leak_per_bit * n, security.eps_sec, security.eps_cor
        )

    low, high = 1, n_total - 1
    while high - low > 4:
        third = (high - low) // 3
        left, right = low + third, high - third
        if length(left) < length(right):
            low = left + 1
        else:
            high = right
    return max(range(low, high + 1), key=length)


# ---------------------------------------------------------------------------------------------
# Decoy-state BB84: Lim, Curty, Walenta, Xu, Zbinden 2014
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class DecoySettings:
    """Alice's three intensities and the probabilities she (and Bob) choose them with.

    [LCWXZ14] Sec. II requires mu_signal > mu_decoy + mu_vacuum and mu_decoy > mu_vacuum >= 0
    (we also require mu <= 50, which keeps e^mu finite);
    p_signal + p_decoy + p_vacuum = 1, each in (0, 1); p_key_basis in (0, 1) is the probability
    that Alice (and Bob) choose the key basis (our Z, Lim et al.'s X). ValueError names the
    violated condition.
    """

    mu_signal: float
    mu_decoy: float
    mu_vacuum: float
    p_signal: float
    p_decoy: float
    p_vacuum: float
    p_key_basis: float

    def __post_init__(self) -> None:
        for name in ("mu_signal", "mu_decoy", "mu_vacuum"):
            if _check_nonneg_finite(name, getattr(self, name)) > _MAX_MEAN_PHOTON_NUMBER:
                raise ValueError(
                    f"{name}: a weak coherent pulse has mean photon number <= "
                    f"{_MAX_MEAN_PHOTON_NUMBER}, got {getattr(self, name)!r}"
                )
        for name in ("p_signal", "p_decoy", "p_vacuum", "p_key_basis"):
            _check_open_unit(name, getattr(self, name))
        if not self.mu_decoy > self.mu_vacuum:
            raise ValueError(
                f"mu_decoy: must exceed mu_vacuum, got {self.mu_decoy!r} <= {self.mu_vacuum!r}"
            )
        if not self.mu_signal > self.mu_decoy + self.mu_vacuum:
            raise ValueError(
                "mu_signal: must exceed mu_decoy + mu_vacuum, got "
                f"{self.mu_signal!r} <= {self.mu_decoy!r} + {self.mu_vacuum!r}"
            )
        total = self.p_signal + self.p_decoy + self.p_vacuum
        if abs(total - 1.0) > _PROBABILITY_SUM_TOLERANCE:
            raise ValueError(f"p_signal + p_decoy + p_vacuum: must sum to 1, got {total!r}")

    @property
    def intensities(self) -> tuple[float, float, float]:
        return (self.mu_signal, self.mu_decoy, self.mu_vacuum)

    @property
    def probabilities(self) -> tuple[float, float, float]:
        return (self.p_signal, self.p_decoy, self.p_vacuum)


def _check_triple(name: str, values: object) -> tuple[int, int, int]:
    if not isinstance(values, tuple) or len(values) != 3:
        raise ValueError(f"{name}: must be a tuple of 3 counts (signal, decoy, vacuum)")
    checked = tuple(_check_count(f"{name}[{i}]", v) for i, v in enumerate(values))
    return (checked[0], checked[1], checked[2])


@dataclass(frozen=True, slots=True, kw_only=True)
class DecoyObservation:
    """Counts of one block per intensity class (0 signal, 1 decoy, 2 vacuum).

    - key_basis_counts: n_{X,k} of [LCWXZ14], sifted detections in the key basis;
    - test_basis_counts: n_{Z,k}, sifted detections in the test basis;
    - test_basis_errors: m_{Z,k}, errors among them.

    ValueError names the field if a count is negative, not an int, or errors exceed counts.
    """

    key_basis_counts: tuple[int, int, int]
    test_basis_counts: tuple[int, int, int]
    test_basis_errors: tuple[int, int, int]

    def __post_init__(self) -> None:
        key = _check_triple("key_basis_counts", self.key_basis_counts)
        test = _check_triple("test_basis_counts", self.test_basis_counts)
        errors = _check_triple("test_basis_errors", self.test_basis_errors)
        for i in range(3):
            if errors[i] > test[i]:
                raise ValueError(
                    f"test_basis_errors[{i}]: {errors[i]} errors exceed "
                    f"{test[i]} test-basis detections"
                )
        # Normalise numpy integers to int so the frozen record is plain data.
        object.__setattr__(self, "key_basis_counts", key)
        object.__setattr__(self, "test_basis_counts", test)
        object.__setattr__(self, "test_basis_errors", errors)


@dataclass(frozen=True, slots=True, kw_only=True)
class DecoyKeyBound:
    """Result of [LCWXZ14] Eqs. (1)-(5) for one block. Never NaN.

    length_bits is the secret key length (0 = no key). The bounds are the ones the length was
    computed from; when the statistics are unusable they are reported as 0 and the phase-error
    bound as 0.5 (no information).
    """

    length_bits: int
    vacuum_events: float  # s_{X,0} lower bound (key basis)
    single_photon_events: float  # s_{X,1} lower bound (key basis)
    phase_error_rate: float  # phi_X upper bound
    test_vacuum_events: float  # s_{Z,0} lower bound
    test_single_photon_events: float  # s_{Z,1} lower bound
    test_single_photon_errors: float  # v_{Z,1} upper bound


class _LimBound(NamedTuple):
    real_length: float  # before floor; -inf when the statistics give no bound
    s_x0: float
    s_x1: float
    phi: float
    s_z0: float
    s_z1: float
    v_z1: float


def _lim_gamma(a: float, b: float, c: float, d: float) -> float:
    """[LCWXZ14] Eq. (5): gamma(a, b, c, d) =
    sqrt( (c+d)(1-b) b / (c d ln 2) * log2( (c+d) / (c d (1-b) b) * 21^2 / a^2 ) ).
    NaN when the logarithm is negative (the caller treats NaN as "no bound")."""
    spread = (1.0 - b) * b
    # log2 of the product as a sum: a^2 underflows for tiny eps_sec.
    log_inner = math.log2((c + d) / (c * d * spread)) + 2.0 * math.log2(_LIM_EPS_SPLIT / a)
    radicand = (c + d) * spread / (c * d * math.log(2.0)) * log_inner
    return math.sqrt(radicand) if radicand >= 0.0 else math.nan


def _lim_bound(
    key_counts: Sequence[float],
    test_counts: Sequence[float],
    test_errors: Sequence[float],
    settings: DecoySettings,
    leak_ec_bits: float,
    eps_sec: float,
    eps_cor: float,
) -> _LimBound:
    """[LCWXZ14] Eqs. (1)-(5) on real-valued counts (expected or observed)."""
    mu1, mu2, mu3 = settings.intensities
    probs = settings.probabilities
    weights = [math.exp(mu) / p for mu, p in zip(settings.intensities, probs, strict=True)]
    # tau_n = sum_k p_k e^-k k^n / n!: probability that Alice sends n photons (Eq. (2)).
    tau0 = sum(p * math.exp(-mu) for mu, p in zip(settings.intensities, probs, strict=True))
    tau1 = sum(p * math.exp(-mu) * mu for mu, p in zip(settings.intensities, probs, strict=True))
    log_term = math.log(_LIM_EPS_SPLIT / eps_sec)

    def hoeffding(counts: Sequence[float]) -> tuple[list[float], list[float]]:
        # n^{+-}_k = e^k / p_k [ n_k +- sqrt( n/2 ln(21/eps_sec) ) ]   (below Eq. (2))
        delta = math.sqrt(sum(counts) / 2.0 * log_term)
        minus = [w * (c - delta) for w, c in zip(weights, counts, strict=True)]
        plus = [w * (c + delta) for w, c in zip(weights, counts, strict=True)]
        return minus, plus

    def vacuum_and_single(counts: Sequence[float]) -> tuple[float, float]:
        minus, plus = hoeffding(counts)
        # Eq. (2); a negative lower bound is replaced by the trivial bound 0.
        s0 = max(0.0, tau0 * (mu2 * minus[2] - mu3 * plus[1]) / (mu2 - mu3))
        # Eq. (3)
        s1 = (
            tau1
            * mu1
            * (minus[1] - plus[2] - (mu2 * mu2 - mu3 * mu3) / (mu1 * mu1) * (plus[0] - s0 / tau0))
            / (mu1 * (mu2 - mu3) - mu2 * mu2 + mu3 * mu3)
        )
        return s0, s1

    s_x0, s_x1 = vacuum_and_single(key_counts)
    s_z0, s_z1 = vacuum_and_single(test_counts)
    err_minus, err_plus = hoeffding(test_errors)
    # Eq. (4); a negative upper bound cannot hold, use the weaker bound 0.
    v_z1 = max(0.0, tau1 * (err_plus[1] - err_minus[2]) / (mu2 - mu3))

    no_key = _LimBound(-math.inf, s_x0, s_x1, 0.5, s_z0, s_z1, v_z1)
    if not (s_x1 > 0.0 and s_z1 > 0.0 and math.isfinite(s_x1) and math.isfinite(s_z1)):
        return no_key
    # The s_{.,n} partition the detections, so lower bounds summing above the detection count
    # mean the estimate itself failed (an eps-unlikely event, or counts the model cannot
    # produce): no key rather than more key bits than raw bits.
    if s_x0 + s_x1 > sum(key_counts) or s_z0 + s_z1 > sum(test_counts):
        return no_key
    error_rate = v_z1 / s_z1
    # gamma vanishes at b = 0; never claim fewer than one single-photon error (module docstring).
    gamma_rate = max(error_rate, 1.0 / s_z1)
    if not gamma_rate < 0.5:
        return no_key
    phi = error_rate + _lim_gamma(eps_sec, gamma_rate, s_z1, s_x1)  # Eq. (5)
    if not phi < 0.5:  # also catches NaN
        return no_key
    # Eq. (1)
    real_length = (
        s_x0
        + s_x1
        - s_x1 * binary_entropy(phi)
        - leak_ec_bits
        - 6.0 * math.log2(_LIM_EPS_SPLIT / eps_sec)
        - math.log2(2.0 / eps_cor)
    )
    if not math.isfinite(real_length):
        return no_key
    return _LimBound(real_length, s_x0, s_x1, phi, s_z0, s_z1, v_z1)


def lim_key_length(
    observation: DecoyObservation,
    settings: DecoySettings,
    *,
    leak_ec_bits: int,
    security: SecurityParameters,
) -> DecoyKeyBound:
    """Secret key length of decoy-state BB84 from one block's counts, [LCWXZ14] Eqs. (1)-(5):

        l = floor( s_X0 + s_X1 - s_X1 h(phi_X) - leak_EC - 6 log2(21/eps_sec) - log2(2/eps_cor) )

    leak_ec_bits is everything disclosed by reconciliation and verification (the paper counts
    the verification hash inside log2(2/eps_cor); pass only what was sent beyond that if you
    want the paper's accounting exactly, or everything, which is conservative).
    Bad statistics (zero counts, phase-error bound >= 1/2, no single-photon events) give
    length_bits == 0, never an exception or NaN.
    """
    leak = _check_count("leak_ec_bits", leak_ec_bits)
    bound = _lim_bound(
        [float(c) for c in observation.key_basis_counts],
        [float(c) for c in observation.test_basis_counts],
        [float(c) for c in observation.test_basis_errors],
        settings,
        float(leak),
        security.eps_sec,
        security.eps_cor,
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
# Channel model (simulator and theory curves)
# ---------------------------------------------------------------------------------------------


def vacuum_yield(dark_count_probability: float) -> float:
    """Y0 = 2 p_dc: probability of a click with no photon, two detectors each with p_dc per gate.

    This is [LCWXZ14] Sec. IV (D_k = 1 - (1 - 2 p_dc) e^{-eta k}); the exact
    1 - (1 - p_dc)^2 differs by p_dc^2 (4e-13 at their p_dc = 6e-7).
    """
    return 2.0 * _check_probability("dark_count_probability", dark_count_probability)


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
    length_km = _check_nonneg_finite("fiber_km", fiber_km)
    alpha = _check_nonneg_finite("attenuation_db_per_km", attenuation_db_per_km)
    efficiency = _check_probability("detector_efficiency", detector_efficiency)
    loss_db = _check_nonneg_finite("insertion_loss_db", insertion_loss_db)
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
    mu = _check_nonneg_finite("mu", mu)
    eta = _check_probability("transmittance", transmittance)
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
    mu = _check_nonneg_finite("mu", mu)
    eta = _check_probability("transmittance", transmittance)
    e_det = _check_probability("misalignment_error", misalignment_error)
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


def _check_channel(
    transmittance: float,
    dark_count_probability: float,
    misalignment_error: float,
    afterpulse_probability: float,
) -> None:
    _check_probability("transmittance", transmittance)
    _check_probability("dark_count_probability", dark_count_probability)
    _check_probability("misalignment_error", misalignment_error)
    _check_probability("afterpulse_probability", afterpulse_probability)


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
    _check_channel(
        transmittance, dark_count_probability, misalignment_error, afterpulse_probability
    )
    n_pulses = _check_count("pulses", pulses)
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
    block = _check_count("key_block_bits", key_block_bits)
    _check_channel(transmittance, dark_count_probability, 0.0, afterpulse_probability)
    rates = _class_rates(
        settings, transmittance, dark_count_probability, 0.0, afterpulse_probability
    )
    per_pulse = settings.p_key_basis**2 * sum(
        p * r for p, r in zip(settings.probabilities, rates.detections, strict=True)
    )
    return math.inf if per_pulse <= 0.0 else block / per_pulse


@dataclass(frozen=True, slots=True, kw_only=True)
class _TheoryModel:
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


class _TheoryPoint(NamedTuple):
    real_length: float
    pulses: float
    eps_sec: float


def _theory_point(model: _TheoryModel, settings: DecoySettings) -> _TheoryPoint:
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
        return _TheoryPoint(-math.inf, pulses, model.eps_sec)
    counts = _expected_counts(settings, rates, pulses)
    # lambda_EC = f n_X h(e_obs), [LCWXZ14] Sec. IV.
    leak = (
        model.reconciliation_efficiency * sum(counts.key) * _entropy_capped(counts.key_error_rate)
    )
    eps_sec = model.eps_sec
    kappa = model.secrecy_per_key_bit
    if kappa is not None:
        # [LCWXZ14] Sec. IV: eps_sec = kappa * l. Start from l <= n_X and iterate
        # l <- L(kappa l): the sequence decreases monotonically and settles in a few steps.
        eps_sec = min(0.5, kappa * max(1.0, sum(counts.key)))
    bound = _lim_bound(
        counts.key, counts.test, counts.test_errors, settings, leak, eps_sec, model.eps_cor
    )
    if kappa is not None:
        # A fixed number of steps (no early exit) keeps l/N continuous in the settings, which
        # the optimiser needs; four steps leave eps_sec within a few per cent of kappa * l.
        for _ in range(4):
            if not math.isfinite(bound.real_length):
                break
            eps_sec = min(0.5, kappa * max(1.0, bound.real_length))
            bound = _lim_bound(
                counts.key, counts.test, counts.test_errors, settings, leak, eps_sec, model.eps_cor
            )
    return _TheoryPoint(bound.real_length, pulses, eps_sec)


def _make_model(
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
) -> _TheoryModel:
    _check_channel(
        transmittance, dark_count_probability, misalignment_error, afterpulse_probability
    )
    if not reconciliation_efficiency >= 1.0 or math.isinf(reconciliation_efficiency):
        raise ValueError(
            f"reconciliation_efficiency: must be finite and >= 1, got {reconciliation_efficiency!r}"
        )
    if secrecy_per_key_bit is not None:
        _check_open_unit("secrecy_per_key_bit", secrecy_per_key_bit)
    if (key_block_bits is None) == (pulses is None):
        raise ValueError("key_block_bits/pulses: give exactly one of them")
    if key_block_bits is not None and _check_count("key_block_bits", key_block_bits) == 0:
        raise ValueError("key_block_bits: must be > 0")
    if pulses is not None and _check_count("pulses", pulses) == 0:
        raise ValueError("pulses: must be > 0")
    return _TheoryModel(
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
) -> float:
    """Finite-key theory curve: floor(l)/N for N pulses at the expected counts ([LCWXZ14]).

    Counts are the (unrounded) expectations of the Sec. IV model; the error-correction leak is
    f n_X h(e_obs). With secrecy_per_key_bit = kappa, eps_sec = kappa * l as in the paper's
    Fig. 1 (security.eps_sec is then ignored). Returns 0.0 when there is no key.
    """
    eta = channel_transmittance(
        fiber_km=fiber_km,
        attenuation_db_per_km=attenuation_db_per_km,
        detector_efficiency=detector_efficiency,
        insertion_loss_db=insertion_loss_db,
    )
    model = _make_model(
        transmittance=eta,
        dark_count_probability=dark_count_probability,
        misalignment_error=misalignment_error,
        afterpulse_probability=afterpulse_probability,
        reconciliation_efficiency=reconciliation_efficiency,
        security=security,
        secrecy_per_key_bit=secrecy_per_key_bit,
        key_block_bits=None,
        pulses=pulses,
    )
    point = _theory_point(model, settings)
    if not math.isfinite(point.real_length) or point.real_length < 1.0:
        return 0.0
    return math.floor(point.real_length) / point.pulses


@dataclass(frozen=True, slots=True, kw_only=True)
class DecoyOptimum:
    """Best settings found by optimise_decoy_settings and the expected key they give."""

    settings: DecoySettings
    bits_per_pulse: float  # floor(l) / N, 0.0 when no key
    length_bits: int  # floor(l), >= 0
    pulses: float  # N (expected, for a fixed key block)
    eps_sec: float  # the secrecy actually used (kappa * l when secrecy_per_key_bit is set)


def _settings_from_vector(x: Sequence[float], mu_vacuum: float) -> DecoySettings | None:
    """Unconstrained 5-vector -> valid DecoySettings (logit, softmax, exp keep every constraint)."""
    try:
        q = 1.0 / (1.0 + math.exp(-x[0]))
        e1, e2 = math.exp(x[1]), math.exp(x[2])
        total = e1 + e2 + 1.0
        mu_decoy = mu_vacuum + math.exp(x[3])
        mu_signal = mu_decoy + mu_vacuum + math.exp(x[4])
        return DecoySettings(
            mu_signal=mu_signal,
            mu_decoy=mu_decoy,
            mu_vacuum=mu_vacuum,
            p_signal=e1 / total,
            p_decoy=e2 / total,
            p_vacuum=1.0 - e1 / total - e2 / total,
            p_key_basis=q,
        )
    except (OverflowError, ValueError):
        return None


def _vector_from_settings(settings: DecoySettings) -> list[float]:
    q = settings.p_key_basis
    return [
        math.log(q / (1.0 - q)),
        math.log(settings.p_signal / settings.p_vacuum),
        math.log(settings.p_decoy / settings.p_vacuum),
        math.log(settings.mu_decoy - settings.mu_vacuum),
        math.log(settings.mu_signal - settings.mu_decoy - settings.mu_vacuum),
    ]


def _nelder_mead_max(
    objective: Callable[[list[float]], float], start: list[float], step: float, max_evals: int
) -> tuple[list[float], float]:
    """Deterministic Nelder-Mead maximisation (standard coefficients 1, 2, 1/2, 1/2)."""
    dim = len(start)
    simplex = [list(start)]
    for i in range(dim):
        vertex = list(start)
        vertex[i] += step
        simplex.append(vertex)
    values = [objective(v) for v in simplex]
    evals = len(simplex)
    while evals < max_evals:
        order = sorted(range(dim + 1), key=lambda i: values[i], reverse=True)
        simplex = [simplex[i] for i in order]
        values = [values[i] for i in order]
        best, worst = values[0], values[-1]
        size = max(abs(a - b) for v in simplex[1:] for a, b in zip(v, simplex[0], strict=True))
        if size < 1e-6 or (math.isfinite(worst) and abs(best - worst) <= 1e-12 * abs(best)):
            break
        centroid = [sum(v[i] for v in simplex[:-1]) / dim for i in range(dim)]
        worst_vertex = simplex[-1]

        def along(
            t: float, cen: list[float] = centroid, w: list[float] = worst_vertex
        ) -> list[float]:
            return [c + t * (x - c) for c, x in zip(cen, w, strict=True)]

        reflected = along(-1.0)
        f_reflected = objective(reflected)
        evals += 1
        if f_reflected > values[0]:
            expanded = along(-2.0)
            f_expanded = objective(expanded)
            evals += 1
            if f_expanded > f_reflected:
                simplex[-1], values[-1] = expanded, f_expanded
            else:
                simplex[-1], values[-1] = reflected, f_reflected
            continue
        if f_reflected > values[-2]:
            simplex[-1], values[-1] = reflected, f_reflected
            continue
        contracted = along(-0.5) if f_reflected > values[-1] else along(0.5)
        f_contracted = objective(contracted)
        evals += 1
        if f_contracted > max(f_reflected, values[-1]):
            simplex[-1], values[-1] = contracted, f_contracted
            continue
        for i in range(1, dim + 1):
            simplex[i] = [b + 0.5 * (v - b) for b, v in zip(simplex[0], simplex[i], strict=True)]
            values[i] = objective(simplex[i])
            evals += 1
    index = max(range(dim + 1), key=lambda i: values[i])
    return simplex[index], values[index]


_DEFAULT_START: Final = DecoySettings(
    mu_signal=0.5,
    mu_decoy=0.15,
    mu_vacuum=2e-4,
    p_signal=0.7,
    p_decoy=0.2,
    p_vacuum=0.1,
    p_key_basis=0.8,
)


def optimise_decoy_settings(
    *,
    transmittance: float,
    dark_count_probability: float,
    misalignment_error: float,
    reconciliation_efficiency: float,
    security: SecurityParameters,
    key_block_bits: int | None = None,
    pulses: int | None = None,
    mu_vacuum: float = 2e-4,
    afterpulse_probability: float = 0.0,
    secrecy_per_key_bit: float | None = None,
    initial: DecoySettings | None = None,
    max_evaluations: int = 1500,
) -> DecoyOptimum:
    """Maximise the expected [LCWXZ14] key rate l/N over {q_x, p_mu1, p_mu2, mu1, mu2}.

    mu3 = mu_vacuum is fixed (2e-4 in the paper). Give exactly one of key_block_bits (the
    paper's n_X; N follows) or pulses (N fixed). Deterministic: the best of 25 fixed starting
    points (plus ``initial``, for warm starts along a curve), then two Nelder-Mead runs on the
    real-valued length (l/N above zero, l/n_X below), so the search also climbs out of regions
    without key. Returns the start with length 0 when no setting gives a bound at all.
    About 1500 bound evaluations, 30-100 ms.
    """
    model = _make_model(
        transmittance=transmittance,
        dark_count_probability=dark_count_probability,
        misalignment_error=misalignment_error,
        afterpulse_probability=afterpulse_probability,
        reconciliation_efficiency=reconciliation_efficiency,
        security=security,
        secrecy_per_key_bit=secrecy_per_key_bit,
        key_block_bits=key_block_bits,
        pulses=pulses,
    )
    vacuum = _check_nonneg_finite("mu_vacuum", mu_vacuum)
    start_settings = initial if initial is not None else _DEFAULT_START
    if start_settings.mu_vacuum != vacuum:
        start_settings = _replace_vacuum(start_settings, vacuum)

    reference_scale = float(key_block_bits if key_block_bits is not None else pulses or 1)

    def objective(x: list[float]) -> float:
        settings = _settings_from_vector(x, vacuum)
        if settings is None:
            return -math.inf
        point = _theory_point(model, settings)
        if not math.isfinite(point.real_length):
            return -math.inf
        if point.real_length > 0.0:
            return point.real_length / point.pulses
        # Below zero, l/N would reward sending more pulses (N -> inf, l/N -> 0-) and drive the
        # search to a vanishing key basis; a fixed scale keeps it continuous at 0 without that.
        return point.real_length / reference_scale

    # Deterministic multi-start: small blocks need a balanced basis choice and a large decoy
    # share before any bound is finite; keep the best finite start (or the warm start).
    starts = [_vector_from_settings(start_settings)]
    for q_key in (0.5, 0.7, 0.9):
        for p_signal, p_decoy in ((0.1, 0.5), (0.5, 0.3), (0.7, 0.2), (0.85, 0.1)):
            for mu_signal, mu_decoy in ((0.4, 0.1), (0.6, 0.2)):
                starts.append(
                    [
                        math.log(q_key / (1.0 - q_key)),
                        math.log(p_signal / (1.0 - p_signal - p_decoy)),
                        math.log(p_decoy / (1.0 - p_signal - p_decoy)),
                        math.log(max(mu_decoy - vacuum, 1e-6)),
                        math.log(max(mu_signal - mu_decoy - vacuum, 1e-6)),
                    ]
                )
    scored = [(objective(v), i) for i, v in enumerate(starts)]
    best_value, best_index = max(scored)
    x = starts[best_index]
    if math.isfinite(best_value):
        per_run = max(50, (max_evaluations - len(starts)) // 2)
        x, _ = _nelder_mead_max(objective, x, 0.3, per_run)
        x, _ = _nelder_mead_max(objective, x, 0.1, per_run)
    best = _settings_from_vector(x, vacuum)
    assert best is not None  # x came from finite objective values or the valid start
    point = _theory_point(model, best)
    length = max(0, math.floor(point.real_length)) if math.isfinite(point.real_length) else 0
    return DecoyOptimum(
        settings=best,
        bits_per_pulse=length / point.pulses if length > 0 else 0.0,
        length_bits=length,
        pulses=point.pulses,
        eps_sec=point.eps_sec,
    )


def _replace_vacuum(settings: DecoySettings, mu_vacuum: float) -> DecoySettings:
    mu_decoy = max(settings.mu_decoy, 2.0 * mu_vacuum + 1e-6)
    mu_signal = max(settings.mu_signal, mu_decoy + 2.0 * mu_vacuum + 1e-6)
    return DecoySettings(
        mu_signal=mu_signal,
        mu_decoy=mu_decoy,
        mu_vacuum=mu_vacuum,
        p_signal=settings.p_signal,
        p_decoy=settings.p_decoy,
        p_vacuum=settings.p_vacuum,
        p_key_basis=settings.p_key_basis,
    )


# ---------------------------------------------------------------------------------------------
# Limits no software can pass
# ---------------------------------------------------------------------------------------------


def plob_bound_bits_per_pulse(transmittance: float) -> float:
    """Repeaterless secret-key capacity of a pure-loss channel, -log2(1 - eta) bits per use.

    [PLOB17], the two-way assisted secret-key capacity of the lossy channel (main result; also
    the abstract of arXiv:1510.08863). No repeaterless QKD protocol beats it at transmittance
    eta. +inf at eta = 1; ValueError outside [0, 1].
    """
    eta = _check_probability("transmittance", transmittance)
    if eta == 1.0:
        return math.inf
    return -math.log2(1.0 - eta)
