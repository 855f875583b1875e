"""Scenario 8: leakage accounting. The leak the pipeline computes equals the bits actually
disclosed on the channel, in 100 % of blocks.

Many seeded blocks (every Cascade variant, QBERs from 0.5 % to 3.5 %) run through the in-memory
pipeline with a transcript. The disclosed bits are counted from the transcript alone, by the
message definitions: estimation sample = the positions Alice disclosed (``SampleDisclosure``);
reconciliation = every parity bit Alice sent (``ParityAnswer.count``, each answer carries exactly
``count`` parities); verification = the tag's width p (``VerificationTag.field_bits``: the tag is
a value below 2^p − 1). These counts must equal the block statistics of both sides, and the
final key length must be the one the finite-key bound gives for exactly that leak
(leak_EC = reconciliation + verification; Tomamichel et al., Nat. Commun. 3, 634 (2012), eq. 2).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from qkdnode.postprocess.bitpack import unpack_bits
from qkdnode.postprocess.cascade import CascadeVariant, ParityAnswer
from qkdnode.postprocess.estimation import SampleDisclosure, TestBasisStatistics
from qkdnode.postprocess.events import BlockAborted
from qkdnode.postprocess.finitekey import SecurityParameters
from qkdnode.postprocess.pipeline import (
    BlockKey,
    PipelineParameters,
    Transcript,
    final_key_length,
    run_block,
)
from qkdnode.postprocess.verification import VerificationTag
from tests.helpers_blocks import make_block

BLOCKS_PER_VARIANT = int(os.environ.get("QKDNODE_SOAK_LEAK_BLOCKS", "8"))
QBERS = (0.005, 0.01, 0.02, 0.035)


def _params(variant: CascadeVariant) -> PipelineParameters:
    return PipelineParameters(
        cascade_variant=variant,
        security=SecurityParameters(eps_sec=1e-10, eps_cor=1e-12),
        qber_threshold=0.09,
        sample_bits=1500,
    )


@pytest.mark.slow  # runs long
def test_computed_leak_equals_the_disclosed_bits_in_every_block() -> None:
    checked = aborted = 0
    for variant in CascadeVariant:
        params = _params(variant)
        for index in range(BLOCKS_PER_VARIANT):
            seed = 800 + 17 * index + 1000 * list(CascadeVariant).index(variant)
            rng = np.random.default_rng(seed)
            qber = QBERS[index % len(QBERS)]
            emissions, detections = make_block(
                rng, pulse_count=2_000_000, qber=qber, vacuum_qber=qber, p_key_basis=0.7
            )
            transcript = Transcript()
            alice, bob = run_block(emissions, detections, params, rng, transcript=transcript)
            sent = [m for who, m in transcript.messages if who == "alice"]
            samples = [m for m in sent if isinstance(m, SampleDisclosure)]
            answers = [m for m in sent if isinstance(m, ParityAnswer)]
            tags = [m for m in sent if isinstance(m, VerificationTag)]
            statistics = [m for m in sent if isinstance(m, TestBasisStatistics)]
            if not isinstance(alice, BlockKey):
                assert isinstance(alice, BlockAborted) and isinstance(bob, BlockAborted)
                aborted += 1
                continue
            assert isinstance(bob, BlockKey)
            assert len(samples) == len(tags) == len(statistics) == 1
            sample_bits = len(unpack_bits(samples[0].bits, samples[0].sample_count, field="bits"))
            parity_bits = sum(a.count for a in answers)
            assert all(len(a.parities) == (a.count + 7) // 8 for a in answers)
            tag_bits = tags[0].field_bits
            for stats in (alice.statistics, bob.statistics):
                assert stats.sample_bits == sample_bits, (variant, seed)
                assert stats.reconciliation_bits == parity_bits, (variant, seed)
                assert stats.verification_bits == tag_bits, (variant, seed)
            length = final_key_length(
                params,
                key_bits=alice.statistics.reconciled_bits,
                key_counts_per_intensity=alice.statistics.key_counts,
                statistics=statistics[0],
                leak_ec_bits=parity_bits + tag_bits,
            )
            assert alice.key.shape[0] == bob.key.shape[0] == length, (variant, seed)
            checked += 1
    assert checked >= BLOCKS_PER_VARIANT * len(
        CascadeVariant
    ) // 2 and checked + aborted == BLOCKS_PER_VARIANT * len(CascadeVariant)
    print(f"scenario 8: leak equals disclosed bits in {checked}/{checked} keyed blocks")
