"""Hybrid delivery keys below the API: the combiner against an independent implementation, the
ML-KEM offer and answer, the store's per-key secrets (kept across a restart, erased at
delivery), the reservation and answer wire forms, and the [[delivery.pairs]] configuration."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import msgpack
import pytest
import trio

from qkdnode.channel.messages import Control
from qkdnode.config.delivery import HYBRID_MAX_KEY_SIZE_BITS, DeliveryConfig, KeyKind
from qkdnode.config.table import Table
from qkdnode.coordination.wire import (
    ReserveResult,
    control_from_wire,
    control_to_wire,
    make_registry,
)
from qkdnode.delivery.api import ApiError
from qkdnode.delivery.hybrid import (
    HybridAnswer,
    HybridConfirmationFailed,
    HybridOffer,
    HybridRequest,
    answer_offer,
    combine,
    confirmation,
    context_info,
    pair_combiner,
    per_key_secrets,
)
from qkdnode.delivery.keys import (
    KeyManager,
    hybrid_reservation_from_wire,
    hybrid_reservation_to_wire,
    reservation_format,
    reservation_from_wire,
    reservation_to_wire,
)
from qkdnode.errors import ConfigError, KeyStoreError, ProtocolError
from qkdnode.store.keystore import DeliveryKey, KeyStore
from tests import helpers_hybrid
from tests.helpers_store import committed_stores, random_blocks, take

IDS = dict(master_sae="sae-a", slave_sae="sae-b", master_kme_id="kme-alice", slave_kme_id="kme-bob")


def seeded(seed: int) -> Callable[[int], bytes]:
    return random.Random(seed).randbytes


# ---- the combiner ----------------------------------------------------------------------------


@pytest.mark.parametrize("size_bits", [8, 256, 512, 2048, HYBRID_MAX_KEY_SIZE_BITS])
def test_combiner_equals_an_independent_hkdf_computation(size_bits: int) -> None:
    rng = random.Random(size_bits)
    qkd, secret = rng.randbytes(size_bits // 8), rng.randbytes(32)
    key_id = uuid.UUID(bytes=rng.randbytes(16), version=4)
    expected = helpers_hybrid.hybrid_key(qkd, secret, key_id=key_id, **IDS)
    assert combine(qkd, secret, key_id=key_id, **IDS) == expected
    assert len(expected) == size_bits // 8
    assert pair_combiner(**IDS)(key_id, qkd, secret) == expected


def test_combiner_binds_key_id_both_saes_both_kmes_and_depends_on_both_inputs() -> None:
    rng = random.Random(1)
    qkd, secret = rng.randbytes(32), rng.randbytes(32)
    key_id = uuid.UUID(bytes=rng.randbytes(16), version=4)
    base = combine(qkd, secret, key_id=key_id, **IDS)
    swapped = IDS | {"master_sae": "sae-b", "slave_sae": "sae-a"}
    variants = [
        combine(qkd, secret, key_id=uuid.UUID(int=key_id.int ^ 1), **IDS),
        *(combine(qkd, secret, key_id=key_id, **(IDS | {name: "other"})) for name in IDS),
        combine(qkd, secret, key_id=key_id, **swapped),
        combine(bytes([qkd[0] ^ 1]) + qkd[1:], secret, key_id=key_id, **IDS),
        combine(qkd, bytes([secret[0] ^ 1]) + secret[1:], key_id=key_id, **IDS),
    ]
    assert len({base, *variants}) == len(variants) + 1
    # the context encoding is injective: moving a character between fields changes it
    moved = [
        context_info(
            key_id=key_id,
            master_sae=master,
            slave_sae=slave,
            master_kme_id="k1",
            slave_kme_id="k2",
            size_bits=256,
        )
        for master, slave in (("ab", "c"), ("a", "bc"))
    ]
    assert moved[0] != moved[1]


def test_combiner_refuses_sizes_hkdf_cannot_give_and_short_secrets() -> None:
    key_id = uuid.UUID(int=1)
    with pytest.raises(ValueError):
        combine(bytes(HYBRID_MAX_KEY_SIZE_BITS // 8 + 1), bytes(32), key_id=key_id, **IDS)
    with pytest.raises(ValueError):
        combine(bytes(32), bytes(16), key_id=key_id, **IDS)


# ---- ML-KEM offer and answer -------------------------------------------------------------------


def test_offer_and_answer_give_both_nodes_the_same_per_key_secrets_once() -> None:
    key_ids = [uuid.UUID(int=i) for i in range(1, 4)]
    offer = HybridOffer(seeded(2))
    request = HybridRequest(mlkem_public=offer.public, master_kme_id="a", slave_kme_id="b")
    answer, slave_secrets = answer_offer(request, key_ids)
    master_secrets = offer.accept(answer, key_ids)
    assert master_secrets == slave_secrets
    assert len(set(master_secrets.values())) == 3  # one secret per key
    with pytest.raises(ProtocolError, match="already used"):
        offer.accept(answer, key_ids)  # the decapsulation key is gone


def test_per_key_secrets_and_confirmation_equal_an_independent_hkdf_expand() -> None:
    rng = random.Random(3)
    shared, public, ciphertext = rng.randbytes(32), rng.randbytes(1184), rng.randbytes(1088)
    key_ids = [uuid.UUID(bytes=rng.randbytes(16), version=4) for _ in range(3)]
    assert per_key_secrets(shared, key_ids) == {
        k: helpers_hybrid.per_key_secret(shared, k) for k in key_ids
    }
    assert confirmation(shared, public, ciphertext) == helpers_hybrid.confirmation(
        shared, public, ciphertext
    )


def test_a_wrong_confirmation_or_another_ciphertext_is_refused() -> None:
    key_ids = [uuid.UUID(int=7)]
    offer = HybridOffer(seeded(4))
    request = HybridRequest(mlkem_public=offer.public, master_kme_id="a", slave_kme_id="b")
    answer, _ = answer_offer(request, key_ids)
    forged = HybridAnswer(mlkem_ciphertext=answer.mlkem_ciphertext, confirmation=bytes(32))
    with pytest.raises(HybridConfirmationFailed):
        offer.accept(forged, key_ids)
    other = HybridOffer(seeded(5))
    other_answer, _ = answer_offer(
        HybridRequest(mlkem_public=other.public, master_kme_id="a", slave_kme_id="b"), key_ids
    )
    # ML-KEM's implicit rejection gives a pseudorandom secret: the confirmation catches it
    with pytest.raises(HybridConfirmationFailed):
        HybridOffer(seeded(4)).accept(other_answer, key_ids)


def test_reprs_name_no_secret() -> None:
    offer = HybridOffer(seeded(6))
    request = HybridRequest(mlkem_public=offer.public, master_kme_id="a", slave_kme_id="b")
    answer, _ = answer_offer(request, [uuid.UUID(int=1)])
    assert repr(offer) == "HybridOffer(<redacted>)"
    for value in (request, answer):
        assert offer.public.hex()[:16] not in repr(value)
        assert answer.mlkem_ciphertext.hex()[:16] not in repr(value)


# ---- the store ---------------------------------------------------------------------------------


def test_hybrid_keys_match_across_stores_survive_a_restart_and_lose_their_secret_at_delivery(
    tmp_path: Path,
) -> None:
    alice, bob = committed_stores(tmp_path, random_blocks(8, count=1, keys_per_block=4))
    key_ids = [uuid.UUID(int=i) for i in (11, 12, 13)]
    layout = alice.run(
        alice.reserve_op(
            parity=0,
            delivery_ids=key_ids,
            size_bits=128,
            master_sae="sae-a",
            slave_sae="sae-b",
            kind=KeyKind.HYBRID,
        )
    )
    assert layout is not None
    offer = HybridOffer(seeded(8))
    answer, bob_secrets = answer_offer(
        HybridRequest(mlkem_public=offer.public, master_kme_id="ka", slave_kme_id="kb"), key_ids
    )
    refused = bob.run(
        bob.record_peer_reservation_op(
            layout, parity=0, master_sae="sae-a", slave_sae="sae-b", mlkem_secrets=bob_secrets
        )
    )
    assert refused is None
    alice.run(alice.confirm_op(key_ids, mlkem_secrets=offer.accept(answer, key_ids)))
    (reservation, *_) = alice.master_reservations()
    assert reservation.kind is KeyKind.HYBRID and reservation.peer_confirmed
    # the QKD bytes of each delivery key, as a plain take would hand them out
    qkd = {
        key.key_id: b"".join(
            alice._query("SELECT material FROM keys WHERE key_id = ?", (str(p.key_id),))[0][0][
                p.offset_bytes : p.offset_bytes + p.length_bytes
            ]
            for p in key.parts
        )
        for key in layout
    }
    bob.close()
    bob = KeyStore.open(tmp_path / "bob", node_name="bob")  # a restart between the two takes
    combiner = pair_combiner(
        master_sae="sae-a", slave_sae="sae-b", master_kme_id="ka", slave_kme_id="kb"
    )
    at_alice = alice.run(
        alice.take_op(
            key_ids, role="master", master_sae="sae-a", slave_sae="sae-b", combine=combiner
        )
    )
    at_bob = bob.run(
        bob.take_op(key_ids, role="slave", master_sae="sae-a", slave_sae="sae-b", combine=combiner)
    )
    assert at_alice == at_bob
    for key_id, material in at_alice:
        assert len(material) == 16 and material != qkd[key_id]
        expected = helpers_hybrid.hybrid_key(
            qkd[key_id],
            bob_secrets[key_id],
            key_id=key_id,
            master_sae="sae-a",
            slave_sae="sae-b",
            master_kme_id="ka",
            slave_kme_id="kb",
        )
        assert material == expected
    for store in (alice, bob):
        rows = store._query("SELECT kind, mlkem_secret FROM deliveries ORDER BY delivery_id")
        assert rows == [("hybrid", None)] * 3
    alice.close()
    bob.close()


def test_a_hybrid_key_without_its_secret_or_a_combiner_is_not_handed_out(tmp_path: Path) -> None:
    alice, bob = committed_stores(tmp_path, random_blocks(9, count=1, keys_per_block=4))
    key_id = uuid.UUID(int=21)
    alice.run(
        alice.reserve_op(
            parity=0,
            delivery_ids=[key_id],
            size_bits=256,
            master_sae="a",
            slave_sae="b",
            kind=KeyKind.HYBRID,
        )
    )
    combiner = pair_combiner(master_sae="a", slave_sae="b", master_kme_id="x", slave_kme_id="y")
    with pytest.raises(KeyStoreError):  # the peer's confirmation (and secret) never came
        alice.run(
            alice.take_op([key_id], role="master", master_sae="a", slave_sae="b", combine=combiner)
        )
    alice.run(alice.confirm_op([key_id], mlkem_secrets={key_id: bytes(range(32))}))
    with pytest.raises(KeyStoreError):  # no combiner: never the bare QKD bytes
        take(alice, [key_id], role="master", master_sae="a", slave_sae="b")
    state = alice._query("SELECT state FROM deliveries WHERE delivery_id = ?", (str(key_id),))
    assert state == [("reserved",)]
    alice.close()
    bob.close()


# ---- the key manager ---------------------------------------------------------------------------


async def hybrid_manager(
    tmp_path: Path, answer: Callable[[HybridRequest], HybridAnswer | None]
) -> tuple[KeyManager, KeyStore]:
    alice, _ = committed_stores(tmp_path, random_blocks(10, count=1, keys_per_block=8))

    async def plain(keys: object, master: str, slave: str) -> None:
        raise AssertionError("the pair is hybrid")

    async def hybrid(
        keys: object, master: str, slave: str, request: HybridRequest
    ) -> HybridAnswer | None:
        await trio.sleep(0)
        return answer(request)

    manager = KeyManager(
        alice,
        master_parity=0,
        peer_reserve=plain,
        pair_kinds={("a", "b"): KeyKind.HYBRID},
        kme_id="ka",
        peer_kme_id="kb",
        peer_reserve_hybrid=hybrid,
        random_bytes=seeded(10),
    )
    return manager, alice


@pytest.mark.parametrize("peer", ["no_answer", "wrong_confirmation"])
async def test_a_peer_answer_without_a_matching_ml_kem_secret_delivers_nothing(
    tmp_path: Path, peer: str
) -> None:
    def answer(request: HybridRequest) -> HybridAnswer | None:
        if peer == "no_answer":  # a peer that recorded the keys as plain QKD
            return None
        real, _ = answer_offer(request, [])
        return HybridAnswer(mlkem_ciphertext=real.mlkem_ciphertext, confirmation=bytes(32))

    manager, store = await hybrid_manager(tmp_path, answer)
    available = store.available_count(parity=0)
    with pytest.raises(ApiError) as info:
        await manager.enc_keys(master_sae="a", slave_sae="b", number=2, size_bits=256)
    assert info.value.status == 503
    assert store._query("SELECT COUNT(*) FROM deliveries") == [(0,)]
    assert store.available_count(parity=0) == available  # released for the next request
    store.close()


# ---- wire forms --------------------------------------------------------------------------------


def layout_of(count: int) -> list[DeliveryKey]:
    keys, _, _ = reservation_from_wire(
        {
            "master_sae": "a",
            "slave_sae": "b",
            "keys": [
                {"id": uuid.UUID(int=i).bytes, "bits": 256, "parts": [[bytes(16), 0, 32]]}
                for i in range(1, count + 1)
            ],
        }
    )
    return keys


def test_reservation_format_2_round_trips_and_a_node_without_it_refuses_it() -> None:
    keys = layout_of(2)
    request = HybridRequest(mlkem_public=bytes(1184), master_kme_id="ka", slave_kme_id="kb")
    wire = msgpack.unpackb(
        msgpack.packb(hybrid_reservation_to_wire(keys, "a", "b", request), use_bin_type=True),
        raw=False,
    )
    assert reservation_format(wire) == 2
    parsed, master, slave, parsed_request = hybrid_reservation_from_wire(wire)
    assert (parsed, master, slave, parsed_request) == (keys, "a", "b", request)
    # an older node parses every reservation as format 1: it finds no master_sae and refuses
    with pytest.raises(ProtocolError) as info:
        reservation_from_wire(wire)
    assert info.value.field == "master_sae"
    # format 1 is unchanged: no version field
    assert set(reservation_to_wire(keys, "a", "b")) == {"master_sae", "slave_sae", "keys"}
    assert reservation_format(reservation_to_wire(keys, "a", "b")) == 1
    for version in (3, 2.0, True, "2"):
        with pytest.raises(ProtocolError, match="upgrade this node") as info:
            reservation_format({"version": version})
        assert info.value.field == "version"


def test_hybrid_reserve_result_has_its_own_kind_and_a_plain_one_is_unchanged() -> None:
    registry = make_registry()
    plain = ReserveResult(request_id=5, ok=True, detail="", burned_key_ids=())
    kind, body = control_to_wire(plain)
    assert kind == "reserve_result"
    assert set(body) == {"request_id", "ok", "detail", "burned_key_ids"}
    hybrid = ReserveResult(
        request_id=6,
        ok=True,
        detail="",
        burned_key_ids=(),
        mlkem_ciphertext=bytes(range(256)) * 4 + bytes(64),
        mlkem_confirmation=bytes(range(32)),
    )
    for message in (plain, hybrid):
        kind, body = control_to_wire(message)
        registry.check(kind, body)
        assert control_from_wire(Control(kind=kind, body=body)) == message
    assert control_to_wire(hybrid)[0] == "hybrid_reserve_result"
    kind, body = control_to_wire(hybrid)
    with pytest.raises(ProtocolError):  # a short ciphertext fails the schema
        registry.check(kind, body | {"mlkem_ciphertext": bytes(1087)})
    assert repr(hybrid).endswith("hybrid=True)") and "\\x00" not in repr(hybrid)


# ---- configuration -----------------------------------------------------------------------------


def delivery_table(pairs: list[dict[str, object]], **extra: object) -> Table:
    data: dict[str, object] = {
        "certificate": "c.pem",
        "private_key": "k.pem",
        "sae_ca": "ca.pem",
        "kme_id": "alice",
        "peer_kme_id": "bob",
        "local_saes": ["sae-a", "sae-a2"],
        "peer_saes": ["sae-b"],
        "master_parity": 0,
        "pairs": pairs,
        **extra,
    }
    return Table(data, "delivery")


def test_pairs_choose_their_kind_and_others_stay_plain_qkd() -> None:
    config = DeliveryConfig.from_table(
        delivery_table(
            [
                {"master_sae_id": "sae-a", "slave_sae_id": "sae-b", "kind": "hybrid"},
                {"master_sae_id": "sae-b", "slave_sae_id": "sae-a2", "kind": "qkd"},
            ]
        )
    )
    assert config.key_kind("sae-a", "sae-b") is KeyKind.HYBRID
    assert config.key_kind("sae-b", "sae-a") is KeyKind.QKD  # pairs are directed
    assert config.key_kind("sae-b", "sae-a2") is KeyKind.QKD
    assert config.key_kind("sae-a2", "sae-b") is KeyKind.QKD
    assert DeliveryConfig.from_table(delivery_table([])).pair_kinds == {}


@pytest.mark.parametrize(
    ("pairs", "extra", "key", "expected"),
    [
        (
            [{"master_sae_id": "sae-a", "slave_sae_id": "sae-b", "kind": "quantum"}],
            {},
            "delivery.pairs[0].kind",
            "one of 'qkd', 'hybrid'",
        ),
        (
            [{"master_sae_id": "sae-a", "slave_sae_id": "sae-x"}],
            {},
            "delivery.pairs[0].slave_sae_id",
            "local_saes or peer_saes",
        ),
        (
            [{"master_sae_id": "sae-a", "slave_sae_id": "sae-a2"}],
            {},
            "delivery.pairs[0].slave_sae_id",
            "other node",
        ),
        (
            [{"master_sae_id": "sae-a", "slave_sae_id": "sae-b", "kinds": "hybrid"}],
            {},
            "delivery.pairs[0].kinds",
            "unknown",
        ),
        (
            [{"master_sae_id": "sae-a", "slave_sae_id": "sae-b"}] * 2,
            {},
            "delivery.pairs[1].master_sae_id",
            "not listed before",
        ),
        (
            [{"master_sae_id": "sae-a", "slave_sae_id": "sae-b", "kind": "hybrid"}],
            {"max_key_size_bits": HYBRID_MAX_KEY_SIZE_BITS + 8},
            "delivery.max_key_size_bits",
            "hybrid",
        ),
        ({"kind": "hybrid"}, {}, "delivery.pairs", "array of tables"),
    ],
)
def test_pair_mistakes_name_the_key(
    pairs: object, extra: dict[str, object], key: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        DeliveryConfig.from_table(delivery_table(pairs, **extra))  # type: ignore[arg-type]
    assert key in str(info.value) and expected in str(info.value), str(info.value)


class _HybridPeer:
    """Bob's node, pair (a, b) hybrid, behind a stand-in channel that uses the wire forms."""

    def __init__(self, store: KeyStore) -> None:
        self.manager = KeyManager(
            store,
            master_parity=1,
            peer_reserve=self._unused,
            local_saes={"b"},
            peer_saes={"a"},
            pair_kinds={("a", "b"): KeyKind.HYBRID},
            kme_id="kb",
            peer_kme_id="ka",
            peer_reserve_hybrid=self._unused,
        )
        self.down = False

    @staticmethod
    async def _unused(*args: object) -> None:
        raise AssertionError("bob is not master in these tests")

    async def reserve(
        self, keys: Sequence[DeliveryKey], master: str, slave: str, request: HybridRequest
    ) -> HybridAnswer:
        await trio.lowlevel.checkpoint()
        if self.down:
            raise OSError("channel down")
        wire = msgpack.packb(
            hybrid_reservation_to_wire(keys, master, slave, request), use_bin_type=True
        )
        return await self.manager.record_peer_hybrid_reservation(
            *hybrid_reservation_from_wire(msgpack.unpackb(wire, raw=False))
        )


def alice_manager(store: KeyStore, peer: _HybridPeer, kind: KeyKind, *, seed: int) -> KeyManager:
    return KeyManager(
        store,
        master_parity=0,
        peer_reserve=peer._unused,
        prebind_keys=4,
        prebind_size_bits=256,
        pair_kinds={("a", "b"): kind},
        kme_id="ka",
        peer_kme_id="kb",
        peer_reserve_hybrid=peer.reserve,
        random_bytes=seeded(seed),
    )


async def test_hybrid_keys_reserved_ahead_survive_a_restart_and_a_reconfigured_pair_drops_them(
    tmp_path: Path,
) -> None:
    alice, bob = committed_stores(tmp_path, random_blocks(11, count=1, keys_per_block=64))
    peer = _HybridPeer(bob)
    async with trio.open_nursery() as nursery:
        manager = alice_manager(alice, peer, KeyKind.HYBRID, seed=11)
        await nursery.start(manager.run)
        first = await manager.enc_keys(master_sae="a", slave_sae="b", number=1, size_bits=256)
        with trio.fail_after(5):
            while len(alice.master_reservations()) < 4:  # the pool, filled behind the request
                await trio.sleep(0.001)
        nursery.cancel_scope.cancel()
    pooled = alice.master_reservations()
    assert all(r.kind is KeyKind.HYBRID and r.peer_confirmed for r in pooled)
    alice.close()

    alice = KeyStore.open(tmp_path / "alice", node_name="alice")  # restart, peer unreachable
    peer.down = True
    async with trio.open_nursery() as nursery:
        manager = alice_manager(alice, peer, KeyKind.HYBRID, seed=12)
        await nursery.start(manager.run)
        ahead = await manager.enc_keys(master_sae="a", slave_sae="b", number=2, size_bits=256)
        nursery.cancel_scope.cancel()
    assert [key_id for key_id, _ in ahead] == [r.key_id for r in pooled[:2]]
    for key_id, material in [*first, *ahead]:
        fetched = await peer.manager.dec_keys(slave_sae="b", master_sae="a", key_ids=[key_id])
        assert fetched == [(key_id, material)]  # the same hybrid key at Bob
    assert all(
        material
        not in {m for _, m in random_blocks(11, count=1, keys_per_block=64)[0].consumer_keys}
        for _, material in [*first, *ahead]
    )

    # the pair is plain QKD after the next restart: its hybrid keys reserved ahead are released
    async with trio.open_nursery() as nursery:
        manager = alice_manager(alice, peer, KeyKind.QKD, seed=13)
        await nursery.start(manager.run)
        nursery.cancel_scope.cancel()
    assert alice.master_reservations() == []
    assert alice._query("SELECT COUNT(*) FROM deliveries WHERE mlkem_secret IS NOT NULL") == [(0,)]
    alice.close()
    bob.close()


async def test_a_reservation_binding_other_kme_ids_is_refused_and_nothing_recorded(
    tmp_path: Path,
) -> None:
    _, bob = committed_stores(tmp_path, random_blocks(12, count=1, keys_per_block=4))
    peer = _HybridPeer(bob)
    offer = HybridOffer(seeded(12))
    for master_kme, slave_kme in (("kb", "ka"), ("ka", "other")):
        request = HybridRequest(
            mlkem_public=offer.public, master_kme_id=master_kme, slave_kme_id=slave_kme
        )
        with pytest.raises(ProtocolError) as info:
            await peer.manager.record_peer_hybrid_reservation(layout_of(1), "a", "b", request)
        assert info.value.field == "hybrid.kme_ids"
    assert bob._query("SELECT COUNT(*) FROM deliveries") == [(0,)]
    bob.close()
