"""A node's configuration: one TOML file -> frozen dataclasses, refused loudly when wrong.

Every error names the file, the dotted key and what was expected. Unknown keys are refused (they
are typos or options of another version). Relative paths are relative to the config file's
directory. Files the node needs must exist; private-key and PSK files must not be readable by
group or others. Units live in every name.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from qkdnode.configtools import Table, parse_host_port
from qkdnode.errors import ConfigError

Role = Literal["alice", "bob"]
AuthMode = Literal["pki", "psk"]
OnExhausted = Literal["rebootstrap", "halt"]
SecurityModel = Literal["decoy", "single_photon"]
# Decoy finite-key analysis (qkdnode.postprocess.finitekey.FiniteKeyAnalysis values).
FiniteKey = Literal["lim2014", "zhang2017", "lim2014-kl"]


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


@dataclass(frozen=True, slots=True, kw_only=True)
class PostprocessSection:
    block_pulses: int
    cascade_variant: str
    security_model: SecurityModel
    finite_key: FiniteKey
    eps_sec: float
    eps_cor: float
    qber_threshold: float
    sample_bits: int


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthSection:
    """Bootstrap credentials and the authentication-key pool. No secret is held here: paths only."""

    mode: AuthMode
    ca_file: Path | None
    certificate_file: Path | None
    private_key_file: Path | None
    psk_file: Path | None
    pool_target_bits: int
    pool_reserve_bits: int
    on_exhausted: OnExhausted


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreSection:
    directory: Path
    key_size_bits: int


@dataclass(frozen=True, slots=True, kw_only=True)
class LoggingSection:
    level: str
    format: Literal["auto", "json", "console"]
    file: Path | None


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeConfig:
    """The whole configuration of one node. ``link`` and ``delivery`` are parsed by their owners."""

    file: Path
    node: NodeSection
    peer: PeerSection
    link_backend: Literal["simulated", "serial"]
    link: Any
    eve: Any
    postprocess: PostprocessSection
    auth: AuthSection
    store: StoreSection
    delivery: Any
    logging: LoggingSection
    metrics_listen: tuple[str, int] | None


def _path(
    table: Table, name: str, base: Path, *, required: bool, secret: bool = False
) -> Path | None:
    text = table.string(name) if required else table.optional_string(name)
    if text is None:
        return None
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = base / path
    if not path.exists():
        raise ConfigError(table.key(name), f"an existing file ({path} does not exist)")
    if secret:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            raise ConfigError(
                table.key(name),
                f"a private file: {path} has mode {mode:o}, readable by group or others"
                f" (chmod 600 {path})",
            )
    return path


def _address(table: Table, name: str) -> tuple[str, int] | None:
    if not table.has(name):
        table.optional_string(name)
        return None
    return table.parsed(name, parse_host_port, "host:port (e.g. 127.0.0.1:7000)")


LinkBackend = Literal["simulated", "serial"]


def _link(table: Table) -> tuple[LinkBackend, Any, Any]:
    backend = table.string("backend", "simulated", choices=("simulated", "serial"))
    if backend == "simulated":
        from qkdnode.link.config import EveConfig, SimulatedLinkConfig

        eve = EveConfig.from_mapping(
            table.table("eve", required=False).take_rest(), path="link.eve"
        )
        link = SimulatedLinkConfig.from_mapping(table.take_rest(), path="link")
        return "simulated", link, eve
    from qkdnode.link.serial import SerialLinkConfig

    if table.has("eve"):
        raise ConfigError("link.eve", "no eavesdropper with a serial device")
    return "serial", SerialLinkConfig.from_table(table), None


def _delivery(table: Table, base: Path, key_size_bits: int) -> Any:
    from qkdnode.delivery.server import DeliveryConfig

    config = DeliveryConfig.from_table(table)
    if config.limits.key_size_bits != key_size_bits:
        raise ConfigError("delivery.key_size_bits", f"{key_size_bits}, the store.key_size_bits")
    resolved: dict[str, Path] = {}
    for name in ("certificate", "private_key", "sae_ca"):
        path = getattr(config, name)
        path = path if path.is_absolute() else base / path
        if not path.exists():
            raise ConfigError(f"delivery.{name}", f"an existing file ({path} does not exist)")
        resolved[name] = path
    mode = stat.S_IMODE(os.stat(resolved["private_key"]).st_mode)
    if mode & 0o077:
        raise ConfigError(
            "delivery.private_key", f"a private file: {resolved['private_key']} has mode {mode:o}"
        )
    unix_path = config.unix_socket_path
    if unix_path is not None and not unix_path.is_absolute():
        unix_path = base / unix_path
    return dataclasses.replace(
        config,
        certificate=resolved["certificate"],
        private_key=resolved["private_key"],
        sae_ca=resolved["sae_ca"],
        unix_socket_path=unix_path,
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

    node_t = root.table("node")
    node = NodeSection(
        name=node_t.string("name"),
        role=node_t.string("role", choices=("alice", "bob")),  # type: ignore[arg-type]
    )
    node_t.finish()

    peer_t = root.table("peer")
    peer = PeerSection(
        name=peer_t.string("name"),
        listen=_address(peer_t, "listen"),
        connect=_address(peer_t, "connect"),
        connect_timeout_s=peer_t.number(
            "connect_timeout_s", 10.0, minimum=0, exclusive_minimum=True
        ),
        io_timeout_s=peer_t.number("io_timeout_s", 60.0, minimum=0, exclusive_minimum=True),
        keepalive_interval_s=peer_t.number(
            "keepalive_interval_s", 5.0, minimum=0, exclusive_minimum=True
        ),
        reconnect_max_delay_s=peer_t.number(
            "reconnect_max_delay_s", 30.0, minimum=0, exclusive_minimum=True
        ),
        max_frame_bytes=peer_t.integer("max_frame_bytes", 64 << 20, minimum=4096),
    )
    if (peer.listen is None) == (peer.connect is None):
        raise ConfigError("peer", "exactly one of listen (host:port) or connect (host:port)")
    peer_t.finish()

    link_backend, link, eve = _link(root.table("link"))

    pp_t = root.table("postprocess")
    postprocess = PostprocessSection(
        block_pulses=pp_t.integer("block_pulses", 50_000_000, minimum=1000),
        cascade_variant=pp_t.string(
            "cascade_variant", "subblock-reuse", choices=("original", "yan", "subblock-reuse")
        ),
        security_model=pp_t.string("security_model", "decoy", choices=("decoy", "single_photon")),  # type: ignore[arg-type]
        finite_key=pp_t.string(
            "finite_key", "lim2014-kl", choices=("lim2014", "zhang2017", "lim2014-kl")
        ),  # type: ignore[arg-type]
        eps_sec=pp_t.number(
            "eps_sec", 1e-10, minimum=0, maximum=1, exclusive_minimum=True, exclusive_maximum=True
        ),
        eps_cor=pp_t.number(
            "eps_cor", 1e-12, minimum=0, maximum=1, exclusive_minimum=True, exclusive_maximum=True
        ),
        qber_threshold=pp_t.number(
            "qber_threshold",
            0.11,
            minimum=0,
            maximum=0.5,
            exclusive_minimum=True,
            exclusive_maximum=True,
        ),
        sample_bits=pp_t.integer("sample_bits", 1024, minimum=0),
    )
    pp_t.finish()

    auth_t = root.table("auth")
    mode = auth_t.string("mode", choices=("pki", "psk"))
    pki = mode == "pki"
    auth = AuthSection(
        mode=mode,  # type: ignore[arg-type]
        ca_file=_path(auth_t, "ca_file", base, required=pki),
        certificate_file=_path(auth_t, "certificate_file", base, required=pki),
        private_key_file=_path(auth_t, "private_key_file", base, required=pki, secret=True),
        psk_file=_path(auth_t, "psk_file", base, required=not pki, secret=True),
        pool_target_bits=auth_t.integer("pool_target_bits", 1 << 20, minimum=1024),
        pool_reserve_bits=auth_t.integer("pool_reserve_bits", 1 << 16, minimum=0),
        on_exhausted=auth_t.string("on_exhausted", "rebootstrap", choices=("rebootstrap", "halt")),  # type: ignore[arg-type]
    )
    if auth.pool_reserve_bits >= auth.pool_target_bits:
        raise ConfigError("auth.pool_reserve_bits", "less than auth.pool_target_bits")
    auth_t.finish()

    store_t = root.table("store")
    directory = Path(store_t.string("directory")).expanduser()
    store = StoreSection(
        directory=directory if directory.is_absolute() else base / directory,
        key_size_bits=store_t.integer("key_size_bits", 256, minimum=64, maximum=1 << 16),
    )
    if store.key_size_bits % 8:
        raise ConfigError("store.key_size_bits", "a multiple of 8")
    store_t.finish()

    delivery = None
    if root.has("delivery"):
        delivery = _delivery(root.table("delivery"), base, store.key_size_bits)
    else:
        root.table("delivery", required=False)

    log_t = root.table("logging", required=False)
    log_file = log_t.optional_string("file")
    logging = LoggingSection(
        level=log_t.string("level", "info", choices=("debug", "info", "warning", "error")),
        format=log_t.string("format", "auto", choices=("auto", "json", "console")),  # type: ignore[arg-type]
        file=None if log_file is None else (base / Path(log_file).expanduser()),
    )
    log_t.finish()

    metrics_t = root.table("metrics", required=False)
    metrics_listen = _address(metrics_t, "listen")
    metrics_t.finish()

    root.finish()
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
