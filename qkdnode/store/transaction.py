"""Transaction machinery of the key store: one lock, one connection, durable commits.

Every key-state change is a :class:`StoreOp` run inside a transaction: alone with
:meth:`Database.run`, or with others in one commit with :meth:`Database.run_batch` (group commit).
Any SQLite error poisons the store: the connection is closed, :class:`KeyStoreError` is raised and
every later call is refused (after a failed write or fsync the daemon must stop, never carry on).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from qkdnode.errors import KeyStoreError

T = TypeVar("T")


class Tx:
    """The cursor-level view used inside one transaction."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self.erased = False  # key material deleted here: the WAL must be folded after COMMIT

    def execute(self, sql: str, params: Sequence[object] = ()) -> sqlite3.Cursor:
        return self._db.execute(sql, params)

    def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        self._db.executemany(sql, rows)

    def select_in(self, sql: str, values: Sequence[object]) -> list[tuple[Any, ...]]:
        """Run ``sql`` with its ``IN ({})`` filled with one placeholder per value."""
        if not values:
            return []
        placeholders = ",".join("?" * len(values))
        return self._db.execute(sql.format(placeholders), values).fetchall()

    def execute_in(self, sql: str, values: Sequence[object]) -> None:
        if values:
            self._db.execute(sql.format(",".join("?" * len(values))), values)

    def executescript_in_tx(self, script: str) -> None:
        # executescript() would COMMIT first; run the statements one by one inside our transaction
        for statement in script.split(";"):
            if statement.strip():
                self._db.execute(statement)

    def burn_stored_keys(self, key_ids: Collection[str]) -> None:
        """Erase stored keys for good: ``delivered`` without material (never offered again)."""
        if key_ids:
            self.erased = True
            self._db.executemany(
                "UPDATE keys SET state = 'delivered', material = NULL WHERE key_id = ?",
                [(k,) for k in sorted(key_ids)],
            )


@dataclass(frozen=True, slots=True)
class StoreOp(Generic[T]):
    """One logical store operation: ``run`` does its reads and writes inside a transaction (one
    that deletes key material sets ``Tx.erased``: the WAL is then checkpointed after the commit);
    ``durable=False`` says that losing it in a power cut is harmless, so a batch of only such
    operations commits without waiting for the disk (it becomes durable with the next durable
    commit: the WAL is written and synced in order)."""

    run: Callable[[Tx], T]
    durable: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class OpOutcome(Generic[T]):
    """What one operation of a batch gave: its value, or the exception it raised (rolled back)."""

    value: T | None = None
    error: Exception | None = None

    def unwrap(self) -> T:
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]


@dataclass(frozen=True, slots=True, kw_only=True)
class TxOptions:
    """How one transaction commits.

    - ``durable``: COMMIT waits for the fsync of the WAL (else it is synced by the next one);
    - ``fold_wal``: when key material was erased (``Tx.erased``), checkpoint the WAL into the
      database and truncate it right after the COMMIT (``secure_delete`` zeroes freed pages of
      the database, but the WAL still holds earlier copies); False: the caller folds it;
    - ``notify``: a failure calls ``on_failure`` at once; False (a worker thread, which must not
      call into the event loop): the owner calls :meth:`Database.report_failure` later.
    """

    durable: bool = True
    fold_wal: bool = True
    notify: bool = True


def connect_private(directory: Path, file_name: str) -> tuple[sqlite3.Connection, Path]:
    """A connection to ``directory/file_name``: the directory created 0700, the database, WAL
    and shm files 0600, and a short busy timeout (the daemon is the only writer, and a reader
    elsewhere must never block its event loop for long; sqlite3's default is 5 s)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / file_name
    old_umask = os.umask(0o077)
    try:
        connection = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=0.2
        )
    finally:
        os.umask(old_umask)
    return connection, path


def restrict_files(path: Path) -> None:
    """Make the database's files private to the owner (files created by an older version)."""
    for suffix in ("", "-wal", "-shm"):
        candidate = Path(f"{path}{suffix}")
        if candidate.exists():
            os.chmod(candidate, 0o600)


class Database:
    """A SQLite connection shared by the owner's task and a group-commit worker thread; a lock
    serialises every use of it (a transaction or query waits for the one in progress)."""

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self._db: sqlite3.Connection | None = connection
        self.path = path
        # called once when a write or read fails: the owner must stop, wherever the call was
        self.on_failure: Callable[[], None] | None = None
        self.failed = False
        self._failure_unreported = False
        self._lock = threading.RLock()
        # a batch run with fold_wal=False erased key material: fold_wal() is due
        self.wal_holds_erased = False

    def _durable_wal(self, what: str) -> None:
        """WAL mode, an fsync at every commit, freed pages zeroed; KeyStoreError naming
        ``what`` if SQLite refuses WAL."""
        db = self._conn
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise KeyStoreError(f"{what} {self.path}: WAL mode refused (got {mode})")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA secure_delete=ON")

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                # closing anyway if this fails: WAL content is recovered on the next open
                with suppress(sqlite3.Error):
                    self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self._db.close()
                self._db = None

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise KeyStoreError("key store is closed (after an I/O failure the daemon must stop)")
        return self._db

    @contextmanager
    def _transaction(self, options: TxOptions = TxOptions()) -> Iterator[Tx]:
        """One ``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back if the body raises); any SQLite
        error poisons the store and raises KeyStoreError."""
        with self._lock:
            db = self._conn
            try:
                if not options.durable:  # WAL mode, NORMAL: synced at the next FULL commit
                    db.execute("PRAGMA synchronous=NORMAL")
                try:
                    db.execute("BEGIN IMMEDIATE")
                    tx = Tx(db)
                    try:
                        yield tx
                    except BaseException:
                        db.execute("ROLLBACK")
                        raise
                    db.execute("COMMIT")
                finally:
                    if not options.durable:
                        db.execute("PRAGMA synchronous=FULL")
            except sqlite3.Error as exc:
                self._fail(notify=options.notify)
                raise KeyStoreError(f"key store write failed ({exc}); stop the daemon") from exc
            if tx.erased:
                if options.fold_wal:  # after the COMMIT, before any result is handed out
                    self._checkpoint()
                else:
                    self.wal_holds_erased = True

    def _checkpoint(self) -> None:
        """Fold the WAL into the database and truncate it. A reader elsewhere (an operator's
        sqlite3, a backup) can hold it up: then the frames stay until the next checkpoint
        instead of blocking the daemon (the busy timeout is short)."""
        with self._lock, suppress(sqlite3.OperationalError):
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def _fail(self, *, notify: bool = True) -> None:
        db, self._db = self._db, None
        if db is not None:
            with suppress(sqlite3.Error):
                db.close()
        if not self.failed:
            self.failed = True
            self._failure_unreported = True
        if notify:
            self.report_failure()

    def report_failure(self) -> None:
        """Call ``on_failure`` for a failure not reported yet (see ``notify`` of run_batch)."""
        if self._failure_unreported:
            self._failure_unreported = False
            if self.on_failure is not None:
                self.on_failure()

    def _query(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                self._fail()
                raise KeyStoreError(f"key store read failed ({exc}); stop the daemon") from exc

    def run(self, op: StoreOp[T]) -> T:
        """One operation in its own transaction (the WAL folded after it if it erased)."""
        with self._transaction(TxOptions(durable=op.durable)) as tx:
            return op.run(tx)

    def run_batch(
        self, ops: Sequence[StoreOp[Any]], *, notify: bool = True, fold_wal: bool = True
    ) -> list[OpOutcome[Any]]:
        """Run several operations in ONE transaction: one COMMIT (one fsync, unless none of them
        is durable) and, if any of them erased key material, one WAL checkpoint before returning
        — or, with ``fold_wal=False``, none: the caller must then call :meth:`fold_wal` right
        after (``wal_holds_erased`` says so).

        Each operation runs inside its own SAVEPOINT: one that raises (any Exception but an
        SQLite error) is rolled back alone and its exception is its outcome; the others commit.
        Later operations see the changes of earlier ones (the same stored key is never reserved
        twice). An SQLite error anywhere poisons the store and raises KeyStoreError for the
        whole batch (nothing of it is committed). ``notify=False`` (from a worker thread): the
        owner calls :meth:`report_failure` afterwards instead of ``on_failure`` running here.
        """
        outcomes: list[OpOutcome[Any]] = []
        options = TxOptions(durable=any(op.durable for op in ops), fold_wal=fold_wal, notify=notify)
        with self._transaction(options) as tx:
            for op in ops:
                tx.execute("SAVEPOINT op")
                try:
                    value = op.run(tx)
                except sqlite3.Error:
                    raise  # the whole transaction rolls back and the store stops
                except Exception as exc:
                    # an op rolled back after erasing keeps tx.erased: one fold more, harmless
                    tx.execute("ROLLBACK TO op")
                    tx.execute("RELEASE op")
                    outcomes.append(OpOutcome(error=exc))
                    continue
                tx.execute("RELEASE op")
                outcomes.append(OpOutcome(value=value))
        return outcomes

    def fold_wal(self) -> None:
        """Checkpoint the WAL into the database and truncate it (the copies of erased pages go);
        nothing if the store is closed (closing folds it too)."""
        with self._lock:
            self.wal_holds_erased = False
            if self._db is not None:
                self._checkpoint()
