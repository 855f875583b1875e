"""Expected outcomes of a block, as events (never exceptions)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class AbortReason(enum.Enum):
    """Why a block produced no key. Values are stable: they appear in logs, metrics and JSON."""

    EMPTY_BLOCK = "empty_block"
    QBER_ABOVE_THRESHOLD = "qber_above_threshold"
    NO_POSITIVE_KEY = "no_positive_key"
    RECONCILIATION_FAILED = "reconciliation_failed"
    VERIFICATION_FAILED = "verification_failed"
    PEER_ABORTED = "peer_aborted"
    BAD_PEER_MESSAGE = "bad_peer_message"
    LINK_DATA_MISSING = "link_data_missing"


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockAborted:
    """A block ended without key. ``detail`` is human text with no secret in it."""

    reason: AbortReason
    detail: str = ""
