"""What a simulated relay run looks like (``RelaySimSettings``) and what it reports
(``RelayRunReport``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

RELAY_FAULTS: Final = (
    "drop",
    "duplicate",
    "reorder",
    "delay",
    "crash",
    "crash_mid_effects",
    "pad_lag",
    "pad_corrupt",
)

#: the chain A - R - C and the routes requested on it (two hops both ways, and single hops)
NODES: Final = ("A", "R", "C")
LINKS: Final = (("A", "R"), ("R", "C"))
ROUTES: Final = (
    ("A", "R", "C"),
    ("A", "R", "C"),
    ("C", "R", "A"),
    ("A", "R"),
    ("R", "C"),
    ("C", "R"),
)
SAE_OF: Final = {"A": "sae-a", "R": "sae-r", "C": "sae-c"}


@dataclass(frozen=True, slots=True, kw_only=True)
class RelaySimSettings:
    """What a run looks like; every choice inside a run is drawn from its seed.

    ``scripted``: one relay along ``scripted_route``, no random fault, no deadline, straight
    to the quiet phase; ``crash_at_event`` (n, node) then crashes that node right after the
    run's n-th event (an input handled or an effect applied), once; ``scripted_corrupt_pad``
    flips a bit of the terminal's incoming pad first, so the confirmation aborts the relay."""

    warmup_steps_max: int = 150
    fault_steps_max: int = 400
    quiet_steps_max: int = 6000
    request_probability: float = 0.08
    fault_probability: float = 0.06
    handout_probability: float = 0.05
    key_bits_choices: tuple[int, ...] = (128, 256, 1024)
    pad_deposit_bits: int = 8 * 512
    pad_deposit_probability: float = 0.04
    pad_initial_bits: int = 8 * 768
    retransmit_interval_steps: int = 30
    down_steps_max: int = 40
    abort_after_steps_min: int = 5
    abort_after_steps_max: int = 300
    faults: tuple[str, ...] = RELAY_FAULTS
    crash_at_event: tuple[int, str] | None = None
    scripted: bool = False
    scripted_route: tuple[str, ...] = ("A", "R", "C")
    scripted_corrupt_pad: bool = False


@dataclass(slots=True)
class RelayRunReport:
    """What one run did and which invariants it broke (``violations`` says how)."""

    seed: int
    steps: int = 0
    events: int = 0
    requests: int = 0
    refused_at_request: int = 0
    relays_started: int = 0
    relays_committed: int = 0
    relays_aborted: int = 0
    tag_mismatch_aborts: int = 0
    keys_handed_out: int = 0
    messages_delivered: int = 0
    faults_injected: int = 0
    crashes: int = 0
    crashes_between_effects: int = 0
    pad_bits_allocated: int = 0
    payload_bits_relayed: int = 0
    hop_allocations: int = 0
    delivered_twice: int = 0
    lost: int = 0
    half_relayed: int = 0
    pad_reused: int = 0
    pad_misaccounted: int = 0
    protocol_errors: int = 0
    violations: list[str] = field(default_factory=list)
    trace: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return bool(self.violations)

    def violate(self, kind: str, text: str) -> None:
        """Count one violation of ``kind`` (a counter's name) and say what it was."""
        setattr(self, kind, getattr(self, kind) + 1)
        self.violations.append(f"{kind}: {text}")
