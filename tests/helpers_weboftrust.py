"""Web-of-trust test helpers: the committed OpenPGP vectors, introducers, refusals, node keys."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from qkdnode.channel.weboftrust import TrustedIntroducer, load_introducers, verify_peer_certificate
from qkdnode.errors import WebOfTrustRefused
from qkdnode.ops import pgp

VECTORS = Path(__file__).parent / "vectors" / "openpgp"
GPG = VECTORS / "gpg"
SQ = VECTORS / "sq"
VECTOR_TIME_S = dt.datetime(2026, 1, 1, tzinfo=dt.UTC).timestamp()
HOUR_S = 3600.0
DAY_S = 86_400.0
NOON_S = VECTOR_TIME_S + 12 * HOUR_S


def read(path: Path) -> bytes:
    return path.read_bytes()


def introducers_from(*paths: Path) -> tuple[TrustedIntroducer, ...]:
    return load_introducers(read(p) for p in paths)


GPG_INTRODUCERS = (GPG / "intro1.asc", GPG / "intro2.asc")


def refusal(
    certificate: bytes,
    *,
    introducers: tuple[TrustedIntroducer, ...],
    threshold: int,
    user_id: str,
    now_s: float,
) -> WebOfTrustRefused:
    with pytest.raises(WebOfTrustRefused) as caught:
        verify_peer_certificate(
            certificate,
            introducers=introducers,
            threshold=threshold,
            user_id=user_id,
            now_s=now_s,
        )
    return caught.value


def make_keys(directory: Path) -> dict[str, Path]:
    """Bob's node key and three introducers, by `qkdnode pgp init`; two of them vouch."""
    files: dict[str, Path] = {}
    for name in ("bob", "alice"):
        keys = pgp.init_node_key(directory, name=name)
        files[name], files[f"{name}.secret"] = keys.certificate, keys.secret_key
    for name in ("so1", "so2", "so3"):
        keys = pgp.init_node_key(
            directory, name=name, user_id=f"Officer {name} <{name}@example.org>"
        )
        files[name], files[f"{name}.secret"] = keys.certificate, keys.secret_key
    once = directory / "bob.so1.asc"
    pgp.vouch(
        introducer_secret=files["so1.secret"], peer_certificate=files["bob"], name="bob", out=once
    )
    twice = directory / "bob.so1.so2.asc"
    pgp.vouch(introducer_secret=files["so2.secret"], peer_certificate=once, name="bob", out=twice)
    files["bob.vouched"] = twice
    return files
