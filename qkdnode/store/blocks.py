"""Blocks in the key store: staging, two-phase commit, dropping; the records that go with them.

Committing a block is two-phase across the two nodes (the protocol lives in the node): each side
first *stages* the block durably (state ``staged``: nothing of it is deliverable), and only after
both sides have staged it does each *commit* it (its keys become ``available``). After a crash the
peers compare the blocks they hold in ``staged`` state and commit or drop each on both sides.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from qkdnode.errors import KeyStoreError
from qkdnode.store.transaction import StoreOp, Tx


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


@dataclass(frozen=True, slots=True)
class StoreCounts:
    staged: int
    available: int
    reserved: int
    delivered: int


def block_state(tx: Tx, block_id: int) -> BlockState | None:
    row = tx.execute("SELECT state FROM blocks WHERE block_id = ?", (block_id,)).fetchone()
    return BlockState(row[0]) if row else None


def save_auth_ledger(tx: Tx, state: bytes) -> None:
    """Replace the authentication-key ledger state (the old copy is erased)."""
    tx.erased = True
    tx.execute(
        "INSERT INTO auth_ledger (singleton, state) VALUES (1, ?)"
        " ON CONFLICT (singleton) DO UPDATE SET state = excluded.state",
        (state,),
    )


def stage_op(block: StagedBlock) -> StoreOp[None]:
    """Durably store a block and its keys in state ``staged`` (nothing deliverable yet)."""

    def run(tx: Tx) -> None:
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

    return StoreOp(run)


def commit_op(block_id: int, *, auth_ledger_state: bytes | None = None) -> StoreOp[None]:
    """Make a staged block's keys available (idempotent for a committed block); with the ledger
    state that now holds the block's pool share, whose own copy is erased."""

    def run(tx: Tx) -> None:
        tx.erased = True
        state = block_state(tx, block_id)
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
            save_auth_ledger(tx, auth_ledger_state)
            # the pool's share now lives in the ledger state: keep one copy of the secret
            tx.execute("DELETE FROM auth_pool WHERE block_id = ?", (block_id,))

    return StoreOp(run)


def drop_op(block_id: int) -> StoreOp[None]:
    """Drop a staged block: its key material and pool share are erased (secure_delete); a block
    never seen is recorded as dropped, so it cannot be staged later."""

    def run(tx: Tx) -> None:
        tx.erased = True
        state = block_state(tx, block_id)
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

    return StoreOp(run)
