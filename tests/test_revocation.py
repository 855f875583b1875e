"""CRL files (``qkdnode.channel.revocation``): what loads, what is refused and why, and the
revocation check of a chain."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from qkdnode.channel.revocation import parse_revocation_lists
from qkdnode.errors import CertificateRevoked, ConfigError, RevocationUnknown
from tests.helpers_pki import NOW_S, make_ca, make_crl, make_node_certificate


def load(data: bytes, ca: x509.Certificate, now_s: float = NOW_S) -> object:
    return parse_revocation_lists(
        data, ca_certificates=(ca,), now_s=now_s, source="crl.pem", key="auth.crl_file"
    )


def test_a_current_crl_of_the_ca_loads_with_others_beside_it() -> None:
    ca, other = make_ca("ed25519"), make_ca("ed25519", "another CA")
    leaf, _ = make_node_certificate(ca, "bob", "ed25519")
    lists = parse_revocation_lists(
        make_crl(other) + make_crl(ca, (leaf,)),
        ca_certificates=(ca.certificate,),
        now_s=NOW_S,
        source="crl.pem",
        key="auth.crl_file",
    )
    assert len(lists.crls) == 2 and lists.revoked_count == 1
    with pytest.raises(CertificateRevoked, match="CN=bob"):
        lists.check_chain((leaf,), (ca.certificate,), now_s=NOW_S)
    # a certificate of a CA with no CRL in the file: its status is unknown, so it is refused
    third = make_ca("ed25519", "third CA")
    stranger, _ = make_node_certificate(third, "carol", "ed25519")
    with pytest.raises(RevocationUnknown, match="no CRL of 'CN=third CA'"):
        lists.check_chain((stranger,), (third.certificate,), now_s=NOW_S)


@pytest.mark.parametrize(
    ("flaw", "reason"),
    [
        ("der", "holds no PEM CRL"),
        ("other_ca", "no CRL signed by the CA 'CN=qkdnode test CA'"),
        ("forged", "no CRL signed by the CA 'CN=qkdnode test CA'"),
        ("stale", "is not current"),
        ("not_yet", "is not current"),
        ("garbage", "does not parse"),
    ],
)
def test_a_crl_file_that_cannot_be_trusted_is_refused_naming_the_key(
    flaw: str, reason: str
) -> None:
    ca = make_ca("ed25519")
    data = {
        "der": x509.load_pem_x509_crl(make_crl(ca)).public_bytes(Encoding.DER),
        "other_ca": make_crl(make_ca("ed25519", "another CA")),
        # same issuer name, another key: the signature does not verify under the CA
        "forged": make_crl(make_ca("ed25519")),
        "stale": make_crl(ca, until_s=NOW_S - 1.0),
        "not_yet": make_crl(ca, from_s=NOW_S + 60.0),
        "garbage": b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
    }[flaw]
    with pytest.raises(ConfigError, match=r"auth\.crl_file") as info:
        load(data, ca.certificate)
    assert reason in str(info.value)
