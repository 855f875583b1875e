"""Quantum-link backends: the ``QuantumLink`` interface and the simulated decoy-state BB84 link.

- ``qkdnode.link.interface``: ``QuantumLink`` (what a node needs from any backend),
  ``LinkParameters``, ``LinkStatus``, ``LinkState``.
- ``qkdnode.link.config``: ``SimulatedLinkConfig``, ``EveConfig`` (validated, units in names).
- ``qkdnode.link.physics`` (pure numpy) and ``qkdnode.link.fibre`` (pure byte encoding).
- ``qkdnode.link.simulated``: the trio ends ``SimulatedAliceLink``, ``SimulatedBobLink`` and the
  fibre transports (in-process memory stream, TCP on loopback).
- ``qkdnode.link.eve``: intercept-resend and photon-number-splitting attacks as a fibre proxy.

Importing this package does not import trio; ``simulated`` and ``eve`` do.
"""

from qkdnode.link.config import EveConfig, SimulatedLinkConfig
from qkdnode.link.interface import LinkParameters, LinkState, LinkStatus, QuantumLink, Role

__all__ = [
    "EveConfig",
    "LinkParameters",
    "LinkState",
    "LinkStatus",
    "QuantumLink",
    "Role",
    "SimulatedLinkConfig",
]
