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
- the leaf is a node certificate (``require_purpose``: extendedKeyUsage with the qkdnode node
  purpose, without the SAE purpose);
- no certificate carries an unknown critical extension;
- with revocation lists (``qkdnode.channel.revocation``), no certificate of the chain is revoked
  by its issuer's current CRL.

Certificate purposes: node and SAE certificates are told apart by two extendedKeyUsage OIDs of
the project, in the UUID arc 2.25 (ITU-T X.667: unique without registration). A node
certificate carries ``NODE_PURPOSE_OID`` (and serverAuth: it is also the key-delivery API's TLS
server certificate), an SAE certificate ``SAE_PURPOSE_OID`` and clientAuth. No certificate may
carry both; a certificate without extendedKeyUsage, or with anyExtendedKeyUsage only, has
neither purpose.

``cryptography.x509`` is imported inside the functions: importing it loads ``email.utils`` and
with it the ``socket`` module (no I/O is done), which the layering test forbids at import time.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import TYPE_CHECKING, Any, Final

from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa

from qkdnode.errors import CertificatePurposeRejected, CertificateRejected

if TYPE_CHECKING:
    from cryptography.x509 import Certificate

    from qkdnode.channel.revocation import RevocationLists

NODE_PURPOSE_OID: Final = "2.25.87266052744845668935047399623459310005"
SAE_PURPOSE_OID: Final = "2.25.293650551042669245780940779933592811963"
SERVER_AUTH_OID: Final = "1.3.6.1.5.5.7.3.1"
CLIENT_AUTH_OID: Final = "1.3.6.1.5.5.7.3.2"


class Purpose(enum.Enum):
    """The role a certificate is presented for."""

    NODE = "node"  # a node on the classical channel (and the key-delivery TLS server)
    SAE = "SAE"  # a key consumer at the key-delivery API (a TLS client)


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
    revocation: RevocationLists | None = None,
) -> VerifyingKey:
    """Check the peer's chain (leaf first) and return the leaf's public key.

    Raises ``CertificateRejected`` naming the failed check (``CertificatePurposeRejected`` for
    a certificate that is not a node's, ``CertificateRevoked`` and ``RevocationUnknown`` when
    ``revocation`` is given); never any other exception.
    """
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm

    try:
        return _verify_chain(
            chain_der,
            trust_anchor=trust_anchor,
            peer_name=peer_name,
            now_s=now_s,
            revocation=revocation,
        )
    except (ValueError, TypeError, x509.InvalidVersion, UnsupportedAlgorithm) as exc:
        # lazily parsed fields of a malformed certificate fail on first access
        raise CertificateRejected(f"malformed peer certificate ({type(exc).__name__})") from None


def _verify_chain(
    chain_der: tuple[bytes, ...],
    *,
    trust_anchor: Certificate,
    peer_name: str,
    now_s: float,
    revocation: RevocationLists | None,
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
    require_purpose(leaf, Purpose.NODE)
    if revocation is not None:
        revocation.check_chain(chain, issuers, now_s=now_s)
    return key


def require_purpose(certificate: Certificate, purpose: Purpose) -> None:
    """Raise ``CertificatePurposeRejected`` unless ``certificate`` may act as ``purpose``: its
    extendedKeyUsage names that qkdnode purpose (an SAE's also clientAuth) and not the other."""
    from cryptography import x509

    usage = _extension(certificate, x509.ExtendedKeyUsage)
    oids = set() if usage is None else {oid.dotted_string for oid in usage}
    own, other = (
        (NODE_PURPOSE_OID, SAE_PURPOSE_OID)
        if purpose is Purpose.NODE
        else (SAE_PURPOSE_OID, NODE_PURPOSE_OID)
    )
    subject = certificate.subject.rfc4514_string()
    if other in oids:
        other_role = Purpose.SAE if purpose is Purpose.NODE else Purpose.NODE
        raise CertificatePurposeRejected(
            purpose.value,
            f"{subject!r} carries the qkdnode {other_role.value} purpose ({other})",
        )
    if own not in oids:
        raise CertificatePurposeRejected(
            purpose.value,
            f"{subject!r} lacks the qkdnode {purpose.value} purpose ({own}) in extendedKeyUsage",
        )
    if purpose is Purpose.SAE and CLIENT_AUTH_OID not in oids:
        raise CertificatePurposeRejected(
            purpose.value, f"{subject!r} lacks clientAuth in extendedKeyUsage"
        )


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
