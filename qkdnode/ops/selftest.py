"""Known-answer self-tests run at daemon start-up: a failure stops the node before it serves.

Each test recomputes a fixed vector with the production code path and compares it in constant
time, then checks that a corrupted input is rejected (so a verifier that accepts everything
fails too). Provenance of every vector:

- HMAC-SHA256: RFC 4231, test cases 1 and 2 (the frame MACs and handshake proofs use it);
- Ed25519: RFC 8032, section 7.1, TEST 1 and TEST 2 (certificate bootstrap signatures);
- ML-DSA-65 (FIPS 204): key generation from NIST ACVP's ML-DSA-keyGen-FIPS204 vector set
  (usnistgov/ACVP-Server, gen-val/json-files/ML-DSA-keyGen-FIPS204, prompt.json and
  expectedResults.json at commit 203f667c26e10a1be89dfe8da7a54498fde2d848, tgId 2, tcId 26):
  the seed, and the SHA-256 of the expected 1,952-byte public key (compared byte for byte with
  the vector file when pinned). Signing is hedged, so signatures have no fixed vector: a
  pairwise-consistency test (sign, verify, and reject a changed message) with that key pair
  covers signing and verification;
- Poly1305, the one-time block transcript tag (``channel.wegman_carter``): RFC 8439, section
  2.5.2 (key, message "Cryptographic Forum Research Group", tag), fed in two pieces as the
  transcript feeds it; and the transcript's own record encoding (``channel.auth.BlockTranscript``)
  with a vector pinned as below;
- the block transcript encoding, the Mersenne-prime verification hash
  (``postprocess.verification``), Toeplitz hashing (``postprocess.amplification``) and
  multiply-add modulo a Mersenne prime with GMP (``postprocess.amplification_mersenne``): our own
  constructions; the vectors were computed by the naive reference implementations in
  ``tests/reliability/naive.py`` (``python -m tests.reliability.naive`` prints them) and pinned;
  ``tests/reliability/test_scenario_17_selftest.py`` re-derives them and fails if they drift.

- hybrid delivery key (``delivery.hybrid``, docs/delivery.md): our own construction over
  HKDF-SHA256 (RFC 5869); the vector was computed by the independent hmac/hashlib
  implementation in ``tests/helpers_hybrid.py`` and pinned; the scenario 17 test re-derives it.

``run_self_tests()`` raises :class:`SelfTestFailed` naming the first failing test; it takes a few
milliseconds. Messages name the test, never a value.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Callable
from typing import Final

import numpy as np

from qkdnode.errors import QkdError


class SelfTestFailed(QkdError):
    """A start-up known-answer test failed: the node must not start."""

    def __init__(self, test: str, reason: str) -> None:
        self.test = test
        super().__init__(f"self-test {test} failed: {reason}")


# ---- vectors ------------------------------------------------------------------------------------

# RFC 4231, 4.2 (test case 1) and 4.3 (test case 2): (key, data, HMAC-SHA-256)
_HMAC_VECTORS: Final = (
    (
        bytes([0x0B] * 20),
        b"Hi There",
        "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
    ),
    (
        b"Jefe",
        b"what do ya want for nothing?",
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
    ),
)

# RFC 8032, 7.1: (public key, message, signature)
_ED25519_VECTORS: Final = (
    (
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9"
        "b46bd25bf5f0595bbe24655141438e7a100b",
    ),
    (
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f1"
        "1d8c387b2eaeb4302aeeb00d291612bb0c00",
    ),
)

# NIST ACVP ML-DSA-keyGen-FIPS204, ML-DSA-65, tcId 26 (module docstring)
_MLDSA_SEED: Final = bytes.fromhex(
    "8AB6448BF58F897D528A8DE9F8E59329AC929A9CDE7EDF3E27E01BC9EF128A67"
)
_MLDSA_PUBLIC_SHA256: Final = "b0cc1d6464e1528a478108d4be94be4aca4c7ae69d9595b1e6b752713442022a"
_MLDSA_MESSAGE: Final = b"qkdnode ML-DSA-65 self-test"

# RFC 8439, 2.5.2: Poly1305 key r || s, message, tag
_POLY1305_KEY: Final = bytes.fromhex(
    "85d6be7857556d337f4452fe42d506a80103808afb0db2fd4abff6af4149f51b"
)
_POLY1305_MESSAGE: Final = b"Cryptographic Forum Research Group"
_POLY1305_TAG: Final = "a8061dc1305136c6c22b8baf0c0127a9"

# Inputs of our own constructions (mirrored in tests/reliability/naive.py) and pinned outputs.
TRANSCRIPT_R: Final = bytes(range(16))
TRANSCRIPT_S: Final = bytes(range(16, 32))
TRANSCRIPT_RECORDS: Final = (b"", b"abc", bytes(range(40)))
TRANSCRIPT_TAG: Final = "f3377a9f2669200d05fbd8dd7bfb8cb0"
MERSENNE_DATA: Final = bytes((7 * i + 3) % 256 for i in range(38))
MERSENNE_BITS: Final = 300
MERSENNE_VECTORS: Final = (
    (61, 0x0123456789ABCDEF % ((1 << 61) - 1), "1724f99cccc1d20"),
    (127, (1 << 126) + 0x1234567, "663636363637f014b0fb0e4b7060c3cb"),
)
TOEPLITZ_INPUT: Final = bytes((13 * i + 5) % 256 for i in range(8))
TOEPLITZ_SEED: Final = bytes((29 * i + 11) % 256 for i in range(11))
TOEPLITZ_N: Final = 64
TOEPLITZ_M: Final = 24
TOEPLITZ_OUTPUT: Final = "11fe10"
PA_MERSENNE_INPUT: Final = bytes((11 * i + 7) % 256 for i in range(75))
PA_MERSENNE_SEED: Final = (
    bytes((17 * i + 1) % 256 for i in range(75)) + b"\x15"
    + bytes((23 * i + 9) % 256 for i in range(75)) + b"\x2a"
)  # fmt: skip
PA_MERSENNE_N: Final = 600
PA_MERSENNE_M: Final = 300
PA_MERSENNE_OUTPUT: Final = (
    "e81a99a88b86ddd4b0b529516dc499b1df638483a52e6354c7c38d6b9f6d1a6a30af27e01b0f"
)


# hybrid delivery key: ML-KEM shared secret bytes 0..31, key ID below, QKD key bytes 100..131
HYBRID_SHARED: Final = bytes(range(32))
HYBRID_KEY_ID: Final = "00112233-4455-6677-8899-aabbccddeeff"
HYBRID_QKD_KEY: Final = bytes(range(100, 132))
HYBRID_IDS: Final = ("sae-a", "sae-b", "kme-a", "kme-b")  # master/slave SAE, master/slave KME
HYBRID_PER_KEY_SECRET: Final = "7bd2430cf6e8755fecce4cb46eacff4ee875db09d68af4b984157dd59ff4f711"
HYBRID_OUTPUT: Final = "67a7905392381dbd28c36cf8ce013b9d3751c66d00c7b8b956590b060ae8e761"


# ---- the tests --------------------------------------------------------------------------------


def _same(name: str, got: bytes, expected_hex: str) -> None:
    if not hmac.compare_digest(got, bytes.fromhex(expected_hex)):
        raise SelfTestFailed(name, "output differs from the known answer")


def _bits(data: bytes, count: int) -> np.ndarray[tuple[int], np.dtype[np.uint8]]:
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[:count].copy()


def _flip_first_byte(data: bytes) -> bytes:
    return bytes([data[0] ^ 1]) + data[1:]


def check_hmac_sha256() -> None:
    for key, data, expected in _HMAC_VECTORS:
        _same("hmac_sha256", hmac.new(key, data, "sha256").digest(), expected)


def check_poly1305() -> None:
    from qkdnode.channel.auth import BlockTranscript
    from qkdnode.channel.wegman_carter import OneTimeTag

    tag = OneTimeTag(_POLY1305_KEY[:16], _POLY1305_KEY[16:])
    tag.update(_POLY1305_MESSAGE[:5])
    tag.update(_POLY1305_MESSAGE[5:])
    _same("poly1305", tag.finish(), _POLY1305_TAG)
    transcript = BlockTranscript(r=TRANSCRIPT_R, s=TRANSCRIPT_S, hmac_key=None)
    for record in TRANSCRIPT_RECORDS:
        transcript.absorb(record)
    expected = transcript.tag()
    _same("poly1305", expected, TRANSCRIPT_TAG)
    # the receiver's side: the right tag verifies, a changed one is rejected
    for tag_hex, accepts in ((TRANSCRIPT_TAG, True), (_flip_first_byte(expected).hex(), False)):
        receiver = BlockTranscript(r=TRANSCRIPT_R, s=TRANSCRIPT_S, hmac_key=None)
        for record in TRANSCRIPT_RECORDS[:-1]:
            receiver.absorb(record)
        check = functools.partial(
            receiver.verify_final, TRANSCRIPT_RECORDS[-1], bytes.fromhex(tag_hex)
        )
        (_expect_accepted if accepts else _expect_rejection)("poly1305", check)


def check_verification_hash() -> None:
    from qkdnode.postprocess.verification import polynomial_hash

    bits = _bits(MERSENNE_DATA, MERSENNE_BITS)
    for field_bits, key, expected in MERSENNE_VECTORS:
        value = polynomial_hash(bits, key, field_bits)
        _same("verification_hash", value.to_bytes(64, "big"), expected.rjust(128, "0"))
    flipped = bits.copy()
    flipped[0] ^= 1
    field_bits, key, expected = MERSENNE_VECTORS[0]
    if polynomial_hash(flipped, key, field_bits) == int(expected, 16):
        raise SelfTestFailed("verification_hash", "a changed input gives the same hash")


def check_toeplitz() -> None:
    from qkdnode.postprocess.amplification import toeplitz_hash

    out = toeplitz_hash(
        _bits(TOEPLITZ_INPUT, TOEPLITZ_N),
        _bits(TOEPLITZ_SEED, TOEPLITZ_N + TOEPLITZ_M - 1),
        TOEPLITZ_M,
    )
    _same("toeplitz", np.packbits(out, bitorder="little").tobytes(), TOEPLITZ_OUTPUT)


def check_hybrid_combiner() -> None:
    import uuid

    from qkdnode.delivery.hybrid import combine, per_key_secrets

    key_id = uuid.UUID(HYBRID_KEY_ID)
    secret = per_key_secrets(HYBRID_SHARED, [key_id])[key_id]
    _same("hybrid_combiner", secret, HYBRID_PER_KEY_SECRET)
    master_sae, slave_sae, master_kme, slave_kme = HYBRID_IDS
    derived = combine(
        HYBRID_QKD_KEY,
        secret,
        key_id=key_id,
        master_sae=master_sae,
        slave_sae=slave_sae,
        master_kme_id=master_kme,
        slave_kme_id=slave_kme,
    )
    _same("hybrid_combiner", derived, HYBRID_OUTPUT)


def check_pa_mersenne() -> None:
    from qkdnode.postprocess.amplification_mersenne import mersenne_hash

    out = mersenne_hash(_bits(PA_MERSENNE_INPUT, PA_MERSENNE_N), PA_MERSENNE_SEED, PA_MERSENNE_M)
    _same("pa_mersenne", np.packbits(out, bitorder="little").tobytes(), PA_MERSENNE_OUTPUT)


def check_ed25519() -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from qkdnode.channel.pki import verify_signature

    for public_hex, message_hex, signature_hex in _ED25519_VECTORS:
        key = ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex))
        message, signature = bytes.fromhex(message_hex), bytes.fromhex(signature_hex)
        bad = _flip_first_byte(signature)
        _expect_accepted("ed25519", functools.partial(verify_signature, key, signature, message))
        _expect_rejection("ed25519", functools.partial(verify_signature, key, bad, message))


def check_mldsa65() -> None:
    from cryptography.hazmat.primitives.asymmetric import mldsa

    from qkdnode.channel.pki import verify_signature

    private = mldsa.MLDSA65PrivateKey.from_seed_bytes(_MLDSA_SEED)
    public = private.public_key()
    _same("ml_dsa_65", hashlib.sha256(public.public_bytes_raw()).digest(), _MLDSA_PUBLIC_SHA256)
    signature = private.sign(_MLDSA_MESSAGE)
    _expect_accepted("ml_dsa_65", lambda: verify_signature(public, signature, _MLDSA_MESSAGE))
    _expect_rejection(
        "ml_dsa_65",
        lambda: verify_signature(public, signature, _flip_first_byte(_MLDSA_MESSAGE)),
    )


def _expect_accepted(name: str, check: Callable[[], None]) -> None:
    try:
        check()
    except QkdError:
        raise SelfTestFailed(name, "a known-good value was rejected") from None


def _expect_rejection(name: str, check: Callable[[], None]) -> None:
    from qkdnode.errors import AuthenticationFailed

    try:
        check()
    except AuthenticationFailed:
        return
    raise SelfTestFailed(name, "a corrupted value was accepted")


SELF_TESTS: Final[tuple[tuple[str, Callable[[], None]], ...]] = (
    ("hmac_sha256", check_hmac_sha256),
    ("poly1305", check_poly1305),
    ("verification_hash", check_verification_hash),
    ("toeplitz", check_toeplitz),
    ("hybrid_combiner", check_hybrid_combiner),
    ("pa_mersenne", check_pa_mersenne),
    ("ed25519", check_ed25519),
    ("ml_dsa_65", check_mldsa65),
)


def run_self_tests() -> list[str]:
    """Run every known-answer test; return their names, or raise ``SelfTestFailed``.

    Any unexpected exception inside a test (a broken library, a changed API) counts as a
    failure of that test.
    """
    passed = []
    for name, check in SELF_TESTS:
        try:
            check()
        except SelfTestFailed:
            raise
        except Exception as exc:
            raise SelfTestFailed(name, f"raised {type(exc).__name__}") from exc
        passed.append(name)
    return passed
