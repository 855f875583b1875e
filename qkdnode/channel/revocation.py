"""Certificate revocation lists (CRLs): read from a PEM file's bytes, checked for a chain.

- A CRL file holds one or more PEM CRLs (``-----BEGIN X509 CRL-----``); DER is refused with the
  command that converts it.
- When loaded (``parse_revocation_lists``), every CRL must parse, carry a nextUpdate, have no
  critical extension (delta and partitioned CRLs are not supported) and be current (thisUpdate
  <= now < nextUpdate); every CA certificate of the configured CA file must have a CRL in the
  file that it signed (issuer name and signature). CRLs of other issuers (intermediate CAs)
  are kept and checked when used.
- When a chain is checked (``RevocationLists.check_chain``), each certificate of the chain
  needs a current CRL of its issuer (issuer name equal, signature valid under the issuer's
  key); a certificate listed on one is revoked (``CertificateRevoked``). No such CRL, or only
  a stale one, refuses the chain (``RevocationUnknown``): a CRL past its nextUpdate is treated
  as no CRL, never as "nothing revoked". The trust anchor itself is configured, not
  presented, and is not checked: to distrust a CA, remove it from the CA file.

``cryptography.x509`` is imported inside the functions (see ``qkdnode.channel.pki``).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from qkdnode.errors import CertificateRevoked, ConfigError, RevocationUnknown

if TYPE_CHECKING:
    from cryptography.x509 import Certificate, CertificateRevocationList

_PEM_CRL: Final = re.compile(
    rb"-----BEGIN X509 CRL-----\r?\n.*?-----END X509 CRL-----", flags=re.DOTALL
)


@dataclass(frozen=True, slots=True)
class RevocationLists:
    """The CRLs of one file (``source``, its path), each verified when it was loaded."""

    crls: tuple[CertificateRevocationList, ...]
    source: str

    @property
    def revoked_count(self) -> int:
        return sum(len(crl) for crl in self.crls)

    @property
    def next_update_s(self) -> float:
        """The earliest nextUpdate of the file's CRLs (Unix time): a fresh file is due then."""
        return min(_next_update(crl).timestamp() for crl in self.crls)

    def check_chain(
        self,
        chain: Sequence[Certificate],
        issuers: Sequence[Certificate],
        *,
        now_s: float,
    ) -> None:
        """Raise unless no certificate of ``chain`` is revoked by ``issuers`` (the issuer of
        ``chain[i]`` is ``issuers[i]``): ``CertificateRevoked`` for a listed certificate,
        ``RevocationUnknown`` when an issuer has no current CRL here."""
        now = dt.datetime.fromtimestamp(now_s, tz=dt.UTC)
        for certificate, issuer in zip(chain, issuers, strict=True):
            issuer_name = issuer.subject.rfc4514_string()
            signed = [
                crl
                for crl in self.crls
                if crl.issuer == issuer.subject and crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
            ]
            if not signed:
                raise RevocationUnknown(f"no CRL of {issuer_name!r} in {self.source}")
            current = [crl for crl in signed if _is_current(crl, now)]
            if not current:
                due = max(_next_update(crl) for crl in signed).isoformat()
                raise RevocationUnknown(
                    f"the CRL of {issuer_name!r} in {self.source} is not current "
                    f"(next update was due {due})"
                )
            for crl in current:
                if crl.get_revoked_certificate_by_serial_number(certificate.serial_number):
                    raise CertificateRevoked(
                        subject=certificate.subject.rfc4514_string(),
                        serial=f"{certificate.serial_number:x}",
                        issuer=issuer_name,
                    )


def parse_revocation_lists(
    data: bytes,
    *,
    ca_certificates: Sequence[Certificate],
    now_s: float,
    source: str,
    key: str,
) -> RevocationLists:
    """The CRLs of a PEM file's ``data``, checked as the module says; ``ConfigError`` naming
    ``key`` (the config key of the file) and the reason otherwise."""
    from cryptography import x509

    def refuse(reason: str) -> ConfigError:
        return ConfigError(key, f"a PEM file of current CRLs of the configured CA ({reason})")

    blocks = _PEM_CRL.findall(data)
    if not blocks:
        hint = "convert DER with `openssl crl -inform DER -in FILE -out FILE.pem`"
        raise refuse(f"{source} holds no PEM CRL; {hint}")
    now = dt.datetime.fromtimestamp(now_s, tz=dt.UTC)
    crls: list[CertificateRevocationList] = []
    for index, block in enumerate(blocks):
        try:
            crl = x509.load_pem_x509_crl(block)
            extensions = list(crl.extensions)
        except ValueError:
            raise refuse(f"CRL {index} of {source} does not parse") from None
        if crl.next_update_utc is None:
            raise refuse(f"CRL {index} of {source} has no nextUpdate")
        if any(extension.critical for extension in extensions):
            raise refuse(f"CRL {index} of {source} has a critical extension (delta or partial)")
        if not _is_current(crl, now):
            raise refuse(
                f"CRL {index} of {source} is not current: valid from "
                f"{crl.last_update_utc.isoformat()} to {_next_update(crl).isoformat()}"
            )
        crls.append(crl)
    for ca in ca_certificates:
        issued = [crl for crl in crls if crl.issuer == ca.subject]
        if not any(crl.is_signature_valid(ca.public_key()) for crl in issued):  # type: ignore[arg-type]
            name = ca.subject.rfc4514_string()
            raise refuse(f"{source} has no CRL signed by the CA {name!r}")
    return RevocationLists(crls=tuple(crls), source=source)


def _next_update(crl: CertificateRevocationList) -> dt.datetime:
    next_update = crl.next_update_utc
    assert next_update is not None  # refused when loaded
    return next_update


def _is_current(crl: CertificateRevocationList, now: dt.datetime) -> bool:
    return crl.last_update_utc <= now < _next_update(crl)
