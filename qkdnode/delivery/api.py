"""ETSI GS QKD 014 V1.1.1 requests and responses, pure: no I/O, no clock, no randomness.

:func:`parse_request` turns an HTTP method, request target and body into a typed request or raises
:class:`ApiError` carrying the HTTP status and the spec's error message; :func:`authorize` checks
the caller (its SAE ID comes from the TLS client certificate, never from the request) against the
SAEs configured for both nodes; the ``*_body`` functions build the JSON responses.

Liberal in what we accept (etsi014 guide, "seen in real clients"): GET with query parameters for
``enc_keys`` and ``dec_keys``, an empty POST body meaning ``{}``, any Content-Type, unknown fields
ignored. Strict in the values: sizes in bits, multiples of 8, within the advertised limits.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qs, unquote

from qkdnode.config.delivery import ApiLimits
from qkdnode.errors import QkdError

API_PREFIX: Final = "/api/v1/keys/"
MAX_SAE_ID_CHARS: Final = 256
MAX_QUERY_FIELDS: Final = 64

# Messages real clients match on (etsi014 guide, table "Errors").
MSG_SIZE_MULTIPLE: Final = "size shall be a multiple of 8"
MSG_EXTENSION_UNSUPPORTED: Final = "not all extension_mandatory parameters are supported"
MSG_KEYS_NOT_FOUND: Final = "one or more keys specified are not found on KME"
MSG_UNAUTHORIZED: Final = "SAE is not authorized at this KME"
MSG_NOT_SLAVE: Final = "SAE is not the slave SAE the keys were issued for"


class ApiError(QkdError):
    """A request answered with an error: HTTP ``status`` and the JSON ``{"message", "details"}``.

    Messages and details name fields and limits, never key material.
    """

    def __init__(
        self, status: int, message: str, details: Sequence[Mapping[str, object]] | None = None
    ) -> None:
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message
        self.details = list(details) if details else None

    def body(self) -> bytes:
        return error_body(self.message, self.details)


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusRequest:
    slave_sae: str


@dataclass(frozen=True, slots=True, kw_only=True)
class EncKeysRequest:
    slave_sae: str
    number: int
    size_bits: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DecKeysRequest:
    master_sae: str
    key_ids: tuple[uuid.UUID, ...]


Request = StatusRequest | EncKeysRequest | DecKeysRequest


def parse_request(method: str, target: str, body: bytes, limits: ApiLimits) -> Request:
    """Parse one API request; raises ApiError (400 bad input, 404 unknown path, 405 method)."""
    path, _, query = target.partition("?")
    if not path.startswith(API_PREFIX):
        raise ApiError(404, "no such resource (the API is under /api/v1/keys/)")
    segments = path[len(API_PREFIX) :].split("/")
    if len(segments) != 2:
        raise ApiError(404, "no such resource (expected /api/v1/keys/{SAE_ID}/{operation})")
    sae_id = _sae_id(unquote(segments[0], errors="strict"), "SAE_ID")
    operation = segments[1]
    if operation not in ("status", "enc_keys", "dec_keys"):
        raise ApiError(404, "no such operation (status, enc_keys, dec_keys)")
    if method not in ("GET", "POST") or (operation == "status" and method != "GET"):
        raise ApiError(405, f"method {method[:16]} not allowed for {operation}")
    if operation == "status":
        return StatusRequest(slave_sae=sae_id)
    fields = _query(query) if method == "GET" else _json_object(body)
    if operation == "enc_keys":
        return _enc_keys(sae_id, fields, limits, from_query=method == "GET")
    return _dec_keys(sae_id, fields, limits, from_query=method == "GET")


def authorize(
    request: Request, caller_sae: str, *, local_saes: Collection[str], peer_saes: Collection[str]
) -> None:
    """Check the caller and the SAE named in the URL; raises ApiError (401, 400).

    The caller must be attached to this node; the SAE in the URL (the slave for status and
    enc_keys, the master for dec_keys) must be attached to the peer node, since keys are shared
    between the two nodes' SAEs.
    """
    if caller_sae not in local_saes:
        raise ApiError(401, MSG_UNAUTHORIZED)
    if isinstance(request, DecKeysRequest):
        if request.master_sae not in peer_saes:
            raise ApiError(400, MSG_KEYS_NOT_FOUND, [{"master_SAE_ID": "not attached to peer"}])
    elif request.slave_sae not in peer_saes:
        raise ApiError(
            400, "slave_SAE_ID is not an SAE of the peer KME", [{"slave_SAE_ID": "unknown"}]
        )


# ---- responses --------------------------------------------------------------------------------


def _dump(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def error_body(message: str, details: Sequence[Mapping[str, object]] | None = None) -> bytes:
    body: dict[str, object] = {"message": message}
    if details:
        body["details"] = list(details)
    return _dump(body)


def status_body(
    *,
    source_kme_id: str,
    target_kme_id: str,
    master_sae: str,
    slave_sae: str,
    limits: ApiLimits,
    stored_key_count: int,
    max_key_count: int,
    key_kind: str,
    relay_route: tuple[str, ...] = (),
) -> bytes:
    """The Status data format (ETSI GS QKD 014 V1.1.1, 6.1); additional slave SAEs: none.

    ``status_extension`` says which kind of key the pair gets: ``{"key_kind": "qkd"}`` (the
    QKD key itself) or ``{"key_kind": "hybrid"}`` (combined with ML-KEM-768, computational);
    keys relayed through trusted nodes add ``"relayed": true`` and ``"route"`` (the node names,
    every one of which learns the keys).
    """
    extension: dict[str, object] = {"key_kind": key_kind}
    if relay_route:
        extension["relayed"] = True
        extension["route"] = list(relay_route)
    return _dump(
        {
            "source_KME_ID": source_kme_id,
            "target_KME_ID": target_kme_id,
            "master_SAE_ID": master_sae,
            "slave_SAE_ID": slave_sae,
            "key_size": limits.key_size_bits,
            "stored_key_count": stored_key_count,
            "max_key_count": max_key_count,
            "max_key_per_request": limits.max_keys_per_request,
            "max_key_size": limits.max_key_size_bits,
            "min_key_size": limits.min_key_size_bits,
            "max_SAE_ID_count": 0,
            "status_extension": extension,
        }
    )


def key_container_body(keys: Sequence[tuple[uuid.UUID, bytes]]) -> bytes:
    """The Key container data format: ``{"keys": [{"key_ID", "key" (base64)}]}``."""
    return _dump(
        {
            "keys": [
                {"key_ID": str(key_id), "key": base64.b64encode(material).decode()}
                for key_id, material in keys
            ]
        }
    )


# ---- parsing helpers --------------------------------------------------------------------------


def _sae_id(value: object, field: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_SAE_ID_CHARS:
        raise ApiError(400, f"{field} must be a non-empty string of at most 256 characters")
    if not value.isprintable() or "/" in value:
        raise ApiError(400, f"{field} contains characters not allowed in an SAE ID")
    return value


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _json_object(body: bytes) -> dict[str, Any]:
    if not body.strip():
        return {}  # an empty POST body means {}
    try:
        value = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ApiError(400, "request body is not valid JSON") from None
    if not isinstance(value, dict):
        raise ApiError(400, "request body must be a JSON object")
    return value


def _query(query: str) -> dict[str, Any]:
    try:
        pairs = parse_qs(
            query, keep_blank_values=True, errors="strict", max_num_fields=MAX_QUERY_FIELDS
        )
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "malformed query string") from None
    return {name: values if name == "key_ID" else values[-1] for name, values in pairs.items()}


def _integer(fields: Mapping[str, Any], name: str, default: int, *, from_query: bool) -> int:
    value = fields.get(name, default)
    if from_query and isinstance(value, str):
        if not value.isascii() or not value.isdigit() or len(value) > 9:
            raise ApiError(400, f"{name} must be a positive integer")
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{name} must be an integer")
    return value


def _enc_keys(
    slave_sae: str, fields: Mapping[str, Any], limits: ApiLimits, *, from_query: bool
) -> EncKeysRequest:
    number = _integer(fields, "number", 1, from_query=from_query)
    if not 1 <= number <= limits.max_keys_per_request:
        raise ApiError(
            400,
            f"number shall be between 1 and max_key_per_request ({limits.max_keys_per_request})",
            [{"number": number}],
        )
    size = _integer(fields, "size", limits.key_size_bits, from_query=from_query)
    if size % 8:
        raise ApiError(400, MSG_SIZE_MULTIPLE, [{"size": size}])
    if not limits.min_key_size_bits <= size <= limits.max_key_size_bits:
        raise ApiError(
            400,
            f"size shall be between min_key_size ({limits.min_key_size_bits}) and"
            f" max_key_size ({limits.max_key_size_bits})",
            [{"size": size}],
        )
    additional = fields.get("additional_slave_SAE_IDs")
    if additional not in (None, [], ""):
        if not isinstance(additional, list):
            raise ApiError(400, "additional_slave_SAE_IDs must be a list of SAE IDs")
        raise ApiError(
            400,
            "additional_slave_SAE_IDs are not supported (max_SAE_ID_count is 0)",
            [{"additional_slave_SAE_IDs": len(additional)}],
        )
    unsupported = _extension_names(fields.get("extension_mandatory"), "extension_mandatory")
    if unsupported:
        raise ApiError(
            400,
            MSG_EXTENSION_UNSUPPORTED,
            [{"unsupported_extension_parameter": name[:64]} for name in unsupported[:16]],
        )
    _extension_names(fields.get("extension_optional"), "extension_optional")  # ignored if valid
    return EncKeysRequest(slave_sae=slave_sae, number=number, size_bits=size)


def _extension_names(value: object, field: str) -> list[str]:
    """Names in an extension parameter: spec form ``[{name: value}, ...]`` or one object."""
    if value is None or value == "":
        return []
    if isinstance(value, dict):
        return [str(name) for name in value]
    if isinstance(value, list) and all(isinstance(item, dict) for item in value):
        return [str(name) for item in value for name in item]
    raise ApiError(400, f"{field} must be a list of objects")


def _dec_keys(
    master_sae: str, fields: Mapping[str, Any], limits: ApiLimits, *, from_query: bool
) -> DecKeysRequest:
    if from_query:
        raw = fields.get("key_ID", [])
        texts: list[object] = [t for item in raw for t in item.split(",")]
    else:
        entries = fields.get("key_IDs")
        if not isinstance(entries, list):
            raise ApiError(400, "key_IDs must be a list of {key_ID} objects")
        texts = []
        for entry in entries:
            if not isinstance(entry, dict):
                raise ApiError(400, "key_IDs entries must be objects with a key_ID")
            texts.append(entry.get("key_ID"))
    if not texts:
        raise ApiError(400, "no key_ID given")
    if len(texts) > limits.max_keys_per_request:
        raise ApiError(
            400,
            f"more key_IDs than max_key_per_request ({limits.max_keys_per_request})",
            [{"key_IDs": len(texts)}],
        )
    key_ids = tuple(_uuid(text) for text in texts)
    if len(set(key_ids)) != len(key_ids):
        raise ApiError(400, "key_IDs repeats a key ID")
    return DecKeysRequest(master_sae=master_sae, key_ids=key_ids)


def _uuid(text: object) -> uuid.UUID:
    if not isinstance(text, str) or len(text) > 64:
        raise ApiError(400, "key_ID must be a UUID string")
    try:
        return uuid.UUID(text.strip())
    except ValueError:
        raise ApiError(400, "key_ID must be a UUID string") from None
