"""The crash-safe key store: SQLite in WAL mode, ``synchronous=FULL``, ``secure_delete=ON``.

It holds the distilled blocks, the consumer keys cut from them (UUID key ID, bytes, state) and the
authentication-key pool with its ledger state. Every key-state change is one transaction.

Delivery (ETSI GS QKD 014, :mod:`qkdnode.delivery`) hands out *delivery keys*: each has its own
UUID and is cut from one or more stored keys (``KeyPart``: stored key, byte offset, length), so
sizes other than the stored size are served by concatenating or splitting stored keys. The master
node reserves stored keys and records the delivery keys (role ``master``); the peer records the
same layout (role ``slave``). A stored key's material is erased (``secure_delete``) as soon as
every delivery key cut from it has been delivered on this node: each node's copy only serves its
own SAE, so it is never needed after that.

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
import threading
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Generic, TypeVar

from qkdnode.errors import KeyStoreError, ProtocolError, SecurityError

SCHEMA_VERSION: Final = 3  # 2: deliveries and delivery_parts; 3: deliveries.peer_confirmed
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
    ledger_mark_bits  INTEGER NOT NULL DEFAULT 0,
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
-- delivery takes the oldest available key of one parity (the master's partition): without the
-- parity in the index that scan steps over every available key of the other partition first
DROP INDEX IF EXISTS keys_by_state;
CREATE INDEX IF NOT EXISTS keys_by_state_parity ON keys (state, position % 2, block_id, position);
CREATE TABLE IF NOT EXISTS deliveries (
    delivery_id TEXT PRIMARY KEY,
    role        TEXT NOT NULL CHECK (role IN ('master', 'slave')),
    state       TEXT NOT NULL CHECK (state IN ('reserved', 'delivered')),
    master_sae  TEXT NOT NULL,
    slave_sae   TEXT NOT NULL,
    size_bits   INTEGER NOT NULL,
    -- master side: the peer acknowledged its durable record (a reservation made ahead of
    -- requests survives a restart only then)
    peer_confirmed INTEGER NOT NULL DEFAULT 0 CHECK (peer_confirmed IN (0, 1))
) STRICT;
CREATE TABLE IF NOT EXISTS delivery_parts (
    delivery_id  TEXT NOT NULL REFERENCES deliveries (delivery_id),
    seq          INTEGER NOT NULL,
    key_id       TEXT NOT NULL REFERENCES keys (key_id),
    offset_bytes INTEGER NOT NULL,
    length_bytes INTEGER NOT NULL,
    PRIMARY KEY (delivery_id, seq)
) STRICT;
CREATE INDEX IF NOT EXISTS parts_by_key ON delivery_parts (key_id);
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
    pool (never delivered to consumers); ``ledger_mark_bits`` is the ledger offset at the block's
    open, which fixes the pool's share on both sides (see ``AuthKeyLedger.deposit``).
    """

    block_id: int
    first_pulse_index: int
    pulse_count: int
    consumer_keys: Sequence[tuple[uuid.UUID, bytes]]
    key_size_bits: int
    auth_pool_material: bytes
    ledger_mark_bits: int = 0
    stats_json: str = "{}"

    def __repr__(self) -> str:
        return (
            f"StagedBlock(block_id={self.block_id}, keys={len(self.consumer_keys)}, "
            f"auth_pool_bytes={len(self.auth_pool_material)})"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class StagedMaterial:
    """The key material of a staged block: the pool's share and the consumer keys, in order."""

    block_id: int
    pool_material: bytes
    consumer_material: bytes
    ledger_mark_bits: int

    def __repr__(self) -> str:
        return (
            f"StagedMaterial(block_id={self.block_id}, pool_bytes={len(self.pool_material)}, "
            f"consumer_bytes={len(self.consumer_material)})"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyPart:
    """Bytes ``[offset_bytes, offset_bytes + length_bytes)`` of the stored key ``key_id``."""

    key_id: uuid.UUID
    offset_bytes: int
    length_bytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryKey:
    """A key handed to an SAE: its own ID and the stored-key parts it is the concatenation of."""

    key_id: uuid.UUID
    size_bits: int
    parts: tuple[KeyPart, ...]


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class StoreOp(Generic[T]):
    """One logical store operation for :meth:`KeyStore.run_batch`: ``run`` does its reads and
    writes inside the batch's transaction (one that deletes key material says so on the
    transaction, ``_Tx.erased``: the batch then ends with a WAL checkpoint); ``durable=False``
    says that losing it in a power cut is harmless, so a batch of only such operations commits
    without waiting for the disk (it becomes durable with the next durable commit: the WAL is
    written and synced in order)."""

    run: Callable[[_Tx], T]
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


class DeliveryRefused(ProtocolError):
    """Delivery keys unknown here, already delivered, or of another master SAE (HTTP 400)."""


class NotKeyOwner(SecurityError):
    """The caller is not the slave SAE the delivery keys were reserved for (HTTP 401)."""


class ReservationRejected(ProtocolError):
    """The peer's reservation names stored keys this node cannot reserve now.

    ``burned_key_ids`` are stored keys that can never be reserved here again (already reserved or
    delivered, or unknown): the master must erase them instead of offering them again. The other
    keys were only not yet committed here (a commit in flight): the master may retry them later.
    """

    def __init__(self, message: str, *, burned_key_ids: Sequence[uuid.UUID] = ()) -> None:
        super().__init__(message, field="keys")
        self.burned_key_ids = tuple(burned_key_ids)


@dataclass(frozen=True, slots=True, kw_only=True)
class MasterReservation:
    """A delivery key this node reserved as master and has not handed out yet."""

    key_id: uuid.UUID
    master_sae: str
    slave_sae: str
    size_bits: int
    peer_confirmed: bool


@dataclass(frozen=True, slots=True)
class StoreCounts:
    staged: int
    available: int
    reserved: int
    delivered: int


class KeyStore:
    """A node's key store. Open with :meth:`open`.

    One daemon task owns it; the only other thread that may use it is the worker thread of
    :class:`~qkdnode.store.groupcommit.GroupCommit` running :meth:`run_batch`. A lock serialises
    every use of the connection (a transaction or query waits for the one in progress).
    """

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
                # a short busy timeout: the daemon is the only writer, and a reader elsewhere
                # must never block its event loop for long (sqlite3's default is 5 s)
                connection = sqlite3.connect(
                    path, isolation_level=None, check_same_thread=False, timeout=0.2
                )
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
                if rows.get("schema_version") == "2":  # in place: one column more
                    tx.execute(
                        "ALTER TABLE deliveries ADD COLUMN peer_confirmed INTEGER NOT NULL"
                        " DEFAULT 0 CHECK (peer_confirmed IN (0, 1))"
                    )
                    tx.execute(
                        "UPDATE meta SET value = ? WHERE name = 'schema_version'",
                        (str(SCHEMA_VERSION),),
                    )
                    rows["schema_version"] = str(SCHEMA_VERSION)
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
    def _transaction(
        self,
        *,
        erases: bool = False,
        notify: bool = True,
        durable: bool = True,
        fold_wal: bool = True,
    ) -> Iterator[_Tx]:
        """One transaction, durable at COMMIT (fsync of the WAL) unless ``durable=False``; any
        SQLite error poisons the store and raises KeyStoreError.

        ``erases`` (or ``_Tx.erased`` set inside): the transaction deletes or overwrites key
        material. ``secure_delete`` zeroes the freed pages of the database, but the WAL still
        holds earlier copies of them, so the WAL is checkpointed into the database and truncated
        right after the commit, unless ``fold_wal=False`` (the caller folds it).
        ``notify=False``: a failure is reported by :meth:`report_failure` later, not by calling
        ``on_failure`` here (a worker thread must not call into the event loop).
        """
        with self._lock:
            db = self._conn
            try:
                if not durable:  # WAL mode, NORMAL: the WAL is synced at the next FULL commit
                    db.execute("PRAGMA synchronous=NORMAL")
                try:
                    db.execute("BEGIN IMMEDIATE")
                    tx = _Tx(db)
                    try:
                        yield tx
                    except BaseException:
                        db.execute("ROLLBACK")
                        raise
                    db.execute("COMMIT")
                finally:
                    if not durable:
                        db.execute("PRAGMA synchronous=FULL")
            except sqlite3.Error as exc:
                self._fail(notify=notify)
                raise KeyStoreError(f"key store write failed ({exc}); stop the daemon") from exc
            if fold_wal and (erases or tx.erased):
                self._checkpoint()

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
                " secret_bits, auth_pool_bits, ledger_mark_bits, stats)"
                " VALUES (?, 'staged', ?, ?, ?, ?, ?, ?)",
                (
                    block.block_id,
                    block.first_pulse_index,
                    block.pulse_count,
                    secret_bits,
                    8 * len(block.auth_pool_material),
                    block.ledger_mark_bits,
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
        with self._transaction(erases=True) as tx:
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
                # the pool's share now lives in the ledger state: keep one copy of the secret
                tx.execute("DELETE FROM auth_pool WHERE block_id = ?", (block_id,))

    def drop_block(self, block_id: int) -> None:
        """Drop a staged block: its key material and pool share are erased (secure_delete)."""
        with self._transaction(erases=True) as tx:
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

    # ---- delivery (ETSI 014) ----------------------------------------------------------------

    def available_count(self, *, parity: int) -> int:
        """Number of available keys at block positions of the given parity (0 even, 1 odd)."""
        rows = self._query(
            "SELECT COUNT(*) FROM keys WHERE state = 'available' AND position % 2 = ?", (parity,)
        )
        return int(rows[0][0])

    def reserve_for_delivery(
        self,
        *,
        parity: int,
        delivery_ids: Sequence[uuid.UUID],
        size_bits: int,
        master_sae: str,
        slave_sae: str,
    ) -> list[DeliveryKey] | None:
        """Reserve stored keys for ``len(delivery_ids)`` delivery keys of ``size_bits`` each.

        Takes the oldest available keys at positions of ``parity`` (the partition that lets both
        nodes act as master at once), cuts the delivery keys from their concatenation in order
        (the unused tail of the last stored key is erased when its deliveries are done), marks them
        ``reserved`` for (master, slave) and records the layout, in one transaction. Returns None,
        changing nothing, if too few keys are available.
        """
        return self._run_one(
            self.reserve_op(
                parity=parity,
                delivery_ids=delivery_ids,
                size_bits=size_bits,
                master_sae=master_sae,
                slave_sae=slave_sae,
            )
        )

    def reserve_op(
        self,
        *,
        parity: int,
        delivery_ids: Sequence[uuid.UUID],
        size_bits: int,
        master_sae: str,
        slave_sae: str,
        keep_available: int = 0,
    ) -> StoreOp[list[DeliveryKey] | None]:
        """:meth:`reserve_for_delivery` as one operation of a :meth:`run_batch`; the arguments
        are checked at once (ValueError). ``keep_available``: reserve only if at least that many
        stored keys of the parity stay available afterwards (else None, nothing changed)."""
        if size_bits <= 0 or size_bits % 8 or not delivery_ids or keep_available < 0:
            raise ValueError(
                "size_bits must be a positive multiple of 8, delivery_ids non-empty and"
                " keep_available >= 0"
            )
        size_bytes = size_bits // 8
        needed_bytes = size_bytes * len(delivery_ids)

        def run(tx: _Tx) -> list[DeliveryKey] | None:
            chosen: list[tuple[str, int]] = []
            total = 0
            cursor = tx.execute(
                "SELECT key_id, size_bits FROM keys WHERE state = 'available' AND position % 2 = ?"
                " ORDER BY block_id, position",
                (parity,),
            )
            for key_id, stored_bits in cursor:
                chosen.append((key_id, int(stored_bits) // 8))
                total += int(stored_bits) // 8
                if total >= needed_bytes:
                    break
            cursor.close()
            if total < needed_bytes:
                return None
            if (
                keep_available
                and not tx.execute(  # the index counts no further than needed
                    "SELECT 1 FROM keys WHERE state = 'available' AND position % 2 = ?"
                    " ORDER BY block_id, position LIMIT 1 OFFSET ?",
                    (parity, len(chosen) + keep_available - 1),
                ).fetchone()
            ):
                return None
            layout = _cut(chosen, delivery_ids, size_bytes)
            tx.executemany(
                "UPDATE keys SET state = 'reserved', master_sae = ?, slave_sae = ?"
                " WHERE key_id = ? AND state = 'available'",
                [(master_sae, slave_sae, key_id) for key_id, _ in chosen],
            )
            tx.insert_deliveries(layout, "master", master_sae, slave_sae)
            return layout

        # not durable: if a power cut loses this reservation, its stored keys are available
        # here again but recorded at the peer, which refuses them as used up when they are
        # offered again (they are erased then); the take that hands them out is durable and
        # its WAL sync makes this reservation durable too, before any key leaves the node
        return StoreOp(run, durable=False)

    def record_peer_reservation(
        self,
        keys: Sequence[DeliveryKey],
        *,
        parity: int,
        master_sae: str,
        slave_sae: str,
    ) -> None:
        """Durably record, on the slave's node, the delivery keys the peer (master) reserved.

        Every stored key named must be available here at a position of ``parity`` (the master
        node's partition); parts must lie inside their stored key, not overlap, and add up to the
        delivery key's size. Raises ProtocolError for a malformed layout and ReservationRejected
        when stored keys are not available; records nothing then. Recording the same reservation
        again is a no-op (a retry after a lost acknowledgement). Stored keys recorded here for
        earlier delivery keys of the master are a sign that the master lost those: they are
        erased, with the rest of their stored keys, before the refusal.
        """
        refused = self._run_one(
            self.record_peer_reservation_op(
                keys, parity=parity, master_sae=master_sae, slave_sae=slave_sae
            )
        )
        if refused is not None:
            raise refused

    def record_peer_reservation_op(
        self,
        keys: Sequence[DeliveryKey],
        *,
        parity: int,
        master_sae: str,
        slave_sae: str,
    ) -> StoreOp[ReservationRejected | None]:
        """:meth:`record_peer_reservation` as one operation of a :meth:`run_batch`; an empty
        or repeated key list raises ProtocolError at once. A refusal is the op's value, not
        raised: the reservations it proves dead are erased in the same transaction."""
        if not keys:
            raise ProtocolError("no keys in reservation", field="keys")
        delivery_ids = [str(k.key_id) for k in keys]
        if len(set(delivery_ids)) != len(delivery_ids):
            raise ProtocolError("repeated delivery key ID", field="keys")
        stored_ids = sorted({str(p.key_id) for k in keys for p in k.parts})

        def run(tx: _Tx) -> ReservationRejected | None:
            existing = tx.select_in(
                "SELECT delivery_id, role, master_sae, slave_sae FROM deliveries"
                " WHERE delivery_id IN ({})",
                delivery_ids,
            )
            if existing:
                if (
                    len(existing) == len(keys)
                    and all(row[1:] == ("slave", master_sae, slave_sae) for row in existing)
                    and self._same_layout(tx, keys)
                ):
                    return None
                raise ProtocolError("delivery key ID already in use", field="keys")
            rows = {
                row[0]: row[1:]
                for row in tx.select_in(
                    "SELECT key_id, position, state, size_bits FROM keys WHERE key_id IN ({})",
                    stored_ids,
                )
            }
            ranges: dict[str, list[tuple[int, int]]] = {}
            for key in keys:
                if key.size_bits <= 0 or key.size_bits % 8 or not key.parts:
                    raise ProtocolError("bad delivery key size or no parts", field="keys.size_bits")
                if sum(p.length_bytes for p in key.parts) * 8 != key.size_bits:
                    raise ProtocolError("parts do not add up to size_bits", field="keys.parts")
                for part in key.parts:
                    ranges.setdefault(str(part.key_id), []).append(
                        (part.offset_bytes, part.length_bytes)
                    )
            burned: list[uuid.UUID] = []
            transient = 0
            for key_id, spans in ranges.items():
                row = rows.get(key_id)
                if row is None:
                    burned.append(uuid.UUID(key_id))
                    continue
                position, state, stored_bits = row
                if position % 2 != parity:
                    raise ProtocolError("stored key outside the master's partition", field="keys")
                end = 0
                for offset, length in sorted(spans):
                    if offset < end or length <= 0 or offset + length > stored_bits // 8:
                        raise ProtocolError(
                            "part outside its stored key or overlapping", field="keys.parts"
                        )
                    end = offset + length
                if state == "staged":
                    transient += 1
                elif state != "available":
                    burned.append(uuid.UUID(key_id))
            if burned or transient:
                self._burn_dead_reservations(tx, [str(k) for k in burned])
                return ReservationRejected(
                    f"{len(burned)} stored keys used up here, {transient} not committed yet",
                    burned_key_ids=burned,
                )
            tx.executemany(
                "UPDATE keys SET state = 'reserved', master_sae = ?, slave_sae = ?"
                " WHERE key_id = ?",
                [(master_sae, slave_sae, key_id) for key_id in stored_ids],
            )
            tx.insert_deliveries(keys, "slave", master_sae, slave_sae)
            return None

        return StoreOp(run)

    @staticmethod
    def _burn_dead_reservations(tx: _Tx, stored_ids: Sequence[str]) -> None:
        """The master offers again stored keys recorded here for its earlier delivery keys: it
        offers only keys it holds available, so it has none of those delivery keys any more
        (released, or lost in a crash before it handed them out) and nobody can ever fetch
        them here. Erase them with all their stored keys instead of keeping them for ever."""
        dead = [
            row[0]
            for row in tx.select_in(
                "SELECT DISTINCT dp.delivery_id FROM delivery_parts dp JOIN deliveries d"
                " USING (delivery_id) WHERE d.role = 'slave' AND d.state = 'reserved'"
                " AND dp.key_id IN ({})",
                stored_ids,
            )
        ]
        if not dead:
            return
        keys_of_dead = [
            row[0]
            for row in tx.select_in(
                "SELECT DISTINCT key_id FROM delivery_parts WHERE delivery_id IN ({})", dead
            )
        ]
        tx.execute_in("DELETE FROM delivery_parts WHERE delivery_id IN ({})", dead)
        tx.execute_in("DELETE FROM deliveries WHERE delivery_id IN ({})", dead)
        tx.burn_stored_keys(keys_of_dead)

    @staticmethod
    def _same_layout(tx: _Tx, keys: Sequence[DeliveryKey]) -> bool:
        stored = tx.select_in(
            "SELECT delivery_id, seq, key_id, offset_bytes, length_bytes FROM delivery_parts"
            " WHERE delivery_id IN ({}) ORDER BY delivery_id, seq",
            [str(k.key_id) for k in keys],
        )
        wanted = sorted(
            (str(k.key_id), seq, str(p.key_id), p.offset_bytes, p.length_bytes)
            for k in keys
            for seq, p in enumerate(k.parts)
        )
        return [tuple(row) for row in stored] == wanted

    def release_delivery(
        self, delivery_ids: Sequence[uuid.UUID], *, burn: Collection[uuid.UUID] = ()
    ) -> None:
        """Undo a master-side reservation the peer did not confirm, in one transaction.

        The stored keys become available again, except those in ``burn`` (the peer reports them
        used up): their material is erased and they are never offered again.
        """
        self._run_one(self.release_op(delivery_ids, burn=burn))

    def release_op(
        self, delivery_ids: Sequence[uuid.UUID], *, burn: Collection[uuid.UUID] = ()
    ) -> StoreOp[None]:
        """:meth:`release_delivery` as one (erasing) operation of a :meth:`run_batch`."""
        ids = [str(i) for i in delivery_ids]
        burned = {str(i) for i in burn}

        def run(tx: _Tx) -> None:
            stored = [
                row[0]
                for row in tx.select_in(
                    "SELECT DISTINCT dp.key_id FROM delivery_parts dp JOIN deliveries d"
                    " USING (delivery_id) WHERE d.role = 'master' AND d.state = 'reserved'"
                    " AND dp.delivery_id IN ({})",
                    ids,
                )
            ]
            tx.execute_in(
                "DELETE FROM delivery_parts WHERE delivery_id IN (SELECT delivery_id FROM"
                " deliveries WHERE role = 'master' AND state = 'reserved' AND delivery_id IN ({}))",
                ids,
            )
            tx.execute_in(
                "DELETE FROM deliveries WHERE role = 'master' AND state = 'reserved'"
                " AND delivery_id IN ({})",
                ids,
            )
            # a stored key other delivery keys were cut from stays theirs while any of them is
            # reserved, and is erased if any was handed out (its bytes must not come back)
            left = {
                key_id: states
                for key_id, states in tx.select_in(
                    "SELECT dp.key_id, group_concat(DISTINCT d.state) FROM delivery_parts dp"
                    " JOIN deliveries d USING (delivery_id) WHERE dp.key_id IN ({})"
                    " GROUP BY dp.key_id",
                    stored,
                )
            }
            still_reserved = {k for k, states in left.items() if "reserved" in states}
            handed_out = {k for k in left if k not in still_reserved}
            tx.executemany(
                "UPDATE keys SET state = 'available', master_sae = NULL, slave_sae = NULL"
                " WHERE key_id = ? AND state = 'reserved'",
                [(k,) for k in stored if k not in burned and k not in left],
            )
            tx.burn_stored_keys((burned | handed_out) & set(stored) - still_reserved)

        return StoreOp(run)

    def confirm_op(self, delivery_ids: Sequence[uuid.UUID]) -> StoreOp[None]:
        """Note that the peer durably recorded these master-side reservations (not durable
        itself: if a power cut loses the note, they are released at the next start and the
        peer refuses, and so erases, their stored keys when they are offered again)."""
        ids = [str(i) for i in delivery_ids]

        def run(tx: _Tx) -> None:
            tx.execute_in(
                "UPDATE deliveries SET peer_confirmed = 1"
                " WHERE role = 'master' AND state = 'reserved' AND delivery_id IN ({})",
                ids,
            )

        return StoreOp(run, durable=False)

    def master_reservations(self) -> list[MasterReservation]:
        """This node's reserved, not yet delivered, master-side delivery keys, oldest first."""
        rows = self._query(
            "SELECT delivery_id, master_sae, slave_sae, size_bits, peer_confirmed"
            " FROM deliveries WHERE role = 'master' AND state = 'reserved' ORDER BY rowid"
        )
        return [
            MasterReservation(
                key_id=uuid.UUID(key_id),
                master_sae=master_sae,
                slave_sae=slave_sae,
                size_bits=int(size_bits),
                peer_confirmed=bool(confirmed),
            )
            for key_id, master_sae, slave_sae, size_bits, confirmed in rows
        ]

    def take_delivery(
        self,
        delivery_ids: Sequence[uuid.UUID],
        *,
        role: str,
        master_sae: str,
        slave_sae: str,
    ) -> list[tuple[uuid.UUID, bytes]]:
        """Hand out reserved delivery keys exactly once: returns their bytes, in request order.

        All or nothing, in one transaction: every ID must be a ``reserved`` delivery key of this
        node's ``role`` for ``master_sae`` (else DeliveryRefused) and ``slave_sae`` (else
        NotKeyOwner). The keys become ``delivered``; a stored key's material is erased once every
        delivery key cut from it is delivered here.
        """
        return self._run_one(
            self.take_op(delivery_ids, role=role, master_sae=master_sae, slave_sae=slave_sae)
        )

    def take_op(
        self,
        delivery_ids: Sequence[uuid.UUID],
        *,
        role: str,
        master_sae: str,
        slave_sae: str,
    ) -> StoreOp[list[tuple[uuid.UUID, bytes]]]:
        """:meth:`take_delivery` as one (erasing) operation of a :meth:`run_batch`; repeated
        IDs raise DeliveryRefused at once."""
        ids = [str(i) for i in delivery_ids]
        if len(set(ids)) != len(ids):
            raise DeliveryRefused("repeated key ID", field="key_IDs")

        def run(tx: _Tx) -> list[tuple[uuid.UUID, bytes]]:
            rows = {
                row[0]: row[1:]
                for row in tx.select_in(
                    "SELECT delivery_id, role, state, master_sae, slave_sae FROM deliveries"
                    " WHERE delivery_id IN ({})",
                    ids,
                )
            }
            for key_id in ids:
                row = rows.get(key_id)
                if row is None or row[0] != role or row[1] != "reserved":
                    raise DeliveryRefused("one or more keys are not found", field="key_IDs")
            if any(rows[key_id][3] != slave_sae for key_id in ids):
                raise NotKeyOwner("keys were not issued to this slave SAE")
            if any(rows[key_id][2] != master_sae for key_id in ids):
                raise DeliveryRefused("one or more keys are not found", field="key_IDs")
            pieces: dict[str, list[bytes]] = {key_id: [] for key_id in ids}
            touched: set[str] = set()
            for delivery_id, stored_id, offset, length, material in tx.select_in(
                "SELECT dp.delivery_id, dp.key_id, dp.offset_bytes, dp.length_bytes, k.material"
                " FROM delivery_parts dp JOIN keys k USING (key_id)"
                " WHERE dp.delivery_id IN ({}) ORDER BY dp.delivery_id, dp.seq",
                ids,
            ):
                if material is None or len(material) < offset + length:
                    raise KeyStoreError("delivery key part without stored material")
                pieces[delivery_id].append(bytes(material[offset : offset + length]))
                touched.add(stored_id)
            tx.execute_in(
                "UPDATE deliveries SET state = 'delivered' WHERE delivery_id IN ({})", ids
            )
            tx.execute_in(
                "UPDATE keys SET state = 'delivered', material = NULL WHERE key_id IN ({})"
                " AND NOT EXISTS (SELECT 1 FROM delivery_parts dp JOIN deliveries d"
                " USING (delivery_id) WHERE dp.key_id = keys.key_id AND d.state = 'reserved')",
                sorted(touched),
            )
            tx.erased = True
            return [(uuid.UUID(key_id), b"".join(pieces[key_id])) for key_id in ids]

        return StoreOp(run)

    # ---- group commit -----------------------------------------------------------------------

    def run_batch(
        self, ops: Sequence[StoreOp[Any]], *, notify: bool = True, fold_wal: bool = True
    ) -> list[OpOutcome[Any]]:
        """Run several operations in ONE durable transaction: one COMMIT (one fsync) and, if any
        of them erased key material, one WAL checkpoint before returning — or, with
        ``fold_wal=False``, none: the caller must then call :meth:`fold_wal` right after.

        Each operation runs inside its own SAVEPOINT: one that raises (any Exception but an
        SQLite error) is rolled back alone and its exception is its outcome; the others commit.
        Later operations see the changes of earlier ones (the same stored key is never reserved
        twice). An SQLite error anywhere poisons the store and raises KeyStoreError for the
        whole batch (nothing of it is committed). ``notify=False`` (from a worker thread): the
        owner calls :meth:`report_failure` afterwards instead of ``on_failure`` running here.
        """
        outcomes: list[OpOutcome[Any]] = []
        durable = any(op.durable for op in ops)
        with self._lock:  # no other thread between the COMMIT and the checkpoint
            with self._transaction(notify=notify, durable=durable, fold_wal=False) as tx:
                for op in ops:
                    tx.execute("SAVEPOINT op")
                    try:
                        value = op.run(tx)
                    except sqlite3.Error:
                        raise  # the whole transaction rolls back and the store stops
                    except Exception as exc:
                        tx.execute("ROLLBACK TO op")
                        tx.execute("RELEASE op")
                        outcomes.append(OpOutcome(error=exc))
                        continue
                    tx.execute("RELEASE op")
                    outcomes.append(OpOutcome(value=value))
                erased = tx.erased  # also for an op rolled back after erasing: one fold more
            if erased and fold_wal:  # after the COMMIT, before any result is handed out
                self._checkpoint()
            elif erased:
                self.wal_holds_erased = True
        return outcomes

    def fold_wal(self) -> None:
        """Checkpoint the WAL into the database and truncate it (the copies of erased pages go);
        nothing if the store is closed (closing folds it too)."""
        with self._lock:
            self.wal_holds_erased = False
            if self._db is not None:
                self._checkpoint()

    def _run_one(self, op: StoreOp[T]) -> T:
        """One operation in its own transaction (checkpointed after it if it erased)."""
        with self._transaction(durable=op.durable) as tx:
            return op.run(tx)

    # ---- authentication-key pool ------------------------------------------------------------

    def load_auth_ledger(self) -> bytes | None:
        rows = self._query("SELECT state FROM auth_ledger WHERE singleton = 1")
        return bytes(rows[0][0]) if rows else None

    def save_auth_ledger(self, state: bytes) -> None:
        with self._transaction(erases=True) as tx:
            tx.save_auth_ledger(state)

    def staged_material(self, block_id: int) -> StagedMaterial:
        """A staged block's key material, to commit it after a crash (limbo resolution)."""
        rows = self._query(
            "SELECT state, ledger_mark_bits FROM blocks WHERE block_id = ?", (block_id,)
        )
        if not rows or rows[0][0] != "staged":
            raise KeyStoreError(f"block {block_id} is not staged")
        keys = self._query(
            "SELECT material FROM keys WHERE block_id = ? ORDER BY position", (block_id,)
        )
        pool = self._query("SELECT material FROM auth_pool WHERE block_id = ?", (block_id,))
        return StagedMaterial(
            block_id=block_id,
            pool_material=bytes(pool[0][0]) if pool else b"",
            consumer_material=b"".join(bytes(row[0]) for row in keys),
            ledger_mark_bits=int(rows[0][1]),
        )


def _cut(
    stored: Sequence[tuple[str, int]], delivery_ids: Sequence[uuid.UUID], size_bytes: int
) -> list[DeliveryKey]:
    """Cut delivery keys of ``size_bytes`` in order from the concatenation of ``stored`` keys."""
    layout: list[DeliveryKey] = []
    index, offset = 0, 0
    for delivery_id in delivery_ids:
        parts: list[KeyPart] = []
        remaining = size_bytes
        while remaining:
            key_id, stored_bytes = stored[index]
            take = min(remaining, stored_bytes - offset)
            parts.append(KeyPart(key_id=uuid.UUID(key_id), offset_bytes=offset, length_bytes=take))
            remaining -= take
            offset += take
            if offset == stored_bytes:
                index, offset = index + 1, 0
        layout.append(DeliveryKey(key_id=delivery_id, size_bits=8 * size_bytes, parts=tuple(parts)))
    return layout


class _Tx:
    """The cursor-level view used inside one transaction."""

    def select_in(self, sql: str, values: Sequence[object]) -> list[tuple[Any, ...]]:
        """Run ``sql`` with its ``IN ({})`` filled with one placeholder per value."""
        if not values:
            return []
        placeholders = ",".join("?" * len(values))
        return self._db.execute(sql.format(placeholders), values).fetchall()

    def execute_in(self, sql: str, values: Sequence[object]) -> None:
        if values:
            self._db.execute(sql.format(",".join("?" * len(values))), values)

    def insert_deliveries(
        self, keys: Sequence[DeliveryKey], role: str, master_sae: str, slave_sae: str
    ) -> None:
        self._db.executemany(
            "INSERT INTO deliveries (delivery_id, role, state, master_sae, slave_sae, size_bits)"
            " VALUES (?, ?, 'reserved', ?, ?, ?)",
            [(str(k.key_id), role, master_sae, slave_sae, k.size_bits) for k in keys],
        )
        self._db.executemany(
            "INSERT INTO delivery_parts (delivery_id, seq, key_id, offset_bytes, length_bytes)"
            " VALUES (?, ?, ?, ?, ?)",
            [
                (str(k.key_id), seq, str(p.key_id), p.offset_bytes, p.length_bytes)
                for k in keys
                for seq, p in enumerate(k.parts)
            ],
        )

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self.erased = False  # key material deleted here: the WAL must be folded after COMMIT

    def burn_stored_keys(self, key_ids: Collection[str]) -> None:
        """Erase stored keys for good: ``delivered`` without material (never offered again)."""
        if key_ids:
            self.erased = True
            self._db.executemany(
                "UPDATE keys SET state = 'delivered', material = NULL WHERE key_id = ?",
                [(k,) for k in sorted(key_ids)],
            )

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
