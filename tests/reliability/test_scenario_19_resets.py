"""Scenarios 19 and 21 (short): two daemon processes behind the proxy, after rotation one TCP
reset at each boundary (after Alice's key-derived Hello, after Bob's reply, after the handshake,
after the limbo sync, mid-block, after each of stage / staged / commit / committed), each
followed by a key-derived commit on both nodes. No session and no block in bootstrap mode, no
ledger reset (log and stored ledger), stores agree. The same with a kill -9 of Alice or Bob at
each handshake and commit boundary. ``scripts/soak_resets --resets 100 [--crash both]`` runs the
long version with the same checks.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import msgpack
import pytest

from tests.reliability.resets import (
    BOUNDARIES,
    HANDSHAKE_BOUNDARIES,
    LedgerWatch,
    _violations,
    hello_mode,
    run_resets,
)

RESETS_PER_BOUNDARY = 1


@pytest.mark.slow  # starts daemon processes; about 60 s
def test_resets_at_every_boundary_never_bring_bootstrap_back(tmp_path: Path) -> None:
    report = run_resets(
        tmp_path / "pair",
        RESETS_PER_BOUNDARY,
        list(BOUNDARIES),
        boundary_timeout_s=90.0,
        recover_blocks=1,
    )
    rows = {r.boundary: r for r in report.results}
    assert list(rows) == list(BOUNDARIES)
    for boundary, row in rows.items():
        assert row.resets == RESETS_PER_BOUNDARY, (boundary, row.problems)
        assert row.hellos >= 1 or boundary not in HANDSHAKE_BOUNDARIES, boundary
        assert row.bootstrap_hellos == 0, (boundary, row.problems)
        assert row.bootstrap_sessions == 0, (boundary, row.problems)
        assert row.bootstrap_blocks == 0, (boundary, row.problems)
        assert row.ledger_resets == 0, (boundary, row.problems)
        assert row.commits_after >= 1, (boundary, row.problems)
        assert not row.problems, (boundary, row.problems)
    assert report.ledger_samples > 0
    assert not report.ledger_problems
    assert not report.store_problems
    assert report.exit_codes == {"alice": 0, "bob": 0}


CRASH_BOUNDARIES = ["hello", "hello_reply", "finish", "mid_block", "commit", "committed"]


@pytest.mark.slow  # starts daemon processes; about 70 s
def test_kill_9_at_handshake_and_commit_boundaries_never_brings_bootstrap_back(
    tmp_path: Path,
) -> None:
    """A crash of either node (kill -9 at the boundary, then a restart) at the handshake and
    two-phase commit boundaries: the restarted node comes back key-derived, the stored ledgers
    never go back, the stores agree."""
    report = run_resets(
        tmp_path / "pair",
        2,
        CRASH_BOUNDARIES,
        boundary_timeout_s=120.0,
        recover_blocks=1,
        crash=("alice", "bob"),
    )
    for row in report.results:
        assert row.resets == row.crashes == 2, (row.boundary, row.problems)
        assert row.bootstrap_hellos == row.bootstrap_sessions == row.bootstrap_blocks == 0, (
            row.boundary,
            row.problems,
        )
        assert row.ledger_resets == 0 and row.commits_after >= 1, (row.boundary, row.problems)
        assert not row.problems, (row.boundary, row.problems)
    assert not report.ledger_problems
    assert not report.store_problems
    assert report.exit_codes == {"alice": 0, "bob": 0}


class _Events:
    def __init__(self, alice: list[dict[str, Any]], bob: list[dict[str, Any]]) -> None:
        self.events = {"alice": alice, "bob": bob}


def test_the_checks_see_a_bootstrap_session_block_ledger_reset_and_exhausted_pool() -> None:
    """The checks the run relies on flag what they must (so the test above can fail)."""
    alice: list[dict[str, Any]] = [
        {"event": "channel.session_established", "mode": "key_derived"},
        {"event": "channel.session_established", "mode": "certificate"},
        {"event": "block.committed", "block": 7, "mode": "certificate", "auth_mode": "certificate"},
        {"event": "block.committed", "block": 8, "mode": "key_derived", "auth_mode": "key_derived"},
    ]
    bob = [{"event": "auth.ledger_reset"}, {"event": "auth.pool_exhausted"}]
    pair: Any = _Events(alice, bob)
    sessions, blocks, resets, details = _violations(pair, {"alice": 0, "bob": 0})
    assert (sessions, blocks, resets) == (1, 1, 1)
    assert len(details) == 4 and "bob auth.pool_exhausted" in details[-1]
    assert _violations(pair, {"alice": 4, "bob": 2}) == (0, 0, 0, [])


def test_the_ledger_watch_sees_a_counter_going_back() -> None:
    from qkdnode.channel.ledger import LedgerState

    watch = LedgerWatch()
    states = iter(
        [
            LedgerState(target_bits=1, reserve_bits=0, consumed_bits=100, active=True),
            LedgerState(target_bits=1, reserve_bits=0, consumed_bits=0, active=False),
        ]
    )
    watch.check("alice", next(states))
    assert not watch.problems
    watch.check("alice", next(states))
    assert any("went back" in p for p in watch.problems)
    assert any("inactive" in p for p in watch.problems)


SMALL_BLOCK_PULSES = 1_000_000  # about 1.2 kbit of key per block at 5 km
SMALL_POOL_TARGET_BITS = 1 << 16  # the bootstrap fills it in about 50 such blocks


@pytest.mark.slow  # starts daemon processes; about 1 min
# blocks of about 1.2 kbit of key: each still deposits a handshake slot, and the bootstrap
# session fills the pool to the rotation margin first, so a reset right after rotation (which
# costs the block in flight) is followed by key-derived blocks again, not by an exhausted pool
def test_small_blocks_recover_from_a_reset_after_rotation(tmp_path: Path) -> None:
    report = run_resets(
        tmp_path / "pair",
        1,
        ["hello"],
        boundary_timeout_s=120.0,  # a loaded machine: the daemons' back-off and admission
        recover_blocks=1,
        block_pulses=SMALL_BLOCK_PULSES,
        pool_target_bits=SMALL_POOL_TARGET_BITS,
    )
    (row,) = report.results
    assert row.bootstrap_sessions == row.bootstrap_blocks == row.ledger_resets == 0
    assert row.commits_after >= 1, row.problems
    assert not row.problems, row.problems


def test_hello_mode_reads_the_mode_of_a_hello_frame() -> None:
    from qkdnode.channel.framing import pack_frame
    from tests.reliability.proxy import CODES, Frame

    for mode in ("key_derived", "certificate"):
        payload = msgpack.packb({"protocol_version": 2, "mode": mode}, use_bin_type=True)
        header = struct.pack(">BQQ", CODES["hello"], 0, 2**64 - 1)
        raw = pack_frame(header, payload, b"")
        frame = Frame(1, "a2b", 0, CODES["hello"], 0, 2**64 - 1, raw)
        assert hello_mode(frame) == mode
