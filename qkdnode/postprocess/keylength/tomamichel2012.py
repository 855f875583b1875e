"""Single-photon BB84 key length: Tomamichel, Lim, Gisin, Renner 2012.

[TLGR12] M. Tomamichel, C. C. W. Lim, N. Gisin, R. Renner, "Tight finite-key analysis for
quantum cryptography", Nat. Commun. 3, 634 (2012), arXiv:1103.4130.

Eq. (2) is implemented with the constant of its Supplementary Eq. (S4),
mu = sqrt((n+k)/(nk) (k+1)/k ln(4/eps_sec)): Theorem 2 (Suppl. Eq. (S3)) needs
2 eps + eps_PA <= eps_sec, and the key-length term log2(2/(eps_sec^2 eps_cor)) spends
eps_PA = eps_sec/2, leaving eps = eps_sec/4 for the Serfling estimate.

k is the number of test-basis bits whose errors were counted (the phase-error sample); with
k = 0 there is no estimate and no key. Two-way reconciliation (Cascade) also discloses the error
positions W = X xor Y (Tupkary & Lutkenhaus, arXiv:2307.00576). We keep this bound unchanged for
it: every round is a single photon, and the error-position observables Z_A Z_B commute with the
phase-error observables X_A X_B that the estimate bounds, so announcing W leaves the phase-error
rate, and with it the entropy term, as it was (our argument; the paper's abstract reports
unchanged rates "in many practically relevant situations"; its equations were not available
here).
"""

from __future__ import annotations

import math

from qkdnode.postprocess.keylength.common import (
    SecurityParameters,
    check_count,
    check_open_unit,
    check_probability,
    entropy_capped,
)


def tomamichel_statistical_deviation(*, key_bits: int, sample_bits: int, eps_sec: float) -> float:
    """The statistical deviation mu of [TLGR12] Eq. (2) / Supplementary Eq. (S4).

    mu = sqrt( (n + k)/(n k) * (k + 1)/k * ln(4/eps_sec) ), n = key_bits, k = sample_bits:
    with probability >= 1 - (eps_sec/4)^2 (Serfling, without replacement) the error rate on the
    n key bits exceeds the one measured on the k sample bits by less than mu.
    Returns +inf when n or k is 0 (nothing can be estimated).
    """
    n = check_count("key_bits", key_bits)
    k = check_count("sample_bits", sample_bits)
    check_open_unit("eps_sec", eps_sec)
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
    entropy = entropy_capped(qber_tolerance + mu)
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
    check_count("key_bits", key_bits)
    check_count("sample_bits", sample_bits)
    check_probability("qber_tolerance", qber_tolerance)
    leak = check_count("leak_ec_bits", leak_ec_bits)
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
    n_total = check_count("total_bits", total_bits)
    if n_total < 2:
        raise ValueError(f"total_bits: must be >= 2 to split into key and sample, got {n_total}")
    check_probability("qber", qber)
    if not reconciliation_efficiency >= 1.0 or math.isinf(reconciliation_efficiency):
        raise ValueError(
            f"reconciliation_efficiency: must be finite and >= 1, got {reconciliation_efficiency!r}"
        )
    leak_per_bit = reconciliation_efficiency * entropy_capped(qber)

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
