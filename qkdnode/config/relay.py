"""The ``[relay]`` section: trusted-node key relay (docs/relay.md).

A node with ``[relay]`` relays keys through its links: as the origin for its SAEs' requests to
SAEs at other nodes, as a middle node, and as the terminal for its own SAEs. Routes and the SAE
directory are static::

    [relay]
    pad_target_bits = 262144   # unallocated pad kept ready per link and direction
    timeout_s = 5.0            # an ETSI 014 request waits this long for its relays
    prebind_keys = 64          # keys relayed ahead for each SAE pair that asked for keys

    [[relay.remote]]           # the SAEs at node "C", reached through "R"
    node = "C"
    via = ["R"]
    saes = ["sae-c"]

The route to a remote node is ``[this node, *via, node]``; ``via[0]`` (or ``node`` itself when
``via`` is empty) must be a configured peer. Node names on routes are the nodes' ``[node] name``s,
and each link's peer name must be the neighbour's node name.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from qkdnode.config.table import Table
from qkdnode.errors import ConfigError

# node names on relay routes (the relay's wire checks the same rule: qkdnode.relay.messages)
MAX_ROUTE_NODES: Final = 8
MAX_NODE_NAME_CHARS: Final = 32
NODE_NAME_CHARS: Final = frozenset(string.ascii_letters + string.digits + "-_.")
DEFAULT_PAD_TARGET_BITS: Final = 262_144
MAX_PAD_TARGET_BITS: Final = 1 << 30
DEFAULT_RELAY_PREBIND_KEYS: Final = 64
MAX_RELAY_PREBIND_KEYS: Final = 4096
_NODE_NAME: Final = "a name usable on a relay route: 1..32 letters, digits, '.', '-' or '_'"


def is_node_name(name: object) -> bool:
    """``name`` can stand on a relay route: 1..32 characters of [A-Za-z0-9._-]."""
    return (
        type(name) is str and 1 <= len(name) <= MAX_NODE_NAME_CHARS and set(name) <= NODE_NAME_CHARS
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class RemoteNode:
    """SAEs served at another node, and the route to it (this node first)."""

    node: str
    route: tuple[str, ...]
    saes: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class RelaySection:
    """``[relay]``: ``remotes`` by node name; ``sae_nodes`` maps a remote SAE to its node."""

    pad_target_bits: int = DEFAULT_PAD_TARGET_BITS
    timeout_s: float = 5.0
    retransmit_s: float = 1.0
    # keys relayed ahead per (local master SAE, remote slave SAE, size) that asked; 0: on request
    prebind_keys: int = DEFAULT_RELAY_PREBIND_KEYS
    remotes: Mapping[str, RemoteNode] = field(default_factory=dict)

    @property
    def sae_nodes(self) -> dict[str, str]:
        return {sae: remote.node for remote in self.remotes.values() for sae in remote.saes}

    def route_to_sae(self, sae: str) -> tuple[str, ...] | None:
        """The route to the node serving ``sae``, or None when no remote node serves it."""
        node = self.sae_nodes.get(sae)
        return None if node is None else self.remotes[node].route


def read_relay(
    table: Table,
    *,
    node_name: str,
    peer_names: tuple[str, ...],
    local_saes: tuple[str, ...],
    peer_saes: tuple[str, ...] = (),
) -> RelaySection:
    """Read and check ``[relay]``; ConfigError names the dotted key. A remote SAE may be
    neither one of this node's SAEs nor one of its delivery peer's (``delivery.peer_saes``):
    an SAE is served by one node."""
    if not is_node_name(node_name):
        raise ConfigError("node.name", _NODE_NAME)
    for index, name in enumerate(peer_names):
        if not is_node_name(name):
            key = f"peers[{index}].name" if len(peer_names) > 1 else "peer.name"
            raise ConfigError(key, f"a peer name for relay routes ({_NODE_NAME})")
    remotes: dict[str, RemoteNode] = {}
    seen_saes: set[str] = set(local_saes) | set(peer_saes)
    for entry in table.table_list("remote"):
        node = entry.string("node")
        via = entry.string_list("via", [])
        route = (node_name, *via, node)
        if len(set(route)) != len(route) or len(route) > MAX_ROUTE_NODES:
            raise ConfigError(
                entry.key("via"),
                f"distinct nodes, not this node or {node!r}, at most {MAX_ROUTE_NODES - 2}",
            )
        if route[1] not in peer_names:
            raise ConfigError(
                entry.key("via") if via else entry.key("node"),
                f"the route's first hop ({route[1]!r}) to be a configured peer: "
                + ", ".join(map(repr, peer_names)),
            )
        if node in remotes:
            raise ConfigError(entry.key("node"), f"a node not listed twice ({node!r})")
        saes = entry.string_list("saes")
        if not saes:
            raise ConfigError(entry.key("saes"), "at least one SAE ID")
        for sae in saes:
            if sae in seen_saes:
                raise ConfigError(
                    entry.key("saes"), f"SAE IDs served by one node only ({sae!r} is twice)"
                )
            seen_saes.add(sae)
        for index, name in enumerate(route):
            if not is_node_name(name):
                raise ConfigError(
                    entry.key("via" if 0 < index < len(route) - 1 else "node"), _NODE_NAME
                )
        entry.finish()
        remotes[node] = RemoteNode(node=node, route=route, saes=saes)
    section = RelaySection(
        pad_target_bits=table.integer(
            "pad_target_bits", DEFAULT_PAD_TARGET_BITS, minimum=4096, maximum=MAX_PAD_TARGET_BITS
        ),
        timeout_s=table.number("timeout_s", 5.0, minimum=0.0, exclusive_minimum=True),
        retransmit_s=table.number("retransmit_s", 1.0, minimum=0.01, maximum=60.0),
        prebind_keys=table.integer(
            "prebind_keys", DEFAULT_RELAY_PREBIND_KEYS, minimum=0, maximum=4096
        ),
        remotes=remotes,
    )
    table.finish()
    return section
