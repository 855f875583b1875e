"""Web-of-trust interoperability with gpg and sq: the committed vectors and the live tools.

The committed vectors (tests/vectors/openpgp/, made by make_gpg.sh and make_sq.sh with the
clock frozen at 2026-01-01T00:00:00Z) are judged at explicit times: acceptance at k vouches,
one named refusal per case, transcript signatures. The live tests run gpg and sq when they are
on PATH and skip otherwise, against keys made here (judged at ``time.time()``).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pysequoia
import pytest
from pysequoia.packet import PacketPile, Tag

from qkdnode.channel.weboftrust import (
    Refusal,
    SecretCertificate,
    SetAside,
    load_introducers,
    sign_transcript,
    verify_peer_certificate,
    verify_transcript,
)
from qkdnode.errors import AuthenticationFailed, WebOfTrustRefused
from tests.helpers_weboftrust import (
    DAY_S,
    GPG,
    GPG_INTRODUCERS,
    HOUR_S,
    NOON_S,
    SQ,
    VECTOR_TIME_S,
    introducers_from,
    make_keys,
    read,
    refusal,
)

# ---- the committed gpg vectors ---------------------------------------------------------------


def test_gpg_vouches_accepted_at_exactly_k() -> None:
    introducers = introducers_from(*GPG_INTRODUCERS)
    accepted = verify_peer_certificate(
        read(GPG / "bob.asc"),
        introducers=introducers,
        threshold=2,
        user_id="qkdnode node bob",
        now_s=NOON_S,
    )
    assert accepted.user_id == "qkdnode node bob"
    assert accepted.fingerprint == pysequoia.Cert.from_file(str(GPG / "bob.asc")).fingerprint
    assert set(accepted.introducer_fingerprints) == {i.fingerprint for i in introducers}
    assert accepted.set_aside == ()


def test_k_minus_one_certifications_refused() -> None:
    # three trusted introducers, k = 3, and bob carries the certifications of two of them
    introducers = introducers_from(*GPG_INTRODUCERS, SQ / "intro.asc")
    refused = refusal(
        read(GPG / "bob.asc"),
        introducers=introducers,
        threshold=3,
        user_id="qkdnode node bob",
        now_s=NOON_S,
    )
    assert refused.reason == Refusal.TOO_FEW_CERTIFICATIONS
    assert "2 of the 3" in str(refused)


def test_expired_certification_refused_after_its_day_accepted_before() -> None:
    introducers = introducers_from(*GPG_INTRODUCERS)
    carol = read(GPG / "carol.asc")
    verify_peer_certificate(
        carol, introducers=introducers, threshold=1, user_id="qkdnode node carol", now_s=NOON_S
    )
    refused = refusal(
        carol,
        introducers=introducers,
        threshold=1,
        user_id="qkdnode node carol",
        now_s=VECTOR_TIME_S + DAY_S,
    )
    assert refused.reason == Refusal.CERTIFICATION_EXPIRED


def test_revoked_certification_refused_from_its_revocation_on() -> None:
    introducers = introducers_from(*GPG_INTRODUCERS)
    dave = read(GPG / "dave.asc")
    # certified at 00:00, the certification revoked at 01:00
    verify_peer_certificate(
        dave,
        introducers=introducers,
        threshold=1,
        user_id="qkdnode node dave",
        now_s=VECTOR_TIME_S + 0.5 * HOUR_S,
    )
    refused = refusal(
        dave, introducers=introducers, threshold=1, user_id="qkdnode node dave", now_s=NOON_S
    )
    assert refused.reason == Refusal.CERTIFICATION_REVOKED


def test_certification_by_an_untrusted_key_refused() -> None:
    refused = refusal(
        read(GPG / "erin.asc"),
        introducers=introducers_from(*GPG_INTRODUCERS),
        threshold=1,
        user_id="qkdnode node erin",
        now_s=NOON_S,
    )
    assert refused.reason == Refusal.CERTIFIER_NOT_TRUSTED
    stranger = pysequoia.Cert.from_file(str(GPG / "stranger.asc")).fingerprint
    assert refused.set_aside == (SetAside(stranger, Refusal.CERTIFIER_NOT_TRUSTED),)


def test_the_stranger_counts_once_trusted() -> None:
    verify_peer_certificate(
        read(GPG / "erin.asc"),
        introducers=introducers_from(GPG / "stranger.asc"),
        threshold=1,
        user_id="qkdnode node erin",
        now_s=NOON_S,
    )


def test_certification_of_another_user_id_refused() -> None:
    frank = read(GPG / "frank.asc")
    introducers = introducers_from(*GPG_INTRODUCERS)
    refused = refusal(
        frank, introducers=introducers, threshold=1, user_id="qkdnode node frank", now_s=NOON_S
    )
    assert refused.reason == Refusal.CERTIFICATION_FOR_OTHER_USER_ID
    # the user ID that was certified is accepted
    verify_peer_certificate(
        frank, introducers=introducers, threshold=1, user_id="qkdnode node frank-old", now_s=NOON_S
    )


def test_revoked_peer_key_refused_despite_its_vouch() -> None:
    refused = refusal(
        read(GPG / "grace.asc"),
        introducers=introducers_from(*GPG_INTRODUCERS),
        threshold=1,
        user_id="qkdnode node grace",
        now_s=NOON_S,
    )
    assert refused.reason == Refusal.PEER_KEY_REVOKED


def _without_signatures(
    certificate: bytes, signature_type: pysequoia.packet.SignatureType
) -> bytes:
    binary = bytes(pysequoia.Cert.from_bytes(certificate))
    for packet in PacketPile.from_bytes(binary):
        if packet.tag == Tag.Signature and packet.signature_type == signature_type:
            binary = binary.replace(bytes(packet), b"")
    return binary


def test_a_revocation_the_peer_leaves_out_is_found_in_the_local_copy() -> None:
    introducers = introducers_from(*GPG_INTRODUCERS)
    kinds = pysequoia.packet.SignatureType
    for name, kind, reason in (
        ("dave", kinds.CertificationRevocation, Refusal.CERTIFICATION_REVOKED),
        ("grace", kinds.KeyRevocation, Refusal.PEER_KEY_REVOKED),
    ):
        full = read(GPG / f"{name}.asc")
        stripped = _without_signatures(full, kind)
        user_id = f"qkdnode node {name}"
        verify_peer_certificate(
            stripped, introducers=introducers, threshold=1, user_id=user_id, now_s=NOON_S
        )
        with pytest.raises(WebOfTrustRefused) as caught:
            verify_peer_certificate(
                stripped,
                introducers=introducers,
                threshold=1,
                user_id=user_id,
                now_s=NOON_S,
                local_copies=[read(GPG / "bob.asc"), full],
            )
        assert caught.value.reason == reason


def test_a_user_id_the_peer_does_not_bind_refused() -> None:
    refused = refusal(
        read(GPG / "bob.asc"),
        introducers=introducers_from(*GPG_INTRODUCERS),
        threshold=1,
        user_id="qkdnode node mallory",
        now_s=NOON_S,
    )
    assert refused.reason == Refusal.USER_ID_NOT_BOUND


def test_certification_made_after_now_does_not_count() -> None:
    refused = refusal(
        read(GPG / "bob.asc"),
        introducers=introducers_from(*GPG_INTRODUCERS),
        threshold=1,
        user_id="qkdnode node bob",
        now_s=VECTOR_TIME_S - 1,
    )
    assert refused.reason in {Refusal.PEER_KEY_NOT_YET_VALID, Refusal.CERTIFICATION_NOT_YET_VALID}


def _replace_packet(certificate: bytes, old: bytes, new: bytes) -> bytes:
    binary = bytes(pysequoia.Cert.from_bytes(certificate))
    assert binary.count(old) == 1
    return binary.replace(old, new)


def _certification_packets(certificate: bytes, issuer: str) -> list[bytes]:
    return [
        bytes(p)
        for p in PacketPile.from_bytes(bytes(pysequoia.Cert.from_bytes(certificate)))
        if p.tag == Tag.Signature
        and p.issuer_fingerprint == issuer
        and p.signature_type == pysequoia.packet.SignatureType.GenericCertification
    ]


def test_a_tampered_certification_refused_as_bad_signature() -> None:
    introducers = introducers_from(GPG / "intro1.asc")
    bob = read(GPG / "bob.asc")
    (packet,) = _certification_packets(bob, introducers[0].fingerprint)
    tampered = packet[:-1] + bytes([packet[-1] ^ 0x01])
    refused = refusal(
        _replace_packet(bob, packet, tampered),
        introducers=introducers,
        threshold=1,
        user_id="qkdnode node bob",
        now_s=NOON_S,
    )
    assert refused.reason == Refusal.CERTIFICATION_BAD_SIGNATURE


def test_a_certification_over_a_refused_hash_set_aside_as_malformed() -> None:
    introducers = introducers_from(GPG / "intro1.asc")
    bob = read(GPG / "bob.asc")
    (packet,) = _certification_packets(bob, introducers[0].fingerprint)
    header_bytes = len(packet) - len(next(iter(PacketPile.from_bytes(packet))).body)
    assert packet[header_bytes + 3] == 8  # SHA-256
    sha1 = packet[: header_bytes + 3] + b"\x02" + packet[header_bytes + 4 :]
    refused = refusal(
        _replace_packet(bob, packet, sha1),
        introducers=introducers,
        threshold=1,
        user_id="qkdnode node bob",
        now_s=NOON_S,
    )
    assert refused.reason == Refusal.CERTIFICATION_MALFORMED


def test_a_certification_grafted_onto_another_user_id_does_not_count() -> None:
    # frank's introducer certified "frank-old"; graft that signature onto "frank". Sequoia puts
    # a misplaced certification back under the user ID its digest prefix matches, and if it did
    # not, the signature would not verify over "frank"
    introducers = introducers_from(GPG / "intro1.asc")
    frank = bytes(pysequoia.Cert.from_bytes(read(GPG / "frank.asc")))
    (packet,) = _certification_packets(frank, introducers[0].fingerprint)
    without = frank.replace(packet, b"")
    frank_uid = next(
        bytes(p)
        for p in PacketPile.from_bytes(without)
        if p.tag == Tag.UserID and p.user_id == "qkdnode node frank"
    )
    grafted = without.replace(frank_uid, frank_uid + packet)
    refused = refusal(
        grafted, introducers=introducers, threshold=1, user_id="qkdnode node frank", now_s=NOON_S
    )
    assert refused.reason in {
        Refusal.CERTIFICATION_FOR_OTHER_USER_ID,
        Refusal.CERTIFICATION_BAD_SIGNATURE,
    }


@pytest.mark.parametrize(
    "data",
    [b"", b"not openpgp", b"\x99\x00\x01", (GPG / "bob.asc").read_bytes() * 2],
    ids=["empty", "text", "truncated", "two-certificates"],
)
def test_malformed_peer_certificates_refused(data: bytes) -> None:
    refused = refusal(
        data,
        introducers=introducers_from(*GPG_INTRODUCERS),
        threshold=1,
        user_id="qkdnode node bob",
        now_s=NOON_S,
    )
    assert refused.reason in {Refusal.MALFORMED_CERTIFICATE}


def test_mutated_certificates_give_a_refusal_or_an_acceptance_never_another_error() -> None:
    rng = random.Random(18)
    introducers = introducers_from(*GPG_INTRODUCERS)
    binary = bytes(pysequoia.Cert.from_bytes(read(GPG / "bob.asc")))
    outcomes: set[str] = set()
    for _ in range(300):
        mutated = bytearray(binary)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        try:
            verify_peer_certificate(
                bytes(mutated),
                introducers=introducers,
                threshold=2,
                user_id="qkdnode node bob",
                now_s=NOON_S,
            )
            outcomes.add("accepted")
        except WebOfTrustRefused as refused:
            outcomes.add(refused.reason)
    assert Refusal.MALFORMED_CERTIFICATE in outcomes
    assert len(outcomes) >= 3


def test_threshold_outside_one_to_the_number_of_introducers_is_a_value_error() -> None:
    introducers = introducers_from(*GPG_INTRODUCERS, *GPG_INTRODUCERS)  # duplicates count once
    assert len(introducers) == 2
    for threshold in (0, 3):
        with pytest.raises(ValueError, match="threshold"):
            verify_peer_certificate(
                read(GPG / "bob.asc"),
                introducers=introducers,
                threshold=threshold,
                user_id="qkdnode node bob",
                now_s=NOON_S,
            )


def test_gpg_transcript_signature_verifies_and_binds_the_bytes() -> None:
    bob, transcript = read(GPG / "bob.asc"), read(GPG / "transcript.bin")
    signature = read(GPG / "transcript.bin.sig")
    verify_transcript(bob, transcript, signature)
    with pytest.raises(AuthenticationFailed):
        verify_transcript(bob, transcript + b"!", signature)
    with pytest.raises(AuthenticationFailed):
        verify_transcript(read(GPG / "carol.asc"), transcript, signature)


# ---- the committed sq vectors ----------------------------------------------------------------


def test_sq_certification_accepted_then_expired_after_a_day() -> None:
    introducers = introducers_from(SQ / "intro.asc")
    certified = read(SQ / "bob.certified.asc")
    verify_peer_certificate(
        certified, introducers=introducers, threshold=1, user_id="qkdnode node bob", now_s=NOON_S
    )
    refused = refusal(
        certified,
        introducers=introducers,
        threshold=1,
        user_id="qkdnode node bob",
        now_s=VECTOR_TIME_S + DAY_S,
    )
    assert refused.reason == Refusal.CERTIFICATION_EXPIRED


def test_sq_partial_trust_certification_does_not_count() -> None:
    refused = refusal(
        read(SQ / "bob.partial.asc"),
        introducers=introducers_from(SQ / "intro.asc"),
        threshold=1,
        user_id="qkdnode node bob",
        now_s=NOON_S,
    )
    assert refused.reason == Refusal.CERTIFICATION_PARTIAL_TRUST


def test_sq_and_gpg_certifications_on_one_certificate_add_up() -> None:
    introducers = introducers_from(*GPG_INTRODUCERS, SQ / "intro.asc")
    accepted = verify_peer_certificate(
        read(SQ / "gpg-bob.certified.asc"),
        introducers=introducers,
        threshold=3,
        user_id="qkdnode node bob",
        now_s=NOON_S,
    )
    assert len(accepted.introducer_fingerprints) == 3


def test_sq_transcript_signature_by_a_signing_subkey_verifies() -> None:
    bob, transcript = read(SQ / "bob.asc"), read(SQ / "transcript.bin")
    signature = read(SQ / "transcript.bin.sig")
    verify_transcript(bob, transcript, signature)
    with pytest.raises(AuthenticationFailed):
        verify_transcript(bob, b"another transcript", signature)


# ---- live interoperability -----------------------------------------------------------------


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Bob's node key and three introducers, by `qkdnode pgp init`; two of them vouch."""
    return make_keys(tmp_path_factory.mktemp("pgp"))


@pytest.fixture
def gnupghome() -> Iterator[dict[str, str]]:
    """A throw-away GNUPGHOME (short path: gpg-agent's socket name has a length limit)."""
    if shutil.which("gpg") is None:
        pytest.skip("gpg is not installed")
    home = tempfile.mkdtemp(prefix="qg", dir="/tmp")
    env = {**os.environ, "GNUPGHOME": home}
    try:
        yield env
    finally:
        subprocess.run(["gpgconf", "--kill", "all"], env=env, capture_output=True, check=False)
        shutil.rmtree(home, ignore_errors=True)


def _gpg(env: dict[str, str], *args: str, data: bytes | None = None) -> bytes:
    result = subprocess.run(
        ["gpg", "--batch", "--pinentry-mode", "loopback", "--passphrase", "", *args],
        env=env,
        input=data,
        capture_output=True,
        check=True,
        timeout=60,
    )
    return result.stdout


def test_live_gpg_verifies_our_certification_and_transcript_signature(
    made: dict[str, Path], gnupghome: dict[str, str], tmp_path: Path
) -> None:
    for name in ("so1", "so2", "bob.vouched"):
        _gpg(gnupghome, "--import", str(made[name]))
    bob = pysequoia.Cert.from_file(str(made["bob"]))
    listing = _gpg(gnupghome, "--with-colons", "--check-sigs", bob.fingerprint).decode()
    good_issuers = {
        line.split(":")[4].lower() for line in listing.splitlines() if line.startswith("sig:!:")
    }
    for name in ("so1", "so2"):
        assert pysequoia.Cert.from_file(str(made[name])).fingerprint[-16:] in good_issuers
    transcript = tmp_path / "transcript.bin"
    transcript.write_bytes(b"a handshake transcript")
    signature = tmp_path / "transcript.bin.sig"
    bob_secret = SecretCertificate(made["bob.secret"].read_bytes())
    signature.write_bytes(sign_transcript(bob_secret, transcript.read_bytes()))
    _gpg(gnupghome, "--verify", str(signature), str(transcript))


def test_live_gpg_transcript_signatures_binary_accepted_text_refused(
    gnupghome: dict[str, str], tmp_path: Path
) -> None:
    _gpg(gnupghome, "--quick-gen-key", "qkdnode node bob", "ed25519", "sign,cert", "never")
    certificate = _gpg(gnupghome, "--export", "=qkdnode node bob")
    transcript = tmp_path / "transcript.bin"
    transcript.write_bytes(b"line one\nline two\n")
    binary = _gpg(gnupghome, "--detach-sign", "--output", "-", str(transcript))
    verify_transcript(certificate, transcript.read_bytes(), binary)
    text = _gpg(gnupghome, "--textmode", "--detach-sign", "--output", "-", str(transcript))
    with pytest.raises(AuthenticationFailed, match="binary signature"):
        verify_transcript(certificate, transcript.read_bytes(), text)


def test_live_gpg_certification_of_our_certificate_accepted(
    made: dict[str, Path], gnupghome: dict[str, str]
) -> None:
    _gpg(gnupghome, "--quick-gen-key", "gpg introducer", "ed25519", "sign,cert", "never")
    _gpg(gnupghome, "--import", str(made["bob"]))
    bob = pysequoia.Cert.from_file(str(made["bob"])).fingerprint
    _gpg(gnupghome, "-u", "=gpg introducer", "--quick-sign-key", bob)
    introducer = _gpg(gnupghome, "--export", "=gpg introducer")
    certified = _gpg(gnupghome, "--export", bob)
    verify_peer_certificate(
        certified,
        introducers=load_introducers([introducer]),
        threshold=1,
        user_id="qkdnode node bob",
        now_s=time.time(),
    )


def test_live_sq_accepts_our_certification_and_we_accept_sqs(
    made: dict[str, Path], tmp_path: Path
) -> None:
    if shutil.which("sq") is None:
        pytest.skip("sq is not installed")

    def sq(*args: str) -> bytes:
        return subprocess.run(["sq", *args], capture_output=True, check=True, timeout=60).stdout

    # sq verifies a transcript signature of ours
    transcript = tmp_path / "transcript.bin"
    transcript.write_bytes(b"a handshake transcript")
    signature = tmp_path / "transcript.bin.sig"
    bob_secret = SecretCertificate(made["bob.secret"].read_bytes())
    signature.write_bytes(sign_transcript(bob_secret, transcript.read_bytes()))
    sq("verify", "--signer-cert", str(made["bob"]), "--detached", str(signature), str(transcript))
    # sq certifies our certificate; we accept it
    sq("key", "generate", "--userid", "sq introducer", "--export", str(tmp_path / "intro.key"))
    sq("key", "extract-cert", "--output", str(tmp_path / "intro.asc"), str(tmp_path / "intro.key"))
    certified = sq("certify", str(tmp_path / "intro.key"), str(made["bob"]), "qkdnode node bob")
    verify_peer_certificate(
        certified,
        introducers=introducers_from(tmp_path / "intro.asc"),
        threshold=1,
        user_id="qkdnode node bob",
        now_s=time.time() + 60,
    )
