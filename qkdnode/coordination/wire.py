"""The node's application messages on the classical channel, typed, and their strict schemas.

- Block data (``Data`` frames of an open block): ``BlockInfo`` (Alice's pulse range), then turns:
  a ``TurnHeader`` announcing how many messages follow, then the post-processing messages of
  that turn (``qkdnode.postprocess.pipeline``).
- Coordination (``Control`` frames, outside blocks): limbo reconciliation at session start
  (``Sync``, ``SyncReply``, ``SyncDone``, ``LedgerReset``, ``LedgerResetDone``), the two-phase
  commit of each block (``Stage``, ``Staged``, ``Commit``, ``Committed``), key reservations
  for delivery (``Reserve``, ``ReserveResult``; the answer to a hybrid reservation travels as
  kind ``hybrid_reserve_result``, which only a node that sent one receives) and the head of the
  sender's audit trail after each commit (``AuditHead``; the session shell handles it, not the
  coordination machine).

``control_to_wire``/``control_from_wire`` and ``data_to_wire``/``data_from_wire`` convert between
the typed messages and the channel's ``(kind, body)``; the channel has checked the body against
the schema registered here before any of them runs. ``str`` fields travel as UTF-8 ``bytes``
(the channel carries int, float, bool and bytes only).
"""

from __future__ import annotations

import dataclasses
import struct
import typing
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from qkdnode.channel.messages import (
    MLKEM768_CIPHERTEXT_BYTES,
    Control,
    Data,
    FieldSpec,
    KindRegistry,
)
from qkdnode.errors import ProtocolError
from qkdnode.postprocess.block_messages import MESSAGE_TYPES, BlockMessage
from qkdnode.postprocess.wire import decode_block_message, encode_block_message
from qkdnode.relay.messages import register_relay_kinds
from qkdnode.relay.padwire import register_pad_kinds

MAX_BLOB_BYTES: Final = 64 << 20
MAX_TURN_MESSAGES: Final = 16
MAX_LIMBO_BLOCKS: Final = 1024
MAX_KEYS_PER_BLOCK: Final = 1 << 20

Body = dict[str, int | float | bool | bytes]

# Block and request ids are SQLite INTEGER primary keys: signed 64-bit.
MAX_ID: Final = 2**63 - 1
_ID = FieldSpec(kind="int", min_value=0, max_value=MAX_ID)


def _ids(max_count: int) -> FieldSpec:
    return FieldSpec(kind="bytes", max_len=8 * max_count)


_RESERVE_RESULT: Final = {
    "request_id": _ID,
    "ok": FieldSpec(kind="bool"),
    "detail": FieldSpec(kind="bytes", max_len=512),
    "burned_key_ids": FieldSpec(kind="bytes", max_len=16 * 65536),
}

CONTROL_SCHEMAS: Final[dict[str, dict[str, FieldSpec]]] = {
    # session start: both sides resolve every block staged but not committed on either side
    "sync": {"staged": _ids(MAX_LIMBO_BLOCKS), "last_block_id": _ID},
    "sync_reply": {
        "staged": _ids(MAX_LIMBO_BLOCKS),
        "committed": _ids(MAX_LIMBO_BLOCKS),
        "last_block_id": _ID,
    },
    "sync_done": {"committed": _ids(MAX_LIMBO_BLOCKS)},
    # after a failed key-derived handshake Alice re-bootstraps and both reset their ledgers
    "ledger_reset": {},
    "ledger_reset_done": {},
    # two-phase commit of one block: Alice stages and proposes key IDs, Bob stages, both commit
    "stage": {
        "block_id": _ID,
        "key_ids": FieldSpec(kind="bytes", max_len=16 * MAX_KEYS_PER_BLOCK),
        "pool_bytes": _ID,
    },
    "staged": {"block_id": _ID},
    "commit": {"block_id": _ID},
    "committed": {"block_id": _ID},
    # delivery: the master side's node asks the peer to record a reservation durably;
    # ``reservation`` is msgpack of qkdnode.delivery.keys.reservation_to_wire
    "reserve": {
        "request_id": _ID,
        "reservation": FieldSpec(kind="bytes", min_len=1, max_len=1 << 20),
    },
    "reserve_result": _RESERVE_RESULT,
    # the peer recorded a hybrid reservation (format 2): its ML-KEM-768 ciphertext for the
    # master's encapsulation key and the key confirmation (qkdnode.delivery.hybrid)
    "hybrid_reserve_result": {
        **_RESERVE_RESULT,
        "mlkem_ciphertext": FieldSpec(
            kind="bytes", min_len=MLKEM768_CIPHERTEXT_BYTES, max_len=MLKEM768_CIPHERTEXT_BYTES
        ),
        "mlkem_confirmation": FieldSpec(kind="bytes", min_len=32, max_len=32),
    },
    # the sender's audit trail after entry ``seq`` has chain hash ``chain_hash`` (qkdnode.audit)
    "audit_head": {"seq": _ID, "chain_hash": FieldSpec(kind="bytes", min_len=32, max_len=32)},
}

_WIRE_KIND: Final = {int: "int", float: "float", bool: "bool", bytes: "bytes", str: "bytes"}


def make_registry() -> KindRegistry:
    """A registry with every node message kind (block data and coordination)."""
    registry = KindRegistry()
    # Alice's pulse range of the block: Bob takes the records of exactly these pulses
    registry.register("block_info", {"first_pulse_index": _ID, "pulse_count": _ID})
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
    # key relay (qkdnode.relay): its four messages and the pad fill, on the same session
    register_relay_kinds(registry)
    register_pad_kinds(registry)
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


# ---- typed coordination messages --------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Sync:
    """Alice, at session start: her staged (limbo) blocks and her highest block id."""

    staged: tuple[int, ...]
    last_block_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncReply:
    """Bob: his staged blocks, which of Alice's staged blocks he committed, his highest id."""

    staged: tuple[int, ...]
    committed: tuple[int, ...]
    last_block_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncDone:
    """Alice: which of Bob's staged blocks she committed."""

    committed: tuple[int, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerReset:
    """Alice asks Bob to reset the authentication-key ledger (bootstrap sessions only)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerResetDone:
    """Bob has reset his ledger."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Stage:
    """Alice has staged ``block_id`` durably with these consumer key IDs and pool share."""

    block_id: int
    key_ids: tuple[uuid.UUID, ...]
    pool_bytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Staged:
    block_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Commit:
    block_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Committed:
    block_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Reserve:
    """The master side's node asks the peer to record a reservation durably; ``reservation``
    is msgpack of ``qkdnode.delivery.keys.reservation_to_wire``."""

    request_id: int
    reservation: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class ReserveResult:
    """The peer's answer to a Reserve; the ML-KEM fields are set (and the kind on the wire is
    ``hybrid_reserve_result``) only when it recorded a hybrid reservation."""

    request_id: int
    ok: bool
    detail: str
    burned_key_ids: tuple[uuid.UUID, ...]
    mlkem_ciphertext: bytes = b""
    mlkem_confirmation: bytes = b""

    def __repr__(self) -> str:  # the ML-KEM fields are public, but long
        return (
            f"ReserveResult(request_id={self.request_id}, ok={self.ok}, detail={self.detail!r},"
            f" burned_key_ids={len(self.burned_key_ids)}, hybrid={bool(self.mlkem_ciphertext)})"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditHead:
    """The head of the sender's audit trail, sent after each commit: the receiver keeps the
    last one, so a trail later cut or rolled back on the sender's disk is caught."""

    seq: int
    chain_hash: bytes


CoordinationMessage = (
    Sync
    | SyncReply
    | SyncDone
    | LedgerReset
    | LedgerResetDone
    | Stage
    | Staged
    | Commit
    | Committed
    | Reserve
    | ReserveResult
    | AuditHead
)


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockInfo:
    """Alice's pulse range of the block: Bob takes the records of exactly these pulses."""

    first_pulse_index: int
    pulse_count: int


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnHeader:
    """A turn of the post-processing exchange: ``messages`` block messages follow."""

    messages: int


BlockData = BlockInfo | TurnHeader | BlockMessage


def _int(body: Mapping[str, object], name: str) -> int:
    value = body[name]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError("expected an integer", field=name)
    return value


def _blob(body: Mapping[str, object], name: str) -> bytes:
    value = body[name]
    if not isinstance(value, bytes):
        raise ProtocolError("expected bytes", field=name)
    return value


def control_to_wire(message: CoordinationMessage) -> tuple[str, Body]:
    """The channel's ``(kind, body)`` of a coordination message."""
    match message:
        case Sync(staged=staged, last_block_id=last):
            return "sync", {"staged": pack_ids(staged), "last_block_id": last}
        case SyncReply(staged=staged, committed=committed, last_block_id=last):
            return "sync_reply", {
                "staged": pack_ids(staged),
                "committed": pack_ids(committed),
                "last_block_id": last,
            }
        case SyncDone(committed=committed):
            return "sync_done", {"committed": pack_ids(committed)}
        case LedgerReset():
            return "ledger_reset", {}
        case LedgerResetDone():
            return "ledger_reset_done", {}
        case Stage(block_id=block_id, key_ids=key_ids, pool_bytes=pool_bytes):
            return "stage", {
                "block_id": block_id,
                "key_ids": pack_uuids(key_ids),
                "pool_bytes": pool_bytes,
            }
        case Staged(block_id=block_id):
            return "staged", {"block_id": block_id}
        case Commit(block_id=block_id):
            return "commit", {"block_id": block_id}
        case Committed(block_id=block_id):
            return "committed", {"block_id": block_id}
        case Reserve(request_id=request_id, reservation=reservation):
            return "reserve", {"request_id": request_id, "reservation": reservation}
        case ReserveResult(request_id=request_id, ok=ok, detail=detail, burned_key_ids=burned):
            body: Body = {
                "request_id": request_id,
                "ok": ok,
                "detail": detail.encode()[:512],
                "burned_key_ids": pack_uuids(burned),
            }
            if not message.mlkem_ciphertext:
                return "reserve_result", body
            body["mlkem_ciphertext"] = message.mlkem_ciphertext
            body["mlkem_confirmation"] = message.mlkem_confirmation
            return "hybrid_reserve_result", body
        case AuditHead(seq=seq, chain_hash=head):
            return "audit_head", {"seq": seq, "chain_hash": head}
    raise TypeError(f"not a coordination message: {type(message).__name__}")


def control_from_wire(control: Control) -> CoordinationMessage:
    """The typed message of a ``Control`` frame (its body already passed the schema)."""
    body, kind = control.body, control.kind
    match kind:
        case "sync":
            return Sync(
                staged=tuple(unpack_ids(_blob(body, "staged"), field="staged")),
                last_block_id=_int(body, "last_block_id"),
            )
        case "sync_reply":
            return SyncReply(
                staged=tuple(unpack_ids(_blob(body, "staged"), field="staged")),
                committed=tuple(unpack_ids(_blob(body, "committed"), field="committed")),
                last_block_id=_int(body, "last_block_id"),
            )
        case "sync_done":
            return SyncDone(
                committed=tuple(unpack_ids(_blob(body, "committed"), field="committed"))
            )
        case "ledger_reset":
            return LedgerReset()
        case "ledger_reset_done":
            return LedgerResetDone()
        case "stage":
            return Stage(
                block_id=_int(body, "block_id"),
                key_ids=tuple(unpack_uuids(_blob(body, "key_ids"), field="key_ids")),
                pool_bytes=_int(body, "pool_bytes"),
            )
        case "staged":
            return Staged(block_id=_int(body, "block_id"))
        case "commit":
            return Commit(block_id=_int(body, "block_id"))
        case "committed":
            return Committed(block_id=_int(body, "block_id"))
        case "reserve":
            return Reserve(
                request_id=_int(body, "request_id"), reservation=_blob(body, "reservation")
            )
        case "reserve_result" | "hybrid_reserve_result":
            ok = body["ok"]
            if not isinstance(ok, bool):
                raise ProtocolError("expected a bool", field="ok")
            hybrid = kind == "hybrid_reserve_result"
            return ReserveResult(
                request_id=_int(body, "request_id"),
                ok=ok,
                detail=_blob(body, "detail").decode("utf-8", "replace"),
                burned_key_ids=tuple(
                    unpack_uuids(_blob(body, "burned_key_ids"), field="burned_key_ids")
                ),
                mlkem_ciphertext=_blob(body, "mlkem_ciphertext") if hybrid else b"",
                mlkem_confirmation=_blob(body, "mlkem_confirmation") if hybrid else b"",
            )
        case "audit_head":
            return AuditHead(seq=_int(body, "seq"), chain_hash=_blob(body, "chain_hash"))
    raise ProtocolError(f"not a coordination message: {kind!r}", field="kind")


def data_to_wire(message: BlockData) -> tuple[str, Body]:
    """The channel's ``(kind, body)`` of a block-data message."""
    if isinstance(message, BlockInfo):
        return "block_info", {
            "first_pulse_index": message.first_pulse_index,
            "pulse_count": message.pulse_count,
        }
    if isinstance(message, TurnHeader):
        return "turn", {"messages": message.messages}
    return block_message_to_wire(message)


def data_from_wire(data: Data) -> BlockData:
    """The typed message of a ``Data`` frame (its body already passed the schema)."""
    if data.kind == "block_info":
        return BlockInfo(
            first_pulse_index=_int(data.body, "first_pulse_index"),
            pulse_count=_int(data.body, "pulse_count"),
        )
    if data.kind == "turn":
        return TurnHeader(messages=_int(data.body, "messages"))
    return block_message_from_wire(data.kind, data.body)
