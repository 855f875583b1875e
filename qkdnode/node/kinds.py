"""The node's application messages on the classical channel, and their strict schemas.

- Block data (``Data`` frames of an open block): a ``turn`` header announcing how many messages
  follow, then the post-processing messages of that turn (``qkdnode.postprocess.pipeline``).
- Coordination (``Control`` frames, outside blocks): limbo reconciliation at session start,
  the two-phase commit of each block, and key reservations for delivery.

``str`` fields of post-processing messages travel as UTF-8 ``bytes`` (the channel carries int,
float, bool and bytes only).
"""

from __future__ import annotations

import dataclasses
import struct
import typing
import uuid
from collections.abc import Iterable, Mapping
from typing import Final

from qkdnode.channel.messages import FieldSpec, KindRegistry
from qkdnode.errors import ProtocolError
from qkdnode.postprocess.pipeline import MESSAGE_TYPES, BlockMessage
from qkdnode.postprocess.wire import decode_block_message, encode_block_message

MAX_BLOB_BYTES: Final = 64 << 20
MAX_TURN_MESSAGES: Final = 16
MAX_LIMBO_BLOCKS: Final = 1024
MAX_KEYS_PER_BLOCK: Final = 1 << 20

Body = dict[str, int | float | bool | bytes]

_U64 = FieldSpec(kind="int", min_value=0, max_value=2**63 - 1)


def _ids(max_count: int) -> FieldSpec:
    return FieldSpec(kind="bytes", max_len=8 * max_count)


CONTROL_SCHEMAS: Final[dict[str, dict[str, FieldSpec]]] = {
    # session start: both sides resolve every block staged but not committed on either side
    "sync": {"staged": _ids(MAX_LIMBO_BLOCKS), "last_block_id": _U64},
    "sync_reply": {
        "staged": _ids(MAX_LIMBO_BLOCKS),
        "committed": _ids(MAX_LIMBO_BLOCKS),
        "last_block_id": _U64,
    },
    "sync_done": {"committed": _ids(MAX_LIMBO_BLOCKS)},
    # after a failed key-derived handshake Alice re-bootstraps and both reset their ledgers
    "ledger_reset": {},
    "ledger_reset_done": {},
    # two-phase commit of one block: Alice stages and proposes key IDs, Bob stages, both commit
    "stage": {
        "block_id": _U64,
        "key_ids": FieldSpec(kind="bytes", max_len=16 * MAX_KEYS_PER_BLOCK),
        "pool_bytes": _U64,
    },
    "staged": {"block_id": _U64},
    "commit": {"block_id": _U64},
    "committed": {"block_id": _U64},
    # delivery: the master side's node asks the peer to record a reservation durably;
    # ``reservation`` is msgpack of qkdnode.delivery.keys.reservation_to_wire
    "reserve": {
        "request_id": _U64,
        "reservation": FieldSpec(kind="bytes", min_len=1, max_len=1 << 20),
    },
    "reserve_result": {
        "request_id": _U64,
        "ok": FieldSpec(kind="bool"),
        "detail": FieldSpec(kind="bytes", max_len=512),
        "burned_key_ids": FieldSpec(kind="bytes", max_len=16 * 65536),
    },
}

_WIRE_KIND: Final = {int: "int", float: "float", bool: "bool", bytes: "bytes", str: "bytes"}


def make_registry() -> KindRegistry:
    """A registry with every node message kind (block data and coordination)."""
    registry = KindRegistry()
    # Alice's pulse range of the block: Bob takes the records of exactly these pulses
    registry.register("block_info", {"first_pulse_index": _U64, "pulse_count": _U64})
    registry.register(
        "turn", {"messages": FieldSpec(kind="int", min_value=1, max_value=MAX_TURN_MESSAGES)}
    )
    for kind, cls in MESSAGE_TYPES.items():
        hints = typing.get_type_hints(cls)
        schema = {
            field.name: FieldSpec(
                kind=_WIRE_KIND[hints[field.name]],
                max_len=MAX_BLOB_BYTES if hints[field.name] in (bytes, str) else None,
            )
            for field in dataclasses.fields(cls)
        }
        registry.register(kind, schema)
    for kind, schema in CONTROL_SCHEMAS.items():
        registry.register(kind, schema)
    return registry


def block_message_to_wire(message: BlockMessage) -> tuple[str, Body]:
    kind, body = encode_block_message(message)
    wire: Body = {}
    for name, value in body.items():
        wire[name] = value.encode("utf-8") if isinstance(value, str) else value  # type: ignore[assignment]
    return kind, wire


def block_message_from_wire(kind: str, body: Mapping[str, object]) -> BlockMessage:
    if kind not in MESSAGE_TYPES:
        raise ProtocolError("not a post-processing message", field="kind")
    hints = typing.get_type_hints(MESSAGE_TYPES[kind])
    values: dict[str, object] = {}
    for name, value in body.items():
        if hints.get(name) is str:
            if not isinstance(value, bytes):
                raise ProtocolError("expected UTF-8 bytes", field=f"{kind}.{name}")
            try:
                values[name] = value.decode("utf-8")
            except UnicodeDecodeError:
                raise ProtocolError("invalid UTF-8", field=f"{kind}.{name}") from None
        else:
            values[name] = value
    return decode_block_message(kind, values)


def pack_ids(ids: Iterable[int]) -> bytes:
    values = list(ids)
    return struct.pack(f"<{len(values)}Q", *values)


def unpack_ids(data: bytes, *, field: str) -> list[int]:
    if len(data) % 8:
        raise ProtocolError("length is not a multiple of 8", field=field)
    return list(struct.unpack(f"<{len(data) // 8}Q", data))


def pack_uuids(ids: Iterable[uuid.UUID]) -> bytes:
    return b"".join(key_id.bytes for key_id in ids)


def unpack_uuids(data: bytes, *, field: str) -> list[uuid.UUID]:
    if len(data) % 16:
        raise ProtocolError("length is not a multiple of 16", field=field)
    return [uuid.UUID(bytes=data[i : i + 16]) for i in range(0, len(data), 16)]
