"""The ``[delivery]`` section: the ETSI GS QKD 014 server, its SAEs, limits and quotas."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from qkdnode.config.table import Table, existing_file, parse_host_port, resolve_path
from qkdnode.errors import ConfigError

DEFAULT_PREBIND_KEYS: Final = 32  # per (master, slave) pair: [delivery] prebind_keys
# HKDF-SHA256 expands to at most 255 blocks: the largest hybrid key (qkdnode.delivery.hybrid)
HYBRID_MAX_KEY_SIZE_BITS: Final = 255 * 32 * 8


class KeyKind(enum.Enum):
    """What an SAE pair's delivered keys are (``[[delivery.pairs]] kind``)."""

    QKD = "qkd"  # the QKD key itself (information-theoretic, the default)
    HYBRID = "hybrid"  # QKD key combined with a fresh ML-KEM-768 secret (computational)


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiLimits:
    """The limits advertised in Status and enforced on every request (sizes in bits)."""

    key_size_bits: int  # the default size (= the stored key size)
    min_key_size_bits: int
    max_key_size_bits: int
    max_keys_per_request: int

    def __post_init__(self) -> None:
        sizes = (self.min_key_size_bits, self.key_size_bits, self.max_key_size_bits)
        if any(s <= 0 or s % 8 for s in sizes) or not sizes[0] <= sizes[1] <= sizes[2]:
            raise ValueError("key sizes must be positive multiples of 8 with min <= default <= max")
        if self.max_keys_per_request < 1:
            raise ValueError("max_keys_per_request must be >= 1")


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerLimits:
    max_header_bytes: int = 16384
    max_body_bytes: int = 65536
    request_timeout_s: float = 10.0
    handshake_timeout_s: float = 10.0
    max_connections: int = 256


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryConfig:
    """The ``[delivery]`` table of a node's configuration."""

    listen_host: str
    listen_port: int
    certificate: Path
    private_key: Path
    sae_ca: Path
    kme_id: str
    peer_kme_id: str
    local_saes: tuple[str, ...]
    peer_saes: tuple[str, ...]
    master_parity: int
    limits: ApiLimits
    server: ServerLimits = field(default_factory=ServerLimits)
    max_key_count: int = 1_000_000
    quota_keys_per_s: float = 1000.0
    quota_burst_keys: float = 2000.0
    peer_timeout_s: float = 5.0
    prebind_keys: int = DEFAULT_PREBIND_KEYS
    unix_socket_path: Path | None = None
    unix_socket_sae: str | None = None
    unix_socket_mode: int = 0o600
    # the CRLs of the SAE CA (PEM), reread on SIGHUP; None: no revocation checking
    sae_crl: Path | None = None
    # (master SAE, slave SAE) -> kind; pairs not listed get KeyKind.QKD
    pair_kinds: Mapping[tuple[str, str], KeyKind] = field(default_factory=dict)
    # the link whose keys are delivered (a [[peers]] name); None: the only peer
    peer: str | None = None

    def key_kind(self, master_sae: str, slave_sae: str) -> KeyKind:
        return self.pair_kinds.get((master_sae, slave_sae), KeyKind.QKD)

    @classmethod
    def from_table(cls, table: Table) -> DeliveryConfig:
        """Read and check the table; raises ConfigError naming the dotted key."""
        host, port = table.parsed("listen", parse_host_port, "host:port", ("127.0.0.1", 8443))
        key_size = table.integer("key_size_bits", 256, minimum=8, maximum=65536)
        if key_size % 8:
            raise ConfigError(table.key("key_size_bits"), "a multiple of 8")
        min_size = table.integer("min_key_size_bits", 8, minimum=8, maximum=key_size)
        max_size = table.integer("max_key_size_bits", 8 * key_size, minimum=key_size)
        for name, size in (("min_key_size_bits", min_size), ("max_key_size_bits", max_size)):
            if size % 8:
                raise ConfigError(table.key(name), "a multiple of 8")
        limits = ApiLimits(
            key_size_bits=key_size,
            min_key_size_bits=min_size,
            max_key_size_bits=max_size,
            max_keys_per_request=table.integer(
                "max_keys_per_request", 128, minimum=1, maximum=4096
            ),
        )
        server = ServerLimits(
            max_header_bytes=table.integer("max_header_bytes", 16384, minimum=1024),
            max_body_bytes=table.integer("max_body_bytes", 65536, minimum=1024),
            request_timeout_s=table.number(
                "request_timeout_s", 10.0, minimum=0.0, exclusive_minimum=True
            ),
            handshake_timeout_s=table.number(
                "handshake_timeout_s", 10.0, minimum=0.0, exclusive_minimum=True
            ),
            max_connections=table.integer("max_connections", 256, minimum=1),
        )
        local_saes = table.string_list("local_saes")
        peer_saes = table.string_list("peer_saes")
        if not local_saes:
            raise ConfigError(table.key("local_saes"), "at least one SAE ID")
        if set(local_saes) & set(peer_saes):
            raise ConfigError(table.key("peer_saes"), "SAE IDs distinct from local_saes")
        unix_path = table.optional_string("unix_socket_path")
        unix_sae = table.optional_string("unix_socket_sae")
        if (unix_path is None) != (unix_sae is None):
            raise ConfigError(table.key("unix_socket_sae"), "set together with unix_socket_path")
        if unix_sae is not None and unix_sae not in local_saes:
            raise ConfigError(table.key("unix_socket_sae"), "one of local_saes")
        burst = table.number("quota_burst_keys", 2000.0, minimum=1.0)
        sae_crl = table.optional_string("sae_crl")
        pair_kinds = _pair_kinds(table, local_saes, peer_saes)
        if KeyKind.HYBRID in pair_kinds.values() and max_size > HYBRID_MAX_KEY_SIZE_BITS:
            raise ConfigError(
                table.key("max_key_size_bits"),
                f"at most {HYBRID_MAX_KEY_SIZE_BITS} when a pair is hybrid (HKDF-SHA256 limit)",
            )
        config = cls(
            listen_host=host,
            listen_port=port,
            certificate=Path(table.string("certificate")),
            private_key=Path(table.string("private_key")),
            sae_ca=Path(table.string("sae_ca")),
            kme_id=table.string("kme_id"),
            peer_kme_id=table.string("peer_kme_id"),
            local_saes=local_saes,
            peer_saes=peer_saes,
            master_parity=table.integer("master_parity", minimum=0, maximum=1),
            limits=limits,
            server=server,
            max_key_count=table.integer("max_key_count", 1_000_000, minimum=1),
            quota_keys_per_s=table.number(
                "quota_keys_per_s", 1000.0, minimum=0.0, exclusive_minimum=True
            ),
            quota_burst_keys=burst,
            peer_timeout_s=table.number("peer_timeout_s", 5.0, minimum=0.0, exclusive_minimum=True),
            prebind_keys=table.integer(
                "prebind_keys", DEFAULT_PREBIND_KEYS, minimum=0, maximum=4096
            ),
            unix_socket_path=None if unix_path is None else Path(unix_path),
            unix_socket_sae=unix_sae,
            unix_socket_mode=table.integer("unix_socket_mode", 0o600, minimum=0, maximum=0o777),
            sae_crl=None if sae_crl is None else Path(sae_crl),
            pair_kinds=pair_kinds,
            peer=table.optional_string("peer"),
        )
        table.finish()
        return config


def _pair_kinds(
    table: Table, local_saes: Sequence[str], peer_saes: Sequence[str]
) -> dict[tuple[str, str], KeyKind]:
    """``[[delivery.pairs]]``: master_sae_id, slave_sae_id (local or peer SAEs, one on each
    node) and kind ("qkd" or "hybrid"); a pair named twice is refused."""
    kinds: dict[tuple[str, str], KeyKind] = {}
    for entry in table.table_list("pairs"):
        master = entry.string("master_sae_id")
        slave = entry.string("slave_sae_id")
        for name, sae in (("master_sae_id", master), ("slave_sae_id", slave)):
            if sae not in local_saes and sae not in peer_saes:
                raise ConfigError(entry.key(name), "one of local_saes or peer_saes")
        if (master in local_saes) == (slave in local_saes):
            raise ConfigError(
                entry.key("slave_sae_id"),
                "an SAE of the other node than master_sae_id (one in local_saes, one in peer_saes)",
            )
        kind = KeyKind(entry.string("kind", KeyKind.QKD.value, choices=_KINDS))
        if (master, slave) in kinds:
            raise ConfigError(entry.key("master_sae_id"), "a pair not listed before")
        kinds[(master, slave)] = kind
        entry.finish()
    return kinds


_KINDS: Final = tuple(kind.value for kind in KeyKind)


def read_delivery(table: Table, base: Path, key_size_bits: int) -> DeliveryConfig:
    """The section with its files resolved against ``base``; its key size must be the store's."""
    config = DeliveryConfig.from_table(table)
    if config.limits.key_size_bits != key_size_bits:
        raise ConfigError(table.key("key_size_bits"), f"{key_size_bits}, the store.key_size_bits")

    def file(name: str, path: Path, *, secret: bool = False) -> Path:
        return existing_file(table.key(name), resolve_path(str(path), base), secret=secret)

    unix_path = config.unix_socket_path
    return dataclasses.replace(
        config,
        certificate=file("certificate", config.certificate),
        private_key=file("private_key", config.private_key, secret=True),
        sae_ca=file("sae_ca", config.sae_ca),
        sae_crl=None if config.sae_crl is None else file("sae_crl", config.sae_crl),
        unix_socket_path=None if unix_path is None else resolve_path(str(unix_path), base),
    )
