"""The crash-safe SQLite key store and relay store (I/O shell)."""

from qkdnode.store.keystore import (
    BlockState,
    KeyState,
    KeyStore,
    StagedBlock,
    StoreCounts,
    StoredKey,
)
from qkdnode.store.relaystore import Deposit, PadChunk, RelayCounts, RelayStore

__all__ = [
    "BlockState",
    "Deposit",
    "KeyState",
    "KeyStore",
    "PadChunk",
    "RelayCounts",
    "RelayStore",
    "StagedBlock",
    "StoreCounts",
    "StoredKey",
]
