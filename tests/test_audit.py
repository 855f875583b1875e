"""The tamper-evident audit trail: the pure construction, the store's trail and ``qkdnode audit``.

Every kind of tampering an attacker with the disk can try (edit, delete, reorder, truncate,
replace the evolving key, roll the whole store back) is detected and the first bad entry named;
a failed or killed transaction leaves a trail that verifies; no key material is ever written.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
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
from qkdnode.audit.budget import RecordingBudget
from qkdnode.channel.messages import Control
from qkdnode.cli import main
from qkdnode.config.delivery import ApiLimits
from qkdnode.coordination.wire import AuditHead, control_from_wire, control_to_wire, make_registry
from qkdnode.delivery.fairuse import FairUse, FairUsePolicy
from qkdnode.delivery.keys import KeyManager
from qkdnode.delivery.server import DeliveryApp
from qkdnode.demo.run import prepare_workdir
from qkdnode.errors import (
    AuditTrailBroken,
    AuthenticationFailed,
    CertificateRejected,
    ProtocolError,
)
from qkdnode.node.auditing import SessionFailureRecorder
from qkdnode.store import KeyStore
from qkdnode.store.audit import (
    INITIAL_KEY_FILE,
    AuditTrail,
    read_initial_key,
    read_trail,
)
from qkdnode.store.keystore import DeliveryKey, StoreOp
from qkdnode.store.schema import DATABASE_NAME
from tests.helpers_store import committed_stores, random_blocks, reserve

K0 = bytes(range(32))


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


def _store_with_trail(directory: Path, entries: int = 5) -> tuple[KeyStore, AuditTrail]:
    store = KeyStore.open(directory, node_name="alice")
    trail = AuditTrail.start(store, node_name="alice")
    for i in range(entries):
        trail.record(AuditKind.AUTHENTICATION_FAILED, reason=f"attempt {i}")
    return store, trail


def _verify_cli(
    directory: Path, capsys: pytest.CaptureFixture[str], *extra: str
) -> tuple[int, str]:
    status = main(["audit", "verify", "--store", str(directory), *extra])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def test_the_store_trail_verifies_and_shows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, trail = _store_with_trail(tmp_path)
    head = trail.head()
    store.close()
    assert head is not None and head.seq == 5  # trail_started, then 5 entries
    assert (tmp_path / INITIAL_KEY_FILE).stat().st_mode & 0o077 == 0
    status, text = _verify_cli(tmp_path, capsys)
    assert status == 0, text
    assert "6 entries verify" in text and "tags under the initial key" in text
    assert main(["audit", "show", "--store", str(tmp_path)]) == 0
    shown = capsys.readouterr().out
    assert "trail_started" in shown and "reason=attempt 4" in shown
    assert main(["audit", "show", "--store", str(tmp_path), "--json"]) == 0
    assert '"kind": "authentication_failed"' in capsys.readouterr().out


def test_a_restarted_trail_keeps_its_key_and_file(tmp_path: Path) -> None:
    store, _ = _store_with_trail(tmp_path, entries=1)
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
    store, _ = _store_with_trail(tmp_path)
    store.close()
    moved = tmp_path.parent / "offline-k0"
    (tmp_path / INITIAL_KEY_FILE).rename(moved)
    assert _verify_cli(tmp_path, capsys)[0] == 2
    status, text = _verify_cli(tmp_path, capsys, "--no-initial-key")
    assert status == 0 and "NO tags" in text
    assert _verify_cli(tmp_path, capsys, "--initial-key", str(moved))[0] == 0


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
    store, _ = _store_with_trail(tmp_path)
    store.close()
    _tamper(tmp_path, *statements)
    status, text = _verify_cli(tmp_path, capsys)
    assert status == 1, text
    assert f"BROKEN at entry {named}:" in text


def test_a_rolled_back_store_is_caught_by_the_head_the_peer_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    alice_dir, bob_dir = tmp_path / "alice", tmp_path / "bob"
    alice, alice_trail = _store_with_trail(alice_dir, entries=2)
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
    assert _verify_cli(alice_dir, capsys, "--peer-store", str(bob_dir))[0] == 0
    (alice_dir / DATABASE_NAME).write_bytes(snapshot)
    assert _verify_cli(alice_dir, capsys)[0] == 0  # consistent in itself
    status, text = _verify_cli(alice_dir, capsys, "--peer-store", str(bob_dir))
    assert status == 1 and "BROKEN at entry 3: missing" in text


def test_the_peer_notes_a_head_that_goes_backwards(tmp_path: Path) -> None:
    store, trail = _store_with_trail(tmp_path, entries=0)
    trail.peer_head_received(PeerHead(seq=5, chain_hash=b"\x01" * 32))
    trail.peer_head_received(PeerHead(seq=6, chain_hash=b"\x02" * 32))
    assert read_trail(tmp_path).records[-1].entry().kind == "trail_started"
    trail.peer_head_received(PeerHead(seq=3, chain_hash=b"\x03" * 32))
    last = read_trail(tmp_path).records[-1].entry()
    assert last.kind == "peer_trail_rolled_back"
    assert (last.fields["seq_before"], last.fields["seq_now"]) == (6, 3)
    store.close()


# ---- crash safety -----------------------------------------------------------------------------


def test_a_failed_transaction_leaves_neither_entry_nor_state_change(tmp_path: Path) -> None:
    store, trail = _store_with_trail(tmp_path, entries=2)

    def fails(_tx: object) -> None:
        raise ValueError("the recorded change failed")

    with pytest.raises(ValueError):
        store.run(trail.around(StoreOp(fails), AuditKind.KEYS_DELIVERED, lambda _: {}))
    outcome = store.run_batch(
        [trail.around(StoreOp(fails), AuditKind.KEYS_DELIVERED, lambda _: {})]
    )
    assert outcome[0].error is not None
    trail.record(AuditKind.ROTATED, mode="key-derived")
    store.close()
    stored = read_trail(tmp_path)
    summary = verify_trail(
        stored.records,
        initial_key=read_initial_key(tmp_path / INITIAL_KEY_FILE),
        stored_state=stored.state,
    )
    assert summary.entries == 4


_APPEND_FOREVER = """
import sys
from pathlib import Path
from qkdnode.audit import AuditKind
from qkdnode.store import KeyStore
from qkdnode.store.audit import AuditTrail
directory = Path(sys.argv[1])
store = KeyStore.open(directory, node_name="alice")
trail = AuditTrail.start(store, node_name="alice")
print("ready", flush=True)
i = 0
while True:
    trail.record(AuditKind.SAE_REQUEST_REFUSED, sae="sae-x", status=401, i=i)
    i += 1
"""


def test_a_trail_killed_while_appending_verifies(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", _APPEND_FOREVER, str(tmp_path)],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert process.stdout is not None
    try:
        while process.stdout.readline().strip() != b"ready":  # after the start-up log line
            pass
        while len(read_trail(tmp_path).records) < 30:
            pass
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stdout.close()
    stored = read_trail(tmp_path)
    summary = verify_trail(
        stored.records,
        initial_key=read_initial_key(tmp_path / INITIAL_KEY_FILE),
        stored_state=stored.state,
    )
    assert summary.entries >= 30


# ---- forward security and secrecy --------------------------------------------------------------


def test_earlier_evolving_keys_are_gone_from_the_database_files(tmp_path: Path) -> None:
    store, _ = _store_with_trail(tmp_path, entries=20)
    k0 = read_initial_key(tmp_path / INITIAL_KEY_FILE)
    current = read_trail(tmp_path).state
    assert current is not None
    earlier = [k0]
    while len(earlier) < current.next_seq:
        earlier.append(evolve_key(earlier[-1]))
    assert evolve_key(earlier[-1]) == current.key
    files = b"".join(
        path.read_bytes() for path in tmp_path.iterdir() if path.name.startswith(DATABASE_NAME)
    )
    assert current.key in files  # the scan would see a key
    assert [key for key in earlier if key in files] == []
    store.close()


def test_deliveries_recorded_with_key_ids_never_key_material(tmp_path: Path) -> None:
    alice, bob = committed_stores(tmp_path, random_blocks(3, count=2, keys_per_block=4))
    bob.close()
    trail = AuditTrail.start(alice, node_name="alice")
    material = [key.material for key in alice.committed_keys()]
    delivery_ids = [uuid.uuid4() for _ in range(2)]
    reserve(
        alice, parity=0, delivery_ids=delivery_ids, size_bits=256, master_sae="a", slave_sae="b"
    )
    op = alice.take_op(delivery_ids, role="master", master_sae="a", slave_sae="b")
    delivered = alice.run(
        trail.around(
            op,
            AuditKind.KEYS_DELIVERED,
            lambda keys: {"key_ids": tuple(str(k) for k, _ in keys), "master_sae": "a"},
        )
    )
    alice.close()
    stored = read_trail(tmp_path / "alice")
    entry = stored.records[-1].entry()
    assert entry.fields["key_ids"] == tuple(str(d) for d in delivery_ids)
    written = b"".join(r.body + r.tag + r.chain_hash for r in stored.records)
    secrets = material + [key for _, key in delivered]
    windows = {s[i : i + 8] for s in secrets for i in range(len(s) - 7)}
    texts = (written, written.hex().encode())
    assert [w for w in windows if any(w in t or w.hex().encode() in t for t in texts)] == []


# ---- the daemon's hooks -----------------------------------------------------------------------


def test_security_failures_that_end_a_session_are_recorded_and_others_not(tmp_path: Path) -> None:
    store, trail = _store_with_trail(tmp_path, entries=0)
    group = ExceptionGroup(
        "session",
        [
            CertificateRejected("peer certificate expired"),
            ExceptionGroup("inner", [AuthenticationFailed("handshake proof does not verify")]),
            TimeoutError("read timed out"),
        ],
    )
    SessionFailureRecorder(trail, peer="bob")(group)
    store.close()
    entries = [record.entry() for record in read_trail(tmp_path).records[1:]]
    assert [(e.kind, e.fields["reason"]) for e in entries] == [
        ("certificate_rejected", "peer certificate expired"),
        ("authentication_failed", "handshake proof does not verify"),
    ]
    assert all(e.fields["peer"] == "bob" for e in entries)


async def test_refused_sae_requests_and_deliveries_are_recorded(tmp_path: Path) -> None:
    alice, bob = committed_stores(tmp_path, random_blocks(5, count=1, keys_per_block=4))
    bob_manager = KeyManager(bob, master_parity=1, peer_reserve=_never)

    async def peer_reserve(keys: Sequence[DeliveryKey], master: str, slave: str) -> None:
        await bob_manager.record_peer_reservation(keys, master, slave)

    manager = KeyManager(
        alice, master_parity=0, peer_reserve=peer_reserve, local_saes={"a"}, peer_saes={"b"}
    )
    manager.audit = AuditTrail.start(alice, node_name="alice")
    app = DeliveryApp(
        manager=manager,
        limits=ApiLimits(
            key_size_bits=256, min_key_size_bits=64, max_key_size_bits=1024, max_keys_per_request=8
        ),
        kme_id="kme-a",
        peer_kme_id="kme-b",
        local_saes=("a",),
        peer_saes=("b",),
        fair_use=FairUse(FairUsePolicy(keys_per_s=1e6, burst_keys=1e6, key_size_bits=256)),
        max_key_count=1000,
    )
    refused = await app.respond("GET", "/api/v1/keys/b/status", b"", "intruder")
    assert refused.status == 401
    too_many = await app.respond("GET", "/api/v1/keys/b/enc_keys?number=99", b"", "a")
    assert too_many.status == 400
    served = await app.respond("GET", "/api/v1/keys/b/enc_keys?number=1", b"", "a")
    assert served.status == 200
    alice.close()
    bob.close()
    stored = read_trail(tmp_path / "alice")
    verify_trail(
        stored.records,
        initial_key=read_initial_key(tmp_path / "alice" / INITIAL_KEY_FILE),
        stored_state=stored.state,
    )
    entries = [record.entry() for record in stored.records[1:]]
    assert [(e.kind, e.fields.get("sae"), e.fields.get("status")) for e in entries] == [
        ("sae_request_refused", "intruder", 401),
        ("sae_request_refused", "a", 400),
        ("keys_delivered", None, None),
    ]
    delivered = entries[2].fields
    assert (delivered["master_sae"], delivered["slave_sae"], delivered["role"]) == (
        "a",
        "b",
        "master",
    )
    assert delivered["key_ids"] == (json.loads(served.body)["keys"][0]["key_ID"],)


async def _never(keys: object, master_sae: str, slave_sae: str) -> None:
    raise AssertionError("not used")


def test_append_cost_per_entry(tmp_path: Path) -> None:
    """The figure docs/audit.md quotes: one durable entry in its own transaction, and the pure
    append alone (informative; asserts only a loose bound)."""
    store, trail = _store_with_trail(tmp_path, entries=0)
    started = time.perf_counter()
    for i in range(50):
        trail.record(AuditKind.SAE_REQUEST_REFUSED, sae="x", status=401, i=i)
    durable_s = (time.perf_counter() - started) / 50
    state = initial_state(K0)
    started = time.perf_counter()
    for i in range(2000):
        _, state = append_entry(state, AuditKind.ROTATED, {"i": i}, time_s=1.0)
    pure_s = (time.perf_counter() - started) / 2000
    store.close()
    print(f"audit append: {durable_s * 1e3:.2f} ms durable, {pure_s * 1e6:.1f} us pure")
    assert pure_s < 1e-3


def test_the_operators_rebootstrap_permit_is_recorded_while_the_daemon_writes_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workdir = tmp_path / "pair"
    workdir.mkdir(mode=0o700)
    layout = prepare_workdir(workdir, distance_km=25.0, block_pulses=20_000)
    directory = layout.store("alice")
    # the daemon's store open meanwhile: the two writers interleave entries
    store = KeyStore.open(directory, node_name="alice")
    trail = AuditTrail.start(store, node_name="alice")
    trail.record(AuditKind.DAEMON_STARTED, node="alice")
    assert main(["auth", "rebootstrap", "--config", str(layout.config("alice"))]) == 0
    trail.record(AuditKind.REBOOTSTRAP_PERMIT_IN_FORCE, peer="bob")
    store.close()
    kinds = [record.entry().kind for record in read_trail(directory).records]
    assert kinds == [
        "trail_started",
        "daemon_started",
        "rebootstrap_permit_granted",
        "rebootstrap_permit_in_force",
    ]
    capsys.readouterr()
    assert _verify_cli(directory, capsys)[0] == 0


def test_the_audit_head_message_round_trips_and_its_schema_is_strict() -> None:
    head = AuditHead(seq=41, chain_hash=bytes(range(32)))
    kind, body = control_to_wire(head)
    registry = make_registry()
    registry.check(kind, body)
    assert control_from_wire(Control(kind=kind, body=body)) == head
    with pytest.raises(ProtocolError):
        registry.check(kind, {"seq": 41, "chain_hash": bytes(31)})
    with pytest.raises(ProtocolError):
        registry.check(kind, {"seq": -1, "chain_hash": bytes(32)})


def test_a_recording_budget_counts_what_it_leaves_out() -> None:
    budget = RecordingBudget(rate_per_s=0.5, burst=3)
    assert [budget.admit("x", 0.0) for _ in range(5)] == [0, 0, 0, None, None]
    assert budget.admit("y", 0.0) == 0  # its own bucket
    assert budget.admit("x", 1.0) is None  # half a token back
    assert budget.admit("x", 2.0) == 3  # one token: recorded, three left out before it
    assert budget.admit("x", 2.0) is None


def test_a_flood_of_failed_handshakes_is_recorded_with_counts_not_entry_by_entry(
    tmp_path: Path,
) -> None:
    store, trail = _store_with_trail(tmp_path, entries=0)
    now = {"s": 0.0}
    recorder = SessionFailureRecorder(trail, peer="bob", clock=lambda: now["s"])
    for _ in range(100):
        recorder(ExceptionGroup("session", [AuthenticationFailed("bad proof")]))
    now["s"] = 2.0
    recorder(ExceptionGroup("session", [AuthenticationFailed("bad proof")]))
    store.close()
    entries = [record.entry() for record in read_trail(tmp_path).records[1:]]
    assert len(entries) == 21
    assert entries[-1].fields["suppressed_before"] == 80
    assert "suppressed_before" not in entries[0].fields
