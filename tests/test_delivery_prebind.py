"""Reserving ahead: a (master, slave) pair's keys reserved here and recorded by the peer before
any request, so that enc_keys does no round trip; the guarantee (the peer durably recorded the
pair first) and exactly-once hand-out are unchanged, and the pools outlive a restart."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

import pytest
import trio

from qkdnode.delivery.api import ApiError
from qkdnode.delivery.keys import (
    POOL_GROWTH,
    KeyManager,
    reservation_from_wire,
    reservation_to_wire,
)
from qkdnode.errors import SecurityError
from qkdnode.store.groupcommit import GroupCommit
from qkdnode.store.keystore import DeliveryKey, KeyStore
from tests.helpers_store import committed_stores, random_blocks, reserve

POOL = 4


class _Peer:
    """Bob's node behind a stand-in channel; counts the reservations it was asked to record."""

    def __init__(self, store: KeyStore, slave_saes: Sequence[str] = ("b",)) -> None:
        self.manager = KeyManager(
            store,
            master_parity=1,
            peer_reserve=self._unused,
            local_saes=set(slave_saes),
            peer_saes={"a"},
            group_commit=GroupCommit(store, in_thread=False),
        )
        self.calls: list[int] = []  # keys per reservation
        self.down = False

    @staticmethod
    async def _unused(keys: Sequence[DeliveryKey], master_sae: str, slave_sae: str) -> None:
        raise AssertionError("bob is not master in these tests")

    async def reserve(self, keys: Sequence[DeliveryKey], master_sae: str, slave_sae: str) -> None:
        await trio.lowlevel.checkpoint()
        if self.down:
            raise OSError("channel down")
        parsed, master, slave = reservation_from_wire(
            reservation_to_wire(keys, master_sae, slave_sae)
        )
        await self.manager.record_peer_reservation(parsed, master, slave)
        self.calls.append(len(keys))


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[tuple[KeyStore, _Peer]]:
    """Alice's store (the master here) and Bob's node, both holding the same two blocks."""
    alice, bob = committed_stores(tmp_path, random_blocks(41, count=2, keys_per_block=160))
    yield alice, _Peer(bob)


def _manager(alice: KeyStore, peer: _Peer, *, prebind_keys: int = POOL) -> KeyManager:
    return KeyManager(
        alice,
        master_parity=0,
        peer_reserve=peer.reserve,
        prebind_keys=prebind_keys,
        prebind_size_bits=256,
        group_commit=GroupCommit(alice, in_thread=False),
    )


def _pooled(manager: KeyManager, alice: KeyStore) -> int:
    """Keys reserved ahead, and acknowledged by the peer, for the pair (a, b)."""
    return manager.stored_key_count("a", "b") - alice.available_count(parity=0)


async def _until(condition: Callable[[], bool]) -> None:
    with trio.fail_after(5):
        while not condition():
            await trio.sleep(0.001)


async def test_a_pool_serves_requests_without_a_round_trip_and_tops_up_at_half(
    nodes: tuple[KeyStore, _Peer],
) -> None:
    alice, peer = nodes
    manager = _manager(alice, peer)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        first = await manager.enc_keys(master_sae="a", slave_sae="b", number=1, size_bits=256)
        # on request (1 key), and the pool filled behind it (POOL keys) for exactly this pair
        await _until(lambda: _pooled(manager, alice) == POOL)
        assert peer.calls == [1, POOL]
        assert alice.counts().reserved == POOL
        available = alice.available_count(parity=0)
        assert manager.stored_key_count("a", "b") == available + POOL
        assert manager.stored_key_count("a", "c") == available  # another pair has no pool

        second = await manager.enc_keys(master_sae="a", slave_sae="b", number=1, size_bits=256)
        await trio.testing.wait_all_tasks_blocked()
        assert peer.calls == [1, POOL]  # served from the pool: no round trip
        third = await manager.enc_keys(master_sae="a", slave_sae="b", number=1, size_bits=256)
        await _until(lambda: _pooled(manager, alice) == POOL)  # fell to half: topped up
        assert peer.calls == [1, POOL, 2] and alice.counts().reserved == POOL

        # another size: reserved on request, the pool untouched
        odd = await manager.enc_keys(master_sae="a", slave_sae="b", number=1, size_bits=128)
        await trio.testing.wait_all_tasks_blocked()
        assert peer.calls == [1, POOL, 2, 1] and _pooled(manager, alice) == POOL
        # more keys than the pool holds: the pool's keys and one reserved on request, and the
        # pool grows to twice the request
        many = await manager.enc_keys(master_sae="a", slave_sae="b", number=POOL + 1, size_bits=256)
        grown = 2 * (POOL + 1)
        await _until(lambda: _pooled(manager, alice) == grown)
        assert peer.calls == [1, POOL, 2, 1, 1, grown]
        nursery.cancel_scope.cancel()

    handed_out = first + second + third + odd + many
    assert len({key_id for key_id, _ in handed_out}) == len(handed_out)
    assert len({material for _, material in handed_out}) == len(handed_out)
    # the slave gets exactly the master's bytes, once
    got = await peer.manager.dec_keys(
        slave_sae="b", master_sae="a", key_ids=[key_id for key_id, _ in handed_out]
    )
    assert got == handed_out
    with pytest.raises(ApiError) as refused:
        await peer.manager.dec_keys(slave_sae="b", master_sae="a", key_ids=[first[0][0]])
    assert refused.value.status == 400


async def test_acknowledged_pools_survive_a_restart_and_cut_short_reservations_are_released(
    tmp_path: Path, nodes: tuple[KeyStore, _Peer]
) -> None:
    alice, peer = nodes
    manager = _manager(alice, peer)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        await manager.enc_keys(master_sae="a", slave_sae="b", number=1, size_bits=256)
        await _until(lambda: _pooled(manager, alice) == POOL)
        nursery.cancel_scope.cancel()
    # a request cut short by a crash: reserved here, never acknowledged by the peer
    cut_short = reserve(
        alice, parity=0, delivery_ids=[uuid.uuid4()], size_bits=256, master_sae="a", slave_sae="b"
    )
    assert cut_short is not None
    assert alice.counts().reserved == POOL + 1
    alice.close()

    alice = reopened = KeyStore.open(tmp_path / "alice", node_name="alice")
    peer.calls.clear()
    restarted = _manager(alice, peer)
    async with trio.open_nursery() as nursery:
        await nursery.start(restarted.run)
        assert alice.counts().reserved == POOL  # the acknowledged pool only
        stored_key = cut_short[0].parts[0].key_id
        assert stored_key in {
            uuid.UUID(row[0])
            for row in alice._query("SELECT key_id FROM keys WHERE state = 'available'")
        }
        got = await restarted.enc_keys(master_sae="a", slave_sae="b", number=1, size_bits=256)
        await trio.testing.wait_all_tasks_blocked()
        assert peer.calls == []  # served from the restored pool
        nursery.cancel_scope.cancel()
    assert await peer.manager.dec_keys(slave_sae="b", master_sae="a", key_ids=[got[0][0]]) == got
    reopened.close()


async def test_a_failed_top_up_releases_its_keys_and_requests_still_get_an_answer(
    nodes: tuple[KeyStore, _Peer],
) -> None:
    alice, peer = nodes
    manager = _manager(alice, peer)
    available = alice.available_count(parity=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        peer.down = True
        with pytest.raises(ApiError) as unreachable:
            await manager.enc_keys(master_sae="a", slave_sae="b", number=1, size_bits=256)
        assert unreachable.value.status == 503
        await trio.testing.wait_all_tasks_blocked()
        assert alice.counts().reserved == 0
        assert alice.available_count(parity=0) == available  # nothing lost
        peer.down = False
        got = await manager.enc_keys(master_sae="a", slave_sae="b", number=1, size_bits=256)
        assert len(got) == 1 and peer.calls == [1]  # on request; top-ups wait out the back-off
        nursery.cancel_scope.cancel()


async def test_a_pool_that_runs_dry_between_top_ups_grows_once_per_top_up_up_to_a_cap(
    nodes: tuple[KeyStore, _Peer],
) -> None:
    alice, peer = nodes
    manager = _manager(alice, peer, prebind_keys=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        await manager.enc_keys(master_sae="a", slave_sae="b", number=1, size_bits=256)
        await _until(lambda: _pooled(manager, alice) == 1)
        sizes = []
        for _ in range(6):
            # empty the pool, then ask again before its top-up: many requests meanwhile
            # count as one growth
            async with trio.open_nursery() as burst:
                for _ in range(_pooled(manager, alice) + 3):
                    burst.start_soon(
                        partial(
                            manager.enc_keys, master_sae="a", slave_sae="b", number=1, size_bits=256
                        )
                    )
            await trio.testing.wait_all_tasks_blocked()
            await _until(lambda: not manager._refill_pending)
            sizes.append(_pooled(manager, alice))
        nursery.cancel_scope.cancel()
    # doubles per dry spell, up to POOL_GROWTH x prebind_keys
    assert sizes == [min(2 ** (spell + 1), POOL_GROWTH) for spell in range(6)]


async def test_pools_never_hold_more_than_the_keys_left_to_every_other_request(
    tmp_path: Path,
) -> None:
    """A busy pair's pool cannot bind the keys another pair would ask for on request."""
    alice, bob = committed_stores(tmp_path, random_blocks(43, count=1, keys_per_block=24))
    peer = _Peer(bob, slave_saes=("b", "c"))
    manager = _manager(alice, peer)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        await manager.enc_keys(master_sae="a", slave_sae="b", number=1, size_bits=256)
        await _until(lambda: _pooled(manager, alice) == POOL)  # 11 left: 4 pooled, 7 free
        for _ in range(3):  # another pair: on request; its own pool would leave too few
            await manager.enc_keys(master_sae="a", slave_sae="c", number=1, size_bits=256)
            await trio.testing.wait_all_tasks_blocked()
            assert alice.counts().reserved <= alice.available_count(parity=0)
        assert alice.counts().reserved == POOL and alice.available_count(parity=0) == 4
        assert peer.calls == [1, POOL, 1, 1, 1]
        nursery.cancel_scope.cancel()
    alice.close()
    bob.close()


async def test_a_pair_the_peer_refuses_pauses_only_its_own_top_ups(
    nodes: tuple[KeyStore, _Peer],
) -> None:
    alice, peer = nodes  # the peer serves slave "b" only
    manager = _manager(alice, peer)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        with pytest.raises(ApiError):
            await manager.enc_keys(master_sae="a", slave_sae="c", number=1, size_bits=256)
        await trio.testing.wait_all_tasks_blocked()
        await manager.enc_keys(master_sae="a", slave_sae="b", number=1, size_bits=256)
        await _until(lambda: _pooled(manager, alice) == POOL)  # not held up by (a, c)
        assert alice.counts().reserved == POOL
        nursery.cancel_scope.cancel()


async def test_a_security_error_from_the_peer_during_a_top_up_is_not_swallowed(
    nodes: tuple[KeyStore, _Peer],
) -> None:
    alice, peer = nodes
    calls = 0

    async def hostile_peer(keys: Sequence[DeliveryKey], master_sae: str, slave_sae: str) -> None:
        nonlocal calls
        calls += 1
        if calls > 1:  # the top-up
            raise SecurityError("peer frame failed authentication")
        await peer.reserve(keys, master_sae, slave_sae)

    manager = KeyManager(
        alice,
        master_parity=0,
        peer_reserve=hostile_peer,
        prebind_keys=POOL,
        group_commit=GroupCommit(alice, in_thread=False),
    )
    with pytest.RaisesGroup(SecurityError):
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.run)
            await manager.enc_keys(master_sae="a", slave_sae="b", number=1, size_bits=256)
            await trio.sleep_forever()
    assert alice.counts().reserved == 0  # the top-up's reservation was released


async def test_without_prebind_keys_nothing_is_reserved_ahead(
    nodes: tuple[KeyStore, _Peer],
) -> None:
    alice, peer = nodes
    manager = _manager(alice, peer, prebind_keys=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        for _ in range(3):
            await manager.enc_keys(master_sae="a", slave_sae="b", number=1, size_bits=256)
        await trio.testing.wait_all_tasks_blocked()
        assert peer.calls == [1, 1, 1] and alice.counts().reserved == 0
        nursery.cancel_scope.cancel()
