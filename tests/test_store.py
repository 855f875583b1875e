"""Key store: durability settings, two-phase block life cycle, permissions, failure handling."""

from __future__ import annotations

import os
import sqlite3
import stat
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qkdnode.errors import KeyStoreError
from qkdnode.store import BlockState, KeyStore, StagedBlock
from qkdnode.store.keystore import StoreOp
from tests.helpers_store import release, reserve, take


def _block(block_id: int, rng: np.random.Generator, *, keys: int = 3) -> StagedBlock:
    return StagedBlock(
        block_id=block_id,
        first_pulse_index=block_id * 1000,
        pulse_count=1000,
        consumer_keys=[
            (uuid.UUID(bytes=rng.bytes(16), version=4), rng.bytes(32)) for _ in range(keys)
        ],
        key_size_bits=256,
        auth_pool_material=rng.bytes(64),
    )


def test_store_uses_wal_full_sync_secure_delete_and_private_files(tmp_path: Path) -> None:
    store = KeyStore.open(tmp_path / "store", node_name="alice")
    store.stage_block(_block(1, np.random.default_rng(1)))
    db = sqlite3.connect(store.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    conn = store._conn
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA secure_delete").fetchone()[0] == 1
    for name in os.listdir(tmp_path / "store"):
        mode = stat.S_IMODE(os.stat(tmp_path / "store" / name).st_mode)
        assert mode & 0o077 == 0, f"{name} is readable by others: {oct(mode)}"
    assert stat.S_IMODE(os.stat(tmp_path / "store").st_mode) == 0o700
    store.close()


def test_staged_keys_are_not_available_until_commit(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    store = KeyStore.open(tmp_path, node_name="bob")
    block = _block(7, rng)
    store.stage_block(block)
    assert store.block_state(7) is BlockState.STAGED
    assert store.counts().available == 0 and store.counts().staged == 3
    assert store.committed_keys() == []
    assert store.staged_block_ids() == [7]
    staged = store.staged_material(7)
    assert staged.pool_material == block.auth_pool_material
    assert staged.consumer_material == b"".join(m for _, m in block.consumer_keys)
    assert staged.pool_material.hex() not in repr(staged)
    store.commit_block(7, auth_ledger_state=b"ledger after deposit")
    store.commit_block(7)  # idempotent, as reconnect reconciliation may repeat it
    assert store.counts().available == 3
    assert [k.material for k in store.committed_keys()] == [m for _, m in block.consumer_keys]
    # the pool's share moved into the ledger state at commit: no second copy stays behind
    assert store._conn.execute("SELECT COUNT(*) FROM auth_pool").fetchone()[0] == 0
    assert store.load_auth_ledger() == b"ledger after deposit"
    with pytest.raises(KeyStoreError, match="not staged"):
        store.staged_material(7)
    store.close()


def test_state_survives_reopen_and_drop_erases_material(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    store = KeyStore.open(tmp_path, node_name="alice")
    committed, dropped = _block(1, rng), _block(2, rng)
    store.stage_block(committed)
    store.stage_block(dropped)
    store.commit_block(1, auth_ledger_state=b"ledger-v1")
    store.drop_block(2)
    store.close()

    reopened = KeyStore.open(tmp_path, node_name="alice")
    assert reopened.block_state(1) is BlockState.COMMITTED
    assert reopened.block_state(2) is BlockState.DROPPED
    assert reopened.load_auth_ledger() == b"ledger-v1"
    assert len(reopened.committed_keys()) == 3
    assert reopened.last_block_id() == 2
    reopened.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    for _, material in dropped.consumer_keys:
        assert material not in raw


def test_store_refuses_another_nodes_directory(tmp_path: Path) -> None:
    KeyStore.open(tmp_path, node_name="alice").close()
    with pytest.raises(KeyStoreError, match="belongs to node 'alice'"):
        KeyStore.open(tmp_path, node_name="bob")


def test_invalid_transitions_raise_and_change_nothing(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    store = KeyStore.open(tmp_path, node_name="alice")
    store.stage_block(_block(1, rng))
    with pytest.raises(KeyStoreError, match="already stored"):
        store.stage_block(_block(1, rng))
    store.commit_block(1)
    with pytest.raises(KeyStoreError, match="cannot be dropped"):
        store.drop_block(1)
    assert store.counts().available == 3
    store.drop_block(5)  # a block never staged here ends dropped, so a late stage is refused
    with pytest.raises(KeyStoreError, match="already stored"):
        store.stage_block(_block(5, rng))
    store.close()


def test_any_key_known_finds_ids_of_staged_and_committed_blocks_only(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    store = KeyStore.open(tmp_path, node_name="bob")
    committed, staged = _block(1, rng, keys=1200), _block(2, rng)
    store.stage_block(committed)
    store.commit_block(1)
    store.stage_block(staged)
    fresh = [uuid.UUID(int=i) for i in range(1, 1000)]
    assert not store.any_key_known(fresh)
    # the last of 1,200 ids, past the first lookups of a long list
    assert store.any_key_known([*fresh, committed.consumer_keys[-1][0]])
    assert store.any_key_known([staged.consumer_keys[0][0]])
    store.drop_block(2)  # a dropped block's keys are gone, their ids with them
    assert not store.any_key_known([key_id for key_id, _ in staged.consumer_keys])
    store.close()


def test_write_failure_poisons_the_store(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    store = KeyStore.open(tmp_path, node_name="alice")
    failures: list[bool] = []
    store.on_failure = lambda: failures.append(True)
    store._conn.execute("PRAGMA query_only=ON")  # every later write fails inside SQLite
    with pytest.raises(KeyStoreError, match="stop the daemon"):
        store.stage_block(_block(1, rng))
    assert store.failed and failures == [True]  # the owner is told once, wherever it happened
    with pytest.raises(KeyStoreError, match="closed"):
        store.counts()


def test_repr_of_keys_shows_no_material(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    block = _block(1, rng)
    assert block.consumer_keys[0][1].hex() not in repr(block)
    store = KeyStore.open(tmp_path, node_name="alice")
    store.stage_block(block)
    store.commit_block(1)
    key = store.committed_keys()[0]
    assert key.material.hex() not in repr(key) and str(key.material) not in repr(key)
    store.close()


def test_a_reader_elsewhere_neither_blocks_nor_stops_the_store(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    store = KeyStore.open(tmp_path, node_name="alice")
    for block_id in (1, 2):
        store.stage_block(_block(block_id, rng))
    reader = sqlite3.connect(store.path)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM keys").fetchall()  # holds a read snapshot
    started = time.monotonic()
    store.drop_block(1)  # erasing: wants to truncate the WAL, the reader holds it up
    assert time.monotonic() - started < 1.0
    assert not store.failed and store.block_state(1) is BlockState.DROPPED
    reader.execute("COMMIT")
    reader.close()
    store.drop_block(2)  # the next erasure truncates the WAL: no old page images remain
    assert os.path.getsize(f"{store.path}-wal") == 0
    store.close()


def test_taking_keys_of_one_parity_does_not_scan_the_other_partition(tmp_path: Path) -> None:
    """The oldest available key of one parity is found through the index, not by stepping over
    every available key of the other parity (which made delivery slower as it went on)."""
    store = KeyStore.open(tmp_path, node_name="alice")
    plan = store._conn.execute(
        "EXPLAIN QUERY PLAN SELECT key_id, size_bits FROM keys"
        " WHERE state = 'available' AND position % 2 = ? ORDER BY block_id, position",
        (0,),
    ).fetchall()
    details = " ".join(row[-1] for row in plan)
    assert "keys_by_state_parity (state=? AND <expr>=?)" in details, details
    assert "TEMP B-TREE" not in details, details  # the index gives the order too
    store.close()


def test_a_store_with_the_old_state_index_gets_the_parity_index_on_open(tmp_path: Path) -> None:
    store = KeyStore.open(tmp_path, node_name="alice")
    db = store._conn
    db.execute("DROP INDEX keys_by_state_parity")
    db.execute("CREATE INDEX keys_by_state ON keys (state, block_id, position)")
    store.close()
    store = KeyStore.open(tmp_path, node_name="alice")
    names = {row[0] for row in store._conn.execute("SELECT name FROM sqlite_master")}
    assert "keys_by_state_parity" in names and "keys_by_state" not in names
    store.close()


def test_only_a_batch_of_master_reservations_alone_skips_the_disk_sync(tmp_path: Path) -> None:
    """A master's reservation may be lost in a power cut (the peer's record decides), so alone
    it commits without an fsync; with a take in the batch, or for a take alone, FULL holds."""
    rng = np.random.default_rng(9)
    store = KeyStore.open(tmp_path, node_name="alice")
    store.stage_block(_block(1, rng, keys=6))
    store.commit_block(1)
    statements: list[str] = []
    store._conn.set_trace_callback(statements.append)

    def new_reservation() -> tuple[uuid.UUID, StoreOp[Any]]:
        key_id = uuid.uuid4()
        op = store.reserve_op(
            parity=0, delivery_ids=[key_id], size_bits=256, master_sae="a", slave_sae="b"
        )
        return key_id, op

    def syncs_around_commit() -> list[str]:
        seen = [s for s in statements if s.startswith(("PRAGMA synchronous=", "COMMIT"))]
        statements.clear()
        return seen

    first, op = new_reservation()
    assert store.run_batch([op])[0].error is None
    assert syncs_around_commit() == [
        "PRAGMA synchronous=NORMAL",
        "COMMIT",
        "PRAGMA synchronous=FULL",
    ]
    assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL again
    second, op = new_reservation()
    take_first = store.take_op([first], role="master", master_sae="a", slave_sae="b")
    outcomes = store.run_batch([op, take_first])
    assert all(outcome.error is None for outcome in outcomes)
    assert syncs_around_commit() == ["COMMIT"]  # FULL: the take must be on disk
    take(store, [second], role="master", master_sae="a", slave_sae="b")
    assert syncs_around_commit() == ["COMMIT"]
    store.close()


def test_a_version_2_store_gains_the_peer_confirmed_column_and_keeps_its_deliveries(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(12)
    store = KeyStore.open(tmp_path, node_name="alice")
    store.stage_block(_block(1, rng, keys=4))
    store.commit_block(1)
    key_id = uuid.uuid4()
    reserve(store, parity=0, delivery_ids=[key_id], size_bits=256, master_sae="a", slave_sae="b")
    store.close()
    db = sqlite3.connect(tmp_path / "keys.db")  # as schema version 2 left it
    db.execute("ALTER TABLE deliveries DROP COLUMN peer_confirmed")
    db.execute("UPDATE meta SET value = '2' WHERE name = 'schema_version'")
    db.commit()
    db.close()

    store = KeyStore.open(tmp_path, node_name="alice")
    (reservation,) = store.master_reservations()
    assert reservation.key_id == key_id and not reservation.peer_confirmed
    store.run_batch([store.confirm_op([key_id])])
    assert store.master_reservations()[0].peer_confirmed
    version = store._conn.execute("SELECT value FROM meta WHERE name = 'schema_version'")
    assert version.fetchone()[0] == "5"  # and on to versions 4 (audit) and 5 (hybrid keys)
    store.close()


def test_releasing_delivery_keys_whose_sibling_was_handed_out_erases_their_stored_key(
    tmp_path: Path,
) -> None:
    """Two delivery keys cut from one stored key: once one is handed out, releasing the other
    must not make the stored key available again (its handed-out bytes would come back)."""
    rng = np.random.default_rng(13)
    store = KeyStore.open(tmp_path, node_name="alice")
    store.stage_block(_block(1, rng, keys=4))
    store.commit_block(1)
    halves = [uuid.uuid4(), uuid.uuid4()]
    layout = reserve(
        store, parity=0, delivery_ids=halves, size_bits=128, master_sae="a", slave_sae="b"
    )
    assert layout is not None and {p.key_id for k in layout for p in k.parts} == {
        layout[0].parts[0].key_id
    }
    stored_key = str(layout[0].parts[0].key_id)
    available_before = store.available_count(parity=0)
    take(store, halves[:1], role="master", master_sae="a", slave_sae="b")
    release(store, halves[1:])
    state, material = store._query(
        "SELECT state, material FROM keys WHERE key_id = ?", (stored_key,)
    )[0]
    assert (state, material) == ("delivered", None)
    assert store.available_count(parity=0) == available_before
    # without a handed-out sibling a release gives the stored key back
    whole = [uuid.uuid4()]
    reserve(store, parity=0, delivery_ids=whole, size_bits=256, master_sae="a", slave_sae="b")
    release(store, whole)
    assert store.available_count(parity=0) == available_before
    store.close()


def test_a_batch_that_erases_leaves_the_one_wal_fold_to_its_caller(tmp_path: Path) -> None:
    """run_batch(fold_wal=False) answers right after COMMIT: no checkpoint of its own, only a
    note that one is due; fold_wal() then checkpoints once (group commit relies on this)."""
    rng = np.random.default_rng(14)
    store = KeyStore.open(tmp_path, node_name="alice")
    store.stage_block(_block(1, rng, keys=4))
    store.commit_block(1)
    key_id = uuid.uuid4()
    reserve(store, parity=0, delivery_ids=[key_id], size_bits=256, master_sae="a", slave_sae="b")
    statements: list[str] = []
    store._conn.set_trace_callback(statements.append)
    take = store.take_op([key_id], role="master", master_sae="a", slave_sae="b")
    assert store.run_batch([take], fold_wal=False)[0].error is None
    assert not [s for s in statements if "wal_checkpoint" in s]
    due_before = store.wal_holds_erased
    store.fold_wal()
    assert len([s for s in statements if "wal_checkpoint" in s]) == 1
    assert (due_before, store.wal_holds_erased) == (True, False)
    store.close()
