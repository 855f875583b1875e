"""What a node needs from any quantum-link backend, and nothing more.

A backend hands each side the raw records of the next block of pulses. Block boundaries are
agreed by absolute pulse index: both sides ask for blocks of the same size in the same order,
and the returned ``first_pulse_index`` values are equal (a backend raises ``BadDeviceData`` if
its device or fibre says otherwise). Failures are ``qkdnode.errors.LinkError`` subclasses:
``LinkTimeout``, ``LinkLost``, ``BadDeviceData``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from qkdnode.config.link import LinkParameters
from qkdnode.config.node import Role
from qkdnode.postprocess.records import AliceRecords, DetectionRecords

__all__ = ["LinkParameters", "LinkState", "LinkStatus", "QuantumLink", "Role"]


class LinkState(enum.Enum):
    """Health of a link. Values are stable: they appear in logs and metrics."""

    CLOSED = "closed"
    OPEN = "open"
    FAILED = "failed"


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkStatus:
    """A snapshot of a link's health, with no secret in it.

    ``alarms`` lists stable alarm names raised since ``open()`` (e.g. ``"bad_device_data"``,
    ``"timeout"``, ``"lost"``); ``last_error`` is the text of the last link error.
    ``simulated_time_s`` is pulses handled divided by the pulse rate.
    """

    role: Role
    state: LinkState
    blocks: int
    pulses_sent: int
    pulses_received: int
    detections: int
    simulated_time_s: float
    alarms: tuple[str, ...]
    last_error: str | None


@runtime_checkable
class QuantumLink(Protocol):
    """One end of a quantum link (async, trio)."""

    @property
    def role(self) -> Role: ...

    async def open(self) -> None:
        """Connect to the device or fibre. Raises ``LinkTimeout`` or ``LinkLost``."""
        ...

    async def aclose(self) -> None:
        """Release the device or fibre. Idempotent."""
        ...

    async def next_block(self, pulse_count: int) -> AliceRecords | DetectionRecords:
        """Records of the next ``pulse_count`` pulses for this side.

        Alice gets ``EmissionRecords`` or another ``AliceRecords`` (an ``EmissionLookup``),
        Bob ``DetectionRecords``. Raises ``LinkTimeout``,
        ``LinkLost`` or ``BadDeviceData`` (also when the peer's block boundary disagrees).
        """
        ...

    def nominal_parameters(self) -> LinkParameters:
        """Intensities, probabilities, pulse rate and channel parameters for the bound."""
        ...

    def status(self) -> LinkStatus:
        """Health view: state, counters, alarms, last error."""
        ...
