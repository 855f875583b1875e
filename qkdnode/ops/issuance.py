"""Certificate issuance (`qkdnode pki`): a small CA for a node pair and its consumers.

This module makes keys and certificates; checking a peer's chain is ``qkdnode.channel.pki``.

- ``init`` makes a CA (Ed25519 by default, ML-DSA-65 by option).
- ``issue node NAME`` makes a node certificate for the classical channel (Ed25519 by default,
  ML-DSA-65 by option; key usage digitalSignature) that also serves the key-delivery API over TLS
  (SAN = the given host names and addresses). extendedKeyUsage: the qkdnode node purpose and
  ``serverAuth`` (``qkdnode.channel.pki``), no clientAuth: it is no TLS client anywhere.
- ``issue sae SAE_ID`` makes an SAE client certificate (CN = SAE ID) with an ECDSA P-256 key,
  which every TLS 1.2 and 1.3 client library can present. extendedKeyUsage: the qkdnode SAE
  purpose and ``clientAuth``.
- ``crl`` makes the CA's certificate revocation list (PEM), listing the given certificates.

Node and SAE certificates are best issued by two CAs (the demo does so): each side then trusts
only the CA of the certificates it accepts, and the extendedKeyUsage check is a second barrier.

Private keys are written with mode 0600 (created so, never chmod-ed after the fact) and are never
part of the repository: tests and the demo generate their own.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from qkdnode.channel.pki import NODE_PURPOSE_OID, SAE_PURPOSE_OID
from qkdnode.errors import ConfigError

Algorithm = Literal["ed25519", "ml-dsa-65", "ecdsa-p256"]
SigningKey = ed25519.Ed25519PrivateKey | mldsa.MLDSA65PrivateKey | ec.EllipticCurvePrivateKey

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
CA_CRL = "crl.pem"


@dataclass(frozen=True, slots=True)
class IssuedFiles:
    certificate: Path
    private_key: Path


def generate_key(algorithm: Algorithm) -> SigningKey:
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm == "ml-dsa-65":
        return mldsa.MLDSA65PrivateKey.generate()
    if algorithm == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    raise ConfigError("algorithm", "one of ed25519, ml-dsa-65, ecdsa-p256")


def _signature_hash(key: SigningKey) -> hashes.SHA256 | None:
    # Ed25519 and ML-DSA sign the message itself; ECDSA needs a digest.
    return hashes.SHA256() if isinstance(key, ec.EllipticCurvePrivateKey) else None


def write_private_key(path: Path, key: SigningKey) -> None:
    """Write ``key`` as unencrypted PKCS#8 PEM to a new file created with mode 0600."""
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def write_certificate(path: Path, certificate: x509.Certificate) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def load_private_key(path: Path) -> SigningKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(
        key, ed25519.Ed25519PrivateKey | mldsa.MLDSA65PrivateKey | ec.EllipticCurvePrivateKey
    ):
        raise ConfigError(str(path), "an Ed25519, ML-DSA-65 or ECDSA private key")
    return key


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def init_ca(
    directory: Path,
    *,
    common_name: str = "qkdnode CA",
    algorithm: Algorithm = "ed25519",
    validity_days: int = 3650,
) -> IssuedFiles:
    """Create a self-signed CA in ``directory`` (ca.pem, ca.key)."""
    key = generate_key(algorithm)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=validity_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, _signature_hash(key))
    )
    files = IssuedFiles(directory / CA_CERT, directory / CA_KEY)
    write_private_key(files.private_key, key)
    write_certificate(files.certificate, certificate)
    return files


def issue_certificate(
    ca_directory: Path,
    common_name: str,
    out_prefix: Path,
    *,
    purpose: Literal["node", "sae"],
    algorithm: Algorithm | None = None,
    hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
    validity_days: int = 825,
    not_valid_before: datetime.datetime | None = None,
) -> IssuedFiles:
    """Issue a node or SAE certificate signed by the CA; writes PREFIX.pem and PREFIX.key."""
    ca_key = load_private_key(ca_directory / CA_KEY)
    ca_cert = x509.load_pem_x509_certificate((ca_directory / CA_CERT).read_bytes())
    if algorithm is None:
        algorithm = "ed25519" if purpose == "node" else "ecdsa-p256"
    key = generate_key(algorithm)
    start = not_valid_before or (_now() - datetime.timedelta(minutes=5))
    usages = (
        [ExtendedKeyUsageOID.SERVER_AUTH, x509.ObjectIdentifier(NODE_PURPOSE_OID)]
        if purpose == "node"
        else [ExtendedKeyUsageOID.CLIENT_AUTH, x509.ObjectIdentifier(SAE_PURPOSE_OID)]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=validity_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=isinstance(key, ec.EllipticCurvePrivateKey),
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    names: list[x509.GeneralName] = [x509.DNSName(common_name)]
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    certificate = builder.sign(ca_key, _signature_hash(ca_key))
    files = IssuedFiles(out_prefix.with_suffix(".pem"), out_prefix.with_suffix(".key"))
    write_private_key(files.private_key, key)
    write_certificate(files.certificate, certificate)
    return files


def issue_crl(
    ca_directory: Path,
    revoked_certificates: tuple[Path, ...] = (),
    *,
    out: Path | None = None,
    validity_days: float = 7.0,
    this_update: datetime.datetime | None = None,
) -> Path:
    """Write the CA's CRL (PEM; default ``CA_DIR/crl.pem``) revoking the certificates in
    ``revoked_certificates`` (PEM files; each must be issued by this CA), valid from
    ``this_update`` (default: 5 minutes ago, as certificates, so that a node whose clock is a
    little behind the CA's accepts it) for ``validity_days``. Returns the path written."""
    ca_key = load_private_key(ca_directory / CA_KEY)
    ca_cert = x509.load_pem_x509_certificate((ca_directory / CA_CERT).read_bytes())
    start = this_update or (_now() - datetime.timedelta(minutes=5))
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(start)
        .next_update(start + datetime.timedelta(days=validity_days))
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    for path in revoked_certificates:
        certificate = x509.load_pem_x509_certificate(path.read_bytes())
        if certificate.issuer != ca_cert.subject:
            raise ConfigError(str(path), f"a certificate issued by the CA in {ca_directory}")
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(certificate.serial_number)
            .revocation_date(start)
            .build()
        )
    crl = builder.sign(ca_key, _signature_hash(ca_key))
    path = out or ca_directory / CA_CRL
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    return path
