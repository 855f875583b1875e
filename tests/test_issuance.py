"""Certificate issuance (`qkdnode pki`): certificates verify and carry the right usages."""

from __future__ import annotations

import datetime
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from qkdnode.channel.pki import NODE_PURPOSE_OID, SAE_PURPOSE_OID, Purpose, require_purpose
from qkdnode.channel.revocation import parse_revocation_lists
from qkdnode.errors import CertificatePurposeRejected
from qkdnode.ops import issuance


@pytest.mark.parametrize("algorithm", ["ed25519", "ml-dsa-65"])
def test_node_certificate_chains_to_ca(tmp_path: Path, algorithm: issuance.Algorithm) -> None:
    ca = issuance.init_ca(tmp_path / "pki", algorithm=algorithm)
    node = issuance.issue_certificate(
        tmp_path / "pki", "alice", tmp_path / "pki" / "alice", purpose="node", algorithm=algorithm
    )
    ca_cert = x509.load_pem_x509_certificate(ca.certificate.read_bytes())
    cert = x509.load_pem_x509_certificate(node.certificate.read_bytes())
    cert.verify_directly_issued_by(ca_cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usage) == {ExtendedKeyUsageOID.SERVER_AUTH, x509.ObjectIdentifier(NODE_PURPOSE_OID)}
    require_purpose(cert, Purpose.NODE)
    with pytest.raises(CertificatePurposeRejected, match="carries the qkdnode node purpose"):
        require_purpose(cert, Purpose.SAE)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for key_file in (ca.private_key, node.private_key):
        assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600


def test_sae_certificate_is_a_client_certificate_named_by_sae_id(tmp_path: Path) -> None:
    issuance.init_ca(tmp_path)
    sae = issuance.issue_certificate(tmp_path, "sae-a", tmp_path / "sae-a", purpose="sae")
    cert = x509.load_pem_x509_certificate(sae.certificate.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "sae-a"
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usage) == {ExtendedKeyUsageOID.CLIENT_AUTH, x509.ObjectIdentifier(SAE_PURPOSE_OID)}
    require_purpose(cert, Purpose.SAE)
    with pytest.raises(CertificatePurposeRejected, match="carries the qkdnode SAE purpose"):
        require_purpose(cert, Purpose.NODE)
    assert isinstance(issuance.load_private_key(sae.private_key), ec.EllipticCurvePrivateKey)


@pytest.mark.parametrize("algorithm", ["ed25519", "ml-dsa-65"])
def test_crl_lists_the_revoked_certificates_and_verifies_under_the_ca(
    tmp_path: Path, algorithm: issuance.Algorithm
) -> None:
    ca = issuance.init_ca(tmp_path, algorithm=algorithm)
    kept = issuance.issue_certificate(tmp_path, "sae-a", tmp_path / "sae-a", purpose="sae")
    gone = issuance.issue_certificate(tmp_path, "sae-b", tmp_path / "sae-b", purpose="sae")
    path = issuance.issue_crl(tmp_path, (gone.certificate,), validity_days=2.0)
    crl = x509.load_pem_x509_crl(path.read_bytes())
    ca_cert = x509.load_pem_x509_certificate(ca.certificate.read_bytes())
    assert crl.is_signature_valid(ca_cert.public_key())  # type: ignore[arg-type]
    serial = x509.load_pem_x509_certificate(gone.certificate.read_bytes()).serial_number
    assert [entry.serial_number for entry in crl] == [serial]
    kept_serial = x509.load_pem_x509_certificate(kept.certificate.read_bytes()).serial_number
    assert crl.get_revoked_certificate_by_serial_number(kept_serial) is None
    assert crl.next_update_utc is not None
    lists = parse_revocation_lists(
        path.read_bytes(),
        ca_certificates=(ca_cert,),
        now_s=crl.last_update_utc.timestamp() + 1,
        source=str(path),
        key="k",
    )
    assert lists.next_update_s == crl.next_update_utc.timestamp()


def test_qkdnode_pki_crl_revokes_the_named_certificates(tmp_path: Path) -> None:
    from qkdnode.cli import main

    assert main(["pki", "init", "--dir", str(tmp_path / "ca")]) == 0
    assert main(["pki", "issue", "sae", "sae-a", "--dir", str(tmp_path / "ca")]) == 0
    revoke = ["--revoke", str(tmp_path / "ca" / "sae-a.pem")]
    assert main(["pki", "crl", "--dir", str(tmp_path / "ca"), *revoke, "--days", "3"]) == 0
    crl = x509.load_pem_x509_crl((tmp_path / "ca" / issuance.CA_CRL).read_bytes())
    sae = x509.load_pem_x509_certificate((tmp_path / "ca" / "sae-a.pem").read_bytes())
    assert [entry.serial_number for entry in crl] == [sae.serial_number]
    assert crl.next_update_utc is not None
    assert crl.next_update_utc - crl.last_update_utc == datetime.timedelta(days=3)
