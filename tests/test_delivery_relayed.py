"""ETSI 014 requests for SAEs at other nodes (``DeliveryApp`` with a relay): status, enc_keys and
dec_keys go to the relay, its refusals are answered with their status, and everything else is
served as before by the key manager over the link's store."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from qkdnode.audit import AuditKind
from qkdnode.config.delivery import ApiLimits
from qkdnode.delivery.api import MSG_KEYS_NOT_FOUND, ApiError
from qkdnode.delivery.fairuse import FairUse, FairUsePolicy
from qkdnode.delivery.keys import KeyManager
from qkdnode.delivery.server import DeliveryApp, RelayedKeys, Response
from qkdnode.store import KeyStore
from qkdnode.store.audit import AuditTrail, read_trail
from qkdnode.store.keystore import DeliveryKey
from tests.helpers_store import random_blocks

LIMITS = ApiLimits(
    key_size_bits=256, min_key_size_bits=8, max_key_size_bits=2048, max_keys_per_request=64
)
ROUTE = ("A", "R", "C")
REMOTE_SAES = ("sae-c", "sae-c2")


@dataclass
class FakeRelay:
    """The relay as ``DeliveryApp`` sees it: records each call, answers with ``keys`` or raises
    ``refusal``."""

    keys: list[tuple[uuid.UUID, bytes]]
    serving: tuple[str, ...] = REMOTE_SAES
    refusal: ApiError | None = None
    stored: int = 7
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def serves(self, sae: str) -> bool:
        return sae in self.serving

    def route_to(self, sae: str) -> tuple[str, ...]:
        assert sae in self.serving
        return ROUTE

    def stored_key_count(self, master_sae: str, slave_sae: str) -> int:
        self.calls.append(("stored_key_count", {"master": master_sae, "slave": slave_sae}))
        return self.stored

    async def enc_keys(
        self, *, master_sae: str, slave_sae: str, number: int, size_bits: int
    ) -> list[tuple[uuid.UUID, bytes]]:
        self.calls.append(
            (
                "enc_keys",
                {"master": master_sae, "slave": slave_sae, "number": number, "size": size_bits},
            )
        )
        if self.refusal is not None:
            raise self.refusal
        return self.keys[:number]

    async def dec_keys(
        self, *, slave_sae: str, master_sae: str, key_ids: Sequence[uuid.UUID]
    ) -> list[tuple[uuid.UUID, bytes]]:
        self.calls.append(
            ("dec_keys", {"master": master_sae, "slave": slave_sae, "key_ids": list(key_ids)})
        )
        if self.refusal is not None:
            raise self.refusal
        wanted = dict(self.keys)
        return [(key_id, wanted[key_id]) for key_id in key_ids]


@dataclass
class Setup:
    app: DeliveryApp
    relay: FakeRelay
    manager: KeyManager
    store: KeyStore
    directory: Path
    peer_reserved: list[tuple[str, str, int]]


async def make_setup(
    tmp_path: Path, *, burst_keys: float = 1e6, with_relay: bool = True
) -> AsyncIterator[Setup]:
    directory = tmp_path / "store"
    store = KeyStore.open(directory, node_name="A")
    for block in random_blocks(31, count=2, keys_per_block=16):
        store.stage_block(block)
        store.commit_block(block.block_id)
    peer_reserved: list[tuple[str, str, int]] = []

    async def peer_reserve(keys: Sequence[DeliveryKey], master: str, slave: str) -> None:
        peer_reserved.append((master, slave, len(keys)))

    manager = KeyManager(
        store,
        master_parity=0,
        peer_reserve=peer_reserve,
        local_saes={"sae-a"},
        peer_saes={"sae-r"},
        kme_id="A",
        peer_kme_id="R",
    )
    manager.audit = AuditTrail.start(store, node_name="A")
    app = DeliveryApp(
        manager=manager,
        limits=LIMITS,
        kme_id="A",
        peer_kme_id="R",
        local_saes=("sae-a",),
        peer_saes=("sae-r",),
        fair_use=FairUse(FairUsePolicy(keys_per_s=1e-9, burst_keys=burst_keys, key_size_bits=256)),
        max_key_count=1000,
        clock=lambda: 0.0,
    )
    relay = FakeRelay(keys=[(uuid.UUID(int=i + 1, version=4), bytes([i]) * 32) for i in range(8)])
    if with_relay:
        app.relay = relay
    yield Setup(app, relay, manager, store, directory, peer_reserved)
    store.close()


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    async for value in make_setup(tmp_path):
        yield value


def as_json(response: Response) -> Any:
    return json.loads(response.body)


def keys_of(response: Response) -> list[tuple[uuid.UUID, bytes]]:
    return [(uuid.UUID(k["key_ID"]), base64.b64decode(k["key"])) for k in as_json(response)["keys"]]


def enc_body(number: int, size: int = 256) -> bytes:
    return json.dumps({"number": number, "size": size}).encode()


def dec_body(key_ids: Sequence[uuid.UUID]) -> bytes:
    return json.dumps({"key_IDs": [{"key_ID": str(k)} for k in key_ids]}).encode()


def refusals(directory: Path) -> list[dict[str, Any]]:
    entries = [record.entry() for record in read_trail(directory).records]
    return [dict(e.fields) for e in entries if e.kind == AuditKind.SAE_REQUEST_REFUSED.value]


def test_the_fake_relay_is_a_relayed_keys() -> None:
    relay: RelayedKeys = FakeRelay(keys=[])  # mypy checks the Protocol
    assert relay.serves("sae-c")


@pytest.mark.parametrize("sae", REMOTE_SAES)
async def test_status_for_a_remote_sae_names_the_routes_last_node_and_marks_it_relayed(
    setup: Setup, sae: str
) -> None:
    response = await setup.app.respond("GET", f"/api/v1/keys/{sae}/status", b"", "sae-a")
    assert response.status == 200
    status = as_json(response)
    assert status["source_KME_ID"] == "A"
    assert status["target_KME_ID"] == ROUTE[-1]
    assert status["master_SAE_ID"] == "sae-a"
    assert status["slave_SAE_ID"] == sae
    assert status["stored_key_count"] == setup.relay.stored
    assert status["status_extension"] == {"key_kind": "qkd", "relayed": True, "route": list(ROUTE)}
    assert setup.relay.calls == [("stored_key_count", {"master": "sae-a", "slave": sae})]


async def test_status_for_the_peers_sae_is_the_links_as_before(setup: Setup) -> None:
    response = await setup.app.respond("GET", "/api/v1/keys/sae-r/status", b"", "sae-a")
    assert response.status == 200
    status = as_json(response)
    assert status["target_KME_ID"] == "R"
    assert status["status_extension"] == {"key_kind": "qkd"}
    assert status["stored_key_count"] == setup.manager.stored_key_count("sae-a", "sae-r")
    assert setup.relay.calls == []


async def test_enc_keys_for_a_remote_sae_go_to_the_relay(setup: Setup) -> None:
    available = setup.store.available_count(parity=0)
    response = await setup.app.respond("POST", "/api/v1/keys/sae-c/enc_keys", enc_body(3), "sae-a")
    assert response.status == 200
    assert ("cache-control", "no-store") in response.headers
    assert keys_of(response) == setup.relay.keys[:3]
    assert setup.relay.calls == [
        ("enc_keys", {"master": "sae-a", "slave": "sae-c", "number": 3, "size": 256})
    ]
    # the link's keys are untouched
    assert setup.store.available_count(parity=0) == available
    assert setup.peer_reserved == []


async def test_enc_keys_query_form_and_other_size_go_to_the_relay(setup: Setup) -> None:
    response = await setup.app.respond(
        "GET", "/api/v1/keys/sae-c2/enc_keys?number=2&size=512", b"", "sae-a"
    )
    assert response.status == 200
    assert setup.relay.calls == [
        ("enc_keys", {"master": "sae-a", "slave": "sae-c2", "number": 2, "size": 512})
    ]


async def test_dec_keys_from_a_remote_master_go_to_the_relay(setup: Setup) -> None:
    ids = [key_id for key_id, _ in setup.relay.keys[2:5]][::-1]
    response = await setup.app.respond(
        "POST", "/api/v1/keys/sae-c/dec_keys", dec_body(ids), "sae-a"
    )
    assert response.status == 200
    assert [key_id for key_id, _ in keys_of(response)] == ids
    assert dict(keys_of(response)) == {k: v for k, v in setup.relay.keys if k in ids}
    assert setup.relay.calls == [
        ("dec_keys", {"master": "sae-c", "slave": "sae-a", "key_ids": ids})
    ]


@pytest.mark.parametrize(
    ("refusal", "operation"),
    [
        (ApiError(503, "the relay did not complete in time; retry later"), "enc_keys"),
        (ApiError(400, "slave_SAE_ID is not an SAE of a reachable KME"), "enc_keys"),
        (ApiError(400, MSG_KEYS_NOT_FOUND), "dec_keys"),
        (ApiError(503, "relayed keys not available; retry later"), "dec_keys"),
    ],
)
async def test_refusals_of_the_relay_are_answered_with_their_status_and_recorded(
    setup: Setup, refusal: ApiError, operation: str
) -> None:
    setup.relay.refusal = refusal
    if operation == "enc_keys":
        target, body = "/api/v1/keys/sae-c/enc_keys", enc_body(1)
    else:
        target, body = "/api/v1/keys/sae-c/dec_keys", dec_body([setup.relay.keys[0][0]])
    response = await setup.app.respond("POST", target, body, "sae-a")
    assert response.status == refusal.status
    assert as_json(response)["message"] == refusal.message
    assert [name for name, _ in setup.relay.calls] == [operation]
    recorded = refusals(setup.directory)
    assert len(recorded) == 1
    assert recorded[0]["status"] == refusal.status
    assert recorded[0]["target"] == target
    assert recorded[0]["sae"] == "sae-a"


async def test_a_refused_relay_request_gives_its_quota_back(tmp_path: Path) -> None:
    async for setup in make_setup(tmp_path, burst_keys=2):
        setup.relay.refusal = ApiError(503, "the route cannot carry the keys now; retry later")
        target = "/api/v1/keys/sae-c/enc_keys"
        first = await setup.app.respond("POST", target, enc_body(2), "sae-a")
        assert first.status == 503
        setup.relay.refusal = None
        second = await setup.app.respond("POST", target, enc_body(2), "sae-a")
        assert second.status == 200  # the refused request's cost was refunded
        third = await setup.app.respond("POST", target, enc_body(1), "sae-a")
        assert third.status == 429  # the burst is spent now


@pytest.mark.parametrize(
    ("method", "target", "body"),
    [
        ("GET", "/api/v1/keys/sae-x/status", b""),
        ("POST", "/api/v1/keys/sae-x/enc_keys", enc_body(1)),
        ("POST", "/api/v1/keys/sae-x/dec_keys", dec_body([uuid.UUID(int=1, version=4)])),
        ("POST", "/api/v1/keys/sae-a/enc_keys", enc_body(1)),  # a local SAE is no slave
    ],
)
async def test_an_sae_neither_peer_nor_remote_gets_400_and_the_relay_is_not_asked(
    setup: Setup, method: str, target: str, body: bytes
) -> None:
    response = await setup.app.respond(method, target, body, "sae-a")
    assert response.status == 400
    assert [name for name, _ in setup.relay.calls] == []


async def test_a_caller_not_attached_here_gets_401_even_for_a_remote_sae(setup: Setup) -> None:
    for caller in ("sae-c", "sae-r", "sae-x"):
        response = await setup.app.respond("GET", "/api/v1/keys/sae-c/status", b"", caller)
        assert response.status == 401
    assert setup.relay.calls == []


async def test_the_peers_saes_still_go_to_the_key_manager(setup: Setup) -> None:
    available = setup.store.available_count(parity=0)
    response = await setup.app.respond("POST", "/api/v1/keys/sae-r/enc_keys", enc_body(2), "sae-a")
    assert response.status == 200
    keys = keys_of(response)
    assert len(keys) == 2
    assert not {k for k, _ in keys} & {k for k, _ in setup.relay.keys}
    assert setup.peer_reserved == [("sae-a", "sae-r", 2)]
    assert setup.store.available_count(parity=0) < available  # cut from the link's keys
    # dec_keys from the peer's SAE: the manager answers (keys reserved by the peer as master)
    unknown = [uuid.UUID(int=99, version=4)]
    response = await setup.app.respond(
        "POST", "/api/v1/keys/sae-r/dec_keys", dec_body(unknown), "sae-a"
    )
    assert response.status == 400
    assert setup.relay.calls == []


async def test_a_peer_sae_the_relay_also_serves_goes_to_the_key_manager(setup: Setup) -> None:
    setup.relay.serving = (*REMOTE_SAES, "sae-r")
    response = await setup.app.respond("GET", "/api/v1/keys/sae-r/status", b"", "sae-a")
    assert as_json(response)["target_KME_ID"] == "R"
    response = await setup.app.respond("POST", "/api/v1/keys/sae-r/enc_keys", enc_body(1), "sae-a")
    assert response.status == 200
    assert setup.relay.calls == []
    assert setup.peer_reserved == [("sae-a", "sae-r", 1)]


async def test_without_a_relay_a_remote_sae_gets_400_as_before(tmp_path: Path) -> None:
    async for setup in make_setup(tmp_path, with_relay=False):
        for method, target, body in (
            ("GET", "/api/v1/keys/sae-c/status", b""),
            ("POST", "/api/v1/keys/sae-c/enc_keys", enc_body(1)),
            ("POST", "/api/v1/keys/sae-c/dec_keys", dec_body([setup.relay.keys[0][0]])),
        ):
            response = await setup.app.respond(method, target, body, "sae-a")
            assert response.status == 400
        assert setup.relay.calls == []
