"""``PeerConnection``: the sans-IO state machine of one end of the classical channel.

Bytes in (``receive_data``), events out (``next_event``), bytes out (the ``open_block`` /
``send_data`` / ... methods return the frames to write; ``data_to_send`` drains frames the
protocol produced by itself: handshake replies, pongs, rotation acks). No I/O, no clock (``now_s``
comes in), no global randomness (``random_bytes`` is injected).

The rules it follows, and the table of which frames each side may send and accept in each state,
are in ``rules.py``; the handshake and the session key schedule in ``handshake.py``; one block's
keys, transcripts and close record in ``blocks.py``; the events it gives in
``channel_events.py``. This module frames, sequences and dispatches, and owns the state.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Mapping
from typing import Final

from qkdnode.channel.auth import (
    BLOCK_DRAW_BITS,
    ROTATION_KEY_BITS,
    TAG_BYTES,
    Credentials,
    FrameMac,
    Role,
)
from qkdnode.channel.blocks import (
    OpenBlock,
    check_transcript_room,
    key_derived_block,
    session_keyed_block,
)
from qkdnode.channel.channel_events import (
    NEED_DATA,
    BlockAuthenticated,
    BlockOpened,
    ConnectionLost,
    Event,
    HandshakeComplete,
    NeedData,
    PeerClosed,
    PongReceived,
    PoolExhausted,
    Rotated,
)
from qkdnode.channel.framing import NO_BLOCK, FrameReader, RawFrame, pack_frame, pack_header
from qkdnode.channel.handshake import (
    Handshaker,
    HandshakeState,
    check_rotation_announce,
    rotation_keys,
)
from qkdnode.channel.ledger import AuthKeyLedger
from qkdnode.channel.messages import (
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
from qkdnode.channel.rules import (
    MAX_BLOCK_ID,
    MIN_MAX_FRAME_BYTES,
    ChannelConfig,
    ConnectionState,
    check_accepts,
    check_sends,
    refusal,
)
from qkdnode.errors import AuthKeyExhausted, ProtocolError, QkdError

# the connection's public surface, importable from here as from the modules that define it
__all__ = [
    "MAX_BLOCK_ID",
    "MIN_MAX_FRAME_BYTES",
    "NEED_DATA",
    "BlockAuthenticated",
    "BlockOpened",
    "ChannelConfig",
    "ConnectionLost",
    "ConnectionState",
    "Event",
    "HandshakeComplete",
    "NeedData",
    "PeerClosed",
    "PeerConnection",
    "PongReceived",
    "PoolExhausted",
    "Rotated",
]


class PeerConnection:
    """One end of the authenticated classical channel (see ``rules.py`` for the rules)."""

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
        ``admit_key_derived``: Bob's rate limit on key-derived Hellos (each uses up a handshake
        key); refused attempts get no proof."""
        self.role = role
        self._credentials = credentials
        self._registry = registry
        self.ledger = ledger
        self.config = config if config is not None else ChannelConfig()
        self._handshaker = Handshaker(
            role,
            credentials=credentials,
            registry=registry,
            config=self.config,
            random_bytes=random_bytes,
            force_bootstrap=force_bootstrap,
            staged_ledger=staged_ledger,
            admit_key_derived=admit_key_derived,
        )
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
        self._handshake: HandshakeState | None = None
        self._blocks: dict[int, OpenBlock] = {}
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
    def has_pending_events(self) -> bool:
        """True when events are queued for ``next_event`` without more received data: a send
        can finish a block (``close_block`` by the side that closes last) or refuse one
        (``open_block`` on an exhausted pool), and the shell must then fetch the event."""
        return bool(self._events)

    @property
    def bootstrap_mode(self) -> SessionMode:
        return self._handshaker.bootstrap_mode

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
                # frames are tagged once the session has keys
                tag_bytes = TAG_BYTES if self._recv_control is not None else 0
                frame = self._reader.peek(tag_bytes)
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
        check_sends(self.role, self._state, Hello)
        handshake = self._handshaker.hello(self.ledger)
        self._handshake = handshake
        self._state = ConnectionState.SENT_HELLO
        return self._emit_payload(Hello.CODE, handshake.hello_payload, NO_BLOCK, None)

    def open_block(self, block_id: int) -> bytes:
        """Alice: open block ``block_id`` (ids strictly increase).

        In key-derived mode, if the pool cannot pay for the block, raises ``AuthKeyExhausted``
        and queues a ``PoolExhausted`` event.
        """
        check_sends(self.role, self._state, BlockOpen)
        self.config.check_block_open(block_id, self._next_block_id, len(self._blocks))
        if self._mode is SessionMode.KEY_DERIVED:
            ledger = self.ledger
            assert ledger is not None
            if not ledger.can_pay(BLOCK_DRAW_BITS):
                event = PoolExhausted(level_bits=ledger.level_bits, needed_bits=BLOCK_DRAW_BITS)
                self._events.append(event)
                raise AuthKeyExhausted(
                    f"pool level {ledger.level_bits} bits cannot pay for a block "
                    f"({BLOCK_DRAW_BITS} bits) above the reserve"
                )
        frame = self._emit(BlockOpen(block_id=block_id), NO_BLOCK, self._send_control)
        self._create_block(block_id)
        return frame

    def send_data(
        self, block_id: int, kind: str, body: Mapping[str, int | float | bool | bytes]
    ) -> bytes:
        """A Data frame of an open block (checked against the kind's schema first)."""
        check_sends(self.role, self._state, Data)
        block = self._sending_block(block_id)
        message = Data(block_id=block_id, kind=kind, body=body)
        payload = encode_payload(message, self._registry)
        header = pack_header(Data.CODE, self._send_seq, block_id)
        check_transcript_room(
            block.send_transcript,
            len(header) + len(payload),
            max_block_chunks=self.config.max_block_chunks,
        )
        block.send_transcript.absorb(header, payload)
        block.frames_sent += 1
        return self._emit_payload(Data.CODE, payload, block_id, block.send_mac, header=header)

    def send_control(self, kind: str, body: Mapping[str, int | float | bool | bytes]) -> bytes:
        """A Control frame outside any block (checked against the kind's schema first)."""
        check_sends(self.role, self._state, Control)
        message = Control(kind=kind, body=body)
        return self._emit(message, NO_BLOCK, self._send_control)

    def close_block(self, block_id: int) -> bytes:
        """This side is done sending for the block: its transcript tag and ledger fingerprint."""
        check_sends(self.role, self._state, BlockClose)
        block = self._sending_block(block_id)
        frame = self._emit(block.own_close(), block_id, block.send_mac)
        block.sent_close = True
        if block.received_close:
            self._finalize(block)
        return frame

    def announce_rotation(self) -> bytes:
        """Alice, between blocks: switch to key-derived authentication (needs an acked reply)."""
        check_sends(self.role, self._state, RotationAnnounce)
        if self._mode is SessionMode.KEY_DERIVED:
            raise ProtocolError("already key-derived", field="state")
        if self._blocks:
            raise ProtocolError("rotation happens between blocks", field="state")
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
        check_sends(self.role, self._state, Ping)
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
        self.config.check_session_frames(self._send_seq)
        if header is None:
            header = pack_header(code, self._send_seq, block)
        tag = mac.tag(header, payload) if mac is not None else b""
        self._send_seq += 1
        return pack_frame(header, payload, tag)

    # ---- frame input ----------------------------------------------------------------------
    def _receive_frame(self, frame: RawFrame, now_s: float) -> Event | None:
        # 0. session limits: old keys and long sessions are retired, not trusted forever
        if self._established_s is not None:
            self.config.check_session_age(now_s - self._established_s)
        self.config.check_session_frames(self._recv_seq)
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
        # 4. state (the accepts-table) and semantics; handlers check everything before they
        # change anything
        check_accepts(self.role, self._state, cls)
        handler = self._handlers[cls]
        return handler(self, message, frame, now_s)

    def _on_hello(self, message: Message, frame: RawFrame, now_s: float) -> Event | None:
        assert isinstance(message, Hello)
        handshake, reply = self._handshaker.answer_hello(self.ledger, message, frame.payload)
        # all checks passed: commit
        self._handshake = handshake
        self._recv_seq += 1
        self._state = ConnectionState.SENT_REPLY
        self._outbox += self._emit(reply, NO_BLOCK, None)
        return None

    def _on_hello_reply(self, message: Message, frame: RawFrame, now_s: float) -> Event | None:
        assert isinstance(message, HelloReply)
        handshake = self._handshake
        assert handshake is not None
        finish, th2 = self._handshaker.answer_reply(self.ledger, handshake, message, now_s)
        self._recv_seq += 1
        self._outbox += self._emit(finish, NO_BLOCK, None)
        return self._complete_handshake(handshake, th2, finish.proof, now_s)

    def _on_finish(self, message: Message, frame: RawFrame, now_s: float) -> Event | None:
        assert isinstance(message, Finish)
        handshake = self._handshake
        assert handshake is not None
        th2 = self._handshaker.check_finish(handshake, message, now_s)
        self._recv_seq += 1
        return self._complete_handshake(handshake, th2, message.proof, now_s)

    def _on_block_open(self, message: Message, frame: RawFrame, now_s: float) -> Event | None:
        assert isinstance(message, BlockOpen)
        self.config.check_block_open(message.block_id, self._next_block_id, len(self._blocks))
        if self._mode is SessionMode.KEY_DERIVED:
            assert self.ledger is not None
            if not self.ledger.can_pay(BLOCK_DRAW_BITS):
                raise AuthKeyExhausted("the peer opened a block the pool cannot pay for")
        self._recv_seq += 1
        self._create_block(message.block_id)
        return BlockOpened(block_id=message.block_id)

    def _on_data(self, message: Message, frame: RawFrame, now_s: float) -> Event | None:
        assert isinstance(message, Data)
        block = self._blocks[frame.block]
        if block.received_close:
            raise refusal(self.role, self._state, type(message))
        check_transcript_room(
            block.recv_transcript,
            len(frame.header) + len(frame.payload),
            max_block_chunks=self.config.max_block_chunks,
        )
        self._recv_seq += 1
        block.recv_transcript.absorb(frame.header, frame.payload)
        block.frames_received += 1
        return message

    def _on_block_close(self, message: Message, frame: RawFrame, now_s: float) -> Event | None:
        assert isinstance(message, BlockClose)
        block = self._blocks[frame.block]
        if block.received_close:
            raise refusal(self.role, self._state, type(message))
        block.verify_peer_close(message)
        self._recv_seq += 1
        block.received_close = True
        if block.sent_close:
            self._finalize(block)
        return None

    def _on_rotation_announce(
        self, message: Message, frame: RawFrame, now_s: float
    ) -> Event | None:
        assert isinstance(message, RotationAnnounce)
        # rotation happens once per session, and only between blocks
        if self._mode is SessionMode.KEY_DERIVED or self._blocks:
            raise refusal(self.role, self._state, RotationAnnounce)
        check_rotation_announce(self.ledger, self.config, message, self._next_block_id)
        self._recv_seq += 1
        self._outbox += self._emit(
            RotationAck(next_block_id=message.next_block_id), NO_BLOCK, self._send_control
        )
        return self._rotate(message.next_block_id)

    def _on_rotation_ack(self, message: Message, frame: RawFrame, now_s: float) -> Event | None:
        assert isinstance(message, RotationAck)
        if message.next_block_id != self._next_block_id:
            raise ProtocolError("acknowledges another rotation point", field="next_block_id")
        self._recv_seq += 1
        return self._rotate(message.next_block_id)

    def _on_control(self, message: Message, frame: RawFrame, now_s: float) -> Event | None:
        assert isinstance(message, Control)
        self._recv_seq += 1
        return message

    def _on_ping(self, message: Message, frame: RawFrame, now_s: float) -> Event | None:
        assert isinstance(message, Ping)
        self._recv_seq += 1
        if self._state is ConnectionState.ESTABLISHED:
            self._outbox += self._emit(Pong(nonce=message.nonce), NO_BLOCK, self._send_control)
        return None

    def _on_pong(self, message: Message, frame: RawFrame, now_s: float) -> Event | None:
        assert isinstance(message, Pong)
        self._recv_seq += 1
        return PongReceived(nonce=message.nonce)

    def _on_close(self, message: Message, frame: RawFrame, now_s: float) -> Event | None:
        assert isinstance(message, Close)
        self._recv_seq += 1
        self._state = ConnectionState.CLOSED
        return PeerClosed(reason=CloseReason(message.reason), detail=message.detail)

    # one handler per frame type; whether the frame is valid now is the accepts-table's call
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

    # ---- session keys ---------------------------------------------------------------------
    def _complete_handshake(
        self, handshake: HandshakeState, th2: bytes, finish_proof: bytes, now_s: float
    ) -> HandshakeComplete:
        keys = self._handshaker.session_keys(self.ledger, handshake, th2, finish_proof)
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
        # the ledger is marked active with the draw, before the ack leaves
        a2b, b2a = rotation_keys(self.ledger, self._session_id)
        self._set_control_keys(a2b, b2a)
        self._mode = SessionMode.KEY_DERIVED
        self._next_block_id = next_block_id
        self._state = ConnectionState.ESTABLISHED
        return Rotated(mode=SessionMode.KEY_DERIVED, next_block_id=next_block_id)

    # ---- blocks ---------------------------------------------------------------------------
    def _create_block(self, block_id: int) -> None:
        if self._mode is SessionMode.KEY_DERIVED:
            assert self.ledger is not None
            block = key_derived_block(
                block_id,
                role=self.role,
                session_id=self._session_id,
                ledger=self.ledger,
                tag_forgery_bound=self.config.tag_forgery_bound,
            )
        else:
            assert self._send_control is not None and self._recv_control is not None
            block = session_keyed_block(
                block_id,
                send_mac=self._send_control,
                recv_mac=self._recv_control,
                send_key=self._send_key,
                recv_key=self._recv_key,
                ledger=self.ledger,
            )
        self._blocks[block_id] = block
        self._next_block_id = block_id + 1

    def _sending_block(self, block_id: int) -> OpenBlock:
        block = self._blocks.get(block_id)
        if block is None or block.sent_close:
            raise ProtocolError("block is not open for sending", field="block_id")
        return block

    def _finalize(self, block: OpenBlock) -> None:
        del self._blocks[block.block_id]
        assert self._mode is not None
        forgery_bound_total = self.ledger.forgery_bound if self.ledger else 0.0
        self._events.append(block.authenticated(self._mode, forgery_bound_total))
