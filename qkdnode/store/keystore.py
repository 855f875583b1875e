"""The crash-safe key store: SQLite in WAL mode, ``synchronous=FULL``, ``secure_delete=ON``.

It holds the distilled blocks, the consumer keys cut from them (UUID key ID, bytes, state) and the
authentication-key pool with its ledger state. Every key-state change is one transaction.

Committing a block is two-phase across the two nodes (the protocol lives in the node): each side
first *stages* the block durably (state ``staged``: nothing of it is deliverable), and only after
both sides have staged it does each *commit* it (its keys become ``available``). After a crash the
peers compare the blocks they hold in ``staged`` state and commit or drop each on both sides.

Any SQLite error is turned into :class:`~qkdnode.errors.KeyStoreError` and the store refuses every
later call: after a failed write or fsync the daemon must stop, never carry on.
"""

from __future__ import annotations

import enum
import os
import sqlite3
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from qkdnode.errors import KeyStoreError

SCHEMA_VERSION: Final = 1
DATABASE_NAME: Final = "keys.db"

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS blocks (
    block_id          INTEGER PRIMARY KEY,
    state             TEXT NOT NULL CHECK (state IN ('staged', 'committed', 'dropped')),
    first_pulse_index INTEGER NOT NULL,
    pulse_count       INTEGER NOT NULL,
    secret_bits       INTEGER NOT NULL,
    auth_pool_bits    INTEGER NOT NULL,
    stats             TEXT NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS keys (
    key_id     TEXT PRIMARY KEY,
    block_id   INTEGER NOT NULL REFERENCES blocks (block_id),
    position   INTEGER NOT NULL,
    size_bits  INTEGER NOT NULL,
    material   BLOB,
    state      TEXT NOT NULL
               CHECK (state IN ('staged', 'available', 'reserved', 'delivered')),
    master_sae TEXT,
    slave_sae  TEXT,
    UNIQUE (block_id, position)
) STRICT;
CREATE INDEX IF NOT EXISTS keys_by_state ON keys (state, block_id, position);
CREATE TABLE IF NOT EXISTS auth_pool (
    block_id INTEGER PRIMARY KEY REFERENCES blocks (block_id),
    material BLOB NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS auth_ledger (
    singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
    state     BLOB NOT NULL
) STRICT;
"""


class BlockState(enum.Enum):
    STAGED = "staged"
    COMMITTED = "committed"
    DROPPED = "dropped"


class KeyState(enum.Enum):
    STAGED = "staged"
    AVAILABLE = "available"
    RESERVED = "reserved"
    DELIVERED = "delivered"


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredKey:
    """One consumer key. ``material`` never appears in the repr."""

    key_id: uuid.UUID
    block_id: int
    size_bits: int
    material: bytes

    def __repr__(self) -> str:
        return (
            f"StoredKey(key_id={self.key_id}, block_id={self.block_id}, size_bits={self.size_bits})"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class StagedBlock:
    """Everything a node writes for one distilled block, in one transaction.

    ``consumer_keys`` are the keys consumers may get once the block is committed (IDs agreed with
    the peer); ``auth_pool_material`` is the share of the block taken by the authentication-key
    pool (never delivered to consumers); ``auth_ledger_state`` is the ledger state after the
    deposit, persisted atomically with it.
    """

    block_id: int
    first_pulse_index: int
    pulse_count: int
    consumer_keys: Sequence[tuple[uuid.UUID, bytes]]
    key_size_bits: int
    auth_pool_material: bytes
    auth_ledger_state: bytes | None
    stats_json: str = "{}"

    def __repr__(self) -> str:
        return (
            f"StagedBlock(block_id={self.block_id}, keys={len(self.consumer_keys)}, "
            f"auth_pool_bytes={len(self.auth_pool_material)})"
        )


@dataclass(frozen=True, slots=True)
class StoreCounts:
    staged: int
    available: int
    reserved: int
    delivered: int


class KeyStore:
    """A node's key store. Open with :meth:`open`; not thread-safe (one daemon task owns it)."""

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self._db: sqlite3.Connection | None = connection
        self.path = path

    # ---- life cycle -------------------------------------------------------------------------

    @classmethod
    def open(cls, directory: Path, *, node_name: str) -> KeyStore:
        """Open (creating if needed) the store in ``directory``; files are private to the owner.

        Raises KeyStoreError if the directory holds another node's store or an unknown schema.
        """
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            path = directory / DATABASE_NAME
            old_umask = os.umask(0o077)  # database, WAL and shm files are created 0600
            try:
                connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            finally:
                os.umask(old_umask)
            store = cls(connection, path)
            store._configure(node_name)
        except sqlite3.Error as exc:
            raise KeyStoreError(f"cannot open key store in {directory}: {exc}") from exc
        for suffix in ("", "-wal", "-shm"):
            candidate = Path(f"{path}{suffix}")
            if candidate.exists():
                os.chmod(candidate, 0o600)
        return store

    def _configure(self, node_name: str) -> None:
        db = self._conn
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise KeyStoreError(f"key store {self.path}: WAL mode refused (got {mode})")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA secure_delete=ON")
        db.execute("PRAGMA foreign_keys=ON")
        with self._transaction() as tx:
            tx.executescript_in_tx(_SCHEMA)
            rows = dict(tx.execute("SELECT name, value FROM meta").fetchall())
            if not rows:
                tx.execute(
                    "INSERT INTO meta (name, value) VALUES (?, ?), (?, ?)",
                    ("schema_version", str(SCHEMA_VERSION), "node_name", node_name),
                )
            else:
                if rows.get("schema_version") != str(SCHEMA_VERSION):
                    raise KeyStoreError(
                        f"key store {self.path}: schema version {rows.get('schema_version')!r},"
                        f" this qkdnode reads {SCHEMA_VERSION}"
                    )
                if rows.get("node_name") != node_name:
                    raise KeyStoreError(
                        f"key store {self.path} belongs to node {rows.get('node_name')!r},"
                        f" not {node_name!r}: point store.directory at this node's own store"
                    )

    def close(self) -> None:
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
    def _transaction(self) -> Iterator[_Tx]:
        """One durable transaction; any SQLite error poisons the store and raises KeyStoreError."""
        db = self._conn
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield _Tx(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._fail()
            raise KeyStoreError(f"key store write failed ({exc}); stop the daemon") from exc

    def _fail(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            with suppress(sqlite3.Error):
                db.close()

    def _query(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        try:
            return self._conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            self._fail()
            raise KeyStoreError(f"key store read failed ({exc}); stop the daemon") from exc

    # ---- blocks -----------------------------------------------------------------------------

    def stage_block(self, block: StagedBlock) -> None:
        """Durably store a block and its keys in state ``staged`` (nothing deliverable yet)."""
        with self._transaction() as tx:
            existing = tx.execute(
                "SELECT state FROM blocks WHERE block_id = ?", (block.block_id,)
            ).fetchone()
            if existing is not None:
                raise KeyStoreError(f"block {block.block_id} already stored ({existing[0]})")
            secret_bits = len(block.consumer_keys) * block.key_size_bits
            tx.execute(
                "INSERT INTO blocks (block_id, state, first_pulse_index, pulse_count,"
                " secret_bits, auth_pool_bits, stats) VALUES (?, 'staged', ?, ?, ?, ?, ?)",
                (
                    block.block_id,
                    block.first_pulse_index,
                    block.pulse_count,
                    secret_bits,
                    8 * len(block.auth_pool_material),
                    block.stats_json,
                ),
            )
            tx.executemany(
                "INSERT INTO keys (key_id, block_id, position, size_bits, material, state)"
                " VALUES (?, ?, ?, ?, ?, 'staged')",
                [
                    (str(key_id), block.block_id, position, block.key_size_bits, material)
                    for position, (key_id, material) in enumerate(block.consumer_keys)
                ],
            )
            if block.auth_pool_material:
                tx.execute(
                    "INSERT INTO auth_pool (block_id, material) VALUES (?, ?)",
                    (block.block_id, block.auth_pool_material),
                )

    def commit_block(self, block_id: int, *, auth_ledger_state: bytes | None = None) -> None:
        """Make a staged block's keys available (idempotent for a committed block)."""
        with self._transaction() as tx:
            state = tx.block_state(block_id)
            if state is BlockState.COMMITTED:
                return
            if state is not BlockState.STAGED:
                raise KeyStoreError(f"block {block_id} cannot be committed from {state}")
            tx.execute("UPDATE blocks SET state = 'committed' WHERE block_id = ?", (block_id,))
            tx.execute(
                "UPDATE keys SET state = 'available' WHERE block_id = ? AND state = 'staged'",
                (block_id,),
            )
            if auth_ledger_state is not None:
                tx.save_auth_ledger(auth_ledger_state)

    def drop_block(self, block_id: int) -> None:
        """Drop a staged block: its key material and pool share are erased (secure_delete)."""
        with self._transaction() as tx:
            state = tx.block_state(block_id)
            if state is BlockState.DROPPED or state is None:
                if state is None:
                    tx.execute(
                        "INSERT INTO blocks (block_id, state, first_pulse_index, pulse_count,"
                        " secret_bits, auth_pool_bits, stats) VALUES (?, 'dropped', 0, 0, 0, 0,"
                        " '{}')",
                        (block_id,),
                    )
                return
            if state is BlockState.COMMITTED:
                raise KeyStoreError(f"block {block_id} is committed and cannot be dropped")
            tx.execute("DELETE FROM keys WHERE block_id = ?", (block_id,))
            tx.execute("DELETE FROM auth_pool WHERE block_id = ?", (block_id,))
            tx.execute("UPDATE blocks SET state = 'dropped' WHERE block_id = ?", (block_id,))

    def block_state(self, block_id: int) -> BlockState | None:
        rows = self._query("SELECT state FROM blocks WHERE block_id = ?", (block_id,))
        return BlockState(rows[0][0]) if rows else None

    def staged_block_ids(self) -> list[int]:
        rows = self._query("SELECT block_id FROM blocks WHERE state = 'staged' ORDER BY block_id")
        return [int(row[0]) for row in rows]

    def last_block_id(self) -> int | None:
        rows = self._query("SELECT MAX(block_id) FROM blocks")
        value = rows[0][0]
        return None if value is None else int(value)

    # ---- keys -------------------------------------------------------------------------------

    def counts(self) -> StoreCounts:
        rows = dict(self._query("SELECT state, COUNT(*) FROM keys GROUP BY state"))

        def count(state: str) -> int:
            return int(rows.get(state, 0))

        return StoreCounts(
            staged=count("staged"),
            available=count("available"),
            reserved=count("reserved"),
            delivered=count("delivered"),
        )

    def committed_keys(self) -> list[StoredKey]:
        """All keys of committed blocks still holding material, in block order (for checks)."""
        rows = self._query(
            "SELECT key_id, block_id, size_bits, material FROM keys"
            " WHERE state IN ('available', 'reserved') ORDER BY block_id, position"
        )
        return [
            StoredKey(
                key_id=uuid.UUID(key_id),
                block_id=block_id,
                size_bits=size_bits,
                material=bytes(material),
            )
            for key_id, block_id, size_bits, material in rows
        ]

    # ---- authentication-key pool ------------------------------------------------------------

    def load_auth_ledger(self) -> bytes | None:
        rows = self._query("SELECT state FROM auth_ledger WHERE singleton = 1")
        return bytes(rows[0][0]) if rows else None

    def save_auth_ledger(self, state: bytes) -> None:
        with self._transaction() as tx:
            tx.save_auth_ledger(state)

    def auth_pool_material(self) -> list[tuple[int, bytes]]:
        """The pool shares of committed blocks, in block order."""
        rows = self._query(
            "SELECT p.block_id, p.material FROM auth_pool p JOIN blocks b USING (block_id)"
            " WHERE b.state = 'committed' ORDER BY p.block_id"
        )
        return [(block_id, bytes(material)) for block_id, material in rows]


class _Tx:
    """The cursor-level view used inside one transaction."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def execute(self, sql: str, params: Sequence[object] = ()) -> sqlite3.Cursor:
        return self._db.execute(sql, params)

    def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        self._db.executemany(sql, rows)

    def executescript_in_tx(self, script: str) -> None:
        # executescript() would COMMIT first; run the statements one by one inside our transaction
        for statement in script.split(";"):
            if statement.strip():
                self._db.execute(statement)

    def block_state(self, block_id: int) -> BlockState | None:
        row = self._db.execute(
            "SELECT state FROM blocks WHERE block_id = ?", (block_id,)
        ).fetchone()
        return BlockState(row[0]) if row else None

    def save_auth_ledger(self, state: bytes) -> None:
        self._db.execute(
            "INSERT INTO auth_ledger (singleton, state) VALUES (1, ?)"
            " ON CONFLICT (singleton) DO UPDATE SET state = excluded.state",
            (state,),
        )
