"""The events a ``PeerConnection`` gives its caller from ``next_event``.

Frozen, slotted, keyword-only values; ``Data`` and ``Control`` messages are passed through as
they are. ``NEED_DATA`` is not an event: it asks for more bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from qkdnode.channel.messages import CloseReason, Control, Data, SessionMode


class NeedData:
    """The type of ``NEED_DATA``: feed more bytes before asking for the next event."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


@dataclass(frozen=True, slots=True, kw_only=True)
class HandshakeComplete:
    """The session is authenticated; ``mode`` says by what (logged and shown in status)."""

    mode: SessionMode
    session_id: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Rotated:
    """The session switched to key-derived authentication; blocks from ``next_block_id`` on."""

    mode: SessionMode
    next_block_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockOpened:
    block_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockAuthenticated:
    """Both directions of the block verified: its keys may now be committed.

    ``ledger_mark_bits`` is the mark to pass to ``AuthKeyLedger.deposit`` for this block's key.
    """

    block_id: int
    mode: SessionMode
    ledger_mark_bits: int
    auth_bits_spent: int
    frames_sent: int
    frames_received: int
    forgery_bound_total: float


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolExhausted:
    """The pool cannot pay for the next block: no block opens until an operator acts."""

    level_bits: int
    needed_bits: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PongReceived:
    nonce: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerClosed:
    reason: CloseReason
    detail: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionLost:
    """The byte stream ended cleanly between frames without a Close."""


Event = (
    HandshakeComplete
    | Rotated
    | BlockOpened
    | Data
    | Control
    | BlockAuthenticated
    | PoolExhausted
    | PongReceived
    | PeerClosed
    | ConnectionLost
)
