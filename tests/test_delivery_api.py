"""ETSI 014 delivery, pure parts and the store beneath: parsing (property-based), fair use,
configuration, key composition, exactly-once delivery and the two-node reservation protocol."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from qkdnode.config.delivery import ApiLimits, DeliveryConfig
from qkdnode.config.table import Table
from qkdnode.delivery.api import (
    MSG_EXTENSION_UNSUPPORTED,
    MSG_KEYS_NOT_FOUND,
    MSG_SIZE_MULTIPLE,
    ApiError,
    DecKeysRequest,
    EncKeysRequest,
    StatusRequest,
    authorize,
    key_container_body,
    parse_request,
    status_body,
)
from qkdnode.delivery.fairuse import FairUse, FairUsePolicy, QuotaExceeded
from qkdnode.delivery.keys import KeyManager, reservation_from_wire, reservation_to_wire
from qkdnode.errors import ConfigError, ProtocolError
from qkdnode.store.keystore import (
    DeliveryKey,
    KeyPart,
)
from tests.helpers_store import committed_stores, random_blocks

LIMITS = ApiLimits(
    key_size_bits=256, min_key_size_bits=8, max_key_size_bits=2048, max_keys_per_request=16
)
ENC = "/api/v1/keys/sae-b/enc_keys"
DEC = "/api/v1/keys/sae-a/dec_keys"


# ---- parsing ----------------------------------------------------------------------------------


def test_parse_accepts_the_forms_real_clients_send() -> None:
    assert parse_request("GET", "/api/v1/keys/sae-b/status", b"", LIMITS) == StatusRequest(
        slave_sae="sae-b"
    )
    assert parse_request("GET", ENC, b"", LIMITS) == EncKeysRequest(
        slave_sae="sae-b", number=1, size_bits=256
    )
    assert parse_request("POST", ENC, b"", LIMITS) == EncKeysRequest(
        slave_sae="sae-b", number=1, size_bits=256
    )
    assert parse_request("GET", ENC + "?number=3&size=512", b"", LIMITS) == EncKeysRequest(
        slave_sae="sae-b", number=3, size_bits=512
    )
    body = json.dumps({"number": 2, "size": 128, "extension_optional": [{"x": 1}], "zz": 1})
    assert parse_request("POST", ENC, body.encode(), LIMITS) == EncKeysRequest(
        slave_sae="sae-b", number=2, size_bits=128
    )
    ids = [uuid.UUID(int=i + 1) for i in range(3)]
    body = json.dumps({"key_IDs": [{"key_ID": str(i), "key_ID_extension": {}} for i in ids]})
    assert parse_request("POST", DEC, body.encode(), LIMITS) == DecKeysRequest(
        master_sae="sae-a", key_ids=tuple(ids)
    )
    assert parse_request("GET", f"{DEC}?key_ID={ids[0]}", b"", LIMITS) == DecKeysRequest(
        master_sae="sae-a", key_ids=(ids[0],)
    )
    assert parse_request("GET", "/api/v1/keys/sae%20b/status", b"", LIMITS) == StatusRequest(
        slave_sae="sae b"
    )


@pytest.mark.parametrize(
    ("method", "target", "body", "status", "message"),
    [
        ("POST", ENC, b'{"size": 100}', 400, MSG_SIZE_MULTIPLE),
        ("GET", ENC + "?size=12", b"", 400, MSG_SIZE_MULTIPLE),
        ("POST", ENC, b'{"size": 4096}', 400, "size shall be between"),
        ("POST", ENC, b'{"number": 17}', 400, "number shall be between 1 and"),
        ("POST", ENC, b'{"number": 0}', 400, "number shall be between 1 and"),
        ("POST", ENC, b'{"number": true}', 400, "number must be an integer"),
        ("POST", ENC, b'{"number": 1.0}', 400, "number must be an integer"),
        ("POST", ENC, b'{"number": NaN}', 400, "not valid JSON"),
        ("POST", ENC, b'{"number": 1', 400, "not valid JSON"),
        ("POST", ENC, b"\xff\xfe", 400, "not valid JSON"),
        ("POST", ENC, b"[1]", 400, "must be a JSON object"),
        ("POST", ENC, b"[" * 50000, 400, "not valid JSON"),
        (
            "POST",
            ENC,
            b'{"extension_mandatory": [{"abc_route": 1}]}',
            400,
            MSG_EXTENSION_UNSUPPORTED,
        ),
        ("POST", ENC, b'{"additional_slave_SAE_IDs": ["sae-c"]}', 400, "not supported"),
        ("POST", DEC, b"{}", 400, "key_IDs must be a list"),
        ("POST", DEC, b'{"key_IDs": []}', 400, "no key_ID"),
        ("POST", DEC, b'{"key_IDs": [{"key_ID": "nope"}]}', 400, "key_ID must be a UUID"),
        ("POST", DEC, b'{"key_IDs": [{"key_ID": 5}]}', 400, "key_ID must be a UUID"),
        ("POST", DEC, b'{"key_IDs": [1]}', 400, "entries must be objects"),
        ("GET", DEC, b"", 400, "no key_ID"),
        ("GET", "/api/v1/keys/sae-b/other", b"", 404, "no such operation"),
        ("GET", "/api/v2/keys/sae-b/status", b"", 404, "no such resource"),
        ("GET", "/api/v1/keys/a/b/status", b"", 404, "no such resource"),
        ("POST", "/api/v1/keys/sae-b/status", b"", 405, "not allowed"),
        ("DELETE", ENC, b"", 405, "not allowed"),
        ("GET", "/api/v1/keys//status", b"", 400, "SAE_ID must be"),
    ],
)
def test_parse_refuses_bad_requests_with_the_spec_messages(
    method: str, target: str, body: bytes, status: int, message: str
) -> None:
    with pytest.raises(ApiError) as info:
        parse_request(method, target, body, LIMITS)
    assert info.value.status == status
    assert info.value.message.startswith(message) or message in info.value.message
    decoded = json.loads(info.value.body())
    assert decoded["message"] == info.value.message


def test_unknown_mandatory_extension_is_named_in_details() -> None:
    body = b'{"extension_mandatory": [{"abc_route_type": "direct"}, {"x_qos": 1}]}'
    with pytest.raises(ApiError) as info:
        parse_request("POST", ENC, body, LIMITS)
    assert info.value.details == [
        {"unsupported_extension_parameter": "abc_route_type"},
        {"unsupported_extension_parameter": "x_qos"},
    ]


def test_more_key_ids_than_the_limit_and_repeats_are_refused() -> None:
    ids = [{"key_ID": str(uuid.UUID(int=i + 1))} for i in range(17)]
    with pytest.raises(ApiError, match="max_key_per_request"):
        parse_request("POST", DEC, json.dumps({"key_IDs": ids}).encode(), LIMITS)
    with pytest.raises(ApiError, match="repeats"):
        parse_request("POST", DEC, json.dumps({"key_IDs": ids[:1] * 2}).encode(), LIMITS)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
request_fields = st.dictionaries(
    st.sampled_from(
        [
            "number",
            "size",
            "key_IDs",
            "key_ID",
            "extension_mandatory",
            "extension_optional",
            "additional_slave_SAE_IDs",
            "other",
        ]
    ),
    json_values,
    max_size=5,
)


def _check_parse(method: str, target: str, body: bytes) -> None:
    try:
        request = parse_request(method, target, body, LIMITS)
    except ApiError as exc:
        assert exc.status in (400, 404, 405)
        assert json.loads(exc.body())["message"] == exc.message
        return
    if isinstance(request, EncKeysRequest):
        assert 1 <= request.number <= LIMITS.max_keys_per_request
        assert request.size_bits % 8 == 0
        assert LIMITS.min_key_size_bits <= request.size_bits <= LIMITS.max_key_size_bits
    elif isinstance(request, DecKeysRequest):
        assert 1 <= len(request.key_ids) <= LIMITS.max_keys_per_request
        assert len(set(request.key_ids)) == len(request.key_ids)


@given(
    st.sampled_from(["GET", "POST", "PUT"]),
    st.sampled_from([ENC, DEC, "/api/v1/keys/sae-b/status"]),
    request_fields,
)
def test_parse_property_structured_bodies_never_escape_as_other_errors(
    method: str, target: str, fields: dict[str, object]
) -> None:
    _check_parse(method, target, json.dumps(fields).encode())


@given(st.binary(max_size=300), st.text(max_size=60))
def test_parse_property_arbitrary_bytes_and_targets(body: bytes, suffix: str) -> None:
    _check_parse("POST", ENC, body)
    _check_parse("POST", DEC, body)
    _check_parse("GET", "/api/v1/keys/" + suffix, b"")
    _check_parse("GET", ENC + "?" + suffix, b"")


@given(st.integers(1, 16), st.integers(1, 256).map(lambda n: 8 * n))
def test_parse_property_valid_requests_round_trip(number: int, size_bits: int) -> None:
    body = json.dumps({"number": number, "size": size_bits}).encode()
    parsed = parse_request("POST", ENC, body, LIMITS)
    assert parsed == EncKeysRequest(slave_sae="sae-b", number=number, size_bits=size_bits)


def test_authorize_checks_caller_and_the_peer_sae() -> None:
    local, peer = {"sae-a"}, {"sae-b"}
    authorize(StatusRequest(slave_sae="sae-b"), "sae-a", local_saes=local, peer_saes=peer)
    with pytest.raises(ApiError) as info:
        authorize(StatusRequest(slave_sae="sae-b"), "sae-x", local_saes=local, peer_saes=peer)
    assert info.value.status == 401
    with pytest.raises(ApiError) as info:
        authorize(
            EncKeysRequest(slave_sae="sae-a", number=1, size_bits=8),
            "sae-a",
            local_saes=local,
            peer_saes=peer,
        )
    assert info.value.status == 400
    with pytest.raises(ApiError) as info:
        authorize(
            DecKeysRequest(master_sae="sae-q", key_ids=()),
            "sae-a",
            local_saes=local,
            peer_saes=peer,
        )
    assert info.value.status == 400


def test_key_container_is_base64_with_uuid_strings() -> None:
    key_id = uuid.UUID(int=7)
    body = json.loads(key_container_body([(key_id, b"\x00\xffsecret")]))
    assert body == {
        "keys": [{"key_ID": str(key_id), "key": base64.b64encode(b"\x00\xffsecret").decode()}]
    }


# ---- fair use ---------------------------------------------------------------------------------


def test_token_bucket_limits_one_sae_without_touching_another() -> None:
    fair = FairUse(FairUsePolicy(keys_per_s=10.0, burst_keys=20.0, key_size_bits=256))
    fair.acquire("hog", 20.0, now=0.0)
    with pytest.raises(QuotaExceeded) as info:
        fair.acquire("hog", 1.0, now=0.0)
    assert info.value.retry_after_s == pytest.approx(0.1)
    fair.acquire("other", 20.0, now=0.0)  # its own bucket is full
    with pytest.raises(QuotaExceeded):
        fair.acquire("hog", 6.0, now=0.5)  # 5 tokens refilled, 6 asked: nothing taken
    fair.acquire("hog", 5.0, now=0.5)
    fair.refund("hog", 5.0, now=0.5)
    fair.acquire("hog", 5.0, now=0.5)
    fair.acquire("hog", 20.0, now=100.0)  # refill caps at the burst
    with pytest.raises(QuotaExceeded):
        fair.acquire("hog", 0.5, now=100.0)
    with pytest.raises(QuotaExceeded) as info:
        fair.acquire("other", 21.0, now=1000.0)
    assert info.value.retry_after_s == float("inf")
    assert fair.cost(number=3, size_bits=512) == 6.0


# ---- configuration ----------------------------------------------------------------------------


def _config_table(**overrides: object) -> dict[str, object]:
    table: dict[str, object] = {
        "listen": "127.0.0.1:8443",
        "certificate": "node.pem",
        "private_key": "node.key",
        "sae_ca": "ca.pem",
        "kme_id": "kme-alice",
        "peer_kme_id": "kme-bob",
        "local_saes": ["sae-a"],
        "peer_saes": ["sae-b"],
        "master_parity": 0,
    }
    table.update(overrides)
    return table


def test_config_reads_defaults_and_refuses_bad_values_naming_the_key() -> None:
    config = DeliveryConfig.from_table(Table(_config_table(), "delivery"))
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 8443)
    assert config.limits.key_size_bits == 256 and config.limits.max_key_size_bits == 2048
    assert config.unix_socket_path is None
    cases: list[tuple[dict[str, object], str]] = [
        ({"key_size_bits": 100}, "delivery.key_size_bits"),
        ({"master_parity": 2}, "delivery.master_parity"),
        ({"listen": "nohost"}, "delivery.listen"),
        ({"peer_saes": ["sae-a"]}, "delivery.peer_saes"),
        ({"unix_socket_path": "/tmp/x.sock"}, "delivery.unix_socket_sae"),
        ({"typo": 1}, "delivery.typo"),
        ({"request_timeout_s": 0}, "delivery.request_timeout_s"),
    ]
    for overrides, key in cases:
        with pytest.raises(ConfigError) as info:
            DeliveryConfig.from_table(Table(_config_table(**overrides), "delivery"))
        assert info.value.key == key
    missing = _config_table()
    del missing["sae_ca"]
    with pytest.raises(ConfigError, match=r"delivery\.sae_ca"):
        DeliveryConfig.from_table(Table(missing, "delivery"))


async def test_key_manager_releases_on_peer_failure_and_burns_what_the_peer_used(
    tmp_path: Path,
) -> None:
    blocks = random_blocks(16, count=1, keys_per_block=6)
    alice, bob = committed_stores(tmp_path, blocks)
    bob_manager = KeyManager(
        bob, master_parity=1, peer_reserve=_unused, local_saes={"b"}, peer_saes={"a"}
    )
    mode = {"value": "fail"}

    async def peer_reserve(keys: Sequence[DeliveryKey], m: str, s: str) -> None:
        await trio.lowlevel.checkpoint()
        wire = reservation_to_wire(keys, m, s)
        parsed, master, slave = reservation_from_wire(wire)
        if mode["value"] == "fail":
            raise OSError("channel down")
        await bob_manager.record_peer_reservation(parsed, master, slave)
        if mode["value"] == "lost-ack":
            raise TimeoutError("acknowledgement lost")

    manager = KeyManager(alice, master_parity=0, peer_reserve=peer_reserve)
    assert manager.stored_key_count() == 3
    with pytest.raises(ApiError) as info:
        await manager.enc_keys(master_sae="a", slave_sae="b", number=1, size_bits=256)
    assert info.value.status == 503
    assert manager.stored_key_count() == 3 and alice.counts().reserved == 0
    mode["value"] = "lost-ack"
    with pytest.raises(ApiError):
        await manager.enc_keys(master_sae="a", slave_sae="b", number=1, size_bits=256)
    assert manager.stored_key_count() == 3  # released here, but reserved at the peer
    assert bob.counts().reserved == 1  # the lost delivery key, recorded there
    mode["value"] = "ok"
    # the peer refuses the key it recorded for the lost delivery key and erases that record;
    # the key is erased here too, and the request gets the next key instead
    got = await manager.enc_keys(master_sae="a", slave_sae="b", number=1, size_bits=256)
    assert [m for _, m in got] == [blocks[0].consumer_keys[2][1]]
    assert manager.stored_key_count() == 1
    first_key = blocks[0].consumer_keys[0][0]
    for store in (alice, bob):
        state, material = store._query(
            "SELECT state, material FROM keys WHERE key_id = ?", (str(first_key),)
        )[0]
        assert (state, material) == ("delivered", None)
    assert (
        await bob_manager.dec_keys(slave_sae="b", master_sae="a", key_ids=[k for k, _ in got])
        == got
    )
    assert bob.counts().reserved == 0  # nothing kept for delivery keys nobody holds
    got = await manager.enc_keys(master_sae="a", slave_sae="b", number=1, size_bits=256)
    assert [m for _, m in got] == [blocks[0].consumer_keys[4][1]]
    with pytest.raises(ApiError) as info:
        await manager.enc_keys(master_sae="a", slave_sae="b", number=1, size_bits=256)
    assert info.value.status == 503 and "not enough key material" in info.value.message
    with pytest.raises(ProtocolError):
        await bob_manager.record_peer_reservation([], "x", "b")
    alice.close()
    bob.close()


async def _unused(keys: object, master_sae: str, slave_sae: str) -> None:
    raise AssertionError("not called")


def test_reservation_wire_form_round_trips_and_refuses_garbage() -> None:
    keys = [
        DeliveryKey(
            key_id=uuid.UUID(int=1),
            size_bits=384,
            parts=(
                KeyPart(key_id=uuid.UUID(int=2), offset_bytes=0, length_bytes=32),
                KeyPart(key_id=uuid.UUID(int=3), offset_bytes=0, length_bytes=16),
            ),
        )
    ]
    assert reservation_from_wire(reservation_to_wire(keys, "a", "b")) == (keys, "a", "b")
    good = reservation_to_wire(keys, "a", "b")
    for broken, field in [
        ({**good, "master_sae": 3}, "master_sae"),
        ({**good, "keys": []}, "keys"),
        (
            {**good, "keys": [{"id": b"x", "bits": 8, "parts": [[uuid.UUID(int=2).bytes, 0, 1]]}]},
            "keys[].id",
        ),
        (
            {
                **good,
                "keys": [
                    {
                        "id": uuid.UUID(int=1).bytes,
                        "bits": 8,
                        "parts": [[uuid.UUID(int=2).bytes, -1, 1]],
                    }
                ],
            },
            "keys[].parts[].offset",
        ),
        (
            {**good, "keys": [{"id": uuid.UUID(int=1).bytes, "bits": True, "parts": []}]},
            "keys[].bits",
        ),
    ]:
        with pytest.raises(ProtocolError) as info:
            reservation_from_wire(broken)
        assert info.value.field == field


def test_openapi_document_describes_every_served_operation_and_message() -> None:
    text = (Path(__file__).parent.parent / "docs" / "openapi.yaml").read_text()
    flat = " ".join(text.split())
    for needed in (
        "/{slave_SAE_ID}/status:",
        "/{slave_SAE_ID}/enc_keys:",
        "/{master_SAE_ID}/dec_keys:",
        "mutualTLS",
        MSG_SIZE_MULTIPLE,
        MSG_EXTENSION_UNSUPPORTED,
        MSG_KEYS_NOT_FOUND,
    ):
        assert needed in flat, needed
    served = status_body(
        source_kme_id="a",
        target_kme_id="b",
        master_sae="m",
        slave_sae="s",
        limits=LIMITS,
        stored_key_count=0,
        max_key_count=1,
        key_kind="qkd",
    )
    for name in json.loads(served):
        assert f"{name}:" in text, name
