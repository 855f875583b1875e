"""Decoy-state estimation shared by the decoy analyses: Lim et al. 2014 Eqs. (1)-(5).

[LCWXZ14] C. C. W. Lim, M. Curty, N. Walenta, F. Xu, H. Zbinden, "Concise security bounds for
practical decoy-state quantum key distribution", PRA 89, 022307 (2014), arXiv:1311.7129.

The analyses differ only in how they bound the expected count n*_k of each intensity class from
the observed n_k (a *deviation*): conditioned on the photon number of every detected pulse, the
intensity labels are independent with P(k | n) = p_k e^-k k^n / (n! tau_n) (Alice's choice is
hidden in the photon-number mixture), so n_k is a sum of independent Bernoulli trials with mean
n*_k = sum_n P(k | n) s_n. [LCWXZ14] bound it with Hoeffding (``lim2014``),
``lim2014_chernoff`` with per-class multiplicative Chernoff bounds, ``lim2014_kl`` with
Hoeffding's relative-entropy bound per class. Every one-sided deviation fails with probability
at most eps_sec/21, so the eps split of [LCWXZ14] Eq. (B4) holds for all three: it counts 12
one-sided deviations (n+-_k of classes mu2, mu3 and n+ of mu1 in each basis, m+ of mu2 and m-
of mu3).

Two-way reconciliation (Cascade): Tupkary & Lutkenhaus, "Using Cascade in Quantum Key
Distribution", arXiv:2307.00576, PRApplied 20, 064040 (2023). What could be checked here, and
against what: the stored copy of the paper gave its abstract only, so no equation or section
number of the paper is cited (a number we could not read would be invented). The abstract: the
flaw "stems from an incomplete consideration of all two-way communication that occurs during
the Cascade protocol"; their approach "produces the same key rate as older, incorrect
approaches" in many practical situations and lower valid rates in others. The authors' public
code for the paper (github.com/Optical-Quantum-Communication-Theory/
Using-Cascade-in-Quantum-Key-Distribution, Cascade/DecoyBB84/BB84LossyDescriptionFuncForCascade.m
and BB84DecoyKeyRateFuncForCascade.m) shows how the rectified rate is computed: with
``feedback = 1`` the post-processing map carries an extra public register F per sifted round,
F = 1 iff Alice's and Bob's key bits differ (the error positions W); the entropy is that of the
key conditioned on Eve and all announcements including F; the rate is p_signal * entropy -
deltaLeak, the leakage a separate term (set to 0 in the published version, which compares the
entropy side); and p_signal = mu e^-mu, the single-photon component only: no vacuum
contribution. Our argument agrees with that structure; it is
ours, written to be followed line by line:

1. The transcript T is a function of Alice's parities P_A, W and public randomness: Bob's parity
   of a range is Alice's xor the parity of W on it, so his choice of which half to search next,
   and hence each query, is a function of (P_A, W); Bob's closing report, the errors corrected
   per intensity class, is the weight of W on each class (W and the public class labels).
2. Chain rule for the smooth min-entropy (a classical register C of |C| bits lowers it by at most
   |C|): H(X_A | E T V) >= H(X_A | E W) - |P_A| - |V|, V the verification tag.
3. lambda_EC = |P_A| + |V|: every ``ParityAnswer`` bit and the tag bits
   (``LeakageLedger.leak_ec_bits``), subtracted in Eq. (1) as in [LCWXZ14].
4. The entropy term bounds H(X_A | E W) (their register F). Bob's queries and his error
   report add no bits to lambda_EC (counting them there as well would count W
   twice); they change the bound itself:
   - vacuum rounds: Bob's bit may be Eve's (she may have caused the click), so W gives her
     Alice's bit (H(X | E W) = 0 in the same tests); the s_X0 term of Eq. (1) is dropped
     (``count_vacuum=False``), as their code takes no vacuum contribution;
   - single-photon rounds: the error-position observables Z_A Z_B commute with the phase-error
     observables X_A X_B whose rate phi_X bounds the entropy, so s_X1 (1 - h(phi_X)) stands.
     Their numerical rate conditions on F inside the single-photon entropy; that it equals
     1 - h(phi) in the phase-error framework is our step, consistent with the abstract's "same
     key rate" in many practical situations but not checked against their text. It is checked
     on exact states for collective attacks (tests/test_error_positions_entropy.py): Eve
     holding the purification of a Bell-diagonal state knows W already, H(X | E W) >=
     1 - h(e_phase) on 400 random states, with equality for independent bit and phase flips;
   - s_X0 still enters the estimate of s_X1 (Eq. (3)): that is counting, not secrecy.
   ``LeakageLedger.error_positions_disclosed`` switches this on for every two-way block.

Fixed length, variable length and the acceptance test: Wiesemann, Krause, Tupkary, Lutkenhaus,
Rusca, Walenta, "A consolidated and accessible security proof for finite-size decoy-state
quantum key distribution", arXiv:2405.16578 (2024; v3 2026). Only the abstract was available
here, so no section number is cited. What it states: a proof for finite-size 1-decoy and 2-decoy
BB84 against coherent attacks in the entropic-uncertainty framework that resolves "technical
flaws found in previous works regarding the fixed-length treatment of protocols and the careful
handling of acceptance testing", includes "an analysis accounting for the important distinction
of the 1-decoy protocol where statistics are computed after error correction", "a slight
improvement of the secure-key length", and clarifies conditioning on events. How this
implementation stands against those points:

- variable length: ``pipeline.final_key_length`` computes l per block from that block's observed
  counts and its actual lambda_EC, so the protocol is variable-length. We apply the
  fixed-length formula per block and have not derived the variable-length security statement
  (nor any cost it may add to the eps terms); this gap is open for every analysis here;
- acceptance test: a block is accepted only if its key-basis QBER sample and its test-basis
  error rate are at most ``qber_threshold``, verification passes, and l > 0; otherwise it
  aborts and yields no key. The tests are fixed before the block, but the accepted length is
  not;
- 1-decoy statistics after error correction: ``one_decoy``'s vacuum bound (Rusca et al. (A16))
  uses the key-basis errors per class, known only after error correction; that module sizes no
  key in the node, and the treatment the abstract announces is not applied to it;
- conditioning on events: every one-sided deviation is a statement about sums of independent
  trials (the class labels given the photon numbers) and fails with probability at most
  eps_sec/21, whatever the counts, so it holds conditioned on the photon numbers and detection
  pattern that fix n_X;
- not applied: any change they make to the key-length formula or the eps split (including the
  "slight improvement"); the difference has not been quantified.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Final, NamedTuple

from qkdnode.postprocess.keylength.common import (
    DecoyKeyBound,
    DecoyObservation,
    DecoySettings,
    SecurityParameters,
    binary_entropy,
    check_count,
)

# [LCWXZ14] Eq. (B4): eps_sec = 2(2a1 + a2 + a3) + nu + 10 eps1 + 2 eps2, every term set to a
# common eps, gives eps_sec = 21 eps; hence the 21 in the deviation and key-length terms.
EPS_SPLIT: Final = 21.0

# counts per class, failure probability of each one-sided bound -> (lower, upper) on n*_k
Deviation = Callable[[Sequence[float], float], tuple[list[float], list[float]]]


class DecoyBound(NamedTuple):
    real_length: float  # before floor; -inf when the statistics give no bound
    s_x0: float
    s_x1: float
    phi: float
    s_z0: float
    s_z1: float
    v_z1: float


def lim_gamma(a: float, b: float, c: float, d: float, *, split: float = EPS_SPLIT) -> float:
    """[LCWXZ14] Eq. (5): gamma(a, b, c, d) =
    sqrt( (c+d)(1-b) b / (c d ln 2) * log2( (c+d) / (c d (1-b) b) * 21^2 / a^2 ) ).
    ``split`` replaces the 21 for an eps split with another number of terms (``one_decoy``).
    NaN when the logarithm is negative (the caller treats NaN as "no bound")."""
    spread = (1.0 - b) * b
    # log2 of the product as a sum: a^2 underflows for tiny eps_sec.
    log_inner = math.log2((c + d) / (c * d * spread)) + 2.0 * math.log2(split / a)
    radicand = (c + d) * spread / (c * d * math.log(2.0)) * log_inner
    return math.sqrt(radicand) if radicand >= 0.0 else math.nan


def no_deviation(counts: Sequence[float], eps: float) -> tuple[list[float], list[float]]:
    """The asymptotic limit: every expected count equals its observed count."""
    return list(counts), list(counts)


def decoy_bound(
    key_counts: Sequence[float],
    test_counts: Sequence[float],
    test_errors: Sequence[float],
    settings: DecoySettings,
    leak_ec_bits: float,
    eps_sec: float,
    eps_cor: float,
    *,
    deviation: Deviation,
    count_vacuum: bool,
    asymptotic: bool = False,
) -> DecoyBound:
    """[LCWXZ14] Eqs. (1)-(5) on real-valued counts, with the given deviation.

    ``asymptotic`` drops gamma and the eps terms (use with ``no_deviation``): the rate the same
    counts give without finite-size corrections, an upper limit of every finite analysis.
    """
    mu1, mu2, mu3 = settings.intensities
    probs = settings.probabilities
    weights = [math.exp(mu) / p for mu, p in zip(settings.intensities, probs, strict=True)]
    # tau_n = sum_k p_k e^-k k^n / n!: probability that Alice sends n photons (Eq. (2)).
    tau0 = sum(p * math.exp(-mu) for mu, p in zip(settings.intensities, probs, strict=True))
    tau1 = sum(p * math.exp(-mu) * mu for mu, p in zip(settings.intensities, probs, strict=True))
    eps = eps_sec / EPS_SPLIT

    def scaled(counts: Sequence[float]) -> tuple[list[float], list[float]]:
        # n^{+-}_k = e^k / p_k * (bound on n*_k)   (below Eq. (2))
        lower, upper = deviation(counts, eps)
        minus = [w * c for w, c in zip(weights, lower, strict=True)]
        plus = [w * c for w, c in zip(weights, upper, strict=True)]
        return minus, plus

    def vacuum_and_single(counts: Sequence[float]) -> tuple[float, float]:
        minus, plus = scaled(counts)
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
    err_minus, err_plus = scaled(test_errors)
    # Eq. (4); a negative upper bound cannot hold, use the weaker bound 0.
    v_z1 = max(0.0, tau1 * (err_plus[1] - err_minus[2]) / (mu2 - mu3))

    no_key = DecoyBound(-math.inf, s_x0, s_x1, 0.5, s_z0, s_z1, v_z1)
    if not (s_x1 > 0.0 and s_z1 > 0.0 and math.isfinite(s_x1) and math.isfinite(s_z1)):
        return no_key
    # The s_{.,n} partition the detections, so lower bounds summing above the detection count
    # mean the estimate itself failed (an eps-unlikely event, or counts the model cannot
    # produce): no key rather than more key bits than raw bits.
    # (Not in the asymptotic reference: it must stay an upper limit of the finite analyses.)
    if not asymptotic and (s_x0 + s_x1 > sum(key_counts) or s_z0 + s_z1 > sum(test_counts)):
        return no_key
    error_rate = v_z1 / s_z1
    if asymptotic:
        phi = error_rate
        security_bits = 0.0
    else:
        # gamma vanishes at b = 0; never claim fewer than one single-photon error: this only
        # enlarges the phase-error bound (gamma grows with b on (0, 1/2)).
        gamma_rate = max(error_rate, 1.0 / s_z1)
        if not gamma_rate < 0.5:
            return no_key
        phi = error_rate + lim_gamma(eps_sec, gamma_rate, s_z1, s_x1)  # Eq. (5)
        security_bits = 6.0 * math.log2(EPS_SPLIT / eps_sec) + math.log2(2.0 / eps_cor)
    if not phi < 0.5:  # also catches NaN
        return no_key
    # Eq. (1); s_X0 only when the transcript does not disclose the error positions.
    vacuum_term = s_x0 if count_vacuum else 0.0
    real_length = vacuum_term + s_x1 - s_x1 * binary_entropy(phi) - leak_ec_bits - security_bits
    if not math.isfinite(real_length):
        return no_key
    return DecoyBound(real_length, s_x0, s_x1, phi, s_z0, s_z1, v_z1)


def decoy_key_length(
    observation: DecoyObservation,
    settings: DecoySettings,
    *,
    leak_ec_bits: int,
    security: SecurityParameters,
    deviation: Deviation,
    error_positions_disclosed: bool,
    asymptotic: bool = False,
) -> DecoyKeyBound:
    """floor of Eq. (1) for one block's counts; bad statistics give length 0, never NaN."""
    leak = check_count("leak_ec_bits", leak_ec_bits)
    bound = decoy_bound(
        [float(c) for c in observation.key_basis_counts],
        [float(c) for c in observation.test_basis_counts],
        [float(c) for c in observation.test_basis_errors],
        settings,
        float(leak),
        security.eps_sec,
        security.eps_cor,
        deviation=deviation,
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


def asymptotic_decoy_length(
    observation: DecoyObservation,
    settings: DecoySettings,
    *,
    leak_ec_bits: int,
    error_positions_disclosed: bool,
) -> int:
    """Key length the same counts give with no finite-size correction (expected counts equal
    the observed ones, gamma = 0, no eps terms): no finite analysis may exceed it."""
    return decoy_key_length(
        observation,
        settings,
        leak_ec_bits=leak_ec_bits,
        security=SecurityParameters(eps_sec=0.5, eps_cor=0.5),
        deviation=no_deviation,
        error_positions_disclosed=error_positions_disclosed,
        asymptotic=True,
    ).length_bits
