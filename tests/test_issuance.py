"""Certificate issuance (`qkdnode pki`): certificates verify and carry the right usages."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

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
    assert ExtendedKeyUsageOID.SERVER_AUTH in usage
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for key_file in (ca.private_key, node.private_key):
        assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600


def test_sae_certificate_is_a_client_certificate_named_by_sae_id(tmp_path: Path) -> None:
    issuance.init_ca(tmp_path)
    sae = issuance.issue_certificate(tmp_path, "sae-a", tmp_path / "sae-a", purpose="sae")
    cert = x509.load_pem_x509_certificate(sae.certificate.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "sae-a"
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert isinstance(issuance.load_private_key(sae.private_key), ec.EllipticCurvePrivateKey)
