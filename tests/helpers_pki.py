"""Test-time PKI: a CA and node certificates generated in memory (no key is ever committed)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from qkdnode.channel.auth import CertificateCredentials
from qkdnode.channel.pki import NODE_PURPOSE_OID, SAE_PURPOSE_OID, SigningKey

NOW_S = 1_750_000_000.0  # a fixed "now" for every test
_NOW = dt.datetime.fromtimestamp(NOW_S, tz=dt.UTC)


def new_key(algorithm: str) -> SigningKey:
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm == "mldsa65":
        return mldsa.MLDSA65PrivateKey.generate()
    raise ValueError(algorithm)


def _usage(*, signing: bool, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=signing,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass(frozen=True, slots=True)
class TestCa:
    key: SigningKey
    certificate: x509.Certificate

    def __repr__(self) -> str:
        return "TestCa(<redacted>)"


def make_ca(algorithm: str, name: str = "qkdnode test CA") -> TestCa:
    key = new_key(algorithm)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_NOW - dt.timedelta(days=30))
        .not_valid_after(_NOW + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_usage(signing=False, ca=True), critical=True)
        .sign(key, None)
    )
    return TestCa(key=key, certificate=cert)


def make_node_certificate(
    ca: TestCa,
    name: str,
    algorithm: str,
    *,
    expired: bool = False,
    signing_usage: bool = True,
    purposes: tuple[str, ...] = ("node",),
) -> tuple[x509.Certificate, SigningKey]:
    """A leaf for ``name``; ``purposes``: the qkdnode purposes in its extendedKeyUsage ("node"
    with serverAuth, "sae" with clientAuth; none: no extendedKeyUsage at all)."""
    key = new_key(algorithm)
    if expired:
        before, after = _NOW - dt.timedelta(days=60), _NOW - dt.timedelta(days=1)
    else:
        before, after = _NOW - dt.timedelta(days=1), _NOW + dt.timedelta(days=90)
    usages: list[x509.ObjectIdentifier] = []
    if "node" in purposes:
        usages += [ExtendedKeyUsageOID.SERVER_AUTH, x509.ObjectIdentifier(NODE_PURPOSE_OID)]
    if "sae" in purposes:
        usages += [ExtendedKeyUsageOID.CLIENT_AUTH, x509.ObjectIdentifier(SAE_PURPOSE_OID)]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(before)
        .not_valid_after(after)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(_usage(signing=signing_usage, ca=False), critical=True)
    )
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    return builder.sign(ca.key, None), key


def credentials_pair(
    algorithm: str,
) -> tuple[CertificateCredentials, CertificateCredentials, TestCa]:
    """Alice's and Bob's credentials under one fresh CA, each pinning the other's name."""
    ca = make_ca(algorithm)
    alice_cert, alice_key = make_node_certificate(ca, "alice.qkd.test", algorithm)
    bob_cert, bob_key = make_node_certificate(ca, "bob.qkd.test", algorithm)
    alice = CertificateCredentials(
        certificate_chain=(alice_cert,),
        private_key=alice_key,
        trust_anchor=ca.certificate,
        peer_name="bob.qkd.test",
    )
    bob = CertificateCredentials(
        certificate_chain=(bob_cert,),
        private_key=bob_key,
        trust_anchor=ca.certificate,
        peer_name="alice.qkd.test",
    )
    return alice, bob, ca


def make_crl(
    ca: TestCa,
    revoked: tuple[x509.Certificate, ...] = (),
    *,
    from_s: float = NOW_S - 3600.0,
    until_s: float = NOW_S + 86400.0,
) -> bytes:
    """``ca``'s CRL (PEM) listing ``revoked``, valid from ``from_s`` until ``until_s``."""
    from cryptography.hazmat.primitives.serialization import Encoding

    start = dt.datetime.fromtimestamp(from_s, tz=dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.certificate.subject)
        .last_update(start)
        .next_update(dt.datetime.fromtimestamp(until_s, tz=dt.UTC))
    )
    for certificate in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(certificate.serial_number)
            .revocation_date(start)
            .build()
        )
    return builder.sign(ca.key, None).public_bytes(Encoding.PEM)
