"""The ``[node]`` and ``[peer]`` sections: who this node is and how it reaches its peer (the
channel part of a ``[[peers]]`` entry too: ``qkdnode.config.peers``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from qkdnode.config.table import Table, address
from qkdnode.errors import ConfigError

# a node's role as configured, logged and passed to a link; the channel's ``Role`` enum
# (``qkdnode.channel.auth``) has the same two values
Role = Literal["alice", "bob"]


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeSection:
    name: str
    role: Role


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerSection:
    """The classical channel. The dialing side has ``connect``, the listening side ``listen``."""

    name: str
    listen: tuple[str, int] | None
    connect: tuple[str, int] | None
    connect_timeout_s: float
    io_timeout_s: float
    keepalive_interval_s: float
    reconnect_max_delay_s: float
    max_frame_bytes: int


def read_node(table: Table) -> NodeSection:
    role = table.string("role", choices=("alice", "bob"))
    section = NodeSection(name=table.string("name"), role="alice" if role == "alice" else "bob")
    table.finish()
    return section


def read_node_name(table: Table) -> str:
    """``[node]`` of a node with ``[[peers]]``: its name only (the role is per link)."""
    if table.has("role"):
        raise ConfigError(
            table.key("role"),
            "no role here with [[peers]]: this node's role is set per link (peers[i].role)",
        )
    name = table.string("name")
    table.finish()
    return name


def read_peer(table: Table) -> PeerSection:
    """Refuses a section with both or neither of ``listen`` and ``connect``."""
    section = read_peer_channel(table, name=table.string("name"))
    table.finish()
    return section


def read_peer_channel(table: Table, *, name: str) -> PeerSection:
    """The classical-channel keys of ``table`` (``[peer]`` or a ``[[peers]]`` entry), which
    must have exactly one of ``listen`` and ``connect``; other keys are left to the caller."""

    def positive_s(name: str, default: float) -> float:
        return table.number(name, default, minimum=0, exclusive_minimum=True)

    section = PeerSection(
        name=name,
        listen=address(table, "listen"),
        connect=address(table, "connect"),
        connect_timeout_s=positive_s("connect_timeout_s", 10.0),
        io_timeout_s=positive_s("io_timeout_s", 60.0),
        keepalive_interval_s=positive_s("keepalive_interval_s", 5.0),
        reconnect_max_delay_s=positive_s("reconnect_max_delay_s", 30.0),
        max_frame_bytes=table.integer("max_frame_bytes", 64 << 20, minimum=4096),
    )
    if (section.listen is None) == (section.connect is None):
        raise ConfigError(
            table.path or "peer", "exactly one of listen (host:port) or connect (host:port)"
        )
    return section
