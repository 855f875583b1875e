"""Web-of-trust trust anchor with keys made here: acceptance at k vouches, refusals, proof of
possession over a transcript, no secret in a repr, pickle or error, and the `qkdnode pgp`
helpers.

Keys made here by pysequoia carry the wall-clock time, so these tests judge at ``time.time()``.
The committed gpg and sq vectors and the live gpg and sq tests are in
test_weboftrust_interop.py.
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import pysequoia
import pytest

from qkdnode.channel.weboftrust import (
    Refusal,
    SecretCertificate,
    TrustedIntroducer,
    make_certification,
    node_user_id,
    sign_transcript,
    verify_peer_certificate,
    verify_transcript,
)
from qkdnode.cli import main as cli_main
from qkdnode.errors import AuthenticationFailed, ConfigError
from qkdnode.ops import pgp
from tests.helpers_weboftrust import DAY_S, introducers_from, make_keys, refusal


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Bob's node key and three introducers, by `qkdnode pgp init`; two of them vouch."""
    return make_keys(tmp_path_factory.mktemp("pgp"))


def test_pgp_init_writes_the_secret_key_with_mode_0600(made: dict[str, Path]) -> None:
    assert made["bob.secret"].stat().st_mode & 0o777 == 0o600
    cert = pysequoia.Cert.from_file(str(made["bob"]))
    assert [str(u) for u in cert.user_ids] == [node_user_id("bob")]
    assert b"PRIVATE KEY" not in made["bob"].read_bytes()
    assert cert.expiration is None


def test_our_vouches_accepted_at_exactly_k_refused_below(made: dict[str, Path]) -> None:
    introducers = introducers_from(made["so1"], made["so2"], made["so3"])
    vouched = made["bob.vouched"].read_bytes()
    accepted = verify_peer_certificate(
        vouched, introducers=introducers, threshold=2, user_id="qkdnode node bob", now_s=time.time()
    )
    assert len(accepted.introducer_fingerprints) == 2
    refused = refusal(
        vouched, introducers=introducers, threshold=3, user_id="qkdnode node bob", now_s=time.time()
    )
    assert refused.reason == Refusal.TOO_FEW_CERTIFICATIONS


def test_an_expired_peer_key_refused(tmp_path: Path, made: dict[str, Path]) -> None:
    keys = pgp.init_node_key(tmp_path, name="carol", valid_days=1)
    vouched = make_certification(
        SecretCertificate(made["so1.secret"].read_bytes()),
        keys.certificate.read_bytes(),
        "qkdnode node carol",
    )
    introducers = introducers_from(made["so1"])
    verify_peer_certificate(
        vouched,
        introducers=introducers,
        threshold=1,
        user_id="qkdnode node carol",
        now_s=time.time(),
    )
    refused = refusal(
        vouched,
        introducers=introducers,
        threshold=1,
        user_id="qkdnode node carol",
        now_s=time.time() + 2 * DAY_S,
    )
    assert refused.reason == Refusal.PEER_KEY_EXPIRED


def test_vouch_refuses_a_user_id_the_peer_does_not_carry(
    made: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="no self-signed user ID 'qkdnode node mallory'"):
        pgp.vouch(
            introducer_secret=made["so1.secret"],
            peer_certificate=made["bob"],
            name="mallory",
            out=tmp_path / "x.asc",
        )
    with pytest.raises(ConfigError, match="secret key"):
        pgp.vouch(
            introducer_secret=made["so1"],
            peer_certificate=made["bob"],
            name="bob",
            out=tmp_path / "x.asc",
        )


def test_proof_of_possession_binds_the_transcript(made: dict[str, Path]) -> None:
    bob_secret = SecretCertificate(made["bob.secret"].read_bytes())
    bob = made["bob"].read_bytes()
    transcript = b"hello alice->bob | nonce 1"
    signature = sign_transcript(bob_secret, transcript)
    verify_transcript(bob, transcript, signature)
    # the same proof replayed in another handshake, over another transcript, fails
    with pytest.raises(AuthenticationFailed, match="replayed proof"):
        verify_transcript(bob, b"hello alice->bob | nonce 2", signature)
    # a proof by another key fails against bob's certificate
    alice_secret = SecretCertificate(made["alice.secret"].read_bytes())
    with pytest.raises(AuthenticationFailed):
        verify_transcript(bob, transcript, sign_transcript(alice_secret, transcript))
    for broken in (b"", signature[:-3], signature + b"\x00" * 5000):
        with pytest.raises(AuthenticationFailed):
            verify_transcript(bob, transcript, broken)


def test_no_secret_in_repr_pickle_or_errors(made: dict[str, Path]) -> None:
    armoured = made["bob.secret"].read_bytes()
    secret = SecretCertificate(armoured)
    body_line = max(armoured.decode().splitlines(), key=len)
    assert len(body_line) > 40
    assert "redacted" in repr(secret)
    assert body_line not in repr(secret)
    with pytest.raises(TypeError):
        pickle.dumps(secret)
    refused = refusal(
        armoured,
        introducers=introducers_from(made["so1"]),
        threshold=1,
        user_id="qkdnode node bob",
        now_s=time.time(),
    )
    assert refused.reason == Refusal.MALFORMED_CERTIFICATE
    assert body_line not in str(refused)
    with pytest.raises(ValueError, match="secret key material") as caught:
        TrustedIntroducer(made["so1.secret"].read_bytes())
    assert body_line not in str(caught.value)


def test_cli_pgp_init_and_vouch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["pgp", "init", "--name", "bob", "--dir", str(tmp_path)]) == 0
    assert (
        cli_main(
            [
                "pgp",
                "init",
                "--name",
                "so",
                "--user-id",
                "SO <so@example.org>",
                "--dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    out = tmp_path / "bob.vouched.asc"
    args = ["--introducer", str(tmp_path / "so.secret.asc"), "--cert", str(tmp_path / "bob.asc")]
    assert cli_main(["pgp", "vouch", *args, "--name", "bob", "--out", str(out)]) == 0
    verify_peer_certificate(
        out.read_bytes(),
        introducers=introducers_from(tmp_path / "so.asc"),
        threshold=1,
        user_id="qkdnode node bob",
        now_s=time.time(),
    )
    assert cli_main(["pgp", "vouch", *args, "--name", "eve", "--out", str(out)]) == 2
    assert "configuration error" in capsys.readouterr().err


def test_node_user_id_refuses_names_that_would_change_its_form() -> None:
    assert node_user_id("bob") == "qkdnode node bob"
    for bad in ("", " bob", "bob <b@x>", "a\nb"):
        with pytest.raises(ValueError):
            node_user_id(bad)
