"""Authentication of the classical channel: credentials, handshake proofs, key schedule, tags.

Bootstrap (certificate, web of trust or PSK): an ephemeral hybrid key exchange (X25519,
RFC 7748, and ML-KEM-768, FIPS 203) runs inside a handshake whose transcript each side signs
(X.509 certificate: Ed25519 or ML-DSA-65, FIPS 204; web of trust: a detached OpenPGP Ed25519
signature by a key that k trusted introducers vouched for, see ``weboftrust``) or MACs with the
PSK (HMAC-SHA256, RFC 2104). The session keys
come from HKDF-SHA256 (RFC 5869) over both shared secrets and the mode secret (PSK, or a pool key
in key-derived mode), salted with the transcript hash.

Key-derived authentication (after rotation): per block, six fresh keys are drawn from the
authentication-key ledger in a fixed order (``BLOCK_DRAWS``): per direction an HMAC-SHA256 key
for every frame of the block, and Poly1305's r (``hash_*``) and s (``pad_*``) for the one-time
Wegman–Carter tag over the block transcript (``wegman_carter``).

The authentication-key ledger itself lives in ``ledger.py`` and is re-exported here.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from qkdnode.channel.ledger import AuthKeyLedger, DrawRecord, LedgerState
from qkdnode.channel.pki import SigningKey
from qkdnode.channel.wegman_carter import TAG_BYTES as WC_TAG_BYTES
from qkdnode.channel.wegman_carter import OneTimeTag
from qkdnode.errors import AuthenticationFailed, ProtocolError

if TYPE_CHECKING:
    from cryptography.x509 import Certificate

    from qkdnode.channel.revocation import RevocationLists
    from qkdnode.channel.weboftrust import SecretCertificate, TrustedIntroducer

__all__ = [
    "BLOCK_DRAWS",
    "BLOCK_DRAW_BITS",
    "HANDSHAKE_KEY_BITS",
    "ROTATION_KEY_BITS",
    "AuthKeyLedger",
    "CertificateCredentials",
    "DrawRecord",
    "FrameMac",
    "HybridEphemeral",
    "LedgerState",
    "PskCredentials",
    "Role",
    "WebOfTrustCredentials",
    "derive_session_keys",
]

TAG_BYTES: Final = 32
MIN_PSK_BYTES: Final = 32
HANDSHAKE_KEY_BITS: Final = 256
ROTATION_KEY_BITS: Final = 256
# Order in which a key-derived block draws its keys: (name, bits). Both sides use this order.
# hash_* is Poly1305's r, pad_* its s (``wegman_carter``).
BLOCK_DRAWS: Final = (
    ("mac_a2b", 256),
    ("mac_b2a", 256),
    ("hash_a2b", 128),
    ("hash_b2a", 128),
    ("pad_a2b", 128),
    ("pad_b2a", 128),
)
BLOCK_DRAW_BITS: Final = sum(bits for _, bits in BLOCK_DRAWS)
_LABEL: Final = b"qkdnode-v1 "


class Role(enum.Enum):
    """Alice dials and drives (handshake, block opens, rotation); Bob listens and answers."""

    ALICE = "alice"
    BOB = "bob"

    @property
    def peer(self) -> Role:
        return Role.BOB if self is Role.ALICE else Role.ALICE


@dataclass(frozen=True, slots=True, kw_only=True)
class CertificateCredentials:
    """Own chain (leaf first) and signing key, the trust anchor, the pinned peer name, and the
    CRLs the peer's chain is checked against (None: no revocation checking)."""

    certificate_chain: tuple[Certificate, ...]
    private_key: SigningKey
    trust_anchor: Certificate
    peer_name: str
    revocation: RevocationLists | None = None

    def __repr__(self) -> str:
        return f"CertificateCredentials(peer_name={self.peer_name!r}, private_key=<redacted>)"


@dataclass(frozen=True, slots=True, kw_only=True)
class PskCredentials:
    """A pre-shared key of at least 32 bytes, loaded by the shell (which checks file modes)."""

    psk: bytes

    def __post_init__(self) -> None:
        if len(self.psk) < MIN_PSK_BYTES:
            raise ValueError(f"the PSK must be at least {MIN_PSK_BYTES} bytes")

    def __repr__(self) -> str:
        return "PskCredentials(psk=<redacted>)"


@dataclass(frozen=True, slots=True, kw_only=True)
class WebOfTrustCredentials:
    """Own OpenPGP certificate (as sent: with the introducers' certifications) and secret key,
    the trusted introducers and the threshold k, the user ID the peer's certificate must
    carry, and the node's own copies of the peer's certificate (their revocations count)."""

    own_certificate: bytes
    secret_key: SecretCertificate
    introducers: tuple[TrustedIntroducer, ...]
    threshold: int
    peer_user_id: str
    peer_certificate_copies: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        distinct = len({introducer.fingerprint for introducer in self.introducers})
        if not 1 <= self.threshold <= distinct:
            raise ValueError(
                f"the threshold must be between 1 and the number of distinct introducers "
                f"({distinct}), not {self.threshold}"
            )

    def __repr__(self) -> str:
        return (
            f"WebOfTrustCredentials(fingerprint={self.secret_key.fingerprint}, "
            f"peer_user_id={self.peer_user_id!r}, threshold={self.threshold}, "
            f"introducers={len(self.introducers)}, secret_key=<redacted>)"
        )


Credentials = CertificateCredentials | PskCredentials | WebOfTrustCredentials


class HybridEphemeral:
    """One side's ephemeral X25519 and ML-KEM-768 keys, generated from ``random_bytes``."""

    __slots__ = ("_mlkem", "_x25519")

    def __init__(self, random_bytes: Callable[[int], bytes] = os.urandom) -> None:
        self._x25519 = x25519.X25519PrivateKey.from_private_bytes(random_bytes(32))
        self._mlkem: mlkem.MLKEM768PrivateKey | None = None

    def __repr__(self) -> str:
        return "HybridEphemeral(<redacted>)"

    @property
    def x25519_public(self) -> bytes:
        return self._x25519.public_key().public_bytes_raw()

    def new_mlkem(self, random_bytes: Callable[[int], bytes]) -> bytes:
        """Alice: generate the ML-KEM decapsulation key, return the encapsulation key."""
        self._mlkem = mlkem.MLKEM768PrivateKey.from_seed_bytes(random_bytes(64))
        return self._mlkem.public_key().public_bytes_raw()

    def x25519_shared(self, peer_public: bytes) -> bytes:
        try:
            peer = x25519.X25519PublicKey.from_public_bytes(peer_public)
            return self._x25519.exchange(peer)
        except ValueError:  # all-zero shared secret (small-order point)
            raise ProtocolError("invalid X25519 share", field="x25519_public") from None

    def mlkem_decapsulate(self, ciphertext: bytes) -> bytes:
        if self._mlkem is None:
            raise ProtocolError("no ML-KEM key", field="mlkem_ciphertext")
        try:
            return self._mlkem.decapsulate(ciphertext)
        except ValueError:
            raise ProtocolError("invalid ML-KEM ciphertext", field="mlkem_ciphertext") from None


def mlkem_encapsulate(public: bytes) -> tuple[bytes, bytes]:
    """Bob: (shared secret, ciphertext) for Alice's ML-KEM-768 encapsulation key."""
    try:
        key = mlkem.MLKEM768PublicKey.from_public_bytes(public)
        return key.encapsulate()
    except ValueError:
        raise ProtocolError("invalid ML-KEM-768 public key", field="mlkem_public") from None


def transcript_hash(*parts: bytes) -> bytes:
    """SHA-256 over length-prefixed parts: an injective encoding of the handshake so far."""
    h = hashlib.sha256(_LABEL + b"transcript")
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.digest()


def proof_input(role: Role, transcript: bytes) -> bytes:
    """What ``role`` signs or MACs: a domain label, the role, and the transcript hash."""
    return _LABEL + b"proof " + role.value.encode() + b"\x00" + transcript


def hmac_proof(key: bytes, role: Role, transcript: bytes) -> bytes:
    return hmac.digest(key, proof_input(role, transcript), "sha256")


def verify_hmac_proof(key: bytes, role: Role, transcript: bytes, proof: bytes) -> None:
    if not hmac.compare_digest(hmac_proof(key, role, transcript), proof):
        raise AuthenticationFailed("handshake MAC does not verify")


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionKeys:
    """Per-direction control-frame MAC keys and the public session id. Secret: redacted."""

    a2b: bytes
    b2a: bytes
    session_id: bytes

    def __repr__(self) -> str:
        return f"SessionKeys(session_id={self.session_id.hex()})"


def derive_session_keys(
    *, x25519_shared: bytes, mlkem_shared: bytes, mode_secret: bytes, transcript: bytes, mode: str
) -> SessionKeys:
    """HKDF-SHA256 (RFC 5869) over both KEX secrets and the mode secret, transcript as salt."""
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=80,
        salt=transcript,
        info=_LABEL + b"session keys " + mode.encode(),
    ).derive(x25519_shared + mlkem_shared + mode_secret)
    return SessionKeys(a2b=okm[:32], b2a=okm[32:64], session_id=okm[64:])


def derive_rotation_keys(pool_key: bytes, session_id: bytes) -> tuple[bytes, bytes]:
    """Control-frame keys (a2b, b2a) after rotation: HKDF over a fresh pool key only."""
    okm = HKDF(
        algorithm=hashes.SHA256(), length=64, salt=session_id, info=_LABEL + b"rotation keys"
    ).derive(pool_key)
    return okm[:32], okm[32:]


class FrameMac:
    """HMAC-SHA256 over (session id, direction, frame header, payload) under one key."""

    __slots__ = ("_base",)

    def __init__(self, key: bytes, session_id: bytes, direction: Role) -> None:
        prefix = _LABEL + b"frame" + session_id + (b"A" if direction is Role.ALICE else b"B")
        self._base = hmac.new(key, prefix, "sha256")

    def __repr__(self) -> str:
        return "FrameMac(<redacted>)"

    def tag(self, header: bytes, payload: bytes) -> bytes:
        mac = self._base.copy()
        mac.update(header)
        mac.update(payload)
        return mac.digest()

    def verify(self, header: bytes, payload: bytes, tag: bytes) -> None:
        """Constant-time check; raises ``AuthenticationFailed``."""
        if not hmac.compare_digest(self.tag(header, payload), tag):
            raise AuthenticationFailed("frame tag does not verify")


class BlockTranscript:
    """The tag over one direction's block transcript.

    The transcript is the sequence of records (each Data frame's header and payload, then the
    close record), each absorbed as ``u64 length || record``: an injective encoding.
    Key-derived mode: Wegman–Carter, a one-time Poly1305 under fresh pool keys r and s
    (``wegman_carter``), fed as frames pass. Bootstrap modes: HMAC-SHA256 under the
    direction's session key over a SHA-256 of the transcript.
    """

    __slots__ = ("_hash", "_hmac_key", "_one_time")

    def __init__(
        self, *, r: bytes | None = None, s: bytes | None = None, hmac_key: bytes | None
    ) -> None:
        """``r`` and ``s`` (16 bytes each): a one-time Poly1305 key; else ``hmac_key``."""
        self._one_time: OneTimeTag | None = None
        self._hash: hashlib._Hash | None = None
        if r is not None or s is not None:
            if r is None or s is None:
                raise ProtocolError("a one-time tag needs both r and s", field="tag_key")
            self._one_time = OneTimeTag(r, s)
        else:
            self._hash = hashlib.sha256(_LABEL + b"block")
        self._hmac_key = hmac_key

    def __repr__(self) -> str:
        return f"BlockTranscript(wegman_carter={self._one_time is not None})"

    @property
    def one_time(self) -> bool:
        return self._one_time is not None

    @property
    def message_bytes(self) -> int:
        """Bytes of a one-time transcript so far (0 for HMAC transcripts, which have no limit)."""
        return self._one_time.message_bytes if self._one_time is not None else 0

    def absorb(self, *parts: bytes) -> None:
        """Append one record, given as the parts it is the concatenation of (no copy made)."""
        sink = self._one_time if self._one_time is not None else self._hash
        assert sink is not None
        sink.update(sum(map(len, parts)).to_bytes(8, "big"))
        for part in parts:
            sink.update(part)

    def tag(self) -> bytes:
        """Finish the transcript and return its tag (16 bytes Poly1305, 32 bytes HMAC); a
        one-time transcript's key is spent by this."""
        if self._one_time is not None:
            return self._one_time.finish()
        assert self._hash is not None and self._hmac_key is not None
        return hmac.digest(self._hmac_key, self._hash.digest(), "sha256")

    def verify_final(self, final_record: bytes, tag: bytes) -> None:
        """Absorb ``final_record`` and check the peer's ``tag`` over the whole transcript in
        constant time; raises ``AuthenticationFailed``. A one-time transcript's key is spent by
        this check whatever its outcome (a second check under it would void the bound); an
        HMAC transcript is left as it was."""
        if self._one_time is not None:
            self.absorb(final_record)
            self._one_time.verify(tag)
            return
        assert self._hash is not None and self._hmac_key is not None
        twin = self._hash.copy()
        twin.update(len(final_record).to_bytes(8, "big"))
        twin.update(final_record)
        expected = hmac.digest(self._hmac_key, twin.digest(), "sha256")
        if not hmac.compare_digest(expected, tag):
            raise AuthenticationFailed("block transcript tag does not verify")

    @property
    def tag_bytes(self) -> int:
        return WC_TAG_BYTES if self._one_time is not None else TAG_BYTES
