"""Scenario 3: state-machine abuse. Every message type in every state (in memory), and frames
dropped, duplicated, reordered or truncated: each ends in a defined, named abort; nothing else
escapes (the session shell must turn every end of a session into a ``QkdError``).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio
import trio.testing

from qkdnode.channel.auth import Role
from qkdnode.channel.connection import ConnectionState
from qkdnode.channel.framing import NO_BLOCK, pack_frame, pack_header
from qkdnode.errors import QkdError
from qkdnode.node.daemon import Node
from qkdnode.node.session import SessionConfig, open_session
from tests.reliability.memory import NAMED, make_wire, run_script
from tests.reliability.proxy import CODES


def _frames_of_clean_session() -> list[tuple[Role, bytes]]:
    wire, rotate = make_wire("psk")
    seen: list[tuple[Role, bytes]] = []
    deliver = wire._deliver

    def spy(to: Role, frame: bytes) -> None:
        seen.append((to, frame))
        deliver(to, frame)

    wire._deliver = spy  # type: ignore[method-assign]
    run_script(wire, rotate=rotate)
    return seen


def _replace_with(frame: bytes) -> Callable[[bytes], bytes]:
    return lambda _original: frame


def test_every_frame_in_every_other_position_is_refused_without_state_change() -> None:
    """Each recorded frame is sent at every other point of a fresh session (out of state,
    replayed, reordered, duplicated): a named error, the receiver's counters unchanged."""
    frames = _frames_of_clean_session()
    trials = refused = 0
    for position in range(0, len(frames), 2):
        for wrong_index in range(len(frames)):
            if wrong_index == position:
                continue
            _to, frame = frames[wrong_index]
            wire, rotate = make_wire("psk")
            wire.tamper_at = position
            wire.tamper = _replace_with(frame)
            trials += 1
            try:
                run_script(wire, rotate=rotate)
            except NAMED:
                refused += 1
                assert wire.snapshot_ok is not False, (position, wrong_index)
            except Exception as exc:  # pragma: no cover - a finding
                pytest.fail(f"{type(exc).__name__} at {position} <- {wrong_index}")
            else:
                # only an identical frame may pass (the same bytes at the same point)
                assert frames[position][1] == frame, (position, wrong_index)
    assert trials > 100 and refused >= trials - 2


def test_dropped_and_truncated_frames_end_in_a_named_error_or_need_data() -> None:
    frames = _frames_of_clean_session()
    for index in range(1, len(frames)):
        wire, rotate = make_wire("psk")
        wire.tamper_at = index
        wire.tamper = lambda frame: frame[: len(frame) // 2]
        try:
            run_script(wire, rotate=rotate)
        except NAMED:
            continue
        except Exception as exc:  # pragma: no cover - a finding
            pytest.fail(f"truncated frame {index}: {type(exc).__name__}")


def test_bob_refuses_each_message_type_as_first_frame() -> None:
    for name, code in CODES.items():
        if name == "hello":
            continue
        wire, _ = make_wire("psk")
        frame = pack_frame(pack_header(code, 0, NO_BLOCK), b"\x80", b"")
        with pytest.raises(NAMED):
            wire.bob.receive_data(frame)
            wire.bob.next_event(now_s=0.0)
        assert wire.bob.state is ConnectionState.ERROR


def _junk_hello() -> bytes:
    # a Hello frame whose payload is not msgpack: refused before any handshake state exists
    return pack_frame(pack_header(CODES["hello"], 0, NO_BLOCK), b"\xc1\xc1\xc1", b"")


async def test_a_refused_first_frame_ends_the_session_with_qkd_errors_only() -> None:
    server, client = trio.testing.memory_stream_pair()
    wire, _ = make_wire("psk")
    errors: list[BaseException] = []

    async def attacker() -> None:
        await client.send_all(_junk_hello())

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(attacker)
            async with open_session(server, wire.bob, SessionConfig(port=0)):
                pass
    except BaseExceptionGroup as group:
        errors.extend(_leaves(group))
    except QkdError as error:
        errors.append(error)
    assert errors and all(isinstance(e, QkdError) for e in errors), errors


async def test_exchange_turns_the_end_of_the_event_stream_into_session_ended(
    node_factory: Callable[[str], Node],
) -> None:
    from qkdnode.node.exchange import Exchange

    class DeadSession:
        connection = None

        async def next_event(self) -> object:
            raise trio.EndOfChannel

    exchange = Exchange(node_factory("bob"), DeadSession())  # type: ignore[arg-type]
    errors: list[BaseException] = []
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(exchange._pump, nursery)
    except BaseExceptionGroup as group:
        errors.extend(_leaves(group))
    assert errors and all(isinstance(e, QkdError) for e in errors), errors


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for error in group.exceptions:
        out.extend(_leaves(error) if isinstance(error, BaseExceptionGroup) else [error])
    return out
