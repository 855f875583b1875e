"""The supervisor of each link of a node with several peers: a link's failure restarts that link
alone, after a pause that doubles; start-up and fatal errors end the daemon."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import cast

import pytest
import trio

from qkdnode.errors import AuthenticationFailed, KeyStoreError
from qkdnode.node import daemon
from qkdnode.node.session import SessionConfig
from qkdnode.node.state import Node

SESSION = SessionConfig(host="127.0.0.1", port=1)


@dataclass
class FakeMetrics:
    connected: list[bool] = field(default_factory=list)

    def set_peer_connected(self, connected: bool) -> None:
        self.connected.append(connected)


@dataclass
class FakeNode:
    peer_name: str
    metrics: FakeMetrics = field(default_factory=FakeMetrics)


@dataclass
class Script:
    """What each link's session loop does, run by run: an exception to raise once started
    (``"early"``: before it has started), or None to run until cancelled."""

    runs: dict[str, list[BaseException | str | None]]
    started_at: dict[str, list[float]] = field(default_factory=dict)

    async def run_link(
        self,
        node: Node,
        session_config: SessionConfig,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        name = node.peer_name
        self.started_at.setdefault(name, []).append(trio.current_time())
        step = self.runs[name].pop(0) if self.runs[name] else None
        if step == "early":
            raise OSError("address already in use")
        task_status.started()
        await trio.sleep(0.5)
        if isinstance(step, BaseException):
            # as a nursery raises it
            raise ExceptionGroup("link tasks", [step]) if isinstance(step, Exception) else step
        await trio.sleep_forever()


def _node(name: str) -> Node:
    return cast(Node, FakeNode(name))


async def test_a_failing_link_restarts_alone_after_a_doubling_pause(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock
) -> None:
    script = Script(
        runs={"a": [None], "c": [RuntimeError("bug"), ValueError("bug"), RuntimeError("bug")]}
    )
    monkeypatch.setattr(daemon, "_run_link", script.run_link)
    a, c = _node("a"), _node("c")
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon._supervise_link, a, SESSION)
        await nursery.start(daemon._supervise_link, c, SESSION)
        await trio.sleep(100)
        nursery.cancel_scope.cancel()
    # a ran once and was never disturbed; c restarted after 1, 2 and 4 s (plus its 0.5 s runs)
    assert script.started_at["a"] == [0.0]
    starts = script.started_at["c"]
    assert [round(later - earlier, 3) for earlier, later in itertools.pairwise(starts)] == [
        1.5,
        2.5,
        4.5,
    ]
    assert cast(FakeNode, c).metrics.connected == [False, False, False]


@pytest.mark.parametrize(
    "fatal",
    [KeyStoreError("fsync failed"), AuthenticationFailed("escaped"), daemon.DaemonMustStop("x")],
)
async def test_store_and_security_failures_end_the_daemon(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock, fatal: Exception
) -> None:
    script = Script(runs={"a": [None], "c": [fatal]})
    monkeypatch.setattr(daemon, "_run_link", script.run_link)
    with pytest.RaisesGroup(type(fatal), flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon._supervise_link, _node("a"), SESSION)
            await nursery.start(daemon._supervise_link, _node("c"), SESSION)
    assert script.started_at["c"] == [0.0]


async def test_a_link_that_cannot_start_ends_the_start(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock
) -> None:
    script = Script(runs={"c": ["early"]})
    monkeypatch.setattr(daemon, "_run_link", script.run_link)
    with pytest.RaisesGroup(OSError, flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon._supervise_link, _node("c"), SESSION)
