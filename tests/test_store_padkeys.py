"""Stored keys turned into relay pad (``qkdnode.store.padkeys``) on real key stores: the sender
takes the oldest keys of its half, the receiver takes exactly the keys named, all or nothing, and
both burn them so delivery never offers them again."""

from __future__ import annotations

import random
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from qkdnode.store import KeyStore, StagedBlock
from qkdnode.store.padkeys import OfferedKeys, PadKeys, take_offered_keys_op, take_pad_keys_op
from tests.helpers_store import committed_stores, random_blocks, reserve

KeyRows = dict[str, tuple[str, bytes | None]]


def key_rows(store: KeyStore) -> KeyRows:
    """Every key's state and material, read straight from the database."""
    db = sqlite3.connect(store.path)
    try:
        return {
            str(key_id): (str(state), None if material is None else bytes(material))
            for key_id, state, material in db.execute("SELECT key_id, state, material FROM keys")
        }
    finally:
        db.close()


def parity_keys(blocks: list[StagedBlock], parity: int) -> list[tuple[str, bytes]]:
    """Naive reference: the keys at positions of ``parity``, oldest first."""
    return [
        (str(key_id), material)
        for block in blocks
        for position, (key_id, material) in enumerate(block.consumer_keys)
        if position % 2 == parity
    ]


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[KeyStore, KeyStore, list[StagedBlock]]]:
    blocks = random_blocks(21, count=3, keys_per_block=6)
    alice, bob = committed_stores(tmp_path, blocks)
    yield alice, bob, blocks
    alice.close()
    bob.close()


def take_pad(store: KeyStore, *, parity: int, max_keys: int) -> PadKeys:
    return store.run(take_pad_keys_op(parity=parity, max_keys=max_keys))


def take_offered(
    store: KeyStore, key_ids: list[str], *, sender_parity: int
) -> tuple[OfferedKeys, PadKeys | None]:
    return store.run(take_offered_keys_op(key_ids, sender_parity=sender_parity))


@pytest.mark.parametrize("parity", [0, 1])
def test_take_pad_keys_takes_the_oldest_keys_of_the_parity_at_most_max_keys(
    pair: tuple[KeyStore, KeyStore, list[StagedBlock]], parity: int
) -> None:
    alice, _, blocks = pair
    expected = parity_keys(blocks, parity)  # 9 keys
    before = key_rows(alice)
    first = take_pad(alice, parity=parity, max_keys=4)
    assert list(first.key_ids) == [k for k, _ in expected[:4]]
    assert first.material == b"".join(m for _, m in expected[:4])
    after = key_rows(alice)
    for key_id, (state, material) in after.items():
        if key_id in first.key_ids:
            assert (state, material) == ("delivered", None)  # burned
        else:
            assert (state, material) == before[key_id]  # the other half and the rest untouched
    second = take_pad(alice, parity=parity, max_keys=100)
    assert list(second.key_ids) == [k for k, _ in expected[4:]]
    assert second.material == b"".join(m for _, m in expected[4:])
    assert alice.available_count(parity=parity) == 0
    assert alice.available_count(parity=1 - parity) == 9
    # nothing left of the half: an empty take, nothing changed
    empty = take_pad(alice, parity=parity, max_keys=5)
    assert empty == PadKeys(key_ids=(), material=b"")
    # delivery as master never gets a burned key
    assert (
        reserve(
            alice,
            parity=parity,
            delivery_ids=[uuid.uuid4()],
            size_bits=256,
            master_sae="a",
            slave_sae="b",
        )
        is None
    )


def test_take_pad_keys_skips_reserved_and_staged_keys(
    pair: tuple[KeyStore, KeyStore, list[StagedBlock]],
) -> None:
    alice, _, blocks = pair
    expected = parity_keys(blocks, 0)
    layout = reserve(
        alice, parity=0, delivery_ids=[uuid.uuid4()], size_bits=256, master_sae="a", slave_sae="b"
    )
    assert layout is not None  # the oldest key of the half is reserved now
    staged = random_blocks(99, count=4, keys_per_block=4)[3]  # block id 4
    alice.stage_block(staged)
    taken = take_pad(alice, parity=0, max_keys=100)
    assert list(taken.key_ids) == [k for k, _ in expected[1:]]
    rows = key_rows(alice)
    assert rows[expected[0][0]][0] == "reserved"
    assert all(rows[str(k)][0] == "staged" for k, _ in staged.consumer_keys)


@pytest.mark.parametrize(("parity", "max_keys"), [(2, 1), (-1, 1), (0, 0), (1, -3)])
def test_take_pad_keys_refuses_bad_arguments(parity: int, max_keys: int) -> None:
    with pytest.raises(ValueError):
        take_pad_keys_op(parity=parity, max_keys=max_keys)


def test_receiver_takes_the_senders_keys_in_the_order_named_same_material(
    pair: tuple[KeyStore, KeyStore, list[StagedBlock]],
) -> None:
    alice, bob, _ = pair
    sent = take_pad(alice, parity=0, max_keys=5)
    outcome, got = take_offered(bob, list(sent.key_ids), sender_parity=0)
    assert outcome is OfferedKeys.TAKEN
    assert got is not None
    assert got.key_ids == sent.key_ids
    assert got.material == sent.material
    rows = key_rows(bob)
    assert all(rows[k] == ("delivered", None) for k in sent.key_ids)
    # the same keys again: used here, refused, nothing changed
    before = key_rows(bob)
    assert take_offered(bob, list(sent.key_ids), sender_parity=0) == (OfferedKeys.REFUSED, None)
    assert key_rows(bob) == before


def test_receiver_follows_the_order_asked_not_the_store_order(
    pair: tuple[KeyStore, KeyStore, list[StagedBlock]],
) -> None:
    _, bob, blocks = pair
    half = dict(parity_keys(blocks, 1))
    asked = list(half)
    random.Random(4).shuffle(asked)
    asked = asked[:6]
    outcome, got = take_offered(bob, asked, sender_parity=1)
    assert outcome is OfferedKeys.TAKEN
    assert got is not None
    assert list(got.key_ids) == asked
    assert got.material == b"".join(half[k] for k in asked)


def test_not_yet_when_a_key_is_staged_or_unknown_and_nothing_changes(
    pair: tuple[KeyStore, KeyStore, list[StagedBlock]],
) -> None:
    alice, bob, blocks = pair
    more = random_blocks(77, count=4, keys_per_block=4)[3]  # block id 4
    alice.stage_block(more)
    alice.commit_block(more.block_id)
    bob.stage_block(more)  # not committed at Bob yet
    committed_ids = [k for k, _ in parity_keys(blocks, 0)[:2]]
    staged_id = str(more.consumer_keys[0][0])
    before = key_rows(bob)
    assert take_offered(bob, [*committed_ids, staged_id], sender_parity=0) == (
        OfferedKeys.NOT_YET,
        None,
    )
    assert take_offered(bob, [*committed_ids, str(uuid.uuid4())], sender_parity=0) == (
        OfferedKeys.NOT_YET,
        None,
    )
    assert key_rows(bob) == before
    # once committed there, the same offer is taken
    bob.commit_block(more.block_id)
    outcome, got = take_offered(bob, [*committed_ids, staged_id], sender_parity=0)
    assert outcome is OfferedKeys.TAKEN
    assert got is not None
    reference = dict(parity_keys(blocks, 0))
    expected = b"".join(reference[k] for k in committed_ids) + more.consumer_keys[0][1]
    assert got.material == expected


def test_refused_when_a_key_is_of_the_receivers_own_half_and_nothing_changes(
    pair: tuple[KeyStore, KeyStore, list[StagedBlock]],
) -> None:
    _, bob, blocks = pair
    ids = [parity_keys(blocks, 0)[0][0], parity_keys(blocks, 1)[0][0]]
    before = key_rows(bob)
    assert take_offered(bob, ids, sender_parity=0) == (OfferedKeys.REFUSED, None)
    assert key_rows(bob) == before


def test_refused_when_a_key_is_reserved_here_and_nothing_changes(
    pair: tuple[KeyStore, KeyStore, list[StagedBlock]],
) -> None:
    _, bob, blocks = pair
    layout = reserve(
        bob, parity=0, delivery_ids=[uuid.uuid4()], size_bits=256, master_sae="a", slave_sae="b"
    )
    assert layout is not None
    first, second = (k for k, _ in parity_keys(blocks, 0)[:2])
    assert key_rows(bob)[first][0] == "reserved"
    before = key_rows(bob)
    assert take_offered(bob, [second, first], sender_parity=0) == (OfferedKeys.REFUSED, None)
    assert key_rows(bob) == before


def test_refused_when_a_key_was_delivered_here_and_nothing_changes(
    pair: tuple[KeyStore, KeyStore, list[StagedBlock]],
) -> None:
    _, bob, blocks = pair
    first, second, third = (k for k, _ in parity_keys(blocks, 0)[:3])
    assert take_offered(bob, [second], sender_parity=0)[0] is OfferedKeys.TAKEN
    before = key_rows(bob)
    assert take_offered(bob, [first, second, third], sender_parity=0) == (
        OfferedKeys.REFUSED,
        None,
    )
    assert key_rows(bob) == before


def test_refused_when_a_key_is_named_twice_and_nothing_changes(
    pair: tuple[KeyStore, KeyStore, list[StagedBlock]],
) -> None:
    _, bob, blocks = pair
    first, second = (k for k, _ in parity_keys(blocks, 0)[:2])
    before = key_rows(bob)
    assert take_offered(bob, [first, second, first], sender_parity=0) == (
        OfferedKeys.REFUSED,
        None,
    )
    assert key_rows(bob) == before


def test_pad_keys_repr_shows_no_material(
    pair: tuple[KeyStore, KeyStore, list[StagedBlock]],
) -> None:
    alice, _, _ = pair
    taken = take_pad(alice, parity=0, max_keys=2)
    text = repr(taken)
    assert text == "PadKeys(keys=2, bits=512)"
    assert taken.material.hex() not in text
    assert all(k not in text for k in taken.key_ids)
