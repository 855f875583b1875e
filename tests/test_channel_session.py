"""The trio wrapper: loopback TCP sessions, timeouts, keepalive, backoff and PSK file checks."""

from __future__ import annotations

import os
from pathlib import Path

import msgpack
import numpy as np
import pytest
import trio
import trio.testing

from qkdnode.channel.auth import PskCredentials, Role
from qkdnode.channel.connection import (
    MIN_MAX_FRAME_BYTES,
    BlockAuthenticated,
    BlockOpened,
    PeerConnection,
    PongReceived,
    Rotated,
)
from qkdnode.channel.framing import NO_BLOCK, pack_frame, pack_header
from qkdnode.channel.ledger import AuthKeyLedger
from qkdnode.channel.messages import Data, FieldSpec, Hello, KindRegistry, SessionMode
from qkdnode.errors import ConfigError, ProtocolError
from qkdnode.node.session import (
    MAX_UNAUTHENTICATED_CONNECTIONS,
    PeerSession,
    SessionConfig,
    backoff_delays,
    dial,
    load_psk_file,
    open_session,
    serve_bob,
)

PSK = PskCredentials(psk=bytes(range(32)))


def registry() -> KindRegistry:
    reg = KindRegistry()
    reg.register("blob", {"data": FieldSpec(kind="bytes", max_len=1 << 20)})
    return reg


def ledger() -> AuthKeyLedger:
    led = AuthKeyLedger(target_bits=1 << 16, reserve_bits=1 << 10)
    led.deposit(np.random.default_rng(3).bytes(1 << 13), mark_consumed_bits=0)
    return led


def conn(role: Role, led: AuthKeyLedger | None = None) -> PeerConnection:
    return PeerConnection(role, credentials=PSK, registry=registry(), ledger=led)


async def test_loopback_tcp_session_rotates_and_authenticates_blocks() -> None:
    config = SessionConfig(port=0)
    ledgers = (ledger(), ledger())
    bob_seen: list[object] = []

    async def bob_handle(session: PeerSession) -> None:
        async for event in session.events():
            bob_seen.append(event)
            if isinstance(event, Data):
                block_id = event.block_id
                await session.send(lambda c: c.close_block(block_id))  # noqa: B023

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            serve_bob, config, lambda: conn(Role.BOB, ledgers[1]), bob_handle
        )
        port = listeners[0].socket.getsockname()[1]
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with open_session(stream, conn(Role.ALICE, ledgers[0]), config) as alice:
            assert alice.handshake is not None and alice.handshake.mode is SessionMode.PSK
            await alice.send(lambda c: c.announce_rotation())
            assert isinstance(await alice.next_event(), Rotated)
            for block_id in range(3):
                await alice.send(lambda c, b=block_id: c.open_block(b))  # type: ignore[misc]
                await alice.send(
                    lambda c, b=block_id: c.send_data(b, "blob", {"data": b"x" * 1000})  # type: ignore[misc]
                )
                await alice.send(lambda c, b=block_id: c.close_block(b))  # type: ignore[misc]
                done = await alice.next_event()
                assert isinstance(done, BlockAuthenticated) and done.mode is SessionMode.KEY_DERIVED
            assert alice.connection.mode is SessionMode.KEY_DERIVED
        nursery.cancel_scope.cancel()
    assert [type(e) for e in bob_seen[:2]] == [Rotated, BlockOpened]
    assert ledgers[0].state == ledgers[1].state


async def test_handshake_timeout_when_peer_is_silent(autojump_clock: trio.abc.Clock) -> None:
    left, _right = trio.testing.memory_stream_pair()
    config = SessionConfig(handshake_timeout_s=5.0)
    with pytest.raises(BaseExceptionGroup) as info:
        async with open_session(left, conn(Role.ALICE), config):
            pass
    assert info.group_contains(trio.TooSlowError)


async def test_keepalive_keeps_an_idle_session_alive(autojump_clock: trio.abc.Clock) -> None:
    left, right = trio.testing.memory_stream_pair()
    config = SessionConfig(read_timeout_s=3.0, keepalive_interval_s=1.0)
    pongs: list[PongReceived] = []

    async def bob() -> None:
        async with open_session(right, conn(Role.BOB), config) as session:
            async for _ in session.events():
                pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(bob)
        async with open_session(left, conn(Role.ALICE), config) as alice:
            with trio.move_on_after(20.0):  # far past read_timeout_s: only pings keep it up
                async for event in alice.events():
                    if isinstance(event, PongReceived):
                        pongs.append(event)
        nursery.cancel_scope.cancel()
    assert len(pongs) >= 5


def test_backoff_is_capped_exponential_with_bounded_jitter() -> None:
    rng = np.random.default_rng(5)
    delays = backoff_delays(0.5, 8.0, 0.2, lambda: float(rng.random()))
    got = [next(delays) for _ in range(10)]
    bases = [min(8.0, 0.5 * 2**i) for i in range(10)]
    for delay, base in zip(got, bases, strict=True):
        assert base * 0.8 <= delay <= base * 1.2
    assert got[-1] <= 8.0 * 1.2 and got[-1] >= 8.0 * 0.8


def test_psk_file_permissions_are_enforced(tmp_path: Path) -> None:
    path = tmp_path / "psk"
    path.write_text(bytes(range(32)).hex())
    os.chmod(path, 0o640)
    with pytest.raises(ConfigError, match="psk_file"):
        load_psk_file(path)
    os.chmod(path, 0o600)
    assert load_psk_file(path).psk == bytes(range(32))
    path.write_text("ab")
    with pytest.raises(ConfigError, match="32 bytes"):
        load_psk_file(path)


# ---- before authentication: bounded frames, decoding and connections ----------------------


def test_before_authentication_a_huge_frame_is_refused_from_its_length_alone() -> None:
    bob = conn(Role.BOB, ledger())
    # a 64 MiB frame announced: refused at the 4-byte length, nothing of it buffered
    bob.receive_data((64 << 20).to_bytes(4, "big") + bytes(1000))
    with pytest.raises(ProtocolError) as refused:
        bob.next_event(now_s=0.0)
    assert refused.value.field == "length"
    assert MIN_MAX_FRAME_BYTES < 128 * 1024  # the handshake's own limit


def test_before_authentication_a_hello_of_many_nils_is_refused_before_it_is_built() -> None:
    bob = conn(Role.BOB, ledger())
    nils = msgpack.packb([None] * 20_000)  # fits the pre-authentication frame limit
    header = pack_header(Hello.CODE, 0, NO_BLOCK)
    bob.receive_data(pack_frame(header, nils, b""))
    with pytest.raises(ProtocolError) as refused:
        bob.next_event(now_s=0.0)
    assert refused.value.field == "payload"


async def test_bob_refuses_connections_past_the_unauthenticated_limit() -> None:
    config = SessionConfig(port=0, handshake_timeout_s=30.0)

    async def handle(session: PeerSession) -> None:
        raise AssertionError("no session should be authenticated")

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(serve_bob, config, lambda: conn(Role.BOB, ledger()), handle)
        port = listeners[0].socket.getsockname()[1]
        idle = [
            await trio.open_tcp_stream("127.0.0.1", port)
            for _ in range(MAX_UNAUTHENTICATED_CONNECTIONS)
        ]
        await trio.sleep(0.2)
        extra = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(5):
            assert await extra.receive_some(10) == b""  # closed at once
        for stream in (*idle, extra):
            await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_every_task_waiting_for_room_in_the_send_queue_is_woken() -> None:
    left, _right = trio.testing.memory_stream_pair()
    session = PeerSession(left, conn(Role.ALICE), SessionConfig(send_queue_frames=1))
    session._enqueue(b"first")  # the queue is full; no writer runs
    sent: list[str] = []

    async def waiter(name: str) -> None:
        await session.send(lambda _c: name.encode())
        sent.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter, "a")
        nursery.start_soon(waiter, "b")
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(2):  # what the writer does after each batch
            session._queue.clear()
            session._room.set()
            await trio.testing.wait_all_tasks_blocked()
    assert sorted(sent) == ["a", "b"]


async def test_the_side_closing_a_block_last_gets_its_authentication_without_more_peer_bytes() -> (
    None
):
    # Bob closes first; Alice's own close then completes the block: the event must reach her
    # although Bob sends nothing more (before, it waited for Bob's next keepalive ping)
    left, right = trio.testing.memory_stream_pair()
    config = SessionConfig()
    bob_events: list[object] = []

    async def bob() -> None:
        async with open_session(right, conn(Role.BOB), config) as session:
            async for event in session.events():
                bob_events.append(event)
                if isinstance(event, Data):
                    await session.send(lambda c: c.close_block(0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(bob)
        async with open_session(left, conn(Role.ALICE), config) as alice:
            await alice.send(lambda c: c.open_block(0))
            await alice.send(lambda c: c.send_data(0, "blob", {"data": b"x"}))
            await trio.testing.wait_all_tasks_blocked()
            assert not any(isinstance(e, BlockAuthenticated) for e in bob_events)
            assert alice.connection.open_blocks == (0,)  # Bob's close has arrived, hers not sent
            seen: list[object] = []

            async def take() -> None:
                seen.append(await alice.next_event())

            nursery.start_soon(take)
            await alice.send(lambda c: c.close_block(0))
            await trio.testing.wait_all_tasks_blocked()
            assert len(seen) == 1 and isinstance(seen[0], BlockAuthenticated)
        nursery.cancel_scope.cancel()
    assert any(isinstance(e, BlockAuthenticated) for e in bob_events)


async def test_both_ends_of_the_peer_connection_send_without_nagle_delay() -> None:
    config = SessionConfig(port=0)
    nodelay: dict[str, int] = {}

    async def bob_handle(session: PeerSession) -> None:
        stream = session._stream
        assert isinstance(stream, trio.SocketStream)
        nodelay["bob"] = stream.getsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(serve_bob, config, lambda: conn(Role.BOB), bob_handle)
        port = listeners[0].socket.getsockname()[1]
        stream = await dial("127.0.0.1", port, config)
        nodelay["alice"] = stream.getsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY)
        async with open_session(stream, conn(Role.ALICE), config):
            await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert nodelay == {"alice": 1, "bob": 1}
