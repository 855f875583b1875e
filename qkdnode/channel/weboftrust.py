"""Web-of-trust trust anchor: accept a peer's OpenPGP certificate on k introducers' vouches.

A node's identity is an OpenPGP certificate with an Ed25519 primary key and a user ID naming the
node: ``node_user_id("bob")`` is ``"qkdnode node bob"``, the form ``qkdnode pgp init`` writes
(any exact user ID string can be expected instead). The operator names trusted introducers
(their certificates) and a threshold k. ``verify_peer_certificate`` accepts a peer when

- the peer certificate parses as one OpenPGP certificate (Sequoia, through pysequoia), its
  primary key is Ed25519, it is not revoked and not expired at ``now_s``;
- the expected user ID is bound to it by a valid self-signature;
- the binding of that user ID carries certifications (signature types 0x10-0x13) from at least
  k distinct trusted introducers, each one cryptographically valid over this key and this user
  ID, made no later than ``now_s``, not expired at ``now_s``, not revoked by a later
  certification revocation (0x30) of the same introducer, from an introducer key that is itself
  not revoked and not expired at ``now_s``.

A certification by a trusted introducer that is not an Ed25519 signature over SHA-2 or SHA-3,
or that carries a critical subpacket this module does not know, is set aside as malformed.
Only direct certifications count: there is no delegation (trust signatures are not followed;
a certification whose trust amount is below 120, a partial vouch, does not count).

The peer hands over its own certificate and may leave out a revocation (of its key, or an
introducer's revocation of a certification): revocations count only when they reach the node,
so the node passes the copies it holds from elsewhere as ``local_copies``, merged in first.

Otherwise it raises ``WebOfTrustRefused`` whose ``reason`` (a ``Refusal``) names the case; when
certifications were set aside, the reason is the first of those (in ``Refusal`` order), so that
an expired or revoked vouch is reported as such rather than as too few certifications.

pysequoia (0.1.35) parses certificates, checks self-signatures, revocation and expiry, makes
keys and certifications and signs and verifies data, but has no call that verifies a
third-party certification: ``openpgp_packets`` hashes the packets Sequoia parsed as RFC 9580
section 5.2.4 prescribes and checks the Ed25519 certification with ``cryptography``; this
module decides on trust.

Proof of possession: ``sign_transcript`` makes a detached OpenPGP signature over the handshake
transcript with the node's signing key, ``verify_transcript`` checks it against the peer's
certificate and raises ``AuthenticationFailed`` when it does not cover exactly these bytes.

No secret key material reaches a repr, a message or an exception: ``SecretCertificate`` shows
only its fingerprint, and errors of the OpenPGP library are replaced by short messages.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NoReturn

import pysequoia

from qkdnode.channel.openpgp_packets import (
    MAX_CERTIFICATE_BYTES,
    PublicKey,
    Signature,
    UserIdBinding,
    expired,
    holds_secret_keys,
    issued_by,
    non_canonical_signature,
    parse_single_certificate,
    primary_key,
    signature_valid,
    user_id_bindings,
)
from qkdnode.errors import AuthenticationFailed, WebOfTrustRefused

__all__ = [
    "FULL_TRUST_AMOUNT",
    "MAX_CERTIFICATE_BYTES",
    "MAX_SIGNATURE_BYTES",
    "NODE_USER_ID_PREFIX",
    "AcceptedPeer",
    "Refusal",
    "SecretCertificate",
    "SetAside",
    "TrustedIntroducer",
    "load_introducers",
    "make_certification",
    "node_user_id",
    "sign_transcript",
    "verify_peer_certificate",
    "verify_transcript",
]

NODE_USER_ID_PREFIX = "qkdnode node "
FULL_TRUST_AMOUNT = 120
MAX_SIGNATURE_BYTES = 4096

_CERTIFICATION_TYPES = frozenset({0x10, 0x11, 0x12, 0x13})
_CERTIFICATION_REVOCATION = 0x30


class Refusal(enum.StrEnum):
    """Why a peer certificate was refused; the order ranks the reasons reported first."""

    MALFORMED_CERTIFICATE = "malformed_certificate"
    UNSUPPORTED_ALGORITHM = "unsupported_algorithm"
    PEER_KEY_REVOKED = "peer_key_revoked"
    PEER_KEY_EXPIRED = "peer_key_expired"
    PEER_KEY_NOT_YET_VALID = "peer_key_not_yet_valid"
    USER_ID_NOT_BOUND = "user_id_not_bound"
    CERTIFICATION_REVOKED = "certification_revoked"
    CERTIFICATION_EXPIRED = "certification_expired"
    CERTIFICATION_NOT_YET_VALID = "certification_not_yet_valid"
    CERTIFICATION_BAD_SIGNATURE = "certification_bad_signature"
    CERTIFICATION_MALFORMED = "certification_malformed"
    CERTIFICATION_PARTIAL_TRUST = "certification_partial_trust"
    INTRODUCER_KEY_INVALID = "introducer_key_invalid"
    CERTIFICATION_FOR_OTHER_USER_ID = "certification_for_other_user_id"
    CERTIFIER_NOT_TRUSTED = "certifier_not_trusted"
    TOO_FEW_CERTIFICATIONS = "too_few_certifications"


_RANK = {reason: index for index, reason in enumerate(Refusal)}


def node_user_id(node_name: str) -> str:
    """The user ID a node's certificate carries: ``"qkdnode node " + node_name``."""
    if not node_name or node_name != node_name.strip() or any(c in node_name for c in "<>\n"):
        raise ValueError(
            "a node name is non-empty, without surrounding blanks, '<', '>' or newlines"
        )
    return NODE_USER_ID_PREFIX + node_name


@dataclass(frozen=True, slots=True)
class SetAside:
    """One certification that did not count, by whom (a fingerprint, lowercase hex) and why."""

    certifier_fingerprint: str
    reason: Refusal


@dataclass(frozen=True, slots=True)
class AcceptedPeer:
    """A peer certificate the web of trust accepted."""

    fingerprint: str
    user_id: str
    introducer_fingerprints: tuple[str, ...]
    set_aside: tuple[SetAside, ...] = ()


class TrustedIntroducer:
    """An introducer's certificate, parsed once; its validity is checked at each verification."""

    __slots__ = ("_cert", "fingerprint", "key")

    def __init__(self, certificate: bytes) -> None:
        """Parse ``certificate`` (binary or ASCII-armoured, public only).

        Raises ``ValueError`` naming what is wrong: not one certificate, secret key material,
        or a primary key that is not Ed25519.
        """
        cert = parse_single_certificate(certificate, what="introducer certificate")
        if holds_secret_keys(certificate):
            raise ValueError(
                "an introducer certificate must not carry secret key material: export the "
                "public certificate only"
            )
        primary = primary_key(bytes(cert))
        if primary is None:
            raise ValueError(
                f"introducer certificate {cert.fingerprint}: the primary key is not Ed25519"
            )
        self._cert = cert
        self.fingerprint: str = cert.fingerprint
        self.key: PublicKey = primary

    def valid_at(self, now_s: float) -> bool:
        """True when the introducer's key is neither revoked nor expired at ``now_s``."""
        try:
            return not self._cert.is_revoked and not expired(self._cert, now_s)
        except RuntimeError:  # no valid self-signature at the library's clock
            return False

    def __repr__(self) -> str:
        return f"TrustedIntroducer(fingerprint={self.fingerprint})"


class SecretCertificate:
    """A node's OpenPGP key with its secret parts; shows only its fingerprint."""

    __slots__ = ("_tsk", "fingerprint")

    def __init__(self, secret_certificate: bytes) -> None:
        """Parse a transferable secret key (binary or armoured, without a password).

        Raises ``ValueError`` when the bytes are not one unprotected secret key.
        """
        try:
            tsk = pysequoia.Tsk.from_bytes(secret_certificate)
        except (RuntimeError, ValueError):
            raise ValueError("not an OpenPGP secret key") from None
        if not holds_secret_keys(secret_certificate):
            raise ValueError("the OpenPGP data holds no secret key material")
        self._tsk = tsk
        self.fingerprint: str = tsk.extract_certificate().fingerprint

    @property
    def public_certificate(self) -> bytes:
        """The public certificate (binary), to hand to peers and introducers."""
        return bytes(self._tsk.extract_certificate())

    def _signer(self) -> pysequoia.PySigner:
        try:
            return self._tsk.signer()
        except RuntimeError:
            raise ValueError(
                f"secret key {self.fingerprint} has no usable signing key (or is password-"
                "protected): make node keys with `qkdnode pgp init`"
            ) from None

    def _certifier(self) -> pysequoia.PySigner:
        try:
            return self._tsk.certifier()
        except RuntimeError:
            raise ValueError(
                f"secret key {self.fingerprint} cannot certify (or is password-protected)"
            ) from None

    def __repr__(self) -> str:
        return f"SecretCertificate(fingerprint={self.fingerprint}, secret=<redacted>)"

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("a SecretCertificate is not picklable")


def load_introducers(certificates: Iterable[bytes]) -> tuple[TrustedIntroducer, ...]:
    """Parse introducer certificates, one per item; the same key twice counts once."""
    seen: dict[str, TrustedIntroducer] = {}
    for certificate in certificates:
        introducer = TrustedIntroducer(certificate)
        seen.setdefault(introducer.fingerprint, introducer)
    return tuple(seen.values())


def verify_peer_certificate(
    peer_certificate: bytes,
    *,
    introducers: Sequence[TrustedIntroducer],
    threshold: int,
    user_id: str,
    now_s: float,
    local_copies: Sequence[bytes] = (),
) -> AcceptedPeer:
    """Accept ``peer_certificate`` for ``user_id`` when ``threshold`` introducers vouch for it.

    ``now_s`` is the current time in seconds since the Unix epoch. ``local_copies`` are copies
    of the peer's certificate the node holds from elsewhere (the operator's file, an
    introducer's updated export): the peer sends its own certificate and can leave a revocation
    out, so revocations (and certifications) of a local copy with the same fingerprint are
    merged in before judging; copies of other keys are ignored. Raises
    ``WebOfTrustRefused`` with the ``Refusal`` that applies; never another exception for any
    input bytes. ``ValueError`` only for a threshold below 1 or above the number of introducers.
    """
    if not 1 <= threshold <= len({i.fingerprint for i in introducers}):
        raise ValueError(
            f"the threshold must be between 1 and the number of distinct introducers "
            f"({len({i.fingerprint for i in introducers})}), not {threshold}"
        )

    try:
        return _verify_peer_certificate(
            peer_certificate,
            introducers=introducers,
            threshold=threshold,
            user_id=user_id,
            now_s=now_s,
            local_copies=local_copies,
        )
    except (RuntimeError, ValueError):
        # the OpenPGP library's errors on malformed data (e.g. no valid self-signature)
        raise WebOfTrustRefused(
            Refusal.MALFORMED_CERTIFICATE,
            detail="the peer certificate has no valid self-signature or does not parse",
            user_id=user_id,
            threshold=threshold,
        ) from None


def _verify_peer_certificate(
    peer_certificate: bytes,
    *,
    introducers: Sequence[TrustedIntroducer],
    threshold: int,
    user_id: str,
    now_s: float,
    local_copies: Sequence[bytes],
) -> AcceptedPeer:
    def refuse(reason: Refusal, detail: str, set_aside: Sequence[SetAside] = ()) -> NoReturn:
        raise WebOfTrustRefused(
            reason, detail=detail, user_id=user_id, threshold=threshold, set_aside=tuple(set_aside)
        )

    try:
        cert = parse_single_certificate(peer_certificate, what="peer certificate")
    except ValueError as exc:
        refuse(Refusal.MALFORMED_CERTIFICATE, str(exc))
    if holds_secret_keys(peer_certificate):
        refuse(Refusal.MALFORMED_CERTIFICATE, "the peer sent secret key material")
    for local_copy in local_copies:
        known = parse_single_certificate(local_copy, what="local copy of the peer certificate")
        if known.fingerprint == cert.fingerprint:
            cert = cert.merge(known)
    packets = bytes(cert)
    primary = primary_key(packets)
    if primary is None:
        refuse(Refusal.UNSUPPORTED_ALGORITHM, f"{cert.fingerprint}: the primary key is not Ed25519")
    if cert.is_revoked:
        refuse(Refusal.PEER_KEY_REVOKED, f"{cert.fingerprint} is revoked by its owner")
    if expired(cert, now_s):
        refuse(Refusal.PEER_KEY_EXPIRED, f"{cert.fingerprint} expired at {cert.expiration}")
    if primary.created_s > now_s:
        refuse(Refusal.PEER_KEY_NOT_YET_VALID, f"{cert.fingerprint} was made in the future")
    if user_id not in {str(bound) for bound in cert.user_ids}:
        refuse(
            Refusal.USER_ID_NOT_BOUND,
            f"{cert.fingerprint} has no self-signed, unrevoked user ID {user_id!r}",
        )

    trusted = {i.fingerprint: i for i in introducers}
    by_key_id = {i.key.key_id: i for i in introducers}
    vouchers: list[str] = []
    set_aside: list[SetAside] = []
    expected = user_id.encode("utf-8")
    for binding in user_id_bindings(packets):
        third_party = [
            s for s in binding.signatures if not issued_by(s, primary.fingerprint, primary.key_id)
        ]
        if binding.user_id != expected:
            for signature in third_party:
                introducer = _issuer(signature, trusted, by_key_id)
                if signature.signature_type in _CERTIFICATION_TYPES and introducer is not None:
                    set_aside.append(
                        SetAside(introducer.fingerprint, Refusal.CERTIFICATION_FOR_OTHER_USER_ID)
                    )
            continue
        counted, rejected = _judge_binding(primary, binding, third_party, trusted, by_key_id, now_s)
        vouchers.extend(counted)
        set_aside.extend(rejected)
    vouchers = sorted(set(vouchers))
    set_aside.sort(key=lambda s: (_RANK[s.reason], s.certifier_fingerprint))
    if len(vouchers) >= threshold:
        return AcceptedPeer(
            fingerprint=cert.fingerprint,
            user_id=user_id,
            introducer_fingerprints=tuple(vouchers),
            set_aside=tuple(set_aside),
        )
    reason = set_aside[0].reason if set_aside else Refusal.TOO_FEW_CERTIFICATIONS
    refuse(
        reason,
        f"{cert.fingerprint}: {len(vouchers)} of the {threshold} trusted introducers required "
        "vouch for it; each needs a valid certification of this user ID on the peer's current "
        "certificate (`qkdnode pgp vouch`)",
        set_aside,
    )


def _judge_binding(
    primary: PublicKey,
    binding: UserIdBinding,
    third_party: Sequence[Signature],
    trusted: dict[str, TrustedIntroducer],
    by_key_id: dict[str, TrustedIntroducer],
    now_s: float,
) -> tuple[list[str], list[SetAside]]:
    """The introducers whose certification of this binding counts, and those set aside."""
    certifications: dict[str, list[Signature]] = {}
    revocations: dict[str, list[Signature]] = {}
    rejected: list[SetAside] = []
    for signature in third_party:
        is_certification = signature.signature_type in _CERTIFICATION_TYPES
        if not is_certification and signature.signature_type != _CERTIFICATION_REVOCATION:
            continue
        introducer = _issuer(signature, trusted, by_key_id)
        if introducer is None:
            if is_certification:
                certifier = signature.issuer_fingerprint or signature.issuer_key_id or ""
                rejected.append(SetAside(certifier, Refusal.CERTIFIER_NOT_TRUSTED))
            continue
        if signature.critical_unknown or signature.raw_signature is None or not signature.hash_name:
            rejected.append(SetAside(introducer.fingerprint, Refusal.CERTIFICATION_MALFORMED))
            continue
        if not signature_valid(signature, introducer.key, primary, binding.user_id):
            rejected.append(SetAside(introducer.fingerprint, Refusal.CERTIFICATION_BAD_SIGNATURE))
            continue
        target = certifications if is_certification else revocations
        target.setdefault(introducer.fingerprint, []).append(signature)

    counted: list[str] = []
    for fingerprint, signatures in sorted(certifications.items()):
        reason = _judge_certification(signatures, revocations.get(fingerprint, []), now_s)
        if reason is None and not trusted[fingerprint].valid_at(now_s):
            reason = Refusal.INTRODUCER_KEY_INVALID
        if reason is None:
            counted.append(fingerprint)
        else:
            rejected.append(SetAside(fingerprint, reason))
    return counted, rejected


def _judge_certification(
    certifications: Sequence[Signature], revocations: Sequence[Signature], now_s: float
) -> Refusal | None:
    """None when the newest certification made by ``now_s`` holds, else why it does not."""
    made = [c for c in certifications if c.created_s <= now_s]
    if not made:
        return Refusal.CERTIFICATION_NOT_YET_VALID
    newest = max(made, key=lambda c: c.created_s)
    if any(newest.created_s <= r.created_s <= now_s for r in revocations):
        return Refusal.CERTIFICATION_REVOKED
    if newest.expires_after_s is not None and newest.created_s + newest.expires_after_s <= now_s:
        return Refusal.CERTIFICATION_EXPIRED
    if newest.trust_amount is not None and newest.trust_amount < FULL_TRUST_AMOUNT:
        return Refusal.CERTIFICATION_PARTIAL_TRUST
    return None


def sign_transcript(secret_certificate: SecretCertificate, transcript: bytes) -> bytes:
    """A detached binary OpenPGP signature over ``transcript`` by the node's signing key.

    The signing key is the certificate's signing subkey when it has one, else its primary key.
    """
    return pysequoia.sign(
        secret_certificate._signer(),
        transcript,
        mode=pysequoia.SignatureMode.DETACHED,
        armor=False,
    )


def verify_transcript(
    peer_certificate: bytes, transcript: bytes, signature: bytes, *, canonical_only: bool = False
) -> None:
    """Check that ``signature`` is the peer's detached signature over exactly ``transcript``.

    Made by a signing-capable key of ``peer_certificate`` (valid now, by the OpenPGP library's
    clock and policy). Raises ``AuthenticationFailed`` otherwise, also for malformed input.

    ``canonical_only`` (the handshake sets it) also refuses any encoding of a valid signature
    other than the one ``sign_transcript`` makes: one new-format packet with a minimal length,
    no unhashed subpackets, the right two-byte hash prefix, minimal MPIs. OpenPGP leaves those
    bytes outside the signature, so without this check a changed byte there still verifies,
    and the two ends of a handshake that goes on to hash the proof would disagree.
    """
    if len(signature) > MAX_SIGNATURE_BYTES:
        raise AuthenticationFailed(
            f"transcript signature of {len(signature)} bytes, more than {MAX_SIGNATURE_BYTES}"
        )
    try:
        cert = parse_single_certificate(peer_certificate, what="peer certificate")
        parsed = pysequoia.Sig.from_bytes(signature)
    except (RuntimeError, ValueError):
        raise AuthenticationFailed("transcript signature or peer certificate malformed") from None
    if parsed.signature_type != pysequoia.packet.SignatureType.Binary:
        # a text signature canonicalises line endings: two transcripts could share it
        raise AuthenticationFailed("the transcript signature must be a binary signature (0x00)")
    try:
        result = pysequoia.verify(bytes=transcript, store=lambda _key_ids: [cert], signature=parsed)
    except (RuntimeError, ValueError):
        raise AuthenticationFailed(
            f"the transcript signature does not verify under {cert.fingerprint}: it was made "
            "over other bytes (a replayed proof) or by another key"
        ) from None
    if not any(getattr(v, "certificate", None) == cert.fingerprint for v in result.valid_sigs):
        raise AuthenticationFailed(f"no valid transcript signature by {cert.fingerprint}")
    if canonical_only:
        problem = non_canonical_signature(transcript, signature)
        if problem is not None:
            raise AuthenticationFailed(f"the transcript signature is not canonical: {problem}")


def make_certification(
    introducer: SecretCertificate, peer_certificate: bytes, user_id: str
) -> bytes:
    """The peer certificate with ``introducer``'s certification of its ``user_id`` added.

    The user ID must already be bound to the peer certificate by its owner. Returns the binary
    certificate, to be handed back to the peer's operator. Raises ``ValueError`` when the
    certificate does not parse or lacks that user ID.
    """
    cert = parse_single_certificate(peer_certificate, what="peer certificate")
    if holds_secret_keys(peer_certificate):
        raise ValueError("certify the public certificate, not the peer's secret key")
    if user_id not in {str(bound) for bound in cert.user_ids}:
        raise ValueError(
            f"{cert.fingerprint} carries no self-signed user ID {user_id!r}: ask its operator "
            "for the node's current certificate"
        )
    certified = cert.add_user_id(user_id, introducer._certifier())
    return bytes(certified)


def _issuer(
    signature: Signature,
    trusted: dict[str, TrustedIntroducer],
    by_key_id: dict[str, TrustedIntroducer],
) -> TrustedIntroducer | None:
    if signature.issuer_fingerprint is not None:
        return trusted.get(signature.issuer_fingerprint)
    if signature.issuer_key_id is not None:
        return by_key_id.get(signature.issuer_key_id)
    return None
