"""The messages of the block protocol: the few the pipeline itself defines (the stages define
the others), their union ``BlockMessage``, and ``MESSAGE_TYPES``, every message type by its
stable wire name.

Each message checks its own fields on construction and raises ``ProtocolError`` naming the
field, so a malformed peer message never reaches a role.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from qkdnode.errors import ProtocolError
from qkdnode.postprocess.amplification import ToeplitzSeed
from qkdnode.postprocess.amplification_mersenne import AmplificationSeed
from qkdnode.postprocess.cascade import ParityAnswer, ParityQuery
from qkdnode.postprocess.estimation import (
    SampleDisclosure,
    SampleOutcome,
    TestBasisDisclosure,
    TestBasisStatistics,
)
from qkdnode.postprocess.events import AbortReason
from qkdnode.postprocess.sifting import SiftAnnouncement, SiftReply
from qkdnode.postprocess.verification import VerificationTag

RECONCILIATION_SEED_BYTES: Final = 32


@dataclass(frozen=True, slots=True, kw_only=True)
class ReconciliationSeed:
    """Alice's seed for the Cascade permutations of this block (public, not a secret; a node
    announces one per session, see ``cascade.permutation``)."""

    seed: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.seed, bytes) or len(self.seed) != RECONCILIATION_SEED_BYTES:
            raise ProtocolError(f"must be {RECONCILIATION_SEED_BYTES} bytes", field="seed")


@dataclass(frozen=True, slots=True, kw_only=True)
class ReconciliationDone:
    """Bob has no more parity questions; ``errors_<class>`` are the bits he flipped among the
    key-basis bits of each intensity class (signal, decoy, vacuum).

    Their sum is the weight of W = X xor Y. Per class they are a function of W and the public
    intensity labels, so they disclose nothing W does not (``leakage``); the one-decoy bound
    needs them (``keylength.one_decoy``, [RBGMZ18] (A16)).
    """

    errors_signal: int
    errors_decoy: int
    errors_vacuum: int
    parity_bits: int

    def __post_init__(self) -> None:
        for name in ("errors_signal", "errors_decoy", "errors_vacuum", "parity_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ProtocolError("must be an integer >= 0", field=name)

    @property
    def errors_per_intensity(self) -> tuple[int, int, int]:
        return self.errors_signal, self.errors_decoy, self.errors_vacuum

    @property
    def errors_corrected(self) -> int:
        """The weight of W: every bit Bob flipped."""
        return self.errors_signal + self.errors_decoy + self.errors_vacuum


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyLength:
    """Alice's final key length; Bob recomputes it from the same public data and must agree."""

    final_key_bits: int

    def __post_init__(self) -> None:
        value = self.final_key_bits
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ProtocolError("must be an integer >= 1", field="final_key_bits")


@dataclass(frozen=True, slots=True, kw_only=True)
class VerificationResult:
    """Bob's verdict on Alice's verification tag."""

    ok: bool

    def __post_init__(self) -> None:
        if not isinstance(self.ok, bool):
            raise ProtocolError("must be a bool", field="ok")


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockAbort:
    """Either side gives up on the block; ``reason`` is an :class:`AbortReason` value."""

    reason: str
    detail: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.reason, str) or self.reason not in _ABORT_REASONS:
            raise ProtocolError("unknown abort reason", field="reason")
        if not isinstance(self.detail, str) or len(self.detail) > 500:
            raise ProtocolError("must be a string of at most 500 characters", field="detail")


_ABORT_REASONS = frozenset(reason.value for reason in AbortReason)

BlockMessage = (
    SiftAnnouncement
    | SiftReply
    | SampleDisclosure
    | ReconciliationSeed
    | SampleOutcome
    | TestBasisDisclosure
    | TestBasisStatistics
    | ParityQuery
    | ParityAnswer
    | ReconciliationDone
    | VerificationTag
    | ToeplitzSeed
    | AmplificationSeed
    | KeyLength
    | VerificationResult
    | BlockAbort
)

#: Every message type of the block protocol, by a stable wire name.
MESSAGE_TYPES: dict[str, type[BlockMessage]] = {
    "sift_announcement": SiftAnnouncement,
    "sift_reply": SiftReply,
    "sample_disclosure": SampleDisclosure,
    "reconciliation_seed": ReconciliationSeed,
    "sample_outcome": SampleOutcome,
    "test_basis_disclosure": TestBasisDisclosure,
    "test_basis_statistics": TestBasisStatistics,
    "parity_query": ParityQuery,
    "parity_answer": ParityAnswer,
    "reconciliation_done": ReconciliationDone,
    "verification_tag": VerificationTag,
    "toeplitz_seed": ToeplitzSeed,
    "amplification_seed": AmplificationSeed,
    "key_length": KeyLength,
    "verification_result": VerificationResult,
    "block_abort": BlockAbort,
}
