"""The relay machine's inputs and effects, the record it stores, and what it reads (typed, frozen).

Inputs come from the shell (``RelayRequested``, ``RetransmitDue``, ``AbortRequested``) and from
the neighbours (``PeerMessage``, naming the link it arrived on). Effects are what the shell
must do, in order: one store transaction per ``SaveRelay`` (the record, its pad ranges, the
key's deliverability), a message per ``SendRelay``, and reports. A ``SaveRelay`` always comes
before the ``SendRelay`` that announces it: the shell must not reorder them.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from typing import Protocol

from qkdnode.errors import ProtocolError
from qkdnode.relay.messages import (
    MAX_SAE_ID_CHARS,
    Forward,
    RelayMessage,
    check_key_bits,
    check_node_name,
    check_route,
    payload_bits,
)


class Position(enum.Enum):
    """A node's place on a relay's route."""

    ORIGIN = "origin"  # first: draws the key, decides
    MIDDLE = "middle"  # decrypts and encrypts again (learns the key)
    TERMINAL = "terminal"  # last: serves the slave SAE


class RelayState(enum.Enum):
    PENDING = "pending"  # origin/middle: Forward stored and sent, awaiting what comes back
    PREPARED = "prepared"  # terminal: key held (not deliverable), Prepared sent
    COMMITTING = "committing"  # origin/middle: decision commit stored and passed downstream
    ABORTING = "aborting"  # origin/middle: decision abort stored and passed downstream
    COMMITTED = "committed"  # finished
    ABORTED = "aborted"  # finished

    @property
    def finished(self) -> bool:
        return self in (RelayState.COMMITTED, RelayState.ABORTED)


class Direction(enum.Enum):
    """A pad stream of a link, seen from this node."""

    OUT = "out"  # this node allocates it, for Forwards it sends to the neighbour
    IN = "in"  # the neighbour allocates it, for Forwards it sends here


@dataclass(frozen=True, slots=True, kw_only=True)
class PadRange:
    """Pad bits ``[offset_bits, offset_bits + bits)`` of the stream to or from ``peer``."""

    peer: str
    direction: Direction
    offset_bits: int
    bits: int

    @property
    def end_bits(self) -> int:
        return self.offset_bits + self.bits


@dataclass(frozen=True, slots=True, kw_only=True)
class PadSpend:
    """A pad range taken in a ``SaveRelay``: allocated (``OUT``: the stream's cursor moves to its
    end) or used (``IN``); ``used`` False when refused without being read. Either way its bits
    are erased and never read or allocated again."""

    range: PadRange
    used: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayRecord:
    """What a node stores of one relay (see docs/relay.md for what each state holds).

    ``key``: the relayed key at the origin (until an abort) and at the terminal (from
    ``prepared`` until an abort); empty elsewhere and once erased. ``tag``: the expected tag at
    the origin, the computed one at the terminal. ``in_digest``: SHA-256 of the incoming
    ciphertext, to recognise a duplicate ``Forward``. ``forward_out``: the ``Forward`` sent
    downstream, resent as stored."""

    key_id: uuid.UUID
    route: tuple[str, ...]
    position: Position
    master_sae_id: str
    slave_sae_id: str
    key_bits: int
    state: RelayState
    key: bytes = b""
    tag: bytes = b""
    pad_in: PadRange | None = None
    in_digest: bytes = b""
    pad_out: PadRange | None = None
    forward_out: Forward | None = None
    reason: str = ""

    @property
    def deliverable(self) -> bool:
        """The key may be handed out here: the origin once it decided commit, the terminal once
        it stored the commit."""
        if self.position is Position.ORIGIN:
            return self.state in (RelayState.COMMITTING, RelayState.COMMITTED)
        if self.position is Position.TERMINAL:
            return self.state is RelayState.COMMITTED
        return False

    @property
    def payload_bits(self) -> int:
        return payload_bits(self.key_bits)

    def __repr__(self) -> str:
        return (
            f"RelayRecord(key_id={self.key_id}, route={'/'.join(self.route)}, "
            f"position={self.position.value}, state={self.state.value}, "
            f"key_bits={self.key_bits}, holds_key={bool(self.key)})"
        )


# ---- what the machine reads --------------------------------------------------------------------


class RelayStoreView(Protocol):
    """The node's relay records as the machine reads them (writes are ``SaveRelay`` effects)."""

    def relay(self, key_id: uuid.UUID) -> RelayRecord | None: ...
    def unfinished_relays(self) -> list[RelayRecord]: ...


class PadView(Protocol):
    """The node's pad streams as the machine reads them.

    ``available_bits``: the stream holds bits ``[0, available_bits)`` so far (both ends of a
    link fill it from the link's QKD key; one end may be ahead). ``next_offset_bits``: the
    first bit of the outgoing stream not yet allocated. ``spent_overlaps``: some bit of the
    range was already used, refused or allocated. ``pad`` returns unspent bits (whole bytes)."""

    def available_bits(self, peer: str, direction: Direction) -> int: ...
    def next_offset_bits(self, peer: str) -> int: ...
    def spent_overlaps(self, span: PadRange) -> bool: ...
    def pad(self, span: PadRange) -> bytes: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayConfig:
    """``node``: this node's name on routes; ``neighbours``: the nodes it shares a link with;
    ``local_sae_ids``: the SAEs it serves (a relay to another SAE is refused here)."""

    node: str
    neighbours: frozenset[str]
    local_sae_ids: frozenset[str]

    def __post_init__(self) -> None:
        try:
            check_node_name(self.node, "node")
            for name in self.neighbours:
                check_node_name(name, "neighbours")
        except ProtocolError as exc:
            raise ValueError(str(exc)) from None
        if self.node in self.neighbours:
            raise ValueError("a node is not its own neighbour")
        for sae in self.local_sae_ids:
            if not 1 <= len(sae) <= MAX_SAE_ID_CHARS:
                raise ValueError(f"an SAE ID is 1..{MAX_SAE_ID_CHARS} characters")


# ---- inputs ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayRequested:
    """Origin: relay a fresh key of ``key_bits`` along ``route`` (this node first) for the
    master SAE here and the slave SAE at the route's end."""

    route: tuple[str, ...]
    master_sae_id: str
    slave_sae_id: str
    key_bits: int

    def __post_init__(self) -> None:
        try:
            check_route(self.route)
            check_key_bits(self.key_bits)
        except ProtocolError as exc:
            raise ValueError(str(exc)) from None
        for sae in (self.master_sae_id, self.slave_sae_id):
            if not 1 <= len(sae) <= MAX_SAE_ID_CHARS or not sae.isprintable():
                raise ValueError(f"an SAE ID is 1..{MAX_SAE_ID_CHARS} printable characters")


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerMessage:
    """A relay message that arrived, authenticated, on the link to ``peer``."""

    peer: str
    message: RelayMessage


@dataclass(frozen=True, slots=True, kw_only=True)
class RetransmitDue:
    """The shell's retransmission timer fired, or the node (re)started: resend what every
    unfinished relay owes."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AbortRequested:
    """Origin: give up relay ``key_id`` (ignored once the origin decided, or when unknown)."""

    key_id: uuid.UUID


Input = RelayRequested | PeerMessage | RetransmitDue | AbortRequested


# ---- effects -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SaveRelay:
    """One store transaction: write ``record`` (replacing the stored one), take ``spends``, and
    make the key deliverable when the record first becomes ``deliverable`` (erase it when the
    record no longer holds it)."""

    record: RelayRecord
    spends: tuple[PadSpend, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class SendRelay:
    """Send ``message`` to ``peer`` over that link's authenticated channel."""

    peer: str
    message: RelayMessage


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayStarted:
    """Origin: the relay is stored and its first ``Forward`` sent."""

    key_id: uuid.UUID
    route: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayRefused:
    """Origin: the request was not started (nothing stored, no pad spent)."""

    route: tuple[str, ...]
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayFinished:
    """The relay is finished at this node."""

    key_id: uuid.UUID
    position: Position
    committed: bool
    reason: str


Effect = SaveRelay | SendRelay | RelayStarted | RelayRefused | RelayFinished
