"""Block messages to and from plain dicts (for msgpack), with a strict schema per type.

Every block message is a frozen dataclass whose fields are ``int``, ``float``, ``bool``, ``str`` or
``bytes``; its wire form is ``(kind, body)`` with ``kind`` the registered name and ``body`` a dict
of exactly those fields. Decoding checks the kind, the exact field set and every field's type
before the message's own validation runs, and raises ProtocolError naming the field.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping

from qkdnode.errors import ProtocolError
from qkdnode.postprocess.block_messages import MESSAGE_TYPES, BlockMessage

_KIND_BY_TYPE = {cls: kind for kind, cls in MESSAGE_TYPES.items()}
_ALLOWED = (int, float, bool, str, bytes)


def _schema_of(cls: type[BlockMessage]) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    schema: dict[str, type] = {}
    for field in dataclasses.fields(cls):
        annotation = hints[field.name]
        if annotation not in _ALLOWED:
            raise TypeError(f"{cls.__name__}.{field.name} has a non-wire type {annotation!r}")
        schema[field.name] = annotation
    return schema


# checked once at import: a message type with a non-wire field fails loudly here
_SCHEMAS = {cls: _schema_of(cls) for cls in MESSAGE_TYPES.values()}


def encode_block_message(message: BlockMessage) -> tuple[str, dict[str, object]]:
    """The wire form of ``message``: (kind, {field: value})."""
    kind = _KIND_BY_TYPE.get(type(message))
    if kind is None:
        raise TypeError(f"{type(message).__name__} is not a block message")
    return kind, {name: getattr(message, name) for name in _SCHEMAS[type(message)]}


def decode_block_message(kind: object, body: object) -> BlockMessage:
    """Parse a wire message; ProtocolError(field=...) on an unknown kind or a schema violation."""
    if not isinstance(kind, str) or kind not in MESSAGE_TYPES:
        raise ProtocolError("unknown block message kind", field="kind")
    if not isinstance(body, Mapping):
        raise ProtocolError("must be a map", field=f"{kind}")
    cls = MESSAGE_TYPES[kind]
    schema = _SCHEMAS[cls]
    extra = sorted(str(name) for name in body if name not in schema)
    if extra:
        raise ProtocolError("unknown field", field=f"{kind}.{extra[0]}")
    values: dict[str, object] = {}
    for name, expected in schema.items():
        if name not in body:
            raise ProtocolError("missing", field=f"{kind}.{name}")
        value = body[name]
        # bool is an int subclass: require the exact type so True never passes for a count
        if type(value) is not expected and not (expected is float and type(value) is int):
            raise ProtocolError(f"expected {expected.__name__}", field=f"{kind}.{name}")
        values[name] = float(value) if expected is float else value  # type: ignore[arg-type]
    try:
        return cls(**values)  # type: ignore[arg-type]
    except ProtocolError as exc:
        raise ProtocolError(str(exc), field=f"{kind}.{exc.field}" if exc.field else kind) from None
    except (TypeError, ValueError) as exc:
        raise ProtocolError(str(exc), field=kind) from None
