"""What both sides of a block agree on before it starts, and the two decisions each makes from
it on public data alone: abort before reconciliation (``estimation_decision``), and the final
key length (``final_key_length``). Alice announces the length; Bob recomputes it and must agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qkdnode.postprocess.amplification_family import AmplificationFamily
from qkdnode.postprocess.cascade import CascadeVariant
from qkdnode.postprocess.estimation import (
    SampleOutcome,
    TestBasisStatistics,
    check_block_not_empty,
    check_qber,
)
from qkdnode.postprocess.events import AbortReason, BlockAborted
from qkdnode.postprocess.finitekey import (
    DEFAULT_FINITE_KEY_ANALYSIS,
    DecoyObservation,
    DecoySettings,
    FiniteKeyAnalysis,
    OneDecoyObservation,
    OneDecoySettings,
    SecurityParameters,
    binary_entropy,
    decoy_key_length_for,
    one_decoy_key_length,
    tomamichel_key_length,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class PipelineParameters:
    """What both sides must agree on before a block starts (from config and the link).

    ``decoy`` selects a decoy-state bound with the statistics ``finite_key`` names: two decoys
    (``DecoySettings``, Lim et al. 2014) or one (``OneDecoySettings``, Rusca et al. 2018, whose
    link sends no third intensity class); ``None`` selects the single-photon BB84 bound of
    Tomamichel et al. 2012, where ``qber_threshold`` is also the tolerated QBER Q_tol that sizes
    the key and the sample size k is the number of test-basis bits compared (a block with none
    aborts). ``sample_bits`` is the key-basis QBER sample.
    ``pa_family`` is the privacy-amplification family (``amplification_family``); both are
    two-universal, and an input longer than the family hashes aborts the block.
    """

    cascade_variant: CascadeVariant
    security: SecurityParameters
    qber_threshold: float = 0.11
    sample_bits: int = 1024
    decoy: DecoySettings | OneDecoySettings | None = None
    finite_key: FiniteKeyAnalysis = DEFAULT_FINITE_KEY_ANALYSIS
    pa_family: AmplificationFamily = AmplificationFamily.MERSENNE_GMP_V1
    # Cascade frames of at most this many bits, one after another (0: the whole key in one;
    # ``cascade.frames``): bounds Cascade's memory for large blocks
    cascade_frame_bits: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "finite_key", FiniteKeyAnalysis(self.finite_key))
        object.__setattr__(self, "pa_family", AmplificationFamily(self.pa_family))
        if not 0.0 < self.qber_threshold < 0.5:
            raise ValueError("qber_threshold must be in (0, 0.5)")
        if self.sample_bits < 0:
            raise ValueError("sample_bits must be >= 0")
        if self.cascade_frame_bits < 0:
            raise ValueError("cascade_frame_bits must be >= 0")


def final_key_length(
    params: PipelineParameters,
    *,
    key_bits: int,
    key_counts_per_intensity: tuple[int, int, int],
    statistics: TestBasisStatistics,
    leak_ec_bits: int,
    key_errors_per_intensity: tuple[int, int, int] | None = None,
    error_positions_disclosed: bool = True,
) -> int:
    """The secret key length the finite-key bound allows (0 = none), from public data only.

    ``key_errors_per_intensity``: the errors reconciliation corrected per intensity class, which
    the one-decoy bound needs; ``None`` before reconciliation, taken as none (the longest key,
    as the early check wants). ``error_positions_disclosed``: the reconciliation transcript
    reveals W (Cascade does).
    """
    if params.decoy is None:
        # [TLGR12] Eq. (2): k is the number of test-basis bits whose errors were counted, the
        # sample the phase-error rate is estimated from (not the key-basis QBER sample).
        return tomamichel_key_length(
            key_bits=key_bits,
            sample_bits=sum(statistics.counts),
            qber_tolerance=params.qber_threshold,
            leak_ec_bits=leak_ec_bits,
            security=params.security,
        )
    if isinstance(params.decoy, OneDecoySettings):
        if key_counts_per_intensity[2] or statistics.counts[2]:
            return 0  # a third intensity class: not the configured source (see the early check)
        errors = key_errors_per_intensity or (0, 0, 0)
        one_decoy = one_decoy_key_length(
            OneDecoyObservation(
                key_basis_counts=key_counts_per_intensity[:2],
                key_basis_errors=errors[:2],
                test_basis_counts=statistics.counts[:2],
                test_basis_errors=statistics.errors[:2],
            ),
            params.decoy,
            leak_ec_bits=leak_ec_bits,
            security=params.security,
            statistics=params.finite_key,
            error_positions_disclosed=error_positions_disclosed,
        )
        return min(one_decoy.length_bits, key_bits)
    observation = DecoyObservation(
        key_basis_counts=key_counts_per_intensity,
        test_basis_counts=statistics.counts,
        test_basis_errors=statistics.errors,
    )
    bound = decoy_key_length_for(
        params.finite_key,
        observation,
        params.decoy,
        leak_ec_bits=leak_ec_bits,
        security=params.security,
        error_positions_disclosed=error_positions_disclosed,
    )
    return min(bound.length_bits, key_bits)


def estimation_decision(
    params: PipelineParameters,
    *,
    key_bits: int,
    key_counts: tuple[int, int, int],
    outcome: SampleOutcome,
    statistics: TestBasisStatistics,
) -> BlockAborted | None:
    """Abort before reconciliation when the QBER is too high or no key can come out of it.

    The positive-key check is optimistic (leak at the Shannon limit, f = 1), so a block is only
    dropped early when even perfect reconciliation could not give a key.
    """
    if (empty := check_block_not_empty(key_bits)) is not None:
        return empty
    limit = params.pa_family.max_input_bits
    if limit is not None and key_bits > limit:
        return BlockAborted(
            reason=AbortReason.NO_POSITIVE_KEY,
            detail=f"{key_bits} key bits exceed the {limit} bits {params.pa_family.value} hashes",
        )
    if outcome.sample_bits and (high := check_qber(outcome.qber, params.qber_threshold)):
        return high
    test_bits = sum(statistics.counts)
    third_class = key_counts[2] + statistics.counts[2]
    if isinstance(params.decoy, OneDecoySettings) and third_class:
        return BlockAborted(
            reason=AbortReason.NO_POSITIVE_KEY,
            detail=f"{third_class} detections of a third intensity class: the one-decoy protocol"
            " sends two (the link's p_vacuum must be 0)",
        )
    if params.decoy is None and test_bits == 0:
        return BlockAborted(
            reason=AbortReason.NO_POSITIVE_KEY,
            detail="no test-basis bit was compared: the phase-error rate is not estimated",
        )
    if test_bits and (
        high := check_qber(sum(statistics.errors) / test_bits, params.qber_threshold)
    ):
        return high
    qber = outcome.qber if outcome.sample_bits else sum(statistics.errors) / max(test_bits, 1)
    shannon_leak = math.ceil(key_bits * binary_entropy(min(qber, 0.5)))
    length = final_key_length(
        params,
        key_bits=key_bits,
        key_counts_per_intensity=key_counts,
        statistics=statistics,
        leak_ec_bits=shannon_leak,
    )
    if length <= 0:
        return BlockAborted(
            reason=AbortReason.NO_POSITIVE_KEY,
            detail=f"the finite-key bound leaves no key for {key_bits} sifted bits",
        )
    return None
