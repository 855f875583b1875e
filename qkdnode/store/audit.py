"""The audit trail kept in the key store (shell around the pure ``qkdnode.audit``).

Entries live in ``audit_log`` of the store's SQLite file; ``audit_state`` holds the writer's
state: the next entry's number, the head and the *current* evolving key. An entry is appended in
one transaction with the state update that overwrites the old key (``secure_delete`` zeroes the
freed bytes in the database file and the transaction asks for the WAL to be folded after the
COMMIT, so the old key's copy in the WAL goes too): a crash leaves either both or neither, and
the trail always verifies. An entry that belongs to a store change (a delivery, a block commit)
is appended inside that change's transaction (:func:`with_entry`).

The initial key ``k_0`` is drawn when the trail starts and written once, durably, to
``INITIAL_KEY_FILE`` in the store directory (mode 0600) for the operator to move off the node
(``docs/audit.md``); the daemon never reads it again.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import structlog

from qkdnode.audit import (
    INITIAL_KEY_BYTES,
    AuditKind,
    AuditRecord,
    AuditState,
    PeerHead,
    append_entry,
    initial_state,
)
from qkdnode.audit.trail import AuditValue
from qkdnode.errors import AuditTrailBroken, KeyStoreError
from qkdnode.store.schema import DATABASE_NAME
from qkdnode.store.transaction import Database, StoreOp, Tx

T = TypeVar("T")
log = structlog.get_logger("qkdnode.audit")

INITIAL_KEY_FILE: Final = "audit-initial-key"
AuditFields = Mapping[str, AuditValue]


# ---- inside a transaction -------------------------------------------------------------------


_STATE_QUERY: Final = "SELECT next_seq, key, head FROM audit_state WHERE singleton = 1"


def _load_state(tx: Tx | sqlite3.Connection) -> AuditState | None:
    """The writer's state; AuditTrailBroken if its row was damaged (never repaired here)."""
    return _state_from_rows(tx.execute(_STATE_QUERY).fetchall())


def _state_from_rows(rows: list[tuple[Any, ...]]) -> AuditState | None:
    if not rows:
        return None
    next_seq, key, head = rows[0]
    try:
        return AuditState(next_seq=int(next_seq), key=bytes(key), head=bytes(head))
    except (TypeError, ValueError):
        raise AuditTrailBroken(int(next_seq), "the trail's state is malformed") from None


def _save_state(tx: Tx, state: AuditState) -> None:
    # overwrites the old key in place; with secure_delete its old bytes do not survive in the
    # database file, and ``erased`` folds the WAL (which holds the old page) after the COMMIT
    tx.execute(
        "INSERT INTO audit_state (singleton, next_seq, key, head) VALUES (1, ?, ?, ?)"
        " ON CONFLICT (singleton) DO UPDATE SET next_seq = excluded.next_seq,"
        " key = excluded.key, head = excluded.head",
        (state.next_seq, state.key, state.head),
    )
    tx.erased = True


def _append(
    tx: Tx, state: AuditState, kind: AuditKind, fields: AuditFields, time_s: float
) -> AuditRecord:
    record, after = append_entry(state, kind, fields, time_s=time_s)
    tx.execute(
        "INSERT INTO audit_log (seq, body, tag, chain_hash) VALUES (?, ?, ?, ?)",
        (record.seq, record.body, record.tag, record.chain_hash),
    )
    _save_state(tx, after)
    return record


def append_in_tx(tx: Tx, kind: AuditKind, fields: AuditFields, *, time_s: float) -> AuditRecord:
    """Append one entry inside the caller's transaction (KeyStoreError if no trail exists)."""
    state = _load_state(tx)
    if state is None:
        raise KeyStoreError("the audit trail has not been started in this store")
    return _append(tx, state, kind, fields, time_s)


def append_op(kind: AuditKind, fields: AuditFields, *, time_s: float) -> StoreOp[AuditRecord]:
    """One entry in its own (durable) operation."""
    return StoreOp(lambda tx: append_in_tx(tx, kind, fields, time_s=time_s))


def with_entry(
    op: StoreOp[T],
    kind: AuditKind,
    describe: Callable[[T], AuditFields],
    *,
    time_s: float,
) -> StoreOp[T]:
    """``op`` and, in the same transaction, an entry described from its result (if ``op``
    raises, neither is kept). Durable, whatever ``op`` is."""

    def run(tx: Tx) -> T:
        value = op.run(tx)
        append_in_tx(tx, kind, describe(value), time_s=time_s)
        return value

    return StoreOp(run)


def start_op(initial_key: bytes, fields: AuditFields, *, time_s: float) -> StoreOp[bool]:
    """Start the trail with ``initial_key`` and its first entry; False (and nothing written) if
    the store has a trail already."""

    def run(tx: Tx) -> bool:
        if _load_state(tx) is not None:
            return False
        _append(tx, initial_state(initial_key), AuditKind.TRAIL_STARTED, fields, time_s)
        return True

    return StoreOp(run)


def record_peer_head_op(head: PeerHead, *, received_at_s: float) -> StoreOp[PeerHead | None]:
    """Keep the peer's head (not durable: a later head replaces it); returns the one before."""

    def run(tx: Tx) -> PeerHead | None:
        rows = tx.execute(
            "SELECT seq, chain_hash FROM audit_peer_head WHERE singleton = 1"
        ).fetchall()
        tx.execute(
            "INSERT INTO audit_peer_head (singleton, seq, chain_hash, received_at_s)"
            " VALUES (1, ?, ?, ?) ON CONFLICT (singleton) DO UPDATE SET seq = excluded.seq,"
            " chain_hash = excluded.chain_hash, received_at_s = excluded.received_at_s",
            (head.seq, head.chain_hash, received_at_s),
        )
        if not rows:
            return None
        return PeerHead(seq=int(rows[0][0]), chain_hash=bytes(rows[0][1]))

    return StoreOp(run, durable=False)


# ---- the initial key file ---------------------------------------------------------------------


def write_initial_key(directory: Path, initial_key: bytes) -> Path:
    """Write ``k_0`` (hex) durably to ``directory/INITIAL_KEY_FILE``, mode 0600."""
    path = directory / INITIAL_KEY_FILE
    temporary = path.with_suffix(".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, initial_key.hex().encode("ascii") + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    directory_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)
    return path


def read_initial_key(path: Path) -> bytes:
    """``k_0`` from a file written by :func:`write_initial_key`; ValueError if malformed."""
    text = path.read_text(encoding="ascii").strip()
    key = bytes.fromhex(text)
    if len(key) != INITIAL_KEY_BYTES:
        raise ValueError(f"{path}: expected {INITIAL_KEY_BYTES} bytes of hex")
    return key


# ---- the daemon's handle ------------------------------------------------------------------------


class AuditTrail:
    """The node's audit trail in its key store: :meth:`start` it once per daemon run, then
    :meth:`record` events (synchronous: one durable transaction each) or hand :meth:`op` /
    :meth:`around` operations to a group commit."""

    def __init__(self, store: Database, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    @classmethod
    def start(
        cls,
        store: Database,
        *,
        node_name: str,
        clock: Callable[[], float] = time.time,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> AuditTrail:
        """The store's trail, started if it has none: ``k_0`` is written to its file (in the
        store's directory) first (a crash before the trail's first COMMIT leaves a stale file
        that the next start overwrites), then the trail and its first entry are committed
        together."""
        trail = cls(store, clock=clock)
        if trail._current_state() is not None:
            return trail
        initial_key = random_bytes(INITIAL_KEY_BYTES)
        path = write_initial_key(store.path.parent, initial_key)
        store.run(start_op(initial_key, {"node": node_name}, time_s=clock()))
        del initial_key
        log.warning(
            "audit.trail_started",
            path=str(path),
            detail="move this file off the node to the auditor: with it an audit can check "
            "every entry; left here it proves nothing against whoever takes the disk",
        )
        return trail

    def _current_state(self) -> AuditState | None:
        # a plain read (no transaction of its own, no COMMIT); the store's lock orders it
        # with the writes
        return _state_from_rows(self.store._query(_STATE_QUERY))

    def record(self, kind: AuditKind, **fields: AuditValue) -> AuditRecord:
        """Append one entry now, durably (its own transaction)."""
        return self.store.run(append_op(kind, fields, time_s=self.clock()))

    def op(self, kind: AuditKind, fields: AuditFields) -> StoreOp[AuditRecord]:
        """An operation appending one entry durably, for a group commit. Every entry is
        durable once its operation returns, so a head sent to the peer never names an entry
        that a power cut could take back."""
        return append_op(kind, fields, time_s=self.clock())

    def around(
        self, op: StoreOp[T], kind: AuditKind, describe: Callable[[T], AuditFields]
    ) -> StoreOp[T]:
        """``op`` with an entry appended in its transaction (:func:`with_entry`)."""
        return with_entry(op, kind, describe, time_s=self.clock())

    def head(self) -> PeerHead | None:
        """This trail's head: the last entry's number and chain hash (None if empty)."""
        state = self._current_state()
        if state is None or state.next_seq == 0:
            return None
        return PeerHead(seq=state.next_seq - 1, chain_hash=state.head)

    def peer_head_received(self, head: PeerHead) -> None:
        """Keep the head of the peer's trail; a head that goes backwards (a lower entry number,
        or the same number with another hash) means the peer's trail was cut or replaced: an
        error in the log and an entry here."""
        before = self.store.run(record_peer_head_op(head, received_at_s=self.clock()))
        if before is None:
            return
        if head.seq < before.seq or (
            head.seq == before.seq and head.chain_hash != before.chain_hash
        ):
            log.error(
                "audit.peer_trail_rolled_back",
                seq_before=before.seq,
                seq_now=head.seq,
                detail="the peer node's audit trail lost entries it had reported",
            )
            self.record(
                AuditKind.PEER_TRAIL_ROLLED_BACK,
                seq_before=before.seq,
                head_before=before.chain_hash.hex(),
                seq_now=head.seq,
                head_now=head.chain_hash.hex(),
            )


def record_in_store(
    directory: Path, kind: AuditKind, fields: AuditFields, *, time_s: float
) -> bool:
    """Append one entry to the trail of the store in ``directory`` from another process than
    the daemon (the operator's command; the daemon may be running: SQLite serialises the two
    writers, and the entry is read and written in one transaction with the state). False, and
    nothing written, if there is no store or it has no trail yet."""
    path = directory / DATABASE_NAME
    if not path.exists():
        return False
    try:
        connection = sqlite3.connect(path, isolation_level=None, timeout=5.0)
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute("PRAGMA secure_delete=ON")
    except sqlite3.Error as exc:
        raise KeyStoreError(f"cannot open key store {path}: {exc}") from exc
    database = Database(connection, path)

    def run(tx: Tx) -> bool:
        if _load_state(tx) is None:
            return False
        append_in_tx(tx, kind, fields, time_s=time_s)
        return True

    try:
        return database.run(StoreOp(run))
    finally:
        database.close()


# ---- reading a trail (audit verify / show) ----------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredTrail:
    """A store's trail as read at one instant: its records by ``seq``, the writer's state and
    the head of the peer's trail it last received."""

    records: tuple[AuditRecord, ...]
    state: AuditState | None
    peer_head: PeerHead | None


def _read(directory: Path, read: Callable[[sqlite3.Connection], T]) -> T:
    """Run ``read`` in one read transaction on the store in ``directory`` (the daemon may run
    meanwhile). KeyStoreError if there is no store or it has no audit tables."""
    path = directory / DATABASE_NAME
    if not path.exists():
        raise KeyStoreError(f"no key store in {directory} ({DATABASE_NAME} not found)")
    try:
        db = sqlite3.connect(path, isolation_level=None, timeout=5.0)
    except sqlite3.Error as exc:
        raise KeyStoreError(f"cannot open key store {path}: {exc}") from exc
    try:
        db.execute("BEGIN")
        value = read(db)
        db.execute("COMMIT")
        return value
    except sqlite3.Error as exc:
        raise KeyStoreError(f"cannot read the audit trail of {path}: {exc}") from exc
    finally:
        db.close()


def _peer_head(db: sqlite3.Connection) -> PeerHead | None:
    rows = db.execute("SELECT seq, chain_hash FROM audit_peer_head WHERE singleton = 1").fetchall()
    return PeerHead(seq=int(rows[0][0]), chain_hash=bytes(rows[0][1])) if rows else None


def read_trail(directory: Path) -> StoredTrail:
    """The trail of the store in ``directory``, read at one instant. KeyStoreError if there is
    no store; AuditTrailBroken if the writer's state row is damaged."""

    def read(db: sqlite3.Connection) -> StoredTrail:
        rows = db.execute("SELECT seq, body, tag, chain_hash FROM audit_log ORDER BY seq")
        records = tuple(
            AuditRecord(seq=int(seq), body=bytes(body), tag=bytes(tag), chain_hash=bytes(h))
            for seq, body, tag, h in rows.fetchall()
        )
        return StoredTrail(records=records, state=_load_state(db), peer_head=_peer_head(db))

    return _read(directory, read)


def read_peer_head(directory: Path) -> PeerHead | None:
    """The head of the PEER's trail that the store in ``directory`` last received."""
    return _read(directory, _peer_head)
