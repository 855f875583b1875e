"""The node's choice of authentication for its next connection (``AuthPlanner``)."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from qkdnode.channel.auth import Credentials, Role
from qkdnode.channel.connection import ChannelConfig, PeerConnection
from qkdnode.channel.ledger import AuthKeyLedger
from qkdnode.channel.messages import KindRegistry
from qkdnode.coordination.events import StoreView

# ---- the node's choice of authentication mode -------------------------------------------------


class AttemptDecision(enum.Enum):
    NONE = "none"
    # the last key-derived attempt never completed its handshake: tried again, never downgraded
    KEY_DERIVED_REFUSED = "key_derived_refused"
    REBOOTSTRAP = "rebootstrap"  # an operator's re-bootstrap is in force for this connection


@dataclass(slots=True)
class AuthPlanner:
    """What authenticates the node's next connection; lives as long as the node (in memory).

    Once the ledger is active (the bootstrap window closed at rotation) every connection is
    key-derived, whatever happened to the last one: a reset, a timeout, a refusal or a crash
    never brings the bootstrap credentials back. Only ``operator_rebootstrap``, set by the shell
    from an operator's durable re-bootstrap permit, makes a connection bootstrap-authenticated
    (Alice sends, Bob accepts, a bootstrap Hello) and both ledgers reset in that session.
    """

    role: Role
    operator_rebootstrap: bool = False
    _last_key_derived: bool = False
    _last_completed: bool = True

    def next_connection(self, *, ledger_active: bool) -> tuple[bool, AttemptDecision]:
        """``(force_bootstrap, decision)`` for the next connection; records the attempt."""
        decision = AttemptDecision.NONE
        if self.operator_rebootstrap:
            decision = AttemptDecision.REBOOTSTRAP
        elif self._last_key_derived and not self._last_completed:
            decision = AttemptDecision.KEY_DERIVED_REFUSED
        self._last_key_derived = (
            self.role is Role.ALICE and ledger_active and not self.operator_rebootstrap
        )
        self._last_completed = False
        return self.operator_rebootstrap, decision

    @property
    def last_attempt_key_derived(self) -> bool:
        """Whether the connection made last tries key-derived authentication."""
        return self._last_key_derived

    def handshake_completed(self) -> None:
        self._last_completed = True

    def new_connection(
        self,
        *,
        last: PeerConnection | None,
        credentials: Credentials,
        registry: KindRegistry,
        ledger: AuthKeyLedger,
        config: ChannelConfig,
        random_bytes: Callable[[int], bytes],
        store: StoreView,
        admit_key_derived: Callable[[], bool] | None = None,
    ) -> tuple[PeerConnection, AttemptDecision]:
        """The node's next ``PeerConnection`` (``last``: the one before, if any)."""
        if last is not None and last.mode is not None:
            self.handshake_completed()
        force_bootstrap, decision = self.next_connection(ledger_active=ledger.active)
        connection = PeerConnection(
            self.role,
            credentials=credentials,
            registry=registry,
            ledger=ledger,
            config=config,
            random_bytes=random_bytes,
            force_bootstrap=force_bootstrap,
            staged_ledger=staged_ledger(ledger, store),
            admit_key_derived=admit_key_derived,
        )
        return connection, decision


def staged_ledger(ledger: AuthKeyLedger, store: StoreView) -> AuthKeyLedger | None:
    """A copy of the ledger with this node's staged blocks deposited, in block order (None when
    nothing is staged): what the peer holds if it committed them already."""
    staged = store.staged_block_ids()
    if not staged:
        return None
    probe = AuthKeyLedger(
        target_bits=ledger.state.target_bits,
        reserve_bits=ledger.state.reserve_bits,
        state=ledger.state,
    )
    for block_id in staged:
        share = store.staged_material(block_id)
        mark = min(share.ledger_mark_bits, probe.consumed_bits)
        probe.deposit(share.pool_material + share.consumer_material, mark_consumed_bits=mark)
    return probe


@dataclass(slots=True)
class HandshakeAdmission:
    """Bob's bound on key-derived handshake attempts (each uses up a handshake key): a token
    bucket of ``burst`` attempts refilled at ``rate_per_s``; ``admit(now_s)`` takes one."""

    rate_per_s: float
    burst: float
    _tokens: float = -1.0
    _last_s: float = 0.0

    def admit(self, now_s: float) -> bool:
        if self._tokens < 0:
            self._tokens, self._last_s = self.burst, now_s
        self._tokens = min(self.burst, self._tokens + (now_s - self._last_s) * self.rate_per_s)
        self._last_s = now_s
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True
