"""Channel test helpers: two connections over an in-memory wire, seeded credentials, ledgers."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest

from qkdnode.channel.auth import (
    CertificateCredentials,
    PskCredentials,
    Role,
    WebOfTrustCredentials,
)
from qkdnode.channel.connection import (
    NEED_DATA,
    ChannelConfig,
    ConnectionState,
    Event,
    NeedData,
    PeerConnection,
)
from qkdnode.channel.ledger import (
    HANDSHAKE_SLOT_BYTES,
    HANDSHAKE_SLOTS_PER_DEPOSIT,
    AuthKeyLedger,
    DrawRecord,
)
from qkdnode.channel.messages import (
    FieldSpec,
    KindRegistry,
)
from qkdnode.errors import (
    AuthenticationFailed,
    AuthKeyExhausted,
    CertificateRejected,
    ProtocolError,
    QkdError,
)
from tests.helpers_pki import NOW_S, credentials_pair

TARGET_BITS = 64 * 1024

Creds = CertificateCredentials | PskCredentials | WebOfTrustCredentials


RESERVE_BITS = 4 * 1024


NAMED_ERRORS = (ProtocolError, AuthenticationFailed, CertificateRejected, AuthKeyExhausted)


def make_registry() -> KindRegistry:
    registry = KindRegistry()
    registry.register(
        "cascade_query",
        {
            "pass_index": FieldSpec(kind="int", min_value=0, max_value=64),
            "ranges": FieldSpec(kind="bytes", max_len=1 << 20),
        },
    )
    registry.register(
        "estimate",
        {
            "qber": FieldSpec(kind="float", min_value=0.0, max_value=0.5),
            "ok": FieldSpec(kind="bool"),
        },
    )
    return registry


REGISTRY = make_registry()


def seeded_bytes(seed: int) -> Callable[[int], bytes]:
    rng = np.random.default_rng(seed)
    return lambda n: rng.bytes(n)


class Pair:
    """Alice and Bob joined by a fake wire; ``send`` delivers and answers until quiet."""

    def __init__(self, alice: PeerConnection, bob: PeerConnection, now_s: float = NOW_S) -> None:
        self.alice, self.bob = alice, bob
        self.events: dict[Role, list[Event]] = {Role.ALICE: [], Role.BOB: []}
        self.now_s = now_s  # the clock both ends read

    def end(self, role: Role) -> PeerConnection:
        return self.alice if role is Role.ALICE else self.bob

    def deliver(self, to: Role, data: bytes) -> list[Event]:
        """Feed ``data`` to ``to``, collect its events, carry any automatic replies across."""
        conn = self.end(to)
        conn.receive_data(data)
        got: list[Event] = []
        while True:
            event = conn.next_event(now_s=self.now_s)
            if isinstance(event, NeedData):
                break
            got.append(event)
        self.events[to].extend(got)
        reply = conn.data_to_send()
        if reply:
            self.deliver(to.peer, reply)
        return got

    def drain(self, role: Role) -> None:
        """Collect events a local call queued (e.g. BlockAuthenticated after close_block)."""
        conn = self.end(role)
        while not isinstance(event := conn.next_event(now_s=self.now_s), NeedData):
            self.events[role].append(event)

    def handshake(self) -> None:
        self.deliver(Role.BOB, self.alice.start_handshake())

    def run_block(self, block_id: int, rounds: int = 2, payload_bytes: int = 24) -> None:
        self.deliver(Role.BOB, self.alice.open_block(block_id))
        for i in range(rounds):
            body: dict[str, int | float | bool | bytes] = {
                "pass_index": i,
                "ranges": bytes(payload_bytes),
            }
            self.deliver(Role.BOB, self.alice.send_data(block_id, "cascade_query", body))
            self.deliver(Role.ALICE, self.bob.send_data(block_id, "cascade_query", body))
        self.deliver(Role.BOB, self.alice.close_block(block_id))
        self.deliver(Role.ALICE, self.bob.close_block(block_id))
        self.drain(Role.BOB)


def funded_ledger(
    seed: int = 7, observer: Callable[[DrawRecord], None] | None = None
) -> AuthKeyLedger:
    ledger = AuthKeyLedger(target_bits=TARGET_BITS, reserve_bits=RESERVE_BITS, observer=observer)
    # the pool's target, then one deposit's handshake-key slots
    material = TARGET_BITS // 8 + HANDSHAKE_SLOTS_PER_DEPOSIT * HANDSHAKE_SLOT_BYTES
    ledger.deposit(np.random.default_rng(seed).bytes(material), mark_consumed_bits=0)
    return ledger


def make_creds(mode: str) -> tuple[Creds, Creds]:
    if mode == "psk":
        psk = bytes(range(32))
        return PskCredentials(psk=psk), PskCredentials(psk=psk)
    alice_c, bob_c, _ = credentials_pair(mode)
    return alice_c, bob_c


def make_pair(
    mode: str,
    *,
    ledgers: tuple[AuthKeyLedger | None, AuthKeyLedger | None] = (None, None),
    config: ChannelConfig | None = None,
    creds: tuple[Creds, Creds] | None = None,
    seed: int = 1,
    now_s: float = NOW_S,
) -> Pair:
    a_cred, b_cred = creds if creds is not None else make_creds(mode)
    alice = PeerConnection(
        Role.ALICE,
        credentials=a_cred,
        registry=REGISTRY,
        ledger=ledgers[0],
        config=config,
        random_bytes=seeded_bytes(seed),
    )
    bob = PeerConnection(
        Role.BOB,
        credentials=b_cred,
        registry=REGISTRY,
        ledger=ledgers[1],
        config=config,
        random_bytes=seeded_bytes(seed + 1000),
    )
    return Pair(alice, bob, now_s)


def snapshot(conn: PeerConnection) -> tuple[object, ...]:
    ledger = conn.ledger
    return (
        conn.send_seq,
        conn.recv_seq,
        conn.open_blocks,
        None if ledger is None else ledger.state,
    )


def rotated_pair(
    mode: str = "psk", *, observers: tuple[list[DrawRecord], list[DrawRecord]] | None = None
) -> Pair:
    obs_a = observers[0].append if observers else None
    obs_b = observers[1].append if observers else None
    pair = make_pair(mode, ledgers=(funded_ledger(observer=obs_a), funded_ledger(observer=obs_b)))
    pair.handshake()
    pair.deliver(Role.BOB, pair.alice.announce_rotation())
    return pair


def assert_rejected(
    conn: PeerConnection,
    data: bytes,
    error: type[QkdError] | tuple[type[QkdError], ...],
    now_s: float = NOW_S,
) -> QkdError:
    before = snapshot(conn)
    conn.receive_data(data)
    with pytest.raises(error) as info:
        while conn.next_event(now_s=now_s) is not NEED_DATA:
            pass
    assert snapshot(conn) == before
    assert conn.state is ConnectionState.ERROR
    return info.value


def established(mode: str) -> Pair:
    if mode == "key_derived":
        pair = rotated_pair()
    else:
        pair = make_pair(mode)
        pair.handshake()
    pair.deliver(Role.BOB, pair.alice.open_block(7))
    return pair


def flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]


def offsets(length: int, every: bool) -> Iterator[int]:
    if every:
        yield from range(length)
    else:  # large ML-DSA frames: every header byte, then a stride
        yield from range(min(length, 40))
        yield from range(40, length, 53)
