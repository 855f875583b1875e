"""An in-memory model of the key store's block and ledger operations.

It holds what the SQLite store holds for coordination (blocks staged, committed or dropped,
their key IDs, consumer keys and pool share, the ledger state) with the same semantics: every
operation is one transaction, durable when it returns, so a crash between operations loses
nothing written and everything only held in memory. It refuses what the SQLite store refuses
(``KeyStoreError``): staging a known block id, committing a block that is not staged
(committing a committed block is a no-op), dropping a committed block (dropping an unknown id
records it as dropped), reusing a key ID.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from qkdnode.errors import KeyStoreError


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelShare:
    """A staged block's key material (the machine's ``StagedShare``)."""

    block_id: int
    pool_material: bytes
    consumer_material: bytes
    ledger_mark_bits: int

    def __repr__(self) -> str:
        return f"ModelShare(block_id={self.block_id}, pool_bytes={len(self.pool_material)})"


@dataclass(slots=True)
class _ModelBlock:
    state: str  # "staged", "committed" or "dropped"
    key_ids: tuple[uuid.UUID, ...]
    consumer_keys: tuple[bytes, ...]
    pool_material: bytes
    ledger_mark_bits: int


class StoreModel:
    """The store of one simulated node; survives the node's crashes."""

    def __init__(self) -> None:
        self._blocks: dict[int, _ModelBlock] = {}
        self._key_ids: set[uuid.UUID] = set()
        self._ledger: bytes | None = None

    # ---- writes (one transaction each) ---------------------------------------------------------
    def stage_block(
        self,
        block_id: int,
        *,
        key_ids: Sequence[uuid.UUID],
        consumer_keys: Sequence[bytes],
        pool_material: bytes,
        ledger_mark_bits: int,
    ) -> None:
        if block_id in self._blocks:
            raise KeyStoreError(f"block {block_id} is already stored")
        if len(key_ids) != len(consumer_keys) or len(set(key_ids)) != len(key_ids):
            raise KeyStoreError("key IDs and keys do not pair up")
        if self._key_ids.intersection(key_ids):
            raise KeyStoreError("a key ID is already in use")
        self._key_ids.update(key_ids)
        self._blocks[block_id] = _ModelBlock(
            "staged", tuple(key_ids), tuple(consumer_keys), pool_material, ledger_mark_bits
        )

    def commit_block(self, block_id: int, *, auth_ledger_state: bytes | None = None) -> None:
        block = self._blocks.get(block_id)
        if block is not None and block.state == "committed":
            return
        if block is None or block.state != "staged":
            raise KeyStoreError(f"block {block_id} is not staged")
        block.state = "committed"
        if auth_ledger_state is not None:
            self._ledger = auth_ledger_state

    def drop_block(self, block_id: int) -> None:
        block = self._blocks.get(block_id)
        if block is None:
            self._blocks[block_id] = _ModelBlock("dropped", (), (), b"", 0)
            return
        if block.state == "committed":
            raise KeyStoreError(f"block {block_id} is committed and cannot be dropped")
        block.state = "dropped"
        block.consumer_keys = ()
        block.pool_material = b""
        self._key_ids.difference_update(block.key_ids)  # as the store deletes their rows

    def save_auth_ledger(self, state: bytes) -> None:
        self._ledger = state

    # ---- reads ---------------------------------------------------------------------------------
    def load_auth_ledger(self) -> bytes | None:
        return self._ledger

    def block_state(self, block_id: int) -> str | None:
        block = self._blocks.get(block_id)
        return block.state if block is not None else None

    def block_committed(self, block_id: int) -> bool:
        return self.block_state(block_id) == "committed"

    def block_known(self, block_id: int) -> bool:
        return block_id in self._blocks

    def any_key_known(self, key_ids: Sequence[uuid.UUID]) -> bool:
        return not self._key_ids.isdisjoint(key_ids)

    def staged_block_ids(self) -> list[int]:
        return sorted(b for b, block in self._blocks.items() if block.state == "staged")

    def last_block_id(self) -> int | None:
        return max(self._blocks) if self._blocks else None

    def staged_material(self, block_id: int) -> ModelShare:
        block = self._blocks.get(block_id)
        if block is None or block.state != "staged":
            raise KeyStoreError(f"block {block_id} is not staged")
        return ModelShare(
            block_id=block_id,
            pool_material=block.pool_material,
            consumer_material=b"".join(block.consumer_keys),
            ledger_mark_bits=block.ledger_mark_bits,
        )

    def committed_keys(self, block_id: int) -> tuple[tuple[uuid.UUID, bytes], ...]:
        """A committed block's consumer keys (ID, material), in order."""
        block = self._blocks[block_id]
        return tuple(zip(block.key_ids, block.consumer_keys, strict=True))

    def committed_block_ids(self) -> list[int]:
        return sorted(b for b, block in self._blocks.items() if block.state == "committed")
