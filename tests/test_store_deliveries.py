"""Delivery keys in the key store: composed from stored keys in order, handed out exactly once,
the peer's reservation checked and recorded."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

import pytest

from qkdnode.errors import ProtocolError
from qkdnode.store.keystore import (
    DeliveryKey,
    DeliveryRefused,
    KeyPart,
    KeyStore,
    NotKeyOwner,
    ReservationRejected,
    StagedBlock,
)
from tests.helpers_store import committed_stores, random_blocks, record_peer, release, reserve, take


def _stream(blocks: list[StagedBlock], parity: int) -> bytes:
    """Naive reference: the material of all keys at positions of ``parity``, in block order."""
    return b"".join(
        material
        for block in blocks
        for position, (_, material) in enumerate(block.consumer_keys)
        if position % 2 == parity
    )


def test_composed_keys_are_the_parity_stream_cut_in_order_and_match_at_the_peer(
    tmp_path: Path,
) -> None:
    blocks = random_blocks(11, count=3, keys_per_block=8)
    alice, bob = committed_stores(tmp_path, blocks)
    stream = _stream(blocks, 0)
    delivered = b""
    for number, size_bits in [(1, 256), (3, 128), (1, 24), (2, 512), (1, 8)]:
        ids = [uuid.uuid4() for _ in range(number)]
        layout = reserve(
            alice, parity=0, delivery_ids=ids, size_bits=size_bits, master_sae="a", slave_sae="b"
        )
        assert layout is not None
        record_peer(bob, layout, parity=0, master_sae="a", slave_sae="b")
        got = take(alice, ids, role="master", master_sae="a", slave_sae="b")
        assert [k for k, _ in got] == ids
        assert all(len(m) * 8 == size_bits for _, m in got)
        # the slave can ask in any order and in several calls
        got_b = take(bob, ids[::-1], role="slave", master_sae="a", slave_sae="b")
        assert dict(got_b) == dict(got)
        chunk = b"".join(m for _, m in got)
        # each request starts on a fresh stored key; the unused tail of the last one is dropped
        used = len(delivered)
        start = -(-used // 32) * 32
        assert chunk == stream[start : start + len(chunk)]
        delivered = stream[: start + len(chunk)]
    with pytest.raises(DeliveryRefused):  # second time: gone
        take(bob, ids, role="slave", master_sae="a", slave_sae="b")
    # used stored keys hold no material any more on either side (secure_delete is on)
    for store in (alice, bob):
        db = sqlite3.connect(store.path)
        rows = db.execute(
            "SELECT COUNT(*) FROM keys WHERE state = 'delivered' AND material IS NOT NULL"
        ).fetchone()
        assert rows[0] == 0
        db.close()
    alice.close()
    bob.close()


def test_partly_fetched_stored_key_keeps_material_until_all_its_pieces_are_delivered(
    tmp_path: Path,
) -> None:
    blocks = random_blocks(12, count=1, keys_per_block=2)
    alice, bob = committed_stores(tmp_path, blocks)
    ids = [uuid.uuid4(), uuid.uuid4()]
    layout = reserve(
        alice, parity=0, delivery_ids=ids, size_bits=128, master_sae="a", slave_sae="b"
    )
    assert layout is not None and {p.key_id for k in layout for p in k.parts} == {
        blocks[0].consumer_keys[0][0]
    }
    record_peer(bob, layout, parity=0, master_sae="a", slave_sae="b")
    first = take(bob, ids[:1], role="slave", master_sae="a", slave_sae="b")
    assert first[0][1] == blocks[0].consumer_keys[0][1][:16]
    assert bob.counts().reserved == 1 and bob.counts().delivered == 0
    second = take(bob, ids[1:], role="slave", master_sae="a", slave_sae="b")
    assert second[0][1] == blocks[0].consumer_keys[0][1][16:]
    assert bob.counts().delivered == 1
    alice.close()
    bob.close()


def test_only_the_slave_sae_gets_its_keys_and_master_and_role_must_match(tmp_path: Path) -> None:
    alice, bob = committed_stores(tmp_path, random_blocks(13, count=1, keys_per_block=4))
    ids = [uuid.uuid4()]
    layout = reserve(
        alice, parity=0, delivery_ids=ids, size_bits=256, master_sae="a", slave_sae="b"
    )
    assert layout is not None
    record_peer(bob, layout, parity=0, master_sae="a", slave_sae="b")
    with pytest.raises(NotKeyOwner):
        take(bob, ids, role="slave", master_sae="a", slave_sae="c")
    with pytest.raises(DeliveryRefused):
        take(bob, ids, role="slave", master_sae="z", slave_sae="b")
    with pytest.raises(DeliveryRefused):  # a slave-side record is not a master key
        take(bob, ids, role="master", master_sae="a", slave_sae="b")
    with pytest.raises(DeliveryRefused):  # unknown
        take(bob, [uuid.uuid4()], role="slave", master_sae="a", slave_sae="b")
    assert len(take(bob, ids, role="slave", master_sae="a", slave_sae="b")) == 1
    alice.close()
    bob.close()


def test_peer_reservation_checks_partition_layout_and_availability(tmp_path: Path) -> None:
    blocks = random_blocks(14, count=1, keys_per_block=4)
    alice, bob = committed_stores(tmp_path, blocks)
    even, odd = blocks[0].consumer_keys[0][0], blocks[0].consumer_keys[1][0]

    def key(*parts: tuple[uuid.UUID, int, int]) -> DeliveryKey:
        return DeliveryKey(
            key_id=uuid.uuid4(),
            size_bits=8 * sum(p[2] for p in parts),
            parts=tuple(KeyPart(key_id=k, offset_bytes=o, length_bytes=n) for k, o, n in parts),
        )

    bad = [
        [key((odd, 0, 32))],  # the other node's partition
        [key((even, 16, 32))],  # outside the stored key
        [key((even, 0, 16)), key((even, 8, 16))],  # overlapping
        [
            DeliveryKey(
                key_id=uuid.uuid4(),
                size_bits=64,
                parts=(KeyPart(key_id=even, offset_bytes=0, length_bytes=4),),
            )
        ],
    ]
    for keys in bad:
        with pytest.raises(ProtocolError):
            record_peer(bob, keys, parity=0, master_sae="a", slave_sae="b")
    assert bob.counts().reserved == 0
    good = [key((even, 0, 32))]
    record_peer(bob, good, parity=0, master_sae="a", slave_sae="b")
    record_peer(bob, good, parity=0, master_sae="a", slave_sae="b")  # retry: no-op
    with pytest.raises(ReservationRejected) as info:  # same stored key again, new delivery ID
        record_peer(bob, [key((even, 0, 32))], parity=0, master_sae="a", slave_sae="b")
    assert info.value.burned_key_ids == (even,)
    alice.close()
    bob.close()


def test_uncommitted_stored_keys_are_a_transient_rejection(tmp_path: Path) -> None:
    blocks = random_blocks(15, count=1, keys_per_block=2)
    alice = KeyStore.open(tmp_path / "a", node_name="alice")
    bob = KeyStore.open(tmp_path / "b", node_name="bob")
    alice.stage_block(blocks[0])
    alice.commit_block(1)
    bob.stage_block(blocks[0])  # staged, not yet committed at the peer
    ids = [uuid.uuid4()]
    layout = reserve(
        alice, parity=0, delivery_ids=ids, size_bits=256, master_sae="a", slave_sae="b"
    )
    assert layout is not None
    with pytest.raises(ReservationRejected) as info:
        record_peer(bob, layout, parity=0, master_sae="a", slave_sae="b")
    assert info.value.burned_key_ids == ()
    release(alice, ids, burn=info.value.burned_key_ids)
    assert alice.available_count(parity=0) == 1  # offered again later
    alice.close()
    bob.close()
