"""Decoy-state BB84 key length: Lim et al. 2014 with per-class multiplicative Chernoff bounds.

[LCWXZ14] (PRA 89, 022307 (2014)) Eqs. (1)-(5) and the eps split of Eq. (B4), each Hoeffding
deviation replaced by a Chernoff deviation with the same failure probability eps = eps_sec/21:
each intensity class's expected count is bounded from its own observed count x (see ``decoy``
for why the class counts are sums of independent trials), instead of Hoeffding's bound with the
total basis count. It is kept as a comparison point between Lim's Hoeffding bound and the
default, not as a candidate default: ``lim2014_kl``'s relative-entropy interval lies inside
this one (``common.FiniteKeyAnalysis``).

Zhang, Zhao, Razavi, Ma, PRA 95, 012333 (2017) bound decoy-state counts with a Chernoff
inversion of this kind, but their key-rate formula, parameter estimation and failure-probability
split are another framework, and their text could not be read here; so this module is not
their analysis, is not named after it, and reproduces no figure of it. The closed-form relaxed
Chernoff interval of a public re-implementation of that paper (delta^2 m / (2 + delta) =
ln(2/eps)) contains the exact-exponent interval below at the same failure probability
(tests/test_keylength_analyses.py). The deviation itself is checked against exact Poisson tails
there too.

Proof of the deviation, for X a sum of independent Bernoulli trials with mean m and
L = ln(1/eps) (Chernoff; Mitzenmacher & Upfal, Probability and Computing, Thms 4.4 and 4.5):

- upper tail, P(X >= (1+d) m) <= exp(-m [(1+d) ln(1+d) - d]). For each m let x_U(m) = (1+d) m
  with the exponent equal to L; x_U is strictly increasing in m (dx_U/dd < 0 along the
  constraint), so with m_L(x) its inverse, {m < m_L(X)} = {X > x_U(m)} has probability <= eps.
  Solving x [ln(1+d) - d/(1+d)] = L for d gives m_L(x) = x/(1+d); m_L(0) = 0.
- lower tail, P(X <= (1-d) m) <= exp(-m [d + (1-d) ln(1-d)]). x_L(m) = (1-d) m (x_L = 0 for
  m <= L, where no d < 1 reaches the exponent), strictly increasing for m > L; its inverse
  m_U(x) solves x [ln(1-d) + d/(1-d)] = L, m_U(x) = x/(1-d); m_U(0) = L.

With t = ln(1+d), resp. u = -ln(1-d), the equations are t - 1 + e^-t = L/x and
e^u - 1 - u = L/x: convex and increasing, solved by Newton from the right, which stops at or
above the root and so errs only on the safe side (smaller m_L, larger m_U).

The points of Wiesemann et al., arXiv:2405.16578 (fixed vs variable length, acceptance test)
apply as to every analysis here; see ``decoy``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

_NEWTON_STEPS: Final = 100
_NEWTON_RELATIVE_TOLERANCE: Final = 1e-13
_SAFETY_MARGIN: Final = 1e-9


def chernoff_mean_lower(observed: float, log_inverse_eps: float) -> float:
    """m_L(x): a lower bound on the mean of a sum of independent trials observed at x.

    P(mean < m_L(X)) <= exp(-log_inverse_eps). 0 for x <= 0.
    """
    if observed <= 0.0:
        return 0.0
    target = log_inverse_eps / observed
    # f(t) = t - 1 + e^-t - target, increasing and convex on t > 0; f(target + 1) > 0.
    t = target + 1.0
    for _ in range(_NEWTON_STEPS):
        f = t + math.expm1(-t) - target
        step = f / -math.expm1(-t)
        t -= step
        if step <= _NEWTON_RELATIVE_TOLERANCE * t:
            break
    # A margin far above rounding keeps the result on the safe side of the root.
    return observed * math.exp(-t * (1.0 + _SAFETY_MARGIN))


def chernoff_mean_upper(observed: float, log_inverse_eps: float) -> float:
    """m_U(x): an upper bound on the mean of a sum of independent trials observed at x.

    P(mean > m_U(X)) <= exp(-log_inverse_eps). m_U(0) = log_inverse_eps.
    """
    if observed <= 0.0:
        return log_inverse_eps
    target = log_inverse_eps / observed
    # g(u) = e^u - 1 - u - target, increasing and convex on u > 0; g(log1p(target) + 1) > 0
    # because (e - 1) target >= log1p(target).
    u = math.log1p(target) + 1.0
    for _ in range(_NEWTON_STEPS):
        g = math.expm1(u) - u - target
        step = g / math.expm1(u)
        u -= step
        if step <= _NEWTON_RELATIVE_TOLERANCE * u:
            break
    return observed * math.exp(u * (1.0 + _SAFETY_MARGIN))


def chernoff_deviation(counts: Sequence[float], eps: float) -> tuple[list[float], list[float]]:
    """Per-class bounds on the expected counts, each side failing w.p. <= eps."""
    log_inverse_eps = math.log(1.0 / eps)
    lower = [chernoff_mean_lower(c, log_inverse_eps) for c in counts]
    upper = [chernoff_mean_upper(c, log_inverse_eps) for c in counts]
    return lower, upper
