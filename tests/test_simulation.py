"""The deterministic simulation: its store model against the SQLite store, a short run of many
seeds, and the seeds that expose today's authentication defects (expected to fail, strictly,
until the coordination is fixed)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qkdnode.errors import KeyStoreError
from qkdnode.simulation.__main__ import main as simulate_main
from qkdnode.simulation.settings import RunReport, SimSettings
from qkdnode.simulation.store_model import StoreModel
from qkdnode.simulation.world import simulate_run
from qkdnode.store import KeyStore, StagedBlock

# ---- the store model behaves as the SQLite store ---------------------------------------------


class _SqliteAdapter:
    """The SQLite store behind the store model's operations."""

    def __init__(self, store: KeyStore) -> None:
        self.store = store

    def stage_block(self, block_id: int, **fields: Any) -> None:
        self.store.stage_block(
            StagedBlock(
                block_id=block_id,
                first_pulse_index=block_id,
                pulse_count=1,
                consumer_keys=list(zip(fields["key_ids"], fields["consumer_keys"], strict=True)),
                key_size_bits=256,
                auth_pool_material=fields["pool_material"],
                ledger_mark_bits=fields["ledger_mark_bits"],
                stats_json="{}",
            )
        )

    def commit_block(self, block_id: int, *, auth_ledger_state: bytes | None = None) -> None:
        self.store.commit_block(block_id, auth_ledger_state=auth_ledger_state)

    def drop_block(self, block_id: int) -> None:
        self.store.drop_block(block_id)

    def save_auth_ledger(self, state: bytes) -> None:
        self.store.save_auth_ledger(state)

    def block_state(self, block_id: int) -> str | None:
        state = self.store.block_state(block_id)
        return None if state is None else state.value

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def _observe(store: Any) -> tuple[object, ...]:
    """Everything the coordination reads of a store, for comparison."""
    states = tuple((b, store.block_state(b)) for b in range(6))
    staged = tuple(
        (m.pool_material, m.consumer_material, m.ledger_mark_bits)
        for m in (store.staged_material(b) for b in store.staged_block_ids())
    )
    return (
        states,
        tuple(store.staged_block_ids()),
        store.last_block_id(),
        store.load_auth_ledger(),
        staged,
    )


def _operations(seed: int) -> list[tuple[str, int, dict[str, Any]]]:
    import random

    rng = random.Random(seed)
    ops: list[tuple[str, int, dict[str, Any]]] = []
    for _ in range(40):
        block_id = rng.randrange(6)
        kind = rng.choice(["stage", "stage", "commit", "drop", "ledger"])
        if kind == "stage":
            count = rng.randrange(0, 3)
            # fresh key IDs: a reused one is refused by the model, and stops the SQLite store
            ids = [uuid.UUID(int=rng.getrandbits(128), version=4) for _ in range(count)]
            ops.append(
                (
                    "stage",
                    block_id,
                    {
                        "key_ids": ids,
                        "consumer_keys": [rng.randbytes(32) for _ in ids],
                        "pool_material": rng.randbytes(rng.choice([0, 16])),
                        "ledger_mark_bits": 8 * rng.randrange(100),
                    },
                )
            )
        elif kind == "ledger":
            ops.append(("ledger", 0, {"state": rng.randbytes(8)}))
        else:
            ops.append(
                (kind, block_id, {"state": rng.randbytes(8) if rng.random() < 0.5 else None})
            )
    return ops


def _apply(target: Any, kind: str, block_id: int, fields: dict[str, Any]) -> str:
    """One operation on a store; "refused" when it raises ``KeyStoreError``."""
    try:
        if kind == "stage":
            target.stage_block(block_id, **fields)
        elif kind == "commit":
            target.commit_block(block_id, auth_ledger_state=fields["state"])
        elif kind == "drop":
            target.drop_block(block_id)
        else:
            target.save_auth_ledger(fields["state"])
    except KeyStoreError:
        return "refused"
    return "ok"


@pytest.mark.parametrize("seed", range(6))
def test_the_store_model_passes_the_same_operation_sequences_as_the_sqlite_store(
    seed: int, tmp_path: Path
) -> None:
    model = StoreModel()
    sqlite = KeyStore.open(tmp_path / "store", node_name="alice")
    real = _SqliteAdapter(sqlite)
    try:
        for kind, block_id, fields in _operations(seed):
            outcomes = [_apply(target, kind, block_id, fields) for target in (model, real)]
            assert outcomes[0] == outcomes[1], (kind, block_id)
            assert _observe(model) == _observe(real), (kind, block_id)
    finally:
        sqlite.close()


# ---- a short simulation in the default run ---------------------------------------------------


@pytest.mark.parametrize("in_flight", [1, 4])
def test_a_short_simulation_breaks_no_invariant_and_commits(in_flight: int) -> None:
    reports = [simulate_run(seed, SimSettings(in_flight=in_flight)) for seed in range(100)]
    sessions = sum(r.sessions for r in reports)
    committing = sum(r.committing_sessions for r in reports)
    assert sum(r.faults_injected for r in reports) > 100
    assert [v for r in reports for v in r.violations] == []
    assert committing / sessions >= 0.5, (committing, sessions)


def test_the_script_writes_one_row_per_setting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    out = tmp_path / "rows.json"
    status = simulate_main(["--runs", "3", "--seed", "30", "--in-flight", "1", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [r["runs"] for r in rows] == [3]
    assert set(rows[0]) >= {
        "runs",
        "steps",
        "sessions",
        "committing_fraction",
        "faults_injected",
        "downgrades",
        "auth_bits_reused",
        "store_disagreements",
        "liveness_failures",
        "seconds",
    }
    printed = capsys.readouterr().out
    assert status == 0 and "first" not in printed  # no invariant broken, nothing to replay


# ---- the authentication defects the simulation found ---------------------------------------
# Each test searches the seeds, in order, for the first run whose trace shows the situation
# that exposed a defect (so the test never passes vacuously), and replays it asserting the
# invariant the defect broke.


def _first_run(settings: SimSettings, shows: Callable[[list[str]], bool]) -> RunReport:
    for seed in range(400):
        report = simulate_run(seed, settings, trace=True)
        if shows(report.trace):
            return report
    raise AssertionError("no seed shows the situation: the simulation no longer reaches it")


def _cut_before_key_derived_handshake(trace: list[str]) -> bool:
    dialled = {line.split()[2] for line in trace if "key_derived=True" in line}
    done = {line.split()[3] for line in trace if "handshake alice" in line}
    cut = {
        line.split()[3].rstrip(":")
        for line in trace
        if line.split()[1:3] == ["end", "alice"]
        and ("connection lost" in line or "timeout" in line or "crash" in line)
    }
    return bool((dialled - done) & cut)


@pytest.mark.parametrize(
    ("faults", "cause"),
    [
        (("cut",), "connection lost"),
        (("drop",), "timeout"),
        (("crash_alice", "crash_bob"), "crash"),
    ],
)
def test_no_reset_timeout_or_crash_after_the_first_commit_brings_bootstrap_back(
    faults: tuple[str, ...], cause: str
) -> None:
    # after the first commit, sessions end by resets, by timeouts (a dropped frame leaves the
    # peer waiting) or by crashes, and the next ones are key-derived
    def shows(trace: list[str]) -> bool:
        committed = next((i for i, t in enumerate(trace) if "commit" in t), None)
        return committed is not None and any(cause in t for t in trace[committed:])

    report = _first_run(SimSettings(faults=faults, fault_probability=0.1), shows)
    assert report.downgrades == 0, report.violations
    assert report.liveness_failures == 0, report.violations
    assert any("key_derived" in t and "handshake alice" in t for t in report.trace)


# blocks of 32 kbit: the first commit closes the window (its pool share pays the rotation and
# two blocks) but the bootstrap session goes on for two more before the pool holds the
# rotation margin (65,792 bits above the 16,384-bit reserve)
SMALL_BLOCK_BITS = 32_768


@pytest.mark.parametrize(
    ("faults", "cause"),
    [
        (("cut",), "connection lost"),
        (("drop",), "timeout"),
        (("crash_alice", "crash_bob"), "crash"),
    ],
)
def test_a_reset_timeout_or_crash_before_the_rotation_comes_back_key_derived(
    faults: tuple[str, ...], cause: str
) -> None:
    # the window closed at the first commit; the session that closed it ends by a reset, a
    # timeout or a crash before it rotates, and every later session is key-derived
    def shows(trace: list[str]) -> bool:
        committed = next((i for i, t in enumerate(trace) if "commit" in t), None)
        return committed is not None and any(
            cause in t for t in trace[committed : _rotation(trace)]
        )

    settings = SimSettings(key_bits=SMALL_BLOCK_BITS, faults=faults, fault_probability=0.1)
    report = _first_run(settings, shows)
    assert report.downgrades == 0 and report.liveness_failures == 0, report.violations
    committed = next(i for i, t in enumerate(report.trace) if "commit" in t)
    handshakes = [t for t in report.trace[committed:] if "handshake alice" in t]
    assert handshakes and all(t.endswith("key_derived") for t in handshakes)


@pytest.mark.parametrize("in_flight", [1, 4])
def test_blocks_smaller_than_the_rotation_margin_break_no_invariant(in_flight: int) -> None:
    settings = SimSettings(key_bits=SMALL_BLOCK_BITS, in_flight=in_flight)
    reports = [simulate_run(seed, settings, trace=True) for seed in range(60)]
    assert [v for r in reports for v in r.violations] == []
    # the bootstrap session commits more than one block before it rotates
    assert any(
        sum("commit" in t and "on alice" in t for t in r.trace[: _rotation(r.trace)]) > 1
        for r in reports
    )


def _rotation(trace: list[str]) -> int:
    return next((i for i, t in enumerate(trace) if "rotated" in t), len(trace))


def test_a_reset_after_the_key_derived_hello_never_brings_bootstrap_back() -> None:
    # after rotation, a cut or crash ends Alice's key-derived attempt before its handshake
    settings = SimSettings(faults=("cut", "crash_alice", "crash_bob", "drop"))
    report = _first_run(settings, _cut_before_key_derived_handshake)
    assert report.downgrades == 0, report.violations
    assert report.liveness_failures == 0, report.violations


def test_no_handshake_key_is_used_under_two_transcripts_or_as_a_block_key() -> None:
    # a stranger's key-derived Hello claiming an offset ahead of Bob's, then blocks commit
    settings = SimSettings(faults=("attacker_hello", "cut"), fault_probability=0.2)
    report = _first_run(
        settings,
        lambda trace: (
            any("attacker hello" in t and "ahead_bits=0" not in t for t in trace)
            and any("handshake alice" in t and "key_derived" in t for t in trace)
        ),
    )
    assert report.auth_bits_reused == 0, report.violations
    assert report.liveness_failures == 0, report.violations


def test_a_cut_inside_the_two_phase_commit_ends_in_limbo_resolution() -> None:
    # a cut or crash between Alice's commit and Bob's: the next session commits it on Bob
    settings = SimSettings(faults=("cut", "crash_alice", "crash_bob", "drop"), in_flight=4)
    report = _first_run(settings, lambda trace: any("limbo commit" in t for t in trace))
    assert report.violations == []


def test_a_newer_session_ends_the_one_before_it_before_limbo_is_resolved() -> None:
    # Alice crashes with frames of her session still in flight; Bob's stale session must not
    # stage them after the new session resolved limbo (the stores would then differ for good)
    settings = SimSettings(faults=("delay", "crash_alice"), fault_probability=0.1, in_flight=4)
    report = _first_run(settings, lambda trace: any("superseded" in t for t in trace))
    assert report.violations == []
    assert report.liveness_failures == 0


@pytest.mark.parametrize(
    ("seed", "in_flight", "situation"),
    [
        # Bob's stale session staged a delayed block after the new session's limbo sync
        (13045, 4, "superseded"),
        # a forged HelloReply named a key far ahead; Alice used to burn every key below it
        (17773, 1, "fault forge"),
        # Bob crashed after each handshake before his advanced offset was persisted
        (4749, 4, "crash bob"),
    ],
)
def test_the_seeds_that_found_the_last_defects_replay_clean(
    seed: int, in_flight: int, situation: str
) -> None:
    # seeds of the 10^5-session runs that found a lasting outage
    report = simulate_run(seed, SimSettings(in_flight=in_flight), trace=True)
    assert any(situation in t for t in report.trace)
    assert report.violations == [] and report.liveness_failures == 0
