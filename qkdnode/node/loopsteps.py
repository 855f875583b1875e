"""Which task blocks the event loop, and for how long: a trio instrument that times every task
step (the code a task runs between two checkpoints, while no other task can run).

Steps of at least ``STEP_RECORD_MIN_S`` are reported to ``record(task, seconds)``. The task is
named by its function (``module.qualname``, at most ``MAX_TASK_NAMES`` distinct names, then
``other``), except that every step of a task serving a peer connection that has not
authenticated yet is reported as ``UNAUTHENTICATED_TASK``: that is the stall an
unauthenticated party can cause. A connection handler marks itself with
``unauthenticated_connection()``; the tasks it starts inherit the mark (trio copies the
context into a child task), and ``ConnectionMark.authenticated()`` clears it for all of them.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable
from typing import Final

import trio

STEP_RECORD_MIN_S: Final = 0.001
MAX_TASK_NAMES: Final = 32
UNAUTHENTICATED_TASK: Final = "unauthenticated_connection"
OTHER_TASKS: Final = "other"


class ConnectionMark:
    """Shared by a connection's tasks: True until the peer has authenticated."""

    __slots__ = ("unauthenticated",)

    def __init__(self) -> None:
        self.unauthenticated = True

    def authenticated(self) -> None:
        self.unauthenticated = False


_CONNECTION: contextvars.ContextVar[ConnectionMark | None] = contextvars.ContextVar(
    "qkdnode_connection_mark", default=None
)


def unauthenticated_connection() -> ConnectionMark:
    """Mark the current task, and every task it starts from now on, as serving a connection
    that has not authenticated yet; call ``authenticated()`` on the result when it has."""
    mark = ConnectionMark()
    _CONNECTION.set(mark)
    return mark


class StepTimer(trio.abc.Instrument):
    """Times task steps; see the module docstring."""

    def __init__(
        self,
        record: Callable[[str, float], None],
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._record = record
        self._clock = clock
        self._started_s: float = 0.0
        self._names: dict[str, str] = {}

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._started_s = self._clock()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        elapsed_s = self._clock() - self._started_s
        if elapsed_s < STEP_RECORD_MIN_S:
            return
        mark = task.context.get(_CONNECTION)
        if mark is not None and mark.unauthenticated:
            self._record(UNAUTHENTICATED_TASK, elapsed_s)
        else:
            self._record(self._label(task.name), elapsed_s)

    def _label(self, name: str) -> str:
        label = self._names.get(name)
        if label is None:
            if len(self._names) >= MAX_TASK_NAMES:
                return OTHER_TASKS
            label = self._names[name] = name.replace("<locals>.", "")
        return label
