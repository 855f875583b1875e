"""Group commit: concurrent key-store operations of one trio run share one durable transaction.

Every delivery operation is a durable SQLite transaction (``synchronous=FULL``: one fsync per
COMMIT, plus a WAL checkpoint when key material was erased). Run one at a time on the event loop,
the fsyncs bound the node to a few hundred operations per second whatever the number of SAEs, and
while one commits no other request is even parsed.

Here the first task that asks becomes the *leader*: it yields once (a cancel-shielded checkpoint,
no timer) so that the tasks already runnable can add their operations, then runs all of them in
ONE transaction with :meth:`~qkdnode.store.keystore.KeyStore.run_batch` (each in its own
SAVEPOINT), and hands every task its own value or exception. When several requests are in
progress (:meth:`GroupCommit.request`) the transaction runs in a worker thread: while it commits
the event loop keeps serving, the operations asked for meanwhile queue up, and the first of them
leads the next batch as soon as this one is done. One request alone runs its transaction on the
event loop (no thread round trip) and pays one checkpoint, no timer. The store's lock
serialises the worker thread with the other (synchronous) users of the store on the loop.

A batch that erased key material is answered right after its COMMIT (durable: a key handed out
is marked delivered on disk first); the WAL checkpoint that removes the old copies of the erased
pages follows at once, in a system task, two scheduling rounds later, so that the woken requests
send their responses first instead of waiting for it (the checkpoint is a sizeable share of a
request's time). Closing the store folds the WAL too.

Once :meth:`GroupCommit.run` is called the operation is committed (or fails) whatever happens to
the caller: the wait is shielded from cancellation and lasts at most two batches, so a cancelled
caller never leaves keys reserved that nobody will take or release (the caller sees the
cancellation at its next checkpoint, after it has its result).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final, TypeVar

import trio

from qkdnode.errors import KeyStoreError
from qkdnode.store.keystore import KeyStore, OpOutcome, StoreOp

T = TypeVar("T")
MAX_BATCH_OPS: Final = 128


class _Waiter:
    __slots__ = ("op", "outcome", "wake")

    def __init__(self, op: StoreOp[Any]) -> None:
        self.op = op
        self.wake = trio.Event()  # set with ``outcome``, or without it to hand over the lead
        self.outcome: OpOutcome[Any] | None = None


class GroupCommit:
    """Batches the operations of concurrent tasks on one :class:`KeyStore` (one per store).

    ``in_thread=False`` always runs the transaction on the event loop itself (the loop is
    blocked while it commits, as a plain synchronous store call would).
    """

    def __init__(
        self, store: KeyStore, *, max_batch_ops: int = MAX_BATCH_OPS, in_thread: bool = True
    ) -> None:
        if max_batch_ops < 1:
            raise ValueError("max_batch_ops must be at least 1")
        self.store = store
        self.max_batch_ops = max_batch_ops
        self.in_thread = in_thread
        self._pending: list[_Waiter] = []
        self._leading = False
        self._requests = 0
        self._fold_due = False
        # for tests and metrics: number of transactions and of operations committed so far
        self.batches = 0
        self.operations = 0
        self.threaded_batches = 0

    @contextmanager
    def request(self) -> Iterator[None]:
        """Around a request of one or more operations: while more than one is in progress,
        transactions commit in a worker thread so that the loop serves the others meanwhile."""
        self._requests += 1
        try:
            yield
        finally:
            self._requests -= 1

    async def run(self, op: StoreOp[T]) -> T:
        """Run ``op`` in the next batch; return its value or raise its exception.

        KeyStoreError if the batch's transaction failed (the store is then poisoned).
        """
        waiter = _Waiter(op)
        self._pending.append(waiter)
        if self._leading:
            with trio.CancelScope(shield=True):
                await waiter.wake.wait()
        else:
            self._leading = True
            # let the tasks that are runnable now join this batch; never raises Cancelled
            await trio.lowlevel.cancel_shielded_checkpoint()
        if waiter.outcome is None:  # this task leads a batch, its own operation first
            batch = self._pending[: self.max_batch_ops]
            del self._pending[: self.max_batch_ops]
            try:
                with trio.CancelScope(shield=True):  # bounded: one transaction
                    await self._commit(batch)
            finally:
                if self._pending:
                    self._pending[0].wake.set()  # the lead passes to the oldest waiting task
                else:
                    self._leading = False
        assert waiter.outcome is not None
        outcome: OpOutcome[T] = waiter.outcome
        return outcome.unwrap()

    async def _commit(self, batch: list[_Waiter]) -> None:
        ops = [w.op for w in batch]
        try:
            if self.in_thread and (len(batch) > 1 or self._requests > 1):
                # not abandoned on cancellation: the thread always runs to its end
                outcomes = await trio.to_thread.run_sync(self._run_batch, ops)
                self.threaded_batches += 1
            else:
                outcomes = self._run_batch(ops)
        except Exception as exc:  # KeyStoreError: nothing committed, the store is poisoned
            self.store.report_failure()  # on the event loop's thread
            for waiter in batch:
                waiter.outcome = OpOutcome(error=_copy(exc))
                waiter.wake.set()
            return
        except BaseException:
            for waiter in batch:
                waiter.outcome = OpOutcome(error=KeyStoreError("key store batch aborted"))
                waiter.wake.set()
            raise
        self.batches += 1
        self.operations += len(batch)
        for waiter, outcome in zip(batch, outcomes, strict=True):
            waiter.outcome = outcome
            waiter.wake.set()
        if self.store.wal_holds_erased and not self._fold_due:
            self._fold_due = True
            trio.lowlevel.spawn_system_task(self._fold_wal, name="qkdnode.store.fold_wal")

    def _run_batch(self, ops: list[StoreOp[Any]]) -> list[OpOutcome[Any]]:
        return self.store.run_batch(ops, notify=False, fold_wal=False)

    async def _fold_wal(self) -> None:
        """The deferred checkpoint of erasing batches (module doc); one for all batches due."""
        # the requests woken by the batch run (and send their answers) before this
        await trio.lowlevel.checkpoint()
        await trio.lowlevel.checkpoint()
        self._fold_due = False
        try:
            if self.in_thread and self._requests > 0:  # others in progress: keep serving them
                await trio.to_thread.run_sync(self.store.fold_wal)
            else:
                self.store.fold_wal()
        except KeyStoreError:
            pass  # the store failed meanwhile: its owner stops; the WAL is folded on reopen


def _copy(exc: Exception) -> Exception:
    """One exception object per waiter (tracebacks of a shared one would pile up)."""
    if isinstance(exc, KeyStoreError):
        copy = KeyStoreError(str(exc))
        copy.__cause__ = exc.__cause__
        return copy
    return exc
