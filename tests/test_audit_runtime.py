"""The audit trail at run time: a failed or killed transaction leaves a trail that verifies, no
key material is ever written, earlier evolving keys are gone, and the daemon's hooks record
what they must (counted, not entry by entry, under a flood).

The pure construction and tamper detection are in test_audit.py.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest

from qkdnode.audit import (
    AuditKind,
    append_entry,
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
from tests.helpers_audit import K0, store_with_trail, verify_cli
from tests.helpers_store import committed_stores, random_blocks, reserve

# ---- crash safety -----------------------------------------------------------------------------


def test_a_failed_transaction_leaves_neither_entry_nor_state_change(tmp_path: Path) -> None:
    store, trail = store_with_trail(tmp_path, entries=2)

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
    store, _ = store_with_trail(tmp_path, entries=20)
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
    store, trail = store_with_trail(tmp_path, entries=0)
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
    store, trail = store_with_trail(tmp_path, entries=0)
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
    assert verify_cli(directory, capsys)[0] == 0


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
    store, trail = store_with_trail(tmp_path, entries=0)
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
