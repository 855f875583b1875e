"""The relay messages: round trips, strict decoding of every malformed form, no secret in a repr."""

from __future__ import annotations

import random
import uuid
from typing import Any

import msgpack
import pytest

from qkdnode.channel.messages import KindRegistry
from qkdnode.errors import ProtocolError
from qkdnode.relay.messages import (
    MAX_KEY_BITS,
    RELAY_SCHEMAS,
    Decide,
    Forward,
    Outcome,
    Prepared,
    RelayMessage,
    decode_message,
    encode_message,
    message_from_wire,
    message_to_wire,
    payload_bits,
    register_relay_kinds,
)

KEY_ID = uuid.UUID(int=0x1234_5678_9ABC_DEF0_1234_5678_9ABC_DEF0, version=4)
ROUTE = ("A", "R", "C")
SECRET = bytes(range(1, 161))  # 1024 + 256 bits: a recognisable "ciphertext"


def _messages() -> list[RelayMessage]:
    return [
        Forward(
            key_id=KEY_ID,
            route=ROUTE,
            master_sae_id="sae-a",
            slave_sae_id="sae-c",
            key_bits=1024,
            pad_offset_bits=8 * 77,
            ciphertext=SECRET,
        ),
        Prepared(key_id=KEY_ID, route=ROUTE, tag=SECRET[:16]),
        Decide(key_id=KEY_ID, route=ROUTE, commit=True),
        Decide(key_id=KEY_ID, route=ROUTE, commit=False),
        Outcome(key_id=KEY_ID, route=ROUTE, committed=True),
        Outcome(key_id=KEY_ID, route=ROUTE, committed=False, reason="refusé: no pad"),
    ]


@pytest.mark.parametrize("message", _messages(), ids=lambda m: type(m).__name__)
def test_every_message_round_trips_through_both_wire_forms(message: RelayMessage) -> None:
    assert decode_message(encode_message(message)) == message
    kind, body = message_to_wire(message)
    assert message_from_wire(kind, body) == message
    registry = KindRegistry()
    register_relay_kinds(registry)
    registry.check(kind, body)  # the channel's own schema check accepts it


def test_the_payload_is_the_key_and_the_confirmation_key() -> None:
    assert payload_bits(1024) == 1024 + 256


@pytest.mark.parametrize("message", _messages()[:2], ids=lambda m: type(m).__name__)
def test_no_ciphertext_or_tag_in_a_repr(message: RelayMessage) -> None:
    text = repr(message) + str(message)
    for window in range(0, len(SECRET) - 4):
        chunk = SECRET[window : window + 4]
        assert chunk.hex() not in text and repr(chunk) not in text


def _body(kind: str) -> dict[str, Any]:
    message = next(m for m in _messages() if message_to_wire(m)[0] == kind)
    return dict(message_to_wire(message)[1])


def _malformed() -> list[tuple[str, str, dict[str, Any]]]:
    cases: list[tuple[str, str, dict[str, Any]]] = []
    for kind, schema in RELAY_SCHEMAS.items():
        for name in schema:
            body = _body(kind)
            del body[name]
            cases.append((f"{kind} without {name}", kind, body))
            body = _body(kind)
            body[name] = 1.5  # floats are never valid
            cases.append((f"{kind} {name} float", kind, body))
        body = _body(kind)
        body["extra"] = 1
        cases.append((f"{kind} extra field", kind, body))
        for route in (b"A", b"A/A/C", b"A//C", b"A/R/C/" + b"/".join(b"x%d" % i for i in range(9))):
            body = _body(kind)
            body["route"] = route
            cases.append((f"{kind} route {route[:12]!r}", kind, body))
        body = _body(kind)
        body["route"] = "A/R/\xe9".encode()
        cases.append((f"{kind} route not ASCII", kind, body))
        body = _body(kind)
        body["key_id"] = bytes(15)
        cases.append((f"{kind} short key id", kind, body))
    body = _body("relay_forward")
    body["ciphertext"] = SECRET[:-1]
    cases.append(("forward ciphertext one byte short", "relay_forward", body))
    body = _body("relay_forward")
    body["key_bits"] = 1020
    cases.append(("forward key bits not whole bytes", "relay_forward", body))
    body = _body("relay_forward")
    body["key_bits"] = MAX_KEY_BITS + 8
    cases.append(("forward key bits over the limit", "relay_forward", body))
    body = _body("relay_forward")
    body["pad_offset_bits"] = 3
    cases.append(("forward pad offset not whole bytes", "relay_forward", body))
    body = _body("relay_forward")
    body["pad_offset_bits"] = -8
    cases.append(("forward negative pad offset", "relay_forward", body))
    body = _body("relay_forward")
    body["slave_sae_id"] = b"\xff\xfe"
    cases.append(("forward SAE ID not UTF-8", "relay_forward", body))
    body = _body("relay_forward")
    body["master_sae_id"] = b"sae\nx"
    cases.append(("forward SAE ID not printable", "relay_forward", body))
    body = _body("relay_prepared")
    body["tag"] = bytes(17)
    cases.append(("prepared long tag", "relay_prepared", body))
    body = _body("relay_decide")
    body["commit"] = 1
    cases.append(("decide commit as int", "relay_decide", body))
    body = _body("relay_outcome")
    body["committed"] = True
    body["reason"] = b"but a reason"
    cases.append(("committed outcome with a reason", "relay_outcome", body))
    cases.append(("unknown kind", "relay_teleport", {}))
    return cases


@pytest.mark.parametrize(("name", "kind", "body"), _malformed(), ids=lambda v: str(v)[:40])
def test_every_malformed_body_is_refused_with_a_protocol_error(
    name: str, kind: str, body: dict[str, Any]
) -> None:
    with pytest.raises(ProtocolError):
        message_from_wire(kind, body)
    with pytest.raises(ProtocolError):
        decode_message(msgpack.packb([kind, body], use_bin_type=True))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        msgpack.packb(["relay_decide"]),
        msgpack.packb(["relay_decide", {}, 1]),
        msgpack.packb({"kind": "relay_decide"}),
        msgpack.packb([1, {}]),
        msgpack.packb(["relay_decide", []]),
        msgpack.packb(["relay_decide", {1: 2}]),
        msgpack.packb([None] * 100_000),
        bytes(200_000),
    ],
    ids=range(10),
)
def test_undecodable_or_oversized_data_is_refused(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_message(data)


def test_random_bytes_and_bit_flips_never_escape_as_anything_but_protocol_errors() -> None:
    rng = random.Random(19)
    encoded = [encode_message(m) for m in _messages()]
    decoded = 0
    for _ in range(3000):
        data = bytearray(rng.choice(encoded))
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        try:
            decode_message(bytes(data))
            decoded += 1
        except ProtocolError:
            pass
    assert 0 < decoded < 3000  # some flips hit a value only, most break the form


def test_constructing_a_bad_message_raises_naming_the_field() -> None:
    with pytest.raises(ProtocolError, match="route"):
        Decide(key_id=KEY_ID, route=("A",), commit=True)
    with pytest.raises(ProtocolError, match="ciphertext"):
        Forward(
            key_id=KEY_ID,
            route=ROUTE,
            master_sae_id="a",
            slave_sae_id="c",
            key_bits=64,
            pad_offset_bits=0,
            ciphertext=b"short",
        )
