"""What the node does when the peer refuses key-derived authentication: it tries key-derived
again, never the bootstrap credentials; only an operator's re-bootstrap on both nodes gives one
bootstrap session, in which both ledgers are reset."""

from __future__ import annotations

from typing import Any

import numpy as np

from qkdnode.channel.auth import PskCredentials, Role
from qkdnode.channel.connection import ChannelConfig, PeerConnection
from qkdnode.channel.ledger import AuthKeyLedger
from qkdnode.channel.messages import SessionMode
from qkdnode.coordination.planner import (
    AuthPlanner,
)
from qkdnode.errors import ProtocolError
from qkdnode.simulation.store_model import StoreModel
from tests.helpers_channel import REGISTRY, Pair, assert_rejected, rotated_pair

PSK = PskCredentials(psk=bytes(range(32)))


def _diverged_ledgers() -> tuple[AuthKeyLedger, AuthKeyLedger]:
    pair = rotated_pair()
    pair.run_block(0)
    alice, bob = pair.alice.ledger, pair.bob.ledger
    assert alice is not None and bob is not None
    bob.deposit(bytes(64), mark_consumed_bits=bob.consumed_bits)  # Bob's store rolled/forked
    return alice, bob


def _connection(planner: AuthPlanner, ledger: AuthKeyLedger, last: PeerConnection | None) -> Any:
    connection, _ = planner.new_connection(
        last=last,
        credentials=PSK,
        registry=REGISTRY,
        ledger=ledger,
        config=ChannelConfig(),
        random_bytes=np.random.default_rng(3).bytes,
        store=StoreModel(),
    )
    return connection


def test_a_refused_key_derived_handshake_never_downgrades_the_next_one() -> None:
    alice_ledger, bob_ledger = _diverged_ledgers()
    planner = AuthPlanner(Role.ALICE)
    first = _connection(planner, alice_ledger, None)
    bob = PeerConnection(Role.BOB, credentials=PSK, registry=REGISTRY, ledger=bob_ledger)
    error = assert_rejected(bob, first.start_handshake(), ProtocolError)
    assert isinstance(error, ProtocolError) and error.field == "ledger_deposit_digest"
    # the next attempt is key-derived again, and refused again: an operator must act
    second = _connection(planner, alice_ledger, first)
    bob = PeerConnection(Role.BOB, credentials=PSK, registry=REGISTRY, ledger=bob_ledger)
    assert_rejected(bob, second.start_handshake(), ProtocolError)
    assert second._handshake is not None
    assert second._handshake.mode is SessionMode.KEY_DERIVED


def test_an_operator_rebootstrap_on_both_nodes_gives_one_bootstrap_session() -> None:
    alice_ledger, bob_ledger = _diverged_ledgers()
    planner = AuthPlanner(Role.ALICE, operator_rebootstrap=True)
    second = _connection(planner, alice_ledger, None)
    bob = PeerConnection(
        Role.BOB, credentials=PSK, registry=REGISTRY, ledger=bob_ledger, force_bootstrap=True
    )
    pair = Pair(second, bob)
    pair.handshake()
    assert second.mode is SessionMode.PSK and bob.mode is SessionMode.PSK
    # the agreed reset (a Control message in that session) equalises the ledgers
    alice_ledger.reset()
    bob_ledger.reset()
    assert alice_ledger.state == bob_ledger.state and alice_ledger.level_bits == 0
    assert not alice_ledger.active


def test_ledger_reset_discards_the_pool_and_persists() -> None:
    persisted: list[str] = []
    ledger = AuthKeyLedger(
        target_bits=8192, reserve_bits=1024, observer=lambda draw: persisted.append(draw.purpose)
    )
    ledger.deposit(bytes(range(256)) * 4, mark_consumed_bits=0)
    ledger.draw(512, "block")
    ledger.reset()
    assert ledger.level_bits == 0 and ledger.consumed_bits == 0 and ledger.tags_issued == 0
    assert persisted == ["block", "reset"]
    assert bytes(range(256)) not in ledger.state.pool
