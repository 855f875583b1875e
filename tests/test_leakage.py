"""The leakage ledger against an independent count of what the transcript discloses.

The parser below reads only the messages on the wire (it shares no code with the ledger):
lambda_EC = Alice's parity bits + verification tag bits; the entropy side = Bob's
binary-search ranges (they reveal parities of the error positions W) and the disclosed
errors per intensity class (the weight of W on each class: a function of W and the public
intensity labels, checked here against the errors counted from both sides' raw records).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

from qkdnode.postprocess.cascade import CascadeVariant, ParityAnswer, ParityQuery
from qkdnode.postprocess.estimation import SampleDisclosure
from qkdnode.postprocess.finitekey import DecoySettings, OneDecoySettings, SecurityParameters
from qkdnode.postprocess.pipeline import (
    AliceBlock,
    BlockKey,
    BlockMessage,
    BobBlock,
    PipelineParameters,
    ReconciliationDone,
)
from qkdnode.postprocess.records import DetectionRecords, EmissionRecords
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
ONE_DECOY = OneDecoySettings(mu_signal=0.5, mu_decoy=0.15, p_signal=0.6, p_key_basis=0.5)


@dataclass
class Disclosed:
    alice_parity_bits: int = 0
    tag_bits: int = 0
    query_ranges: int = 0
    errors_per_class: tuple[int, int, int] | None = None


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
            assert sender == "bob" and seen.errors_per_class is None
            seen.errors_per_class = (
                message.errors_signal,
                message.errors_decoy,
                message.errors_vacuum,
            )
    return seen


def raw_key_errors_per_class(
    emissions: EmissionRecords,
    detections: DetectionRecords,
    transcript: list[tuple[str, BlockMessage]],
) -> tuple[int, ...]:
    """Disagreements between Alice's and Bob's raw key-basis bits per intensity class, the
    disclosed sample left out: what the reconciliation report must equal."""
    offsets = detections.pulse_index - emissions.first_pulse_index
    bit, basis, intensity = emissions.records_at(offsets)
    key = (basis == 0) & (detections.basis == 0)
    sample = next(m for _, m in transcript if isinstance(m, SampleDisclosure))
    kept = np.ones(int(key.sum()), dtype=bool)
    kept[sample.sample_positions()] = False
    wrong = (bit[key] != detections.bit[key])[kept]
    return tuple(int(c) for c in np.bincount(intensity[key][kept][wrong], minlength=3))


def run(
    params: PipelineParameters, seed: int, qber: float
) -> tuple[AliceBlock, BobBlock, list[tuple[str, BlockMessage]], tuple[int, ...]]:
    """One block run message by message; the last item is how many key-basis bits were wrong
    before reconciliation, per class, counted from the raw records."""
    rng = np.random.default_rng(seed)
    if params.decoy is not None:
        transmittance, dark_yield = 0.05, 2e-6
        two = isinstance(params.decoy, DecoySettings)
        intensities = (DECOY.mu_signal, DECOY.mu_decoy, DECOY.mu_vacuum)
        detection = tuple(1 - math.exp(-transmittance * mu) + dark_yield for mu in intensities)
        emissions, detections = make_block(
            rng,
            pulse_count=20_000_000,
            detection_probability=(detection[0], detection[1], detection[2]),
            qber=qber,
            p_key_basis=params.decoy.p_key_basis,
            p_intensity=(DECOY.p_signal, DECOY.p_decoy, DECOY.p_vacuum)
            if two
            else (ONE_DECOY.p_signal, 1 - ONE_DECOY.p_signal, 0.0),
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
    return alice, bob, transcript, raw_key_errors_per_class(emissions, detections, transcript)


@pytest.mark.parametrize(
    ("seed", "qber", "decoy", "variant"),
    [
        (21, 0.01, None, CascadeVariant.ORIGINAL),
        (22, 0.03, None, CascadeVariant.SUBBLOCK_REUSE),
        (23, 0.02, DECOY, CascadeVariant.SUBBLOCK_REUSE),
        (24, 0.04, DECOY, CascadeVariant.YAN),
        (25, 0.02, ONE_DECOY, CascadeVariant.SUBBLOCK_REUSE),
    ],
)
def test_ledger_equals_an_independent_transcript_count(
    seed: int,
    qber: float,
    decoy: DecoySettings | OneDecoySettings | None,
    variant: CascadeVariant,
) -> None:
    params = PipelineParameters(
        cascade_variant=variant,
        security=SECURITY,
        qber_threshold=0.08,
        sample_bits=1000,
        decoy=decoy,
    )
    alice, bob, transcript, raw_errors = run(params, seed, qber)
    assert isinstance(alice.outcome, BlockKey) and isinstance(bob.outcome, BlockKey)
    seen = parse(transcript)
    assert seen.alice_parity_bits > 0 and seen.tag_bits > 0
    assert seen.query_ranges > 0 and seen.errors_per_class is not None
    # the report per class is W's weight on each class: what the raw records disagree on
    assert seen.errors_per_class == raw_errors and sum(raw_errors) > 0
    if isinstance(decoy, OneDecoySettings):
        assert raw_errors[2] == 0
    for ledger in (alice.ledger, bob.ledger):
        # lambda_EC: Alice's parities and the tag, nothing else
        assert ledger.leak_ec_bits == seen.alice_parity_bits + seen.tag_bits
        # entropy side: Bob's queries and the error weight, not in lambda_EC
        assert ledger.query_ranges == seen.query_ranges
        assert ledger.error_weight == sum(seen.errors_per_class)
        assert ledger.error_positions_disclosed
    for outcome in (alice.outcome, bob.outcome):
        assert outcome.statistics.key_errors_per_intensity == seen.errors_per_class
