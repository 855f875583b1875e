"""The two pad-fill messages (``qkdnode.relay.padwire``): their wire form through the node's own
channel registry and Control frames, and every strict refusal naming its field."""

from __future__ import annotations

import random
import uuid
from collections.abc import Mapping

import pytest

from qkdnode.channel.messages import Control, KindRegistry, decode_payload, encode_payload
from qkdnode.coordination.wire import make_registry
from qkdnode.errors import ProtocolError
from qkdnode.relay.messages import RELAY_SCHEMAS
from qkdnode.relay.padwire import (
    MAX_CHUNK_KEYS,
    PAD_ANSWER_KIND,
    PAD_OFFER_KIND,
    PAD_SCHEMAS,
    RELAY_CONTROL_KINDS,
    PadAnswer,
    PadAnswerOutcome,
    PadOffer,
    pad_from_wire,
    pad_to_wire,
    register_pad_kinds,
)

REGISTRY = make_registry()


def key_ids(rng: random.Random, count: int) -> tuple[uuid.UUID, ...]:
    return tuple(uuid.UUID(bytes=rng.randbytes(16), version=4) for _ in range(count))


def messages(seed: int) -> list[PadOffer | PadAnswer]:
    rng = random.Random(seed)
    return [
        PadOffer(index=0, bits=256, key_ids=key_ids(rng, 1)),
        PadOffer(index=7, bits=8, key_ids=key_ids(rng, 3)),
        PadOffer(index=2**62, bits=256 * MAX_CHUNK_KEYS, key_ids=key_ids(rng, MAX_CHUNK_KEYS)),
        *(PadAnswer(index=rng.randrange(2**40), outcome=outcome) for outcome in PadAnswerOutcome),
    ]


@pytest.mark.parametrize("message", messages(seed=11), ids=lambda m: type(m).__name__)
def test_round_trip_through_the_wire_form(message: PadOffer | PadAnswer) -> None:
    kind, body = pad_to_wire(message)
    assert kind == (PAD_OFFER_KIND if isinstance(message, PadOffer) else PAD_ANSWER_KIND)
    back = pad_from_wire(kind, body)
    assert back == message
    assert type(back) is type(message)


@pytest.mark.parametrize("message", messages(seed=12), ids=lambda m: type(m).__name__)
def test_round_trip_through_the_node_registry_and_a_control_frame(
    message: PadOffer | PadAnswer,
) -> None:
    kind, body = pad_to_wire(message)
    REGISTRY.check(kind, body)  # the channel's own schema check accepts it
    payload = encode_payload(Control(kind=kind, body=body), REGISTRY)
    received = decode_payload(Control, payload, REGISTRY)
    assert isinstance(received, Control)
    assert received.kind == kind
    assert pad_from_wire(received.kind, received.body) == message


def test_offer_key_ids_keep_their_order() -> None:
    ids = key_ids(random.Random(3), 5)
    _, body = pad_to_wire(PadOffer(index=1, bits=5 * 256, key_ids=ids))
    assert body["key_ids"] == b"".join(k.bytes for k in ids)
    back = pad_from_wire(PAD_OFFER_KIND, body)
    assert isinstance(back, PadOffer)
    assert back.key_ids == ids


def offer_body(**changes: object) -> dict[str, object]:
    ids = key_ids(random.Random(5), 2)
    body: dict[str, object] = {"index": 3, "bits": 512, "key_ids": b"".join(k.bytes for k in ids)}
    body.update(changes)
    return body


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (offer_body(key_ids=b"\x01" * 15), "key_ids"),
        (offer_body(key_ids=b"\x01" * 17), "key_ids"),
        (offer_body(key_ids=b"\x01" * 33), "key_ids"),
        (offer_body(key_ids=b""), "key_ids"),
        (offer_body(key_ids="not bytes"), "key_ids"),
        (offer_body(bits=513), "bits"),
        (offer_body(bits=4), "bits"),
        (offer_body(bits=True), "bits"),
        (offer_body(bits="512"), "bits"),
        (offer_body(index="3"), "index"),
        (offer_body(index=False), "index"),
        ({k: v for k, v in offer_body().items() if k != "index"}, "index"),
    ],
)
def test_pad_from_wire_refuses_a_bad_offer_naming_the_field(
    body: Mapping[str, object], field: str
) -> None:
    with pytest.raises(ProtocolError) as caught:
        pad_from_wire(PAD_OFFER_KIND, body)
    assert caught.value.field == field


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"index": 0, "outcome": 3}, "outcome"),
        ({"index": 0, "outcome": -1}, "outcome"),
        ({"index": 0, "outcome": 99}, "outcome"),
        ({"index": 0, "outcome": True}, "outcome"),
        ({"index": 0, "outcome": "taken"}, "outcome"),
        ({"index": 0}, "outcome"),
        ({"index": 1.0, "outcome": 0}, "index"),
    ],
)
def test_pad_from_wire_refuses_a_bad_answer_naming_the_field(
    body: Mapping[str, object], field: str
) -> None:
    with pytest.raises(ProtocolError) as caught:
        pad_from_wire(PAD_ANSWER_KIND, body)
    assert caught.value.field == field


@pytest.mark.parametrize("kind", ["relay_forward", "relay_pad", "control", ""])
def test_pad_from_wire_refuses_another_kind(kind: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        pad_from_wire(kind, {"index": 0, "outcome": 0})
    assert caught.value.field == "kind"


@pytest.mark.parametrize(
    ("kind", "body", "field"),
    [
        (PAD_OFFER_KIND, offer_body(key_ids=b"\x01" * 15), "body.key_ids"),
        (PAD_OFFER_KIND, offer_body(key_ids=b""), "body.key_ids"),
        (PAD_OFFER_KIND, offer_body(bits=0), "body.bits"),
        (PAD_OFFER_KIND, offer_body(index=-1), "body.index"),
        (PAD_OFFER_KIND, offer_body(index=2**62 + 1), "body.index"),
        (PAD_OFFER_KIND, offer_body(key_ids=b"\x01" * (16 * MAX_CHUNK_KEYS + 16)), "body.key_ids"),
        (PAD_ANSWER_KIND, {"index": 0, "outcome": 3}, "body.outcome"),
        (PAD_ANSWER_KIND, {"index": 0, "outcome": 0, "extra": 1}, "body.extra"),
    ],
)
def test_the_node_registry_refuses_out_of_range_bodies(
    kind: str, body: Mapping[str, object], field: str
) -> None:
    with pytest.raises(ProtocolError) as caught:
        REGISTRY.check(kind, body)
    assert caught.value.field is not None
    assert caught.value.field.startswith(field)


def test_relay_control_kinds_are_the_four_relay_kinds_and_the_two_pad_kinds() -> None:
    assert (
        frozenset(
            {
                "relay_forward",
                "relay_prepared",
                "relay_decide",
                "relay_outcome",
                PAD_OFFER_KIND,
                PAD_ANSWER_KIND,
            }
        )
        == RELAY_CONTROL_KINDS
    )
    assert frozenset(RELAY_SCHEMAS) | frozenset(PAD_SCHEMAS) == RELAY_CONTROL_KINDS
    for kind in RELAY_CONTROL_KINDS:
        assert kind in REGISTRY  # the node's registry carries every one


def test_register_pad_kinds_registers_exactly_the_two_pad_kinds() -> None:
    registry = KindRegistry()
    register_pad_kinds(registry)
    assert PAD_OFFER_KIND in registry
    assert PAD_ANSWER_KIND in registry
    assert "relay_forward" not in registry
    with pytest.raises(ValueError, match="already registered"):
        register_pad_kinds(registry)
