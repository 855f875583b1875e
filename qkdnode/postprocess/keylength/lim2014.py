"""Decoy-state BB84 key length with Hoeffding deviations: Lim et al. 2014.

[LCWXZ14] C. C. W. Lim, M. Curty, N. Walenta, F. Xu, H. Zbinden, PRA 89, 022307 (2014),
arXiv:1311.7129, Eqs. (1)-(5), the deviation defined below Eq. (2):

    n^{+-}_{X,k} = e^k / p_k [ n_{X,k} +- sqrt( (n_X / 2) ln(21/eps_sec) ) ]

Hoeffding with the *total* basis count n_X for every intensity class.

Lower bounds with s_0 + s_1 above the detections of their basis cannot hold; such counts give
no key. The points of Wiesemann et al., arXiv:2405.16578 (fixed vs variable length, acceptance
test) and how this implementation stands with respect to them: see ``decoy``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from qkdnode.postprocess.keylength.common import (
    DecoyKeyBound,
    DecoyObservation,
    DecoySettings,
    SecurityParameters,
)
from qkdnode.postprocess.keylength.decoy import decoy_key_length


def hoeffding_deviation(counts: Sequence[float], eps: float) -> tuple[list[float], list[float]]:
    """n_k -+ sqrt(n/2 ln(1/eps)), n the total of the counts: each side fails w.p. <= eps."""
    delta = math.sqrt(sum(counts) / 2.0 * math.log(1.0 / eps))
    return [c - delta for c in counts], [c + delta for c in counts]


def lim_key_length(
    observation: DecoyObservation,
    settings: DecoySettings,
    *,
    leak_ec_bits: int,
    security: SecurityParameters,
    error_positions_disclosed: bool = True,
) -> DecoyKeyBound:
    """Secret key length of decoy-state BB84 from one block's counts, [LCWXZ14] Eqs. (1)-(5):

        l = floor( s_X0 + s_X1 - s_X1 h(phi_X) - leak_EC - 6 log2(21/eps_sec) - log2(2/eps_cor) )

    leak_ec_bits is lambda_EC: Alice's parity bits and the verification tag (the paper counts
    the verification hash inside log2(2/eps_cor); counting it again is conservative).
    error_positions_disclosed (two-way reconciliation, Cascade) drops s_X0 from the key term
    (see ``qkdnode.postprocess.keylength.decoy``); pass False for the paper's one-way setting.
    Bad statistics (zero counts, phase-error bound >= 1/2, no single-photon events) give
    length_bits == 0, never an exception or NaN.
    """
    return decoy_key_length(
        observation,
        settings,
        leak_ec_bits=leak_ec_bits,
        security=security,
        deviation=hoeffding_deviation,
        error_positions_disclosed=error_positions_disclosed,
    )
