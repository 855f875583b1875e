"""Scenario 18: limits, WireGuard-style: refused exactly at the first value over the limit,
accepted at the limit itself (one below the refused value).

Every limit is checked on the *receiving* side (a peer that ignores its own limits): the sender
is built with a looser configuration or registry. Limits: frame size (``max_frame_bytes``, on
the length prefix), bytes per feed (``max_feed_bytes``), field lengths (the kind's schema), open
blocks (``max_open_blocks``), block transcript length per one-time tag (``max_block_chunks``,
which sets the tag's forgery bound), a peer's ledger offset (at most every bit deposited here),
and session age (``max_session_age_s``).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from qkdnode.channel.auth import Role
from qkdnode.channel.connection import ChannelConfig, ConnectionState, PeerConnection
from qkdnode.channel.framing import LENGTH_BYTES, FrameReader
from qkdnode.channel.messages import FieldSpec, KindRegistry
from qkdnode.errors import ProtocolError
from tests.helpers_pki import NOW_S
from tests.reliability.memory import (
    NAMED,
    Wire,
    credentials,
    handshake,
    key_derived_wire,
    ledger_pair,
    seeded,
)

FRAME_LIMIT = 100_000
BLOB_LIMIT = 70_000


def _registry(blob_max: int) -> KindRegistry:
    registry = KindRegistry()
    registry.register(
        "big",
        {"blob": FieldSpec(kind="bytes", max_len=blob_max)},
    )
    return registry


def _psk_wire(
    *,
    alice_config: ChannelConfig,
    bob_config: ChannelConfig,
    alice_blob_max: int = 1 << 20,
    bob_blob_max: int = 1 << 20,
    ledgers: tuple[object, object] = (None, None),
    seed: int = 18,
) -> Wire:
    a_cred, b_cred = credentials("psk")
    return Wire(
        PeerConnection(
            Role.ALICE,
            credentials=a_cred,
            registry=_registry(alice_blob_max),
            ledger=ledgers[0],  # type: ignore[arg-type]
            config=alice_config,
            random_bytes=seeded(seed),
        ),
        PeerConnection(
            Role.BOB,
            credentials=b_cred,
            registry=_registry(bob_blob_max),
            ledger=ledgers[1],  # type: ignore[arg-type]
            config=bob_config,
            random_bytes=seeded(seed + 1),
        ),
    )


def _deliver(conn: PeerConnection, frame: bytes) -> None:
    conn.receive_data(frame)
    conn.next_event(now_s=NOW_S)


def _established(bob_frame_limit: int) -> Wire:
    wire = _psk_wire(
        alice_config=ChannelConfig(max_frame_bytes=1 << 20),
        bob_config=ChannelConfig(max_frame_bytes=bob_frame_limit),
    )
    handshake(wire)
    return wire


@pytest.mark.parametrize("length", [FRAME_LIMIT, FRAME_LIMIT + 1])
def test_frame_size_accepted_at_the_limit_refused_one_over(length: int) -> None:
    # the overhead of a Control "big" frame (header, msgpack, tag) from a twin session
    twin = _established(FRAME_LIMIT).alice.send_control("big", {"blob": bytes(70_000)})
    overhead = len(twin) - LENGTH_BYTES - 70_000
    wire = _established(FRAME_LIMIT)
    frame = wire.alice.send_control("big", {"blob": bytes(length - overhead)})
    assert int.from_bytes(frame[:LENGTH_BYTES], "big") == length
    if length <= FRAME_LIMIT:
        _deliver(wire.bob, frame)
        assert wire.bob.recv_seq == 3 and wire.bob.state is ConnectionState.ESTABLISHED
    else:
        with pytest.raises(ProtocolError) as refused:
            _deliver(wire.bob, frame)
        assert refused.value.field == "length"
        assert wire.bob.recv_seq == 2


@pytest.mark.parametrize("size", [BLOB_LIMIT, BLOB_LIMIT + 1])
def test_field_length_accepted_at_the_limit_refused_one_over(size: int) -> None:
    config = ChannelConfig(max_frame_bytes=1 << 20)
    wire = _psk_wire(alice_config=config, bob_config=config, bob_blob_max=BLOB_LIMIT)
    handshake(wire)
    frame = wire.alice.send_control("big", {"blob": bytes(size)})
    if size <= BLOB_LIMIT:
        _deliver(wire.bob, frame)
        assert wire.bob.recv_seq == 3
    else:
        with pytest.raises(ProtocolError) as refused:
            _deliver(wire.bob, frame)
        assert refused.value.field == "body.blob"
        assert wire.bob.recv_seq == 2


@pytest.mark.parametrize("size", [1 << 16, (1 << 16) + 1])
def test_bytes_per_feed_accepted_at_the_limit_refused_one_over(size: int) -> None:
    reader = FrameReader(max_frame_bytes=1 << 20, max_feed_bytes=1 << 16)
    if size <= 1 << 16:
        reader.feed(bytes(size))
        assert reader.buffered_bytes == size
    else:
        with pytest.raises(ProtocolError):
            reader.feed(bytes(size))
        assert reader.buffered_bytes == 0


@pytest.mark.parametrize("limit", [1, 4])
def test_open_blocks_accepted_up_to_the_limit_refused_one_over(limit: int) -> None:
    wire = _psk_wire(
        alice_config=ChannelConfig(max_frame_bytes=1 << 20, max_open_blocks=limit + 1),
        bob_config=ChannelConfig(max_frame_bytes=1 << 20, max_open_blocks=limit),
    )
    handshake(wire)
    for block_id in range(limit):
        _deliver(wire.bob, wire.alice.open_block(block_id))
    assert len(wire.bob.open_blocks) == limit
    with pytest.raises(ProtocolError) as refused:
        _deliver(wire.bob, wire.alice.open_block(limit))
    assert refused.value.field == "block_id"
    assert len(wire.bob.open_blocks) == limit


@pytest.mark.parametrize("over_bytes", [0, 1])
def test_block_transcript_accepted_at_the_chunk_limit_refused_one_over(over_bytes: int) -> None:
    """The transcript (records with their u64 lengths, and room for the close record) may
    fill ``16 * max_block_chunks`` bytes, the length the forgery bound assumes, exactly."""
    limit = 400
    alice_ledger, bob_ledger, _, _ = ledger_pair(seed=18, target_bits=1 << 16)
    first = key_derived_wire(alice_ledger, bob_ledger, seed=180)  # rotates the ledgers
    del first
    # one byte over: Alice ignores the limit (the ledgers then record other bounds, so that
    # block could not close); at the limit both keep it and the block closes
    loose = ChannelConfig(max_frame_bytes=1 << 20)
    limited = ChannelConfig(max_frame_bytes=1 << 20, max_block_chunks=limit)
    wire = _psk_wire(
        alice_config=loose if over_bytes else limited,
        bob_config=limited,
        ledgers=(alice_ledger, bob_ledger),
        seed=181,
    )
    handshake(wire)
    _deliver(wire.bob, wire.alice.open_block(0))
    # the close record: "close", block id and frame count as u64, the 32-byte fingerprint
    close_room = 8 + 5 + 16 + 32
    used = 0
    for size in (1000, 2000):
        frame = wire.alice.send_data(0, "big", {"blob": bytes(size)})
        record = len(frame) - LENGTH_BYTES - 32  # header + payload; the 32-byte MAC is not hashed
        _deliver(wire.bob, frame)
        used += 8 + record
    overhead = record - 2000  # header and msgpack framing of a blob of 256..65535 bytes
    size = 16 * limit - close_room - used - 8 - overhead + over_bytes
    assert 256 <= size < 65536
    last = wire.alice.send_data(0, "big", {"blob": bytes(size)})
    assert len(last) - LENGTH_BYTES - 32 == overhead + size
    if over_bytes:
        with pytest.raises(ProtocolError) as refused:
            _deliver(wire.bob, last)
        assert refused.value.field == "block"
        return
    _deliver(wire.bob, last)
    # the full transcript still gets its tag, and it verifies
    _deliver(wire.bob, wire.alice.close_block(0))
    _deliver(wire.alice, wire.bob.close_block(0))
    assert wire.bob.open_blocks == wire.alice.open_blocks == ()


@pytest.mark.parametrize("past_deposits_bytes", [0, 1])
def test_a_peer_offset_up_to_every_deposited_bit_is_accepted_one_byte_past_refused(
    past_deposits_bytes: int,
) -> None:
    """How far a peer's ledger is ahead only says how many sessions died mid-block, so any
    distance resynchronises; an offset past every bit deposited here is no honest peer's."""
    alice_ledger, bob_ledger, _, _ = ledger_pair(seed=181, target_bits=1 << 16)
    key_derived_wire(alice_ledger, bob_ledger, seed=182)
    # Alice spends her whole pool in sessions Bob never saw (the sync burns it on his side)
    alice_ledger.draw(alice_ledger.level_bits, "lost sessions", allow_reserve=True)
    assert alice_ledger.consumed_bits == bob_ledger.state.deposited_bits
    if past_deposits_bytes:
        alice_ledger._state = replace(
            alice_ledger.state,
            consumed_bits=alice_ledger.consumed_bits + 8 * past_deposits_bytes,
        )
    config = ChannelConfig(max_frame_bytes=1 << 20)
    wire = _psk_wire(
        alice_config=config, bob_config=config, ledgers=(alice_ledger, bob_ledger), seed=183
    )
    if not past_deposits_bytes:
        handshake(wire)
        assert wire.bob.state is ConnectionState.ESTABLISHED
        assert alice_ledger.state == bob_ledger.state
    else:
        first_key = bob_ledger.handshake_first
        with pytest.raises(NAMED) as refused:
            handshake(wire)
        assert getattr(refused.value, "field", None) == "ledger_consumed_bits"
        assert bob_ledger.handshake_first == first_key  # refused before a key is used


def test_a_session_older_than_any_sane_limit_is_refused() -> None:
    """A session's control keys do not authenticate frames for ever: an old session is refused."""
    config = ChannelConfig(max_frame_bytes=1 << 20)
    wire = _psk_wire(alice_config=config, bob_config=config)
    handshake(wire)
    frame = wire.alice.send_control("big", {"blob": b"late"})
    wire.bob.receive_data(frame)
    ten_years_s = 10 * 365 * 86400.0
    with pytest.raises(NAMED):
        wire.bob.next_event(now_s=NOW_S + ten_years_s)
