"""The two messages that fill a link's pad streams (docs/relay.md, "Pad streams").

The end that owns an outgoing stream offers chunk ``index`` of it: the stored keys of the link
(by key ID, in order) whose material the chunk is. The other end takes the same keys out of its
own store and answers ``PadAnswer``: taken, not yet (some key is not committed there yet: the
offer is repeated later), or refused (the chunk's bits are spent on both ends, never read).
Neither message carries key material.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from qkdnode.channel.messages import FieldSpec, KindRegistry
from qkdnode.errors import ProtocolError
from qkdnode.relay.messages import RELAY_SCHEMAS

MAX_CHUNK_KEYS: Final = 4096
MAX_CHUNK_INDEX: Final = 2**62
PAD_OFFER_KIND: Final = "relay_pad_offer"
PAD_ANSWER_KIND: Final = "relay_pad_answer"


class PadAnswerOutcome(enum.IntEnum):
    TAKEN = 0
    NOT_YET = 1
    REFUSED = 2


@dataclass(frozen=True, slots=True, kw_only=True)
class PadOffer:
    index: int
    bits: int
    key_ids: tuple[uuid.UUID, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class PadAnswer:
    index: int
    outcome: PadAnswerOutcome


PAD_SCHEMAS: Final[dict[str, dict[str, FieldSpec]]] = {
    PAD_OFFER_KIND: {
        "index": FieldSpec(kind="int", min_value=0, max_value=MAX_CHUNK_INDEX),
        "bits": FieldSpec(kind="int", min_value=8, max_value=MAX_CHUNK_KEYS * 65_536),
        "key_ids": FieldSpec(kind="bytes", min_len=16, max_len=16 * MAX_CHUNK_KEYS),
    },
    PAD_ANSWER_KIND: {
        "index": FieldSpec(kind="int", min_value=0, max_value=MAX_CHUNK_INDEX),
        "outcome": FieldSpec(kind="int", min_value=0, max_value=len(PadAnswerOutcome) - 1),
    },
}


# every control kind the key relay sends on a link's session
RELAY_CONTROL_KINDS: Final = frozenset(RELAY_SCHEMAS) | frozenset(PAD_SCHEMAS)


def register_pad_kinds(registry: KindRegistry) -> None:
    for kind, schema in PAD_SCHEMAS.items():
        registry.register(kind, schema)


def pad_to_wire(message: PadOffer | PadAnswer) -> tuple[str, dict[str, int | bytes]]:
    if isinstance(message, PadOffer):
        return PAD_OFFER_KIND, {
            "index": message.index,
            "bits": message.bits,
            "key_ids": b"".join(key_id.bytes for key_id in message.key_ids),
        }
    return PAD_ANSWER_KIND, {"index": message.index, "outcome": int(message.outcome)}


def pad_from_wire(kind: str, body: Mapping[str, object]) -> PadOffer | PadAnswer:
    """The message of a control frame whose body passed the schema; ProtocolError otherwise."""
    index = body.get("index")
    if not isinstance(index, int) or isinstance(index, bool):
        raise ProtocolError("expected an integer", field="index")
    if kind == PAD_OFFER_KIND:
        bits, raw = body.get("bits"), body.get("key_ids")
        if not isinstance(bits, int) or isinstance(bits, bool) or bits % 8:
            raise ProtocolError("expected a whole number of bytes", field="bits")
        if not isinstance(raw, bytes) or not raw or len(raw) % 16:
            raise ProtocolError("expected 16-byte key IDs", field="key_ids")
        key_ids = tuple(uuid.UUID(bytes=raw[i : i + 16]) for i in range(0, len(raw), 16))
        return PadOffer(index=index, bits=bits, key_ids=key_ids)
    if kind == PAD_ANSWER_KIND:
        outcome = body.get("outcome")
        if not isinstance(outcome, int) or isinstance(outcome, bool):
            raise ProtocolError("expected an integer", field="outcome")
        try:
            return PadAnswer(index=index, outcome=PadAnswerOutcome(outcome))
        except ValueError:
            raise ProtocolError("unknown outcome", field="outcome") from None
    raise ProtocolError("not a pad message kind", field="kind")
