"""Test-time key-store content: seeded random blocks of consumer keys (never a committed secret)."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np

from qkdnode.store import KeyStore, StagedBlock
from qkdnode.store.keystore import DeliveryKey


def random_blocks(
    seed: int, *, count: int, keys_per_block: int, key_bytes: int = 32, auth_pool_bytes: int = 0
) -> list[StagedBlock]:
    """``count`` blocks (ids 1..count) of ``keys_per_block`` random keys, from ``seed``."""
    rng = np.random.default_rng(seed)
    return [
        StagedBlock(
            block_id=block_id,
            first_pulse_index=block_id * 1000,
            pulse_count=1000,
            consumer_keys=[
                (uuid.UUID(bytes=rng.bytes(16), version=4), rng.bytes(key_bytes))
                for _ in range(keys_per_block)
            ],
            key_size_bits=8 * key_bytes,
            auth_pool_material=rng.bytes(auth_pool_bytes),
        )
        for block_id in range(1, count + 1)
    ]


def committed_stores(directory: Path, blocks: list[StagedBlock]) -> tuple[KeyStore, KeyStore]:
    """Alice's and Bob's stores under ``directory``, both holding ``blocks`` committed."""
    alice = KeyStore.open(directory / "alice", node_name="alice")
    bob = KeyStore.open(directory / "bob", node_name="bob")
    for store in (alice, bob):
        for block in blocks:
            store.stage_block(block)
            store.commit_block(block.block_id)
    return alice, bob


def reserve(
    store: KeyStore,
    *,
    parity: int,
    delivery_ids: Sequence[uuid.UUID],
    size_bits: int,
    master_sae: str,
    slave_sae: str,
) -> list[DeliveryKey] | None:
    """Run one ``reserve_op`` in its own transaction."""
    return store.run(
        store.reserve_op(
            parity=parity,
            delivery_ids=delivery_ids,
            size_bits=size_bits,
            master_sae=master_sae,
            slave_sae=slave_sae,
        )
    )


def take(
    store: KeyStore, ids: Sequence[uuid.UUID], *, role: str, master_sae: str, slave_sae: str
) -> list[tuple[uuid.UUID, bytes]]:
    """Run one ``take_op`` in its own transaction."""
    return store.run(store.take_op(ids, role=role, master_sae=master_sae, slave_sae=slave_sae))


def release(store: KeyStore, ids: Sequence[uuid.UUID], *, burn: Collection[uuid.UUID] = ()) -> None:
    """Run one ``release_op`` in its own transaction."""
    store.run(store.release_op(ids, burn=burn))


def record_peer(
    store: KeyStore, keys: Sequence[DeliveryKey], *, parity: int, master_sae: str, slave_sae: str
) -> None:
    """Run one ``record_peer_reservation_op``; its refusal (ReservationRejected) is raised."""
    refused = store.run(
        store.record_peer_reservation_op(
            keys, parity=parity, master_sae=master_sae, slave_sae=slave_sae
        )
    )
    if refused is not None:
        raise refused
