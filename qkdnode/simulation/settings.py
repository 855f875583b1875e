"""What a simulated run looks like (``SimSettings``) and what it reports (``RunReport``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

FAULTS: Final = (
    "drop",
    "duplicate",
    "reorder",
    "delay",
    "forge",
    "replay",
    "cut",
    "crash_alice",
    "crash_bob",
    "records_missing",
    "attacker_hello",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class SimSettings:
    """What a run looks like; every choice inside a run is drawn from its seed."""

    in_flight: int = 1
    warmup_steps_max: int = 400
    fault_steps_max: int = 200
    fault_probability: float = 0.04
    quiet_steps_max: int = 4000
    liveness_attempts: int = 3
    key_bits: int = 163_840
    key_size_bits: int = 4096  # keys are opaque to every invariant; fewer ids keep runs fast
    pool_target_bits: int = 131_072
    pool_reserve_bits: int = 16_384
    abort_probability: float = 0.1
    faults: tuple[str, ...] = FAULTS


@dataclass(slots=True)
class RunReport:
    """What one run did and which invariants it broke (``violations`` says how)."""

    seed: int
    steps: int = 0
    sessions: int = 0
    committing_sessions: int = 0
    faults_injected: int = 0
    downgrades: int = 0
    auth_bits_reused: int = 0
    store_disagreements: int = 0
    liveness_failures: int = 0
    violations: list[str] = field(default_factory=list)
    trace: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return bool(
            self.downgrades
            or self.auth_bits_reused
            or self.store_disagreements
            or self.liveness_failures
        )
