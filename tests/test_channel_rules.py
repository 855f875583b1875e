"""The channel's accepts- and sends-tables agree with each other and with the protocol's rules."""

from __future__ import annotations

import pytest

from qkdnode.channel.auth import Role
from qkdnode.channel.messages import (
    BlockClose,
    BlockOpen,
    Close,
    Control,
    Data,
    Finish,
    Hello,
    HelloReply,
    Message,
    Ping,
    Pong,
    RotationAck,
    RotationAnnounce,
)
from qkdnode.channel.rules import (
    ACCEPTS,
    SENDS,
    ConnectionState,
    check_accepts,
    check_sends,
)
from qkdnode.errors import ProtocolError

TERMINAL_STATES = (ConnectionState.CLOSED, ConnectionState.ERROR)
LIVE_STATES = [state for state in ConnectionState if state not in TERMINAL_STATES]


def test_every_live_state_accepts_a_close_and_the_terminal_states_accept_nothing() -> None:
    for role in Role:
        for state in LIVE_STATES:
            assert Close in ACCEPTS[(role, state)]
        for terminal in TERMINAL_STATES:
            assert (role, terminal) not in ACCEPTS
            with pytest.raises(ProtocolError) as refused:
                check_accepts(role, terminal, Close)
            assert refused.value.field == "type"


def test_what_a_side_may_send_when_established_its_established_peer_accepts() -> None:
    established = ConnectionState.ESTABLISHED
    for role in Role:
        for message_type in SENDS[(role, established)]:
            check_accepts(role.peer, established, message_type)
    # and Alice's Hello reaches an idle Bob
    check_accepts(Role.BOB, ConnectionState.IDLE, Hello)


def test_the_replies_the_protocol_writes_are_accepted_where_they_arrive() -> None:
    check_accepts(Role.ALICE, ConnectionState.SENT_HELLO, HelloReply)
    check_accepts(Role.BOB, ConnectionState.SENT_REPLY, Finish)
    check_accepts(Role.ALICE, ConnectionState.ROTATING, RotationAck)
    for role in Role:
        check_accepts(role, ConnectionState.ESTABLISHED, Pong)


@pytest.mark.parametrize("message_type", [Hello, BlockOpen, RotationAnnounce])
def test_only_alice_starts_opens_and_rotates(message_type: type[Message]) -> None:
    """Bob may never send these, and Alice never accepts them."""
    for state in ConnectionState:
        with pytest.raises(ProtocolError) as refused:
            check_sends(Role.BOB, state, message_type)
        assert refused.value.field == "state"
        assert message_type not in ACCEPTS.get((Role.ALICE, state), frozenset())


def test_block_frames_and_pings_only_in_an_established_session() -> None:
    for role in Role:
        for state in ConnectionState:
            for message_type in (Data, BlockClose, Control, Ping):
                allowed = message_type in SENDS.get((role, state), frozenset())
                assert allowed == (state is ConnectionState.ESTABLISHED)
