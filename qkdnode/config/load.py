"""A node's whole configuration: one TOML file -> one frozen ``NodeConfig``, refused loudly when
wrong (the sections are read by their own modules)."""

from __future__ import annotations

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
    read_link,
)
from qkdnode.config.node import NodeSection, PeerSection, read_node, read_peer
from qkdnode.config.ops import LoggingSection, read_logging, read_metrics_listen
from qkdnode.config.postprocess import PostprocessSection, read_postprocess
from qkdnode.config.store import StoreSection, read_store
from qkdnode.config.table import Table
from qkdnode.errors import ConfigError


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeConfig:
    """The whole configuration of one node.

    ``link`` is a ``SimulatedLinkConfig`` when ``link_backend`` is ``"simulated"``, a
    ``SerialLinkConfig`` when it is ``"serial"`` and a ``ReplayLinkConfig`` when it is
    ``"replay"``; ``eve`` is inactive unless configured.
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
    node = read_node(root.table("node"))
    peer = read_peer(root.table("peer"))
    link_backend, link, eve = read_link(root.table("link"), base)
    postprocess = read_postprocess(root.table("postprocess"))
    auth = read_auth(root.table("auth"), base)
    store = read_store(root.table("store"), base)
    delivery_table = root.table("delivery", required=False)
    delivery = None
    if root.has("delivery"):
        delivery = read_delivery(delivery_table, base, store.key_size_bits)
    logging = read_logging(root.table("logging", required=False), base)
    metrics_listen = read_metrics_listen(root.table("metrics", required=False))
    root.finish()
    _refuse_replayed_keys_for_delivery(link_backend, delivery, store)
    return NodeConfig(
        file=file,
        node=node,
        peer=peer,
        link_backend=link_backend,
        link=link,
        eve=eve,
        postprocess=postprocess,
        auth=auth,
        store=store,
        delivery=delivery,
        logging=logging,
        metrics_listen=metrics_listen,
    )


def _refuse_replayed_keys_for_delivery(
    link_backend: LinkBackend, delivery: DeliveryConfig | None, store: StoreSection
) -> None:
    """Keys distilled from a recording are known to whoever holds its files: they never reach
    a consumer, neither from a replay node nor later from the store it filled."""
    if delivery is None:
        return
    if link_backend == "replay":
        raise ConfigError(
            "delivery",
            'no [delivery] section with link.backend = "replay" (keys distilled from a '
            "recording are not secret: its files hold both sides' raw bits)",
        )
    marker = store.directory / REPLAY_STORE_MARKER
    if marker.exists():
        raise ConfigError(
            "store.directory",
            f"a store that never held keys from a replayed recording ({marker} says this one "
            "did; its keys are not secret: use a fresh store directory)",
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
