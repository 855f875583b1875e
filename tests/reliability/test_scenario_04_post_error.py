"""Scenario 4: post-error state. 1,000 forged frames, then valid traffic: sequence numbers,
ledgers and key offsets unchanged by the forgeries (Trail of Bits' lesson from a Noise library
audit: a forged frame must never advance state).

A refused frame ends its connection (``ERROR`` is terminal by design), so "then valid traffic"
means what the daemon does: the next session over the same ledgers. Two parts:

- 1,000 forged frames (random type/seq/payload/tag, a genuine next frame with a flipped bit, a
  frame from another session at the right position, raw junk), each sent to a copy of Bob's
  live key-derived connection in the middle of a block: every one refused with a named error,
  Bob's counters, open blocks and ledger unchanged;
- 25 sessions over one pair of ledgers, each a clean block, then a forged frame mid-block, then
  a new session: the ledgers stay equal, and the offset moved by exactly the handshakes and
  blocks (nothing for the forgeries).
"""

from __future__ import annotations

import copy
import hmac
from typing import Any

import numpy as np
import pytest

from qkdnode.channel.auth import BLOCK_DRAW_BITS, ROTATION_KEY_BITS, Role
from qkdnode.channel.connection import ConnectionState
from qkdnode.channel.framing import NO_BLOCK, pack_frame, pack_header
from tests.reliability.memory import (
    NAMED,
    Wire,
    _body,
    clean_block,
    key_derived_wire,
    ledger_pair,
    snapshot,
)
from tests.reliability.naive import StreamingPoly1305
from tests.reliability.proxy import CODES

FORGERIES = 1000
BLOCK = 7

# Copies of a live connection (cheaper than replaying a session per forgery): OpenSSL's HMAC
# objects cannot be pickled, but copy themselves; its Poly1305 contexts cannot be copied at all,
# so the connections here run their one-time tags on the naive reference (same tags).
_HMAC_TYPE = type(hmac.new(b"k", digestmod="sha256")._hmac)  # type: ignore[attr-defined]


def _copy_hmac(value: Any, memo: dict[int, Any]) -> Any:
    return value.copy()


copy._deepcopy_dispatch[_HMAC_TYPE] = _copy_hmac  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
def _copyable_poly1305(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("qkdnode.channel.wegman_carter.Poly1305", StreamingPoly1305)


def _mid_block(seed: int) -> Wire:
    alice, bob, _, _ = ledger_pair(seed=seed, target_bits=1 << 16)
    wire = key_derived_wire(alice, bob, seed=seed + 1)
    clean_block(wire, BLOCK - 1)
    wire.put(Role.BOB, wire.alice.open_block(BLOCK))
    wire.put(Role.BOB, wire.alice.send_data(BLOCK, "probe", _body(2)))
    wire.put(Role.ALICE, wire.bob.send_data(BLOCK, "probe", _body(3)))
    return wire


def _forgery(kind: int, wire: Wire, other: Wire, rng: np.random.Generator) -> bytes:
    bob = wire.bob
    if kind == 0:  # random type, right seq, right or no block, random payload and tag
        code = int(rng.choice(list(CODES.values())))
        block = BLOCK if rng.random() < 0.5 else NO_BLOCK
        header = pack_header(code, bob.recv_seq, block)
        return pack_frame(header, rng.bytes(int(rng.integers(0, 200))), rng.bytes(32))
    if kind == 1:  # Alice's genuine next frame, one bit flipped (header, payload or tag)
        alice = copy.deepcopy(wire.alice)
        frame = bytearray(alice.send_data(BLOCK, "probe", _body(int(rng.integers(0, 50)))))
        position = int(rng.integers(4, len(frame)))
        frame[position] ^= 1 << int(rng.integers(0, 8))
        return bytes(frame)
    if kind == 2:  # a genuine frame of another session, at the right position
        alice = copy.deepcopy(other.alice)
        return alice.send_data(BLOCK, "probe", _body(int(rng.integers(0, 50))))
    # raw junk behind a length prefix that fits the frame limits
    size = int(rng.integers(17, 120))
    return size.to_bytes(4, "big") + rng.bytes(size)


@pytest.mark.slow  # runs long
def test_1000_forged_frames_leave_bob_exactly_as_before() -> None:
    rng = np.random.default_rng(4)
    wire = _mid_block(40)
    other = _mid_block(41)  # same script, other ledgers and session keys
    before = snapshot(wire.bob)
    kinds = {0: 0, 1: 0, 2: 0, 3: 0}
    for index in range(FORGERIES):
        kind = index % 4
        frame = _forgery(kind, wire, other, rng)
        bob = copy.deepcopy(wire.bob)
        with pytest.raises(NAMED):
            bob.receive_data(frame)
            bob.next_event(now_s=0.0)
        assert snapshot(bob) == before, (index, kind)
        assert bob.state is ConnectionState.ERROR
        kinds[kind] += 1
    assert sum(kinds.values()) == FORGERIES and min(kinds.values()) == FORGERIES // 4
    # the live connection, untouched by the copies, carries on with valid traffic
    wire.put(Role.BOB, wire.alice.close_block(BLOCK))
    wire.put(Role.ALICE, wire.bob.close_block(BLOCK))
    wire.drain(Role.ALICE)
    wire.drain(Role.BOB)
    assert wire.bob.state is ConnectionState.ESTABLISHED
    assert wire.alice.ledger is not None and wire.bob.ledger is not None
    assert wire.alice.ledger.state == wire.bob.ledger.state


def test_sessions_ended_by_forgeries_leave_the_ledgers_equal_and_offsets_exact() -> None:
    rng = np.random.default_rng(44)
    alice, bob, _, _ = ledger_pair(seed=44, target_bits=1 << 17)
    sessions = 25
    start = None
    block_id = 0
    for session in range(sessions):
        wire = key_derived_wire(alice, bob, seed=400 + 10 * session)
        if start is None:
            start = alice.consumed_bits  # after rotation (handshakes use their own key stream)
        clean_block(wire, block_id)
        wire.put(Role.BOB, wire.alice.open_block(block_id + 1))
        before = snapshot(wire.bob)
        frame = pack_frame(
            pack_header(CODES["data"], wire.bob.recv_seq, block_id + 1),
            rng.bytes(40),
            rng.bytes(32),
        )
        with pytest.raises(NAMED):
            wire.bob.receive_data(frame)
            wire.bob.next_event(now_s=0.0)
        assert snapshot(wire.bob) == before
        block_id += 2
    assert start is not None
    # next session: valid traffic over the same ledgers
    wire = key_derived_wire(alice, bob, seed=9999)
    clean_block(wire, block_id)
    assert alice.state == bob.state
    blocks = 2 * sessions + 1
    expected = start + blocks * BLOCK_DRAW_BITS
    assert alice.consumed_bits == expected, (alice.consumed_bits, expected)
    assert start == ROTATION_KEY_BITS  # the first session's rotation, nothing else before
    # every session used one handshake slot of its own, the same one on both sides
    assert alice.handshake_first == bob.handshake_first
