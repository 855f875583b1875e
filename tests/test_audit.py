"""The tamper-evident audit trail: the pure construction, the store's trail and ``qkdnode audit``.

Every kind of tampering an attacker with the disk can try (edit, delete, reorder, truncate,
replace the evolving key, roll the whole store back) is detected and the first bad entry named.
Crash safety, forward security and the daemon's hooks are in test_audit_runtime.py.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

import pytest

from qkdnode.audit import (
    GENESIS_HASH,
    AuditKind,
    AuditRecord,
    AuditState,
    PeerHead,
    append_entry,
    chain_hash,
    encode_body,
    entry_tag,
    evolve_key,
    initial_state,
    verify_trail,
)
from qkdnode.cli import main
from qkdnode.errors import (
    AuditTrailBroken,
)
from qkdnode.store import KeyStore
from qkdnode.store.audit import (
    INITIAL_KEY_FILE,
    AuditTrail,
    read_initial_key,
    read_trail,
)
from qkdnode.store.schema import DATABASE_NAME
from tests.helpers_audit import K0, store_with_trail, verify_cli


def _trail(count: int, key: bytes = K0) -> tuple[list[AuditRecord], AuditState]:
    state = initial_state(key)
    records = []
    for i in range(count):
        record, state = append_entry(
            state, AuditKind.SESSION_ESTABLISHED, {"i": i, "mode": "pki"}, time_s=1000.0 + i
        )
        records.append(record)
    return records, state


def _broken_at(records: list[AuditRecord], state: AuditState | None, **kwargs: object) -> int:
    with pytest.raises(AuditTrailBroken) as caught:
        verify_trail(records, initial_key=K0, stored_state=state, **kwargs)  # type: ignore[arg-type]
    return caught.value.seq


# ---- the construction ---------------------------------------------------------------------------


def test_construction_matches_its_formulas() -> None:
    """Known answer from an independent spelling of the formulas in qkdnode.audit.trail."""
    import hmac

    records, state = _trail(2)
    body0 = encode_body(AuditKind.SESSION_ESTABLISHED, {"i": 0, "mode": "pki"}, time_s=1000.0)
    assert body0 == b'{"fields":{"i":0,"mode":"pki"},"kind":"session_established","time_s":1000.0}'
    tag0 = hmac.new(
        K0, b"qkdnode/audit/tag/v1\x00" + (0).to_bytes(8, "big") + GENESIS_HASH + body0, "sha256"
    ).digest()
    assert records[0].tag == tag0 == entry_tag(K0, 0, GENESIS_HASH, body0)
    k1 = hashlib.sha256(b"qkdnode/audit/evolve/v1\x00" + K0).digest()
    assert evolve_key(K0) == k1
    h0 = hashlib.sha256(
        b"qkdnode/audit/chain/v1\x00"
        + GENESIS_HASH
        + (0).to_bytes(8, "big")
        + len(body0).to_bytes(8, "big")
        + body0
        + tag0
    ).digest()
    assert records[0].chain_hash == h0 == chain_hash(GENESIS_HASH, 0, body0, tag0)
    assert (
        state.key == evolve_key(k1) and state.next_seq == 2 and state.head == records[1].chain_hash
    )
    assert "key" not in repr(state) or K0.hex() not in repr(state)


def test_a_whole_trail_verifies_with_and_without_the_initial_key() -> None:
    records, state = _trail(20)
    summary = verify_trail(records, initial_key=K0, stored_state=state)
    assert (summary.entries, summary.head, summary.tags_checked) == (20, state.head, True)
    assert not verify_trail(records, initial_key=None, stored_state=state).tags_checked
    assert verify_trail([], initial_key=K0, stored_state=None).entries == 0
    peer = PeerHead(seq=7, chain_hash=records[7].chain_hash)
    assert verify_trail(
        records, initial_key=K0, stored_state=state, peer_head=peer
    ).peer_head_checked


def test_bytes_never_enter_an_entry() -> None:
    with pytest.raises(TypeError):
        encode_body(AuditKind.KEYS_DELIVERED, {"key": b"\x01" * 32}, time_s=1.0)  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        encode_body(AuditKind.KEYS_DELIVERED, {"keys": [b"\x01"]}, time_s=1.0)  # type: ignore[dict-item]


def test_an_edited_entry_is_named_even_when_the_chain_is_recomputed() -> None:
    records, state = _trail(10)
    edited = encode_body(AuditKind.SESSION_ESTABLISHED, {"i": 4, "mode": "psk"}, time_s=1004.0)
    naive = list(records)
    naive[4] = AuditRecord(seq=4, body=edited, tag=records[4].tag, chain_hash=records[4].chain_hash)
    assert _broken_at(naive, state) == 4
    # a forger who knows no key recomputes every chain hash after the edit: the tag still fails
    forged, head = list(records[:4]), records[3].chain_hash
    for record in records[4:]:
        body = edited if record.seq == 4 else record.body
        head = chain_hash(head, record.seq, body, record.tag)
        forged.append(AuditRecord(seq=record.seq, body=body, tag=record.tag, chain_hash=head))
    forged_state = AuditState(next_seq=10, key=state.key, head=head)
    assert _broken_at(forged, forged_state) == 4
    # without the initial key only the chain is checked: that forger passes (docs/audit.md)
    verify_trail(forged, initial_key=None, stored_state=forged_state)


def test_a_forger_holding_the_current_key_cannot_rewrite_the_past() -> None:
    """The disk at time t gives k_t: re-tagging an earlier entry under it fails."""
    records, state = _trail(10)
    edited = encode_body(AuditKind.SESSION_ESTABLISHED, {"i": 2, "mode": "psk"}, time_s=1.0)
    tag = entry_tag(state.key, 2, records[1].chain_hash, edited)
    forged = list(records)
    forged[2] = AuditRecord(
        seq=2, body=edited, tag=tag, chain_hash=chain_hash(records[1].chain_hash, 2, edited, tag)
    )
    assert _broken_at(forged, state) == 2


def test_a_deleted_entry_is_named() -> None:
    records, state = _trail(10)
    assert _broken_at(records[:3] + records[4:], state) == 3


def test_reordered_entries_are_named() -> None:
    records, state = _trail(10)
    swapped = list(records)
    swapped[2], swapped[6] = swapped[6], swapped[2]
    assert _broken_at(swapped, state) == 2
    # the same contents renumbered in the new order
    renumbered = [
        AuditRecord(seq=i, body=r.body, tag=r.tag, chain_hash=r.chain_hash)
        for i, r in enumerate(swapped)
    ]
    assert _broken_at(renumbered, state) == 2


def test_a_truncated_tail_is_detected() -> None:
    records, state = _trail(10)
    # the state still counts 10 entries
    assert _broken_at(records[:7], state) == 7
    # the state rewritten to match the cut: the evolving key k_7 is not to be had from k_10
    faked = AuditState(next_seq=7, key=state.key, head=records[6].chain_hash)
    assert _broken_at(records[:7], faked) == 7
    # entries and state both gone (or an old copy of the whole store): the peer's head
    old_records, old_state = (
        records[:7],
        AuditState(
            next_seq=7, key=evolve_key(evolve_key(evolve_key(K0))), head=records[6].chain_hash
        ),
    )
    peer = PeerHead(seq=9, chain_hash=records[9].chain_hash)
    with pytest.raises(AuditTrailBroken, match="peer node received the head after entry 9"):
        verify_trail(old_records, initial_key=None, stored_state=old_state, peer_head=peer)


def test_a_replaced_evolving_key_is_named() -> None:
    records, state = _trail(5)
    replaced = AuditState(next_seq=5, key=os.urandom(32), head=state.head)
    with pytest.raises(AuditTrailBroken, match="evolving key") as caught:
        verify_trail(records, initial_key=K0, stored_state=replaced)
    assert caught.value.seq == 5


def test_a_peer_head_off_the_trail_is_named() -> None:
    records, state = _trail(5)
    assert _broken_at(records, state, peer_head=PeerHead(seq=3, chain_hash=bytes(32))) == 3


# ---- the trail in the key store ---------------------------------------------------------------


def test_the_store_trail_verifies_and_shows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, trail = store_with_trail(tmp_path)
    head = trail.head()
    store.close()
    assert head is not None and head.seq == 5  # trail_started, then 5 entries
    assert (tmp_path / INITIAL_KEY_FILE).stat().st_mode & 0o077 == 0
    status, text = verify_cli(tmp_path, capsys)
    assert status == 0, text
    assert "6 entries verify" in text and "tags under the initial key" in text
    assert main(["audit", "show", "--store", str(tmp_path)]) == 0
    shown = capsys.readouterr().out
    assert "trail_started" in shown and "reason=attempt 4" in shown
    assert main(["audit", "show", "--store", str(tmp_path), "--json"]) == 0
    assert '"kind": "authentication_failed"' in capsys.readouterr().out


def test_a_restarted_trail_keeps_its_key_and_file(tmp_path: Path) -> None:
    store, _ = store_with_trail(tmp_path, entries=1)
    first_key = read_initial_key(tmp_path / INITIAL_KEY_FILE)
    store.close()
    store = KeyStore.open(tmp_path, node_name="alice")
    AuditTrail.start(store, node_name="alice").record(AuditKind.ROTATED, mode="x")
    store.close()
    assert read_initial_key(tmp_path / INITIAL_KEY_FILE) == first_key
    trail = read_trail(tmp_path)
    verify_trail(trail.records, initial_key=first_key, stored_state=trail.state)


def test_verify_needs_the_initial_key_or_says_it_checks_the_chain_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, _ = store_with_trail(tmp_path)
    store.close()
    moved = tmp_path.parent / "offline-k0"
    (tmp_path / INITIAL_KEY_FILE).rename(moved)
    assert verify_cli(tmp_path, capsys)[0] == 2
    status, text = verify_cli(tmp_path, capsys, "--no-initial-key")
    assert status == 0 and "NO tags" in text
    assert verify_cli(tmp_path, capsys, "--initial-key", str(moved))[0] == 0


def _tamper(directory: Path, *statements: str) -> None:
    db = sqlite3.connect(directory / DATABASE_NAME, isolation_level=None)
    for statement in statements:
        db.execute(statement)
    db.close()


@pytest.mark.parametrize(
    ("statements", "named"),
    [
        # edit: one character of entry 3's reason
        (
            [
                "UPDATE audit_log SET body = CAST(replace(CAST(body AS TEXT),"
                " 'attempt 2', 'attempt 9') AS BLOB) WHERE seq = 3"
            ],
            3,
        ),
        (["DELETE FROM audit_log WHERE seq = 2"], 2),
        # reorder: entries 1 and 4 swap places
        (
            [
                "UPDATE audit_log SET seq = -1 WHERE seq = 1",
                "UPDATE audit_log SET seq = 1 WHERE seq = 4",
                "UPDATE audit_log SET seq = 4 WHERE seq = -1",
            ],
            1,
        ),
        # truncate the tail, and the state along with it as best one can without k_4
        (
            [
                "DELETE FROM audit_log WHERE seq >= 4",
                "UPDATE audit_state SET next_seq = 4,"
                " head = (SELECT chain_hash FROM audit_log WHERE seq = 3)",
            ],
            4,
        ),
        (["UPDATE audit_state SET key = randomblob(32)"], 6),
        (["UPDATE audit_state SET key = randomblob(16)"], 6),
        (["DELETE FROM audit_state"], 6),
    ],
    ids=["edit", "delete", "reorder", "truncate", "replace-key", "damage-key", "drop-state"],
)
def test_tampering_in_the_store_is_named_by_audit_verify(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], statements: list[str], named: int
) -> None:
    store, _ = store_with_trail(tmp_path)
    store.close()
    _tamper(tmp_path, *statements)
    status, text = verify_cli(tmp_path, capsys)
    assert status == 1, text
    assert f"BROKEN at entry {named}:" in text


def test_a_rolled_back_store_is_caught_by_the_head_the_peer_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    alice_dir, bob_dir = tmp_path / "alice", tmp_path / "bob"
    alice, alice_trail = store_with_trail(alice_dir, entries=2)
    bob = KeyStore.open(bob_dir, node_name="bob")
    bob_trail = AuditTrail.start(bob, node_name="bob")
    # a copy of Alice's whole store taken now, restored later
    alice.fold_wal()
    snapshot = (alice_dir / DATABASE_NAME).read_bytes()
    alice_trail.record(AuditKind.CERTIFICATE_REJECTED, reason="expired")
    head = alice_trail.head()
    assert head is not None
    bob_trail.peer_head_received(head)
    alice.close()
    bob.close()
    assert verify_cli(alice_dir, capsys, "--peer-store", str(bob_dir))[0] == 0
    (alice_dir / DATABASE_NAME).write_bytes(snapshot)
    assert verify_cli(alice_dir, capsys)[0] == 0  # consistent in itself
    status, text = verify_cli(alice_dir, capsys, "--peer-store", str(bob_dir))
    assert status == 1 and "BROKEN at entry 3: missing" in text


def test_the_peer_notes_a_head_that_goes_backwards(tmp_path: Path) -> None:
    store, trail = store_with_trail(tmp_path, entries=0)
    trail.peer_head_received(PeerHead(seq=5, chain_hash=b"\x01" * 32))
    trail.peer_head_received(PeerHead(seq=6, chain_hash=b"\x02" * 32))
    assert read_trail(tmp_path).records[-1].entry().kind == "trail_started"
    trail.peer_head_received(PeerHead(seq=3, chain_hash=b"\x03" * 32))
    last = read_trail(tmp_path).records[-1].entry()
    assert last.kind == "peer_trail_rolled_back"
    assert (last.fields["seq_before"], last.fields["seq_now"]) == (6, 3)
    store.close()
