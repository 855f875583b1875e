"""The node's policy when the peer refuses key-derived authentication (reliability scenario 11):
with ``on_exhausted = "rebootstrap"`` the next session authenticates with the bootstrap
credentials and both ledgers are reset; with ``"halt"`` the node keeps refusing to downgrade."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from qkdnode.channel.auth import PskCredentials, Role
from qkdnode.channel.connection import PeerConnection
from qkdnode.channel.ledger import AuthKeyLedger
from qkdnode.channel.messages import SessionMode
from qkdnode.coordination.planner import (
    AuthPlanner,
)
from qkdnode.errors import ProtocolError
from qkdnode.node.daemon import Node
from tests.helpers_channel import REGISTRY, Pair, assert_rejected, rotated_pair

PSK = PskCredentials(psk=bytes(range(32)))


def _alice_node(ledger: AuthKeyLedger, policy: str) -> Any:
    """Just what Node.make_connection reads, around a real ledger."""
    node = SimpleNamespace(
        role=Role.ALICE,
        credentials=PSK,
        registry=REGISTRY,
        ledger=ledger,
        planner=AuthPlanner(Role.ALICE, policy),  # type: ignore[arg-type]
        _last_connection=None,
        config=SimpleNamespace(
            peer=SimpleNamespace(max_frame_bytes=1 << 20),
            auth=SimpleNamespace(on_exhausted=policy),
        ),
    )
    return node


def _diverged_ledgers() -> tuple[AuthKeyLedger, AuthKeyLedger]:
    pair = rotated_pair()
    pair.run_block(0)
    alice, bob = pair.alice.ledger, pair.bob.ledger
    assert alice is not None and bob is not None
    bob.deposit(bytes(64), mark_consumed_bits=bob.consumed_bits)  # Bob's store rolled/forked
    return alice, bob


@pytest.mark.parametrize("policy", ["rebootstrap", "halt"])
def test_a_refused_key_derived_handshake_leads_to_the_configured_policy(policy: str) -> None:
    alice_ledger, bob_ledger = _diverged_ledgers()
    node = _alice_node(alice_ledger, policy)
    first: PeerConnection = Node.make_connection(node)
    bob = PeerConnection(Role.BOB, credentials=PSK, registry=REGISTRY, ledger=bob_ledger)
    error = assert_rejected(bob, first.start_handshake(), ProtocolError)
    assert isinstance(error, ProtocolError) and error.field == "ledger_deposit_digest"

    second: PeerConnection = Node.make_connection(node)
    bob = PeerConnection(Role.BOB, credentials=PSK, registry=REGISTRY, ledger=bob_ledger)
    pair = Pair(second, bob)
    if policy == "halt":
        # no downgrade: the next attempt is key-derived again (and refused again)
        assert not node.planner.force_bootstrap and not node.planner.ledger_reset_pending
        assert_rejected(bob, second.start_handshake(), ProtocolError)
        return
    assert node.planner.force_bootstrap and node.planner.ledger_reset_pending
    pair.handshake()
    assert second.mode is SessionMode.PSK and bob.mode is SessionMode.PSK
    # the agreed reset (a Control message in that session, see the daemon) equalises the ledgers
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
