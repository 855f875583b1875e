"""A node's whole configuration: one TOML file -> one frozen ``NodeConfig``, refused loudly when
wrong (the sections are read by their own modules)."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from qkdnode.config.auth import AuthSection, read_auth
from qkdnode.config.delivery import DeliveryConfig, read_delivery
from qkdnode.config.link import (
    REPLAY_STORE_MARKER,
    EveConfig,
    LinkBackend,
    LinkConfig,
    SimulatedLinkConfig,
    read_link,
)
from qkdnode.config.node import NodeSection, PeerSection, read_node, read_node_name, read_peer
from qkdnode.config.ops import LoggingSection, read_logging, read_metrics_listen
from qkdnode.config.peers import PeerLink, read_peers
from qkdnode.config.postprocess import (
    PostprocessSection,
    read_postprocess,
    security_model_mismatch,
)
from qkdnode.config.relay import RelaySection, read_relay
from qkdnode.config.store import StoreSection, read_store
from qkdnode.config.table import Table
from qkdnode.errors import ConfigError


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeConfig:
    """The whole configuration of one node.

    ``link`` is a ``SimulatedLinkConfig`` when ``link_backend`` is ``"simulated"``, a
    ``SerialLinkConfig`` when it is ``"serial"`` and a ``ReplayLinkConfig`` when it is
    ``"replay"``; ``eve`` is inactive unless configured.

    ``peers`` lists the node's links (one for the ``[node] role`` + ``[peer]`` form). The
    per-link fields (``node.role``, ``peer``, ``link_backend``, ``link``, ``eve``, ``auth``,
    ``store.directory``) describe the first link; whatever runs or acts per link takes its
    view from :meth:`for_peer`.
    """

    file: Path
    node: NodeSection
    peer: PeerSection
    link_backend: LinkBackend
    link: LinkConfig
    eve: EveConfig
    postprocess: PostprocessSection
    auth: AuthSection
    store: StoreSection
    delivery: DeliveryConfig | None
    logging: LoggingSection
    metrics_listen: tuple[str, int] | None
    peers: tuple[PeerLink, ...] = ()
    relay: RelaySection | None = None

    @property
    def several_peers(self) -> bool:
        return len(self.peers) > 1

    def peer_named(self, name: str) -> PeerLink:
        """The link to the peer ``name``; ``ConfigError`` naming the configured peers if none."""
        for link in self.peers:
            if link.name == name:
                return link
        names = ", ".join(link.name for link in self.peers)
        raise ConfigError("peers", f"a peer named {name!r} (configured: {names})")

    def delivery_link(self) -> PeerLink | None:
        """The link whose keys the ETSI 014 server delivers, or None without ``[delivery]``."""
        if self.delivery is None:
            return None
        if self.delivery.peer is None:
            return self.peers[0]
        return self.peer_named(self.delivery.peer)

    def for_peer(self, link: PeerLink) -> NodeConfig:
        """The single-peer view of this node's link ``link``: what one link's ``Node`` runs on
        (``delivery`` only on the link it is bound to). With one peer: an equal config."""
        return dataclasses.replace(
            self,
            node=NodeSection(name=self.node.name, role=link.role),
            peer=link.peer,
            link_backend=link.link_backend,
            link=link.link,
            eve=link.eve,
            auth=link.auth,
            store=dataclasses.replace(self.store, directory=link.store_directory),
            delivery=self.delivery if self.delivery_link() == link else None,
            peers=(link,),
        )


def parse_config(data: Mapping[str, object], file: Path) -> NodeConfig:
    """Build a NodeConfig from parsed TOML; ConfigError (with the file) on any problem."""
    try:
        return _parse(data, file)
    except ConfigError as exc:
        if exc.file is None:
            raise ConfigError(exc.key, exc.expected, file=str(file)) from None
        raise


def _parse(data: Mapping[str, object], file: Path) -> NodeConfig:
    base = file.parent
    root = Table(data, "")
    if root.has("peers"):
        name = read_node_name(root.table("node"))
        postprocess = read_postprocess(root.table("postprocess"))
        store = read_store(root.table("store"), base)
        peers = _read_several(root, base, store)
        node = NodeSection(name=name, role=peers[0].role)
    else:
        node = read_node(root.table("node"))
        peer = read_peer(root.table("peer"))
        link_backend, link, eve = read_link(root.table("link"), base)
        postprocess = read_postprocess(root.table("postprocess"))
        auth = read_auth(root.table("auth"), base)
        store = read_store(root.table("store"), base)
        peers = (
            PeerLink(
                name=peer.name,
                role=node.role,
                peer=peer,
                link_backend=link_backend,
                link=link,
                eve=eve,
                auth=auth,
                store_directory=store.directory,
            ),
        )
    delivery_table = root.table("delivery", required=False)
    delivery = None
    if root.has("delivery"):
        delivery = read_delivery(delivery_table, base, store.key_size_bits)
        _check_delivery_peer(delivery, peers)
    relay = None
    if root.has("relay"):
        relay = read_relay(
            root.table("relay"),
            node_name=node.name,
            peer_names=tuple(link.name for link in peers),
            local_saes=delivery.local_saes if delivery is not None else (),
            peer_saes=delivery.peer_saes if delivery is not None else (),
        )
        _check_relay_parity(delivery, peers)
    logging = read_logging(root.table("logging", required=False), base)
    metrics_listen = read_metrics_listen(root.table("metrics", required=False))
    root.finish()
    first = peers[0]
    _check_security_model(postprocess, peers, several=root.has("peers"))
    _refuse_replayed_keys_for_delivery(peers, delivery)
    return NodeConfig(
        file=file,
        node=node,
        peer=first.peer,
        link_backend=first.link_backend,
        link=first.link,
        eve=first.eve,
        postprocess=postprocess,
        auth=first.auth,
        store=store,
        delivery=delivery,
        logging=logging,
        metrics_listen=metrics_listen,
        peers=peers,
        relay=relay,
    )


def _read_several(root: Table, base: Path, store: StoreSection) -> tuple[PeerLink, ...]:
    """``[[peers]]``: the single-peer form's ``[peer]`` is refused beside it; a top-level
    ``[link]`` or ``[auth]`` is checked even when every peer has its own."""
    if root.has("peer"):
        raise ConfigError(
            "peer",
            "either one [peer] (with [node] role) or [[peers]] entries, not both: move this "
            "peer into a [[peers]] entry with its name, role and listen or connect",
        )
    default_link = read_link(root.table("link"), base) if root.has("link") else None
    default_auth = read_auth(root.table("auth"), base) if root.has("auth") else None
    return read_peers(
        root,
        base,
        store_directory=store.directory,
        default_link=default_link,
        default_auth=default_auth,
    )


def _check_security_model(
    postprocess: PostprocessSection, peers: tuple[PeerLink, ...], *, several: bool
) -> None:
    """A simulated link's intensity classes fit the security model (a device's or a
    recording's are checked when the link opens, ``qkdnode.node.state``)."""
    for index, link in enumerate(peers):
        if not isinstance(link.link, SimulatedLinkConfig):
            continue
        expected = security_model_mismatch(postprocess.security_model, link.link.p_vacuum)
        if expected is not None:
            where = f"peers[{index}].link" if several else "link"
            raise ConfigError(f"{where}.p_vacuum", expected)


def _check_delivery_peer(delivery: DeliveryConfig, peers: tuple[PeerLink, ...]) -> None:
    """The ETSI 014 server serves one link's keys: ``delivery.peer`` names it, and must with
    several peers (an SAE pair belongs to one link; the others' keys are not served)."""
    names = [link.name for link in peers]
    if delivery.peer is None:
        if len(peers) > 1:
            raise ConfigError(
                "delivery.peer",
                "the name of the peer whose keys this server delivers (one of "
                + ", ".join(repr(name) for name in names)
                + "): with several peers, delivery serves one link",
            )
        return
    if delivery.peer not in names:
        raise ConfigError(
            "delivery.peer", "the name of a configured peer: " + ", ".join(map(repr, names))
        )


def _check_relay_parity(delivery: DeliveryConfig | None, peers: tuple[PeerLink, ...]) -> None:
    """The relay's pads come from this node's half of each link's keys (Alice's node: even
    positions, Bob's: odd), the half delivery hands out as master: both must agree."""
    if delivery is None:
        return
    link = next(link for link in peers if delivery.peer in (None, link.name))
    role_parity = 0 if link.role == "alice" else 1
    if delivery.master_parity != role_parity:
        raise ConfigError(
            "delivery.master_parity",
            f"{role_parity} with [relay] (this node is {link.role} on its delivery link)",
        )


def _refuse_replayed_keys_for_delivery(
    peers: tuple[PeerLink, ...], delivery: DeliveryConfig | None
) -> None:
    """Keys distilled from a recording are known to whoever holds its files: they never reach
    a consumer, neither from a replay link nor later from the store it filled."""
    if delivery is None:
        return
    served = [link for link in peers if delivery.peer in (None, link.name)]
    for link in served:
        if link.link_backend == "replay":
            raise ConfigError(
                "delivery",
                'no [delivery] for a link with backend = "replay" (keys distilled from a '
                "recording are not secret: its files hold both sides' raw bits)",
            )
        marker = link.store_directory / REPLAY_STORE_MARKER
        if marker.exists():
            raise ConfigError(
                "store.directory",
                f"a store that never held keys from a replayed recording ({marker} says this "
                "one did; its keys are not secret: use a fresh store directory)",
            )


def load_config(path: str | os.PathLike[str]) -> NodeConfig:
    """Read and validate a node's TOML file."""
    file = Path(path).resolve()
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("(file)", f"an existing config file ({file} not found)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("(syntax)", f"valid TOML: {exc}", file=str(file)) from None
    return parse_config(data, file)
