"""Loading the web-of-trust bootstrap credentials from the files ``[auth]`` names (shell only).

Every file is read and parsed once, at start: a mistake is a ``ConfigError`` naming the
``auth.*`` key and the file, never a handshake failure later.
"""

from __future__ import annotations

from pathlib import Path

import pysequoia

from qkdnode.channel.auth import WebOfTrustCredentials
from qkdnode.channel.messages import MAX_CERTIFICATE_BYTES
from qkdnode.channel.weboftrust import (
    SecretCertificate,
    TrustedIntroducer,
    load_introducers,
    node_user_id,
    sign_transcript,
)
from qkdnode.config.auth import AuthSection
from qkdnode.errors import ConfigError


def load_web_of_trust_credentials(auth: AuthSection, *, peer_name: str) -> WebOfTrustCredentials:
    """The node's OpenPGP certificate (binary, as it is sent in the handshake) and secret key,
    the introducers, the threshold and the peer's expected user ID (``auth.peer_user_id``, by
    default ``"qkdnode node <peer_name>"``).

    Raises ``ConfigError`` when a file does not parse, the certificate is not the secret key's,
    the secret key cannot sign, the certificate does not fit the handshake frame, or the
    threshold exceeds the number of distinct introducer keys.
    """
    assert auth.certificate_file is not None and auth.private_key_file is not None
    secret_key = _secret_key(auth.private_key_file)
    own_certificate = _own_certificate(auth.certificate_file, secret_key)
    introducers = _introducers(auth.introducer_files)
    distinct = len(introducers)
    if auth.introducer_threshold > distinct:
        raise ConfigError(
            "auth.introducer_threshold",
            f"at most the number of distinct introducer keys ({distinct}): some of "
            "auth.introducer_files hold the same key",
        )
    copies = tuple(
        _public_certificate(path, f"auth.peer_certificate_files[{index}]")
        for index, path in enumerate(auth.peer_certificate_files)
    )
    return WebOfTrustCredentials(
        own_certificate=own_certificate,
        secret_key=secret_key,
        introducers=introducers,
        threshold=auth.introducer_threshold,
        peer_user_id=auth.peer_user_id or node_user_id(peer_name),
        peer_certificate_copies=copies,
    )


def _secret_key(path: Path) -> SecretCertificate:
    try:
        secret_key = SecretCertificate(path.read_bytes())
        sign_transcript(secret_key, b"qkdnode: the node key can sign")
    except (OSError, ValueError) as exc:
        raise ConfigError(
            "auth.private_key_file",
            f"the node's unprotected OpenPGP secret key with a signing key ({exc})",
            file=str(path),
        ) from None
    return secret_key


def _public_certificate(path: Path, key: str) -> bytes:
    """One OpenPGP certificate (armoured or binary) as binary packets."""
    try:
        certificates = pysequoia.Cert.split_bytes(path.read_bytes())
    except (OSError, RuntimeError, ValueError):
        raise ConfigError(key, "an OpenPGP certificate", file=str(path)) from None
    if len(certificates) != 1:
        raise ConfigError(
            key, f"exactly one OpenPGP certificate, not {len(certificates)}", file=str(path)
        )
    return bytes(certificates[0])


def _own_certificate(path: Path, secret_key: SecretCertificate) -> bytes:
    certificate = _public_certificate(path, "auth.certificate_file")
    fingerprint = pysequoia.Cert.from_bytes(certificate).fingerprint
    if fingerprint != secret_key.fingerprint:
        raise ConfigError(
            "auth.certificate_file",
            f"the certificate of the key in auth.private_key_file ({secret_key.fingerprint}), "
            f"not {fingerprint}",
            file=str(path),
        )
    if len(certificate) > MAX_CERTIFICATE_BYTES:
        raise ConfigError(
            "auth.certificate_file",
            f"a certificate of at most {MAX_CERTIFICATE_BYTES} bytes to fit the handshake, not "
            f"{len(certificate)}: export it without the certifications the peer does not "
            "need (gpg --export-options export-minimal, or sq cert export)",
            file=str(path),
        )
    return certificate


def _introducers(paths: tuple[Path, ...]) -> tuple[TrustedIntroducer, ...]:
    """Each file parsed as it is (a secret key in place of a certificate is refused)."""
    certificates = []
    for index, path in enumerate(paths):
        key = f"auth.introducer_files[{index}]"
        try:
            certificate = path.read_bytes()
            TrustedIntroducer(certificate)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                key, f"an introducer's public OpenPGP certificate ({exc})", file=str(path)
            ) from None
        certificates.append(certificate)
    return load_introducers(certificates)
