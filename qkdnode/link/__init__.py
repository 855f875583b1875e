"""Quantum-link backends: the ``QuantumLink`` interface, the simulated decoy-state BB84 link and
the serial-attached device.

- ``qkdnode.link.interface``: ``QuantumLink`` (what a node needs from any backend),
  ``LinkParameters``, ``LinkStatus``, ``LinkState``.
- ``qkdnode.link.physics`` (pure numpy) and ``qkdnode.link.fibre`` (pure byte encoding).
- ``qkdnode.link.simulated``: the trio ends ``SimulatedAliceLink``, ``SimulatedBobLink`` and the
  fibre transports (in-process memory stream, TCP on loopback).
- ``qkdnode.link.eve``: intercept-resend and photon-number-splitting attacks as a fibre proxy.
- ``qkdnode.link.serialproto`` (pure: device framing, messages, block assembly),
  ``qkdnode.link.serial`` (``SerialLink`` over a tty, trio) and ``qkdnode.link.emulator`` (a
  device emulator on a pty, for tests and benchmarks); see docs/device-protocol.md.

The link settings (``SimulatedLinkConfig``, ``EveConfig``, ``SerialLinkConfig``) live in
``qkdnode.config.link``. Importing this package does not import trio; ``simulated``, ``eve``,
``serial`` and ``emulator`` do.
"""

from qkdnode.config.link import EveConfig, SimulatedLinkConfig
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
