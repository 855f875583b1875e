"""Forward-secure audit trail: entry encoding, key evolution, hash chain and verification.

Construction (Schneier & Kelsey, "Secure audit logs to support computer forensics", ACM TISSEC
2(2), 1999; forward-secure MAC by key evolution as in Bellare & Yee, "Forward-security in
private-key cryptography", CT-RSA 2003):

- a random initial key ``k_0`` (``INITIAL_KEY_BYTES``) is drawn when the trail starts and handed
  to the verifier (the operator), never kept by the trail itself;
- entry ``i`` (``seq = i``, from 0) is tagged under the current key ``k_i``::

      tag_i  = HMAC-SHA-256(k_i, "qkdnode/audit/tag/v1" 0x00 || seq_i (8 bytes, big endian)
                                  || h_{i-1} || body_i)

  and right after it the key evolves and the old one is overwritten::

      k_{i+1} = SHA-256("qkdnode/audit/evolve/v1" 0x00 || k_i)

  SHA-256 is one-way, so whoever reads ``k_n`` (the disk, at any time) cannot compute any
  earlier key and cannot forge or alter entries ``0 .. n-1``;
- the chain hash links each entry to all before it (truncation or removal inside the trail
  breaks it, and the head ``h_{n-1}`` summarises the whole trail in 32 bytes)::

      h_{-1} = GENESIS_HASH,
      h_i    = SHA-256("qkdnode/audit/chain/v1" 0x00 || h_{i-1} || seq_i || len(body_i) (8 bytes)
                        || body_i || tag_i)

- ``body_i`` is canonical JSON (sorted keys, no spaces, ASCII, no NaN) of the entry's kind, its
  wall-clock time and its fields. Field values are strings, numbers, booleans, null or lists of
  strings: bytes are refused, so no key material can be written by accident.

Everything here is pure: no clock, no randomness, no I/O; the store shell supplies ``time_s``
and ``k_0``.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Union

from qkdnode.errors import AuditTrailBroken

INITIAL_KEY_BYTES: Final = 32
HASH_BYTES: Final = 32
_TAG_DOMAIN: Final = b"qkdnode/audit/tag/v1\x00"
_EVOLVE_DOMAIN: Final = b"qkdnode/audit/evolve/v1\x00"
_CHAIN_DOMAIN: Final = b"qkdnode/audit/chain/v1\x00"
GENESIS_HASH: Final = hashlib.sha256(b"qkdnode/audit/genesis/v1").digest()
MAX_TEXT_CHARS: Final = 512  # a field's text is cut here (a peer's or an SAE's words included)

AuditValue = Union[str, int, float, bool, None, tuple[str, ...]]  # noqa: UP007 (a runtime alias)


class AuditKind(enum.Enum):
    """What an entry records."""

    TRAIL_STARTED = "trail_started"  # first entry: the trail and its initial key were created
    DAEMON_STARTED = "daemon_started"  # the configuration in force (paths and settings)
    SESSION_ESTABLISHED = "session_established"  # mode and trust anchor of the session
    ROTATED = "rotated"  # the channel moved to key-derived authentication
    REBOOTSTRAP_PERMIT_GRANTED = "rebootstrap_permit_granted"  # by the operator's command
    REBOOTSTRAP_PERMIT_IN_FORCE = "rebootstrap_permit_in_force"  # the daemon acts on it
    REBOOTSTRAP_USED = "rebootstrap_used"  # the permit's session reset the ledgers
    LEDGER_RESET = "ledger_reset"
    AUTHENTICATION_FAILED = "authentication_failed"  # handshake or tag refused, with reason
    CERTIFICATE_REJECTED = "certificate_rejected"
    BLOCK_COMMITTED = "block_committed"  # a block's keys became deliverable (key count, mode)
    SAE_REQUEST_REFUSED = "sae_request_refused"  # ETSI 014 request answered with an error
    SAE_CERTIFICATE_REFUSED = "sae_certificate_refused"  # a client certificate at the ETSI 014 API
    REVOCATION_LISTS_LOADED = "revocation_lists_loaded"  # a CRL file reread on SIGHUP
    KEYS_DELIVERED = "keys_delivered"  # key IDs handed to an SAE (never the keys)
    PEER_TRAIL_ROLLED_BACK = "peer_trail_rolled_back"  # the peer's head went backwards


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditEntry:
    """An entry's meaning: what happened (``kind``), when (``time_s``, Unix time) and details."""

    seq: int
    kind: str
    time_s: float
    fields: Mapping[str, AuditValue]


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditRecord:
    """An entry as stored: ``body`` (canonical JSON), its forward-secure ``tag`` and the chain
    hash ``chain_hash`` after it."""

    seq: int
    body: bytes
    tag: bytes
    chain_hash: bytes

    def entry(self) -> AuditEntry:
        """The decoded entry (raises AuditTrailBroken if the body is not a valid entry)."""
        return decode_body(self.seq, self.body)


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditState:
    """What the writer keeps between entries: the next entry's number, the current evolving
    key (``k_next_seq``; never in a repr) and the head (chain hash of the last entry)."""

    next_seq: int
    key: bytes = field(repr=False)
    head: bytes

    def __post_init__(self) -> None:
        if len(self.key) != INITIAL_KEY_BYTES or len(self.head) != HASH_BYTES:
            raise ValueError("audit state: key and head are 32 bytes each")
        if self.next_seq < 0:
            raise ValueError("audit state: next_seq is not negative")


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerHead:
    """The head of a trail as its peer node last received it: after entry ``seq``,
    the chain hash was ``chain_hash``."""

    seq: int
    chain_hash: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class TrailSummary:
    """What a successful verification established."""

    entries: int
    head: bytes
    tags_checked: bool
    peer_head_checked: bool


# ---- the construction ---------------------------------------------------------------------------


def evolve_key(key: bytes) -> bytes:
    """``k_{i+1} = SHA-256("qkdnode/audit/evolve/v1" 0x00 || k_i)`` (one-way: Bellare & Yee)."""
    return hashlib.sha256(_EVOLVE_DOMAIN + key).digest()


def entry_tag(key: bytes, seq: int, previous_hash: bytes, body: bytes) -> bytes:
    """``HMAC-SHA-256(k_i, domain || seq || h_{i-1} || body)`` (module docstring)."""
    message = _TAG_DOMAIN + seq.to_bytes(8, "big") + previous_hash + body
    return hmac.new(key, message, hashlib.sha256).digest()


def chain_hash(previous_hash: bytes, seq: int, body: bytes, tag: bytes) -> bytes:
    """``h_i`` from ``h_{i-1}`` and entry ``i`` (module docstring)."""
    return hashlib.sha256(
        _CHAIN_DOMAIN
        + previous_hash
        + seq.to_bytes(8, "big")
        + len(body).to_bytes(8, "big")
        + body
        + tag
    ).digest()


def initial_state(initial_key: bytes) -> AuditState:
    """The state of an empty trail whose initial key is ``initial_key`` (``k_0``)."""
    if len(initial_key) != INITIAL_KEY_BYTES:
        raise ValueError(f"the audit trail's initial key is {INITIAL_KEY_BYTES} bytes")
    return AuditState(next_seq=0, key=initial_key, head=GENESIS_HASH)


def append_entry(
    state: AuditState,
    kind: AuditKind,
    fields: Mapping[str, AuditValue],
    *,
    time_s: float,
) -> tuple[AuditRecord, AuditState]:
    """The record of a new entry and the state after it (the caller stores both in one
    transaction, overwriting the old state: its key must not survive)."""
    seq = state.next_seq
    body = encode_body(kind, fields, time_s=time_s)
    tag = entry_tag(state.key, seq, state.head, body)
    head = chain_hash(state.head, seq, body, tag)
    record = AuditRecord(seq=seq, body=body, tag=tag, chain_hash=head)
    return record, AuditState(next_seq=seq + 1, key=evolve_key(state.key), head=head)


# ---- entry bodies -------------------------------------------------------------------------------


def _checked_value(name: str, value: object) -> AuditValue:
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"audit field {name}: not a finite number")
        return value
    if isinstance(value, str):
        return value[:MAX_TEXT_CHARS]
    if isinstance(value, tuple | list) and all(isinstance(item, str) for item in value):
        return tuple(item[:MAX_TEXT_CHARS] for item in value)
    # bytes above all: key material must never reach the trail
    raise TypeError(f"audit field {name}: {type(value).__name__} is not an audit value")


def encode_body(kind: AuditKind, fields: Mapping[str, AuditValue], *, time_s: float) -> bytes:
    """Canonical JSON of an entry (sorted keys, no spaces, ASCII); TypeError for bytes or any
    other value that is not text, a number, a boolean, null or a list of text."""
    if not math.isfinite(time_s):
        raise ValueError("audit entry time is not a finite number")
    checked = {str(name): _checked_value(str(name), value) for name, value in fields.items()}
    document = {"kind": kind.value, "time_s": time_s, "fields": checked}
    return _canonical(document)


def _canonical(document: object) -> bytes:
    return json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def decode_body(seq: int, body: bytes) -> AuditEntry:
    """The entry of a stored body; AuditTrailBroken if it is not canonical JSON of an entry."""
    try:
        document = json.loads(body.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise AuditTrailBroken(seq, "body is not ASCII JSON") from None
    if (
        not isinstance(document, dict)
        or set(document) != {"kind", "time_s", "fields"}
        or not isinstance(document["kind"], str)
        or not isinstance(document["time_s"], int | float)
        or not isinstance(document["fields"], dict)
    ):
        raise AuditTrailBroken(seq, "body is not an audit entry")
    if _canonical(document) != body:
        raise AuditTrailBroken(seq, "body is not in canonical form")
    fields = {
        name: tuple(value) if isinstance(value, list) else value
        for name, value in document["fields"].items()
    }
    return AuditEntry(
        seq=seq, kind=document["kind"], time_s=float(document["time_s"]), fields=fields
    )


# ---- verification -------------------------------------------------------------------------------


def verify_trail(
    records: Sequence[AuditRecord],
    *,
    initial_key: bytes | None,
    stored_state: AuditState | None,
    peer_head: PeerHead | None = None,
) -> TrailSummary:
    """Check a whole trail, records in stored order (by ``seq``); raises AuditTrailBroken naming
    the first bad entry.

    Checks, entry by entry: numbering without gap or repeat (a removed or reordered entry), the
    body's form, the tag under ``k_i`` (only with ``initial_key``: without it a forger who
    recomputes the chain is not caught) and the chain hash. Then the end: ``stored_state`` (the
    writer's state) must follow the last entry (same count and head, and with ``initial_key``
    its evolving key must be ``k_0`` evolved once per entry: a replaced key or a cut tail is
    caught), and ``peer_head``, the head the peer node last received, must be on the trail (a
    rollback to an old copy of the whole store is caught only here).
    """
    if initial_key is not None and len(initial_key) != INITIAL_KEY_BYTES:
        raise ValueError(f"the audit trail's initial key is {INITIAL_KEY_BYTES} bytes")
    key = initial_key
    head = GENESIS_HASH
    heads: list[bytes] = []
    for position, record in enumerate(records):
        if record.seq != position:
            if record.seq > position:
                raise AuditTrailBroken(
                    position, f"missing or moved (entry {record.seq} is stored in its place)"
                )
            raise AuditTrailBroken(record.seq, f"out of order (found at position {position})")
        decode_body(record.seq, record.body)
        if key is not None:
            expected_tag = entry_tag(key, record.seq, head, record.body)
            if not hmac.compare_digest(expected_tag, record.tag):
                raise AuditTrailBroken(
                    record.seq, "tag does not verify (entry edited, moved or forged)"
                )
            key = evolve_key(key)
        expected_hash = chain_hash(head, record.seq, record.body, record.tag)
        if not hmac.compare_digest(expected_hash, record.chain_hash):
            raise AuditTrailBroken(record.seq, "chain hash does not follow from the entry before")
        head = expected_hash
        heads.append(head)
    count = len(records)
    if stored_state is None:
        if count:
            raise AuditTrailBroken(count, "the trail's state (evolving key and head) is missing")
    else:
        if stored_state.next_seq != count:
            raise AuditTrailBroken(
                count,
                f"missing: the trail's state says {stored_state.next_seq} entries were written,"
                f" {count} are stored",
            )
        if not hmac.compare_digest(stored_state.head, head):
            raise AuditTrailBroken(max(count - 1, 0), "the stored head is not the last entry's")
        if key is not None and not hmac.compare_digest(stored_state.key, key):
            raise AuditTrailBroken(
                count, "the stored evolving key is not the initial key evolved once per entry"
            )
    if peer_head is not None:
        if peer_head.seq >= count:
            raise AuditTrailBroken(
                count,
                f"missing: the peer node received the head after entry {peer_head.seq}",
            )
        if peer_head.seq < 0 or not hmac.compare_digest(heads[peer_head.seq], peer_head.chain_hash):
            raise AuditTrailBroken(
                peer_head.seq, "differs from the head the peer node received for it"
            )
    return TrailSummary(
        entries=count,
        head=head,
        tags_checked=initial_key is not None,
        peer_head_checked=peer_head is not None,
    )
