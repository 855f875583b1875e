"""The whole qkdnode exception hierarchy.

Exceptions are for bugs, bad input and security failures. Expected outcomes of the protocol
(a block aborted on high QBER, a failed verification) are events, not exceptions.

No message built here or by callers may contain secret material: name the field, the size or the
reason, never the value of a key, a tag or a seed.
"""

from __future__ import annotations


class QkdError(Exception):
    """Base class of every error qkdnode raises on purpose."""


class ConfigError(QkdError):
    """A configuration value is missing, of the wrong type or out of range.

    The message names the file (when there is one), the dotted key and what was expected.
    """

    def __init__(self, key: str, expected: str, *, file: str | None = None) -> None:
        self.key = key
        self.expected = expected
        self.file = file
        where = f"{file}: " if file else ""
        super().__init__(f"{where}{key}: expected {expected}")


class ProtocolError(QkdError):
    """The peer (or local caller) broke the protocol: malformed message, wrong state, bad length.

    ``field`` names the offending field when there is one.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class SecurityError(QkdError):
    """A security check failed. Never swallowed by generic handlers."""


class AuthenticationFailed(SecurityError):
    """A tag or signature did not verify."""


class CertificateRejected(SecurityError):
    """The peer certificate failed chain, validity, key usage or name-pinning checks."""


class CertificatePurposeRejected(CertificateRejected):
    """The certificate's extended key usage does not allow the role it was presented for: an
    SAE certificate on the peer channel, a node certificate at the key-delivery API.

    ``role`` is the role it was presented for (``"node"`` or ``"SAE"``); the message names the
    subject and what its extended key usage lacks or carries."""

    def __init__(self, role: str, detail: str) -> None:
        self.role = role
        article = "an" if role == "SAE" else "a"
        super().__init__(f"not {article} {role} certificate: {detail}")


class CertificateRevoked(CertificateRejected):
    """A certificate of the chain is listed in its issuer's certificate revocation list.

    ``serial`` is the revoked certificate's serial number (hex), ``issuer`` its issuer's name."""

    def __init__(self, *, subject: str, serial: str, issuer: str) -> None:
        self.serial = serial
        self.issuer = issuer
        super().__init__(f"certificate {subject!r} (serial {serial}) is revoked by {issuer!r}")


class RevocationUnknown(CertificateRejected):
    """The revocation status of a certificate of the chain cannot be decided: no CRL of its
    issuer is configured, or that CRL is stale (past its nextUpdate) or not yet valid."""


class WebOfTrustRefused(CertificateRejected):
    """The peer's OpenPGP certificate lacks enough valid vouches from trusted introducers.

    ``reason`` names the case (a ``qkdnode.channel.weboftrust.Refusal`` value), ``set_aside``
    lists every certification that did not count with its own reason. The message names
    fingerprints and user IDs only, never key material.
    """

    def __init__(
        self,
        reason: str,
        *,
        detail: str,
        user_id: str,
        threshold: int,
        set_aside: tuple[object, ...] = (),
    ) -> None:
        self.reason = reason
        self.user_id = user_id
        self.threshold = threshold
        self.set_aside = set_aside
        super().__init__(f"web of trust refuses the peer as {user_id!r} ({reason}): {detail}")


class AuthKeyExhausted(SecurityError):
    """The authentication-key pool cannot pay for the next tag without breaking its reserve."""


class LinkError(QkdError):
    """A quantum-link backend failed."""


class LinkTimeout(LinkError):
    """The link did not deliver within its timeout."""


class LinkLost(LinkError):
    """The device or the fibre connection went away."""


class BadDeviceData(LinkError):
    """The device (or the fibre peer) sent data that does not parse or is out of range."""


class KeyStoreError(QkdError):
    """The key store is corrupt or an I/O operation failed; the daemon must stop, never retry."""


class AuditTrailBroken(SecurityError):
    """The audit trail does not verify: an entry was edited, removed, reordered or cut off, or
    the trail's evolving key was replaced. ``seq`` names the first bad entry (or the position
    where one is missing) and ``reason`` says what failed."""

    def __init__(self, seq: int, reason: str) -> None:
        self.seq = seq
        self.reason = reason
        super().__init__(f"audit entry {seq}: {reason}")
