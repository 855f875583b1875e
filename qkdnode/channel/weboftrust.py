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
third-party certification. This module therefore hashes the packets Sequoia parsed as RFC 9580
section 5.2.4 prescribes for a version 4 certification (key packet, user ID, the signature's
hashed part and trailer) and checks the Ed25519 signature with ``cryptography``. The test
vectors made by gpg and sq check that computation both ways.

Proof of possession: ``sign_transcript`` makes a detached OpenPGP signature over the handshake
transcript with the node's signing key, ``verify_transcript`` checks it against the peer's
certificate and raises ``AuthenticationFailed`` when it does not cover exactly these bytes.

No secret key material reaches a repr, a message or an exception: ``SecretCertificate`` shows
only its fingerprint, and errors of the OpenPGP library are replaced by short messages.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

import pysequoia
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519
from pysequoia.packet import PacketPile, Tag

from qkdnode.errors import AuthenticationFailed, WebOfTrustRefused

NODE_USER_ID_PREFIX = "qkdnode node "
FULL_TRUST_AMOUNT = 120
MAX_CERTIFICATE_BYTES = 1 << 20
MAX_SIGNATURE_BYTES = 4096

_ED25519_OID = bytes.fromhex("2b06010401da470f01")  # 1.3.6.1.4.1.11591.15.1
_ALGORITHM_EDDSA_LEGACY = 22
_ALGORITHM_ED25519 = 27
_TAG_SIGNATURE = 2
_CERTIFICATION_TYPES = frozenset({0x10, 0x11, 0x12, 0x13})
_CERTIFICATION_REVOCATION = 0x30
_HASHES = {8: "sha256", 9: "sha384", 10: "sha512", 12: "sha3_256", 14: "sha3_512"}
# hashed subpackets this module understands; an unknown one marked critical voids the signature
_SUBPACKET_CREATED = 2
_SUBPACKET_EXPIRES_AFTER = 3
_SUBPACKET_EXPORTABLE = 4
_SUBPACKET_TRUST = 5
_SUBPACKET_REVOCABLE = 7
_SUBPACKET_ISSUER_KEY_ID = 16
_SUBPACKET_NOTATION = 20
_SUBPACKET_PREFERRED_KEY_SERVER = 24
_SUBPACKET_POLICY_URI = 26
_SUBPACKET_SIGNERS_USER_ID = 28
_SUBPACKET_REVOCATION_REASON = 29
_SUBPACKET_ISSUER_FINGERPRINT = 33
_UNDERSTOOD_CRITICAL = frozenset(
    {
        _SUBPACKET_CREATED,
        _SUBPACKET_EXPIRES_AFTER,
        _SUBPACKET_EXPORTABLE,
        _SUBPACKET_TRUST,
        _SUBPACKET_REVOCABLE,
        _SUBPACKET_ISSUER_KEY_ID,
        _SUBPACKET_SIGNERS_USER_ID,
        _SUBPACKET_REVOCATION_REASON,
        _SUBPACKET_ISSUER_FINGERPRINT,
    }
)


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


@dataclass(frozen=True, slots=True)
class _PublicKey:
    fingerprint: str
    key_id: str
    body: bytes
    created_s: int
    verifying_key: ed25519.Ed25519PublicKey = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class _Signature:
    signature_type: int
    hashed_part: bytes
    hash_name: str | None  # None: a hash this module does not accept (SHA-1, MD5, ...)
    left16: bytes
    raw_signature: bytes | None = field(repr=False)  # None: not an Ed25519 signature
    created_s: int
    expires_after_s: int | None
    issuer_fingerprint: str | None
    issuer_key_id: str | None
    trust_amount: int | None
    critical_unknown: bool


@dataclass(frozen=True, slots=True)
class _UserIdBinding:
    user_id: bytes
    signatures: tuple[_Signature, ...]


class TrustedIntroducer:
    """An introducer's certificate, parsed once; its validity is checked at each verification."""

    __slots__ = ("_cert", "fingerprint", "key")

    def __init__(self, certificate: bytes) -> None:
        """Parse ``certificate`` (binary or ASCII-armoured, public only).

        Raises ``ValueError`` naming what is wrong: not one certificate, secret key material,
        or a primary key that is not Ed25519.
        """
        cert = _parse_single_certificate(certificate, what="introducer certificate")
        if _holds_secret_keys(certificate):
            raise ValueError(
                "an introducer certificate must not carry secret key material: export the "
                "public certificate only"
            )
        primary = _primary_key(bytes(cert))
        if primary is None:
            raise ValueError(
                f"introducer certificate {cert.fingerprint}: the primary key is not Ed25519"
            )
        self._cert = cert
        self.fingerprint: str = cert.fingerprint
        self.key: _PublicKey = primary

    def valid_at(self, now_s: float) -> bool:
        """True when the introducer's key is neither revoked nor expired at ``now_s``."""
        try:
            return not self._cert.is_revoked and not _expired(self._cert, now_s)
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
        if not _holds_secret_keys(secret_certificate):
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
        cert = _parse_single_certificate(peer_certificate, what="peer certificate")
    except ValueError as exc:
        refuse(Refusal.MALFORMED_CERTIFICATE, str(exc))
    if _holds_secret_keys(peer_certificate):
        refuse(Refusal.MALFORMED_CERTIFICATE, "the peer sent secret key material")
    for local_copy in local_copies:
        known = _parse_single_certificate(local_copy, what="local copy of the peer certificate")
        if known.fingerprint == cert.fingerprint:
            cert = cert.merge(known)
    packets = bytes(cert)
    primary = _primary_key(packets)
    if primary is None:
        refuse(Refusal.UNSUPPORTED_ALGORITHM, f"{cert.fingerprint}: the primary key is not Ed25519")
    if cert.is_revoked:
        refuse(Refusal.PEER_KEY_REVOKED, f"{cert.fingerprint} is revoked by its owner")
    if _expired(cert, now_s):
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
    for binding in _user_id_bindings(packets):
        third_party = [
            s for s in binding.signatures if not _issued_by(s, primary.fingerprint, primary.key_id)
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
    primary: _PublicKey,
    binding: _UserIdBinding,
    third_party: Sequence[_Signature],
    trusted: dict[str, TrustedIntroducer],
    by_key_id: dict[str, TrustedIntroducer],
    now_s: float,
) -> tuple[list[str], list[SetAside]]:
    """The introducers whose certification of this binding counts, and those set aside."""
    certifications: dict[str, list[_Signature]] = {}
    revocations: dict[str, list[_Signature]] = {}
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
        if not _signature_valid(signature, introducer.key, primary, binding.user_id):
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
    certifications: Sequence[_Signature], revocations: Sequence[_Signature], now_s: float
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
        cert = _parse_single_certificate(peer_certificate, what="peer certificate")
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
        problem = _non_canonical_signature(transcript, signature)
        if problem is not None:
            raise AuthenticationFailed(f"the transcript signature is not canonical: {problem}")


def _non_canonical_signature(transcript: bytes, signature: bytes) -> str | None:
    """What makes ``signature`` (valid over ``transcript``) differ from the one encoding
    ``sign_transcript`` gives, or None."""
    try:
        packets = list(PacketPile.from_bytes(signature))
    except (RuntimeError, ValueError):
        return "does not parse"
    if len(packets) != 1 or packets[0].tag != Tag.Signature:
        return "not exactly one signature packet"
    body = packets[0].body
    if signature != _new_format_header(_TAG_SIGNATURE, len(body)) + body:
        return "not a new-format packet with a minimal length"
    parsed = _parse_signature(body)
    if parsed is None or parsed.hash_name is None or parsed.raw_signature is None:
        return "not a version 4 Ed25519 signature over SHA-2 or SHA-3"
    hashed_end = len(parsed.hashed_part)
    if body[hashed_end : hashed_end + 2] != b"\x00\x00":
        return "unhashed subpackets"
    digest = hashlib.new(parsed.hash_name)
    digest.update(transcript)
    digest.update(parsed.hashed_part)
    digest.update(b"\x04\xff" + len(parsed.hashed_part).to_bytes(4, "big"))
    if digest.digest()[:2] != parsed.left16:
        return "the hash prefix does not match"
    algorithm = body[2]
    if body[hashed_end + 4 :] != _ed25519_signature_material(algorithm, parsed.raw_signature):
        return "non-minimal signature MPIs"
    return None


def _new_format_header(tag: int, length: int) -> bytes:
    """RFC 9580 section 4.2.1: a new-format packet header with the shortest length encoding."""
    if length < 192:
        return bytes([0xC0 | tag, length])
    if length < 8384:
        return bytes([0xC0 | tag, ((length - 192) >> 8) + 192, (length - 192) & 0xFF])
    return bytes([0xC0 | tag, 0xFF]) + length.to_bytes(4, "big")


def _ed25519_signature_material(algorithm: int, raw_signature: bytes) -> bytes:
    """The minimal encoding of a 64-byte Ed25519 signature: raw (Ed25519) or as two MPIs
    without leading zeros (EdDSA legacy)."""
    if algorithm == _ALGORITHM_ED25519:
        return raw_signature
    material = b""
    for half in (raw_signature[:32], raw_signature[32:]):
        value = int.from_bytes(half, "big")
        material += value.bit_length().to_bytes(2, "big") + half.lstrip(b"\x00")
    return material


def make_certification(
    introducer: SecretCertificate, peer_certificate: bytes, user_id: str
) -> bytes:
    """The peer certificate with ``introducer``'s certification of its ``user_id`` added.

    The user ID must already be bound to the peer certificate by its owner. Returns the binary
    certificate, to be handed back to the peer's operator. Raises ``ValueError`` when the
    certificate does not parse or lacks that user ID.
    """
    cert = _parse_single_certificate(peer_certificate, what="peer certificate")
    if _holds_secret_keys(peer_certificate):
        raise ValueError("certify the public certificate, not the peer's secret key")
    if user_id not in {str(bound) for bound in cert.user_ids}:
        raise ValueError(
            f"{cert.fingerprint} carries no self-signed user ID {user_id!r}: ask its operator "
            "for the node's current certificate"
        )
    certified = cert.add_user_id(user_id, introducer._certifier())
    return bytes(certified)


# ---- OpenPGP packet parsing over the packets Sequoia parsed ------------------------------------


def _parse_single_certificate(data: bytes, *, what: str) -> pysequoia.Cert:
    if len(data) > MAX_CERTIFICATE_BYTES:
        raise ValueError(f"{what} of {len(data)} bytes, more than {MAX_CERTIFICATE_BYTES}")
    try:
        certs = pysequoia.Cert.split_bytes(data)
    except (RuntimeError, ValueError):
        raise ValueError(f"{what} is not OpenPGP data") from None
    if len(certs) != 1:
        raise ValueError(f"{what} must hold exactly one certificate, not {len(certs)}")
    return certs[0]


def _holds_secret_keys(data: bytes) -> bool:
    """Whether OpenPGP ``data`` (already parsed once as a certificate) has secret key packets."""
    try:
        return any(p.tag in (Tag.SecretKey, Tag.SecretSubkey) for p in PacketPile.from_bytes(data))
    except (RuntimeError, ValueError):
        return False


def _expired(cert: pysequoia.Cert, now_s: float) -> bool:
    expiration = cert.expiration
    return expiration is not None and expiration.timestamp() <= now_s


def _primary_key(packets: bytes) -> _PublicKey | None:
    for packet in PacketPile.from_bytes(packets):
        if packet.tag in (Tag.PublicKey, Tag.SecretKey):
            fingerprint = packet.fingerprint
            key_id = packet.key_id
            if fingerprint is None or key_id is None:
                return None
            body = packet.body
            if packet.tag == Tag.SecretKey:
                return None  # secret keys are never judged here
            point = _ed25519_point(body)
            if point is None:
                return None
            return _PublicKey(
                fingerprint=fingerprint,
                key_id=key_id,
                body=body,
                created_s=int.from_bytes(body[1:5], "big"),
                verifying_key=ed25519.Ed25519PublicKey.from_public_bytes(point),
            )
    return None


def _ed25519_point(body: bytes) -> bytes | None:
    """The 32-byte Ed25519 public key of a version 4 key packet body, or None."""
    if len(body) < 6 or body[0] != 4:
        return None
    algorithm = body[5]
    if algorithm == _ALGORITHM_ED25519:
        return body[6:38] if len(body) == 38 else None
    if algorithm != _ALGORITHM_EDDSA_LEGACY or len(body) < 7:
        return None
    oid_length = body[6]
    oid = body[7 : 7 + oid_length]
    rest = body[7 + oid_length :]
    if oid != _ED25519_OID or len(rest) != 2 + 33 or rest[2] != 0x40:
        return None
    return rest[3:]


def _user_id_bindings(packets: bytes) -> list[_UserIdBinding]:
    """Each user ID packet with the signature packets that follow it."""
    bindings: list[_UserIdBinding] = []
    user_id: bytes | None = None
    signatures: list[_Signature] = []

    def close() -> None:
        if user_id is not None:
            bindings.append(_UserIdBinding(user_id, tuple(signatures)))

    for packet in PacketPile.from_bytes(packets):
        if packet.tag == Tag.Signature:
            if user_id is not None:
                parsed = _parse_signature(packet.body)
                if parsed is not None:  # not even its issuer is legible: it cannot count
                    signatures.append(parsed)
            continue
        close()
        user_id, signatures = None, []
        if packet.tag == Tag.UserID:
            user_id = packet.body
    close()
    return bindings


def _subpackets(area: bytes) -> list[tuple[int, bool, bytes]] | None:
    """(type, critical, body) of each subpacket in ``area``, None when the area is malformed."""
    found: list[tuple[int, bool, bytes]] = []
    offset = 0
    while offset < len(area):
        first = area[offset]
        if first < 192:
            length, offset = first, offset + 1
        elif first < 255:
            if offset + 1 >= len(area):
                return None
            length = ((first - 192) << 8) + area[offset + 1] + 192
            offset += 2
        else:
            if offset + 5 > len(area):
                return None
            length = int.from_bytes(area[offset + 1 : offset + 5], "big")
            offset += 5
        if length < 1 or offset + length > len(area):
            return None
        kind = area[offset]
        found.append((kind & 0x7F, bool(kind & 0x80), area[offset + 1 : offset + length]))
        offset += length
    return found


def _parse_signature(body: bytes) -> _Signature | None:
    """A version 4 signature packet body, or None when its structure does not parse."""
    if len(body) < 6 or body[0] != 4:
        return None
    signature_type, algorithm, hash_algorithm = body[1], body[2], body[3]
    hashed_length = int.from_bytes(body[4:6], "big")
    hashed_end = 6 + hashed_length
    if hashed_end + 2 > len(body):
        return None
    unhashed_length = int.from_bytes(body[hashed_end : hashed_end + 2], "big")
    unhashed_end = hashed_end + 2 + unhashed_length
    if unhashed_end + 2 > len(body):
        return None
    hashed = _subpackets(body[6:hashed_end])
    unhashed = _subpackets(body[hashed_end + 2 : unhashed_end])
    if hashed is None or unhashed is None:
        return None
    left16 = body[unhashed_end : unhashed_end + 2]
    raw = _raw_ed25519_signature(algorithm, body[unhashed_end + 2 :])
    created_s: int | None = None
    expires_after_s: int | None = None
    issuer_fingerprint: str | None = None
    issuer_key_id: str | None = None
    trust_amount: int | None = None
    critical_unknown = False
    for kind, critical, value in hashed:
        if kind == _SUBPACKET_CREATED and len(value) == 4:
            created_s = int.from_bytes(value, "big")
        elif kind == _SUBPACKET_EXPIRES_AFTER and len(value) == 4:
            expires_after_s = int.from_bytes(value, "big") or None
        elif kind == _SUBPACKET_ISSUER_FINGERPRINT and len(value) == 21 and value[0] == 4:
            issuer_fingerprint = value[1:].hex()
        elif kind == _SUBPACKET_ISSUER_KEY_ID and len(value) == 8:
            issuer_key_id = value.hex()
        elif kind == _SUBPACKET_TRUST and len(value) == 2:
            trust_amount = value[1]
        elif critical and kind not in _UNDERSTOOD_CRITICAL:
            critical_unknown = True
    # the unhashed area may name the issuer (gpg puts the key ID there); the signature check
    # against that issuer's key is what makes the hint trustworthy
    for kind, _critical, value in unhashed:
        if kind == _SUBPACKET_ISSUER_FINGERPRINT and len(value) == 21 and value[0] == 4:
            issuer_fingerprint = issuer_fingerprint or value[1:].hex()
        elif kind == _SUBPACKET_ISSUER_KEY_ID and len(value) == 8:
            issuer_key_id = issuer_key_id or value.hex()
    if created_s is None:
        return None
    return _Signature(
        signature_type=signature_type,
        hashed_part=body[:hashed_end],
        hash_name=_HASHES.get(hash_algorithm),
        left16=left16,
        raw_signature=raw,
        created_s=created_s,
        expires_after_s=expires_after_s,
        issuer_fingerprint=issuer_fingerprint,
        issuer_key_id=issuer_key_id,
        trust_amount=trust_amount,
        critical_unknown=critical_unknown,
    )


def _raw_ed25519_signature(algorithm: int, material: bytes) -> bytes | None:
    """The 64-byte Ed25519 signature from an EdDSA (two MPIs) or Ed25519 (raw) signature."""
    if algorithm == _ALGORITHM_ED25519:
        return material if len(material) == 64 else None
    if algorithm != _ALGORITHM_EDDSA_LEGACY:
        return None
    parts: list[bytes] = []
    offset = 0
    for _ in range(2):
        if offset + 2 > len(material):
            return None
        bits = int.from_bytes(material[offset : offset + 2], "big")
        size = math.ceil(bits / 8)
        value = material[offset + 2 : offset + 2 + size]
        if len(value) != size or size > 32:
            return None
        parts.append(value.rjust(32, b"\x00"))
        offset += 2 + size
    return parts[0] + parts[1] if offset == len(material) else None


def _signature_valid(
    signature: _Signature, signer: _PublicKey, subject: _PublicKey, user_id: bytes
) -> bool:
    """Whether ``signature`` by ``signer`` covers ``subject``'s key with ``user_id``."""
    if signature.hash_name is None or signature.raw_signature is None:
        return False
    digest = hashlib.new(signature.hash_name)
    digest.update(b"\x99" + len(subject.body).to_bytes(2, "big") + subject.body)
    digest.update(b"\xb4" + len(user_id).to_bytes(4, "big") + user_id)
    digest.update(signature.hashed_part)
    digest.update(b"\x04\xff" + len(signature.hashed_part).to_bytes(4, "big"))
    value = digest.digest()
    if value[:2] != signature.left16:
        return False
    try:
        signer.verifying_key.verify(signature.raw_signature, value)
    except InvalidSignature:
        return False
    return True


def _issued_by(signature: _Signature, fingerprint: str, key_id: str) -> bool:
    if signature.issuer_fingerprint is not None:
        return signature.issuer_fingerprint == fingerprint
    return signature.issuer_key_id == key_id


def _issuer(
    signature: _Signature,
    trusted: dict[str, TrustedIntroducer],
    by_key_id: dict[str, TrustedIntroducer],
) -> TrustedIntroducer | None:
    if signature.issuer_fingerprint is not None:
        return trusted.get(signature.issuer_fingerprint)
    if signature.issuer_key_id is not None:
        return by_key_id.get(signature.issuer_key_id)
    return None
