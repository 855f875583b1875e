"""The coordination protocol of one session, as a pure state machine (h11's ``_state.py`` shape).

(Over 600 lines: the handlers and the one transition table that names them belong together.)

``Coordinator(role, ...)`` takes typed inputs (``receive``) and returns the effects the shell
must apply, in order: frames to send, records to take, post-processing to run, store writes,
reports. It does no I/O, reads no clock and draws no randomness of its own (key IDs come from
the injected ``random_bytes``); it reads the store through a read-only ``StoreView`` and
mutates only the authentication-key ledger, which is itself pure. A store write is an effect,
so the shell must apply each effect list before the next input.

Rules (role-specific where the protocol is):

- Session start (``SessionStarted``): limbo sync. Alice sends ``Sync`` (her staged blocks and
  highest id); Bob answers ``SyncReply`` (his staged blocks, which of hers he committed, his
  highest id); Alice answers ``SyncDone`` (which of his she committed). Each side then commits
  the staged blocks the other committed and drops the rest, in ascending id order, so ledger
  deposits happen in block order on both sides. In a bootstrap session run under an operator's
  re-bootstrap (``AuthPlanner.operator_rebootstrap`` on both nodes), Alice first sends
  ``LedgerReset`` and both reset their ledgers; staged blocks are then committed without a
  deposit. No other path resets a ledger.
- Blocks: Alice opens blocks with increasing ids, up to ``max_in_flight`` at once once the
  session is key-derived (one at a time before), and announces rotation between blocks when
  the pool can pay for it. Per block: Alice takes the records and sends ``BlockInfo``; Bob
  prefetches at the open and takes the records of Alice's pulse range; the post-processing
  roles exchange turns (a ``TurnHeader`` and its messages); each side closes the block when
  its role has an outcome. Nothing is stored before ``BlockAuthenticated``.
- Two-phase commit, in block id order: Alice stages durably and sends ``Stage`` (key IDs, pool
  share); Bob checks the split, stages and answers ``Staged``; Alice deposits the pool share
  in the ledger, commits and sends ``Commit``; Bob deposits, commits and answers
  ``Committed``. A block's keys are deliverable on neither side until both have staged it.
- A peer message that no rule accepts raises ``ProtocolError`` and ends the session (the
  machine is then unusable); an input the shell should not have sent raises ``RuntimeError``.
"""

from __future__ import annotations

import enum
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, TypeVar

import numpy as np

from qkdnode.channel.auth import BLOCK_DRAW_BITS, Role
from qkdnode.channel.connection import BlockAuthenticated, Rotated
from qkdnode.channel.ledger import AuthKeyLedger
from qkdnode.channel.messages import SessionMode
from qkdnode.config.auth import MIN_ROTATION_POOL_BITS
from qkdnode.coordination.events import (
    REMOTE_INPUTS,
    AnnounceRotation,
    BlockDone,
    CloseBlock,
    CommitBlock,
    CoordinatorConfig,
    DropBlock,
    Effect,
    EndSession,
    FeedRole,
    Idle,
    Input,
    LedgerWasReset,
    OpenBlock,
    PeerBlockData,
    PeerMessage,
    PeerOpenedBlock,
    PoolExhaustedStop,
    PrefetchRecords,
    RebootstrapDone,
    RecordsMissing,
    RecordsTaken,
    RetireRequested,
    RoleAdvanced,
    SendControl,
    SendData,
    SessionStarted,
    StageBlock,
    StartRole,
    StopRequested,
    StoreView,
    TakeRecords,
)
from qkdnode.coordination.planner import AuthPlanner
from qkdnode.coordination.wire import (
    MAX_TURN_MESSAGES,
    BlockData,
    BlockInfo,
    Commit,
    Committed,
    CoordinationMessage,
    LedgerReset,
    LedgerResetDone,
    Stage,
    Staged,
    Sync,
    SyncDone,
    SyncReply,
    TurnHeader,
)
from qkdnode.errors import ProtocolError
from qkdnode.postprocess.events import AbortReason, BlockAborted
from qkdnode.postprocess.pipeline import BlockAbort, BlockKey, BlockMessage, BlockOutcome
from qkdnode.postprocess.records import Bits

# ---- per-block and per-session state ------------------------------------------------------------


class Phase(enum.Enum):
    # session phases
    SYNC_RESET = "sync_reset"  # Alice: LedgerReset sent, awaiting LedgerResetDone
    SYNC = "sync"  # Alice: Sync sent, awaiting SyncReply; Bob: awaiting Sync (or LedgerReset)
    SYNC_DONE = "sync_done"  # Bob: SyncReply sent, awaiting SyncDone
    RUNNING = "running"
    ROTATING = "rotating"  # Alice: rotation announced, awaiting Rotated
    ENDED = "ended"
    # block phases
    INFO = "info"  # Bob: awaiting Alice's BlockInfo (records prefetching)
    RECORDS = "records"  # taking the block's records
    EXCHANGE = "exchange"  # the post-processing roles exchange turns
    CLOSING = "closing"  # this side closed the block: awaiting BlockAuthenticated
    READY = "ready"  # authenticated with a key: Alice awaits her turn to stage, Bob a Stage
    STAGING = "staging"  # Alice: Stage sent, awaiting Staged
    STAGED = "staged"  # Bob: Staged sent, awaiting Commit
    COMMITTING = "committing"  # Alice: Commit sent, awaiting Committed


@dataclass(slots=True)
class _Block:
    block_id: int
    phase: Phase
    first_pulse_index: int = -1
    role_busy: bool = False
    turn_left: int | None = None  # messages still due in the incoming turn
    turn: list[BlockMessage] = field(default_factory=list)
    queued_turns: deque[tuple[BlockMessage, ...]] = field(default_factory=deque)
    outcome: BlockOutcome | None = None
    auth: BlockAuthenticated | None = None
    key_ids: tuple[uuid.UUID, ...] = ()
    pool: bytes = b""
    consumer: tuple[bytes, ...] = ()

    def __repr__(self) -> str:
        return f"_Block(block_id={self.block_id}, phase={self.phase.value})"


def bits_to_bytes(bits: Bits) -> bytes:
    """Whole bytes of a bit array (a trailing partial byte is dropped), little bit order."""
    usable = bits[: bits.shape[0] - bits.shape[0] % 8]
    return np.packbits(usable, bitorder="little").tobytes()


def split_block_key(
    ledger: AuthKeyLedger, key: BlockKey, *, mark_bits: int, key_size_bits: int
) -> tuple[bytes, tuple[bytes, ...]]:
    """The pool's share and the consumer keys of a block, computed on a copy of the ledger."""
    key_bytes = bits_to_bytes(key.key)
    probe = AuthKeyLedger(
        target_bits=ledger.state.target_bits,
        reserve_bits=ledger.state.reserve_bits,
        state=ledger.state,
    )
    taken = probe.deposit(key_bytes, mark_consumed_bits=mark_bits)
    size = key_size_bits // 8
    rest = key_bytes[taken:]
    consumer = tuple(rest[i : i + size] for i in range(0, len(rest) - size + 1, size))
    return key_bytes[:taken], consumer


Handler = Callable[["Coordinator", "_Block | None", object], None]


class Coordinator:
    """One session's coordination for one node (see the module docstring for the rules)."""

    def __init__(
        self,
        role: Role,
        *,
        config: CoordinatorConfig,
        ledger: AuthKeyLedger,
        store: StoreView,
        planner: AuthPlanner,
        random_bytes: Callable[[int], bytes],
    ) -> None:
        self.role = role
        self.config = config
        self.ledger = ledger
        self.planner = planner
        self._store = store
        self._random_bytes = random_bytes
        self.phase = Phase.SYNC
        self.mode: SessionMode | None = None
        self._blocks: dict[int, _Block] = {}
        self._next_block_id = 0
        self._staged_at_sync: tuple[int, ...] = ()
        self._stopping = False
        self._retiring = False
        self._starved = False
        self._reset_in_session = False
        self._out: list[Effect] = []

    def __repr__(self) -> str:
        return (
            f"Coordinator(role={self.role.value}, phase={self.phase.value}, "
            f"blocks={sorted(self._blocks)})"
        )

    # ---- views ----------------------------------------------------------------------------
    @property
    def ended(self) -> bool:
        return self.phase is Phase.ENDED

    @property
    def blocks_in_flight(self) -> tuple[int, ...]:
        return tuple(sorted(self._blocks))

    def block_phase(self, block_id: int) -> Phase | None:
        block = self._blocks.get(block_id)
        return block.phase if block is not None else None

    # ---- input ----------------------------------------------------------------------------
    def receive(self, event: Input) -> list[Effect]:
        """Apply one input; return the effects to apply, in order."""
        if self.phase is Phase.ENDED:
            raise RuntimeError("the session's coordination has ended")
        block_id = _block_id_of(event)
        block: _Block | None = None
        phase: Phase
        if block_id is None:
            phase = self.phase
        else:
            block = self._blocks.get(block_id)
            if block is None:
                self._refuse(event, f"no block {block_id} in flight")
            assert block is not None
            phase = block.phase
        handler = _TRANSITIONS.get((self.role, phase, _kind_of(event)))
        if handler is None:
            handler = _TRANSITIONS.get((self.role, None, _kind_of(event)))
        if handler is None:
            self._refuse(event, f"not valid in phase {phase.value} for {self.role.value}")
        assert handler is not None
        handler(self, block, event)
        if not self.ended:
            self._advance()
        out, self._out = self._out, []
        return out

    def _refuse(self, event: Input, why: str) -> None:
        name = _describe(event)
        if isinstance(event, REMOTE_INPUTS):
            self.phase = Phase.ENDED
            raise ProtocolError(f"{name}: {why}", field="type")
        raise RuntimeError(f"{name}: {why}")

    # ---- session start: limbo sync ----------------------------------------------------------
    def _alice_start(self, _block: _Block | None, event: object) -> None:
        assert isinstance(event, SessionStarted)
        self.mode = event.mode
        if self.planner.operator_rebootstrap and event.mode is not SessionMode.KEY_DERIVED:
            self._send(LedgerReset())
            self.phase = Phase.SYNC_RESET
            return
        self._send_sync()

    def _send_sync(self) -> None:
        self._staged_at_sync = tuple(self._store.staged_block_ids())
        self._send(Sync(staged=self._staged_at_sync, last_block_id=self._last_block_id()))
        self.phase = Phase.SYNC

    def _alice_reset_done(self, _block: _Block | None, event: object) -> None:
        self._reset_ledger(requested_by_peer=False)
        self._send_sync()

    def _reset_ledger(self, *, requested_by_peer: bool) -> None:
        self.ledger.reset()
        self._reset_in_session = True
        self.planner.operator_rebootstrap = False
        self._out.append(LedgerWasReset(requested_by_peer=requested_by_peer))
        self._out.append(RebootstrapDone())

    def _alice_sync_reply(self, _block: _Block | None, event: object) -> None:
        reply = _peer(event, SyncReply)
        committed_here = self._committed_among(reply.staged)
        self._send(SyncDone(committed=committed_here))
        self._resolve(self._staged_at_sync, set(reply.committed))
        self._next_block_id = max(self._last_block_id(), reply.last_block_id) + 1
        self.phase = Phase.RUNNING

    def _bob_start(self, _block: _Block | None, event: object) -> None:
        assert isinstance(event, SessionStarted)
        self.mode = event.mode
        self.phase = Phase.SYNC

    def _bob_ledger_reset(self, _block: _Block | None, event: object) -> None:
        # only in a bootstrap session that an operator's re-bootstrap on this node allows
        if self.mode is SessionMode.KEY_DERIVED or not self.planner.operator_rebootstrap:
            self.phase = Phase.ENDED
            raise ProtocolError(
                "ledger reset refused: only in a bootstrap session under an operator's "
                "re-bootstrap on this node",
                field="kind",
            )
        self._reset_ledger(requested_by_peer=True)
        self._send(LedgerResetDone())

    def _bob_sync(self, _block: _Block | None, event: object) -> None:
        sync = _peer(event, Sync)
        self._staged_at_sync = tuple(self._store.staged_block_ids())
        self._send(
            SyncReply(
                staged=self._staged_at_sync,
                committed=self._committed_among(sync.staged),
                last_block_id=self._last_block_id(),
            )
        )
        self.phase = Phase.SYNC_DONE

    def _bob_sync_done(self, _block: _Block | None, event: object) -> None:
        done = _peer(event, SyncDone)
        self._resolve(self._staged_at_sync, set(done.committed))
        self.phase = Phase.RUNNING

    def _committed_among(self, block_ids: Sequence[int]) -> tuple[int, ...]:
        return tuple(b for b in block_ids if self._store.block_committed(b))

    def _last_block_id(self) -> int:
        last = self._store.last_block_id()
        return last if last is not None else 0

    def _resolve(self, staged_here: Sequence[int], committed_there: set[int]) -> None:
        for block_id in sorted(staged_here):  # deposits happen in block order on both sides
            if block_id in committed_there and self._reset_in_session:
                # staged before the ledgers were reset: its pool share is not deposited
                self._out.append(
                    CommitBlock(block_id=block_id, ledger_state=self.ledger.state, limbo=True)
                )
            elif block_id in committed_there:
                staged = self._store.staged_material(block_id)
                material = staged.pool_material + staged.consumer_material
                # checked on a copy first: a refused limbo commit leaves the ledger untouched
                probe = AuthKeyLedger(
                    target_bits=self.ledger.state.target_bits,
                    reserve_bits=self.ledger.state.reserve_bits,
                    state=self.ledger.state,
                )
                taken = probe.deposit(material, mark_consumed_bits=staged.ledger_mark_bits)
                if taken != len(staged.pool_material):
                    self.phase = Phase.ENDED
                    raise ProtocolError(
                        f"ledger takes {taken} bytes of limbo block {block_id}, staged with "
                        f"{len(staged.pool_material)}",
                        field="pool_bytes",
                    )
                self.ledger.deposit(
                    material,
                    mark_consumed_bits=staged.ledger_mark_bits,
                    key_epsilon=self.config.block_epsilon,
                )
                self._close_bootstrap_window()
                self._out.append(
                    CommitBlock(block_id=block_id, ledger_state=self.ledger.state, limbo=True)
                )
            else:
                self._out.append(DropBlock(block_id=block_id))

    # ---- rotation ---------------------------------------------------------------------------
    def _alice_rotated(self, _block: _Block | None, event: object) -> None:
        assert isinstance(event, Rotated)
        self.mode = event.mode
        self.phase = Phase.RUNNING

    def _bob_rotated(self, _block: _Block | None, event: object) -> None:
        assert isinstance(event, Rotated)
        self.mode = event.mode

    # ---- stop and retire ----------------------------------------------------------------------
    def _stop(self, _block: _Block | None, event: object) -> None:
        self._stopping = True

    def _retire(self, _block: _Block | None, event: object) -> None:
        self._retiring = True

    # ---- blocks: open, records, turns, close --------------------------------------------------
    def _bob_block_opened(self, _block: _Block | None, event: object) -> None:
        assert isinstance(event, PeerOpenedBlock)
        if event.block_id in self._blocks:
            self._refuse(event, "block is already open")
        self._blocks[event.block_id] = _Block(event.block_id, Phase.INFO)
        self._out.append(PrefetchRecords(block_id=event.block_id))

    def _bob_block_info(self, block: _Block | None, event: object) -> None:
        assert block is not None and isinstance(event, PeerBlockData)
        assert isinstance(event.message, BlockInfo)  # the table routes only BlockInfo here
        block.phase = Phase.RECORDS
        self._out.append(
            TakeRecords(block_id=block.block_id, first_pulse_index=event.message.first_pulse_index)
        )

    def _records_taken(self, block: _Block | None, event: object) -> None:
        assert block is not None and isinstance(event, RecordsTaken)
        block.first_pulse_index = event.first_pulse_index
        if self.role is Role.ALICE:
            self._send_data(
                block.block_id,
                BlockInfo(first_pulse_index=event.first_pulse_index, pulse_count=event.pulse_count),
            )
        block.phase = Phase.EXCHANGE
        block.role_busy = True
        self._out.append(StartRole(block_id=block.block_id))

    def _bob_records_missing(self, block: _Block | None, event: object) -> None:
        assert block is not None
        missing = BlockAborted(
            reason=AbortReason.LINK_DATA_MISSING,
            detail="this side has no detections for the announced pulse range",
        )
        block.phase = Phase.EXCHANGE
        self._send_turn(
            block.block_id, (BlockAbort(reason=missing.reason.value, detail=missing.detail),)
        )
        self._close(block, missing)

    def _block_data(self, block: _Block | None, event: object) -> None:
        assert block is not None and isinstance(event, PeerBlockData)
        message = event.message
        if isinstance(message, TurnHeader):
            if block.turn_left is not None:
                self._refuse(event, "a turn header inside a turn")
            if not 1 <= message.messages <= MAX_TURN_MESSAGES:
                self._refuse(event, "turn size out of range")
            block.turn_left = message.messages
            return
        if isinstance(message, BlockInfo) or block.turn_left is None:
            self._refuse(event, "a turn must start with its header")
        assert block.turn_left is not None and not isinstance(message, BlockInfo)
        block.turn.append(message)
        block.turn_left -= 1
        if block.turn_left == 0:
            turn, block.turn, block.turn_left = tuple(block.turn), [], None
            block.queued_turns.append(turn)
            self._feed(block)

    def _feed(self, block: _Block) -> None:
        if block.role_busy or not block.queued_turns or block.outcome is not None:
            return
        block.role_busy = True
        self._out.append(FeedRole(block_id=block.block_id, messages=block.queued_turns.popleft()))

    def _role_advanced(self, block: _Block | None, event: object) -> None:
        assert block is not None and isinstance(event, RoleAdvanced)
        if not block.role_busy:
            raise RuntimeError(f"block {block.block_id}: the role was not running")
        block.role_busy = False
        if event.messages:
            self._send_turn(block.block_id, event.messages)
        if event.outcome is not None:
            self._close(block, event.outcome)
        else:
            self._feed(block)

    def _close(self, block: _Block, outcome: BlockOutcome) -> None:
        block.outcome = outcome
        block.phase = Phase.CLOSING
        self._out.append(CloseBlock(block_id=block.block_id))

    def _block_authenticated(self, block: _Block | None, event: object) -> None:
        assert block is not None and isinstance(event, BlockAuthenticated)
        block.auth = event
        if isinstance(block.outcome, BlockKey):
            block.phase = Phase.READY
            return
        assert block.outcome is not None
        del self._blocks[block.block_id]
        self._out.append(
            BlockDone(
                block_id=block.block_id, outcome=block.outcome, auth=event, keys=0, pool_bytes=0
            )
        )

    # ---- two-phase commit -----------------------------------------------------------------
    def _alice_stage(self, block: _Block) -> None:
        key, auth = block.outcome, block.auth
        assert isinstance(key, BlockKey) and auth is not None
        block.pool, block.consumer = split_block_key(
            self.ledger,
            key,
            mark_bits=auth.ledger_mark_bits,
            key_size_bits=self.config.key_size_bits,
        )
        block.key_ids = tuple(
            uuid.UUID(bytes=self._random_bytes(16), version=4) for _ in block.consumer
        )
        self._out.append(self._stage_effect(block))
        self._send(
            Stage(block_id=block.block_id, key_ids=block.key_ids, pool_bytes=len(block.pool))
        )
        block.phase = Phase.STAGING

    def _alice_staged(self, block: _Block | None, event: object) -> None:
        assert block is not None
        self._deposit_and_commit(block)
        self._send(Commit(block_id=block.block_id))
        block.phase = Phase.COMMITTING

    def _alice_committed(self, block: _Block | None, event: object) -> None:
        assert block is not None
        self._finish_committed(block)

    def _bob_stage(self, block: _Block | None, event: object) -> None:
        assert block is not None
        stage = _peer(event, Stage)
        key, auth = block.outcome, block.auth
        assert isinstance(key, BlockKey) and auth is not None
        block.pool, block.consumer = split_block_key(
            self.ledger,
            key,
            mark_bits=auth.ledger_mark_bits,
            key_size_bits=self.config.key_size_bits,
        )
        if stage.pool_bytes != len(block.pool) or len(stage.key_ids) != len(block.consumer):
            self.phase = Phase.ENDED
            raise ProtocolError("the peer splits the block differently", field="pool_bytes")
        if len(set(stage.key_ids)) != len(stage.key_ids):
            self.phase = Phase.ENDED
            raise ProtocolError("duplicate key IDs", field="key_ids")
        if self._store.block_known(block.block_id):
            # an authenticated peer reusing a block id is refused, not written over the store
            self.phase = Phase.ENDED
            raise ProtocolError(f"block {block.block_id} is already stored", field="block_id")
        if self._store.any_key_known(stage.key_ids):
            # likewise a key id: the store would refuse the write and stop the node
            self.phase = Phase.ENDED
            raise ProtocolError("a key ID is already stored", field="key_ids")
        block.key_ids = stage.key_ids
        self._out.append(self._stage_effect(block))
        self._send(Staged(block_id=block.block_id))
        block.phase = Phase.STAGED

    def _bob_commit(self, block: _Block | None, event: object) -> None:
        assert block is not None
        self._deposit_and_commit(block)
        self._send(Committed(block_id=block.block_id))
        self._finish_committed(block)

    def _stage_effect(self, block: _Block) -> StageBlock:
        assert isinstance(block.outcome, BlockKey) and block.auth is not None
        return StageBlock(
            block_id=block.block_id,
            first_pulse_index=block.first_pulse_index,
            key_ids=block.key_ids,
            pool_material=block.pool,
            consumer_keys=block.consumer,
            key=block.outcome,
            auth=block.auth,
        )

    def _deposit_and_commit(self, block: _Block) -> None:
        assert isinstance(block.outcome, BlockKey) and block.auth is not None
        # the split is checked on a copy first: a refused commit leaves the ledger untouched
        pool, _ = split_block_key(
            self.ledger,
            block.outcome,
            mark_bits=block.auth.ledger_mark_bits,
            key_size_bits=self.config.key_size_bits,
        )
        if pool != block.pool:
            self.phase = Phase.ENDED
            raise ProtocolError(
                "the pool's share changed between stage and commit", field="pool_bytes"
            )
        self.ledger.deposit(
            bits_to_bytes(block.outcome.key),
            mark_consumed_bits=block.auth.ledger_mark_bits,
            key_epsilon=self.config.block_epsilon,
        )
        self._close_bootstrap_window()
        self._out.append(CommitBlock(block_id=block.block_id, ledger_state=self.ledger.state))

    def _pool_holds(self, nbits: int) -> bool:
        # ``nbits`` above the reserve, and a handshake key for the next connection
        return self.ledger.holds_handshake_key and self.ledger.can_pay(nbits)

    def _close_bootstrap_window(self) -> None:
        # the first commit that leaves the pool able to run key-derived (the rotation and two
        # blocks) closes the window, in the commit's own transaction: from then on only
        # key-derived sessions. This session stays bootstrap-authenticated until the pool also
        # holds the rotation margin (``_open_blocks``)
        if self._pool_holds(MIN_ROTATION_POOL_BITS):
            self.ledger.close_bootstrap_window()

    def _finish_committed(self, block: _Block) -> None:
        assert block.outcome is not None and block.auth is not None
        del self._blocks[block.block_id]
        self._out.append(
            BlockDone(
                block_id=block.block_id,
                outcome=block.outcome,
                auth=block.auth,
                keys=len(block.consumer),
                pool_bytes=len(block.pool),
            )
        )

    # ---- Alice's scheduling, after every input ----------------------------------------------
    def _advance(self) -> None:
        if self.role is Role.ALICE and self.phase is Phase.RUNNING:
            self._advance_commits()
            self._open_blocks()
        if not self._blocks:
            if self._stopping:
                self._out.append(Idle())
            elif self._retiring and self.phase is Phase.RUNNING:
                self.phase = Phase.ENDED
                self._out.append(EndSession(reason="session age limit: opening a new session"))

    def _advance_commits(self) -> None:
        if not self._blocks:
            return
        lowest = self._blocks[min(self._blocks)]
        if lowest.phase is Phase.READY:
            self._alice_stage(lowest)

    def _open_blocks(self) -> None:
        if self._stopping or self._retiring:
            return
        if self.mode is not SessionMode.KEY_DERIVED:
            if self._blocks:
                return  # before rotation: one block at a time, and rotation between blocks
            # rotate once the pool can ride out normal operation: a session cut before then
            # comes back key-derived all the same (the window closed at the first commit)
            if self._pool_holds(self.config.rotation_pool_bits):
                self._out.append(AnnounceRotation())
                self.phase = Phase.ROTATING
                return
            self._open_one()
            return
        opened = 0  # each open draws its keys when the shell applies it, after this call
        while len(self._blocks) < self.config.max_in_flight and not self._starved:
            if not self.ledger.can_pay((opened + 1) * BLOCK_DRAW_BITS):
                if not self._blocks:
                    self._exhausted()
                return
            self._open_one()
            opened += 1

    def _open_one(self) -> None:
        block_id = self._next_block_id
        self._next_block_id += 1
        self._blocks[block_id] = _Block(block_id, Phase.RECORDS)
        self._out.append(OpenBlock(block_id=block_id))
        self._out.append(TakeRecords(block_id=block_id, first_pulse_index=None))

    def _exhausted(self) -> None:
        # no new block in this session; the session stays up (reservations, stored keys)
        self._starved = True
        self._out.append(
            PoolExhaustedStop(level_bits=self.ledger.level_bits, needed_bits=BLOCK_DRAW_BITS)
        )

    # ---- output helpers ---------------------------------------------------------------------
    def _send(self, message: CoordinationMessage) -> None:
        self._out.append(SendControl(message=message))

    def _send_data(self, block_id: int, message: BlockData) -> None:
        self._out.append(SendData(block_id=block_id, message=message))

    def _send_turn(self, block_id: int, messages: Sequence[BlockMessage]) -> None:
        self._send_data(block_id, TurnHeader(messages=len(messages)))
        for message in messages:
            self._send_data(block_id, message)


# ---- dispatch -----------------------------------------------------------------------------------


def _block_id_of(event: Input) -> int | None:
    """The block an input belongs to, or None for session-level inputs."""
    if isinstance(event, PeerBlockData | RecordsTaken | RecordsMissing | RoleAdvanced):
        return event.block_id
    if isinstance(event, BlockAuthenticated):
        return event.block_id
    if isinstance(event, PeerMessage) and isinstance(
        event.message, Stage | Staged | Commit | Committed
    ):
        return event.message.block_id
    return None


def _kind_of(event: Input) -> type:
    """The key of an input in the transition table (peer messages by their message type)."""
    if isinstance(event, PeerMessage):
        return type(event.message)
    if isinstance(event, PeerBlockData) and isinstance(event.message, BlockInfo):
        return BlockInfo
    return type(event)


def _describe(event: Input) -> str:
    if isinstance(event, PeerMessage):
        return type(event.message).__name__
    if isinstance(event, PeerBlockData):
        return f"{type(event.message).__name__} of block {event.block_id}"
    return type(event).__name__


_T = TypeVar("_T")


def _peer(event: object, kind: type[_T]) -> _T:
    assert isinstance(event, PeerMessage) and isinstance(event.message, kind)
    return event.message


A, B = Role.ALICE, Role.BOB
C = Coordinator

#: (role, phase, input or message type) -> handler; phase None: in every session phase.
_TRANSITIONS: Final[dict[tuple[Role, Phase | None, type], Handler]] = {
    # session start and limbo sync
    (A, Phase.SYNC, SessionStarted): C._alice_start,
    (A, Phase.SYNC_RESET, LedgerResetDone): C._alice_reset_done,
    (A, Phase.SYNC, SyncReply): C._alice_sync_reply,
    (B, Phase.SYNC, SessionStarted): C._bob_start,
    (B, Phase.SYNC, LedgerReset): C._bob_ledger_reset,
    (B, Phase.SYNC, Sync): C._bob_sync,
    (B, Phase.SYNC_DONE, SyncDone): C._bob_sync_done,
    # rotation
    (A, Phase.ROTATING, Rotated): C._alice_rotated,
    (B, Phase.RUNNING, Rotated): C._bob_rotated,
    # stop and retire, in any session phase
    (A, None, StopRequested): C._stop,
    (B, None, StopRequested): C._stop,
    (A, None, RetireRequested): C._retire,
    # blocks
    (B, Phase.RUNNING, PeerOpenedBlock): C._bob_block_opened,
    (B, Phase.INFO, BlockInfo): C._bob_block_info,
    (A, Phase.RECORDS, RecordsTaken): C._records_taken,
    (B, Phase.RECORDS, RecordsTaken): C._records_taken,
    (B, Phase.RECORDS, RecordsMissing): C._bob_records_missing,
    (A, Phase.EXCHANGE, PeerBlockData): C._block_data,
    (B, Phase.EXCHANGE, PeerBlockData): C._block_data,
    (A, Phase.EXCHANGE, RoleAdvanced): C._role_advanced,
    (B, Phase.EXCHANGE, RoleAdvanced): C._role_advanced,
    (A, Phase.CLOSING, BlockAuthenticated): C._block_authenticated,
    (B, Phase.CLOSING, BlockAuthenticated): C._block_authenticated,
    # two-phase commit
    (A, Phase.STAGING, Staged): C._alice_staged,
    (A, Phase.COMMITTING, Committed): C._alice_committed,
    (B, Phase.READY, Stage): C._bob_stage,
    (B, Phase.STAGED, Commit): C._bob_commit,
}
