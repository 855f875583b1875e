"""Test-time key-store content: seeded random blocks of consumer keys (never a committed secret)."""

from __future__ import annotations

import uuid

import numpy as np

from qkdnode.store import StagedBlock


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
