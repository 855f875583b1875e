"""Test-time PKI: a CA and node certificates generated in memory (no key is ever committed)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from qkdnode.channel.auth import CertificateCredentials
from qkdnode.channel.pki import SigningKey

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
) -> tuple[x509.Certificate, SigningKey]:
    key = new_key(algorithm)
    if expired:
        before, after = _NOW - dt.timedelta(days=60), _NOW - dt.timedelta(days=1)
    else:
        before, after = _NOW - dt.timedelta(days=1), _NOW + dt.timedelta(days=90)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(before)
        .not_valid_after(after)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(_usage(signing=signing_usage, ca=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
        .sign(ca.key, None)
    )
    return cert, key


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
