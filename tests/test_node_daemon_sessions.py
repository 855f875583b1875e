"""The daemon's session wrapper: errors raised inside a session's nurseries, and the hand-over
from one session to the next (a stale session's teardown never touches a newer one)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import structlog.testing
import trio
import trio.testing

from qkdnode.errors import KeyStoreError, LinkError, ProtocolError
from qkdnode.node import daemon
from qkdnode.node.exchange import DaemonMustStop
from qkdnode.node.reservations import Reservations


async def _raise_in_a_nursery(error: Exception) -> None:
    # what a session does: the error surfaces from a child task, wrapped in a group
    async def fail() -> None:
        raise error

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fail)


async def test_a_store_error_inside_a_session_stops_the_daemon(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def session(node: object, peer: object) -> None:
        await _raise_in_a_nursery(KeyStoreError("disk full"))

    monkeypatch.setattr(daemon, "run_session", session)
    with structlog.testing.capture_logs() as logs, pytest.raises(DaemonMustStop, match="disk"):
        await daemon._guarded(SimpleNamespace(), SimpleNamespace())  # type: ignore[arg-type]
    assert [entry["event"] for entry in logs] == ["session.store_failed"]


async def test_a_link_error_inside_a_session_waits_before_the_next_session(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock
) -> None:
    async def session(node: object, peer: object) -> None:
        await _raise_in_a_nursery(LinkError("link closed"))

    monkeypatch.setattr(daemon, "run_session", session)
    started = trio.current_time()
    with pytest.RaisesGroup(LinkError):
        await daemon._guarded(SimpleNamespace(), SimpleNamespace())  # type: ignore[arg-type]
    assert trio.current_time() - started == pytest.approx(daemon.LINK_RETRY_S)


async def test_other_session_errors_pass_through_at_once(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock
) -> None:
    async def session(node: object, peer: object) -> None:
        await _raise_in_a_nursery(ProtocolError("bad frame", field="type"))

    monkeypatch.setattr(daemon, "run_session", session)
    started = trio.current_time()
    with pytest.RaisesGroup(ProtocolError):
        await daemon._guarded(SimpleNamespace(), SimpleNamespace())  # type: ignore[arg-type]
    assert trio.current_time() == started


class _FakeExchange:
    """Runs until its session is told to end."""

    def __init__(self, node: object, session: Any) -> None:
        self.ended = session.ended

    async def send_message(self, message: object) -> None:
        raise AssertionError("not used")

    async def run(self) -> None:
        await self.ended.wait()


def _fake_node() -> Any:
    async def reset() -> None:
        pass

    return SimpleNamespace(
        exchange=None,
        current_session=None,
        reservations=Reservations(),
        blocks=SimpleNamespace(reset=reset),
        reporter=SimpleNamespace(mode_changed=lambda mode, reason: None),
        metrics=SimpleNamespace(set_peer_connected=lambda connected: None),
        audit=SimpleNamespace(record=lambda kind, **fields: None),
        peer_name="bob",
        config=SimpleNamespace(auth=SimpleNamespace(mode="psk")),
    )


def _fake_session() -> Any:
    return SimpleNamespace(
        ended=trio.Event(), connection=SimpleNamespace(mode=None), handshake=None
    )


async def test_a_stale_sessions_teardown_leaves_the_newer_session_in_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(daemon, "Exchange", _FakeExchange)
    node = _fake_node()
    old, new = _fake_session(), _fake_session()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(daemon.run_session, node, old)
        await trio.testing.wait_all_tasks_blocked()
        first = node.exchange
        nursery.start_soon(daemon.run_session, node, new)  # Bob accepts a new connection
        await trio.testing.wait_all_tasks_blocked()
        current = node.exchange
        assert current is not first and node.reservations._send == current.send_message
        old.ended.set()  # the old session's teardown runs now
        await trio.testing.wait_all_tasks_blocked()
        assert node.exchange is current
        assert node.reservations._send == current.send_message
        new.ended.set()
    assert node.exchange is None and node.reservations._send is None


async def test_a_newer_session_stops_the_one_before_it_before_its_exchange_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stale session (its peer crashed, its frames still in flight) must not stage or commit
    after the newer session has resolved limbo: it is stopped first, and waited for."""
    order: list[str] = []

    class Recording(_FakeExchange):
        def __init__(self, node: object, session: Any) -> None:
            super().__init__(node, session)
            self.name = session.name

        async def run(self) -> None:
            order.append(f"{self.name} runs")
            try:
                await self.ended.wait()
            finally:
                with trio.CancelScope(shield=True):
                    await trio.sleep(0)  # a teardown that takes a checkpoint
                order.append(f"{self.name} stopped")

    monkeypatch.setattr(daemon, "Exchange", Recording)
    node = _fake_node()
    old, new = _fake_session(), _fake_session()
    old.name, new.name = "old", "new"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(daemon.run_session, node, old)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(daemon.run_session, node, new)
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["old runs", "old stopped", "new runs"]
        assert node.exchange is not None and node.exchange.name == "new"
        new.ended.set()
    assert order[-1] == "new stopped" and node.current_session is None
