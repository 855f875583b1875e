"""Scenario 15: zeroisation. After keys are delivered (and staged blocks dropped), no 8-byte
substring of their bytes may remain in the database, its WAL or journal files, whether the store
is still open or closed.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest

from qkdnode.store import KeyStore, StagedBlock
from tests.helpers_store import reserve, take
from tests.reliability.harness import scan, windows

KEY_BYTES = 32


def _fill(store: KeyStore, rng: np.random.Generator, block_id: int, count: int) -> list[bytes]:
    keys = [(uuid.uuid4(), rng.bytes(KEY_BYTES)) for _ in range(count)]
    store.stage_block(
        StagedBlock(
            block_id=block_id,
            first_pulse_index=block_id * 1000,
            pulse_count=1000,
            consumer_keys=keys,
            key_size_bits=8 * KEY_BYTES,
            auth_pool_material=rng.bytes(64),
        )
    )
    return [material for _, material in keys]


def _deliver_all(store: KeyStore, count: int) -> None:
    for parity in (0, 1):
        ids = [uuid.uuid4() for _ in range(count // 2)]
        reserved = reserve(
            store,
            parity=parity,
            delivery_ids=ids,
            size_bits=8 * KEY_BYTES,
            master_sae="sae-a",
            slave_sae="sae-b",
        )
        assert reserved is not None
        taken = take(store, ids, role="master", master_sae="sae-a", slave_sae="sae-b")
        assert len(taken) == len(ids)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def _hits(directory: Path, secrets: list[bytes]) -> dict[str, int]:
    needles = windows(secrets)
    return {name: scan(data, needles) for name, data in _files(directory).items()}


@pytest.fixture
def used_store(tmp_path: Path) -> tuple[KeyStore, Path, list[bytes], list[bytes]]:
    rng = np.random.default_rng(15)
    directory = tmp_path / "store"
    store = KeyStore.open(directory, node_name="alice")
    delivered = _fill(store, rng, 1, 8)
    store.commit_block(1)
    dropped = _fill(store, rng, 2, 8)
    store.drop_block(2)
    _deliver_all(store, 8)
    return store, directory, delivered, dropped


def test_no_deleted_key_bytes_in_database_or_wal_while_open(
    used_store: tuple[KeyStore, Path, list[bytes], list[bytes]],
) -> None:
    store, directory, delivered, dropped = used_store
    try:
        hits = _hits(directory, delivered + dropped)
    finally:
        store.close()
    assert sum(hits.values()) == 0, hits


def test_no_deleted_key_bytes_after_a_clean_close(
    used_store: tuple[KeyStore, Path, list[bytes], list[bytes]],
) -> None:
    store, directory, delivered, dropped = used_store
    store.close()
    hits = _hits(directory, delivered + dropped)
    assert sum(hits.values()) == 0, hits


def test_the_scan_finds_bytes_that_are_still_held(tmp_path: Path) -> None:
    """The scanner itself: keys still available must be found (else 0 hits proves nothing)."""
    rng = np.random.default_rng(16)
    store = KeyStore.open(tmp_path / "s", node_name="alice")
    held = _fill(store, rng, 1, 4)
    store.commit_block(1)
    store.close()
    assert sum(_hits(tmp_path / "s", held).values()) >= len(held)
