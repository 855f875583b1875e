"""Hybrid delivery keys: a QKD key combined with a fresh ML-KEM-768 secret, pure (no I/O).

A pair of SAEs configured ``kind = "hybrid"`` gets keys that stay secret if *either* the QKD key
or the ML-KEM-768 (FIPS 203) shared secret does. They are computationally secure, never
information-theoretically: see docs/delivery.md.

Per reservation (one batch of delivery keys for one (master SAE, slave SAE) pair):

1. the master node makes an ephemeral ML-KEM-768 key pair (:class:`HybridOffer`) and sends the
   encapsulation key inside its reservation, over the authenticated classical channel;
2. the slave node encapsulates to it (:func:`answer_offer`) and answers with the ciphertext and
   a key-confirmation value; the master decapsulates (:meth:`HybridOffer.accept`), checks the
   confirmation and drops the decapsulation key;
3. both derive one secret per delivery key from the shared secret ``ss`` at once
   (:func:`per_key_secrets`) and keep only those, each erased when its key is handed out; ``ss``
   itself is never stored;
4. at delivery, :func:`combine` mixes the QKD bytes with the key's ML-KEM secret.

Constructions (HMAC and HKDF with SHA-256, RFC 2104 / RFC 5869):

- per-key ML-KEM secret ``m_i = HKDF-Expand(PRK = ss, info = LABEL_PER_KEY || key_ID, 32)``:
  ``ss`` is a uniform 32-byte key, usable as a PRK without Extract (RFC 5869, 3.3); distinct
  key IDs give independent pseudorandom secrets, so erasing one key's ``m_i`` erases that key;
- key confirmation ``HKDF-Expand(ss, LABEL_CONFIRM || SHA-256(ek) || ct, 32)``;
- the combiner, with ``Q`` the key's QKD bytes::

      PRK = HKDF-Extract(salt = m_i, IKM = Q) = HMAC-SHA256(m_i, Q)
      K   = HKDF-Expand(PRK, info = context, L = len(Q))

  HMAC is a dual PRF: a PRF keyed by its key input and also by its message input (Bellare and
  Lysyanskaya, "Symmetric and dual PRFs from standard assumptions", 2015). So PRK is
  pseudorandom if ``m_i`` is secret (ML-KEM holds) or if ``Q`` is secret and uniform (QKD holds):
  the dual-PRF combiner of Bindel, Brendel, Fischlin, Goncalves and Stebila, "Hybrid key
  encapsulation mechanisms and authenticated key exchange" (PQCrypto 2019), the argument behind
  the TLS 1.3 hybrid design (draft-ietf-tls-hybrid-design) and the HKDF step of ETSI TS 103 744.
  ``context`` binds the key ID, master and slave SAE IDs, master and slave KME IDs and the size
  (:func:`context_info`), each length-prefixed so that the encoding is injective.

The output has the requested size, at most ``HYBRID_MAX_KEY_SIZE_BITS`` (HKDF-Expand gives at
most 255 hash blocks).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import mlkem
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from qkdnode.channel.auth import mlkem_encapsulate
from qkdnode.channel.messages import MLKEM768_CIPHERTEXT_BYTES, MLKEM768_PUBLIC_BYTES
from qkdnode.config.delivery import HYBRID_MAX_KEY_SIZE_BITS
from qkdnode.errors import ProtocolError

SECRET_BYTES: Final = 32  # ML-KEM-768 shared secret, per-key secret, confirmation
MAX_CONTEXT_FIELD_BYTES: Final = 0xFFFF  # context fields carry a 2-byte length

LABEL_PER_KEY: Final = b"qkdnode hybrid delivery v1 per-key mlkem secret\x00"
LABEL_CONFIRM: Final = b"qkdnode hybrid delivery v1 confirm\x00"
LABEL_KEY: Final = b"qkdnode hybrid delivery v1 key\x00"


@dataclass(frozen=True, slots=True, kw_only=True)
class HybridRequest:
    """What the master node sends with a hybrid reservation: its ephemeral ML-KEM-768
    encapsulation key and the KME IDs it binds into the keys (public values)."""

    mlkem_public: bytes
    master_kme_id: str
    slave_kme_id: str

    def __post_init__(self) -> None:
        if len(self.mlkem_public) != MLKEM768_PUBLIC_BYTES:
            raise ProtocolError(
                f"expected {MLKEM768_PUBLIC_BYTES} bytes", field="hybrid.mlkem_public"
            )

    def __repr__(self) -> str:
        return (
            f"HybridRequest(master_kme_id={self.master_kme_id!r},"
            f" slave_kme_id={self.slave_kme_id!r})"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class HybridAnswer:
    """The slave node's answer: the ML-KEM-768 ciphertext and the key confirmation."""

    mlkem_ciphertext: bytes
    confirmation: bytes

    def __post_init__(self) -> None:
        if len(self.mlkem_ciphertext) != MLKEM768_CIPHERTEXT_BYTES:
            raise ProtocolError(
                f"expected {MLKEM768_CIPHERTEXT_BYTES} bytes", field="mlkem_ciphertext"
            )
        if len(self.confirmation) != SECRET_BYTES:
            raise ProtocolError(f"expected {SECRET_BYTES} bytes", field="mlkem_confirmation")

    def __repr__(self) -> str:
        return "HybridAnswer(<public ciphertext>)"


class HybridConfirmationFailed(ProtocolError):
    """The peer's key confirmation does not match: the two nodes hold different ML-KEM secrets
    (nothing is delivered from this reservation)."""


class HybridOffer:
    """The master node's ephemeral ML-KEM-768 decapsulation key for one reservation.

    Used once: :meth:`accept` drops the decapsulation key whatever it returns or raises.
    """

    __slots__ = ("_key", "public")

    def __init__(self, random_bytes: Callable[[int], bytes] = os.urandom) -> None:
        # the 64-byte seed (d || z) of FIPS 203 key generation, from the injected generator
        self._key: mlkem.MLKEM768PrivateKey | None = mlkem.MLKEM768PrivateKey.from_seed_bytes(
            random_bytes(64)
        )
        self.public = self._key.public_key().public_bytes_raw()

    def __repr__(self) -> str:
        return "HybridOffer(<redacted>)"

    def accept(self, answer: HybridAnswer, key_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, bytes]:
        """Decapsulate, check the confirmation, return the per-key secrets of ``key_ids``.

        Raises HybridConfirmationFailed (and ProtocolError if already used).
        """
        key, self._key = self._key, None  # one use only, whatever happens
        if key is None:
            raise ProtocolError("ML-KEM offer already used", field="mlkem_ciphertext")
        try:
            shared = key.decapsulate(answer.mlkem_ciphertext)
        except ValueError:
            raise ProtocolError("invalid ML-KEM ciphertext", field="mlkem_ciphertext") from None
        del key
        expected = confirmation(shared, self.public, answer.mlkem_ciphertext)
        if not hmac.compare_digest(expected, answer.confirmation):
            raise HybridConfirmationFailed(
                "ML-KEM key confirmation does not match", field="mlkem_confirmation"
            )
        return per_key_secrets(shared, key_ids)


def answer_offer(
    request: HybridRequest, key_ids: Sequence[uuid.UUID]
) -> tuple[HybridAnswer, dict[uuid.UUID, bytes]]:
    """The slave node: encapsulate to the master's key; the answer and the per-key secrets."""
    shared, ciphertext = mlkem_encapsulate(request.mlkem_public)
    answer = HybridAnswer(
        mlkem_ciphertext=ciphertext,
        confirmation=confirmation(shared, request.mlkem_public, ciphertext),
    )
    return answer, per_key_secrets(shared, key_ids)


def _expand(prk: bytes, info: bytes, length_bytes: int) -> bytes:
    return HKDFExpand(algorithm=hashes.SHA256(), length=length_bytes, info=info).derive(prk)


def confirmation(shared: bytes, mlkem_public: bytes, ciphertext: bytes) -> bytes:
    """HKDF-Expand(ss, LABEL_CONFIRM || SHA-256(ek) || ct, 32): proves both nodes hold ``ss``."""
    return _expand(
        shared, LABEL_CONFIRM + hashlib.sha256(mlkem_public).digest() + ciphertext, SECRET_BYTES
    )


def per_key_secrets(shared: bytes, key_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, bytes]:
    """``m_i = HKDF-Expand(ss, LABEL_PER_KEY || key_ID, 32)`` for each delivery key ID."""
    return {
        key_id: _expand(shared, LABEL_PER_KEY + key_id.bytes, SECRET_BYTES) for key_id in key_ids
    }


def _field(value: bytes) -> bytes:
    if len(value) > MAX_CONTEXT_FIELD_BYTES:
        raise ValueError("context field longer than 65535 bytes")
    return len(value).to_bytes(2, "big") + value


def context_info(
    *,
    key_id: uuid.UUID,
    master_sae: str,
    slave_sae: str,
    master_kme_id: str,
    slave_kme_id: str,
    size_bits: int,
) -> bytes:
    """The combiner's HKDF info: LABEL_KEY, then each field as 2-byte length || bytes (key ID,
    master SAE, slave SAE, master KME, slave KME as UTF-8), then the size as 4 bytes."""
    return (
        LABEL_KEY
        + _field(key_id.bytes)
        + b"".join(
            _field(text.encode()) for text in (master_sae, slave_sae, master_kme_id, slave_kme_id)
        )
        + size_bits.to_bytes(4, "big")
    )


def combine(
    qkd_key: bytes,
    mlkem_secret: bytes,
    *,
    key_id: uuid.UUID,
    master_sae: str,
    slave_sae: str,
    master_kme_id: str,
    slave_kme_id: str,
) -> bytes:
    """The hybrid key of ``len(qkd_key)`` bytes (module doc: dual-PRF combiner)."""
    if len(mlkem_secret) != SECRET_BYTES:
        raise ValueError("the per-key ML-KEM secret must be 32 bytes")
    if not qkd_key or 8 * len(qkd_key) > HYBRID_MAX_KEY_SIZE_BITS:
        raise ValueError(f"hybrid keys have 1 to {HYBRID_MAX_KEY_SIZE_BITS // 8} bytes")
    prk = hmac.digest(mlkem_secret, qkd_key, "sha256")  # HKDF-Extract(salt=m_i, IKM=Q)
    info = context_info(
        key_id=key_id,
        master_sae=master_sae,
        slave_sae=slave_sae,
        master_kme_id=master_kme_id,
        slave_kme_id=slave_kme_id,
        size_bits=8 * len(qkd_key),
    )
    return _expand(prk, info, len(qkd_key))


KeyCombiner = Callable[[uuid.UUID, bytes, bytes], bytes]
"""``combine(key_id, qkd_key, mlkem_secret)`` with the pair's SAE and KME IDs fixed."""


def pair_combiner(
    *, master_sae: str, slave_sae: str, master_kme_id: str, slave_kme_id: str
) -> KeyCombiner:
    """:func:`combine` for one (master, slave) pair between two KMEs."""

    def combiner(key_id: uuid.UUID, qkd_key: bytes, mlkem_secret: bytes) -> bytes:
        return combine(
            qkd_key,
            mlkem_secret,
            key_id=key_id,
            master_sae=master_sae,
            slave_sae=slave_sae,
            master_kme_id=master_kme_id,
            slave_kme_id=slave_kme_id,
        )

    return combiner
