"""The ``[auth]`` section: bootstrap credentials and the authentication-key pool."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from qkdnode.config.table import Table, existing_file, resolve_path
from qkdnode.errors import ConfigError

AuthMode = Literal["pki", "psk"]
# about 10^4 blocks at the default eps_sec + eps_cor (see docs/authentication.md)
DEFAULT_SECURITY_BUDGET_EPSILON = 1e-6


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
    # alert once a committed key's epsilon (its security statement) exceeds this
    security_budget_epsilon: float = DEFAULT_SECURITY_BUDGET_EPSILON


def read_auth(table: Table, base: Path) -> AuthSection:
    """Files are resolved against ``base`` and must exist; key files must be private (mode 600)."""
    pki = table.string("mode", choices=("pki", "psk")) == "pki"

    def file(name: str, *, required: bool, secret: bool = False) -> Path | None:
        text = table.string(name) if required else table.optional_string(name)
        if text is None:
            return None
        return existing_file(table.key(name), resolve_path(text, base), secret=secret)

    if table.has("on_exhausted"):
        # the bootstrap credentials never come back by themselves: an exhausted pool stops
        # opening blocks and alerts, and only an operator re-bootstraps
        raise ConfigError(
            table.key("on_exhausted"),
            "no such setting (removed): an exhausted authentication-key pool stops opening "
            "blocks and alerts; re-bootstrap with `qkdnode auth rebootstrap --config FILE` on "
            "each node",
        )
    section = AuthSection(
        mode="pki" if pki else "psk",
        ca_file=file("ca_file", required=pki),
        certificate_file=file("certificate_file", required=pki),
        private_key_file=file("private_key_file", required=pki, secret=True),
        psk_file=file("psk_file", required=not pki, secret=True),
        pool_target_bits=table.integer("pool_target_bits", 1 << 20, minimum=1024),
        pool_reserve_bits=table.integer("pool_reserve_bits", 1 << 13, minimum=0),
        security_budget_epsilon=table.number(
            "security_budget_epsilon",
            DEFAULT_SECURITY_BUDGET_EPSILON,
            minimum=0,
            maximum=1,
            exclusive_minimum=True,
            exclusive_maximum=True,
        ),
    )
    if section.pool_reserve_bits >= section.pool_target_bits:
        raise ConfigError("auth.pool_reserve_bits", "less than auth.pool_target_bits")
    table.finish()
    return section
