"""The channel's handshake in web-of-trust mode: two PeerConnections whose OpenPGP keys trusted
introducers vouched for (made by `qkdnode pgp init|vouch`), driven against each other in memory.

Keys made here carry the wall-clock creation time, so these pairs read ``time.time()``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pysequoia
import pytest

from qkdnode.channel.auth import Role, WebOfTrustCredentials
from qkdnode.channel.connection import (
    NEED_DATA,
    BlockAuthenticated,
    ConnectionState,
    HandshakeComplete,
    Rotated,
)
from qkdnode.channel.messages import MAX_CERTIFICATE_BYTES, SessionMode
from qkdnode.channel.weboftrust import (
    Refusal,
    SecretCertificate,
    load_introducers,
    node_user_id,
    sign_transcript,
    verify_transcript,
)
from qkdnode.errors import AuthenticationFailed, WebOfTrustRefused
from qkdnode.ops import pgp
from tests.helpers_channel import NAMED_ERRORS, assert_rejected, flip, funded_ledger, make_pair

INTRODUCERS = ("so1", "so2", "so3")
THRESHOLD = 2


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Alice's and Bob's node keys and three introducers; each node's certificate vouched by
    every introducer (``NODE.vouched.3.asc``) and by the first one only (``...vouched.1.asc``)."""
    directory = tmp_path_factory.mktemp("wot")
    files: dict[str, Path] = {}
    for name in ("alice", "bob"):
        made = pgp.init_node_key(directory, name=name)
        files[name], files[f"{name}.secret"] = made.certificate, made.secret_key
    for name in INTRODUCERS:
        made = pgp.init_node_key(directory, name=name, user_id=f"Officer {name} <{name}@x.test>")
        files[name], files[f"{name}.secret"] = made.certificate, made.secret_key
    for node in ("alice", "bob"):
        current = files[node]
        for count, introducer in enumerate(INTRODUCERS, start=1):
            out = directory / f"{node}.vouched.{count}.asc"
            pgp.vouch(
                introducer_secret=files[f"{introducer}.secret"],
                peer_certificate=current,
                name=node,
                out=out,
            )
            files[f"{node}.vouched.{count}"] = current = out
    return files


def credentials(
    keys: dict[str, Path], node: str, *, vouches: int = len(INTRODUCERS)
) -> WebOfTrustCredentials:
    peer = "bob" if node == "alice" else "alice"
    return WebOfTrustCredentials(
        own_certificate=bytes(pysequoia.Cert.from_file(str(keys[f"{node}.vouched.{vouches}"]))),
        secret_key=SecretCertificate(keys[f"{node}.secret"].read_bytes()),
        introducers=load_introducers(keys[name].read_bytes() for name in INTRODUCERS),
        threshold=THRESHOLD,
        peer_user_id=node_user_id(peer),
    )


def test_web_of_trust_pair_completes_the_handshake_runs_a_block_and_rotates(
    keys: dict[str, Path],
) -> None:
    creds = (credentials(keys, "alice"), credentials(keys, "bob"))
    assert len(creds[0].own_certificate) < MAX_CERTIFICATE_BYTES  # fits the handshake frame
    pair = make_pair(
        "web_of_trust",
        creds=creds,
        ledgers=(funded_ledger(), funded_ledger()),
        now_s=time.time(),
    )
    pair.handshake()
    for role in Role:
        (event,) = pair.events[role]
        assert isinstance(event, HandshakeComplete) and event.mode is SessionMode.WEB_OF_TRUST
    assert pair.alice.session_id == pair.bob.session_id
    pair.run_block(0)
    for role in Role:
        done = [e for e in pair.events[role] if isinstance(e, BlockAuthenticated)]
        assert [e.block_id for e in done] == [0] and done[0].mode is SessionMode.WEB_OF_TRUST
    # the same rotation to key-derived authentication as the other bootstrap modes
    pair.deliver(Role.BOB, pair.alice.announce_rotation())
    for role in Role:
        assert isinstance(pair.events[role][-1], Rotated)
        assert pair.end(role).mode is SessionMode.KEY_DERIVED
    pair.run_block(1)
    assert pair.alice.ledger is not None and pair.bob.ledger is not None
    assert pair.alice.ledger.state == pair.bob.ledger.state


@pytest.mark.parametrize("short", ["bob", "alice"])
def test_a_peer_with_k_minus_one_certifications_is_refused_with_the_named_reason(
    keys: dict[str, Path], short: str
) -> None:
    now_s = time.time()
    creds = (
        credentials(keys, "alice", vouches=THRESHOLD - 1 if short == "alice" else 3),
        credentials(keys, "bob", vouches=THRESHOLD - 1 if short == "bob" else 3),
    )
    pair = make_pair("web_of_trust", creds=creds, now_s=now_s)
    hello = pair.alice.start_handshake()
    if short == "bob":  # Alice judges Bob's HelloReply
        pair.bob.receive_data(hello)
        pair.bob.next_event(now_s=now_s)
        refused = assert_rejected(pair.alice, pair.bob.data_to_send(), WebOfTrustRefused, now_s)
    else:  # Bob judges Alice's Finish
        pair.bob.receive_data(hello)
        pair.bob.next_event(now_s=now_s)
        pair.alice.receive_data(pair.bob.data_to_send())
        pair.alice.next_event(now_s=now_s)
        refused = assert_rejected(pair.bob, pair.alice.data_to_send(), WebOfTrustRefused, now_s)
    assert isinstance(refused, WebOfTrustRefused)
    assert refused.reason == Refusal.TOO_FEW_CERTIFICATIONS
    assert refused.user_id == node_user_id(short)
    assert "too_few_certifications" in str(refused)
    assert pair.alice.mode is None or pair.alice.mode is SessionMode.WEB_OF_TRUST


@pytest.mark.parametrize("replayed", ["hello_reply", "finish"])
def test_a_proof_replayed_from_another_session_is_refused(
    keys: dict[str, Path], replayed: str
) -> None:
    """A HelloReply or Finish recorded in one session (a valid, vouched certificate and a valid
    signature) does not authenticate another: the signature covers that session's transcript."""
    now_s = time.time()
    creds = (credentials(keys, "alice"), credentials(keys, "bob"))
    old = make_pair("web_of_trust", creds=creds, now_s=now_s)
    old.bob.receive_data(old.alice.start_handshake())
    old.bob.next_event(now_s=now_s)
    old_reply = old.bob.data_to_send()
    old.alice.receive_data(old_reply)
    old.alice.next_event(now_s=now_s)
    old_finish = old.alice.data_to_send()

    new = make_pair("web_of_trust", creds=creds, seed=77, now_s=now_s)
    hello = new.alice.start_handshake()
    if replayed == "hello_reply":
        error = assert_rejected(new.alice, old_reply, AuthenticationFailed, now_s)
    else:
        new.bob.receive_data(hello)
        new.bob.next_event(now_s=now_s)
        new.bob.data_to_send()
        error = assert_rejected(new.bob, old_finish, AuthenticationFailed, now_s)
    assert not isinstance(error, WebOfTrustRefused)  # the certificate passes; the proof does not
    assert "replayed" in str(error)


def test_credentials_refuse_a_threshold_above_the_introducers_and_redact_the_key(
    keys: dict[str, Path],
) -> None:
    good = credentials(keys, "alice")
    assert "redacted" in repr(good) and "PRIVATE" not in repr(good)
    with pytest.raises(ValueError, match="threshold"):
        WebOfTrustCredentials(
            own_certificate=good.own_certificate,
            secret_key=good.secret_key,
            introducers=good.introducers,
            threshold=len(INTRODUCERS) + 1,
            peer_user_id=good.peer_user_id,
        )


def test_a_changed_hash_prefix_verifies_in_openpgp_but_not_as_a_handshake_proof(
    keys: dict[str, Path],
) -> None:
    """The two-byte hash prefix lies outside the signed data: OpenPGP accepts a signature whose
    prefix was changed, the handshake does not (the proof's bytes enter the session keys)."""
    certificate = keys["alice.vouched.3"].read_bytes()
    secret = SecretCertificate(keys["alice.secret"].read_bytes())
    transcript = b"a handshake transcript"
    signature = sign_transcript(secret, transcript)
    verify_transcript(certificate, transcript, signature, canonical_only=True)
    assert signature[1] == len(signature) - 2  # a packet header of two bytes, then the body
    hashed_bytes = int.from_bytes(signature[6:8], "big")
    prefix_at = 2 + 6 + hashed_bytes + 2  # after the hashed area and the empty unhashed area
    changed = flip(signature, prefix_at)
    verify_transcript(certificate, transcript, changed)
    with pytest.raises(AuthenticationFailed, match="hash prefix"):
        verify_transcript(certificate, transcript, changed, canonical_only=True)
    # an unhashed subpacket (a non-critical experimental one, type 100) added in transit
    body = signature[2 : prefix_at - 2] + b"\x00\x03\x02\x64\x00" + signature[prefix_at:]
    assert 192 <= len(body) < 8384  # a two-byte new-format length
    header = bytes([0xC2, ((len(body) - 192) >> 8) + 192, (len(body) - 192) & 0xFF])
    unhashed = header + body
    verify_transcript(certificate, transcript, unhashed)
    with pytest.raises(AuthenticationFailed, match="not canonical"):
        verify_transcript(certificate, transcript, unhashed, canonical_only=True)


@pytest.mark.parametrize("which", [1, 2])
@pytest.mark.slow  # one handshake per byte of the frame
def test_a_flipped_byte_in_a_web_of_trust_reply_or_finish_never_completes(
    keys: dict[str, Path], which: int
) -> None:
    now_s = time.time()
    creds = (credentials(keys, "alice"), credentials(keys, "bob"))
    probe = make_pair("web_of_trust", creds=creds, now_s=now_s)
    probe.bob.receive_data(probe.alice.start_handshake())
    probe.bob.next_event(now_s=now_s)
    reply = probe.bob.data_to_send()
    probe.alice.receive_data(reply)
    probe.alice.next_event(now_s=now_s)
    size = len(reply) if which == 1 else len(probe.alice.data_to_send())
    for offset in range(size):
        pair = make_pair("web_of_trust", creds=creds, seed=offset, now_s=now_s)
        failed = False
        try:
            pair.bob.receive_data(pair.alice.start_handshake())
            pair.bob.next_event(now_s=now_s)
            reply = pair.bob.data_to_send()
            # the signatures' integers, hence the frames, can be a byte shorter at another seed
            reply = flip(reply, min(offset, len(reply) - 1)) if which == 1 else reply
            pair.alice.receive_data(reply)
            pair.alice.next_event(now_s=now_s)
            finish = pair.alice.data_to_send()
            finish = flip(finish, min(offset, len(finish) - 1)) if which == 2 else finish
            pair.bob.receive_data(finish)
            while pair.bob.next_event(now_s=now_s) is not NEED_DATA:
                pass
        except NAMED_ERRORS:
            failed = True
        # a longer length prefix leaves the receiver waiting (the session's timeout ends it)
        assert failed or pair.bob.state is not ConnectionState.ESTABLISHED, offset
