"""What the node tells operators about each block: the block log, metrics and systemd status.

Public figures only: counts, rates, the authentication budget, never key material.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from qkdnode.channel.auth import BLOCK_DRAW_BITS
from qkdnode.channel.connection import BlockAuthenticated
from qkdnode.channel.ledger import HANDSHAKE_SLOT_BYTES, AuthKeyLedger
from qkdnode.channel.messages import SessionMode
from qkdnode.config.auth import DEFAULT_ROTATION_POOL_BITS
from qkdnode.coordination.security import KeySecurityStatement
from qkdnode.ops.metrics import NodeMetrics
from qkdnode.ops.systemd import SystemdNotifier
from qkdnode.postprocess.events import BlockAborted
from qkdnode.postprocess.pipeline import BlockOutcome

log = structlog.get_logger("qkdnode.node")


@dataclass(slots=True)
class NodeCounters:
    """What the node has done since start (public figures only)."""

    blocks_committed: int = 0
    blocks_aborted: int = 0
    secret_bits: int = 0
    mode: str = "none"


@dataclass(slots=True)
class TurnClock:
    """One block's turns as this node sees them (monotonic seconds).

    A round trip runs from this node's role returning a reply (queued for the peer at once) to
    the peer's next turn being handed to this node's role: two hops plus the peer's work.
    """

    round_trips_s: list[float] = field(default_factory=list)
    # time inside this node's role calls, hand-offs to and from the worker thread included
    role_s: float = 0.0
    replied_s: float | None = None
    fed_s: float | None = None


def nearest_rank(sorted_values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of ascending ``sorted_values`` (nan when empty)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass(slots=True)
class BlockReporter:
    """Counts, logs and exports each finished block; times the link and post-processing."""

    metrics: NodeMetrics
    notifier: SystemdNotifier
    ledger: AuthKeyLedger
    key_size_bits: int
    security_budget_epsilon: float
    # below half of this above the reserve, an active pool is low (see ``_report_pool``)
    rotation_pool_bits: int = DEFAULT_ROTATION_POOL_BITS
    counters: NodeCounters = field(default_factory=NodeCounters)
    # the budget and low-pool alerts fire once per crossing, not on every block past it
    _over_budget: bool = False
    _pool_low: bool = False
    clock: Callable[[], float] = time.monotonic
    # per block in flight: when it opened and when its records arrived (monotonic seconds)
    _times: dict[int, tuple[float, float]] = field(default_factory=dict)
    _turns: dict[int, TurnClock] = field(default_factory=dict)

    def mode_changed(self, mode: str, reason: str) -> None:
        self.counters.mode = mode
        self.metrics.set_mode(mode)
        log.info("auth.mode", mode=mode, reason=reason)

    def _report_security(self, block_id: int, statement: KeySecurityStatement) -> None:
        self.metrics.key_security(statement.epsilon_total)
        over = statement.epsilon_total > self.security_budget_epsilon
        if over and not self._over_budget:
            log.warning(
                "security.budget_exceeded",
                block=block_id,
                epsilon_total=statement.epsilon_total,
                security_budget_epsilon=self.security_budget_epsilon,
                detail="keys are still made and served; a re-bootstrap on both nodes "
                "(qkdnode auth rebootstrap) starts a new chain, a smaller eps_sec slows the growth",
            )
        self._over_budget = over

    def _report_pool(self, block_id: int) -> None:
        # a key-derived commit that leaves the pool under half the margin it had at rotation:
        # blocks give less key than they cost, or fail more often than they commit
        headroom_bits = self.ledger.level_bits - self.ledger.state.reserve_bits
        key_derived = self.counters.mode == SessionMode.KEY_DERIVED.value
        low = key_derived and 2 * headroom_bits < self.rotation_pool_bits
        if low and not self._pool_low:
            log.warning(
                "auth.pool_low",
                block=block_id,
                pool_level_bits=self.ledger.level_bits,
                pool_reserve_bits=self.ledger.state.reserve_bits,
                detail="the pool is not refilling: each committed block must give more key "
                f"than its authentication costs ({BLOCK_DRAW_BITS} pool bits and a "
                f"{8 * HANDSHAKE_SLOT_BYTES}-bit handshake slot); raise "
                "postprocess.block_pulses, or look for failing blocks",
            )
        self._pool_low = low

    def block_started(self, block_id: int) -> None:
        now = self.clock()
        self._times[block_id] = (now, now)

    def records_taken(self, block_id: int) -> None:
        started, _ = self._times.get(block_id, (self.clock(), 0.0))
        self._times[block_id] = (started, self.clock())

    def role_called(self, block_id: int) -> None:
        """This node's role is handed a turn of the peer (or, for its first turn, started)."""
        now = self.clock()
        turns = self._turns.setdefault(block_id, TurnClock())
        if turns.replied_s is not None:
            turns.round_trips_s.append(now - turns.replied_s)
            turns.replied_s = None
        turns.fed_s = now

    def role_returned(self, block_id: int, *, replied: bool) -> None:
        """This node's role returned, with a reply for the peer or without."""
        now = self.clock()
        turns = self._turns.setdefault(block_id, TurnClock())
        if turns.fed_s is not None:
            turns.role_s += now - turns.fed_s
            turns.fed_s = None
        turns.replied_s = now if replied else None

    def block_done(
        self,
        block_id: int,
        outcome: BlockOutcome,
        auth: BlockAuthenticated,
        *,
        keys: int,
        pool_bytes: int,
        statement: KeySecurityStatement | None = None,
    ) -> None:
        """Count, log and export one finished block; a committed block reports its
        ``statement`` (the security statement its keys were staged with)."""
        now = self.clock()
        started, records = self._times.pop(block_id, (now, now))
        turns = self._turns.pop(block_id, TurnClock())
        round_trips_s = sorted(turns.round_trips_s)
        # every round trip, for benchmarks; the block's percentiles go in its own entry
        log.info(
            "block.turns",
            block=block_id,
            round_trip_ms=[round(1000 * value, 3) for value in turns.round_trips_s],
            role_s=round(turns.role_s, 4),
        )
        timing = {
            "round_trip_ms_p50": _ms(nearest_rank(round_trips_s, 0.5)),
            "round_trip_ms_p99": _ms(nearest_rank(round_trips_s, 0.99)),
            "role_s": round(turns.role_s, 3),
        }
        # the authentication budget of the block: bits drawn from the pool (0 while the session
        # is bootstrap-authenticated), frames tagged, and the accumulated forgery bound
        budget = {
            "auth_mode": auth.mode.value,
            "auth_bits_spent": auth.auth_bits_spent,
            "frames_tagged": auth.frames_sent + auth.frames_received,
            "forgery_bound_total": auth.forgery_bound_total,
            "tags_issued": self.ledger.tags_issued,
        }
        # wall time waiting for the link's records, and the post-processing exchange after it
        link_s = round(records - started, 3)
        postprocess_s = round(now - records, 3)
        counters = self.counters
        if isinstance(outcome, BlockAborted):
            counters.blocks_aborted += 1
            self.metrics.block_aborted(outcome.reason.value)
            log.info(
                "block.aborted",
                block=block_id,
                reason=outcome.reason.value,
                detail=outcome.detail,
                mode=counters.mode,
                link_s=link_s,
                postprocess_s=postprocess_s,
                **timing,
                **budget,
            )
        else:
            stats = outcome.statistics
            secret = keys * self.key_size_bits
            counters.blocks_committed += 1
            counters.secret_bits += secret
            efficiency = stats.reconciliation_efficiency
            self.metrics.block_committed(
                qber=stats.qber,
                sifted_bits=stats.sifted_key_bits,
                leak_bits=stats.reconciliation_bits + stats.verification_bits,
                reconciliation_efficiency=efficiency,
                secret_bits=secret,
                pool_level_bits=self.ledger.level_bits,
                mode=counters.mode,
            )
            log.info(
                "block.committed",
                block=block_id,
                mode=counters.mode,
                pulses=stats.pulse_count,
                detections=stats.detections,
                sifted_bits=stats.sifted_key_bits,
                qber=round(stats.qber, 6),
                test_qber=round(stats.test_qber, 6),
                reconciliation_efficiency=None if math.isnan(efficiency) else round(efficiency, 4),
                leak_bits=stats.reconciliation_bits + stats.verification_bits,
                round_trips=stats.round_trips,
                final_key_bits=stats.final_key_bits,
                secret_bits=secret,
                auth_pool_taken_bits=pool_bytes * 8,
                pool_level_bits=self.ledger.level_bits,
                keys=keys,
                key_counts=list(stats.key_counts),
                key_errors=list(stats.key_errors_per_intensity),
                test_counts=list(stats.test_counts),
                test_errors=list(stats.test_errors_per_intensity),
                reconciled_bits=stats.reconciled_bits,
                errors_corrected=stats.errors_corrected,
                link_s=link_s,
                postprocess_s=postprocess_s,
                **timing,
                **budget,
                **({} if statement is None else statement.fields()),
            )
            if statement is not None:
                self._report_security(block_id, statement)
            self._report_pool(block_id)
        self.notifier.status(
            f"{counters.blocks_committed} blocks committed, "
            f"{counters.blocks_aborted} aborted, {counters.secret_bits} secret bits, "
            f"auth {counters.mode}"
        )


def _ms(value_s: float) -> float | None:
    return None if math.isnan(value_s) else round(1000 * value_s, 3)
