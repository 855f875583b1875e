"""The coordination machine's inputs and effects, and what it reads (typed, frozen).

Inputs come from the peer (``PeerMessage``, ``PeerOpenedBlock``, ``PeerBlockData``), from the
channel (``BlockAuthenticated``, ``Rotated``) and from the shell (``SessionStarted``, the
results of its work, ``StopRequested``, ``RetireRequested``). Effects are what the shell must
do, in order: frames to send, work to run, store writes, reports.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from qkdnode.channel.connection import BlockAuthenticated, Rotated
from qkdnode.channel.ledger import LedgerState
from qkdnode.channel.messages import SessionMode
from qkdnode.config.auth import DEFAULT_ROTATION_POOL_BITS, MIN_ROTATION_POOL_BITS
from qkdnode.coordination.wire import BlockData, CoordinationMessage
from qkdnode.postprocess.pipeline import BlockKey, BlockMessage, BlockOutcome

# ---- what the machine reads ----------------------------------------------------------------


class StagedShare(Protocol):
    """A staged block's key material as the store holds it."""

    @property
    def pool_material(self) -> bytes: ...
    @property
    def consumer_material(self) -> bytes: ...
    @property
    def ledger_mark_bits(self) -> int: ...


class StoreView(Protocol):
    """The store as the machine reads it (writes are effects)."""

    def staged_block_ids(self) -> list[int]: ...
    def last_block_id(self) -> int | None: ...
    def block_committed(self, block_id: int) -> bool: ...
    def block_known(self, block_id: int) -> bool: ...
    def any_key_known(self, key_ids: Sequence[uuid.UUID]) -> bool: ...
    def staged_material(self, block_id: int) -> StagedShare: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class CoordinatorConfig:
    """``key_size_bits``: consumer key size; ``max_in_flight``: blocks open at once in a
    key-derived session (at most the channel's ``max_open_blocks``); ``block_epsilon``: each
    block key's distance from uniform (eps_sec + eps_cor), charged to the ledger's
    ``tag_key_epsilon`` when the key enters the pool; ``rotation_pool_bits``: the pool bits
    above the reserve that the first commit must leave for the bootstrap window to close (and
    Alice to rotate): bootstrap sessions go on committing until the pool holds that much."""

    key_size_bits: int
    max_in_flight: int = 1
    block_epsilon: float = 0.0
    rotation_pool_bits: int = DEFAULT_ROTATION_POOL_BITS

    def __post_init__(self) -> None:
        if self.key_size_bits <= 0 or self.key_size_bits % 8:
            raise ValueError("key_size_bits must be a positive multiple of 8")
        if self.max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        if not 0.0 <= self.block_epsilon < 1.0:
            raise ValueError("block_epsilon must be in [0, 1)")
        if self.rotation_pool_bits < MIN_ROTATION_POOL_BITS:
            raise ValueError(f"rotation_pool_bits must be at least {MIN_ROTATION_POOL_BITS}")


# ---- inputs ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionStarted:
    """The handshake completed; ``mode`` authenticates the session."""

    mode: SessionMode


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerMessage:
    """A coordination message from the peer (a ``Control`` frame)."""

    message: CoordinationMessage


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerOpenedBlock:
    """Bob: the channel accepted Alice's ``BlockOpen``."""

    block_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerBlockData:
    """A block-data message from the peer (a ``Data`` frame of an open block)."""

    block_id: int
    message: BlockData


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordsTaken:
    """The shell took the block's records from the link."""

    block_id: int
    first_pulse_index: int
    pulse_count: int


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordsMissing:
    """Bob's side has no records for Alice's pulse range (the block aborts on both sides)."""

    block_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class RoleAdvanced:
    """The block's post-processing role ran: its reply, and its outcome once it has one."""

    block_id: int
    messages: tuple[BlockMessage, ...]
    outcome: BlockOutcome | None


@dataclass(frozen=True, slots=True, kw_only=True)
class StopRequested:
    """The node stops: open no new block; ``Idle`` once every block in flight is done."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RetireRequested:
    """Alice: the session reached its age limit; end it between blocks."""


Input = (
    SessionStarted
    | PeerMessage
    | PeerOpenedBlock
    | PeerBlockData
    | BlockAuthenticated
    | Rotated
    | RecordsTaken
    | RecordsMissing
    | RoleAdvanced
    | StopRequested
    | RetireRequested
)
# what the peer caused (refused with ProtocolError); the rest comes from the shell itself
REMOTE_INPUTS: Final = (PeerMessage, PeerOpenedBlock, PeerBlockData)


# ---- effects --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SendControl:
    message: CoordinationMessage


@dataclass(frozen=True, slots=True, kw_only=True)
class SendData:
    block_id: int
    message: BlockData


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenBlock:
    """Alice: open ``block_id`` on the channel (draws the block's keys in key-derived mode)."""

    block_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class CloseBlock:
    block_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class AnnounceRotation:
    """Alice: switch the session to key-derived authentication (``Rotated`` follows)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TakeRecords:
    """Take the block's records: Alice the next block (``first_pulse_index`` None), Bob the
    block starting at Alice's index (answer ``RecordsTaken`` or ``RecordsMissing``)."""

    block_id: int
    first_pulse_index: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class PrefetchRecords:
    """Bob, at the open: start reading the link before Alice's pulse range arrives."""

    block_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StartRole:
    """Create the block's post-processing role from its records (answer ``RoleAdvanced``)."""

    block_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class FeedRole:
    """Give the role the peer's turn (answer ``RoleAdvanced``)."""

    block_id: int
    messages: tuple[BlockMessage, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class StageBlock:
    """Store the block durably as staged, with its consumer keys and pool share."""

    block_id: int
    first_pulse_index: int
    key_ids: tuple[uuid.UUID, ...]
    pool_material: bytes
    consumer_keys: tuple[bytes, ...]
    key: BlockKey
    auth: BlockAuthenticated

    def __repr__(self) -> str:
        return f"StageBlock(block_id={self.block_id}, keys={len(self.key_ids)})"


@dataclass(frozen=True, slots=True, kw_only=True)
class CommitBlock:
    """Commit a staged block and persist the ledger state after its deposit, in one write.
    ``limbo``: resolved at session start (staged by an earlier session)."""

    block_id: int
    ledger_state: LedgerState
    limbo: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class DropBlock:
    """Drop a staged block (limbo resolution): erase its keys and pool share."""

    block_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerWasReset:
    """The ledger was reset in this session (the ledger's observer has persisted it)."""

    requested_by_peer: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockDone:
    """A block is finished: committed on both sides (``outcome`` a key) or aborted."""

    block_id: int
    outcome: BlockOutcome
    auth: BlockAuthenticated
    keys: int
    pool_bytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolExhaustedStop:
    """Alice's pool cannot pay for the next block: no block opens in this session; the node
    alerts and keeps serving stored keys. Only an operator's re-bootstrap refills the pool."""

    level_bits: int
    needed_bits: int


@dataclass(frozen=True, slots=True, kw_only=True)
class RebootstrapDone:
    """Both ledgers were reset in a bootstrap session run under an operator's re-bootstrap;
    the permit is used up."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EndSession:
    """End the session cleanly (no block in flight)."""

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Idle:
    """A stop was requested and no block is in flight."""


Effect = (
    SendControl
    | SendData
    | OpenBlock
    | CloseBlock
    | AnnounceRotation
    | TakeRecords
    | PrefetchRecords
    | StartRole
    | FeedRole
    | StageBlock
    | CommitBlock
    | DropBlock
    | LedgerWasReset
    | BlockDone
    | PoolExhaustedStop
    | RebootstrapDone
    | EndSession
    | Idle
)
