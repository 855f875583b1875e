"""Peer-certificate verification for the certificate bootstrap (Ed25519 and ML-DSA-65).

cryptography's ``x509.verification.PolicyBuilder`` follows the Web PKI profile, which forbids
Ed25519 keys (checked with cryptography 50), so the chain is verified here by hand, with one
``CertificateRejected`` reason per failed check:

- every certificate is directly issued by the next one (signature and issuer name), the last by
  the configured trust anchor; issuers are CAs (basicConstraints cA, keyUsage keyCertSign) and
  respect pathLenConstraint;
- every certificate, the anchor included, is valid at ``now_s``;
- the leaf is not a CA, has keyUsage digitalSignature and an Ed25519 or ML-DSA-65 key;
- the leaf names the pinned peer (a subjectAltName dNSName, else the subject commonName);
- no certificate carries an unknown critical extension.

``cryptography.x509`` is imported inside the functions: importing it loads ``email.utils`` and
with it the ``socket`` module (no I/O is done), which the layering test forbids at import time.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa

from qkdnode.errors import CertificateRejected

if TYPE_CHECKING:
    from cryptography.x509 import Certificate

SigningKey = ed25519.Ed25519PrivateKey | mldsa.MLDSA65PrivateKey
VerifyingKey = ed25519.Ed25519PublicKey | mldsa.MLDSA65PublicKey


def certificate_der(certificate: Certificate) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return certificate.public_bytes(Encoding.DER)


def verify_peer_chain(
    chain_der: tuple[bytes, ...],
    *,
    trust_anchor: Certificate,
    peer_name: str,
    now_s: float,
) -> VerifyingKey:
    """Check the peer's chain (leaf first) and return the leaf's public key.

    Raises ``CertificateRejected`` naming the failed check; never any other exception.
    """
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm

    try:
        return _verify_chain(chain_der, trust_anchor=trust_anchor, peer_name=peer_name, now_s=now_s)
    except (ValueError, TypeError, x509.InvalidVersion, UnsupportedAlgorithm) as exc:
        # lazily parsed fields of a malformed certificate fail on first access
        raise CertificateRejected(f"malformed peer certificate ({type(exc).__name__})") from None


def _verify_chain(
    chain_der: tuple[bytes, ...],
    *,
    trust_anchor: Certificate,
    peer_name: str,
    now_s: float,
) -> VerifyingKey:
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.x509.oid import ExtensionOID, NameOID

    if not chain_der:
        raise CertificateRejected("peer sent no certificate")
    try:
        chain = [x509.load_der_x509_certificate(der) for der in chain_der]
    except (ValueError, x509.InvalidVersion):
        raise CertificateRejected("peer certificate does not parse") from None
    now = dt.datetime.fromtimestamp(now_s, tz=dt.UTC)
    known = {
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
        ExtensionOID.EXTENDED_KEY_USAGE,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    }
    for index, cert in enumerate([*chain, trust_anchor]):
        where = "trust anchor" if index == len(chain) else f"certificate {index}"
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise CertificateRejected(f"{where} is not valid at this time (expired or not yet)")
        try:
            extensions = list(cert.extensions)
        except ValueError:
            raise CertificateRejected(f"{where} has a malformed extension") from None
        for extension in extensions:
            if extension.critical and extension.oid not in known:
                raise CertificateRejected(f"{where} has an unknown critical extension")
    issuers = [*chain[1:], trust_anchor]
    for index, (cert, issuer) in enumerate(zip(chain, issuers, strict=True)):
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise CertificateRejected(
                f"certificate {index} is not issued by the configured CA chain "
                f"({type(exc).__name__})"
            ) from None
        _check_issuer(issuer, below=index, x509=x509)
    leaf = chain[0]
    basic = _extension(leaf, x509.BasicConstraints)
    if basic is not None and basic.ca:
        raise CertificateRejected("peer leaf certificate is a CA")
    usage = _extension(leaf, x509.KeyUsage)
    if usage is None or not usage.digital_signature:
        raise CertificateRejected("peer leaf certificate lacks keyUsage digitalSignature")
    key = leaf.public_key()
    if not isinstance(key, ed25519.Ed25519PublicKey | mldsa.MLDSA65PublicKey):
        raise CertificateRejected("peer key is neither Ed25519 nor ML-DSA-65")
    names: list[str] = []
    san = _extension(leaf, x509.SubjectAlternativeName)
    if san is not None:
        names = list(san.get_values_for_type(x509.DNSName))
    if not names:
        names = [str(a.value) for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if peer_name not in names:
        raise CertificateRejected("peer certificate does not name the pinned peer")
    return key


def _check_issuer(issuer: Certificate, *, below: int, x509: Any) -> None:
    basic = _extension(issuer, x509.BasicConstraints)
    if basic is None or not basic.ca:
        raise CertificateRejected("an issuer in the chain is not a CA")
    if basic.path_length is not None and basic.path_length < below:
        raise CertificateRejected("chain exceeds an issuer's path length")
    usage = _extension(issuer, x509.KeyUsage)
    if usage is None or not usage.key_cert_sign:
        raise CertificateRejected("an issuer in the chain lacks keyUsage keyCertSign")


def _extension(cert: Certificate, ext_type: Any) -> Any:
    from cryptography import x509

    try:
        return cert.extensions.get_extension_for_class(ext_type).value
    except x509.ExtensionNotFound:
        return None
    except ValueError:
        raise CertificateRejected("certificate has a malformed extension") from None


def sign(private_key: SigningKey, data: bytes) -> bytes:
    return private_key.sign(data)


def verify_signature(public_key: VerifyingKey, signature: bytes, data: bytes) -> None:
    """Raise ``AuthenticationFailed`` unless ``signature`` is valid for ``data``."""
    from cryptography.exceptions import InvalidSignature

    from qkdnode.errors import AuthenticationFailed

    try:
        public_key.verify(signature, data)
    except (InvalidSignature, ValueError):
        raise AuthenticationFailed("handshake signature does not verify") from None
