"""The leakage ledger against an independent count of what the transcript discloses.

The parser below reads only the messages on the wire (it shares no code with the ledger):
lambda_EC = Alice's parity bits + verification tag bits; the entropy side = Bob's
binary-search ranges (they reveal parities of the error positions W) and the disclosed
``errors_corrected`` (the weight of W).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

from qkdnode.postprocess.cascade import CascadeVariant, ParityAnswer, ParityQuery
from qkdnode.postprocess.finitekey import DecoySettings, SecurityParameters
from qkdnode.postprocess.pipeline import (
    AliceBlock,
    BlockKey,
    BlockMessage,
    BobBlock,
    PipelineParameters,
    ReconciliationDone,
)
from qkdnode.postprocess.verification import VerificationTag
from tests.helpers_blocks import make_block

SECURITY = SecurityParameters(eps_sec=1e-10, eps_cor=1e-12)
DECOY = DecoySettings(
    mu_signal=0.5,
    mu_decoy=0.15,
    mu_vacuum=0.0002,
    p_signal=0.5,
    p_decoy=0.35,
    p_vacuum=0.15,
    p_key_basis=0.5,
)


@dataclass
class Disclosed:
    alice_parity_bits: int = 0
    tag_bits: int = 0
    query_ranges: int = 0
    error_weight: int | None = None


def parse(transcript: list[tuple[str, BlockMessage]]) -> Disclosed:
    seen = Disclosed()
    for sender, message in transcript:
        if isinstance(message, ParityAnswer):
            assert sender == "alice"
            raw = np.frombuffer(message.parities, dtype=np.uint8)
            seen.alice_parity_bits += int(
                np.unpackbits(raw, bitorder="little")[: message.count].size
            )
        elif isinstance(message, ParityQuery):
            assert sender == "bob"
            seen.query_ranges += len(message.ranges) // 12  # (pass, start, end) as 3 int32
        elif isinstance(message, VerificationTag):
            seen.tag_bits += message.field_bits
        elif isinstance(message, ReconciliationDone):
            seen.error_weight = message.errors_corrected
    return seen


def run(
    params: PipelineParameters, seed: int, qber: float, decoy: bool
) -> tuple[AliceBlock, BobBlock, list[tuple[str, BlockMessage]]]:
    rng = np.random.default_rng(seed)
    if decoy:
        transmittance, dark_yield = 0.05, 2e-6
        detection = tuple(
            1 - math.exp(-transmittance * mu) + dark_yield
            for mu in (DECOY.mu_signal, DECOY.mu_decoy, DECOY.mu_vacuum)
        )
        emissions, detections = make_block(
            rng,
            pulse_count=20_000_000,
            detection_probability=(detection[0], detection[1], detection[2]),
            qber=qber,
            p_key_basis=DECOY.p_key_basis,
            p_intensity=(DECOY.p_signal, DECOY.p_decoy, DECOY.p_vacuum),
        )
    else:
        emissions, detections = make_block(
            rng, pulse_count=2_000_000, qber=qber, vacuum_qber=qber, p_key_basis=0.7
        )
    alice = AliceBlock(emissions, params, np.random.default_rng(seed + 1))
    bob = BobBlock(detections, params)
    transcript: list[tuple[str, BlockMessage]] = []
    outgoing, sender = bob.start(), "bob"
    while outgoing:
        transcript.extend((sender, m) for m in outgoing)
        receiver = alice if sender == "bob" else bob
        outgoing = receiver.receive(outgoing)
        sender = "alice" if sender == "bob" else "bob"
    return alice, bob, transcript


@pytest.mark.parametrize(
    ("seed", "qber", "decoy", "variant"),
    [
        (21, 0.01, False, CascadeVariant.ORIGINAL),
        (22, 0.03, False, CascadeVariant.SUBBLOCK_REUSE),
        (23, 0.02, True, CascadeVariant.SUBBLOCK_REUSE),
        (24, 0.04, True, CascadeVariant.YAN),
    ],
)
def test_ledger_equals_an_independent_transcript_count(
    seed: int, qber: float, decoy: bool, variant: CascadeVariant
) -> None:
    params = PipelineParameters(
        cascade_variant=variant,
        security=SECURITY,
        qber_threshold=0.08,
        sample_bits=1000,
        decoy=DECOY if decoy else None,
    )
    alice, bob, transcript = run(params, seed, qber, decoy)
    assert isinstance(alice.outcome, BlockKey) and isinstance(bob.outcome, BlockKey)
    seen = parse(transcript)
    assert seen.alice_parity_bits > 0 and seen.tag_bits > 0
    assert seen.query_ranges > 0 and seen.error_weight is not None and seen.error_weight > 0
    for ledger in (alice.ledger, bob.ledger):
        # lambda_EC: Alice's parities and the tag, nothing else
        assert ledger.leak_ec_bits == seen.alice_parity_bits + seen.tag_bits
        # entropy side: Bob's queries and the error weight, not in lambda_EC
        assert ledger.query_ranges == seen.query_ranges
        assert ledger.error_weight == seen.error_weight
        assert ledger.error_positions_disclosed
    assert alice.outcome.statistics.errors_corrected == seen.error_weight
