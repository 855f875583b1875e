"""The node's links: ``[[peers]]`` (several), or ``[node] role`` with ``[peer]`` (one).

Each link (``PeerLink``) has the peer's name, this node's role on that link, the classical
channel (``listen`` or ``connect`` and its timeouts), the quantum link (``[peers.link]``, or the
top-level ``[link]``), the bootstrap credentials and pool settings (``[peers.auth]``, or the
top-level ``[auth]``) and a store directory of its own (``store_directory``, or
``<store.directory>/<peer name>``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from qkdnode.config.auth import AuthSection, read_auth
from qkdnode.config.link import EveConfig, LinkBackend, LinkConfig, read_link
from qkdnode.config.node import PeerSection, Role, read_peer_channel
from qkdnode.config.table import Table, resolve_path
from qkdnode.errors import ConfigError

# a peer's name is a directory name under store.directory and a metrics label value
_PEER_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

LinkReading = tuple[LinkBackend, LinkConfig, EveConfig]


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerLink:
    """One link of this node: everything that is per peer."""

    name: str  # the peer's name (pinned in its certificate)
    role: Role  # this node's role on this link
    peer: PeerSection
    link_backend: LinkBackend
    link: LinkConfig
    eve: EveConfig
    auth: AuthSection
    store_directory: Path


def read_peers(
    root: Table,
    base: Path,
    *,
    store_directory: Path,
    default_link: LinkReading | None,
    default_auth: AuthSection | None,
) -> tuple[PeerLink, ...]:
    """The ``[[peers]]`` array: at least one entry, names unique and usable as directory names,
    unknown keys refused as ``peers[i].key``. ``default_link`` and ``default_auth`` are the
    top-level ``[link]`` and ``[auth]`` (None when absent), for the entries without their own."""
    entries = root.table_list("peers")
    if not entries:
        raise ConfigError("peers", "at least one [[peers]] entry")
    links: list[PeerLink] = []
    for entry in entries:
        name = entry.string("name")
        if not _PEER_NAME.fullmatch(name):
            raise ConfigError(
                entry.key("name"),
                "a name of letters, digits, '.', '_' or '-' (at most 64, not starting with "
                "'.', '_' or '-'): it names the link's store directory and metrics label",
            )
        if any(link.name == name for link in links):
            raise ConfigError(entry.key("name"), f"a name not used by another peer ({name!r})")
        role = entry.string("role", choices=("alice", "bob"))
        channel = read_peer_channel(entry, name=name)
        if channel.listen is not None and any(link.peer.listen == channel.listen for link in links):
            raise ConfigError(entry.key("listen"), "an address no other peer listens on")
        if entry.has("link"):
            backend, link, eve = read_link(entry.table("link"), base)
        elif default_link is not None:
            backend, link, eve = default_link
        else:
            raise ConfigError(entry.key("link"), "a table (or a top-level [link] for every peer)")
        if entry.has("auth"):
            auth = read_auth(entry.table("auth"), base)
        elif default_auth is not None:
            auth = default_auth
        else:
            raise ConfigError(entry.key("auth"), "a table (or a top-level [auth] for every peer)")
        directory_text = entry.optional_string("store_directory")
        directory = (
            store_directory / name if directory_text is None else resolve_path(directory_text, base)
        )
        if any(link.store_directory == directory for link in links):
            raise ConfigError(entry.key("store_directory"), "a directory of this link alone")
        entry.finish()
        links.append(
            PeerLink(
                name=name,
                role="alice" if role == "alice" else "bob",
                peer=channel,
                link_backend=backend,
                link=link,
                eve=eve,
                auth=auth,
                store_directory=directory,
            )
        )
    return tuple(links)
