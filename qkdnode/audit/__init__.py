"""The tamper-evident audit trail (pure): entries, forward-secure tags, hash chain, verification.

The construction, the threat model and where the initial key lives are in ``docs/audit.md``;
the store keeps the trail (``qkdnode.store.audit``).
"""

from qkdnode.audit.trail import (
    GENESIS_HASH,
    INITIAL_KEY_BYTES,
    AuditEntry,
    AuditKind,
    AuditRecord,
    AuditState,
    PeerHead,
    TrailSummary,
    append_entry,
    chain_hash,
    decode_body,
    encode_body,
    entry_tag,
    evolve_key,
    initial_state,
    verify_trail,
)

__all__ = [
    "GENESIS_HASH",
    "INITIAL_KEY_BYTES",
    "AuditEntry",
    "AuditKind",
    "AuditRecord",
    "AuditState",
    "PeerHead",
    "TrailSummary",
    "append_entry",
    "chain_hash",
    "decode_body",
    "encode_body",
    "entry_tag",
    "evolve_key",
    "initial_state",
    "verify_trail",
]
