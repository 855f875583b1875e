"""Per-block distillation as two sans-IO roles, Alice and Bob, exchanging messages.

Each role is fed the peer's messages and answers with a list of its own; neither does I/O. The
message flow of one block (B = Bob, A = Alice):

1. B -> A  ``SiftAnnouncement``                      (pulse indices and bases of B's detections)
2. A -> B  ``SiftReply``, ``SampleDisclosure``, ``ReconciliationSeed``
3. B -> A  ``SampleOutcome``, ``TestBasisDisclosure``
4. A -> B  ``TestBasisStatistics``  or ``BlockAbort``   (A decides; B re-checks the same decision)
5. B -> A  ``ParityQuery``  /  A -> B ``ParityAnswer``   (one round trip per Cascade level) ...
6. B -> A  ``ReconciliationDone``                    (the errors corrected per intensity class)
7. A -> B  ``VerificationTag``, the seed, ``KeyLength``   (A sizes the key from the ledger; the seed
   is a ``ToeplitzSeed`` or an ``AmplificationSeed`` by ``params.pa_family``)
8. B -> A  ``VerificationResult``                    (B checks the tag and the length)

Either role ends with a :class:`BlockKey` (identical key bits on both sides) or a
:class:`~qkdnode.postprocess.events.BlockAborted` event. Expected failures (high QBER, no positive
key, verification mismatch, a peer abort) are events; a malformed or out-of-order message from the
peer aborts the block with ``BAD_PEER_MESSAGE`` and a ``BlockAbort`` message naming the field — it
never raises out of :meth:`receive` and never yields a key.

Everything the transcript discloses about the key is recorded in the role's
:class:`LeakageLedger`; privacy amplification is sized from it (lambda_EC = Alice's parity bits
+ verification tag bits; Bob's queries and the errors corrected disclose the error positions,
which the decoy bound accounts for on the entropy side, see ``leakage``).

Randomness (sample positions, Cascade seed, verification hash key, amplification seed) is
Alice's and comes from the injected generator, which the caller must seed from OS entropy for
every block. The Cascade seed may instead be given: the node passes one per session, so blocks
reuse their Cascade permutations (``cascade.permutation`` says why that is sound).

The messages the pipeline defines are in ``block_messages``; the parameters, the early abort and
the key length both sides compute in ``block_parameters``; this module holds the two roles.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from qkdnode.config.node import Role
from qkdnode.errors import ProtocolError
from qkdnode.postprocess.amplification import ToeplitzSeed
from qkdnode.postprocess.amplification_family import (
    AmplificationMessage,
    amplify,
    check_amplification_seed,
    draw_amplification_seed,
)
from qkdnode.postprocess.amplification_mersenne import AmplificationSeed
from qkdnode.postprocess.block_messages import (
    MESSAGE_TYPES,
    RECONCILIATION_SEED_BYTES,
    BlockAbort,
    BlockMessage,
    KeyLength,
    ReconciliationDone,
    ReconciliationSeed,
    VerificationResult,
)
from qkdnode.postprocess.block_parameters import (
    PipelineParameters,
    estimation_decision,
    final_key_length,
)
from qkdnode.postprocess.cascade import (
    CascadeReconciler,
    CascadeResponder,
    ParityAnswer,
    ParityQuery,
)
from qkdnode.postprocess.cascade.frames import FramedReconciler, FramedResponder, frame_bounds
from qkdnode.postprocess.cascade.permutation import check_seed
from qkdnode.postprocess.estimation import (
    SampleDisclosure,
    SampleOutcome,
    TestBasisDisclosure,
    TestBasisStatistics,
    compare_key_sample,
    confirm_sample_outcome,
    confirm_test_basis_statistics,
    count_test_basis_errors,
    disclose_key_sample,
    disclose_test_basis,
    qber_after_reconciliation,
    qber_estimate_for_reconciliation,
    remove_positions,
)
from qkdnode.postprocess.events import AbortReason, BlockAborted
from qkdnode.postprocess.finitekey import (
    binary_entropy,
)
from qkdnode.postprocess.leakage import LeakageLedger
from qkdnode.postprocess.records import AliceRecords, Bits, DetectionRecords
from qkdnode.postprocess.sifting import (
    SiftAnnouncement,
    SiftedBlock,
    SiftReply,
    announce_detections,
    counts_per_intensity,
    sift_alice,
    sift_bob,
)
from qkdnode.postprocess.verification import (
    VerificationMismatch,
    VerificationTag,
    make_verification_tag,
    verify_tag,
)

# the pipeline's public surface, importable from here as from the modules that define it
__all__ = [
    "MESSAGE_TYPES",
    "AliceBlock",
    "BlockAbort",
    "BlockKey",
    "BlockMessage",
    "BlockOutcome",
    "BlockStatistics",
    "BobBlock",
    "KeyLength",
    "PipelineParameters",
    "ReconciliationDone",
    "ReconciliationSeed",
    "Transcript",
    "VerificationResult",
    "final_key_length",
    "run_block",
]

RANGE_TRIPLE_BYTES = 12


# ---- results ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockStatistics:
    """Public figures of one block (no key material): for logs, metrics and benchmarks."""

    pulse_count: int
    detections: int
    sifted_key_bits: int
    test_bits: int
    sample_bits: int
    sample_errors: int
    test_errors: int
    reconciled_bits: int
    reconciliation_bits: int
    verification_bits: int
    round_trips: int
    final_key_bits: int
    # the decoy statistics the key length came from (n_X,k after the sample and the errors
    # corrected among them; n_Z,k; m_Z,k)
    key_counts: tuple[int, int, int]
    key_errors_per_intensity: tuple[int, int, int]
    test_counts: tuple[int, int, int]
    test_errors_per_intensity: tuple[int, int, int]

    @property
    def errors_corrected(self) -> int:
        return sum(self.key_errors_per_intensity)

    @property
    def qber(self) -> float:
        """QBER of the key basis from the errors actually corrected."""
        return qber_after_reconciliation(self.errors_corrected, self.reconciled_bits)

    @property
    def test_qber(self) -> float:
        return self.test_errors / self.test_bits if self.test_bits else 0.0

    @property
    def reconciliation_efficiency(self) -> float:
        """f = disclosed parity bits / (n h(Q)), Q the corrected error fraction (nan if Q = 0)."""
        entropy = binary_entropy(self.qber) if 0.0 < self.qber < 1.0 else 0.0
        if entropy == 0.0:
            return math.nan
        return self.reconciliation_bits / (self.reconciled_bits * entropy)


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockKey:
    """A block's final secret key (identical on both sides) and its public statistics."""

    key: Bits
    statistics: BlockStatistics

    def __repr__(self) -> str:
        return f"BlockKey(final_key_bits={self.key.shape[0]}, statistics={self.statistics!r})"


BlockOutcome = BlockKey | BlockAborted


def _query_ranges(query: ParityQuery) -> int:
    """Bob's binary-search ranges in a query (12 bytes each, see ``cascade.messages``)."""
    return len(query.ranges) // RANGE_TRIPLE_BYTES


def _remaining_key_counts(
    sifted: SiftedBlock, disclosure: SampleDisclosure
) -> tuple[int, int, int]:
    """Key-basis detections per intensity class left after the disclosed sample."""
    # the sampled positions are distinct and in range: their counts come off the whole key's
    whole = sifted.key_counts_per_intensity()
    sampled = counts_per_intensity(sifted.key_intensity[disclosure.sample_positions()])
    return whole[0] - sampled[0], whole[1] - sampled[1], whole[2] - sampled[2]


# ---- the roles --------------------------------------------------------------------------------


class _BlockRole:
    """What both roles share: state, ledger, outcome, and turning bad input into an abort."""

    role: Role

    def __init__(self, params: PipelineParameters) -> None:
        self.params = params
        self.ledger = LeakageLedger()
        self.outcome: BlockOutcome | None = None
        self._state = "start"

    @property
    def finished(self) -> bool:
        return self.outcome is not None

    def receive(self, messages: Sequence[BlockMessage]) -> list[BlockMessage]:
        """Feed the peer's messages of one turn; returns this role's reply (maybe empty).

        Never raises for bad peer input: a malformed, unexpected or out-of-order message ends the
        block with ``BAD_PEER_MESSAGE`` and the reply is a ``BlockAbort`` naming what was wrong.
        """
        if self.outcome is not None:
            return []
        try:
            for message in messages:
                if isinstance(message, BlockAbort):
                    self.outcome = BlockAborted(
                        reason=AbortReason.PEER_ABORTED,
                        detail=f"peer aborted: {message.reason}",
                    )
                    return []
            return self._receive(list(messages))
        except ProtocolError as exc:
            return self._abort(AbortReason.BAD_PEER_MESSAGE, f"in state {self._state}: {exc}")

    def _abort(self, reason: AbortReason, detail: str) -> list[BlockMessage]:
        self.outcome = BlockAborted(reason=reason, detail=detail)
        self._state = "done"
        return [BlockAbort(reason=reason.value, detail=detail[:500])]

    def _expect(self, messages: list[BlockMessage], *types: type[BlockMessage]) -> None:
        got = tuple(type(m) for m in messages)
        if got != types:
            names = ", ".join(t.__name__ for t in types)
            raise ProtocolError(
                f"expected [{names}], got [{', '.join(t.__name__ for t in got)}]", field="messages"
            )

    def _receive(self, messages: list[BlockMessage]) -> list[BlockMessage]:
        raise NotImplementedError


class AliceBlock(_BlockRole):
    """Alice's side of one block: answers Bob, owns the block's public randomness."""

    role = "alice"

    def __init__(
        self,
        emissions: AliceRecords,
        params: PipelineParameters,
        rng: np.random.Generator,
        *,
        reconciliation_seed: bytes | None = None,
    ) -> None:
        """``reconciliation_seed``: the Cascade seed to announce (32 bytes; the session's), or
        None to draw a fresh one from ``rng``."""
        super().__init__(params)
        self._emissions = emissions
        self._rng = rng
        self._given_seed = None if reconciliation_seed is None else check_seed(reconciliation_seed)
        self._state = "await_announcement"

    def _receive(self, messages: list[BlockMessage]) -> list[BlockMessage]:
        handler: Callable[[list[BlockMessage]], list[BlockMessage]] = {
            "await_announcement": self._on_announcement,
            "await_outcome": self._on_outcome,
            "reconciling": self._on_reconciliation,
            "await_result": self._on_result,
        }.get(self._state, self._unexpected)
        return handler(messages)

    def _unexpected(self, messages: list[BlockMessage]) -> list[BlockMessage]:
        raise ProtocolError("no message expected", field="messages")

    def _on_announcement(self, messages: list[BlockMessage]) -> list[BlockMessage]:
        self._expect(messages, SiftAnnouncement)
        announcement = messages[0]
        assert isinstance(announcement, SiftAnnouncement)
        if (
            announcement.first_pulse_index != self._emissions.first_pulse_index
            or announcement.pulse_count != self._emissions.pulse_count
        ):
            raise ProtocolError("does not match this side's block", field="first_pulse_index")
        reply, self._sifted = sift_alice(self._emissions, announcement)
        self._detections = announcement.detection_count
        sample_bits = min(self.params.sample_bits, self._sifted.key_length // 2)
        self._disclosure, self._key = disclose_key_sample(
            self._sifted.key_bits, sample_bits=sample_bits, rng=self._rng, ledger=self.ledger
        )
        self._key_counts = _remaining_key_counts(self._sifted, self._disclosure)
        self._seed = self._given_seed or self._rng.bytes(RECONCILIATION_SEED_BYTES)
        self._state = "await_outcome"
        return [reply, self._disclosure, ReconciliationSeed(seed=self._seed)]

    def _on_outcome(self, messages: list[BlockMessage]) -> list[BlockMessage]:
        self._expect(messages, SampleOutcome, TestBasisDisclosure)
        outcome, test = messages
        assert isinstance(outcome, SampleOutcome) and isinstance(test, TestBasisDisclosure)
        confirm_sample_outcome(self._disclosure, outcome)
        self._statistics = count_test_basis_errors(self._sifted, test)
        self._sample_errors = outcome.errors
        decision = estimation_decision(
            self.params,
            key_bits=int(self._key.shape[0]),
            key_counts=self._key_counts,
            outcome=outcome,
            statistics=self._statistics,
        )
        if decision is not None:
            return self._abort(decision.reason, decision.detail)
        self._responder: CascadeResponder | FramedResponder
        if len(frame_bounds(int(self._key.shape[0]), self.params.cascade_frame_bits)) > 1:
            self._responder = FramedResponder(
                self._key,
                seed=self._seed,
                variant=self.params.cascade_variant,
                max_frame_bits=self.params.cascade_frame_bits,
            )
        else:
            self._responder = CascadeResponder(
                self._key, seed=self._seed, variant=self.params.cascade_variant
            )
        self._state = "reconciling"
        return [self._statistics]

    def _on_reconciliation(self, messages: list[BlockMessage]) -> list[BlockMessage]:
        if len(messages) == 1 and isinstance(messages[0], ParityQuery):
            answer = self._responder.answer(messages[0])
            self.ledger.record_query(_query_ranges(messages[0]))
            self.ledger.record_reconciliation(answer.count)
            return [answer]
        self._expect(messages, ReconciliationDone)
        done = messages[0]
        assert isinstance(done, ReconciliationDone)
        if done.parity_bits != self.ledger.reconciliation_bits:
            raise ProtocolError(
                f"peer counts {done.parity_bits} parity bits, this side sent "
                f"{self.ledger.reconciliation_bits}",
                field="parity_bits",
            )
        for name, errors, count in zip(
            ("errors_signal", "errors_decoy", "errors_vacuum"),
            done.errors_per_intensity,
            self._key_counts,
            strict=True,
        ):
            if errors > count:
                raise ProtocolError(f"exceeds the class's {count} key bits", field=name)
        if (
            isinstance(self._responder, FramedResponder)
            and self._responder.frames_started != self._responder.frames
        ):
            raise ProtocolError("reconciliation ended before the last frame", field="messages")
        self._key_errors = done.errors_per_intensity
        self.ledger.record_error_weight(done.errors_corrected)
        self._round_trips = self._responder.rounds_answered
        tag = make_verification_tag(
            self._key, eps_cor=self.params.security.eps_cor, rng=self._rng, ledger=self.ledger
        )
        length = self._key_length()
        if length <= 0:
            return self._abort(
                AbortReason.NO_POSITIVE_KEY,
                f"leak of {self.ledger.leak_ec_bits} bits leaves no key",
            )
        self._amplification = draw_amplification_seed(
            self.params.pa_family,
            input_bits=int(self._key.shape[0]),
            output_bits=length,
            rng=self._rng,
        )
        self._state = "await_result"
        return [tag, self._amplification, KeyLength(final_key_bits=length)]

    def _key_length(self) -> int:
        return final_key_length(
            self.params,
            key_bits=int(self._key.shape[0]),
            key_counts_per_intensity=self._key_counts,
            statistics=self._statistics,
            leak_ec_bits=self.ledger.leak_ec_bits,
            key_errors_per_intensity=self._key_errors,
            error_positions_disclosed=self.ledger.error_positions_disclosed,
        )

    def _on_result(self, messages: list[BlockMessage]) -> list[BlockMessage]:
        self._expect(messages, VerificationResult)
        result = messages[0]
        assert isinstance(result, VerificationResult)
        self._state = "done"
        if not result.ok:
            self.outcome = BlockAborted(
                reason=AbortReason.VERIFICATION_FAILED, detail="Bob's key failed verification"
            )
            return []
        key = amplify(self._key, self._amplification)
        self.outcome = BlockKey(key=key, statistics=self._block_statistics(key))
        return []

    def _block_statistics(self, key: Bits) -> BlockStatistics:
        return BlockStatistics(
            pulse_count=self._emissions.pulse_count,
            detections=self._detections,
            sifted_key_bits=self._sifted.key_length,
            test_bits=self._sifted.test_length,
            sample_bits=self.ledger.estimation_sample_bits,
            sample_errors=self._sample_errors,
            test_errors=sum(self._statistics.errors),
            reconciled_bits=int(self._key.shape[0]),
            reconciliation_bits=self.ledger.reconciliation_bits,
            verification_bits=self.ledger.verification_bits,
            round_trips=self._round_trips,
            final_key_bits=int(key.shape[0]),
            key_counts=self._key_counts,
            key_errors_per_intensity=self._key_errors,
            test_counts=self._statistics.counts,
            test_errors_per_intensity=self._statistics.errors,
        )


class BobBlock(_BlockRole):
    """Bob's side of one block: starts it, asks the Cascade questions, verifies."""

    role = "bob"

    def __init__(self, detections: DetectionRecords, params: PipelineParameters) -> None:
        super().__init__(params)
        # held until sifting only: a large block's detections are 10 bytes each
        self._detections: DetectionRecords | None = detections
        self._pulse_count = detections.pulse_count
        self._detection_count = detections.detection_count

    def start(self) -> list[BlockMessage]:
        """The block's first message (Bob's detections to sift)."""
        if self._state != "start":
            raise RuntimeError("start() called twice")
        self._state = "await_reply"
        assert self._detections is not None
        return [announce_detections(self._detections)]

    def _receive(self, messages: list[BlockMessage]) -> list[BlockMessage]:
        handler: Callable[[list[BlockMessage]], list[BlockMessage]] = {
            "await_reply": self._on_reply,
            "await_statistics": self._on_statistics,
            "reconciling": self._on_answer,
            "await_confirmation": self._on_confirmation,
        }.get(self._state, self._unexpected)
        return handler(messages)

    def _unexpected(self, messages: list[BlockMessage]) -> list[BlockMessage]:
        raise ProtocolError("no message expected", field="messages")

    def _on_reply(self, messages: list[BlockMessage]) -> list[BlockMessage]:
        self._expect(messages, SiftReply, SampleDisclosure, ReconciliationSeed)
        reply, disclosure, seed = messages
        assert isinstance(reply, SiftReply) and isinstance(disclosure, SampleDisclosure)
        assert isinstance(seed, ReconciliationSeed)
        assert self._detections is not None
        self._sifted = sift_bob(self._detections, reply)
        self._detections = None
        if disclosure.sample_count > self.params.sample_bits:
            raise ProtocolError("larger than the agreed sample size", field="sample_count")
        self._outcome, self._key = compare_key_sample(
            self._sifted.key_bits, disclosure, ledger=self.ledger
        )
        self._sample_positions = disclosure.sample_positions()
        self._key_counts = _remaining_key_counts(self._sifted, disclosure)
        self._seed = seed.seed
        self._state = "await_statistics"
        return [self._outcome, disclose_test_basis(self._sifted)]

    def _on_statistics(self, messages: list[BlockMessage]) -> list[BlockMessage]:
        self._expect(messages, TestBasisStatistics)
        statistics = messages[0]
        assert isinstance(statistics, TestBasisStatistics)
        confirm_test_basis_statistics(self._sifted, statistics)
        self._statistics = statistics
        decision = estimation_decision(
            self.params,
            key_bits=int(self._key.shape[0]),
            key_counts=self._key_counts,
            outcome=self._outcome,
            statistics=statistics,
        )
        if decision is not None:
            raise ProtocolError(
                f"peer continued a block this side aborts ({decision.reason.value})",
                field="test_basis_statistics",
            )
        # Cascade's block sizes only need a good guess of Q: pool the key-basis sample with the
        # disclosed test-basis bits of the signal and decoy classes (vacuum clicks are noise).
        errors = self._outcome.errors + statistics.errors[0] + statistics.errors[1]
        tested = self._outcome.sample_bits + statistics.counts[0] + statistics.counts[1]
        qber = qber_estimate_for_reconciliation(errors, max(tested, 1))
        self._reconciler: CascadeReconciler | FramedReconciler
        if len(frame_bounds(int(self._key.shape[0]), self.params.cascade_frame_bits)) > 1:
            self._reconciler = FramedReconciler(
                self._key,
                seed=self._seed,
                variant=self.params.cascade_variant,
                qber_estimate=qber,
                max_frame_bits=self.params.cascade_frame_bits,
            )
        else:
            self._reconciler = CascadeReconciler(
                self._key, seed=self._seed, variant=self.params.cascade_variant, qber_estimate=qber
            )
        self._state = "reconciling"
        return self._next_question()

    def _next_question(self) -> list[BlockMessage]:
        query = self._reconciler.next_query()
        if query is not None:
            self.ledger.record_query(_query_ranges(query))
            return [query]
        self._state = "await_confirmation"
        self._corrected = self._reconciler.corrected_bits
        # the intensity class of each key bit left after the sample, for the errors per class
        key_intensity = remove_positions(self._sifted.key_intensity, self._sample_positions)
        flipped = np.flatnonzero(self._corrected != self._key)
        self._key_errors = counts_per_intensity(key_intensity[flipped])
        done = ReconciliationDone(
            errors_signal=self._key_errors[0],
            errors_decoy=self._key_errors[1],
            errors_vacuum=self._key_errors[2],
            parity_bits=self.ledger.reconciliation_bits,
        )
        self.ledger.record_error_weight(done.errors_corrected)
        return [done]

    def _on_answer(self, messages: list[BlockMessage]) -> list[BlockMessage]:
        self._expect(messages, ParityAnswer)
        answer = messages[0]
        assert isinstance(answer, ParityAnswer)
        self._reconciler.receive_answer(answer)
        self.ledger.record_reconciliation(answer.count)
        return self._next_question()

    def _on_confirmation(self, messages: list[BlockMessage]) -> list[BlockMessage]:
        seed_type: type[BlockMessage] = ToeplitzSeed
        if len(messages) == 3 and isinstance(messages[1], AmplificationSeed):
            seed_type = AmplificationSeed
        self._expect(messages, VerificationTag, seed_type, KeyLength)
        tag, seed, length = messages
        assert isinstance(tag, VerificationTag) and isinstance(length, KeyLength)
        assert isinstance(seed, ToeplitzSeed | AmplificationSeed)
        amplification: AmplificationMessage = seed
        corrected = self._corrected
        check_amplification_seed(
            amplification, self.params.pa_family, input_bits=int(corrected.shape[0])
        )
        self._state = "done"
        try:
            verify_tag(corrected, tag, eps_cor=self.params.security.eps_cor, ledger=self.ledger)
        except VerificationMismatch:
            self.outcome = BlockAborted(
                reason=AbortReason.VERIFICATION_FAILED,
                detail="verification tags differ after reconciliation",
            )
            return [VerificationResult(ok=False)]
        expected = final_key_length(
            self.params,
            key_bits=int(corrected.shape[0]),
            key_counts_per_intensity=self._key_counts,
            statistics=self._statistics,
            leak_ec_bits=self.ledger.leak_ec_bits,
            key_errors_per_intensity=self._key_errors,
            error_positions_disclosed=self.ledger.error_positions_disclosed,
        )
        if length.final_key_bits != expected or amplification.output_bits != expected:
            raise ProtocolError(
                f"peer sized the key at {length.final_key_bits} bits, this side at {expected}",
                field="final_key_bits",
            )
        key = amplify(corrected, amplification)
        self.outcome = BlockKey(
            key=key,
            statistics=BlockStatistics(
                pulse_count=self._pulse_count,
                detections=self._detection_count,
                sifted_key_bits=self._sifted.key_length,
                test_bits=self._sifted.test_length,
                sample_bits=self.ledger.estimation_sample_bits,
                sample_errors=self._outcome.errors,
                test_errors=sum(self._statistics.errors),
                reconciled_bits=int(corrected.shape[0]),
                reconciliation_bits=self.ledger.reconciliation_bits,
                verification_bits=self.ledger.verification_bits,
                round_trips=self._reconciler.round_trips,
                final_key_bits=expected,
                key_counts=self._key_counts,
                key_errors_per_intensity=self._key_errors,
                test_counts=self._statistics.counts,
                test_errors_per_intensity=self._statistics.errors,
            ),
        )
        return [VerificationResult(ok=True)]


# ---- in-process driver ----------------------------------------------------------------------


@dataclass(slots=True)
class Transcript:
    """Every message of a block in order, with its sender (for tests and benchmarks)."""

    messages: list[tuple[Role, BlockMessage]] = field(default_factory=list)


def run_block(
    emissions: AliceRecords,
    detections: DetectionRecords,
    params: PipelineParameters,
    rng: np.random.Generator,
    *,
    transcript: Transcript | None = None,
    tamper: Callable[[BlockMessage], BlockMessage] | None = None,
    reconciliation_seed: bytes | None = None,
) -> tuple[BlockOutcome, BlockOutcome]:
    """Run both roles against each other in memory; returns (Alice's, Bob's) outcome.

    ``tamper`` (tests) may replace any message in flight, as a faulty or hostile peer would;
    ``reconciliation_seed`` is Alice's (``AliceBlock``).
    """
    alice = AliceBlock(emissions, params, rng, reconciliation_seed=reconciliation_seed)
    bob = BobBlock(detections, params)
    outgoing: list[BlockMessage] = bob.start()
    sender: _BlockRole = bob
    receiver: _BlockRole = alice
    while outgoing or not (alice.finished and bob.finished):
        if tamper is not None:
            outgoing = [tamper(m) for m in outgoing]
        if transcript is not None:
            transcript.messages.extend((sender.role, m) for m in outgoing)
        if not outgoing and receiver.finished and not sender.finished:
            raise RuntimeError(f"{sender.role} is waiting for a peer that has finished")
        outgoing = receiver.receive(outgoing)
        sender, receiver = receiver, sender
        if not outgoing and alice.finished and bob.finished:
            break
    assert alice.outcome is not None and bob.outcome is not None
    return alice.outcome, bob.outcome
