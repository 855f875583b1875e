"""The simulation's stand-ins for the quantum link and post-processing.

A block's outcome and key are a function of the run's seed and the block's first pulse index
only, so both nodes agree on them without exchanging real data: Bob opens with one message,
Alice answers with her verdict (a key, or an abort), Bob takes it. The messages are real
post-processing message types, so they cross the channel's real schema checks.
"""

from __future__ import annotations

import hashlib

import numpy as np

from qkdnode.channel.auth import Role
from qkdnode.postprocess.events import AbortReason, BlockAborted
from qkdnode.postprocess.pipeline import (
    BlockAbort,
    BlockKey,
    BlockMessage,
    BlockOutcome,
    BlockStatistics,
    KeyLength,
    VerificationResult,
)


def _statistics(key_bits: int) -> BlockStatistics:
    return BlockStatistics(
        pulse_count=0,
        detections=0,
        sifted_key_bits=key_bits,
        test_bits=0,
        sample_bits=0,
        sample_errors=0,
        test_errors=0,
        reconciled_bits=key_bits,
        reconciliation_bits=0,
        verification_bits=0,
        round_trips=1,
        final_key_bits=key_bits,
        key_counts=(0, 0, 0),
        key_errors_per_intensity=(0, 0, 0),
        test_counts=(0, 0, 0),
        test_errors_per_intensity=(0, 0, 0),
    )


class StubBlock:
    """One side's post-processing of one simulated block."""

    def __init__(
        self,
        role: Role,
        *,
        seed: int,
        first_pulse_index: int,
        key_bits: int,
        abort_probability: float,
    ) -> None:
        digest = hashlib.sha256(f"{seed}:{first_pulse_index}".encode()).digest()
        generator = np.random.default_rng(int.from_bytes(digest, "little"))
        self._role = role
        self._aborts = bool(generator.random() < abort_probability)
        self._key = generator.integers(0, 2, size=key_bits, dtype=np.uint8)
        self.outcome: BlockOutcome | None = None

    def start(self) -> list[BlockMessage]:
        if self._role is Role.BOB:
            return [KeyLength(final_key_bits=int(self._key.shape[0]))]
        return []

    def receive(self, messages: list[BlockMessage]) -> list[BlockMessage]:
        first = messages[0]
        if isinstance(first, BlockAbort):
            self.outcome = BlockAborted(reason=AbortReason.PEER_ABORTED, detail=first.reason)
            return []
        if self._role is Role.ALICE:
            if self._aborts:
                reason = AbortReason.QBER_ABOVE_THRESHOLD
                self.outcome = BlockAborted(reason=reason, detail="simulated")
                return [BlockAbort(reason=reason.value, detail="simulated")]
            self.outcome = BlockKey(key=self._key, statistics=_statistics(self._key.shape[0]))
            return [VerificationResult(ok=True)]
        self.outcome = BlockKey(key=self._key, statistics=_statistics(self._key.shape[0]))
        return []
