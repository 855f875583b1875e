"""Scenario 6: authentication-key starvation.

In memory, a key-derived pair with a small pool runs blocks without refilling: the pool level
never goes below the reserve for block keys and never below zero for handshakes; when the pool
cannot pay, Alice's ``open_block`` raises ``AuthKeyExhausted`` and queues ``PoolExhausted``
(the starving state, with the policy), no block opens (so no key can be distilled), and Bob
refuses a block his pool cannot pay for. The node's reaction is checked with the real classes:
the coordination machine stops opening blocks and applies the policy; the session shell
(``Exchange``) turns ``halt`` into ``DaemonMustStop`` and ``rebootstrap`` into the end of the
session, with an ``auth.pool_exhausted`` error log line either way. The next session the daemon
builds (``Node.make_connection``) must then bootstrap without spending pool bits.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from types import SimpleNamespace
from typing import Any

import pytest
import structlog.testing
import trio

from qkdnode.channel.auth import BLOCK_DRAW_BITS, HANDSHAKE_KEY_BITS
from qkdnode.channel.connection import PoolExhausted
from qkdnode.channel.messages import SessionMode
from qkdnode.errors import AuthKeyExhausted, QkdError
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
    # the starving state: an event with the policy; no block opened (Alice and Bob alike)
    event = wire.alice.next_event(now_s=0.0)
    assert isinstance(event, PoolExhausted)
    assert event.policy == "rebootstrap" and event.needed_bits == BLOCK_DRAW_BITS
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


def test_handshakes_may_use_the_reserve_but_never_go_below_zero() -> None:
    alice, bob, _, _ = ledger_pair(seed=66, target_bits=TARGET_BITS, reserve_bits=RESERVE_BITS)
    key_derived_wire(alice, bob, seed=61)
    modes = []
    for session in range(TARGET_BITS // HANDSHAKE_KEY_BITS + 2):
        wire = psk_pair(alice, bob, seed=700 + session)
        handshake(wire)
        modes.append(wire.alice.mode)
        assert alice.level_bits >= 0 and bob.level_bits >= 0
    assert modes[0] is SessionMode.KEY_DERIVED
    assert modes[-1] is SessionMode.PSK  # below one handshake key: bootstrap mode
    assert alice.level_bits < HANDSHAKE_KEY_BITS and alice.state == bob.state


class _Session:
    """A session whose event stream yields one ``PoolExhausted``."""

    connection = SimpleNamespace(mode=None)

    def __init__(self, policy: str) -> None:
        self.events: list[object] = [
            PoolExhausted(policy=policy, level_bits=1024, needed_bits=BLOCK_DRAW_BITS)  # type: ignore[arg-type]
        ]

    async def next_event(self) -> object:
        if self.events:
            return self.events.pop()
        await trio.sleep_forever()
        raise AssertionError


async def _exhaust(
    node: Node, policy: str
) -> tuple[list[BaseException], list[MutableMapping[str, Any]]]:
    exchange = Exchange(node, _Session(policy))  # type: ignore[arg-type]
    errors: list[BaseException] = []
    with structlog.testing.capture_logs() as logs:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(exchange._pump, nursery)
        except BaseExceptionGroup as group:
            errors.extend(group.exceptions)
        except Exception as error:
            errors.append(error)
    return errors, logs


@pytest.mark.parametrize("policy", ["halt", "rebootstrap"])
async def test_the_daemon_reports_starvation_and_applies_its_policy(
    policy: str, node_factory: Callable[[str], Node]
) -> None:
    node = node_factory("alice")
    errors, logs = await _exhaust(node, policy)
    expected = DaemonMustStop if policy == "halt" else SessionEnded
    assert errors and all(isinstance(e, expected) for e in errors), errors
    if policy == "halt":
        assert not any(isinstance(e, QkdError) for e in errors)  # never retried as a session
    reported = [e for e in logs if e["event"] == "auth.pool_exhausted"]
    assert reported and reported[0]["log_level"] == "error" and reported[0]["policy"] == policy


def test_after_exhaustion_the_next_daemon_session_bootstraps_without_pool_bits(
    node_factory: Callable[[str], Node],
) -> None:
    """After exhaustion the daemon's next session bootstraps instead of paying from the pool."""
    alice, bob, _, _ = ledger_pair(seed=67, target_bits=TARGET_BITS, reserve_bits=RESERVE_BITS)
    wire = key_derived_wire(alice, bob, seed=62)
    block_id = 0
    with pytest.raises(AuthKeyExhausted):
        while True:
            clean_block(wire, block_id)
            block_id += 1
    event = wire.alice.next_event(now_s=0.0)
    assert isinstance(event, PoolExhausted)
    level = alice.level_bits
    # a real daemon node over these ledgers: its policy applied to the event, then its next
    # connection
    node = node_factory("alice")
    node.credentials = credentials("psk")[0]
    node.ledger = alice
    node.make_connection()  # the exhausted session's connection
    with pytest.raises(SessionEnded):
        Exchange(node, _Session("rebootstrap"))._on_channel_exhausted(event)  # type: ignore[arg-type]
    connection = node.make_connection()
    assert connection.config.on_exhausted == "rebootstrap"
    retry = psk_pair(None, bob, seed=63)
    retry.alice = connection
    handshake(retry)
    # re-bootstrap: the certificate/PSK handshake, no pool bits spent on a futile session
    assert connection.mode is not SessionMode.KEY_DERIVED
    assert alice.level_bits == level
