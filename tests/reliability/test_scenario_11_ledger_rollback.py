"""Scenario 11: the authentication-key store rolled back or lost.

A node whose ledger was restored from an older state (a backup, a rolled-back disk) or lost
(a fresh store) must refuse the key-derived mode rather than reuse one-time key, and may only
re-bootstrap by an operator's action. In memory with ``PeerConnection`` pairs over persisted ledger
states (``LedgerState``, what the store keeps):

- rolled back across a deposit: the deposit history differs, the key-derived handshake is refused
  with a named error, and neither side spends a pool bit;
- rolled back across draws only: the handshake resynchronises to the peer's (larger) offset,
  so no bit before it is ever drawn again;
- lost: the node has no active ledger and refuses key-derived mode.
Then the daemon's next session (``Node.make_connection``) is key-derived again, never
bootstrap: only an operator's re-bootstrap permit (``qkdnode auth rebootstrap``) brings the
bootstrap credentials back.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest

from qkdnode.channel.ledger import AuthKeyLedger, ledger_state_from_bytes, ledger_state_to_bytes
from qkdnode.channel.messages import SessionMode
from qkdnode.errors import ProtocolError
from qkdnode.node import rebootstrap
from qkdnode.node.daemon import Node
from tests.reliability.memory import (
    NAMED,
    RecordingLedger,
    clean_block,
    credentials,
    handshake,
    key_derived_wire,
    ledger_pair,
    psk_pair,
)

TARGET_BITS = 1 << 16


def _restore(saved: bytes) -> RecordingLedger:
    state = ledger_state_from_bytes(saved)
    return RecordingLedger(
        target_bits=state.target_bits, reserve_bits=state.reserve_bits, state=state
    )


def test_rolled_back_across_a_deposit_refuses_key_derived_mode() -> None:
    alice, bob, _, _ = ledger_pair(seed=11, target_bits=TARGET_BITS)
    wire = key_derived_wire(alice, bob, seed=110)
    backup = ledger_state_to_bytes(bob.state)
    auth = clean_block(wire, 0)
    fresh = np.random.default_rng(11).bytes(512)
    alice.deposit(fresh, mark_consumed_bits=auth[0].ledger_mark_bits)
    bob.deposit(fresh, mark_consumed_bits=auth[1].ledger_mark_bits)
    restored = _restore(backup)
    alice_before, bob_before = alice.state, restored.state
    retry = psk_pair(alice, restored, seed=111)
    with pytest.raises(ProtocolError) as refused:
        handshake(retry)
    assert refused.value.field == "ledger_deposit_digest"
    assert alice.state == alice_before and restored.state == bob_before  # nothing spent


def test_rolled_back_across_draws_only_resynchronises_forward() -> None:
    alice, bob, _, _ = ledger_pair(seed=12, target_bits=TARGET_BITS)
    wire = key_derived_wire(alice, bob, seed=120)
    backup = ledger_state_to_bytes(bob.state)
    for block_id in range(2):
        clean_block(wire, block_id)  # draws only: no deposit after the backup
    used_up_to = bob.consumed_bits
    restored = _restore(backup)
    assert restored.consumed_bits < used_up_to
    retry = psk_pair(alice, restored, seed=121)
    handshake(retry)
    assert retry.bob.mode is SessionMode.KEY_DERIVED
    clean_block(retry, 2)
    # every draw after the restore lies beyond everything drawn before it
    assert restored.drawn and min(offset for offset, _ in restored.drawn) >= used_up_to
    assert restored.state == alice.state


def test_a_lost_ledger_refuses_key_derived_mode() -> None:
    alice, bob, _, _ = ledger_pair(seed=13, target_bits=TARGET_BITS)
    key_derived_wire(alice, bob, seed=130)
    lost = AuthKeyLedger(target_bits=TARGET_BITS, reserve_bits=bob.state.reserve_bits)
    before = alice.state
    retry = psk_pair(alice, lost, seed=131)
    with pytest.raises(NAMED) as refused:
        handshake(retry)
    assert getattr(refused.value, "field", None) == "ledger_deposit_digest"
    assert alice.state == before and lost.consumed_bits == 0


def test_after_a_refused_key_derived_handshake_only_an_operator_brings_bootstrap_back(
    node_factory: Callable[[str], Node],
) -> None:
    """After a refused key-derived handshake the daemon tries key-derived again, never the
    bootstrap credentials; an operator's re-bootstrap permit makes the next one bootstrap."""
    alice, bob, _, _ = ledger_pair(seed=14, target_bits=TARGET_BITS)
    key_derived_wire(alice, bob, seed=140)
    lost = AuthKeyLedger(target_bits=TARGET_BITS, reserve_bits=bob.state.reserve_bits)
    node = node_factory("alice")
    node.credentials = credentials("psk")[0]
    node.ledger = alice
    refused = psk_pair(None, lost, seed=141)
    refused.alice = node.make_connection()
    with pytest.raises(NAMED):
        handshake(refused)
    assert refused.alice.mode is None  # the key-derived handshake never got through
    again = psk_pair(None, lost, seed=142)
    again.alice = node.make_connection()
    with pytest.raises(NAMED):
        handshake(again)  # key-derived again, refused again: no downgrade
    assert again.alice.mode is None
    rebootstrap.grant(node.config.store.directory, now_s=time.time())
    try:
        retry = psk_pair(None, lost, seed=143)
        retry.alice = node.make_connection()
        handshake(retry)  # Bob's lost ledger is inactive: his bootstrap window is open
        assert retry.alice.mode is SessionMode.PSK
    finally:
        rebootstrap.use_up(node.config.store.directory)
