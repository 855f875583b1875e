"""The relay messages between neighbouring nodes, typed, and their strict wire forms.

A relay of key ID ``key_id`` along ``route`` (node names, origin first) exchanges four messages,
each between two neighbours on the route:

- ``Forward`` (downstream): the payload (key, then the 256-bit confirmation key) one-time-pad
  encrypted under the hop's pad bits ``[pad_offset_bits, pad_offset_bits + payload_bits)``;
- ``Prepared`` (upstream): the terminal's confirmation tag;
- ``Decide`` (downstream): the origin's decision, commit or abort;
- ``Outcome`` (upstream): the relay is finished downstream, committed or not (also a refusal).

Every message is frozen, slotted and keyword-only, and checks itself at construction (a bad
value raises ``ProtocolError`` naming the field). ``message_to_wire`` / ``message_from_wire``
convert to the channel's ``(kind, body)`` (bodies of int, bool and bytes, checked against
``RELAY_SCHEMAS`` first); ``encode_message`` / ``decode_message`` are a standalone msgpack
form of the same, for the simulation and tests. Only ``ProtocolError`` escapes decoding.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import msgpack

from qkdnode.channel.messages import FieldSpec, KindRegistry
from qkdnode.config.relay import MAX_NODE_NAME_CHARS, MAX_ROUTE_NODES, is_node_name
from qkdnode.errors import ProtocolError

CONFIRMATION_KEY_BITS: Final = 256  # a 128-bit polynomial-hash key, then a 128-bit mask
TAG_BYTES: Final = 16
MIN_KEY_BITS: Final = 64
MAX_KEY_BITS: Final = 65_536
MAX_SAE_ID_CHARS: Final = 128
MAX_REASON_CHARS: Final = 200
MAX_PAD_OFFSET_BITS: Final = 2**63 - 1
_ROUTE_SEPARATOR: Final = "/"
_MAX_PAYLOAD_BYTES: Final = (MAX_KEY_BITS + CONFIRMATION_KEY_BITS) // 8


def payload_bits(key_bits: int) -> int:
    """The relayed bits of a key of ``key_bits``: the key and its confirmation key."""
    return key_bits + CONFIRMATION_KEY_BITS


def check_node_name(name: object, field: str = "route") -> None:
    """Raise ``ProtocolError`` unless ``name`` is 1..32 characters of [A-Za-z0-9._-]."""
    if type(name) is not str or not 1 <= len(name) <= MAX_NODE_NAME_CHARS:
        raise ProtocolError(f"a node name is 1..{MAX_NODE_NAME_CHARS} characters", field=field)
    if not is_node_name(name):
        raise ProtocolError("a node name is made of letters, digits, '.', '-', '_'", field=field)


def check_route(route: object) -> None:
    """Raise ``ProtocolError`` unless ``route`` is 2..8 distinct node names."""
    if type(route) is not tuple or not 2 <= len(route) <= MAX_ROUTE_NODES:
        raise ProtocolError(f"a route names 2..{MAX_ROUTE_NODES} nodes", field="route")
    for name in route:
        check_node_name(name)
    if len(set(route)) != len(route):
        raise ProtocolError("a route names each node once", field="route")


def check_key_bits(key_bits: object) -> None:
    if type(key_bits) is not int or not MIN_KEY_BITS <= key_bits <= MAX_KEY_BITS:
        raise ProtocolError(f"must be in {MIN_KEY_BITS}..{MAX_KEY_BITS}", field="key_bits")
    if key_bits % 8:
        raise ProtocolError("must be a multiple of 8", field="key_bits")


def _check_key_id(key_id: object) -> None:
    if type(key_id) is not uuid.UUID:
        raise ProtocolError("must be a UUID", field="key_id")


def _check_text(value: object, field: str, max_chars: int, *, min_chars: int = 1) -> None:
    if type(value) is not str or not min_chars <= len(value) <= max_chars:
        raise ProtocolError(f"must be {min_chars}..{max_chars} characters", field=field)
    if not value.isprintable():
        raise ProtocolError("must be printable", field=field)


@dataclass(frozen=True, slots=True, kw_only=True)
class Forward:
    """Downstream: the payload of relay ``key_id`` encrypted under the hop's pad range."""

    key_id: uuid.UUID
    route: tuple[str, ...]
    master_sae_id: str
    slave_sae_id: str
    key_bits: int
    pad_offset_bits: int
    ciphertext: bytes

    def __post_init__(self) -> None:
        _check_key_id(self.key_id)
        check_route(self.route)
        _check_text(self.master_sae_id, "master_sae_id", MAX_SAE_ID_CHARS)
        _check_text(self.slave_sae_id, "slave_sae_id", MAX_SAE_ID_CHARS)
        check_key_bits(self.key_bits)
        offset = self.pad_offset_bits
        if type(offset) is not int or not 0 <= offset <= MAX_PAD_OFFSET_BITS or offset % 8:
            raise ProtocolError("must be a non-negative multiple of 8", field="pad_offset_bits")
        if type(self.ciphertext) is not bytes or 8 * len(self.ciphertext) != self.payload_bits:
            raise ProtocolError("must hold exactly the payload's bits", field="ciphertext")

    @property
    def payload_bits(self) -> int:
        return payload_bits(self.key_bits)

    def __repr__(self) -> str:
        return (
            f"Forward(key_id={self.key_id}, route={'/'.join(self.route)}, "
            f"key_bits={self.key_bits}, pad_offset_bits={self.pad_offset_bits})"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Prepared:
    """Upstream: the terminal holds the key durably; its confirmation tag."""

    key_id: uuid.UUID
    route: tuple[str, ...]
    tag: bytes

    def __post_init__(self) -> None:
        _check_key_id(self.key_id)
        check_route(self.route)
        if type(self.tag) is not bytes or len(self.tag) != TAG_BYTES:
            raise ProtocolError(f"must be {TAG_BYTES} bytes", field="tag")

    def __repr__(self) -> str:
        return f"Prepared(key_id={self.key_id}, route={'/'.join(self.route)})"


@dataclass(frozen=True, slots=True, kw_only=True)
class Decide:
    """Downstream: the origin's stored decision."""

    key_id: uuid.UUID
    route: tuple[str, ...]
    commit: bool

    def __post_init__(self) -> None:
        _check_key_id(self.key_id)
        check_route(self.route)
        if type(self.commit) is not bool:
            raise ProtocolError("must be a bool", field="commit")

    def __repr__(self) -> str:
        return f"Decide(key_id={self.key_id}, route={'/'.join(self.route)}, commit={self.commit})"


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """Upstream: the relay is finished at the sender and beyond it (``reason`` says why not
    committed; empty when committed)."""

    key_id: uuid.UUID
    route: tuple[str, ...]
    committed: bool
    reason: str = ""

    def __post_init__(self) -> None:
        _check_key_id(self.key_id)
        check_route(self.route)
        if type(self.committed) is not bool:
            raise ProtocolError("must be a bool", field="committed")
        _check_text(self.reason, "reason", MAX_REASON_CHARS, min_chars=0)
        if self.committed and self.reason:
            raise ProtocolError("a committed outcome has no reason", field="reason")

    def __repr__(self) -> str:
        return (
            f"Outcome(key_id={self.key_id}, route={'/'.join(self.route)}, "
            f"committed={self.committed}, reason={self.reason!r})"
        )


RelayMessage = Forward | Prepared | Decide | Outcome


# ---- wire forms --------------------------------------------------------------------------------

Body = dict[str, int | bool | bytes]

_KEY_ID: Final = FieldSpec(kind="bytes", min_len=16, max_len=16)
_ROUTE: Final = FieldSpec(
    kind="bytes", min_len=3, max_len=MAX_ROUTE_NODES * (MAX_NODE_NAME_CHARS + 1)
)

RELAY_SCHEMAS: Final[dict[str, dict[str, FieldSpec]]] = {
    "relay_forward": {
        "key_id": _KEY_ID,
        "route": _ROUTE,
        "master_sae_id": FieldSpec(kind="bytes", min_len=1, max_len=4 * MAX_SAE_ID_CHARS),
        "slave_sae_id": FieldSpec(kind="bytes", min_len=1, max_len=4 * MAX_SAE_ID_CHARS),
        "key_bits": FieldSpec(kind="int", min_value=MIN_KEY_BITS, max_value=MAX_KEY_BITS),
        "pad_offset_bits": FieldSpec(kind="int", min_value=0, max_value=MAX_PAD_OFFSET_BITS),
        "ciphertext": FieldSpec(kind="bytes", min_len=1, max_len=_MAX_PAYLOAD_BYTES),
    },
    "relay_prepared": {
        "key_id": _KEY_ID,
        "route": _ROUTE,
        "tag": FieldSpec(kind="bytes", min_len=TAG_BYTES, max_len=TAG_BYTES),
    },
    "relay_decide": {"key_id": _KEY_ID, "route": _ROUTE, "commit": FieldSpec(kind="bool")},
    "relay_outcome": {
        "key_id": _KEY_ID,
        "route": _ROUTE,
        "committed": FieldSpec(kind="bool"),
        "reason": FieldSpec(kind="bytes", max_len=4 * MAX_REASON_CHARS),
    },
}

_KINDS: Final[dict[type, str]] = {
    Forward: "relay_forward",
    Prepared: "relay_prepared",
    Decide: "relay_decide",
    Outcome: "relay_outcome",
}


def register_relay_kinds(registry: KindRegistry) -> None:
    """Register the four relay kinds in a link's registry (``Control`` frames)."""
    for kind, schema in RELAY_SCHEMAS.items():
        registry.register(kind, schema)


def message_to_wire(message: RelayMessage) -> tuple[str, Body]:
    """The channel's ``(kind, body)`` of a relay message."""
    body: Body = {"key_id": message.key_id.bytes, "route": _route_to_wire(message.route)}
    match message:
        case Forward():
            body["master_sae_id"] = message.master_sae_id.encode("utf-8")
            body["slave_sae_id"] = message.slave_sae_id.encode("utf-8")
            body["key_bits"] = message.key_bits
            body["pad_offset_bits"] = message.pad_offset_bits
            body["ciphertext"] = message.ciphertext
        case Prepared():
            body["tag"] = message.tag
        case Decide():
            body["commit"] = message.commit
        case Outcome():
            body["committed"] = message.committed
            body["reason"] = message.reason.encode("utf-8")
    return _KINDS[type(message)], body


def message_from_wire(kind: str, body: Mapping[str, object]) -> RelayMessage:
    """The relay message of a ``(kind, body)``; ``ProtocolError`` unless it fits its schema."""
    schema = RELAY_SCHEMAS.get(kind)
    if schema is None:
        raise ProtocolError("unknown relay message kind", field="kind")
    if set(body) != set(schema):
        missing = sorted(set(schema) - set(body))
        extra = sorted(str(name) for name in set(body) - set(schema))
        raise ProtocolError(
            "missing field" if missing else "unexpected field",
            field=f"body.{missing[0] if missing else extra[0]}",
        )
    for name, spec in schema.items():
        spec.check(f"body.{name}", body[name])
    values = dict(body)
    key_id = uuid.UUID(bytes=_bytes(values, "key_id"))
    route = _route_from_wire(_bytes(values, "route"))
    if kind == "relay_forward":
        return Forward(
            key_id=key_id,
            route=route,
            master_sae_id=_text(values, "master_sae_id"),
            slave_sae_id=_text(values, "slave_sae_id"),
            key_bits=_int(values, "key_bits"),
            pad_offset_bits=_int(values, "pad_offset_bits"),
            ciphertext=_bytes(values, "ciphertext"),
        )
    if kind == "relay_prepared":
        return Prepared(key_id=key_id, route=route, tag=_bytes(values, "tag"))
    if kind == "relay_decide":
        return Decide(key_id=key_id, route=route, commit=values["commit"] is True)
    return Outcome(
        key_id=key_id,
        route=route,
        committed=values["committed"] is True,
        reason=_text(values, "reason"),
    )


def encode_message(message: RelayMessage) -> bytes:
    """A standalone msgpack form: ``[kind, body]``."""
    kind, body = message_to_wire(message)
    packed: bytes = msgpack.packb([kind, body], use_bin_type=True)
    return packed


def decode_message(data: bytes) -> RelayMessage:
    """Parse ``encode_message``'s form strictly; only ``ProtocolError`` escapes."""
    if len(data) > _MAX_PAYLOAD_BYTES + 4096:
        raise ProtocolError("message too long", field="payload")
    try:
        values = msgpack.unpackb(
            data,
            raw=False,
            use_list=False,
            strict_map_key=True,
            max_array_len=2,
            max_map_len=max(len(schema) for schema in RELAY_SCHEMAS.values()) + 1,
        )
    except (ValueError, TypeError, msgpack.UnpackException, msgpack.ExtraData) as exc:
        raise ProtocolError(
            f"undecodable msgpack ({type(exc).__name__})", field="payload"
        ) from None
    if type(values) is not tuple or len(values) != 2:
        raise ProtocolError("a relay message is [kind, body]", field="payload")
    kind, body = values
    if type(kind) is not str or type(body) is not dict:
        raise ProtocolError("a relay message is [kind, body]", field="payload")
    return message_from_wire(kind, body)


def _route_to_wire(route: tuple[str, ...]) -> bytes:
    return _ROUTE_SEPARATOR.join(route).encode("ascii")


def _route_from_wire(raw: bytes) -> tuple[str, ...]:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("must be ASCII", field="route") from None
    route = tuple(text.split(_ROUTE_SEPARATOR))
    check_route(route)
    return route


def _bytes(values: Mapping[str, object], name: str) -> bytes:
    value = values[name]
    assert type(value) is bytes  # checked against the schema
    return value


def _int(values: Mapping[str, object], name: str) -> int:
    value = values[name]
    assert type(value) is int  # checked against the schema
    return value


def _text(values: Mapping[str, object], name: str) -> str:
    try:
        return _bytes(values, name).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("must be UTF-8", field=name) from None
