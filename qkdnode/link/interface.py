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
from typing import Literal, Protocol, runtime_checkable

from qkdnode.postprocess.records import DetectionRecords, EmissionRecords

Role = Literal["alice", "bob"]


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkParameters:
    """Nominal, public parameters of a link, as the key-length bound and Eve may know them.

    Intensities are mean photon numbers per pulse of the three classes (signal, decoy, vacuum
    or weakest decoy); ``p_*`` their probabilities; ``p_key_basis`` the probability of basis 0
    (Z, the key basis) at both ends. ``receiver_transmittance`` is η_Bob: receiver insertion
    loss times detector efficiency.
    """

    mu_signal: float
    mu_decoy: float
    mu_vacuum: float
    p_signal: float
    p_decoy: float
    p_vacuum: float
    p_key_basis: float
    pulse_rate_hz: float
    fiber_km: float
    attenuation_db_per_km: float
    receiver_transmittance: float
    dark_count_probability_per_gate: float
    afterpulse_probability: float
    misalignment_error: float

    @property
    def fibre_transmittance(self) -> float:
        """10^(−αL/10): transmittance of the fibre span alone."""
        return float(10.0 ** (-self.attenuation_db_per_km * self.fiber_km / 10.0))

    @property
    def channel_transmittance(self) -> float:
        """η = η_Bob · 10^(−αL/10) (Lo, Ma, Chen, PRL 94, 230504 (2005); Ma et al., PRA 72,
        012326 (2005), eq. 2), including receiver insertion loss and detector efficiency."""
        return self.receiver_transmittance * self.fibre_transmittance

    @property
    def intensities(self) -> tuple[float, float, float]:
        return (self.mu_signal, self.mu_decoy, self.mu_vacuum)

    @property
    def intensity_probabilities(self) -> tuple[float, float, float]:
        return (self.p_signal, self.p_decoy, self.p_vacuum)

    @property
    def background_yield(self) -> float:
        """Y0: probability of a click with no signal photon, from two independent detectors."""
        return 1.0 - (1.0 - self.dark_count_probability_per_gate) ** 2


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

    async def next_block(self, pulse_count: int) -> EmissionRecords | DetectionRecords:
        """Records of the next ``pulse_count`` pulses for this side.

        Alice gets ``EmissionRecords``, Bob ``DetectionRecords``. Raises ``LinkTimeout``,
        ``LinkLost`` or ``BadDeviceData`` (also when the peer's block boundary disagrees).
        """
        ...

    def nominal_parameters(self) -> LinkParameters:
        """Intensities, probabilities, pulse rate and channel parameters for the bound."""
        ...

    def status(self) -> LinkStatus:
        """Health view: state, counters, alarms, last error."""
        ...
