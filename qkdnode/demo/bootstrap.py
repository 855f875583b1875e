"""The demo's bootstrap trust anchors: what ``qkdnode demo --bootstrap pki|psk|web-of-trust``
writes into the work directory, and the ``[auth]`` lines of each node's config.

- ``pki``: the demo's node CA, its CRL and the node certificates (the key-delivery TLS uses the
  node certificates anyway).
- ``psk``: one random 32-byte pre-shared key, ``psk/peer.psk`` (mode 0600), on both nodes.
- ``web-of-trust``: ``qkdnode pgp init`` for Alice, Bob and ``WEB_OF_TRUST_INTRODUCERS``
  security officers, and ``qkdnode pgp vouch`` of each node's certificate by the first
  ``vouches`` officers (all of them by default); a node accepts its peer when
  ``WEB_OF_TRUST_THRESHOLD`` of the officers vouched for it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final, Literal

Bootstrap = Literal["pki", "psk", "web-of-trust"]
BOOTSTRAPS: Final[tuple[Bootstrap, ...]] = ("pki", "psk", "web-of-trust")
WEB_OF_TRUST_INTRODUCERS: Final = 3
WEB_OF_TRUST_THRESHOLD: Final = 2
PSK_BYTES: Final = 32
NODES: Final = ("alice", "bob")


def officer_name(index: int) -> str:
    """The demo's introducers: ``officer-1``, ``officer-2``, ..."""
    return f"officer-{index + 1}"


def make_psk(workdir: Path) -> None:
    """A fresh random PSK (hex) in ``psk/peer.psk``, kept if it is already there."""
    from qkdnode.ops import pgp  # the `qkdnode` command imports this module: keep it light

    path = workdir / "psk" / "peer.psk"
    if not path.exists():
        pgp.write_secret_file(path, os.urandom(PSK_BYTES).hex().encode("ascii") + b"\n")


def make_web_of_trust(workdir: Path, *, vouches: int = WEB_OF_TRUST_INTRODUCERS) -> None:
    """Node keys, officer keys and ``vouches`` officers' vouches for each node in ``pgp/``.

    Each node's certificate with its vouches is ``pgp/NODE.vouched.asc``; made afresh.
    """
    from qkdnode.ops import pgp

    if not 0 <= vouches <= WEB_OF_TRUST_INTRODUCERS:
        raise ValueError(f"vouches must be between 0 and {WEB_OF_TRUST_INTRODUCERS}")
    directory = workdir / "pgp"
    officers = []
    for index in range(WEB_OF_TRUST_INTRODUCERS):
        name = officer_name(index)
        officers.append(
            pgp.init_node_key(
                directory, name=name, user_id=f"Security officer {index + 1} <{name}@demo.test>"
            )
        )
    for node in NODES:
        keys = pgp.init_node_key(directory, name=node)
        vouched = directory / f"{node}.vouched.asc"
        vouched.write_bytes(keys.certificate.read_bytes())
        for officer in officers[:vouches]:
            pgp.vouch(
                introducer_secret=officer.secret_key,
                peer_certificate=vouched,
                name=node,
                out=vouched,
            )


def auth_lines(bootstrap: Bootstrap, node: str) -> str:
    """The bootstrap settings of ``node``'s ``[auth]`` section (paths relative to the config)."""
    if bootstrap == "pki":
        return (
            'mode = "pki"\n'
            'ca_file = "pki/node-ca/ca.pem"\n'
            'crl_file = "pki/node-ca/crl.pem"\n'
            f'certificate_file = "pki/{node}.pem"\n'
            f'private_key_file = "pki/{node}.key"\n'
        )
    if bootstrap == "psk":
        return 'mode = "psk"\npsk_file = "psk/peer.psk"\n'
    peer = "bob" if node == "alice" else "alice"
    introducers = ", ".join(
        f'"pgp/{officer_name(index)}.asc"' for index in range(WEB_OF_TRUST_INTRODUCERS)
    )
    return (
        'mode = "web-of-trust"\n'
        "# this node's OpenPGP certificate as the officers vouched for it, and its secret key\n"
        f'certificate_file = "pgp/{node}.vouched.asc"\n'
        f'private_key_file = "pgp/{node}.secret.asc"\n'
        "# the peer is accepted when this many of these officers certified its user ID\n"
        f"introducer_files = [{introducers}]\n"
        f"introducer_threshold = {WEB_OF_TRUST_THRESHOLD}\n"
        "# this node's own copy of the peer's certificate: its revocations count\n"
        f'peer_certificate_files = ["pgp/{peer}.asc"]\n'
    )


def make_bootstrap(workdir: Path, bootstrap: Bootstrap, *, vouches: int | None = None) -> None:
    """The trust anchor's files for ``bootstrap`` (the PKI is made by the caller in any case)."""
    if bootstrap == "psk":
        make_psk(workdir)
    elif bootstrap == "web-of-trust":
        make_web_of_trust(workdir, vouches=WEB_OF_TRUST_INTRODUCERS if vouches is None else vouches)
