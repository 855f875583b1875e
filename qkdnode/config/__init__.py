"""A node's configuration: one TOML file -> frozen dataclasses, refused loudly when wrong.

Every error names the file, the dotted key and what was expected. Unknown keys are refused (they
are typos or options of another version). Relative paths are relative to the config file's
directory. Files the node needs must exist; private-key and PSK files must not be readable by
group or others. Units live in every name.

This package imports nothing but :mod:`qkdnode.errors`; one module per section:

- ``table``: the strict table reader every section uses (``Table``, ``parse_host_port``);
- ``node`` (``[node]``, ``[peer]``), ``peers`` (``[[peers]]``: a node's links), ``link``
  (``[link]``, ``[link.eve]``, serial devices, replayed recordings), ``postprocess``, ``auth``,
  ``store``, ``delivery``, ``ops`` (``[logging]``, ``[metrics]``);
- ``load``: ``NodeConfig``, ``parse_config`` and ``load_config`` over the whole file.
"""

from qkdnode.config.auth import AuthMode, AuthSection
from qkdnode.config.delivery import ApiLimits, DeliveryConfig, ServerLimits
from qkdnode.config.link import (
    EveConfig,
    LinkBackend,
    LinkParameters,
    ReplayLinkConfig,
    SerialLinkConfig,
    SimulatedLinkConfig,
)
from qkdnode.config.load import NodeConfig, load_config, parse_config
from qkdnode.config.node import NodeSection, PeerSection, Role
from qkdnode.config.ops import LoggingSection
from qkdnode.config.peers import PeerLink
from qkdnode.config.postprocess import FiniteKey, PostprocessSection, SecurityModel
from qkdnode.config.store import StoreSection

__all__ = [
    "ApiLimits",
    "AuthMode",
    "AuthSection",
    "DeliveryConfig",
    "EveConfig",
    "FiniteKey",
    "LinkBackend",
    "LinkParameters",
    "LoggingSection",
    "NodeConfig",
    "NodeSection",
    "PeerLink",
    "PeerSection",
    "PostprocessSection",
    "ReplayLinkConfig",
    "Role",
    "SecurityModel",
    "SerialLinkConfig",
    "ServerLimits",
    "SimulatedLinkConfig",
    "StoreSection",
    "load_config",
    "parse_config",
]
