"""Scenario 6: authentication-key starvation.

In memory, a key-derived pair with a small pool runs blocks without refilling: the pool level
never goes below the reserve for block keys and never below zero for handshakes; when the pool
cannot pay, Alice's ``open_block`` raises ``AuthKeyExhausted`` and queues ``PoolExhausted``
(the starving state), no block opens (so no key can be distilled), and Bob
refuses a block his pool cannot pay for. The node's reaction is checked with the real classes:
the session shell (``Exchange``) logs ``auth.pool_exhausted`` at ERROR, names the operator's
re-bootstrap, ends that session and keeps the daemon running; the next session the daemon
builds (``Node.make_connection``) is key-derived again, never bootstrap. Handshake keys come
from their own stream: running out of them refuses the handshake, never downgrades it.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest
import structlog.testing
import trio

from qkdnode.channel.auth import BLOCK_DRAW_BITS
from qkdnode.channel.connection import PoolExhausted
from qkdnode.channel.ledger import HANDSHAKE_KEYS_PER_SLOT
from qkdnode.channel.messages import SessionMode
from qkdnode.errors import AuthKeyExhausted
from qkdnode.node.daemon import DaemonMustStop, Node, SessionEnded
from qkdnode.node.exchange import Exchange
from tests.reliability.memory import (
    clean_block,
    credentials,
    handshake,
    key_derived_wire,
    ledger_pair,
    psk_pair,
)

TARGET_BITS = 16 * 1024
RESERVE_BITS = 2 * 1024


def test_pool_runs_dry_without_going_below_the_reserve_and_opens_no_block() -> None:
    alice, bob, _, _ = ledger_pair(seed=6, target_bits=TARGET_BITS, reserve_bits=RESERVE_BITS)
    wire = key_derived_wire(alice, bob, seed=60)
    levels = []
    block_id = 0
    while True:
        try:
            clean_block(wire, block_id)
        except AuthKeyExhausted:
            break
        levels.append((alice.level_bits, bob.level_bits))
        block_id += 1
        assert block_id < 100, "the pool never ran dry"
    assert all(a >= RESERVE_BITS and b >= RESERVE_BITS for a, b in levels)
    # the starving state: an event; no block opened (Alice and Bob alike)
    event = wire.alice.next_event(now_s=0.0)
    assert isinstance(event, PoolExhausted)
    assert event.needed_bits == BLOCK_DRAW_BITS
    assert event.level_bits == alice.level_bits < RESERVE_BITS + BLOCK_DRAW_BITS
    assert wire.alice.open_blocks == () and wire.bob.open_blocks == ()
    assert alice.state == bob.state
    # Bob refuses a BlockOpen his pool cannot pay for (a peer that ignores its own limit)
    forged_alice = wire.alice
    forged_alice.ledger = None  # pretend Alice's side could pay: send the open anyway
    forged_alice._mode = SessionMode.PSK
    frame = forged_alice.open_block(block_id)
    with pytest.raises(AuthKeyExhausted):
        wire.bob.receive_data(frame)
        wire.bob.next_event(now_s=0.0)
    assert bob.level_bits >= RESERVE_BITS


def test_running_out_of_handshake_keys_never_falls_back_to_bootstrap() -> None:
    """Handshake keys come from their own stream: each session uses one key and no pool bit;
    with none left Bob refuses without a proof, and Alice's next Hello is key-derived again."""
    alice, bob, _, _ = ledger_pair(seed=66, target_bits=TARGET_BITS, reserve_bits=RESERVE_BITS)
    key_derived_wire(alice, bob, seed=61)
    pool = (alice.consumed_bits, alice.level_bits)
    for session in range(20):
        first = bob.handshake_first
        wire = psk_pair(alice, bob, seed=700 + session)
        handshake(wire)
        assert wire.alice.mode is SessionMode.KEY_DERIVED
        assert alice.handshake_first == bob.handshake_first == first + 1  # one key each
    assert (alice.consumed_bits, alice.level_bits) == pool  # no pool bit for handshakes
    assert alice.state == bob.state
    # every key of every slot held used up (no attacker gets this far: 2^16 keys a slot)
    last = bob.state.handshake_deposited * HANDSHAKE_KEYS_PER_SLOT - 1
    for ledger in (alice, bob):
        ledger.burn_handshake_through(last)
    assert bob.responder_handshake_index() is None
    wire = psk_pair(alice, bob, seed=799)
    with pytest.raises(AuthKeyExhausted):
        handshake(wire)
    assert wire.alice._handshake is not None
    assert wire.alice._handshake.mode is SessionMode.KEY_DERIVED  # never a bootstrap Hello


class _Session:
    """A session whose event stream yields one ``PoolExhausted``."""

    connection = SimpleNamespace(mode=None)

    def __init__(self) -> None:
        self.events: list[object] = [PoolExhausted(level_bits=1024, needed_bits=BLOCK_DRAW_BITS)]

    async def next_event(self) -> object:
        if self.events:
            return self.events.pop()
        await trio.sleep_forever()
        raise AssertionError


async def test_the_daemon_reports_starvation_and_keeps_running(
    node_factory: Callable[[str], Node],
) -> None:
    node = node_factory("alice")
    exchange = Exchange(node, _Session())  # type: ignore[arg-type]
    errors: list[BaseException] = []
    with structlog.testing.capture_logs() as logs:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(exchange._pump, nursery)
        except BaseExceptionGroup as group:
            errors.extend(group.exceptions)
    # the session ends (the channel refused the block); the daemon does not stop
    assert errors and all(isinstance(e, SessionEnded) for e in errors), errors
    assert not any(isinstance(e, DaemonMustStop) for e in errors)
    reported = [e for e in logs if e["event"] == "auth.pool_exhausted"]
    assert reported and reported[0]["log_level"] == "error"
    assert "qkdnode auth rebootstrap" in reported[0]["detail"]


def test_after_exhaustion_the_next_daemon_session_is_key_derived_again(
    node_factory: Callable[[str], Node],
) -> None:
    """An exhausted pool never brings the bootstrap credentials back."""
    alice, bob, _, _ = ledger_pair(seed=67, target_bits=TARGET_BITS, reserve_bits=RESERVE_BITS)
    wire = key_derived_wire(alice, bob, seed=62)
    block_id = 0
    with pytest.raises(AuthKeyExhausted):
        while True:
            clean_block(wire, block_id)
            block_id += 1
    event = wire.alice.next_event(now_s=0.0)
    assert isinstance(event, PoolExhausted)
    node = node_factory("alice")
    node.credentials = credentials("psk")[0]
    node.ledger = alice
    node.make_connection()  # the exhausted session's connection
    with pytest.raises(SessionEnded):
        Exchange(node, _Session())._on_channel_exhausted(event)  # type: ignore[arg-type]
    connection = node.make_connection()
    retry = psk_pair(None, bob, seed=63)
    retry.alice = connection
    handshake(retry)
    assert connection.mode is SessionMode.KEY_DERIVED
    # both nodes' status says so, each from its own ledger, until a block can open again
    for name, ledger in (("alice", alice), ("bob", bob)):
        status_node = node_factory(name)
        status_node.ledger = ledger
        summary = status_node.metrics.summary()
        assert summary["pool_exhausted"], name
        assert any("exhausted" in problem for problem in summary["problems"]), name
