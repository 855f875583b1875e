"""The handshake and the session key schedule of one end of the classical channel.

Handshake: Alice's Hello, Bob's HelloReply, Alice's Finish. Each side proves the transcript
(X.509 certificate signature, OpenPGP signature by a key the web of trust accepts, PSK HMAC, or
in key-derived mode an HMAC under a one-time handshake key from the authentication-key ledger)
and both run an ephemeral hybrid key exchange (X25519 and ML-KEM-768). In key-derived mode the
peers' public ledger states must match, allowing for a two-phase commit cut short; each
checked Hello uses up one handshake key at Bob before any proof leaves, and Alice uses the key
Bob names only once his proof under it verifies.

Key schedule: the session's control keys come from HKDF over both exchange secrets and the mode
secret, salted with the final transcript hash; after rotation, from a fresh pool key. Block keys
are drawn in ``blocks.py``.

Pure: no framing, no sequence numbers, no connection state. Every method checks everything it
can before it returns; the connection commits what it returns. The ledger is passed in on each
call because the connection owns it.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Final

import msgpack

from qkdnode.channel.auth import (
    BLOCK_DRAW_BITS,
    ROTATION_KEY_BITS,
    CertificateCredentials,
    Credentials,
    HybridEphemeral,
    PskCredentials,
    Role,
    SessionKeys,
    WebOfTrustCredentials,
    derive_rotation_keys,
    derive_session_keys,
    hmac_proof,
    mlkem_encapsulate,
    proof_input,
    transcript_hash,
    verify_hmac_proof,
)
from qkdnode.channel.ledger import AuthKeyLedger
from qkdnode.channel.messages import (
    DIGEST_BYTES,
    PROTOCOL_VERSION,
    PROTOCOL_VERSIONS,
    Finish,
    Hello,
    HelloReply,
    KindRegistry,
    RotationAnnounce,
    SessionMode,
    encode_payload,
)
from qkdnode.channel.pki import certificate_der, sign, verify_peer_chain, verify_signature
from qkdnode.channel.rules import ChannelConfig
from qkdnode.channel.weboftrust import sign_transcript, verify_peer_certificate, verify_transcript
from qkdnode.errors import AuthenticationFailed, AuthKeyExhausted, ProtocolError

ZERO_DIGEST: Final = bytes(DIGEST_BYTES)


@dataclass(slots=True, kw_only=True)
class HandshakeState:
    """What one side remembers between its handshake frames (secret fields: redacted)."""

    mode: SessionMode
    ephemeral: HybridEphemeral
    hello_payload: bytes = b""
    reply_fields: bytes = b""
    reply_proof: bytes = b""
    x25519_shared: bytes = b""
    mlkem_shared: bytes = b""
    pool_key: bytes = b""
    ledger_offset_bits: int = 0
    handshake_index: int = 0
    peer_tags: int = 0
    peer_forgery_bound: float = 0.0

    def __repr__(self) -> str:
        return f"HandshakeState(mode={self.mode.value})"


def _fields_without_proof(message: HelloReply | Finish) -> bytes:
    values = {
        f.name: (list(v) if isinstance(v := getattr(message, f.name), tuple) else v)
        for f in fields(message)
        if f.name != "proof"
    }
    packed: bytes = msgpack.packb(values, use_bin_type=True)
    return packed


def rotation_keys(ledger: AuthKeyLedger, session_id: bytes) -> tuple[bytes, bytes]:
    """The control keys (a2b, b2a) after rotation, from a fresh pool key drawn now; the ledger
    is marked active first, so the bootstrap window is closed with that same draw."""
    ledger.set_active(True)
    pool_key = ledger.draw(ROTATION_KEY_BITS, "rotation")
    return derive_rotation_keys(pool_key, session_id)


def check_rotation_announce(
    ledger: AuthKeyLedger | None,
    config: ChannelConfig,
    message: RotationAnnounce,
    next_block_id: int,
) -> None:
    """Bob: raises unless he can follow Alice's RotationAnnounce: key-derived authentication is
    configured, the ledgers agree, block ids do not go back, and the pool can pay for the
    rotation key and a first block."""
    if ledger is None or not config.allow_key_derived:
        raise ProtocolError("key-derived authentication is not configured", field="type")
    if not hmac.compare_digest(message.ledger_fingerprint, ledger.fingerprint()):
        raise AuthenticationFailed("authentication-key ledgers differ between the peers")
    if message.next_block_id < next_block_id:
        raise ProtocolError("block ids must increase", field="next_block_id")
    if not ledger.can_pay(ROTATION_KEY_BITS + BLOCK_DRAW_BITS):
        raise AuthKeyExhausted("the pool cannot pay for rotation and a first block")


def check_protocol_version(peer_version: int) -> None:
    """Raises ``ProtocolError`` (field ``protocol_version``) naming both versions and what they
    compute (block transcript tag family, Cascade permutations) unless the peer speaks this
    node's version."""
    if peer_version != PROTOCOL_VERSION:
        theirs = PROTOCOL_VERSIONS.get(peer_version, "unknown here")
        ours = PROTOCOL_VERSIONS[PROTOCOL_VERSION]
        raise ProtocolError(
            f"peer speaks channel protocol version {peer_version} ({theirs}), this node version "
            f"{PROTOCOL_VERSION} ({ours}): both nodes need the same protocol version",
            field="protocol_version",
        )


class Handshaker:
    """One side's part of the handshake: builds and checks Hello, HelloReply and Finish, and
    derives the session keys once both sides are authenticated."""

    def __init__(
        self,
        role: Role,
        *,
        credentials: Credentials,
        registry: KindRegistry,
        config: ChannelConfig,
        random_bytes: Callable[[int], bytes],
        force_bootstrap: bool,
        staged_ledger: AuthKeyLedger | None,
        admit_key_derived: Callable[[], bool] | None,
    ) -> None:
        """See ``PeerConnection`` for ``force_bootstrap``, ``staged_ledger`` and
        ``admit_key_derived``."""
        self.role = role
        self._credentials = credentials
        self._registry = registry
        self._config = config
        self._random_bytes = random_bytes
        self._force_bootstrap = force_bootstrap
        self._staged = staged_ledger
        self._admit = admit_key_derived

    def __repr__(self) -> str:
        return f"Handshaker(role={self.role.value})"

    @property
    def bootstrap_mode(self) -> SessionMode:
        if isinstance(self._credentials, CertificateCredentials):
            return SessionMode.CERTIFICATE
        if isinstance(self._credentials, WebOfTrustCredentials):
            return SessionMode.WEB_OF_TRUST
        return SessionMode.PSK

    # ---- the three handshake frames -------------------------------------------------------
    def hello(self, ledger: AuthKeyLedger | None) -> HandshakeState:
        """Alice: the state after her Hello, whose payload is ``hello_payload``; key-derived
        mode when the ledger is active (the bootstrap window is closed) unless an operator
        forces a re-bootstrap."""
        mode = self.bootstrap_mode
        if ledger is not None and ledger.active and not self._force_bootstrap:
            mode = SessionMode.KEY_DERIVED  # the bootstrap window is closed: key-derived only
        ephemeral = HybridEphemeral(self._random_bytes)
        hello = Hello(
            protocol_version=PROTOCOL_VERSION,
            mode=mode.value,
            nonce=self._random_bytes(32),
            x25519_public=ephemeral.x25519_public,
            mlkem_public=ephemeral.new_mlkem(self._random_bytes),
            **self._ledger_fields(ledger, mode),  # type: ignore[arg-type]
        )
        payload = encode_payload(hello, self._registry)
        return HandshakeState(mode=mode, ephemeral=ephemeral, hello_payload=payload)

    def answer_hello(
        self, ledger: AuthKeyLedger | None, message: Hello, hello_payload: bytes
    ) -> tuple[HandshakeState, HelloReply]:
        """Bob: checks Alice's Hello and builds his proven reply. A key-derived Hello uses up
        one handshake slot here, before any proof leaves, whatever happens next."""
        check_protocol_version(message.protocol_version)
        mode = SessionMode(message.mode)
        ephemeral = HybridEphemeral(self._random_bytes)
        handshake = HandshakeState(mode=mode, ephemeral=ephemeral, hello_payload=hello_payload)
        if mode is SessionMode.KEY_DERIVED:
            self._check_peer_ledger(ledger, handshake, message)
        elif mode is not self.bootstrap_mode:
            raise ProtocolError(f"mode {mode.value} is not configured here", field="mode")
        elif ledger is not None and ledger.active and not self._force_bootstrap:
            raise ProtocolError(
                "the bootstrap window is closed for this peer: only key-derived sessions, "
                "re-bootstrap needs an operator on both nodes (qkdnode auth rebootstrap)",
                field="mode",
            )
        x_shared = ephemeral.x25519_shared(message.x25519_public)
        k_shared, ciphertext = mlkem_encapsulate(message.mlkem_public)
        chain = self._own_chain(mode)
        if mode is SessionMode.KEY_DERIVED:
            assert ledger is not None
            self._take_responder_key(ledger, handshake)
        fields_out = self._ledger_fields(ledger, mode)
        if mode is SessionMode.KEY_DERIVED:
            fields_out["ledger_handshake_index"] = handshake.handshake_index
        unsigned = HelloReply(
            nonce=self._random_bytes(32),
            x25519_public=ephemeral.x25519_public,
            mlkem_ciphertext=ciphertext,
            **fields_out,  # type: ignore[arg-type]
            certificate_chain=chain,
            proof=bytes(32),
        )
        reply_fields = _fields_without_proof(unsigned)
        th1 = transcript_hash(hello_payload, reply_fields)
        proof = self._make_proof(handshake, th1)
        reply = replace(unsigned, proof=proof)
        handshake.reply_fields = reply_fields
        handshake.reply_proof = proof
        handshake.x25519_shared = x_shared
        handshake.mlkem_shared = k_shared
        return handshake, reply

    def answer_reply(
        self,
        ledger: AuthKeyLedger | None,
        handshake: HandshakeState,
        message: HelloReply,
        now_s: float,
    ) -> tuple[Finish, bytes]:
        """Alice: checks Bob's reply and builds her Finish; returns it and the transcript hash
        it proves. In key-derived mode the handshake key Bob named only verifies his proof
        until it holds; then it and every lower key are used up, before her own proof leaves.
        A forged or corrupted reply burns nothing, so it cannot move her stream ahead of his."""
        reply_fields = _fields_without_proof(message)
        th1 = transcript_hash(handshake.hello_payload, reply_fields)
        if handshake.mode is SessionMode.KEY_DERIVED:
            self._check_peer_ledger(ledger, handshake, message)
            assert ledger is not None
            handshake.pool_key = ledger.peek_handshake_key(message.ledger_handshake_index)
            handshake.handshake_index = message.ledger_handshake_index
        self._verify_proof(handshake, message.certificate_chain, message.proof, th1, now_s)
        if handshake.mode is SessionMode.KEY_DERIVED:
            assert ledger is not None
            ledger.burn_handshake_through(message.ledger_handshake_index)  # checked by the peek
        x_shared = handshake.ephemeral.x25519_shared(message.x25519_public)
        k_shared = handshake.ephemeral.mlkem_decapsulate(message.mlkem_ciphertext)
        handshake.reply_fields = reply_fields
        handshake.reply_proof = message.proof
        chain = self._own_chain(handshake.mode)
        th2 = self._finish_transcript(handshake, chain)
        finish = Finish(certificate_chain=chain, proof=self._make_proof(handshake, th2))
        handshake.x25519_shared = x_shared
        handshake.mlkem_shared = k_shared
        return finish, th2

    def check_finish(self, handshake: HandshakeState, message: Finish, now_s: float) -> bytes:
        """Bob: checks Alice's Finish; returns the transcript hash it proves."""
        th2 = self._finish_transcript(handshake, message.certificate_chain)
        self._verify_proof(handshake, message.certificate_chain, message.proof, th2, now_s)
        return th2

    def session_keys(
        self,
        ledger: AuthKeyLedger | None,
        handshake: HandshakeState,
        th2: bytes,
        finish_proof: bytes,
    ) -> SessionKeys:
        """Both sides, once both are authenticated: the session keys. In key-derived mode the
        pool moves only now, to meet the peer's offset (the handshake key itself was used up
        when it was taken)."""
        final = transcript_hash(th2, finish_proof)
        mode_secret = b""
        if handshake.mode is SessionMode.KEY_DERIVED:
            assert ledger is not None
            ledger.set_active(True)
            ledger.advance_to(
                handshake.ledger_offset_bits,
                tags_issued=handshake.peer_tags,
                forgery_bound=handshake.peer_forgery_bound,
            )
            mode_secret = handshake.pool_key
        elif isinstance(self._credentials, PskCredentials):
            mode_secret = self._credentials.psk
        return derive_session_keys(
            x25519_shared=handshake.x25519_shared,
            mlkem_shared=handshake.mlkem_shared,
            mode_secret=mode_secret,
            transcript=final,
            mode=handshake.mode.value,
        )

    # ---- helpers --------------------------------------------------------------------------
    def _ledger_fields(
        self, ledger: AuthKeyLedger | None, mode: SessionMode
    ) -> dict[str, int | float | bytes]:
        """The public ledger state sent in the handshake (no key bits); zeros outside
        key-derived mode."""
        if mode is not SessionMode.KEY_DERIVED or ledger is None:
            return {
                "ledger_consumed_bits": 0,
                "ledger_tags": 0,
                "ledger_forgery_bound": 0.0,
                "ledger_deposit_digest": ZERO_DIGEST,
                "ledger_staged_digest": ZERO_DIGEST,
                "ledger_handshake_index": 0,
            }
        return {
            "ledger_consumed_bits": ledger.consumed_bits,
            "ledger_tags": ledger.tags_issued,
            "ledger_forgery_bound": ledger.forgery_bound,
            "ledger_deposit_digest": ledger.state.deposit_digest,
            "ledger_staged_digest": (self._staged or ledger).state.deposit_digest,
            "ledger_handshake_index": ledger.handshake_first,
        }

    def _own_chain(self, mode: SessionMode) -> tuple[bytes, ...]:
        if mode is SessionMode.CERTIFICATE:
            assert isinstance(self._credentials, CertificateCredentials)
            return tuple(certificate_der(c) for c in self._credentials.certificate_chain)
        if mode is SessionMode.WEB_OF_TRUST:
            assert isinstance(self._credentials, WebOfTrustCredentials)
            return (self._credentials.own_certificate,)
        return ()

    def _check_peer_ledger(
        self, ledger: AuthKeyLedger | None, handshake: HandshakeState, peer: Hello | HelloReply
    ) -> None:
        """The peer's public ledger state must match ours, allowing for a two-phase commit cut
        short: one side may have committed blocks the other has only staged."""
        if ledger is None or not self._config.allow_key_derived:
            raise ProtocolError("key-derived mode is not available here", field="mode")
        committed = ledger.state.deposit_digest
        staged = (self._staged or ledger).state.deposit_digest
        staged_deposited_bits = (self._staged or ledger).state.deposited_bits
        if not (
            hmac.compare_digest(peer.ledger_deposit_digest, committed)
            or hmac.compare_digest(peer.ledger_deposit_digest, staged)
            or hmac.compare_digest(peer.ledger_staged_digest, committed)
        ):
            raise ProtocolError(
                "authentication-key ledgers differ (deposit history)",
                field="ledger_deposit_digest",
            )
        # an honest peer never draws a bit that was not deposited (committed or staged here);
        # how far behind or ahead it is otherwise only says how many sessions died mid-block
        deposited_bits = max(
            ledger.state.deposited_bits, staged_deposited_bits, ledger.consumed_bits
        )
        if peer.ledger_consumed_bits > deposited_bits:
            raise ProtocolError(
                f"peer's ledger offset {peer.ledger_consumed_bits} lies past every bit "
                f"deposited here ({deposited_bits})",
                field="ledger_consumed_bits",
            )
        handshake.ledger_offset_bits = max(ledger.consumed_bits, peer.ledger_consumed_bits)
        handshake.peer_tags = peer.ledger_tags
        handshake.peer_forgery_bound = peer.ledger_forgery_bound

    def _take_responder_key(self, ledger: AuthKeyLedger, handshake: HandshakeState) -> None:
        """Bob: the next slot of the handshake-key stream, used up now, for this attempt only."""
        if self._admit is not None and not self._admit():
            raise ProtocolError(
                "too many key-derived handshake attempts: try again later", field="rate"
            )
        index = ledger.responder_handshake_index()
        if index is not None:
            handshake.pool_key = ledger.take_handshake_key(index)
        elif self._staged is not None and self._staged.responder_handshake_index() is not None:
            # a slot of a block staged here and committed by the peer: burned here too
            index = self._staged.responder_handshake_index()
            assert index is not None
            handshake.pool_key = self._staged.take_handshake_key(index)
            ledger.burn_handshake_through(index)
        else:
            raise AuthKeyExhausted("no handshake key left: re-bootstrap needs an operator")
        handshake.handshake_index = index

    def _make_proof(self, handshake: HandshakeState, transcript: bytes) -> bytes:
        if handshake.mode is SessionMode.KEY_DERIVED:
            return hmac_proof(handshake.pool_key, self.role, transcript)
        if isinstance(self._credentials, PskCredentials):
            return hmac_proof(self._credentials.psk, self.role, transcript)
        if isinstance(self._credentials, WebOfTrustCredentials):
            return sign_transcript(self._credentials.secret_key, proof_input(self.role, transcript))
        return sign(self._credentials.private_key, proof_input(self.role, transcript))

    def _verify_proof(
        self,
        handshake: HandshakeState,
        chain: tuple[bytes, ...],
        proof: bytes,
        transcript: bytes,
        now_s: float,
    ) -> None:
        peer = self.role.peer
        signed_modes = (SessionMode.CERTIFICATE, SessionMode.WEB_OF_TRUST)
        if handshake.mode not in signed_modes and chain:
            raise ProtocolError(
                "certificates are only sent in certificate and web-of-trust mode", field="chain"
            )
        if handshake.mode is SessionMode.KEY_DERIVED:
            verify_hmac_proof(handshake.pool_key, peer, transcript, proof)
        elif isinstance(self._credentials, PskCredentials):
            verify_hmac_proof(self._credentials.psk, peer, transcript, proof)
        elif isinstance(self._credentials, WebOfTrustCredentials):
            self._verify_web_of_trust_proof(chain, proof, proof_input(peer, transcript), now_s)
        else:
            key = verify_peer_chain(
                chain,
                trust_anchor=self._credentials.trust_anchor,
                peer_name=self._credentials.peer_name,
                now_s=now_s,
                revocation=self._credentials.revocation,
            )
            verify_signature(key, proof, proof_input(peer, transcript))

    def _verify_web_of_trust_proof(
        self, chain: tuple[bytes, ...], proof: bytes, signed: bytes, now_s: float
    ) -> None:
        """The peer's one OpenPGP certificate must carry k trusted introducers' vouches for the
        expected user ID at ``now_s`` (``WebOfTrustRefused`` naming the reason otherwise), and
        ``proof`` must be its signature over ``signed`` (``AuthenticationFailed``)."""
        assert isinstance(self._credentials, WebOfTrustCredentials)
        if len(chain) != 1:
            raise ProtocolError(
                f"web-of-trust mode sends exactly one OpenPGP certificate, not {len(chain)}",
                field="certificate_chain",
            )
        verify_peer_certificate(
            chain[0],
            introducers=self._credentials.introducers,
            threshold=self._credentials.threshold,
            user_id=self._credentials.peer_user_id,
            now_s=now_s,
            local_copies=self._credentials.peer_certificate_copies,
        )
        verify_transcript(chain[0], signed, proof, canonical_only=True)

    @staticmethod
    def _finish_transcript(handshake: HandshakeState, chain: tuple[bytes, ...]) -> bytes:
        chain_packed: bytes = msgpack.packb(list(chain), use_bin_type=True)
        return transcript_hash(
            handshake.hello_payload, handshake.reply_fields, handshake.reply_proof, chain_packed
        )
