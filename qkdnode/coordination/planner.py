"""The node's choice of authentication for its next connection (``AuthPlanner``)."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from qkdnode.channel.auth import Credentials, Role
from qkdnode.channel.connection import ChannelConfig, PeerConnection
from qkdnode.channel.ledger import AuthKeyLedger
from qkdnode.channel.messages import KindRegistry
from qkdnode.coordination.events import ExhaustionPolicy

# ---- the node's choice of authentication mode -------------------------------------------------


class AttemptDecision(enum.Enum):
    NONE = "none"
    REBOOTSTRAP = "rebootstrap"  # the last key-derived attempt never completed its handshake
    REFUSED_HALT = "refused_halt"  # the same, under on_exhausted = "halt": keep trying


@dataclass(slots=True)
class AuthPlanner:
    """What authenticates the node's next connection; lives as long as the node (in memory).

    ``next_connection`` applies the policy: if the last attempt tried key-derived authentication
    and never completed its handshake, ``rebootstrap`` makes the next session a bootstrap one
    in which both sides reset their ledgers; ``halt`` keeps trying key-derived. A pool that
    cannot pay for a block under ``rebootstrap`` also forces bootstrap sessions, until a
    commit has filled the pool to its target again.
    """

    role: Role
    on_exhausted: ExhaustionPolicy
    force_bootstrap: bool = False
    ledger_reset_pending: bool = False
    _last_key_derived: bool = False
    _last_completed: bool = True

    def next_connection(self, *, ledger_active: bool) -> tuple[bool, AttemptDecision]:
        """``(force_bootstrap, decision)`` for the next connection; records the attempt."""
        decision = AttemptDecision.NONE
        if self._last_key_derived and not self._last_completed:
            if self.on_exhausted == "rebootstrap":
                self.force_bootstrap = True
                self.ledger_reset_pending = True
                decision = AttemptDecision.REBOOTSTRAP
            else:
                decision = AttemptDecision.REFUSED_HALT
        self._last_key_derived = (
            self.role is Role.ALICE and ledger_active and not self.force_bootstrap
        )
        self._last_completed = False
        return self.force_bootstrap, decision

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
        )
        return connection, decision

    def pool_exhausted(self) -> None:
        self.force_bootstrap = True

    def pool_refilled(self) -> None:
        self.force_bootstrap = False
