"""OpenPGP helpers for the web-of-trust bootstrap (`qkdnode pgp`), for operators without sq or gpg.

- ``init --name NODE --dir DIR`` makes a node's OpenPGP key: an Ed25519 primary key that
  certifies, an Ed25519 signing subkey (it signs the handshake transcript) and an X25519
  encryption subkey, with the user ID ``"qkdnode node NODE"``. It writes ``DIR/NODE.asc`` (the
  public certificate, for the peer and the introducers) and ``DIR/NODE.secret.asc`` (the secret
  key, unencrypted, created with mode 0600). ``--user-id`` gives any other user ID, e.g. an
  introducer's ``"Security Officer <so@example.org>"``.
- ``vouch --introducer SECRET --cert PEER --name NODE --out FILE`` certifies the user ID
  ``"qkdnode node NODE"`` of the peer certificate with the introducer's key and writes the
  certificate with that certification added (ASCII-armoured). Certifications from several
  introducers merge: vouch on the output of the previous one, or merge the files with sq/gpg.

Keys and certificates are standard OpenPGP (RFC 4880 version 4 packets): ``sq`` and ``gpg``
read and verify them, and their certifications are accepted here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pysequoia

from qkdnode.channel.weboftrust import SecretCertificate, make_certification, node_user_id
from qkdnode.errors import ConfigError

SECONDS_PER_DAY = 86_400


@dataclass(frozen=True, slots=True)
class NodeKeyFiles:
    """Where ``init_node_key`` wrote the certificate and the secret key, and the fingerprint."""

    certificate: Path
    secret_key: Path
    fingerprint: str
    user_id: str


def write_secret_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file created with mode 0600 (an existing file is replaced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def init_node_key(
    directory: Path,
    *,
    name: str,
    user_id: str | None = None,
    valid_days: int | None = None,
) -> NodeKeyFiles:
    """Make an Ed25519 OpenPGP key for ``name`` in ``directory``; see the module docstring.

    ``valid_days`` None makes a key that does not expire.
    """
    chosen = user_id if user_id is not None else node_user_id(name)
    if valid_days is not None and valid_days < 1:
        raise ConfigError("--valid-days", "a whole number of days, at least 1")
    tsk = pysequoia.Tsk.generate(
        chosen,
        profile=pysequoia.Profile.RFC4880,
        cipher_suite=pysequoia.CipherSuite.Cv25519,
        validity_seconds=None if valid_days is None else valid_days * SECONDS_PER_DAY,
    )
    secret_path = directory / f"{name}.secret.asc"
    certificate_path = directory / f"{name}.asc"
    write_secret_file(secret_path, str(tsk).encode("ascii"))
    certificate_path.write_text(str(tsk.extract_certificate()), encoding="ascii")
    fingerprint = tsk.extract_certificate().fingerprint
    return NodeKeyFiles(certificate_path, secret_path, fingerprint, chosen)


def vouch(*, introducer_secret: Path, peer_certificate: Path, name: str, out: Path) -> str:
    """Certify ``"qkdnode node NAME"`` on ``peer_certificate`` with the introducer's key.

    Writes the certified certificate (armoured) to ``out`` and returns the peer's fingerprint.
    Raises ``ConfigError`` naming the file that is not what it should be.
    """
    try:
        introducer = SecretCertificate(introducer_secret.read_bytes())
    except ValueError as exc:
        raise ConfigError(
            str(introducer_secret), f"the introducer's OpenPGP secret key ({exc})"
        ) from None
    try:
        certified = make_certification(
            introducer, peer_certificate.read_bytes(), node_user_id(name)
        )
    except ValueError as exc:
        raise ConfigError(
            str(peer_certificate), f"the peer's OpenPGP certificate ({exc})"
        ) from None
    cert = pysequoia.Cert.from_bytes(certified)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(str(cert), encoding="ascii")
    return cert.fingerprint
