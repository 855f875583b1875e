"""The crash-safe key store: SQLite in WAL mode, ``synchronous=FULL``, ``secure_delete=ON``.

It holds the distilled blocks, the consumer keys cut from them (UUID key ID, bytes, state) and the
authentication-key pool with its ledger state. Every key-state change is one :class:`StoreOp` in
one transaction. The parts, one module each: ``transaction`` (connection, lock, durable commits,
group-commit batches), ``schema`` (tables and migrations), ``blocks`` (staging and two-phase
commit of blocks) and ``deliveries`` (delivery keys for ETSI GS QKD 014). This module opens the
store and answers the queries; the names of the others are importable from here.

Any SQLite error is turned into :class:`~qkdnode.errors.KeyStoreError` and the store refuses every
later call: after a failed write or fsync the daemon must stop, never carry on.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Sequence
from pathlib import Path

from qkdnode.config.delivery import KeyKind
from qkdnode.errors import KeyStoreError
from qkdnode.store import deliveries
from qkdnode.store.blocks import (
    BlockState,
    KeyState,
    StagedBlock,
    StagedMaterial,
    StoreCounts,
    StoredKey,
    commit_op,
    drop_op,
    save_auth_ledger,
    stage_op,
)
from qkdnode.store.deliveries import (
    DeliveryKey,
    DeliveryRefused,
    KeyPart,
    MasterReservation,
    NotKeyOwner,
    ReservationRejected,
)
from qkdnode.store.schema import DATABASE_NAME, SCHEMA_VERSION, install_schema
from qkdnode.store.transaction import (
    Database,
    OpOutcome,
    StoreOp,
    Tx,
    TxOptions,
    connect_private,
    restrict_files,
)

# key ids per lookup: far below SQLite's limit on bound parameters
_IDS_PER_QUERY = 500

__all__ = [
    "DATABASE_NAME",
    "SCHEMA_VERSION",
    "BlockState",
    "DeliveryKey",
    "DeliveryRefused",
    "KeyPart",
    "KeyState",
    "KeyStore",
    "MasterReservation",
    "NotKeyOwner",
    "OpOutcome",
    "ReservationRejected",
    "StagedBlock",
    "StagedMaterial",
    "StoreCounts",
    "StoreOp",
    "StoredKey",
    "Tx",
    "TxOptions",
]


class KeyStore(Database):
    """A node's key store. Open with :meth:`open`.

    One daemon task owns it; the only other thread that may use it is the worker thread of
    :class:`~qkdnode.store.groupcommit.GroupCommit` running :meth:`run_batch`. The delivery
    operations (``reserve_op``, ``take_op``, ...) are those of :mod:`qkdnode.store.deliveries`,
    reachable from the store for its users' convenience.
    """

    reserve_op = staticmethod(deliveries.reserve_op)
    record_peer_reservation_op = staticmethod(deliveries.record_peer_reservation_op)
    release_op = staticmethod(deliveries.release_op)
    confirm_op = staticmethod(deliveries.confirm_op)
    take_op = staticmethod(deliveries.take_op)

    # ---- life cycle -------------------------------------------------------------------------

    @classmethod
    def open(cls, directory: Path, *, node_name: str) -> KeyStore:
        """Open (creating if needed) the store in ``directory``; files are private to the owner.

        Raises KeyStoreError if the directory holds another node's store or an unknown schema.
        """
        try:
            connection, path = connect_private(directory, DATABASE_NAME)
            store = cls(connection, path)
            store._configure(node_name)
        except sqlite3.Error as exc:
            raise KeyStoreError(f"cannot open key store in {directory}: {exc}") from exc
        restrict_files(path)
        return store

    def _configure(self, node_name: str) -> None:
        self._durable_wal("key store")
        self._conn.execute("PRAGMA foreign_keys=ON")
        with self._transaction() as tx:
            install_schema(tx, self.path, node_name)

    # ---- blocks -----------------------------------------------------------------------------

    def stage_block(self, block: StagedBlock) -> None:
        """Durably store a block and its keys in state ``staged`` (see ``blocks.stage_op``)."""
        self.run(stage_op(block))

    def commit_block(self, block_id: int, *, auth_ledger_state: bytes | None = None) -> None:
        """Make a staged block's keys available (see ``blocks.commit_op``)."""
        self.run(commit_op(block_id, auth_ledger_state=auth_ledger_state))

    def drop_block(self, block_id: int) -> None:
        """Drop a staged block, erasing its key material (see ``blocks.drop_op``)."""
        self.run(drop_op(block_id))

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

    def any_key_known(self, key_ids: Sequence[uuid.UUID]) -> bool:
        """True if any of ``key_ids`` belongs to a staged or committed block here."""
        ids = [str(key_id) for key_id in key_ids]
        for start in range(0, len(ids), _IDS_PER_QUERY):
            chunk = ids[start : start + _IDS_PER_QUERY]
            marks = ",".join("?" * len(chunk))
            if self._query(f"SELECT 1 FROM keys WHERE key_id IN ({marks}) LIMIT 1", chunk):
                return True
        return False

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

    def master_reservations(self) -> list[MasterReservation]:
        """This node's reserved, not yet delivered, master-side delivery keys, oldest first."""
        rows = self._query(
            "SELECT delivery_id, master_sae, slave_sae, size_bits, peer_confirmed, kind"
            " FROM deliveries WHERE role = 'master' AND state = 'reserved' ORDER BY rowid"
        )
        return [
            MasterReservation(
                key_id=uuid.UUID(key_id),
                master_sae=master_sae,
                slave_sae=slave_sae,
                size_bits=int(size_bits),
                peer_confirmed=bool(confirmed),
                kind=KeyKind(kind),
            )
            for key_id, master_sae, slave_sae, size_bits, confirmed, kind in rows
        ]

    # ---- authentication-key pool ------------------------------------------------------------

    def load_auth_ledger(self) -> bytes | None:
        rows = self._query("SELECT state FROM auth_ledger WHERE singleton = 1")
        return bytes(rows[0][0]) if rows else None

    def save_auth_ledger(self, state: bytes) -> None:
        self.run(StoreOp(lambda tx: save_auth_ledger(tx, state)))

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
