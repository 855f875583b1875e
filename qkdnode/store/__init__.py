"""The crash-safe SQLite key store (I/O shell)."""

from qkdnode.store.keystore import (
    BlockState,
    KeyState,
    KeyStore,
    StagedBlock,
    StoreCounts,
    StoredKey,
)

__all__ = ["BlockState", "KeyState", "KeyStore", "StagedBlock", "StoreCounts", "StoredKey"]
