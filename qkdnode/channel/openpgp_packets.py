"""OpenPGP packet-level work for the web of trust: parse and check what Sequoia leaves to us.

pysequoia (0.1.35) parses certificates, checks self-signatures, revocation and expiry, makes
keys and certifications and signs and verifies data, but has no call that verifies a
third-party certification. This module therefore hashes the packets Sequoia parsed as RFC 9580
section 5.2.4 prescribes for a version 4 certification (key packet, user ID, the signature's
hashed part and trailer) and checks the Ed25519 signature with ``cryptography``. The test
vectors made by gpg and sq check that computation both ways.

It also parses the pieces that computation needs (the primary key, each user ID with the
signatures that follow it, a signature's subpackets) and tells whether a transcript signature
is the one canonical encoding ``weboftrust.sign_transcript`` makes. The trust decision
(introducers, threshold, refusals) is ``weboftrust``'s.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import pysequoia
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519
from pysequoia.packet import PacketPile, Tag

MAX_CERTIFICATE_BYTES = 1 << 20

_ED25519_OID = bytes.fromhex("2b06010401da470f01")  # 1.3.6.1.4.1.11591.15.1
_ALGORITHM_EDDSA_LEGACY = 22
_ALGORITHM_ED25519 = 27
_TAG_SIGNATURE = 2
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


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A version 4 Ed25519 primary key packet: its body is what certifications hash."""

    fingerprint: str
    key_id: str
    body: bytes
    created_s: int
    verifying_key: ed25519.Ed25519PublicKey = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Signature:
    """The parts of a version 4 signature packet a certification check needs."""

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
class UserIdBinding:
    """A user ID packet with the signature packets that follow it."""

    user_id: bytes
    signatures: tuple[Signature, ...]


def parse_single_certificate(data: bytes, *, what: str) -> pysequoia.Cert:
    """Exactly one certificate from ``data``; ``ValueError`` naming ``what`` otherwise."""
    if len(data) > MAX_CERTIFICATE_BYTES:
        raise ValueError(f"{what} of {len(data)} bytes, more than {MAX_CERTIFICATE_BYTES}")
    try:
        certs = pysequoia.Cert.split_bytes(data)
    except (RuntimeError, ValueError):
        raise ValueError(f"{what} is not OpenPGP data") from None
    if len(certs) != 1:
        raise ValueError(f"{what} must hold exactly one certificate, not {len(certs)}")
    return certs[0]


def holds_secret_keys(data: bytes) -> bool:
    """Whether OpenPGP ``data`` (already parsed once as a certificate) has secret key packets."""
    try:
        return any(p.tag in (Tag.SecretKey, Tag.SecretSubkey) for p in PacketPile.from_bytes(data))
    except (RuntimeError, ValueError):
        return False


def expired(cert: pysequoia.Cert, now_s: float) -> bool:
    """Whether ``cert`` (by its self-signatures) has expired at ``now_s``."""
    expiration = cert.expiration
    return expiration is not None and expiration.timestamp() <= now_s


def primary_key(packets: bytes) -> PublicKey | None:
    """The public Ed25519 primary key of a certificate, None for any other key."""
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
            return PublicKey(
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


def user_id_bindings(packets: bytes) -> list[UserIdBinding]:
    """Each user ID packet with the signature packets that follow it."""
    bindings: list[UserIdBinding] = []
    user_id: bytes | None = None
    signatures: list[Signature] = []

    def close() -> None:
        if user_id is not None:
            bindings.append(UserIdBinding(user_id, tuple(signatures)))

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


def _parse_signature(body: bytes) -> Signature | None:
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
    return Signature(
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


def signature_valid(
    signature: Signature, signer: PublicKey, subject: PublicKey, user_id: bytes
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


def issued_by(signature: Signature, fingerprint: str, key_id: str) -> bool:
    """Whether ``signature`` names this key as its issuer (fingerprint first, else key ID)."""
    if signature.issuer_fingerprint is not None:
        return signature.issuer_fingerprint == fingerprint
    return signature.issuer_key_id == key_id


def non_canonical_signature(transcript: bytes, signature: bytes) -> str | None:
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
