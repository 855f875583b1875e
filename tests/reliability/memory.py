"""In-memory sessions of two ``PeerConnection``s with a scripted wire, for tampering runs.

A session script produces every frame type: the handshake, a block with data both ways and both
closes, Control frames both ways, a ping (and its pong), rotation (announce and ack) in bootstrap
modes, a second block, and a Close. Randomness is seeded, so a replay of the script up to frame
*i* gives the same frames (the ML-DSA/Ed25519 signatures aside, which are hedged: the tampered
frame is always the one the replay produced).
"""

from __future__ import annotations

import functools
import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache

import numpy as np

from qkdnode.channel.auth import CertificateCredentials, PskCredentials, Role
from qkdnode.channel.connection import (
    BlockAuthenticated,
    ChannelConfig,
    Event,
    HandshakeComplete,
    NeedData,
    PeerConnection,
)
from qkdnode.channel.ledger import (
    HANDSHAKE_SLOT_BYTES,
    HANDSHAKE_SLOTS_HELD,
    HANDSHAKE_SLOTS_PER_DEPOSIT,
    AuthKeyLedger,
)
from qkdnode.channel.messages import FieldSpec, KindRegistry
from qkdnode.errors import (
    AuthenticationFailed,
    AuthKeyExhausted,
    CertificateRejected,
    ProtocolError,
)
from tests.helpers_pki import NOW_S, credentials_pair
from tests.reliability.proxy import NAMES

NAMED = (ProtocolError, AuthenticationFailed, CertificateRejected, AuthKeyExhausted)
TARGET_BITS = 64 * 1024
RESERVE_BITS = 4 * 1024
Creds = CertificateCredentials | PskCredentials


def registry() -> KindRegistry:
    reg = KindRegistry()
    reg.register(
        "probe",
        {
            "n": FieldSpec(kind="int", min_value=0, max_value=1 << 30),
            "blob": FieldSpec(kind="bytes", max_len=1 << 16),
        },
    )
    return reg


REGISTRY = registry()


# the bytes of one deposit's handshake-key slots, after the pool's share
SLOTS = HANDSHAKE_SLOTS_PER_DEPOSIT * HANDSHAKE_SLOT_BYTES


def seeded(seed: int) -> Callable[[int], bytes]:
    rng = np.random.default_rng(seed)
    return lambda n: rng.bytes(n)


def funded_ledger(seed: int = 7, target_bits: int = TARGET_BITS) -> AuthKeyLedger:
    ledger = AuthKeyLedger(target_bits=target_bits, reserve_bits=RESERVE_BITS)
    ledger.deposit(
        np.random.default_rng(seed).bytes(target_bits // 8 + SLOTS), mark_consumed_bits=0
    )
    _more_slots(ledger, seed)
    return ledger


@cache
def credentials(mode: str) -> tuple[Creds, Creds]:
    if mode in ("psk", "key_derived"):
        psk = bytes(range(32))
        return PskCredentials(psk=psk), PskCredentials(psk=psk)
    alice, bob, _ = credentials_pair(mode)
    return alice, bob


def split_frames(data: bytes) -> list[bytes]:
    frames, at = [], 0
    while at < len(data):
        (length,) = struct.unpack_from(">I", data, at)
        frames.append(data[at : at + 4 + length])
        at += 4 + length
    return frames


def snapshot(conn: PeerConnection) -> tuple[object, ...]:
    ledger = conn.ledger
    return (
        conn.send_seq,
        conn.recv_seq,
        conn.open_blocks,
        None if ledger is None else ledger.state,
    )


class TamperedFrameAccepted(AssertionError):
    pass


@dataclass
class Wire:
    """Alice and Bob, a queue of frames in flight, and a tamper hook on the n-th frame."""

    alice: PeerConnection
    bob: PeerConnection
    tamper_at: int = -1
    tamper: Callable[[bytes], bytes] = lambda frame: frame
    sent: int = 0
    queue: deque[tuple[Role, bytes]] = field(default_factory=deque)
    events: dict[Role, list[Event]] = field(default_factory=lambda: {Role.ALICE: [], Role.BOB: []})
    frame_types: list[str] = field(default_factory=list)
    tampered_type: str | None = None
    snapshot_ok: bool | None = None
    watched: tuple[Role, tuple[object, ...]] | None = None
    same_flush: bool = False

    def conn(self, role: Role) -> PeerConnection:
        return self.alice if role is Role.ALICE else self.bob

    def put(self, to: Role, data: bytes) -> None:
        for frame in split_frames(data):
            self.queue.append((to, frame))
        self.flush()

    def flush(self) -> None:
        """Deliver queued frames; a named error is checked against the receiver's state from
        just before the tampered frame (a frame whose length was changed is only rejected when
        later bytes arrive, but nothing may have been accepted in between)."""
        try:
            while self.queue:
                to, frame = self.queue.popleft()
                index = self.sent
                self.sent += 1
                self.frame_types.append(NAMES.get(frame[4], "?"))
                if index == self.tamper_at:
                    self.tampered_type = NAMES.get(frame[4], "?")
                    self.watched = (to, snapshot(self.conn(to)))
                    self.same_flush = True
                    frame = self.tamper(frame)
                self._deliver(to, frame)
        except NAMED:
            if self.watched is not None:
                role, before = self.watched
                now = snapshot(self.conn(role))
                # rejected at once: nothing of the receiver may have moved. Rejected later (a
                # changed length prefix waits for more bytes): the receiver meanwhile sent frames
                # of its own, but must not have received (accepted) any.
                self.snapshot_ok = now == before if self.same_flush else now[1] == before[1]
            raise
        finally:
            self.same_flush = False

    def _deliver(self, to: Role, frame: bytes) -> None:
        conn = self.conn(to)
        conn.receive_data(frame)
        while not isinstance(event := conn.next_event(now_s=NOW_S), NeedData):
            self.events[to].append(event)
        reply = conn.data_to_send()
        if reply:
            for piece in split_frames(reply):
                self.queue.append((to.peer, piece))

    def drain(self, role: Role) -> None:
        conn = self.conn(role)
        while not isinstance(event := conn.next_event(now_s=NOW_S), NeedData):
            self.events[role].append(event)


def _body(n: int) -> dict[str, int | float | bool | bytes]:
    return {"n": n, "blob": bytes(range(n % 200))}


def run_script(wire: Wire, *, rotate: bool) -> None:
    """The scripted session (see the module docstring); raises on the first rejected frame."""
    a, b = wire.alice, wire.bob
    A, B = Role.BOB, Role.ALICE  # destinations of Alice's and Bob's frames
    wire.put(A, a.start_handshake())
    blocks = [0, 1] if rotate else [5]
    for i, block in enumerate(blocks):
        if i == 1:
            wire.put(A, a.announce_rotation())
        wire.put(A, a.open_block(block))
        wire.put(A, a.send_data(block, "probe", _body(3)))
        wire.put(B, b.send_data(block, "probe", _body(40)))
        wire.put(A, a.close_block(block))
        wire.put(B, b.close_block(block))
        wire.drain(Role.BOB)
        wire.drain(Role.ALICE)
    wire.put(A, a.send_control("probe", _body(7)))
    wire.put(B, b.send_control("probe", _body(9)))
    wire.put(A, a.ping(1))
    wire.put(A, a.close())
    for role in (Role.ALICE, Role.BOB):  # the stream ends: a frame still buffered is refused
        conn = wire.conn(role)
        if conn.state.value not in ("closed", "error"):
            conn.receive_data(b"")
            wire.drain(role)


def make_wire(mode: str, seed: int = 1) -> tuple[Wire, bool]:
    """A fresh wire for ``mode``: for ``key_derived``, a PSK session that rotates runs first."""
    a_cred, b_cred = credentials(mode)
    ledgers = (funded_ledger(), funded_ledger())
    config = ChannelConfig(max_frame_bytes=1 << 20)

    def pair(offset: int) -> Wire:
        return Wire(
            PeerConnection(
                Role.ALICE,
                credentials=a_cred,
                registry=REGISTRY,
                ledger=ledgers[0],
                config=config,
                random_bytes=seeded(seed + offset),
            ),
            PeerConnection(
                Role.BOB,
                credentials=b_cred,
                registry=REGISTRY,
                ledger=ledgers[1],
                config=config,
                random_bytes=seeded(seed + offset + 1000),
            ),
        )

    if mode != "key_derived":
        return pair(0), True
    first = pair(0)
    run_script(first, rotate=True)
    return pair(7), False


def FRAME_OFFSETS(size: int, count: int) -> list[int]:
    """``count`` offsets spread over a frame of ``size`` bytes, header and tag included."""
    if count >= size:
        return list(range(size))
    if count <= 1:
        return [0][:count]
    return sorted({round(i * (size - 1) / (count - 1)) for i in range(count)})


@dataclass
class TamperReport:
    tampered: int = 0
    rejected: int = 0
    state_changed: int = 0
    types: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def tamper_session_frames(mode: str, *, offsets_per_frame: int = 10) -> TamperReport:
    """Flip one byte at ``offsets_per_frame`` offsets of every frame of the scripted session."""
    clean, rotate = make_wire(mode)
    run_script(clean, rotate=rotate)
    frame_count = clean.sent
    sizes = _frame_sizes(mode)
    report = TamperReport()
    for index in range(frame_count):
        for offset in FRAME_OFFSETS(sizes[index], offsets_per_frame):
            wire, rotate = make_wire(mode)
            wire.tamper_at = index
            wire.tamper = functools.partial(_flip, offset=offset)
            report.tampered += 1
            try:
                run_script(wire, rotate=rotate)
            except NAMED:
                report.rejected += 1
                tagged = wire.tampered_type not in ("hello", "hello_reply", "finish")
                if wire.snapshot_ok is None and wire.watched is not None:
                    # refused by a local check outside delivery (the peer never got the frame)
                    role, before = wire.watched
                    wire.snapshot_ok = snapshot(wire.conn(role))[1] == before[1]
                if tagged and not wire.snapshot_ok:
                    report.state_changed += 1
                    report.failures.append(f"{wire.tampered_type}@{offset}: state changed")
                if (
                    wire.tampered_type != "finish"
                    and any(isinstance(e, HandshakeComplete) for e in wire.events[Role.BOB])
                    and wire.tampered_type in ("hello", "hello_reply")
                ):
                    report.failures.append(f"{wire.tampered_type}@{offset}: handshake completed")
            except Exception as exc:  # anything else is a finding
                report.failures.append(f"{wire.tampered_type}@{offset}: {type(exc).__name__}")
            else:
                if wire.watched is not None:
                    role, before = wire.watched
                    if snapshot(wire.conn(role))[1] == before[1]:
                        report.rejected += 1  # still buffered when the session closed
                        continue_ok = True
                    else:
                        continue_ok = False
                else:
                    continue_ok = False
                if not continue_ok:
                    report.failures.append(f"{wire.tampered_type}@{offset}: accepted")
            kind = wire.tampered_type or "?"
            report.types[kind] = report.types.get(kind, 0) + 1
    return report


def _flip(frame: bytes, offset: int) -> bytes:
    out = bytearray(frame)
    out[offset % len(out)] ^= 0x01
    return bytes(out)


@cache
def _frame_sizes(mode: str) -> tuple[int, ...]:
    """Sizes of the frames of a clean run of the script, in wire order."""
    return tuple(_all_sizes(mode))


def _all_sizes(mode: str) -> list[int]:
    wire, rotate = make_wire(mode)
    seen: list[int] = []

    def flush() -> None:
        while wire.queue:
            to, frame = wire.queue.popleft()
            seen.append(len(frame))
            wire.sent += 1
            wire.frame_types.append(NAMES.get(frame[4], "?"))
            wire._deliver(to, frame)

    wire.flush = flush  # type: ignore[method-assign]
    run_script(wire, rotate=rotate)
    return seen


# ---- key-derived pairs for ledger, forgery and abort scenarios (4, 5, 6, 7, 11, 18) -----------


@dataclass
class DrawLog:
    """Every draw (offset, size, purpose) one ledger made, from its observer."""

    draws: list[tuple[int, int, str]] = field(default_factory=list)

    def __call__(self, record: object) -> None:
        offset = getattr(record, "offset_bits")  # noqa: B009 - DrawRecord, typed loosely here
        nbits = getattr(record, "nbits")  # noqa: B009
        purpose = getattr(record, "purpose")  # noqa: B009
        if purpose in ("activate", "handshake"):
            return  # not a pool draw: a state change, and the handshake-key stream
        self.draws.append((int(offset), int(nbits), str(purpose)))


class RecordingLedger(AuthKeyLedger):
    """An ``AuthKeyLedger`` that also keeps every deposit taken and every draw's bytes, so a
    test can check each draw against a naive model (the pool as one append-only stream)."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.stream = bytearray()  # every byte ever deposited, in order
        self.drawn: list[tuple[int, bytes]] = []  # (offset_bits, bytes) of every draw

    def deposit(self, key: bytes, *, mark_consumed_bits: int, key_epsilon: float = 0.0) -> int:
        before_bits = self.state.deposited_bits
        taken = super().deposit(key, mark_consumed_bits=mark_consumed_bits, key_epsilon=key_epsilon)
        # the pool's share leads the bytes taken; handshake-key slots follow (their own stream)
        self.stream += key[: (self.state.deposited_bits - before_bits) // 8]
        return taken

    def draw_many(
        self, sizes_bits: Sequence[int], purpose: str, *, allow_reserve: bool = False
    ) -> list[bytes]:
        offset = self.consumed_bits
        keys = super().draw_many(sizes_bits, purpose, allow_reserve=allow_reserve)
        for key in keys:  # ``draw`` comes here too
            self.drawn.append((offset, key))
            offset += len(key) * 8
        return keys


def ledger_pair(
    *, seed: int, target_bits: int, reserve_bits: int = RESERVE_BITS
) -> tuple[RecordingLedger, RecordingLedger, DrawLog, DrawLog]:
    """Two ledgers funded with the same ``target_bits`` of seeded key (and a deposit's handshake
    slots), each with a draw log of its pool draws."""
    material = np.random.default_rng(seed).bytes(target_bits // 8 + SLOTS)
    logs = (DrawLog(), DrawLog())
    alice, bob = (
        RecordingLedger(target_bits=target_bits, reserve_bits=reserve_bits, observer=log)
        for log in logs
    )
    for ledger in (alice, bob):
        ledger.deposit(material, mark_consumed_bits=0)
        _more_slots(ledger, seed)
    return alice, bob, logs[0], logs[1]


def _more_slots(ledger: AuthKeyLedger, seed: int) -> None:
    """Top the handshake-key stream up to the slots a ledger holds (the pool is full, so
    these deposits give slots only): many sessions in a row need many handshake keys."""
    rng = np.random.default_rng(seed + 1)
    while ledger.state.handshake_deposited < HANDSHAKE_SLOTS_HELD:
        # a mark at which the pool needs nothing: the whole key goes to the slots
        mark = max(0, ledger.state.deposited_bits - ledger.state.target_bits)
        ledger.deposit(rng.bytes(SLOTS), mark_consumed_bits=mark)


def psk_pair(
    alice_ledger: AuthKeyLedger | None,
    bob_ledger: AuthKeyLedger | None,
    *,
    seed: int,
    config: ChannelConfig | None = None,
    force_bootstrap: bool = False,
) -> Wire:
    """A fresh PSK-bootstrapped pair of connections over the given ledgers (not yet started)."""
    a_cred, b_cred = credentials("psk")
    config = config or ChannelConfig(max_frame_bytes=1 << 20)
    return Wire(
        PeerConnection(
            Role.ALICE,
            credentials=a_cred,
            registry=REGISTRY,
            ledger=alice_ledger,
            config=config,
            random_bytes=seeded(seed),
            force_bootstrap=force_bootstrap,
        ),
        PeerConnection(
            Role.BOB,
            credentials=b_cred,
            registry=REGISTRY,
            ledger=bob_ledger,
            config=config,
            random_bytes=seeded(seed + 1000),
        ),
    )


def handshake(wire: Wire) -> None:
    """Run the handshake (Hello, HelloReply, Finish) to ESTABLISHED on both sides."""
    wire.put(Role.BOB, wire.alice.start_handshake())


def rotate(wire: Wire) -> None:
    """Alice announces rotation to key-derived authentication; Bob acks."""
    wire.put(Role.BOB, wire.alice.announce_rotation())
    wire.drain(Role.ALICE)
    wire.drain(Role.BOB)


def key_derived_wire(alice_ledger: AuthKeyLedger, bob_ledger: AuthKeyLedger, *, seed: int) -> Wire:
    """An established key-derived session over the ledgers (rotating first if not active)."""
    if not alice_ledger.active:
        first = psk_pair(alice_ledger, bob_ledger, seed=seed)
        handshake(first)
        rotate(first)
        seed += 1
    wire = psk_pair(alice_ledger, bob_ledger, seed=seed)
    handshake(wire)
    assert wire.alice.mode is wire.bob.mode is not None
    return wire


def clean_block(wire: Wire, block_id: int, *, data_frames: int = 1) -> list[BlockAuthenticated]:
    """One block with ``data_frames`` Data frames each way; the two BlockAuthenticated events."""
    a, b = wire.alice, wire.bob
    wire.put(Role.BOB, a.open_block(block_id))
    for n in range(data_frames):
        wire.put(Role.BOB, a.send_data(block_id, "probe", _body(n)))
        wire.put(Role.ALICE, b.send_data(block_id, "probe", _body(n + 1)))
    wire.put(Role.BOB, a.close_block(block_id))
    wire.put(Role.ALICE, b.close_block(block_id))
    wire.drain(Role.ALICE)
    wire.drain(Role.BOB)
    out = []
    for role in (Role.ALICE, Role.BOB):
        # only this block's events are new: look at the tail (long runs keep every event)
        events = [e for e in wire.events[role][-8:] if isinstance(e, BlockAuthenticated)]
        assert events and events[-1].block_id == block_id, (role, events[-3:])
        out.append(events[-1])
    return out
