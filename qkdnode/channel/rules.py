"""The rules of one end of the classical channel: its states, its limits, and which frames it
may send and accept in each state, as data (one table per direction, like h11's ``_state.py``).

- Alice starts the handshake, opens blocks and announces rotation; Bob answers.
- Handshake: Hello (A->B), HelloReply (B->A), Finish (A->B); untagged frames, authenticated by
  the proofs over the transcript. Every later frame carries an HMAC-SHA256 tag.
- Sequence numbers start at 0 and rise by one per frame and direction; anything else is a replay,
  reorder or gap and ends the session.
- A received frame is checked completely (length, tag, sequence number, type, schema, state,
  ledger fingerprint, block tag) before anything changes: a rejected frame leaves sequence
  numbers, ledger and buffers as they were, and the connection enters ``ERROR`` (terminal).
- A block is open from Alice's BlockOpen until both sides' BlockClose are verified
  (``BlockAuthenticated``); its keys may be committed only then.
- Rotation to key-derived authentication happens between blocks: RotationAnnounce (A->B),
  RotationAck (B->A); frames after them use pool-derived keys. From then on, every session
  starts in key-derived mode while the ledger is active and can pay.
- A Close is accepted in every state short of ``CLOSED`` and ``ERROR``, and may be sent in any.

The tables say which frame types a (role, state) pair admits; the few conditions that depend on
more than the state (a block's direction already closed, rotation only between blocks and only
once) stay with the handler that owns that data.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from qkdnode.channel.auth import Role
from qkdnode.channel.framing import DEFAULT_MAX_FRAME_BYTES
from qkdnode.channel.messages import (
    MAX_CERTIFICATE_BYTES,
    MAX_CERTIFICATES,
    MAX_PROOF_BYTES,
    BlockClose,
    BlockOpen,
    Close,
    Control,
    Data,
    Finish,
    Hello,
    HelloReply,
    Message,
    Ping,
    Pong,
    RotationAck,
    RotationAnnounce,
)
from qkdnode.channel.wegman_carter import CHUNK_BYTES, forgery_bound
from qkdnode.errors import ProtocolError

# block ids are the store's signed 64-bit keys, and never the header's NO_BLOCK
MAX_BLOCK_ID: Final = 2**63 - 1
# The largest handshake frame: a HelloReply with a full certificate chain and an ML-DSA proof.
MIN_MAX_FRAME_BYTES: Final = MAX_CERTIFICATES * (MAX_CERTIFICATE_BYTES + 8) + MAX_PROOF_BYTES + 4096


@dataclass(frozen=True, slots=True, kw_only=True)
class ChannelConfig:
    """Limits and policy of one connection.

    - ``max_frame_bytes``: largest frame accepted (checked on the length prefix);
    - ``max_open_blocks``: blocks open at once (pipelining);
    - ``max_block_chunks``: longest block transcript per direction, in 16-byte chunks (the
      close record included); sets the per-tag forgery bound of the one-time Poly1305 tag,
      8 chunks / 2^106 (``wegman_carter``);
    - ``max_session_age_s`` / ``max_session_frames``: a session's keys authenticate frames for
      at most this long / this many frames per direction (refused at the limit); the node then
      opens a new session with fresh keys.
    """

    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_open_blocks: int = 4
    max_block_chunks: int = 1 << 26
    allow_key_derived: bool = True
    max_session_age_s: float = 86_400.0
    max_session_frames: int = 1 << 40

    def __post_init__(self) -> None:
        if self.max_frame_bytes < MIN_MAX_FRAME_BYTES:
            raise ValueError(f"max_frame_bytes must be >= {MIN_MAX_FRAME_BYTES} (handshake frames)")
        if self.max_open_blocks < 1 or self.max_block_chunks < 16:
            raise ValueError("limits must be positive")
        if not self.max_session_age_s > 0 or self.max_session_frames < 16:
            raise ValueError("session limits must be positive")

    @property
    def tag_forgery_bound(self) -> float:
        """Forgery bound of one block transcript tag at the longest transcript allowed."""
        return forgery_bound(CHUNK_BYTES * self.max_block_chunks)

    def check_block_open(self, block_id: int, next_block_id: int, open_blocks: int) -> None:
        """Raises unless ``block_id`` may open now: ids strictly increase, stay below the
        store's limit, and at most ``max_open_blocks`` blocks are open at once."""
        if block_id > MAX_BLOCK_ID:
            raise ProtocolError(f"block ids are at most {MAX_BLOCK_ID}", field="block_id")
        if block_id < next_block_id:
            raise ProtocolError("block ids must strictly increase", field="block_id")
        if open_blocks >= self.max_open_blocks:
            raise ProtocolError("too many open blocks", field="block_id")

    def check_session_frames(self, frames: int) -> None:
        """Raises once a direction of the session has carried ``max_session_frames`` frames."""
        if frames >= self.max_session_frames:
            raise ProtocolError(
                f"more than {self.max_session_frames} frames in one session",
                field="session_frames",
            )

    def check_session_age(self, age_s: float) -> None:
        """Raises once the session's keys are ``max_session_age_s`` old."""
        if age_s >= self.max_session_age_s:
            raise ProtocolError(
                f"session older than {self.max_session_age_s:g} s", field="session_age"
            )


class ConnectionState(enum.Enum):
    IDLE = "idle"
    SENT_HELLO = "sent_hello"
    SENT_REPLY = "sent_reply"
    ESTABLISHED = "established"
    ROTATING = "rotating"
    CLOSED = "closed"
    ERROR = "error"


_A, _B = Role.ALICE, Role.BOB
_S = ConnectionState

# accepted in every live state: the peer may end the session at any point
_ALWAYS: Final[frozenset[type[Message]]] = frozenset({Close})
# accepted while a session is authenticated; Bob's coordination (a reservation answer) and
# pings may cross Alice's rotation announce
_SESSION: Final[frozenset[type[Message]]] = frozenset({Control, Ping, Pong, Close})
# frames inside an open block, from either side
_IN_BLOCK: Final[frozenset[type[Message]]] = frozenset({Data, BlockClose})

# (this side's role, its state) -> the frame types it accepts from the peer
ACCEPTS: Final[Mapping[tuple[Role, ConnectionState], frozenset[type[Message]]]] = {
    (_A, _S.IDLE): _ALWAYS,
    (_B, _S.IDLE): _ALWAYS | {Hello},
    (_A, _S.SENT_HELLO): _ALWAYS | {HelloReply},
    (_B, _S.SENT_HELLO): _ALWAYS,
    (_A, _S.SENT_REPLY): _ALWAYS,
    (_B, _S.SENT_REPLY): _ALWAYS | {Finish},
    (_A, _S.ESTABLISHED): _SESSION | _IN_BLOCK,
    (_B, _S.ESTABLISHED): _SESSION | _IN_BLOCK | {BlockOpen, RotationAnnounce},
    (_A, _S.ROTATING): _SESSION | {RotationAck},
    (_B, _S.ROTATING): _SESSION,
}

# (this side's role, its state) -> the frame types its caller may ask it to send; the replies
# the protocol writes by itself (HelloReply, Finish, Pong, RotationAck) follow from ACCEPTS,
# and a Close may be sent in any state
SENDS: Final[Mapping[tuple[Role, ConnectionState], frozenset[type[Message]]]] = {
    (_A, _S.IDLE): frozenset({Hello}),
    (_A, _S.ESTABLISHED): frozenset({BlockOpen, Data, BlockClose, Control, Ping, RotationAnnounce}),
    (_B, _S.ESTABLISHED): frozenset({Data, BlockClose, Control, Ping}),
}


def refusal(role: Role, state: ConnectionState, message_type: type[Message]) -> ProtocolError:
    """The error for a frame from the peer that ``role`` does not accept in ``state``."""
    return ProtocolError(
        f"{message_type.__name__} is not valid in state {state.value} for {role.value}",
        field="type",
    )


def check_accepts(role: Role, state: ConnectionState, message_type: type[Message]) -> None:
    """Raises ``ProtocolError`` (field ``type``) unless ``role`` accepts the frame in ``state``."""
    if message_type not in ACCEPTS.get((role, state), frozenset()):
        raise refusal(role, state, message_type)


def check_sends(role: Role, state: ConnectionState, message_type: type[Message]) -> None:
    """Raises ``ProtocolError`` (field ``state``) unless ``role`` may send it in ``state``."""
    if message_type not in SENDS.get((role, state), frozenset()):
        raise ProtocolError(
            f"{message_type.__name__} may not be sent by {role.value} in state {state.value}",
            field="state",
        )
