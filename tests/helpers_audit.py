"""Audit-trail test helpers: the initial key, a store with a trail, ``qkdnode audit verify``."""

from __future__ import annotations

from pathlib import Path

import pytest

from qkdnode.audit import AuditKind
from qkdnode.cli import main
from qkdnode.store import KeyStore
from qkdnode.store.audit import AuditTrail

K0 = bytes(range(32))


def store_with_trail(directory: Path, entries: int = 5) -> tuple[KeyStore, AuditTrail]:
    store = KeyStore.open(directory, node_name="alice")
    trail = AuditTrail.start(store, node_name="alice")
    for i in range(entries):
        trail.record(AuditKind.AUTHENTICATION_FAILED, reason=f"attempt {i}")
    return store, trail


def verify_cli(directory: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    status = main(["audit", "verify", "--store", str(directory), *extra])
    captured = capsys.readouterr()
    return status, captured.out + captured.err
