"""``PeerConnection``: the sans-IO state machine of one end of the classical channel.

Bytes in (``receive_data``), events out (``next_event``), bytes out (the ``open_block`` /
``send_data`` / ... methods return the frames to write; ``data_to_send`` drains frames the
protocol produced by itself: handshake replies, pongs, rotation acks). No I/O, no clock (``now_s``
comes in), no global randomness (``random_bytes`` is injected).

Rules of the state machine (h11 style, role-agnostic where it can be):

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
"""

from __future__ import annotations

import collections
import enum
import hmac
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Final

import msgpack

from qkdnode.channel.auth import (
    BLOCK_DRAW_BITS,
    BLOCK_DRAWS,
    HANDSHAKE_KEY_BITS,
    ROTATION_KEY_BITS,
    TAG_BYTES,
    BlockTranscript,
    CertificateCredentials,
    Credentials,
    FrameMac,
    HybridEphemeral,
    PskCredentials,
    Role,
    derive_rotation_keys,
    derive_session_keys,
    hmac_proof,
    mlkem_encapsulate,
    proof_input,
    transcript_hash,
    verify_hmac_proof,
)
from qkdnode.channel.framing import (
    DEFAULT_MAX_FRAME_BYTES,
    NO_BLOCK,
    FrameReader,
    RawFrame,
    pack_frame,
    pack_header,
)
from qkdnode.channel.ledger import AuthKeyLedger
from qkdnode.channel.messages import (
    DIGEST_BYTES,
    MAX_CERTIFICATE_BYTES,
    MAX_CERTIFICATES,
    MAX_PROOF_BYTES,
    PROTOCOL_VERSION,
    BlockClose,
    BlockOpen,
    Close,
    CloseReason,
    Control,
    Data,
    Finish,
    Hello,
    HelloReply,
    KindRegistry,
    Message,
    Ping,
    Pong,
    RotationAck,
    RotationAnnounce,
    SessionMode,
    decode_payload,
    encode_payload,
    message_type,
)
from qkdnode.channel.pki import certificate_der, sign, verify_peer_chain, verify_signature
from qkdnode.channel.polyhash import BLOCK_BYTES, forgery_bound
from qkdnode.errors import AuthenticationFailed, AuthKeyExhausted, ProtocolError, QkdError

_ZERO_DIGEST: Final = bytes(DIGEST_BYTES)
# block ids are the store's signed 64-bit keys, and never the header's NO_BLOCK
MAX_BLOCK_ID: Final = 2**63 - 1
# The largest handshake frame: a HelloReply with a full certificate chain and an ML-DSA proof.
MIN_MAX_FRAME_BYTES: Final = MAX_CERTIFICATES * (MAX_CERTIFICATE_BYTES + 8) + MAX_PROOF_BYTES + 4096


@dataclass(frozen=True, slots=True, kw_only=True)
class ChannelConfig:
    """Limits and policy of one connection.

    - ``max_frame_bytes``: largest frame accepted (checked on the length prefix);
    - ``max_open_blocks``: blocks open at once (pipelining);
    - ``max_block_chunks``: longest block transcript per direction, in 16-byte chunks; sets the
      per-tag forgery bound (chunks + 1) / 2^128;
    - ``max_resync_bits``: how far a key-derived handshake may move a ledger forward to meet
      the peer's offset (left behind by a session that died mid-block);
    - ``max_session_age_s`` / ``max_session_frames``: a session's keys authenticate frames for
      at most this long / this many frames per direction (refused at the limit); the node then
      opens a new session with fresh keys.
    """

    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_open_blocks: int = 4
    max_block_chunks: int = 1 << 26
    max_resync_bits: int = 8 * BLOCK_DRAW_BITS + HANDSHAKE_KEY_BITS + ROTATION_KEY_BITS
    allow_key_derived: bool = True
    max_session_age_s: float = 86_400.0
    max_session_frames: int = 1 << 40

    def __post_init__(self) -> None:
        if self.max_frame_bytes < MIN_MAX_FRAME_BYTES:
            raise ValueError(f"max_frame_bytes must be >= {MIN_MAX_FRAME_BYTES} (handshake frames)")
        if self.max_open_blocks < 1 or self.max_block_chunks < 16 or self.max_resync_bits < 0:
            raise ValueError("limits must be positive")
        if not self.max_session_age_s > 0 or self.max_session_frames < 16:
            raise ValueError("session limits must be positive")

    @property
    def tag_forgery_bound(self) -> float:
        return forgery_bound(self.max_block_chunks)


class ConnectionState(enum.Enum):
    IDLE = "idle"
    SENT_HELLO = "sent_hello"
    SENT_REPLY = "sent_reply"
    ESTABLISHED = "established"
    ROTATING = "rotating"
    CLOSED = "closed"
    ERROR = "error"


# ---- events ---------------------------------------------------------------------------------


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


# ---- internal state -------------------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class _Block:
    block_id: int
    send_mac: FrameMac
    recv_mac: FrameMac
    send_transcript: BlockTranscript
    recv_transcript: BlockTranscript
    fingerprint: bytes
    mark_bits: int
    spent_bits: int
    frames_sent: int = 0
    frames_received: int = 0
    sent_close: bool = False
    received_close: bool = False


@dataclass(slots=True, kw_only=True)
class _Handshake:
    mode: SessionMode
    ephemeral: HybridEphemeral
    hello_payload: bytes = b""
    reply_fields: bytes = b""
    reply_proof: bytes = b""
    x25519_shared: bytes = b""
    mlkem_shared: bytes = b""
    pool_key: bytes = b""
    ledger_offset_bits: int = 0
    handshake_index: int = 0
    peer_tags: int = 0
    peer_forgery_bound: float = 0.0

    def __repr__(self) -> str:
        return f"_Handshake(mode={self.mode.value})"


def _fields_without_proof(message: HelloReply | Finish) -> bytes:
    values = {
        f.name: (list(v) if isinstance(v := getattr(message, f.name), tuple) else v)
        for f in fields(message)
        if f.name != "proof"
    }
    packed: bytes = msgpack.packb(values, use_bin_type=True)
    return packed


class PeerConnection:
    """One end of the authenticated classical channel (see the module docstring for the rules)."""

    def __init__(
        self,
        role: Role,
        *,
        credentials: Credentials,
        registry: KindRegistry,
        ledger: AuthKeyLedger | None = None,
        config: ChannelConfig | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
        force_bootstrap: bool = False,
        staged_ledger: AuthKeyLedger | None = None,
        admit_key_derived: Callable[[], bool] | None = None,
    ) -> None:
        """``force_bootstrap``: an operator re-bootstrap is in force on this node: Alice sends a
        bootstrap Hello although her ledger is active, Bob accepts one although his is.
        ``staged_ledger``: a copy of the ledger with this node's staged blocks deposited (None:
        nothing staged); its digest is sent, and Bob takes a handshake key from it when his
        committed ledger holds none (the peer committed those blocks, he has not yet).
        ``admit_key_derived``: Bob's rate limit on key-derived
        Hellos (each uses up a handshake key); refused attempts get no proof."""
        self.role = role
        self._credentials = credentials
        self._registry = registry
        self.ledger = ledger
        self.config = config if config is not None else ChannelConfig()
        self._random_bytes = random_bytes
        self._force_bootstrap = force_bootstrap
        self._staged = staged_ledger
        self._admit = admit_key_derived
        # before the session is authenticated, frames are no larger than a handshake needs
        self._reader = FrameReader(
            max_frame_bytes=min(self.config.max_frame_bytes, MIN_MAX_FRAME_BYTES),
            max_feed_bytes=min(1 << 20, MIN_MAX_FRAME_BYTES),
        )
        self._state = ConnectionState.IDLE
        self._mode: SessionMode | None = None
        self._session_id = b""
        self._send_seq = 0
        self._recv_seq = 0
        self._send_key = b""
        self._recv_key = b""
        self._send_control: FrameMac | None = None
        self._recv_control: FrameMac | None = None
        self._handshake: _Handshake | None = None
        self._blocks: dict[int, _Block] = {}
        self._next_block_id = 0
        self._events: collections.deque[Event] = collections.deque()
        self._outbox = bytearray()
        self._eof = False
        self._established_s: float | None = None

    def __repr__(self) -> str:
        mode = self._mode.value if self._mode else None
        return (
            f"PeerConnection(role={self.role.value}, state={self._state.value}, mode={mode}, "
            f"send_seq={self._send_seq}, recv_seq={self._recv_seq})"
        )

    # ---- public views ---------------------------------------------------------------------
    @property
    def state(self) -> ConnectionState:
        return self._state

    @property
    def mode(self) -> SessionMode | None:
        """What authenticates the session now (``None`` before the handshake completes)."""
        return self._mode

    @property
    def session_id(self) -> bytes:
        return self._session_id

    @property
    def send_seq(self) -> int:
        return self._send_seq

    @property
    def recv_seq(self) -> int:
        return self._recv_seq

    @property
    def open_blocks(self) -> tuple[int, ...]:
        return tuple(self._blocks)

    @property
    def bootstrap_mode(self) -> SessionMode:
        if isinstance(self._credentials, CertificateCredentials):
            return SessionMode.CERTIFICATE
        return SessionMode.PSK

    @property
    def block_cost_bits(self) -> int:
        """Pool bits one key-derived block draws (both directions' MAC, hash and pad keys)."""
        return BLOCK_DRAW_BITS

    # ---- input ----------------------------------------------------------------------------
    def receive_data(self, data: bytes | bytearray) -> None:
        """Feed bytes from the peer; ``b""`` means the stream ended."""
        if self._state is ConnectionState.ERROR:
            raise ProtocolError("connection has failed", field="state")
        if not data:
            self._eof = True
            return
        if self._eof:
            raise ProtocolError("data after end of stream", field="stream")
        self._reader.feed(data)

    def next_event(self, *, now_s: float) -> Event | NeedData:
        """The next event, or ``NEED_DATA``. Raises (and enters ``ERROR``) on a bad frame."""
        if self._events:
            return self._events.popleft()
        if self._state is ConnectionState.ERROR:
            raise ProtocolError("connection has failed", field="state")
        while self._state is not ConnectionState.CLOSED:
            try:
                frame = self._reader.peek(self._recv_tag_bytes())
                if frame is None:
                    if not self._eof:
                        return NEED_DATA
                    if self._reader.buffered_bytes:
                        raise ProtocolError("stream ended inside a frame", field="length")
                    self._state = ConnectionState.CLOSED
                    return ConnectionLost()
                event = self._receive_frame(frame, now_s)
            except QkdError:
                self._state = ConnectionState.ERROR
                raise
            self._reader.consume(frame)
            if event is not None:
                return event
            if self._events:
                return self._events.popleft()
        return NEED_DATA

    def data_to_send(self) -> bytes:
        """Frames the protocol produced by itself since the last call."""
        out = bytes(self._outbox)
        self._outbox.clear()
        return out

    # ---- output ---------------------------------------------------------------------------
    def start_handshake(self) -> bytes:
        """Alice: the Hello frame; key-derived mode when the ledger is active and can pay."""
        self._require(self.role is Role.ALICE, "only Alice starts the handshake")
        self._require_state(ConnectionState.IDLE)
        ledger = self.ledger
        mode = self.bootstrap_mode
        if ledger is not None and ledger.active and not self._force_bootstrap:
            mode = SessionMode.KEY_DERIVED  # the bootstrap window is closed: key-derived only
        ephemeral = HybridEphemeral(self._random_bytes)
        hello = Hello(
            protocol_version=PROTOCOL_VERSION,
            mode=mode.value,
            nonce=self._random_bytes(32),
            x25519_public=ephemeral.x25519_public,
            mlkem_public=ephemeral.new_mlkem(self._random_bytes),
            **self._ledger_fields(mode),  # type: ignore[arg-type]
        )
        payload = encode_payload(hello, self._registry)
        self._handshake = _Handshake(mode=mode, ephemeral=ephemeral, hello_payload=payload)
        self._state = ConnectionState.SENT_HELLO
        return self._emit_payload(Hello.CODE, payload, NO_BLOCK, None)

    def open_block(self, block_id: int) -> bytes:
        """Alice: open block ``block_id`` (ids strictly increase).

        In key-derived mode, if the pool cannot pay for the block, raises ``AuthKeyExhausted``
        and queues a ``PoolExhausted`` event.
        """
        self._require(self.role is Role.ALICE, "only Alice opens blocks")
        self._require_state(ConnectionState.ESTABLISHED)
        self._check_open(block_id)
        if self._mode is SessionMode.KEY_DERIVED:
            assert self.ledger is not None
            if not self.ledger.can_pay(BLOCK_DRAW_BITS):
                self._events.append(
                    PoolExhausted(
                        level_bits=self.ledger.level_bits,
                        needed_bits=BLOCK_DRAW_BITS,
                    )
                )
                raise AuthKeyExhausted(
                    f"pool level {self.ledger.level_bits} bits cannot pay for a block "
                    f"({BLOCK_DRAW_BITS} bits) above the reserve"
                )
        frame = self._emit(BlockOpen(block_id=block_id), NO_BLOCK, self._send_control)
        self._create_block(block_id)
        return frame

    def send_data(
        self, block_id: int, kind: str, body: Mapping[str, int | float | bool | bytes]
    ) -> bytes:
        """A Data frame of an open block (checked against the kind's schema first)."""
        self._require_state(ConnectionState.ESTABLISHED)
        block = self._blocks.get(block_id)
        if block is None or block.sent_close:
            raise ProtocolError("block is not open for sending", field="block_id")
        message = Data(block_id=block_id, kind=kind, body=body)
        payload = encode_payload(message, self._registry)
        header = pack_header(Data.CODE, self._send_seq, block_id)
        self._check_transcript_room(block.send_transcript, len(header) + len(payload))
        block.send_transcript.absorb(header + payload)
        block.frames_sent += 1
        return self._emit_payload(Data.CODE, payload, block_id, block.send_mac, header=header)

    def send_control(self, kind: str, body: Mapping[str, int | float | bool | bytes]) -> bytes:
        """A Control frame outside any block (checked against the kind's schema first)."""
        self._require_state(ConnectionState.ESTABLISHED)
        message = Control(kind=kind, body=body)
        return self._emit(message, NO_BLOCK, self._send_control)

    def close_block(self, block_id: int) -> bytes:
        """This side is done sending for the block: its transcript tag and ledger fingerprint."""
        self._require_state(ConnectionState.ESTABLISHED)
        block = self._blocks.get(block_id)
        if block is None or block.sent_close:
            raise ProtocolError("block is not open for sending", field="block_id")
        final = self._final_record(block_id, block.frames_sent, block.fingerprint)
        tag = self._finish(block, final)
        message = BlockClose(
            block_id=block_id,
            frames=block.frames_sent,
            transcript_tag=tag,
            ledger_fingerprint=block.fingerprint,
        )
        frame = self._emit(message, block_id, block.send_mac)
        block.sent_close = True
        if block.received_close:
            self._finalize(block)
        return frame

    def announce_rotation(self) -> bytes:
        """Alice, between blocks: switch to key-derived authentication (needs an acked reply)."""
        self._require(self.role is Role.ALICE, "only Alice announces rotation")
        self._require_state(ConnectionState.ESTABLISHED)
        self._require(self._mode is not SessionMode.KEY_DERIVED, "already key-derived")
        self._require(not self._blocks, "rotation happens between blocks")
        ledger = self.ledger
        if ledger is None or not ledger.can_pay(ROTATION_KEY_BITS + BLOCK_DRAW_BITS):
            raise AuthKeyExhausted("the pool cannot pay for rotation and a first block")
        message = RotationAnnounce(
            next_block_id=self._next_block_id, ledger_fingerprint=ledger.fingerprint()
        )
        # the bootstrap window closes here, durably, before the peer can act on the announce:
        # from now on this node opens only key-derived sessions
        ledger.set_active(True)
        frame = self._emit(message, NO_BLOCK, self._send_control)
        self._state = ConnectionState.ROTATING
        return frame

    def ping(self, nonce: int) -> bytes:
        self._require_state(ConnectionState.ESTABLISHED)
        return self._emit(Ping(nonce=nonce), NO_BLOCK, self._send_control)

    def close(self, reason: CloseReason = CloseReason.NORMAL, detail: str = "") -> bytes:
        """A Close frame (tagged once keys exist); usable after an error to tell the peer why."""
        if self._state is ConnectionState.CLOSED:
            return b""
        message = Close(reason=reason.value, detail=detail[:200])
        frame = self._emit(message, NO_BLOCK, self._send_control)
        self._state = ConnectionState.CLOSED
        return frame

    # ---- frame output helpers -------------------------------------------------------------
    def _emit(self, message: Message, block: int, mac: FrameMac | None) -> bytes:
        payload = encode_payload(message, self._registry)
        return self._emit_payload(type(message).CODE, payload, block, mac)

    def _emit_payload(
        self,
        code: int,
        payload: bytes,
        block: int,
        mac: FrameMac | None,
        *,
        header: bytes | None = None,
    ) -> bytes:
        if self._send_seq >= self.config.max_session_frames:
            raise ProtocolError(
                f"more than {self.config.max_session_frames} frames in one session",
                field="session_frames",
            )
        if header is None:
            header = pack_header(code, self._send_seq, block)
        tag = mac.tag(header, payload) if mac is not None else b""
        self._send_seq += 1
        return pack_frame(header, payload, tag)

    def _ledger_fields(self, mode: SessionMode) -> dict[str, int | float | bytes]:
        """The public ledger state sent in the handshake (no key bits)."""
        ledger = self.ledger
        if mode is not SessionMode.KEY_DERIVED or ledger is None:
            return {
                "ledger_consumed_bits": 0,
                "ledger_tags": 0,
                "ledger_forgery_bound": 0.0,
                "ledger_deposit_digest": _ZERO_DIGEST,
                "ledger_staged_digest": _ZERO_DIGEST,
                "ledger_handshake_index": 0,
            }
        return {
            "ledger_consumed_bits": ledger.consumed_bits,
            "ledger_tags": ledger.tags_issued,
            "ledger_forgery_bound": ledger.forgery_bound,
            "ledger_deposit_digest": ledger.state.deposit_digest,
            "ledger_staged_digest": (self._staged or ledger).state.deposit_digest,
            "ledger_handshake_index": ledger.handshake_first,
        }

    # ---- frame input ----------------------------------------------------------------------
    def _recv_tag_bytes(self) -> int:
        return TAG_BYTES if self._recv_control is not None else 0

    def _receive_frame(self, frame: RawFrame, now_s: float) -> Event | None:
        # 0. session limits: old keys and long sessions are retired, not trusted forever
        established = self._established_s
        if established is not None and now_s - established >= self.config.max_session_age_s:
            raise ProtocolError(
                f"session older than {self.config.max_session_age_s:g} s", field="session_age"
            )
        if self._recv_seq >= self.config.max_session_frames:
            raise ProtocolError(
                f"more than {self.config.max_session_frames} frames in one session",
                field="session_frames",
            )
        # 1. the tag, under the key the header names (a forged header fails here)
        if frame.block == NO_BLOCK:
            mac = self._recv_control
        else:
            block = self._blocks.get(frame.block)
            if block is None:
                raise ProtocolError("frame for a block that is not open", field="block")
            mac = block.recv_mac
        if mac is not None:
            mac.verify(frame.header, frame.payload, frame.tag)
        # 2. ordering: exactly the next sequence number
        if frame.seq != self._recv_seq:
            raise ProtocolError(
                f"sequence number {frame.seq}, expected {self._recv_seq} "
                "(replayed, reordered or missing frame)",
                field="seq",
            )
        # 3. type and schema
        cls = message_type(frame.code)
        message = decode_payload(cls, frame.payload, self._registry)
        block_id = getattr(message, "block_id", None) if cls in (Data, BlockClose) else None
        expected_block = NO_BLOCK if block_id is None else block_id
        if frame.block != expected_block:
            raise ProtocolError("header block does not match the message", field="block")
        # 4. state and semantics; handlers check everything before they change anything
        handler = self._handlers[cls]
        return handler(self, message, frame, now_s)

    def _advance_recv(self) -> None:
        self._recv_seq += 1

    def _on_hello(self, message: Message, frame: RawFrame, now_s: float) -> Event | None:
        assert isinstance(message, Hello)
        self._require_peer(self.role is Role.BOB and self._state is ConnectionState.IDLE, message)
        mode = SessionMode(message.mode)
        ephemeral = HybridEphemeral(self._random_bytes)
        handshake = _Handshake(mode=mode, ephemeral=ephemeral, hello_payload=frame.payload)
        if mode is SessionMode.KEY_DERIVED:
            self._check_peer_ledger(handshake, message)
        elif mode is not self.bootstrap_mode:
            raise ProtocolError(f"mode {mode.value} is not configured here", field="mode")
        elif self.ledger is not None and self.ledger.active and not self._force_bootstrap:
            raise ProtocolError(
                "the bootstrap window is closed for this peer: only key-derived sessions, "
                "re-bootstrap needs an operator on both nodes (qkdnode auth rebootstrap)",
                field="mode",
            )
        x_shared = ephemeral.x25519_shared(message.x25519_public)
        k_shared, ciphertext = mlkem_encapsulate(message.mlkem_public)
        chain = self._own_chain(mode)
        if mode is SessionMode.KEY_DERIVED:
            # every checked key-derived Hello uses up one fresh slot, before any proof leaves
            self._take_responder_key(handshake)
        fields_out = self._ledger_fields(mode)
        if mode is SessionMode.KEY_DERIVED:
            fields_out["ledger_handshake_index"] = handshake.handshake_index
        unsigned = HelloReply(
            nonce=self._random_bytes(32),
            x25519_public=ephemeral.x25519_public,
            mlkem_ciphertext=ciphertext,
            **fields_out,  # type: ignore[arg-type]
            certificate_chain=chain,
            proof=bytes(32),
        )
        reply_fields = _fields_without_proof(unsigned)
        th1 = transcript_hash(frame.payload, reply_fields)
        proof = self._make_proof(handshake, th1)
        reply = replace(unsigned, proof=proof)
        # all checks passed: commit
        handshake.reply_fields = reply_fields
        handshake.reply_proof = proof
        handshake.x25519_shared = x_shared
        handshake.mlkem_shared = k_shared
        self._handshake = handshake
        self._advance_recv()
        self._state = ConnectionState.SENT_REPLY
        self._outbox += self._emit(reply, NO_BLOCK, None)
        return None

    def _on_hello_reply(self, message: Message, frame: RawFrame, now_s: float) -> Event | None:
        assert isinstance(message, HelloReply)
        self._require_peer(
            self.role is Role.ALICE and self._state is ConnectionState.SENT_HELLO, message
        )
        handshake = self._handshake
        assert handshake is not None
        reply_fields = _fields_without_proof(message)
        th1 = transcript_hash(handshake.hello_payload, reply_fields)
        if handshake.mode is SessionMode.KEY_DERIVED:
            self._check_peer_ledger(handshake, message)
            self._take_initiator_key(handshake, message.ledger_handshake_index)
        self._verify_proof(handshake, message.certificate_chain, message.proof, th1, now_s)
        x_shared = handshake.ephemeral.x25519_shared(message.x25519_public)
        k_shared = handshake.ephemeral.mlkem_decapsulate(message.mlkem_ciphertext)
        handshake.reply_fields = reply_fields
        handshake.reply_proof = message.proof
        chain = self._own_chain(handshake.mode)
        th2 = self._finish_transcript(handshake, chain)
        finish = Finish(certificate_chain=chain, proof=self._make_proof(handshake, th2))
        handshake.x25519_shared = x_shared
        handshake.mlkem_shared = k_shared
        self._advance_recv()
        self._outbox += self._emit(finish, NO_BLOCK, None)
        return self._complete_handshake(handshake, th2, finish.proof, now_s)

    def _on_finish(self, message: Message, frame: RawFrame, now_s: float) -> Event | None:
        assert isinstance(message, Finish)
        self._require_peer(
            self.role is Role.BOB and self._state is ConnectionState.SENT_REPLY, message
        )
        handshake = self._handshake
        assert handshake is not None
        th2 = self._finish_transcript(handshake, message.certificate_chain)
        self._verify_proof(handshake, message.certificate_chain, message.proof, th2, now_s)
        self._advance_recv()
        return self._complete_handshake(handshake, th2, message.proof, now_s)

    def _on_block_open(self, message: Message, frame: RawFrame, now_s: float) -> Event | None:
        assert isinstance(message, BlockOpen)
        self._require_peer(
            self.role is Role.BOB and self._state is ConnectionState.ESTABLISHED, message
        )
        self._check_open(message.block_id)
        if self._mode is SessionMode.KEY_DERIVED:
            assert self.ledger is not None
            if not self.ledger.can_pay(BLOCK_DRAW_BITS):
                raise AuthKeyExhausted("the peer opened a block the pool cannot pay for")
        self._advance_recv()
        self._create_block(message.block_id)
        return BlockOpened(block_id=message.block_id)

    def _on_data(self, message: Message, frame: RawFrame, now_s: float) -> Event | None:
        assert isinstance(message, Data)
        block = self._blocks[frame.block]
        self._require_peer(
            not block.received_close and self._state is ConnectionState.ESTABLISHED, message
        )
        self._check_transcript_room(block.recv_transcript, len(frame.header) + len(frame.payload))
        self._advance_recv()
        block.recv_transcript.absorb(frame.header + frame.payload)
        block.frames_received += 1
        return message

    def _on_block_close(self, message: Message, frame: RawFrame, now_s: float) -> Event | None:
        assert isinstance(message, BlockClose)
        block = self._blocks[frame.block]
        self._require_peer(
            not block.received_close and self._state is ConnectionState.ESTABLISHED, message
        )
        if message.frames != block.frames_received:
            raise ProtocolError("frame count differs from frames received", field="frames")
        if not hmac.compare_digest(message.ledger_fingerprint, block.fingerprint):
            raise AuthenticationFailed("authentication-key ledgers differ between the peers")
        final = self._final_record(block.block_id, message.frames, message.ledger_fingerprint)
        expected = block.recv_transcript.peek_tag(final)
        if not hmac.compare_digest(expected, message.transcript_tag):
            raise AuthenticationFailed("block transcript tag does not verify")
        self._advance_recv()
        block.received_close = True
        if block.sent_close:
            self._finalize(block)
        return None

    def _on_rotation_announce(
        self, message: Message, frame: RawFrame, now_s: float
    ) -> Event | None:
        assert isinstance(message, RotationAnnounce)
        self._require_peer(
            self.role is Role.BOB
            and self._state is ConnectionState.ESTABLISHED
            and self._mode is not SessionMode.KEY_DERIVED
            and not self._blocks,
            message,
        )
        ledger = self.ledger
        if ledger is None or not self.config.allow_key_derived:
            raise ProtocolError("key-derived authentication is not configured", field="type")
        if not hmac.compare_digest(message.ledger_fingerprint, ledger.fingerprint()):
            raise AuthenticationFailed("authentication-key ledgers differ between the peers")
        if message.next_block_id < self._next_block_id:
            raise ProtocolError("block ids must increase", field="next_block_id")
        if not ledger.can_pay(ROTATION_KEY_BITS + BLOCK_DRAW_BITS):
            raise AuthKeyExhausted("the pool cannot pay for rotation and a first block")
        self._advance_recv()
        self._outbox += self._emit(
            RotationAck(next_block_id=message.next_block_id), NO_BLOCK, self._send_control
        )
        return self._rotate(message.next_block_id)

    def _on_rotation_ack(self, message: Message, frame: RawFrame, now_s: float) -> Event | None:
        assert isinstance(message, RotationAck)
        self._require_peer(
            self.role is Role.ALICE and self._state is ConnectionState.ROTATING, message
        )
        if message.next_block_id != self._next_block_id:
            raise ProtocolError("acknowledges another rotation point", field="next_block_id")
        self._advance_recv()
        return self._rotate(message.next_block_id)

    def _on_control(self, message: Message, frame: RawFrame, now_s: float) -> Event | None:
        assert isinstance(message, Control)
        # Bob's coordination (a reservation answer) may cross Alice's rotation announce
        self._require_peer(
            self._state in (ConnectionState.ESTABLISHED, ConnectionState.ROTATING), message
        )
        self._advance_recv()
        return message

    def _on_ping(self, message: Message, frame: RawFrame, now_s: float) -> Event | None:
        assert isinstance(message, Ping)
        self._require_peer(
            self._state in (ConnectionState.ESTABLISHED, ConnectionState.ROTATING), message
        )
        self._advance_recv()
        if self._state is ConnectionState.ESTABLISHED:
            self._outbox += self._emit(Pong(nonce=message.nonce), NO_BLOCK, self._send_control)
        return None

    def _on_pong(self, message: Message, frame: RawFrame, now_s: float) -> Event | None:
        assert isinstance(message, Pong)
        self._require_peer(
            self._state in (ConnectionState.ESTABLISHED, ConnectionState.ROTATING), message
        )
        self._advance_recv()
        return PongReceived(nonce=message.nonce)

    def _on_close(self, message: Message, frame: RawFrame, now_s: float) -> Event | None:
        assert isinstance(message, Close)
        self._advance_recv()
        self._state = ConnectionState.CLOSED
        return PeerClosed(reason=CloseReason(message.reason), detail=message.detail)

    _handlers: Final[dict[type, Callable[..., Event | None]]] = {
        Hello: _on_hello,
        HelloReply: _on_hello_reply,
        Finish: _on_finish,
        BlockOpen: _on_block_open,
        Data: _on_data,
        Control: _on_control,
        BlockClose: _on_block_close,
        RotationAnnounce: _on_rotation_announce,
        RotationAck: _on_rotation_ack,
        Ping: _on_ping,
        Pong: _on_pong,
        Close: _on_close,
    }

    # ---- handshake helpers ----------------------------------------------------------------
    def _own_chain(self, mode: SessionMode) -> tuple[bytes, ...]:
        if mode is SessionMode.CERTIFICATE:
            assert isinstance(self._credentials, CertificateCredentials)
            return tuple(certificate_der(c) for c in self._credentials.certificate_chain)
        return ()

    def _check_peer_ledger(self, handshake: _Handshake, peer: Hello | HelloReply) -> None:
        """The peer's public ledger state must match ours, allowing for a two-phase commit cut
        short: one side may have committed blocks the other has only staged."""
        ledger = self.ledger
        if ledger is None or not self.config.allow_key_derived:
            raise ProtocolError("key-derived mode is not available here", field="mode")
        committed = ledger.state.deposit_digest
        staged = (self._staged or ledger).state.deposit_digest
        if not (
            hmac.compare_digest(peer.ledger_deposit_digest, committed)
            or hmac.compare_digest(peer.ledger_deposit_digest, staged)
            or hmac.compare_digest(peer.ledger_staged_digest, committed)
        ):
            raise ProtocolError(
                "authentication-key ledgers differ (deposit history)",
                field="ledger_deposit_digest",
            )
        if abs(peer.ledger_consumed_bits - ledger.consumed_bits) > self.config.max_resync_bits:
            raise ProtocolError("ledger offsets too far apart", field="ledger_consumed_bits")
        handshake.ledger_offset_bits = max(ledger.consumed_bits, peer.ledger_consumed_bits)
        handshake.peer_tags = peer.ledger_tags
        handshake.peer_forgery_bound = peer.ledger_forgery_bound

    def _take_responder_key(self, handshake: _Handshake) -> None:
        """Bob: the next slot of the handshake-key stream, used up now, for this attempt only."""
        assert self.ledger is not None
        if self._admit is not None and not self._admit():
            raise ProtocolError(
                "too many key-derived handshake attempts: try again later", field="rate"
            )
        index = self.ledger.responder_handshake_index()
        if index is not None:
            handshake.pool_key = self.ledger.take_handshake_key(index)
        elif self._staged is not None and self._staged.responder_handshake_index() is not None:
            # a slot of a block staged here and committed by the peer: burned here too
            index = self._staged.responder_handshake_index()
            assert index is not None
            handshake.pool_key = self._staged.take_handshake_key(index)
            self.ledger.burn_handshake_through(index)
        else:
            raise AuthKeyExhausted("no handshake key left: re-bootstrap needs an operator")
        handshake.handshake_index = index

    def _take_initiator_key(self, handshake: _Handshake, index: int) -> None:
        """Alice: the slot Bob used, used up now (a forged reply burns it: it is never reused)."""
        assert self.ledger is not None
        handshake.pool_key = self.ledger.take_handshake_key(index)
        handshake.handshake_index = index

    def _make_proof(self, handshake: _Handshake, transcript: bytes) -> bytes:
        if handshake.mode is SessionMode.KEY_DERIVED:
            return hmac_proof(handshake.pool_key, self.role, transcript)
        if isinstance(self._credentials, PskCredentials):
            return hmac_proof(self._credentials.psk, self.role, transcript)
        return sign(self._credentials.private_key, proof_input(self.role, transcript))

    def _verify_proof(
        self,
        handshake: _Handshake,
        chain: tuple[bytes, ...],
        proof: bytes,
        transcript: bytes,
        now_s: float,
    ) -> None:
        peer = self.role.peer
        if handshake.mode is not SessionMode.CERTIFICATE and chain:
            raise ProtocolError("certificates are only sent in certificate mode", field="chain")
        if handshake.mode is SessionMode.KEY_DERIVED:
            verify_hmac_proof(handshake.pool_key, peer, transcript, proof)
        elif isinstance(self._credentials, PskCredentials):
            verify_hmac_proof(self._credentials.psk, peer, transcript, proof)
        else:
            key = verify_peer_chain(
                chain,
                trust_anchor=self._credentials.trust_anchor,
                peer_name=self._credentials.peer_name,
                now_s=now_s,
            )
            verify_signature(key, proof, proof_input(peer, transcript))

    @staticmethod
    def _finish_transcript(handshake: _Handshake, chain: tuple[bytes, ...]) -> bytes:
        chain_packed: bytes = msgpack.packb(list(chain), use_bin_type=True)
        return transcript_hash(
            handshake.hello_payload, handshake.reply_fields, handshake.reply_proof, chain_packed
        )

    def _complete_handshake(
        self, handshake: _Handshake, th2: bytes, finish_proof: bytes, now_s: float
    ) -> HandshakeComplete:
        final = transcript_hash(th2, finish_proof)
        mode_secret = b""
        if handshake.mode is SessionMode.KEY_DERIVED:
            assert self.ledger is not None
            # Only now, with both sides authenticated, does the pool move: meet the peer's
            # offset (the handshake key itself was used up when it was taken)
            self.ledger.set_active(True)
            self.ledger.advance_to(
                handshake.ledger_offset_bits,
                tags_issued=handshake.peer_tags,
                forgery_bound=handshake.peer_forgery_bound,
            )
            mode_secret = handshake.pool_key
        elif isinstance(self._credentials, PskCredentials):
            mode_secret = self._credentials.psk
        keys = derive_session_keys(
            x25519_shared=handshake.x25519_shared,
            mlkem_shared=handshake.mlkem_shared,
            mode_secret=mode_secret,
            transcript=final,
            mode=handshake.mode.value,
        )
        self._session_id = keys.session_id
        self._set_control_keys(keys.a2b, keys.b2a)
        self._mode = handshake.mode
        self._handshake = None
        self._state = ConnectionState.ESTABLISHED
        self._established_s = now_s
        self._reader.max_frame_bytes = self.config.max_frame_bytes
        self._reader.max_feed_bytes = 1 << 20
        return HandshakeComplete(mode=handshake.mode, session_id=keys.session_id)

    def _set_control_keys(self, a2b: bytes, b2a: bytes) -> None:
        send, recv = (a2b, b2a) if self.role is Role.ALICE else (b2a, a2b)
        self._send_key, self._recv_key = send, recv
        self._send_control = FrameMac(send, self._session_id, self.role)
        self._recv_control = FrameMac(recv, self._session_id, self.role.peer)

    def _rotate(self, next_block_id: int) -> Rotated:
        assert self.ledger is not None
        self.ledger.set_active(True)  # persisted with the draw below, before the ack leaves
        pool_key = self.ledger.draw(ROTATION_KEY_BITS, "rotation")
        a2b, b2a = derive_rotation_keys(pool_key, self._session_id)
        self._set_control_keys(a2b, b2a)
        self._mode = SessionMode.KEY_DERIVED
        self._next_block_id = next_block_id
        self._state = ConnectionState.ESTABLISHED
        return Rotated(mode=SessionMode.KEY_DERIVED, next_block_id=next_block_id)

    # ---- blocks ---------------------------------------------------------------------------
    def _check_open(self, block_id: int) -> None:
        if block_id > MAX_BLOCK_ID:
            raise ProtocolError(f"block ids are at most {MAX_BLOCK_ID}", field="block_id")
        if block_id < self._next_block_id:
            raise ProtocolError("block ids must strictly increase", field="block_id")
        if len(self._blocks) >= self.config.max_open_blocks:
            raise ProtocolError("too many open blocks", field="block_id")

    def _create_block(self, block_id: int) -> None:
        ledger = self.ledger
        sid = self._session_id
        peer = self.role.peer
        if self._mode is SessionMode.KEY_DERIVED:
            assert ledger is not None
            keys = {name: ledger.draw(bits, f"block {name}") for name, bits in BLOCK_DRAWS}
            ledger.record_tags(2, self.config.tag_forgery_bound)
            mine, theirs = ("a2b", "b2a") if self.role is Role.ALICE else ("b2a", "a2b")
            send_mac = FrameMac(keys[f"mac_{mine}"], sid, self.role)
            recv_mac = FrameMac(keys[f"mac_{theirs}"], sid, peer)
            send_t = BlockTranscript(
                hash_key=keys[f"hash_{mine}"], pad=keys[f"pad_{mine}"], hmac_key=None
            )
            recv_t = BlockTranscript(
                hash_key=keys[f"hash_{theirs}"], pad=keys[f"pad_{theirs}"], hmac_key=None
            )
            spent = BLOCK_DRAW_BITS
        else:
            assert self._send_control is not None and self._recv_control is not None
            send_mac, recv_mac = self._send_control, self._recv_control
            send_t = BlockTranscript(hmac_key=self._send_key)
            recv_t = BlockTranscript(hmac_key=self._recv_key)
            spent = 0
        self._blocks[block_id] = _Block(
            block_id=block_id,
            send_mac=send_mac,
            recv_mac=recv_mac,
            send_transcript=send_t,
            recv_transcript=recv_t,
            fingerprint=ledger.fingerprint() if ledger is not None else _ZERO_DIGEST,
            mark_bits=ledger.consumed_bits if ledger is not None else 0,
            spent_bits=spent,
        )
        self._next_block_id = block_id + 1

    def _check_transcript_room(self, transcript: BlockTranscript, record_bytes: int) -> None:
        if not transcript.one_time:
            return
        chunks = (record_bytes + 8 + BLOCK_BYTES - 1) // BLOCK_BYTES
        # keep room for the final record and the length chunk
        if transcript.chunks + chunks + 8 > self.config.max_block_chunks:
            raise ProtocolError("block transcript exceeds max_block_chunks", field="block")

    @staticmethod
    def _final_record(block_id: int, frames: int, fingerprint: bytes) -> bytes:
        return b"close" + struct.pack(">QQ", block_id, frames) + fingerprint

    @staticmethod
    def _finish(block: _Block, final: bytes) -> bytes:
        block.send_transcript.absorb(final)
        return block.send_transcript.tag()

    def _finalize(self, block: _Block) -> None:
        del self._blocks[block.block_id]
        mode = self._mode
        assert mode is not None
        self._events.append(
            BlockAuthenticated(
                block_id=block.block_id,
                mode=SessionMode.KEY_DERIVED if block.spent_bits else mode,
                ledger_mark_bits=block.mark_bits,
                auth_bits_spent=block.spent_bits,
                frames_sent=block.frames_sent,
                frames_received=block.frames_received,
                forgery_bound_total=self.ledger.forgery_bound if self.ledger else 0.0,
            )
        )

    # ---- checks ---------------------------------------------------------------------------
    def _require(self, condition: bool, what: str) -> None:
        if not condition:
            raise ProtocolError(what, field="state")

    def _require_state(self, state: ConnectionState) -> None:
        if self._state is not state:
            raise ProtocolError(
                f"not allowed in state {self._state.value} (needs {state.value})", field="state"
            )

    def _require_peer(self, condition: bool, message: Message) -> None:
        if not condition:
            raise ProtocolError(
                f"{type(message).__name__} is not valid in state {self._state.value} "
                f"for {self.role.value}",
                field="type",
            )
