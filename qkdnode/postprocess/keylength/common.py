"""Shared pieces of the finite-key analyses: entropy, validation, parameters, observations.

Pure: ``math`` only; no I/O, no clock, no randomness.

Conventions: our key basis Z (basis 0) is the basis Lim et al. (PRA 89, 022307 (2014)) call X;
our test basis X is their Z. Intensity classes 0/1/2 = signal/decoy/vacuum are their mu1/mu2/mu3
(mu3 may be a weak decoy rather than true vacuum).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from enum import StrEnum
from typing import Final


class FiniteKeyAnalysis(StrEnum):
    """The decoy-state finite-key analysis that sizes the key (``[postprocess] finite_key``).

    All three are [LCWXZ14] (Lim et al., PRA 89, 022307 (2014)) Eqs. (1)-(5) with its eps
    split; they differ only in the deviation that bounds each intensity class's expected count:

    - ``lim2014``: the paper as published, Hoeffding's quadratic bound with the total basis
      count for every class;
    - ``lim2014-chernoff``: the multiplicative Chernoff bound per class, inverted at the class's
      observed count (Mitzenmacher & Upfal, Probability and Computing, Thms 4.4 and 4.5);
    - ``lim2014-kl``: Hoeffding's Theorem 1 in its relative-entropy form ([H63] W. Hoeffding,
      J. Am. Stat. Assoc. 58, 13 (1963), Eq. (2.1)) per class over the basis count.

    The default is ``lim2014-kl``, chosen on soundness first and tightness second. It changes
    one step of [LCWXZ14]: the paper's deviation is Hoeffding's quadratic bound [H63] Eq. (2.3),
    a relaxation of Eq. (2.1) under the same hypotheses (independent trials in [0, 1], here the
    class labels of the detections given their photon numbers); using Eq. (2.1) itself needs no
    assumption that [LCWXZ14] does not already make, so the analysis holds wherever the
    published one does, and each of its steps is a cited published statement. Its intervals lie
    inside both other analyses' (``lim2014_kl``), so it gives the most key of the three. It has
    no published key-rate figure of its own: the shared code path (``decoy.decoy_bound``) is
    checked against [LCWXZ14] Fig. 1 with the paper's deviation, and the Eq. (2.1) deviation
    against exact binomial tails (tests/test_finitekey.py, tests/test_keylength_analyses.py).
    ``lim2014-chernoff`` is not the default: its interval is wider than ``lim2014-kl``'s. Neither
    is the key-rate formula of another paper, so neither has a published figure of its own.
    """

    LIM2014 = "lim2014"
    LIM2014_CHERNOFF = "lim2014-chernoff"
    LIM2014_KL = "lim2014-kl"


DEFAULT_FINITE_KEY_ANALYSIS: Final = FiniteKeyAnalysis.LIM2014_KL

_PROBABILITY_SUM_TOLERANCE: Final = 1e-9
# Far above any useful intensity; keeps e^mu / p_k finite.
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


def entropy_capped(x: float) -> float:
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


def check_open_unit(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 < value < 1.0):
        raise ValueError(f"{name}: must be in (0, 1), got {value!r}")


def check_count(name: str, value: object) -> int:
    """An int >= 0; numpy integers are accepted (``__index__``), bool and float are not."""
    # bool is an int subclass; a count given as True is a bug, not 1.
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ValueError(f"{name}: must be an int, got {type(value).__name__}")
    count = operator.index(value)
    if count < 0:
        raise ValueError(f"{name}: must be >= 0, got {count}")
    return count


def check_nonneg_finite(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)):
        raise ValueError(f"{name}: must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{name}: must be finite and >= 0, got {value!r}")
    return float(value)


def check_probability(name: str, value: float) -> float:
    value = check_nonneg_finite(name, value)
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
        check_open_unit("eps_sec", self.eps_sec)
        check_open_unit("eps_cor", self.eps_cor)


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
            if check_nonneg_finite(name, getattr(self, name)) > _MAX_MEAN_PHOTON_NUMBER:
                raise ValueError(
                    f"{name}: a weak coherent pulse has mean photon number <= "
                    f"{_MAX_MEAN_PHOTON_NUMBER}, got {getattr(self, name)!r}"
                )
        for name in ("p_signal", "p_decoy", "p_vacuum", "p_key_basis"):
            check_open_unit(name, getattr(self, name))
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


def check_triple(name: str, values: object) -> tuple[int, int, int]:
    if not isinstance(values, tuple) or len(values) != 3:
        raise ValueError(f"{name}: must be a tuple of 3 counts (signal, decoy, vacuum)")
    checked = tuple(check_count(f"{name}[{i}]", v) for i, v in enumerate(values))
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
        key = check_triple("key_basis_counts", self.key_basis_counts)
        test = check_triple("test_basis_counts", self.test_basis_counts)
        errors = check_triple("test_basis_errors", self.test_basis_errors)
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
