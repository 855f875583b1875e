"""Decoy-state BB84 key length: Lim et al. 2014 with Hoeffding's bound in relative-entropy form.

[LCWXZ14] (PRA 89, 022307 (2014)) bounds each class count n_k with Hoeffding's inequality over
the n = n_X detections of the basis, in its quadratic form exp(-2 n t^2). That form is a
relaxation of Hoeffding's Theorem 1 ([H63] W. Hoeffding, "Probability inequalities for sums of
bounded random variables", J. Am. Stat. Assoc. 58, 13 (1963), Eq. (2.1)): for independent
X_i in [0, 1] with mean of means p and 0 < t < 1 - p,

    P( mean(X) - p >= t ) <= exp( -n D(p + t || p) ),   D the binary relative entropy,

and D(a || b) >= 2 (a - b)^2 gives the quadratic form ([H63] Eq. (2.3)). The trials are the
same as in [LCWXZ14]: conditioned on the photon numbers, the n detections carry independent
labels, X_i = 1 when detection i has intensity k, with mean of means n*_k / n (see ``decoy``).
Also D(a || b) >= a ln(a/b) - a + b (from ln x >= 1 - 1/x), the exponent of the
multiplicative Chernoff bound of ``lim2014_chernoff`` at the same mean, so each class interval
here lies inside both the Hoeffding and the Chernoff interval (the key length grows as they narrow).

Inversion, with q = n_k / n and L = ln(1/eps): the threshold q_U(p) > p with n D(q_U || p) = L
is strictly increasing in p (D(q || p) grows with q and falls with p on q > p), so
p_L(q) = q_U^{-1}(q), the p < q with n D(q || p) = L, fails (p < p_L(Q)) with probability
<= eps; p_L(0) = 0. Symmetrically p_U(q) is the p > q with n D(q || p) = L, p_U(1) = 1
(applying [H63] to 1 - X_i). Bisection keeps the end on the safe side (lower end for p_L,
upper end for p_U) and L is enlarged by a relative 1e-9, far above rounding.

Everything else, including the eps split (each one-sided bound eps_sec/21), is [LCWXZ14].
This is the default analysis; why is stated in ``common.FiniteKeyAnalysis``. The points of
Wiesemann et al., arXiv:2405.16578 (fixed vs variable length, acceptance test) apply as to every
analysis here; see ``decoy``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

_BISECTION_STEPS: Final = 200
_RELATIVE_TOLERANCE: Final = 1e-13
_SAFETY_MARGIN: Final = 1e-9


def binary_relative_entropy(a: float, b: float) -> float:
    """D(a || b) = a ln(a/b) + (1-a) ln((1-a)/(1-b)) in nats, for a in [0, 1], b in (0, 1)."""
    # a ln(a/b) = -a ln(1 + (b-a)/a); (1-a) ln((1-a)/(1-b)) = (1-a) ln(1 + (b-a)/(1-b))
    total = 0.0
    if a > 0.0:
        total -= a * math.log1p((b - a) / a)
    if a < 1.0:
        total += (1.0 - a) * math.log1p((b - a) / (1.0 - b))
    # D >= 0; only rounding can take it below
    return max(0.0, total)


def relative_entropy_mean_lower(observed: float, trials: float, log_inverse_eps: float) -> float:
    """Lower bound on the expected count of ``observed`` successes in ``trials`` independent
    Bernoulli trials (any means), failing with probability <= exp(-log_inverse_eps)."""
    if observed <= 0.0 or trials <= 0.0:
        return 0.0
    q = min(1.0, observed / trials)
    target = log_inverse_eps * (1.0 + _SAFETY_MARGIN) / trials
    low, high = 0.0, q  # D(q || low) > target >= D(q || high)
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (low + high)
        if mid <= 0.0 or mid >= q:
            break
        if binary_relative_entropy(q, mid) > target:
            low = mid
        else:
            high = mid
        if high - low <= _RELATIVE_TOLERANCE * q:
            break
    return low * trials


def relative_entropy_mean_upper(observed: float, trials: float, log_inverse_eps: float) -> float:
    """Upper bound on the expected count, as ``relative_entropy_mean_lower`` (never > trials)."""
    if trials <= 0.0:
        return 0.0
    q = max(0.0, min(1.0, observed / trials))
    if q >= 1.0:
        return trials
    target = log_inverse_eps * (1.0 + _SAFETY_MARGIN) / trials
    low, high = q, 1.0  # D(q || low) <= target < D(q || high)
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (low + high)
        if mid <= q or mid >= 1.0:
            break
        if binary_relative_entropy(q, mid) > target:
            high = mid
        else:
            low = mid
        if high - low <= _RELATIVE_TOLERANCE * max(q, high - q):
            break
    return high * trials


def relative_entropy_deviation(
    counts: Sequence[float], eps: float
) -> tuple[list[float], list[float]]:
    """Per-class bounds on the expected counts over n = sum(counts) trials, each side <= eps."""
    log_inverse_eps = math.log(1.0 / eps)
    trials = float(sum(counts))
    lower = [relative_entropy_mean_lower(c, trials, log_inverse_eps) for c in counts]
    upper = [relative_entropy_mean_upper(c, trials, log_inverse_eps) for c in counts]
    return lower, upper
