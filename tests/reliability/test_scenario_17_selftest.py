"""Scenario 17: known-answer self-tests at start-up; a failing one stops the daemon.

The pinned vectors of our own constructions are re-derived here by the naive reference code
(``tests/reliability/naive.py``), so the pins cannot drift from the definitions; the published
vectors (RFC 4231, RFC 8032) are checked by ``run_self_tests`` itself.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qkdnode.errors import QkdError
from qkdnode.ops import selftest
from tests.reliability import naive


def test_all_self_tests_pass_and_cover_every_primitive() -> None:
    assert selftest.run_self_tests() == [
        "hmac_sha256",
        "poly1305",
        "verification_hash",
        "toeplitz",
        "hybrid_combiner",
        "pa_mersenne",
        "ed25519",
        "ml_dsa_65",
    ]


def test_pinned_vectors_equal_the_naive_reference() -> None:
    expected = naive.expected_vectors()
    assert expected["transcript_tag"] == selftest.TRANSCRIPT_TAG
    assert expected["toeplitz"] == selftest.TOEPLITZ_OUTPUT
    assert expected["pa_mersenne"] == selftest.PA_MERSENNE_OUTPUT
    for field_bits, key, value in selftest.MERSENNE_VECTORS:
        assert naive.MERSENNE_KEYS[field_bits] == key
        assert value == expected[f"mersenne_{field_bits}"]
    # the inputs are the same on both sides
    assert (selftest.TRANSCRIPT_R, selftest.TRANSCRIPT_S) == (
        naive.TRANSCRIPT_R,
        naive.TRANSCRIPT_S,
    )
    assert list(selftest.TRANSCRIPT_RECORDS) == naive.TRANSCRIPT_RECORDS
    assert selftest.MERSENNE_DATA == naive.MERSENNE_DATA
    assert (selftest.TOEPLITZ_INPUT, selftest.TOEPLITZ_SEED) == (
        naive.TOEPLITZ_INPUT,
        naive.TOEPLITZ_SEED,
    )
    assert (selftest.PA_MERSENNE_INPUT, selftest.PA_MERSENNE_SEED) == (
        naive.PA_MERSENNE_INPUT,
        naive.PA_MERSENNE_SEED,
    )
    assert (selftest.PA_MERSENNE_N, selftest.PA_MERSENNE_M) == (
        naive.PA_MERSENNE_N,
        naive.PA_MERSENNE_M,
    )


def test_the_hybrid_vector_equals_the_independent_implementation() -> None:
    import uuid

    from tests.helpers_hybrid import hybrid_key, per_key_secret

    key_id = uuid.UUID(selftest.HYBRID_KEY_ID)
    secret = per_key_secret(selftest.HYBRID_SHARED, key_id)
    assert secret.hex() == selftest.HYBRID_PER_KEY_SECRET
    master_sae, slave_sae, master_kme, slave_kme = selftest.HYBRID_IDS
    expected = hybrid_key(
        selftest.HYBRID_QKD_KEY,
        secret,
        key_id=key_id,
        master_sae=master_sae,
        slave_sae=slave_sae,
        master_kme_id=master_kme,
        slave_kme_id=slave_kme,
    )
    assert expected.hex() == selftest.HYBRID_OUTPUT


@pytest.mark.parametrize(
    ("name", "target", "broken"),
    [
        ("poly1305", "qkdnode.channel.wegman_carter.OneTimeTag.finish", lambda self: bytes(16)),
        ("poly1305", "qkdnode.channel.wegman_carter.OneTimeTag.verify", lambda self, tag: None),
        ("verification_hash", "qkdnode.postprocess.verification.polynomial_hash", lambda *a: 0),
        ("toeplitz", "qkdnode.postprocess.amplification.toeplitz_hash", None),
        ("pa_mersenne", "qkdnode.postprocess.amplification_mersenne.mersenne_hash", None),
        ("ed25519", "qkdnode.channel.pki.verify_signature", lambda *a: None),
        ("hybrid_combiner", "qkdnode.delivery.hybrid.combine", lambda qkd, *a, **k: qkd),
    ],
)
def test_a_broken_primitive_fails_its_self_test_by_name(
    monkeypatch: pytest.MonkeyPatch, name: str, target: str, broken: object
) -> None:
    if broken is None:
        import numpy as np

        def broken(bits: object, seed: object, output_bits: int) -> object:
            return np.zeros(output_bits, dtype=np.uint8)

    monkeypatch.setattr(target, broken)
    with pytest.raises(selftest.SelfTestFailed) as caught:
        selftest.run_self_tests()
    assert caught.value.test == name
    assert isinstance(caught.value, QkdError)
    assert name in str(caught.value)


def test_broken_hmac_vector_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    vectors = list(selftest._HMAC_VECTORS)
    key, data, digest = vectors[0]
    vectors[0] = (key, data + b"!", digest)
    monkeypatch.setattr(selftest, "_HMAC_VECTORS", tuple(vectors))
    with pytest.raises(selftest.SelfTestFailed, match="hmac_sha256"):
        selftest.run_self_tests()


def test_an_unexpected_exception_counts_as_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object) -> None:
        raise RuntimeError("library broken")

    monkeypatch.setattr("qkdnode.channel.pki.verify_signature", boom)
    with pytest.raises(selftest.SelfTestFailed) as caught:
        selftest.run_self_tests()
    assert caught.value.test == "ed25519"


@pytest.mark.slow
def test_a_failing_self_test_stops_the_daemon_from_starting(tmp_path: Path) -> None:
    """`qkdnode run` with a broken Toeplitz hash (patched in the process) exits 1, naming the
    test, before it opens its store or listens on anything."""
    from qkdnode.demo.run import prepare_workdir

    layout = prepare_workdir(tmp_path, distance_km=25.0, block_pulses=1 << 20)
    program = (
        "import sys, numpy as np\n"
        "import qkdnode.postprocess.amplification as a\n"
        "a.toeplitz_hash = lambda bits, seed, m: np.zeros(m, dtype=np.uint8)\n"
        "from qkdnode.cli import main\n"
        f"sys.exit(main(['run', '--config', {str(layout.config('bob'))!r}]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "SelfTestFailed" in result.stderr and "toeplitz" in result.stderr
    assert not (layout.store("bob") / "keys.db").exists()
