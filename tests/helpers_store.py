"""Test-time key-store content: seeded random blocks of consumer keys (never a committed secret)."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np

from qkdnode.store import KeyStore, StagedBlock


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
