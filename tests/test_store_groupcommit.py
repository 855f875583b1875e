"""Group commit (KeyStore.run_batch + GroupCommit): concurrent delivery operations share one
transaction, and every guarantee of one-transaction-per-operation still holds.

- concurrent enc_keys from many tasks never hand out a key twice and each gets its own keys;
- one failing operation in a batch does not undo the others (SAVEPOINT per operation);
- an SQLite error still poisons the store, for every operation of the batch;
- a caller cancelled while it waits leaves no reserved keys behind;
- erasing batches leave no deleted key bytes in the database or its WAL.
"""

from __future__ import annotations

import random
import sqlite3
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from qkdnode.delivery.api import ApiError
from qkdnode.delivery.keys import KeyManager, reservation_from_wire, reservation_to_wire
from qkdnode.errors import KeyStoreError
from qkdnode.store.groupcommit import GroupCommit
from qkdnode.store.keystore import (
    DeliveryKey,
    DeliveryRefused,
    KeyStore,
    StagedBlock,
    StoreOp,
)
from tests.helpers_store import random_blocks, take
from tests.reliability.harness import scan, windows

KEY_BYTES = 32


def _blocks(
    seed: int, *, count: int, keys_per_block: int, key_bytes: int = 32
) -> list[StagedBlock]:
    return random_blocks(
        seed, count=count, keys_per_block=keys_per_block, key_bytes=key_bytes, auth_pool_bytes=16
    )


def _open(directory: Path, name: str, blocks: Sequence[StagedBlock]) -> KeyStore:
    store = KeyStore.open(directory, node_name=name)
    for block in blocks:
        store.stage_block(block)
        store.commit_block(block.block_id)
    return store


class _Nodes:
    """Two key managers over two stores, reservations wired directly (with a yield between)."""

    def __init__(self, tmp_path: Path, blocks: Sequence[StagedBlock]) -> None:
        self.stores = {
            "alice": _open(tmp_path / "alice", "alice", blocks),
            "bob": _open(tmp_path / "bob", "bob", blocks),
        }
        self.commits = {name: GroupCommit(store) for name, store in self.stores.items()}
        self.peer_delay = trio.Event()
        self.peer_delay.set()
        self.managers: dict[str, KeyManager] = {}
        for name, parity, peer in (("alice", 0, "bob"), ("bob", 1, "alice")):
            self.managers[name] = KeyManager(
                self.stores[name],
                master_parity=parity,
                peer_reserve=self._wired(peer),
                group_commit=self.commits[name],
            )

    def _wired(self, peer: str):  # type: ignore[no-untyped-def]
        async def peer_reserve(keys: Sequence[DeliveryKey], master: str, slave: str) -> None:
            await trio.lowlevel.checkpoint()  # the channel round trip
            await self.peer_delay.wait()
            parsed, m, s = reservation_from_wire(reservation_to_wire(keys, master, slave))
            await self.managers[peer].record_peer_reservation(parsed, m, s)

        return peer_reserve

    def close(self) -> None:
        for store in self.stores.values():
            store.close()


def _parity_material(blocks: Sequence[StagedBlock], parity: int) -> set[bytes]:
    return {
        material
        for block in blocks
        for position, (_, material) in enumerate(block.consumer_keys)
        if position % 2 == parity
    }


async def test_concurrent_enc_keys_share_commits_and_never_hand_out_a_key_twice(
    tmp_path: Path,
) -> None:
    rng = random.Random(6)
    blocks = _blocks(61, count=2, keys_per_block=200)
    nodes = _Nodes(tmp_path, blocks)
    got: dict[int, list[tuple[uuid.UUID, bytes]]] = {}
    slave_got: dict[int, list[tuple[uuid.UUID, bytes]]] = {}
    plan = [(task, rng.choice((1, 2, 3))) for task in range(48)]

    async def client(task: int, number: int) -> None:
        master, slave = ("alice", "bob") if task % 2 == 0 else ("bob", "alice")
        sae_m, sae_s = f"sae-{master}", f"sae-{slave}"
        for _ in range(rng.randrange(3)):
            await trio.lowlevel.checkpoint()
        keys = await nodes.managers[master].enc_keys(
            master_sae=sae_m, slave_sae=sae_s, number=number, size_bits=8 * KEY_BYTES
        )
        got[task] = keys
        slave_got[task] = await nodes.managers[slave].dec_keys(
            slave_sae=sae_s, master_sae=sae_m, key_ids=[k for k, _ in keys]
        )

    async with trio.open_nursery() as nursery:
        for task, number in plan:
            nursery.start_soon(client, task, number)

    for task, number in plan:
        assert len(got[task]) == number  # each task its own keys, as many as it asked
        assert slave_got[task] == got[task]  # the slave gets exactly the master's keys
    ids = [key_id for keys in got.values() for key_id, _ in keys]
    materials = [material for keys in got.values() for _, material in keys]
    assert len(set(ids)) == len(ids)
    assert len(set(materials)) == len(materials)  # no key handed out twice
    for task, keys in got.items():  # each from its master's partition
        assert {m for _, m in keys} <= _parity_material(blocks, task % 2)
    total_ops = sum(c.operations for c in nodes.commits.values())
    total_batches = sum(c.batches for c in nodes.commits.values())
    assert total_ops == 4 * len(plan)  # reserve + take at the master, record + take at the slave
    assert total_batches < total_ops / 2  # the operations really shared transactions
    assert all(c.threaded_batches > 0 for c in nodes.commits.values())  # committed off-loop
    for store in nodes.stores.values():
        counts = store.counts()
        assert counts.reserved == 0
        assert counts.delivered == sum(n for _, n in plan)
    nodes.close()


async def test_one_request_alone_is_one_transaction_per_operation(tmp_path: Path) -> None:
    blocks = _blocks(62, count=1, keys_per_block=8)
    nodes = _Nodes(tmp_path, blocks)
    keys = await nodes.managers["alice"].enc_keys(
        master_sae="a", slave_sae="b", number=2, size_bits=256
    )
    assert (nodes.commits["alice"].batches, nodes.commits["alice"].operations) == (2, 2)
    assert (nodes.commits["bob"].batches, nodes.commits["bob"].operations) == (1, 1)
    # alone, the transactions run on the event loop (no worker-thread round trip)
    assert nodes.commits["alice"].threaded_batches == nodes.commits["bob"].threaded_batches == 0
    assert (
        await nodes.managers["bob"].dec_keys(
            slave_sae="b", master_sae="a", key_ids=[k for k, _ in keys]
        )
        == keys
    )
    nodes.close()


def _failing_op(store: KeyStore) -> StoreOp[None]:
    """Changes a key's state, then fails: only its own change must be rolled back."""

    def run(tx: Any) -> None:
        tx.execute("UPDATE keys SET state = 'delivered', material = NULL")
        raise DeliveryRefused("one or more keys are not found", field="key_IDs")

    return StoreOp(run)


def test_a_failing_operation_rolls_back_alone_and_the_others_commit_durably(
    tmp_path: Path,
) -> None:
    blocks = _blocks(63, count=1, keys_per_block=8)
    store = _open(tmp_path / "s", "alice", blocks)
    first, second = [uuid.uuid4()], [uuid.uuid4(), uuid.uuid4()]
    outcomes = store.run_batch(
        [
            store.reserve_op(
                parity=0, delivery_ids=first, size_bits=256, master_sae="a", slave_sae="b"
            ),
            _failing_op(store),
            store.reserve_op(
                parity=0, delivery_ids=second, size_bits=256, master_sae="a", slave_sae="b"
            ),
            store.take_op([uuid.uuid4()], role="master", master_sae="a", slave_sae="b"),
        ]
    )
    assert [o.error is None for o in outcomes] == [True, False, True, False]
    assert isinstance(outcomes[1].error, DeliveryRefused)
    assert isinstance(outcomes[3].error, DeliveryRefused)
    layout_first, layout_second = outcomes[0].unwrap(), outcomes[2].unwrap()
    assert layout_first is not None and layout_second is not None
    # the second reservation saw the first one's change: different stored keys
    used_first = {p.key_id for k in layout_first for p in k.parts}
    used_second = {p.key_id for k in layout_second for p in k.parts}
    assert used_first.isdisjoint(used_second) and len(used_first | used_second) == 3
    with pytest.raises(DeliveryRefused):
        outcomes[1].unwrap()
    store.close()
    # durable, and the failed operation's UPDATE is gone: nothing delivered, material intact
    store = KeyStore.open(tmp_path / "s", node_name="alice")
    counts = store.counts()
    assert (counts.available, counts.reserved, counts.delivered) == (5, 3, 0)
    taken = take(store, first + second, role="master", master_sae="a", slave_sae="b")
    assert [m for _, m in taken] == [blocks[0].consumer_keys[p][1] for p in (0, 2, 4)]
    store.close()


async def test_a_failing_request_in_a_shared_batch_does_not_undo_the_others(
    tmp_path: Path,
) -> None:
    blocks = _blocks(64, count=1, keys_per_block=20)
    nodes = _Nodes(tmp_path, blocks)
    alice, bob = nodes.managers["alice"], nodes.managers["bob"]
    issued = [
        await alice.enc_keys(master_sae="a", slave_sae="b", number=1, size_bits=256)
        for _ in range(4)
    ]
    before = nodes.commits["bob"].batches
    results: dict[int, object] = {}

    async def fetch(index: int, key_ids: list[uuid.UUID], slave: str) -> None:
        try:
            results[index] = await bob.dec_keys(slave_sae=slave, master_sae="a", key_ids=key_ids)
        except ApiError as exc:
            results[index] = exc.status

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fetch, 0, [issued[0][0][0]], "b")
        nursery.start_soon(fetch, 1, [issued[1][0][0], uuid.uuid4()], "b")  # unknown ID: 400
        nursery.start_soon(fetch, 2, [issued[2][0][0]], "b")
        nursery.start_soon(fetch, 3, [issued[3][0][0]], "not-b")  # not the slave: 401
    assert nodes.commits["bob"].batches == before + 1  # all four in one transaction
    assert results == {0: issued[0], 1: 400, 2: issued[2], 3: 401}
    # the refused ones changed nothing: their keys are still there for the right slave, once
    assert (
        await bob.dec_keys(slave_sae="b", master_sae="a", key_ids=[issued[1][0][0]]) == (issued[1])
    )
    assert (
        await bob.dec_keys(slave_sae="b", master_sae="a", key_ids=[issued[3][0][0]]) == (issued[3])
    )
    with pytest.raises(ApiError):
        await bob.dec_keys(slave_sae="b", master_sae="a", key_ids=[issued[0][0][0]])
    nodes.close()


async def test_an_sqlite_error_in_a_batch_poisons_the_store_for_every_operation(
    tmp_path: Path,
) -> None:
    blocks = _blocks(65, count=1, keys_per_block=8)
    store = _open(tmp_path / "s", "alice", blocks)
    commits = GroupCommit(store)
    failures: list[int] = []
    loop_thread = threading.get_ident()
    # the daemon's on_failure sets a trio.Event: it must run on the event loop's thread
    store.on_failure = lambda: failures.append(int(threading.get_ident() == loop_thread))

    def broken(tx: Any) -> None:
        tx.execute("UPDATE no_such_table SET x = 1")

    errors: list[BaseException] = []

    async def call(op: StoreOp[Any]) -> None:
        try:
            await commits.run(op)
        except KeyStoreError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            call,
            store.reserve_op(
                parity=0, delivery_ids=[uuid.uuid4()], size_bits=256, master_sae="a", slave_sae="b"
            ),
        )
        nursery.start_soon(call, StoreOp(broken))
    assert len(errors) == 2 and errors[0] is not errors[1]
    assert store.failed and failures == [1]
    with pytest.raises(KeyStoreError):
        store.counts()
    # nothing of the batch was committed
    db = sqlite3.connect(store.path)
    assert db.execute("SELECT COUNT(*) FROM keys WHERE state = 'reserved'").fetchone()[0] == 0
    db.close()


@pytest.mark.parametrize("checkpoints", [0, 1, 2, 3, 5, 8])
async def test_cancelled_requests_leave_no_reserved_keys_behind(
    tmp_path: Path, checkpoints: int
) -> None:
    """Cancel a crowd of enc_keys at different points (waiting in the batch, at the peer)."""
    rng = random.Random(checkpoints)
    blocks = _blocks(66, count=1, keys_per_block=80)
    nodes = _Nodes(tmp_path, blocks)
    nodes.peer_delay = trio.Event()  # the peer never answers: requests pile up there
    alice = nodes.managers["alice"]
    available = alice.stored_key_count()
    finished: list[int] = []

    async def client(index: int) -> None:
        for _ in range(rng.randrange(3)):
            await trio.lowlevel.checkpoint()
        await alice.enc_keys(master_sae="a", slave_sae="b", number=2, size_bits=256)
        finished.append(index)

    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            for index in range(12):
                nursery.start_soon(client, index)
            for _ in range(checkpoints):
                await trio.lowlevel.checkpoint()
            scope.cancel()
    assert finished == []
    assert nodes.commits["alice"].operations > 0 or checkpoints == 0
    counts = nodes.stores["alice"].counts()
    assert counts.reserved == 0
    assert alice.stored_key_count() == available  # released, none lost
    db = sqlite3.connect(nodes.stores["alice"].path)
    assert db.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0] == 0
    db.close()
    nodes.close()


async def test_cancelled_waiters_in_a_forming_batch_are_released(tmp_path: Path) -> None:
    """The followers of a batch are cancelled exactly while the leader is committing for them."""
    blocks = _blocks(67, count=1, keys_per_block=40)
    nodes = _Nodes(tmp_path, blocks)
    nodes.peer_delay = trio.Event()
    alice = nodes.managers["alice"]
    available = alice.stored_key_count()
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(
                    lambda: alice.enc_keys(master_sae="a", slave_sae="b", number=1, size_bits=256)
                )
            await trio.lowlevel.checkpoint()  # all ten have joined; the leader has yielded
            assert nodes.commits["alice"].operations == 0
            scope.cancel()
    assert nodes.commits["alice"].operations >= 10  # their reservations were committed...
    assert nodes.stores["alice"].counts().reserved == 0  # ...and released again
    assert alice.stored_key_count() == available
    nodes.close()


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


async def test_erasing_batches_leave_no_deleted_key_bytes_in_database_or_wal(
    tmp_path: Path,
) -> None:
    blocks = _blocks(68, count=2, keys_per_block=24)
    nodes = _Nodes(tmp_path, blocks)
    delivered: list[bytes] = []

    async def client(index: int) -> None:
        master, slave = ("alice", "bob") if index % 2 == 0 else ("bob", "alice")
        keys = await nodes.managers[master].enc_keys(
            master_sae=f"sae-{master}", slave_sae=f"sae-{slave}", number=2, size_bits=256
        )
        await nodes.managers[slave].dec_keys(
            slave_sae=f"sae-{slave}", master_sae=f"sae-{master}", key_ids=[k for k, _ in keys]
        )
        delivered.extend(m for _, m in keys)

    async with trio.open_nursery() as nursery:
        for index in range(16):
            nursery.start_soon(client, index)
    assert len(delivered) == 32
    # the checkpoint of an erasing batch follows its answers, in a system task: let it run
    await trio.testing.wait_all_tasks_blocked()
    for name in ("alice", "bob"):
        commits = nodes.commits[name]
        assert commits.operations > commits.batches  # erasing ops did share transactions
    for name, store in nodes.stores.items():
        held = [k.material for k in store.committed_keys()][:4]
        assert held  # some keys are left, and the scan must find them (it is not blind)
        files = _files(tmp_path / name)
        assert any(f.endswith("-wal") for f in files)  # the store is open, its WAL present
        leaked = {f: scan(data, windows(delivered)) for f, data in files.items()}
        assert sum(leaked.values()) == 0, leaked
        assert sum(scan(data, windows(held)) for data in files.values()) >= len(held)
    nodes.close()


async def test_peer_reservations_are_answered_concurrently_and_bounded() -> None:
    """Reservations run side by side (so they can share a commit), at most
    RESERVATIONS_IN_FLIGHT at once; the rest wait for a slot."""
    from qkdnode.coordination.wire import CoordinationMessage, Reserve
    from qkdnode.node.reservations import RESERVATIONS_IN_FLIGHT, Reservations

    total = RESERVATIONS_IN_FLIGHT + 6
    reservations = Reservations()
    in_flight = most = 0
    release = trio.Event()

    async def answer(request: Reserve, send: object) -> None:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await release.wait()
        in_flight -= 1

    async def send(message: CoordinationMessage) -> None:
        raise AssertionError("not called by the stand-in answer")

    reservations.answer = answer  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:

        async def feed() -> None:
            for request_id in range(1, total + 1):
                request = Reserve(request_id=request_id, reservation=b"x")
                await reservations.answer_soon(request, send, nursery)

        nursery.start_soon(feed)
        await trio.testing.wait_all_tasks_blocked()
        assert most == RESERVATIONS_IN_FLIGHT
        release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert in_flight == 0
