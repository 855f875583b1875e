"""One-decoy blocks (signal and one decoy, no third class) through the whole pipeline.

The key is sized by Rusca et al. 2018 (A25) on the block's own counts, which needs the key-basis
errors per intensity class ((A16)): Bob reports them when Cascade ends, Alice sizes the key from
the report, and Bob re-checks her length against his own count.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import pytest

from qkdnode.postprocess.cascade import CascadeVariant
from qkdnode.postprocess.events import AbortReason, BlockAborted
from qkdnode.postprocess.finitekey import (
    FiniteKeyAnalysis,
    OneDecoyObservation,
    OneDecoySettings,
    one_decoy_key_length,
)
from qkdnode.postprocess.pipeline import (
    BlockKey,
    BlockMessage,
    PipelineParameters,
    ReconciliationDone,
    run_block,
)
from qkdnode.postprocess.records import DetectionRecords, EmissionRecords
from tests.helpers_blocks import SECURITY, make_block

ONE_DECOY = OneDecoySettings(mu_signal=0.5, mu_decoy=0.15, p_signal=0.6, p_key_basis=0.5)
PARAMS = PipelineParameters(
    cascade_variant=CascadeVariant.SUBBLOCK_REUSE, security=SECURITY, decoy=ONE_DECOY
)


def _block(seed: int, *, p_third_class: float = 0.0) -> tuple[EmissionRecords, DetectionRecords]:
    transmittance, dark_yield = 0.05, 2e-6
    detection = tuple(
        1 - math.exp(-transmittance * mu) + dark_yield
        for mu in (ONE_DECOY.mu_signal, ONE_DECOY.mu_decoy, 2e-4)
    )
    p_signal = ONE_DECOY.p_signal
    return make_block(
        np.random.default_rng(seed),
        pulse_count=20_000_000,
        detection_probability=(detection[0], detection[1], detection[2]),
        qber=0.02,
        p_key_basis=ONE_DECOY.p_key_basis,
        p_intensity=(p_signal, 1.0 - p_signal - p_third_class, p_third_class),
    )


def _observation(outcome: BlockKey, *, key_errors: tuple[int, int]) -> OneDecoyObservation:
    stats = outcome.statistics
    return OneDecoyObservation(
        key_basis_counts=stats.key_counts[:2],
        key_basis_errors=key_errors,
        test_basis_counts=stats.test_counts[:2],
        test_basis_errors=stats.test_errors_per_intensity[:2],
    )


@pytest.mark.parametrize("analysis", list(FiniteKeyAnalysis))
def test_a_one_decoy_block_is_sized_by_rusca_with_the_selected_statistics(
    analysis: FiniteKeyAnalysis,
) -> None:
    emissions, detections = _block(5)
    params = dataclasses.replace(PARAMS, finite_key=analysis)
    alice, bob = run_block(emissions, detections, params, np.random.default_rng(6))
    assert isinstance(alice, BlockKey) and isinstance(bob, BlockKey)
    assert np.array_equal(alice.key, bob.key) and alice.statistics == bob.statistics
    stats = alice.statistics
    assert stats.key_counts[2] == stats.test_counts[2] == 0
    errors = stats.key_errors_per_intensity
    assert errors[0] > 0 and errors[1] > 0 and errors[2] == 0
    leak = stats.reconciliation_bits + stats.verification_bits
    expected = one_decoy_key_length(
        _observation(alice, key_errors=(errors[0], errors[1])),
        ONE_DECOY,
        leak_ec_bits=leak,
        security=SECURITY,
        statistics=analysis,
    )
    assert stats.final_key_bits == expected.length_bits > 0
    # the errors per class enter (A16): none reported would have given a longer key
    optimistic = one_decoy_key_length(
        _observation(alice, key_errors=(0, 0)),
        ONE_DECOY,
        leak_ec_bits=leak,
        security=SECURITY,
        statistics=analysis,
    )
    assert optimistic.length_bits > stats.final_key_bits


def test_a_third_intensity_class_aborts_a_one_decoy_block() -> None:
    # the source sent pulses of a class the one-decoy protocol does not have
    emissions, detections = _block(7, p_third_class=0.01)
    alice, bob = run_block(emissions, detections, PARAMS, np.random.default_rng(8))
    assert isinstance(alice, BlockAborted) and isinstance(bob, BlockAborted)
    assert alice.reason is AbortReason.NO_POSITIVE_KEY
    assert "third intensity class" in alice.detail and "p_vacuum must be 0" in alice.detail
    assert bob.reason is AbortReason.PEER_ABORTED


def _misreport(shift: int, into: str) -> Callable[[BlockMessage], BlockMessage]:
    """Bob's report with ``shift`` errors moved from the signal class into ``into``."""

    def tamper(message: BlockMessage) -> BlockMessage:
        if isinstance(message, ReconciliationDone):
            moved = {into: getattr(message, into) + shift}
            return dataclasses.replace(
                message, errors_signal=message.errors_signal - shift, **moved
            )
        return message

    return tamper


def _run_misreported(into: str) -> tuple[BlockAborted, BlockAborted]:
    """The seeded block with one error of Bob's report moved from the signal class to ``into``:
    no key on either side."""
    emissions, detections = _block(5)
    alice, bob = run_block(
        emissions, detections, PARAMS, np.random.default_rng(6), tamper=_misreport(1, into)
    )
    assert isinstance(alice, BlockAborted) and isinstance(bob, BlockAborted), (alice, bob)
    return alice, bob


def test_an_error_report_split_otherwise_than_bobs_count_gives_no_key() -> None:
    # same total, one error moved between classes: Alice sizes the key from the report, Bob
    # from his own count, and he refuses her length
    alice, bob = _run_misreported("errors_decoy")
    assert bob.reason is AbortReason.BAD_PEER_MESSAGE and "final_key_bits" in bob.detail
    assert alice.reason is AbortReason.PEER_ABORTED


def test_an_error_report_naming_a_class_without_key_bits_is_refused() -> None:
    alice, _ = _run_misreported("errors_vacuum")
    assert alice.reason is AbortReason.BAD_PEER_MESSAGE
    assert "errors_vacuum" in alice.detail and "0 key bits" in alice.detail
