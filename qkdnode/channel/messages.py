"""Wire messages of the classical channel: one frozen, slotted, keyword-only dataclass per type.

Every message has a fixed one-byte type code and a strict schema: the payload is a msgpack map
whose key set must equal the dataclass fields exactly, with each value of one exact type and
within its range or length. ``decode_payload`` checks all of it and raises
``ProtocolError(field=...)`` naming the first offending field; no other exception escapes.

Application data travels in ``Data`` frames: ``(block_id, kind, body)`` where ``kind`` comes from
a ``KindRegistry`` the node fills in (the post-processing messages: sifting, estimation, Cascade
queries and answers, verification tags, Toeplitz seed) and ``body`` maps field names to
int/float/bool/bytes values checked against the registered schema.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Final

import msgpack

from qkdnode.errors import ProtocolError

# The channel protocol version, sent in the Hello; it names what both nodes must compute alike
# (``PROTOCOL_VERSIONS``), so peers that differ refuse each other by name.
PROTOCOL_VERSION: Final = 6
# the body of a Control frame, checked against its kind's schema
ControlBody = Mapping[str, int | float | bool | bytes]
BLOCK_TAG_FAMILIES: Final = {
    3: "gf128-polyhash-v1",
    4: "poly1305-v1",
    5: "poly1305-v1",
    6: "poly1305-v1",
}
CASCADE_PERMUTATIONS: Final = {3: "v2", 4: "v2", 5: "v3", 6: "v3"}  # ``cascade.permutation``'s
# what Bob reports when Cascade ends (``postprocess.block_messages.ReconciliationDone``)
RECONCILIATION_REPORTS: Final = {
    3: "error count",
    4: "error count",
    5: "error count",
    6: "errors per intensity class",
}
PROTOCOL_VERSIONS: Final = {
    version: f"block tag {BLOCK_TAG_FAMILIES[version]}, Cascade permutations "
    f"{CASCADE_PERMUTATIONS[version]}, reconciliation report {RECONCILIATION_REPORTS[version]}"
    for version in BLOCK_TAG_FAMILIES
}
NONCE_BYTES: Final = 32
X25519_PUBLIC_BYTES: Final = 32
MLKEM768_PUBLIC_BYTES: Final = 1184
MLKEM768_CIPHERTEXT_BYTES: Final = 1088
DIGEST_BYTES: Final = 32
WC_TAG_BYTES: Final = 16
MAX_CERTIFICATES: Final = 4
MAX_CERTIFICATE_BYTES: Final = 16384
MAX_PROOF_BYTES: Final = 4096  # ML-DSA-65 signatures are 3309 bytes, Ed25519 64, HMAC 32
MAX_DETAIL_CHARS: Final = 200
MAX_KIND_CHARS: Final = 64
MAX_BODY_FIELDS: Final = 64
U64_MAX: Final = 2**64 - 1


class SessionMode(enum.Enum):
    """What authenticates a session. Values appear in logs, status and on the wire."""

    CERTIFICATE = "certificate"
    PSK = "psk"
    WEB_OF_TRUST = "web_of_trust"
    KEY_DERIVED = "key_derived"


class CloseReason(enum.Enum):
    """Why a peer ends the session. Values are stable (wire, logs, metrics)."""

    NORMAL = "normal"
    PROTOCOL_ERROR = "protocol_error"
    AUTHENTICATION_FAILED = "authentication_failed"
    CERTIFICATE_REJECTED = "certificate_rejected"
    AUTH_KEY_EXHAUSTED = "auth_key_exhausted"
    LEDGER_MISMATCH = "ledger_mismatch"
    TIMEOUT = "timeout"
    SHUTDOWN = "shutdown"


# ---------------------------------------------------------------------------------------------
# Field specifications: the schema language shared by control messages and data kinds.


@dataclass(frozen=True, slots=True, kw_only=True)
class FieldSpec:
    """The type and bounds of one field.

    ``kind`` is one of ``int``, ``float``, ``bool``, ``bytes``, ``str``, ``bytes_list``.
    ``min_value``/``max_value`` bound ints and floats (floats must also be finite);
    ``min_len``/``max_len`` bound the length of bytes, str and list values (and the length of
    each element of a bytes_list via ``max_item_len``).
    """

    kind: str
    min_value: float | None = None
    max_value: float | None = None
    min_len: int = 0
    max_len: int | None = None
    max_item_len: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in _CHECKERS:
            raise ValueError(f"unknown field kind {self.kind!r}")

    def check(self, name: str, value: object) -> None:
        """Raise ``ProtocolError(field=name)`` unless ``value`` matches this spec."""
        _CHECKERS[self.kind](self, name, value)


def _check_number(spec: FieldSpec, name: str, value: float | int) -> None:
    if spec.min_value is not None and value < spec.min_value:
        raise ProtocolError(f"must be >= {spec.min_value}", field=name)
    if spec.max_value is not None and value > spec.max_value:
        raise ProtocolError(f"must be <= {spec.max_value}", field=name)


def _check_len(spec: FieldSpec, name: str, length: int) -> None:
    if length < spec.min_len or (spec.max_len is not None and length > spec.max_len):
        bound = f"{spec.min_len}..{spec.max_len}" if spec.max_len is not None else ">= min"
        raise ProtocolError(f"length {length} outside {bound}", field=name)


def _check_int(spec: FieldSpec, name: str, value: object) -> None:
    if type(value) is not int:  # bool is an int subclass: refuse it here
        raise ProtocolError(f"expected int, got {type(value).__name__}", field=name)
    _check_number(spec, name, value)


def _check_float(spec: FieldSpec, name: str, value: object) -> None:
    if type(value) is not float:
        raise ProtocolError(f"expected float, got {type(value).__name__}", field=name)
    if not math.isfinite(value):
        raise ProtocolError("must be finite", field=name)
    _check_number(spec, name, value)


def _check_bool(spec: FieldSpec, name: str, value: object) -> None:
    if type(value) is not bool:
        raise ProtocolError(f"expected bool, got {type(value).__name__}", field=name)


def _check_bytes(spec: FieldSpec, name: str, value: object) -> None:
    if type(value) is not bytes:
        raise ProtocolError(f"expected bytes, got {type(value).__name__}", field=name)
    _check_len(spec, name, len(value))


def _check_str(spec: FieldSpec, name: str, value: object) -> None:
    if type(value) is not str:
        raise ProtocolError(f"expected str, got {type(value).__name__}", field=name)
    _check_len(spec, name, len(value))


def _check_bytes_list(spec: FieldSpec, name: str, value: object) -> None:
    if type(value) is not tuple:
        raise ProtocolError(f"expected a list, got {type(value).__name__}", field=name)
    _check_len(spec, name, len(value))
    for index, item in enumerate(value):
        item_name = f"{name}[{index}]"
        if type(item) is not bytes:
            raise ProtocolError(f"expected bytes, got {type(item).__name__}", field=item_name)
        if spec.max_item_len is not None and len(item) > spec.max_item_len:
            raise ProtocolError(f"longer than {spec.max_item_len}", field=item_name)


_CHECKERS: Final = {
    "int": _check_int,
    "float": _check_float,
    "bool": _check_bool,
    "bytes": _check_bytes,
    "str": _check_str,
    "bytes_list": _check_bytes_list,
}


def u64() -> FieldSpec:
    return FieldSpec(kind="int", min_value=0, max_value=U64_MAX)


def exact_bytes(length: int) -> FieldSpec:
    return FieldSpec(kind="bytes", min_len=length, max_len=length)


# ---------------------------------------------------------------------------------------------
# Data kinds: the registry the node fills with the post-processing message schemas.


class KindRegistry:
    """Registered application message kinds and the schema of their bodies.

    ``register("cascade_query", {"pass_index": FieldSpec(kind="int", min_value=0), ...})``;
    body values may only be int, float, bool or bytes.
    """

    __slots__ = ("_kinds",)

    def __init__(self) -> None:
        self._kinds: dict[str, dict[str, FieldSpec]] = {}

    def register(self, kind: str, schema: Mapping[str, FieldSpec]) -> None:
        if not kind or len(kind) > MAX_KIND_CHARS or not kind.isascii():
            raise ValueError(f"kind must be 1..{MAX_KIND_CHARS} ASCII characters")
        if kind in self._kinds:
            raise ValueError(f"kind {kind!r} already registered")
        if len(schema) > MAX_BODY_FIELDS:
            raise ValueError(f"at most {MAX_BODY_FIELDS} body fields")
        for name, spec in schema.items():
            if spec.kind not in ("int", "float", "bool", "bytes"):
                raise ValueError(f"{kind}.{name}: body fields are int/float/bool/bytes only")
        self._kinds[kind] = dict(schema)

    def __contains__(self, kind: object) -> bool:
        return kind in self._kinds

    def check(self, kind: str, body: Mapping[str, object]) -> None:
        """Raise ``ProtocolError`` naming ``kind`` or ``body.<field>`` unless ``body`` fits."""
        schema = self._kinds.get(kind)
        if schema is None:
            raise ProtocolError("unknown message kind", field="kind")
        _check_keys(body.keys(), schema.keys(), prefix="body.")
        for name, spec in schema.items():
            spec.check(f"body.{name}", body[name])


def _check_keys(got: Any, expected: Any, *, prefix: str = "") -> None:
    got_set, expected_set = set(got), set(expected)
    if got_set != expected_set:
        missing = sorted(expected_set - got_set)
        extra = sorted(str(k) for k in got_set - expected_set)
        name = missing[0] if missing else extra[0]
        what = "missing" if missing else "unexpected"
        raise ProtocolError(f"{what} field", field=f"{prefix}{name}")


# ---------------------------------------------------------------------------------------------
# Messages. ``CODE`` is the one-byte frame type; ``SCHEMA`` the strict payload schema.


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello:
    """Alice -> Bob, first handshake message: chosen mode, nonce, ephemeral hybrid shares.

    The ``ledger_*`` fields carry the public state of Alice's authentication-key ledger for a
    key-derived session (offset, counters, the digest of her committed deposit history and the
    one her staged blocks would give, her lowest unused handshake slot: no key bits); zero
    otherwise. Bob's reply carries his, with the handshake slot he used for this attempt.
    """

    CODE: ClassVar[int] = 1
    SCHEMA: ClassVar[Mapping[str, FieldSpec]]
    protocol_version: int
    mode: str
    nonce: bytes
    x25519_public: bytes
    mlkem_public: bytes
    ledger_consumed_bits: int
    ledger_tags: int
    ledger_forgery_bound: float
    ledger_deposit_digest: bytes
    ledger_staged_digest: bytes
    ledger_handshake_index: int


@dataclass(frozen=True, slots=True, kw_only=True)
class HelloReply:
    """Bob -> Alice: Bob's nonce and shares, his credentials and his proof over the transcript.

    ``certificate_chain`` holds his X.509 chain (DER, leaf first) in certificate mode, his one
    OpenPGP certificate (binary, with its certifications) in web-of-trust mode, nothing
    otherwise."""

    CODE: ClassVar[int] = 2
    SCHEMA: ClassVar[Mapping[str, FieldSpec]]
    nonce: bytes
    x25519_public: bytes
    mlkem_ciphertext: bytes
    ledger_consumed_bits: int
    ledger_tags: int
    ledger_forgery_bound: float
    ledger_deposit_digest: bytes
    ledger_staged_digest: bytes
    ledger_handshake_index: int
    certificate_chain: tuple[bytes, ...]
    proof: bytes

    def __repr__(self) -> str:
        return f"HelloReply(certificates={len(self.certificate_chain)})"


@dataclass(frozen=True, slots=True, kw_only=True)
class Finish:
    """Alice -> Bob: Alice's credentials (as in ``HelloReply``) and her proof over the whole
    transcript."""

    CODE: ClassVar[int] = 3
    SCHEMA: ClassVar[Mapping[str, FieldSpec]]
    certificate_chain: tuple[bytes, ...]
    proof: bytes

    def __repr__(self) -> str:
        return f"Finish(certificates={len(self.certificate_chain)})"


@dataclass(frozen=True, slots=True, kw_only=True)
class Data:
    """Application message of one block; ``body`` is checked against the kind's schema."""

    CODE: ClassVar[int] = 10
    SCHEMA: ClassVar[Mapping[str, FieldSpec]]
    block_id: int
    kind: str
    body: Mapping[str, int | float | bool | bytes] = field(default_factory=dict)

    def __repr__(self) -> str:  # bodies may carry key-correlated data: show only the shape
        return f"Data(block_id={self.block_id}, kind={self.kind!r}, fields={sorted(self.body)})"


@dataclass(frozen=True, slots=True, kw_only=True)
class Control:
    """Application message outside any block: node coordination (two-phase commits, limbo
    reconciliation, key reservations for delivery). Tagged by the frame MAC only; it carries no
    post-processing data, so it is not part of any block transcript."""

    CODE: ClassVar[int] = 13
    SCHEMA: ClassVar[Mapping[str, FieldSpec]]
    kind: str
    body: Mapping[str, int | float | bool | bytes] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Control(kind={self.kind!r}, fields={sorted(self.body)})"


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockOpen:
    """Alice -> Bob: block ``block_id`` starts; in key-derived mode both sides draw its keys."""

    CODE: ClassVar[int] = 11
    SCHEMA: ClassVar[Mapping[str, FieldSpec]]
    block_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockClose:
    """Each side, once per block: the tag over its direction's block transcript.

    ``ledger_fingerprint`` is the sender's ledger fingerprint right after the block's draws; the
    receiver compares it with its own (the two ledgers must stay equal).
    """

    CODE: ClassVar[int] = 12
    SCHEMA: ClassVar[Mapping[str, FieldSpec]]
    block_id: int
    frames: int
    transcript_tag: bytes
    ledger_fingerprint: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class RotationAnnounce:
    """Alice -> Bob, between blocks: switch this session to key-derived authentication."""

    CODE: ClassVar[int] = 20
    SCHEMA: ClassVar[Mapping[str, FieldSpec]]
    next_block_id: int
    ledger_fingerprint: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class RotationAck:
    """Bob -> Alice: rotation accepted; frames after this one use pool-derived keys."""

    CODE: ClassVar[int] = 21
    SCHEMA: ClassVar[Mapping[str, FieldSpec]]
    next_block_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Ping:
    CODE: ClassVar[int] = 30
    SCHEMA: ClassVar[Mapping[str, FieldSpec]]
    nonce: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Pong:
    CODE: ClassVar[int] = 31
    SCHEMA: ClassVar[Mapping[str, FieldSpec]]
    nonce: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Close:
    """Either side: the session ends; ``reason`` is a ``CloseReason`` value; no secret."""

    CODE: ClassVar[int] = 40
    SCHEMA: ClassVar[Mapping[str, FieldSpec]]
    reason: str
    detail: str = ""


Message = (
    Hello
    | HelloReply
    | Finish
    | Data
    | Control
    | BlockOpen
    | BlockClose
    | RotationAnnounce
    | RotationAck
    | Ping
    | Pong
    | Close
)

_LEDGER_FIELDS: Final = {
    "ledger_consumed_bits": u64(),
    "ledger_tags": u64(),
    "ledger_forgery_bound": FieldSpec(kind="float", min_value=0.0, max_value=1.0),
    "ledger_deposit_digest": exact_bytes(DIGEST_BYTES),
    "ledger_staged_digest": exact_bytes(DIGEST_BYTES),
    "ledger_handshake_index": u64(),
}
_CHAIN: Final = FieldSpec(
    kind="bytes_list", max_len=MAX_CERTIFICATES, max_item_len=MAX_CERTIFICATE_BYTES
)
_PROOF: Final = FieldSpec(kind="bytes", min_len=32, max_len=MAX_PROOF_BYTES)

Hello.SCHEMA = {
    "protocol_version": u64(),  # any version parses; the handshake refuses others by name
    "mode": FieldSpec(kind="str", min_len=1, max_len=16),
    "nonce": exact_bytes(NONCE_BYTES),
    "x25519_public": exact_bytes(X25519_PUBLIC_BYTES),
    "mlkem_public": exact_bytes(MLKEM768_PUBLIC_BYTES),
    **_LEDGER_FIELDS,
}
HelloReply.SCHEMA = {
    "nonce": exact_bytes(NONCE_BYTES),
    "x25519_public": exact_bytes(X25519_PUBLIC_BYTES),
    "mlkem_ciphertext": exact_bytes(MLKEM768_CIPHERTEXT_BYTES),
    **_LEDGER_FIELDS,
    "certificate_chain": _CHAIN,
    "proof": _PROOF,
}
Finish.SCHEMA = {"certificate_chain": _CHAIN, "proof": _PROOF}
Data.SCHEMA = {
    "block_id": u64(),
    "kind": FieldSpec(kind="str", min_len=1, max_len=MAX_KIND_CHARS),
    "body": FieldSpec(kind="int"),  # placeholder: checked against the KindRegistry instead
}
Control.SCHEMA = {
    "kind": FieldSpec(kind="str", min_len=1, max_len=MAX_KIND_CHARS),
    "body": FieldSpec(kind="int"),  # placeholder: checked against the KindRegistry instead
}
BlockOpen.SCHEMA = {"block_id": u64()}
BlockClose.SCHEMA = {
    "block_id": u64(),
    "frames": u64(),
    "transcript_tag": FieldSpec(kind="bytes", min_len=WC_TAG_BYTES, max_len=DIGEST_BYTES),
    "ledger_fingerprint": exact_bytes(DIGEST_BYTES),
}
RotationAnnounce.SCHEMA = {"next_block_id": u64(), "ledger_fingerprint": exact_bytes(DIGEST_BYTES)}
RotationAck.SCHEMA = {"next_block_id": u64()}
Ping.SCHEMA = {"nonce": u64()}
Pong.SCHEMA = {"nonce": u64()}
Close.SCHEMA = {
    "reason": FieldSpec(kind="str", min_len=1, max_len=32),
    "detail": FieldSpec(kind="str", max_len=MAX_DETAIL_CHARS),
}

MESSAGE_TYPES: Final[dict[int, type[Message]]] = {
    cls.CODE: cls
    for cls in (
        Hello,
        HelloReply,
        Finish,
        Data,
        Control,
        BlockOpen,
        BlockClose,
        RotationAnnounce,
        RotationAck,
        Ping,
        Pong,
        Close,
    )
}

_FIELD_NAMES: Final = {cls: tuple(f.name for f in fields(cls)) for cls in MESSAGE_TYPES.values()}
_MODES: Final = frozenset(m.value for m in SessionMode)
_REASONS: Final = frozenset(r.value for r in CloseReason)


def message_type(code: int) -> type[Message]:
    """The message class of frame type ``code``; ``ProtocolError(field="type")`` if unknown."""
    cls = MESSAGE_TYPES.get(code)
    if cls is None:
        raise ProtocolError(f"unknown message type {code}", field="type")
    return cls


def encode_payload(message: Message, registry: KindRegistry) -> bytes:
    """The msgpack payload of ``message`` after checking it against its own schema.

    Local mistakes are caught here, before anything is sent: the same checks as on decode.
    """
    values = {name: getattr(message, name) for name in _FIELD_NAMES[type(message)]}
    _check_values(type(message), values, registry)
    if isinstance(message, Data | Control):
        values["body"] = dict(message.body)
    packed: bytes = msgpack.packb(values, use_bin_type=True)
    return packed


def decode_payload(cls: type[Message], payload: bytes, registry: KindRegistry) -> Message:
    """Parse and check a payload of message type ``cls``; only ``ProtocolError`` escapes."""
    try:
        values = msgpack.unpackb(
            payload,
            raw=False,
            use_list=False,
            strict_map_key=True,
            # one item more than any schema allows (so the schema names the field that is too
            # long); a payload of many tiny items is refused before it is built
            max_array_len=MAX_CERTIFICATES + 1,
            max_map_len=MAX_BODY_FIELDS + 1,
        )
    except (ValueError, TypeError, msgpack.UnpackException, msgpack.ExtraData) as exc:
        raise ProtocolError(
            f"undecodable msgpack ({type(exc).__name__})", field="payload"
        ) from None
    if type(values) is not dict:
        raise ProtocolError("payload must be a map", field="payload")
    _check_keys(values.keys(), _FIELD_NAMES[cls])
    _check_values(cls, values, registry)
    return cls(**values)


def _check_values(cls: type[Message], values: dict[str, Any], registry: KindRegistry) -> None:
    for name, spec in cls.SCHEMA.items():
        if cls in (Data, Control) and name == "body":
            continue
        spec.check(name, values[name])
    if cls in (Data, Control):
        body = values["body"]
        if not isinstance(body, Mapping):
            raise ProtocolError("expected a map", field="body")
        registry.check(values["kind"], body)
    elif cls is Hello and values["mode"] not in _MODES:
        raise ProtocolError("unknown session mode", field="mode")
    elif cls is Close and values["reason"] not in _REASONS:
        raise ProtocolError("unknown close reason", field="reason")
