"""The task-step timer: which task held the event loop, and steps of connections that have not
authenticated told apart (a fake clock moved by the tasks themselves: no timing)."""

from __future__ import annotations

import trio

from qkdnode.node.loopsteps import (
    MAX_TASK_NAMES,
    OTHER_TASKS,
    STEP_RECORD_MIN_S,
    UNAUTHENTICATED_TASK,
    StepTimer,
    unauthenticated_connection,
)
from tests.helpers_metrics import make_metrics


def test_steps_are_named_by_task_and_unauthenticated_connections_counted_apart() -> None:
    now_s = [0.0]
    records: list[tuple[str, float]] = []
    timer = StepTimer(lambda task, s: records.append((task, round(s, 6))), clock=lambda: now_s[0])

    async def busy(seconds: float) -> None:
        now_s[0] += seconds  # this step holds the loop for ``seconds``
        await trio.lowlevel.checkpoint()

    async def connection() -> None:
        mark = unauthenticated_connection()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(busy, 0.03)  # a child of the connection: inherits the mark
        await busy(0.02)
        mark.authenticated()
        await busy(0.04)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(busy, 0.05)
            nursery.start_soon(connection)
            nursery.start_soon(busy, STEP_RECORD_MIN_S / 2)  # too short to report

    trio.run(main, instruments=[timer])
    unauthenticated = sorted(s for task, s in records if task == UNAUTHENTICATED_TASK)
    assert unauthenticated == [0.02, 0.03]
    named = {(task.rsplit(".", 1)[-1], s) for task, s in records if task != UNAUTHENTICATED_TASK}
    assert named == {("busy", 0.05), ("connection", 0.04)}
    assert all("<locals>" not in task for task, _ in records)


def test_task_names_past_the_limit_are_reported_as_other() -> None:
    records: list[str] = []
    timer = StepTimer(lambda task, _s: records.append(task), clock=iter(range(10**6)).__next__)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for n in range(MAX_TASK_NAMES + 8):
                nursery.start_soon(trio.lowlevel.checkpoint, name=f"task-{n}")

    trio.run(main, instruments=[timer])
    assert len(set(records) - {OTHER_TASKS}) <= MAX_TASK_NAMES
    assert OTHER_TASKS in records


def test_steps_are_exported_as_a_histogram_by_task() -> None:
    metrics = make_metrics()
    metrics.event_loop_step(UNAUTHENTICATED_TASK, 0.004)
    text = metrics.exposition().decode()
    assert (
        'qkdnode_event_loop_step_seconds_bucket{le="0.005",task="unauthenticated_connection"} 1.0'
        in text
    )
    assert (
        'qkdnode_event_loop_step_seconds_bucket{le="0.002",task="unauthenticated_connection"} 0.0'
        in text
    )
