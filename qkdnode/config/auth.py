"""The ``[auth]`` section: bootstrap credentials and the authentication-key pool."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from qkdnode.config.table import Table, existing_file, resolve_path
from qkdnode.errors import ConfigError

AuthMode = Literal["pki", "psk", "web-of-trust"]
AUTH_MODES: tuple[AuthMode, ...] = ("pki", "psk", "web-of-trust")
# about 10^4 blocks at the default eps_sec + eps_cor (see docs/authentication.md)
DEFAULT_SECURITY_BUDGET_EPSILON = 1e-6
# the pool bits above the reserve that close the bootstrap window: at least the rotation key
# (256) and two blocks' draws (2 x 1,024); by default 64 blocks' draws, enough for 64 failed
# blocks (16 sessions cut with 4 blocks in flight) before the first key-derived commit
MIN_ROTATION_POOL_BITS = 256 + 2 * 1024
DEFAULT_ROTATION_POOL_BITS = 256 + 64 * 1024


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
    # the bootstrap window closes (Alice rotates) once the pool holds this much above the reserve
    rotation_pool_bits: int = DEFAULT_ROTATION_POOL_BITS
    # alert once a committed key's epsilon (its security statement) exceeds this
    security_budget_epsilon: float = DEFAULT_SECURITY_BUDGET_EPSILON
    # web of trust: the trusted introducers' OpenPGP certificates, how many of them must have
    # certified the peer's user ID, and the node's own copies of the peer's certificate (their
    # revocations count even when the peer leaves them out)
    introducer_files: tuple[Path, ...] = ()
    introducer_threshold: int = 0
    peer_certificate_files: tuple[Path, ...] = ()
    # the user ID the peer's certificate must carry; None: "qkdnode node <peer.name>"
    peer_user_id: str | None = None
    # pki: the CRLs the peer's chain is checked against (reread on SIGHUP); None: no checking
    crl_file: Path | None = None


def read_auth(table: Table, base: Path) -> AuthSection:
    """Files are resolved against ``base`` and must exist; key files must be private (mode 600).

    ``pki``: ``ca_file``, ``certificate_file`` (PEM chain), ``private_key_file``, optionally
    ``crl_file`` (PEM CRLs; their content is checked when the daemon loads them).
    ``psk``: ``psk_file``.
    ``web-of-trust``: ``certificate_file`` (the node's OpenPGP certificate with its vouches),
    ``private_key_file`` (its OpenPGP secret key), ``introducer_files`` (at least one),
    ``introducer_threshold`` (1 to the number of introducer files), optionally
    ``peer_certificate_files`` and ``peer_user_id``.
    """
    mode = table.string("mode", choices=AUTH_MODES)
    pki = mode == "pki"
    web_of_trust = mode == "web-of-trust"
    signed = pki or web_of_trust

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
    if not pki and table.has("crl_file"):
        raise ConfigError(table.key("crl_file"), f"no crl_file in mode {mode!r} (pki only)")
    for name in ("introducer_files", "introducer_threshold", "peer_certificate_files"):
        if not web_of_trust and table.has(name):
            raise ConfigError(table.key(name), f"no {name} in mode {mode!r} (web-of-trust only)")
    introducers: tuple[Path, ...] = ()
    threshold = 0
    peer_copies: tuple[Path, ...] = ()
    peer_user_id: str | None = None
    if web_of_trust:
        introducers = tuple(
            existing_file(f"{table.key('introducer_files')}[{index}]", resolve_path(text, base))
            for index, text in enumerate(table.string_list("introducer_files"))
        )
        if not introducers:
            raise ConfigError(
                table.key("introducer_files"), "at least one introducer's OpenPGP certificate"
            )
        if len(set(introducers)) != len(introducers):
            raise ConfigError(table.key("introducer_files"), "each file once (a duplicate)")
        threshold = table.integer("introducer_threshold")
        if not 1 <= threshold <= len(introducers):
            raise ConfigError(
                table.key("introducer_threshold"),
                f"an integer from 1 to the number of introducer_files ({len(introducers)}): "
                "how many distinct introducers must have certified the peer",
            )
        peer_copies = tuple(
            existing_file(
                f"{table.key('peer_certificate_files')}[{index}]", resolve_path(text, base)
            )
            for index, text in enumerate(table.string_list("peer_certificate_files", []))
        )
        peer_user_id = table.optional_string("peer_user_id")
        if peer_user_id is not None and not peer_user_id.strip():
            raise ConfigError(table.key("peer_user_id"), "a non-empty OpenPGP user ID")
    section = AuthSection(
        mode=next(m for m in AUTH_MODES if m == mode),
        ca_file=file("ca_file", required=pki),
        certificate_file=file("certificate_file", required=signed),
        private_key_file=file("private_key_file", required=signed, secret=True),
        psk_file=file("psk_file", required=mode == "psk", secret=True),
        pool_target_bits=table.integer("pool_target_bits", 1 << 20, minimum=1024),
        pool_reserve_bits=table.integer("pool_reserve_bits", 1 << 13, minimum=0),
        rotation_pool_bits=table.integer(
            "rotation_pool_bits", DEFAULT_ROTATION_POOL_BITS, minimum=MIN_ROTATION_POOL_BITS
        ),
        security_budget_epsilon=table.number(
            "security_budget_epsilon",
            DEFAULT_SECURITY_BUDGET_EPSILON,
            minimum=0,
            maximum=1,
            exclusive_minimum=True,
            exclusive_maximum=True,
        ),
        introducer_files=introducers,
        introducer_threshold=threshold,
        peer_certificate_files=peer_copies,
        peer_user_id=peer_user_id,
        crl_file=file("crl_file", required=False),
    )
    if section.pool_reserve_bits >= section.pool_target_bits:
        raise ConfigError("auth.pool_reserve_bits", "less than auth.pool_target_bits")
    room_bits = section.pool_target_bits - section.pool_reserve_bits
    if section.rotation_pool_bits > room_bits:
        raise ConfigError(
            "auth.rotation_pool_bits",
            f"at most auth.pool_target_bits - auth.pool_reserve_bits ({room_bits}): the pool "
            "must be able to hold it above the reserve, or the bootstrap window never closes",
        )
    table.finish()
    return section
