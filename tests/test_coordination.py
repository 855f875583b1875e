"""The coordination machine, without trio: its rules, and two machines driven against each other.

Two nodes' machines over the production channel, ledgers and a store model are what the
deterministic simulation runs; with faults off, every seeded run must distil, rotate and keep
both stores equal (a property over seeds), with one and with four blocks in flight.
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkdnode.channel.auth import BLOCK_DRAW_BITS, ROTATION_KEY_BITS, Role
from qkdnode.channel.connection import BlockAuthenticated
from qkdnode.channel.ledger import AuthKeyLedger
from qkdnode.channel.messages import Control, SessionMode
from qkdnode.config.auth import MIN_ROTATION_POOL_BITS
from qkdnode.coordination.events import (
    AnnounceRotation,
    CommitBlock,
    CoordinatorConfig,
    OpenBlock,
    PeerBlockData,
    PeerMessage,
    PeerOpenedBlock,
    PrefetchRecords,
    RecordsTaken,
    RoleAdvanced,
    SendControl,
    SessionStarted,
    StopRequested,
    TakeRecords,
)
from qkdnode.coordination.machine import (
    Coordinator,
    Phase,
    split_block_key,
)
from qkdnode.coordination.planner import (
    AttemptDecision,
    AuthPlanner,
)
from qkdnode.coordination.wire import (
    BlockInfo,
    Commit,
    LedgerReset,
    Stage,
    Sync,
    SyncDone,
    SyncReply,
    TurnHeader,
    control_from_wire,
    control_to_wire,
)
from qkdnode.errors import ProtocolError
from qkdnode.postprocess.pipeline import BlockKey
from qkdnode.simulation.settings import SimSettings
from qkdnode.simulation.store_model import StoreModel
from qkdnode.simulation.stub import _statistics
from qkdnode.simulation.world import simulate_run


def _machine(
    role: Role, store: StoreModel | None = None, *, rotation_pool_bits: int = MIN_ROTATION_POOL_BITS
) -> Coordinator:
    return Coordinator(
        role,
        config=CoordinatorConfig(key_size_bits=256, rotation_pool_bits=rotation_pool_bits),
        ledger=AuthKeyLedger(target_bits=8192, reserve_bits=1024),
        store=store if store is not None else StoreModel(),
        planner=AuthPlanner(role),
        random_bytes=np.random.default_rng(5).bytes,
    )


def _running_bob() -> Coordinator:
    bob = _machine(Role.BOB)
    bob.receive(SessionStarted(mode=SessionMode.PSK))
    bob.receive(PeerMessage(message=Sync(staged=(), last_block_id=0)))
    bob.receive(PeerMessage(message=SyncDone(committed=())))
    assert bob.phase is Phase.RUNNING
    return bob


@settings(max_examples=12, deadline=None, derandomize=True)
@given(seed=st.integers(min_value=0, max_value=2**31), in_flight=st.sampled_from([1, 4]))
def test_without_faults_two_machines_commit_rotate_and_agree(seed: int, in_flight: int) -> None:
    report = simulate_run(
        seed,
        SimSettings(
            in_flight=in_flight, fault_probability=0.0, warmup_steps_max=600, fault_steps_max=1
        ),
    )
    assert report.violations == []
    assert report.sessions >= 1 and report.committing_sessions >= 1


def test_a_seed_replays_step_for_step() -> None:
    first = simulate_run(9, SimSettings(), trace=True)
    again = simulate_run(9, SimSettings(), trace=True)
    assert first.trace == again.trace and first.faults_injected > 0
    assert (first.steps, first.sessions, first.violations) == (
        again.steps,
        again.sessions,
        again.violations,
    )


def test_alice_syncs_limbo_blocks_first_and_resolves_them_in_block_order() -> None:
    store = StoreModel()
    for block_id in (3, 5):
        # each block's share fills the (empty) pool: 32 bytes, no consumer key
        store.stage_block(
            block_id,
            key_ids=[],
            consumer_keys=[],
            pool_material=bytes(32),
            ledger_mark_bits=0,
        )
    alice = _machine(Role.ALICE, store)
    (sync,) = alice.receive(SessionStarted(mode=SessionMode.PSK))
    assert sync == SendControl(message=Sync(staged=(3, 5), last_block_id=5))
    effects = alice.receive(
        PeerMessage(message=SyncReply(staged=(5,), committed=(5,), last_block_id=7))
    )
    names = [type(e).__name__ for e in effects]
    # Bob's limbo block 5 is staged here, not committed: Alice says she committed none of his
    assert effects[0] == SendControl(message=SyncDone(committed=()))
    assert names[1:3] == ["DropBlock", "CommitBlock"]  # block 3 dropped, block 5 committed
    # then, no pool to rotate with: block 8 (after the higher of both last ids) opens
    assert names[3:] == ["OpenBlock", "TakeRecords"]
    assert effects[-1] == TakeRecords(block_id=8, first_pulse_index=None)


def test_bob_refuses_what_no_rule_accepts_and_the_session_ends() -> None:
    bob = _running_bob()
    with pytest.raises(ProtocolError):
        bob.receive(PeerMessage(message=Commit(block_id=9)))  # no such block in flight
    assert bob.ended
    bob = _running_bob()
    assert bob.receive(PeerOpenedBlock(block_id=1)) == [PrefetchRecords(block_id=1)]
    with pytest.raises(ProtocolError, match="not valid in phase info"):
        bob.receive(PeerBlockData(block_id=1, message=TurnHeader(messages=1)))
    bob = _running_bob()
    bob.receive(PeerOpenedBlock(block_id=1))
    bob.receive(PeerBlockData(block_id=1, message=BlockInfo(first_pulse_index=0, pulse_count=9)))
    with pytest.raises(ProtocolError):  # a stage before the block is even authenticated
        bob.receive(PeerMessage(message=Stage(block_id=1, key_ids=(), pool_bytes=0)))


def test_a_stop_lets_the_block_in_flight_finish_and_opens_no_new_one() -> None:
    bob = _running_bob()
    bob.receive(PeerOpenedBlock(block_id=1))
    assert bob.receive(StopRequested()) == []  # block 1 still in flight: not idle
    assert bob.blocks_in_flight == (1,)


def test_the_pool_share_and_consumer_keys_split_the_same_on_both_sides() -> None:
    ledger = AuthKeyLedger(target_bits=1024, reserve_bits=0)
    key = BlockKey(
        key=np.random.default_rng(8).integers(0, 2, 4096, dtype=np.uint8),
        statistics=_statistics(4096),
    )
    pool, consumer = split_block_key(ledger, key, mark_bits=0, key_size_bits=256)
    # the pool's 1024 bits, then eight 256-bit handshake-key slots, then 256-bit consumer keys
    assert len(pool) == 128 + 8 * 32 and len(consumer) == (4096 - 1024 - 8 * 256) // 256
    assert ledger.level_bits == 0  # computed on a copy


def test_the_planner_never_downgrades_and_bootstraps_only_for_an_operator() -> None:
    planner = AuthPlanner(Role.ALICE)
    first = planner.next_connection(ledger_active=True)
    tried_key_derived = planner.last_attempt_key_derived
    # the attempt never completed its handshake: key-derived again, nothing forced
    second = planner.next_connection(ledger_active=True)
    assert first == (False, AttemptDecision.NONE) and tried_key_derived
    assert second == (False, AttemptDecision.KEY_DERIVED_REFUSED)
    assert planner.last_attempt_key_derived
    planner.operator_rebootstrap = True
    assert planner.next_connection(ledger_active=True) == (True, AttemptDecision.REBOOTSTRAP)
    assert not planner.last_attempt_key_derived


@pytest.mark.parametrize(
    "message",
    [
        Sync(staged=(1, 2), last_block_id=9),
        SyncReply(staged=(), committed=(4,), last_block_id=0),
        Stage(block_id=3, key_ids=(uuid.UUID(int=7),), pool_bytes=16),
        Commit(block_id=2**63 - 1),
    ],
)
def test_coordination_messages_round_trip_through_the_wire_form(message: object) -> None:
    kind, body = control_to_wire(message)  # type: ignore[arg-type]
    assert control_from_wire(Control(kind=kind, body=body)) == message


def test_a_limbo_block_the_ledger_cannot_take_as_staged_leaves_the_ledger_untouched() -> None:
    store = StoreModel()
    # staged with an 8-byte pool share, but the (empty) ledger would take all 40 bytes
    store.stage_block(
        5,
        key_ids=[uuid.UUID(int=1)],
        consumer_keys=[bytes(32)],
        pool_material=bytes(8),
        ledger_mark_bits=0,
    )
    bob = _machine(Role.BOB, store)
    bob.receive(SessionStarted(mode=SessionMode.PSK))
    bob.receive(PeerMessage(message=Sync(staged=(), last_block_id=5)))
    before = bob.ledger.state
    with pytest.raises(ProtocolError, match="limbo block 5"):
        bob.receive(PeerMessage(message=SyncDone(committed=(5,))))
    assert bob.ledger.state == before and store.block_state(5) == "staged"


# the commit below leaves 7,680 pool bits, 6,656 above the 1,024-bit reserve
@pytest.mark.parametrize(
    ("rotation_pool_bits", "rotates"),
    [(MIN_ROTATION_POOL_BITS, True), (6656, True), (6664, False)],
)
def test_the_first_commit_closes_the_window_and_alice_rotates_once_the_pool_holds_the_margin(
    rotation_pool_bits: int, rotates: bool
) -> None:
    store = StoreModel()
    store.stage_block(
        5, key_ids=[], consumer_keys=[], pool_material=bytes(range(256)) * 4, ledger_mark_bits=0
    )
    alice = _machine(Role.ALICE, store, rotation_pool_bits=rotation_pool_bits)
    assert not alice.ledger.state.active
    alice.receive(SessionStarted(mode=SessionMode.PSK))
    effects = alice.receive(
        PeerMessage(message=SyncReply(staged=(), committed=(5,), last_block_id=5))
    )
    (commit,) = [e for e in effects if isinstance(e, CommitBlock)]
    assert len(commit.ledger_state.pool) * 8 - commit.ledger_state.reserve_bits == 6656
    # the window is closed in the very state the commit persists, not before it, whatever the
    # margin: the next connection is key-derived
    assert commit.ledger_state.active and alice.ledger.active
    # this session rotates now, or goes on with a bootstrap block to fill the pool
    assert any(isinstance(e, AnnounceRotation) for e in effects) is rotates
    assert any(isinstance(e, OpenBlock) for e in effects) is not rotates


def test_a_first_commit_that_cannot_pay_a_rotation_and_two_blocks_leaves_the_window_open() -> None:
    store = StoreModel()
    # 256 bytes: 224 to the pool (1,792 bits, 768 above the reserve) and one handshake slot
    store.stage_block(
        5, key_ids=[], consumer_keys=[], pool_material=bytes(range(256)), ledger_mark_bits=0
    )
    alice = _machine(Role.ALICE, store)
    alice.receive(SessionStarted(mode=SessionMode.PSK))
    effects = alice.receive(
        PeerMessage(message=SyncReply(staged=(), committed=(5,), last_block_id=5))
    )
    (commit,) = [e for e in effects if isinstance(e, CommitBlock)]
    assert alice.ledger.holds_handshake_key
    assert not commit.ledger_state.active and not alice.ledger.active
    assert not any(isinstance(e, AnnounceRotation) for e in effects)


def test_the_coordinator_refuses_a_rotation_pool_below_a_rotation_and_two_blocks() -> None:
    with pytest.raises(ValueError, match="rotation_pool_bits"):
        CoordinatorConfig(key_size_bits=256, rotation_pool_bits=MIN_ROTATION_POOL_BITS - 8)
    assert MIN_ROTATION_POOL_BITS == ROTATION_KEY_BITS + 2 * BLOCK_DRAW_BITS


@pytest.mark.parametrize("reused", ["key_ids", "block_id"])
def test_bob_refuses_a_stage_that_reuses_a_stored_id_and_the_store_is_untouched(
    reused: str,
) -> None:
    stored_id = uuid.UUID(int=42)
    store = StoreModel()
    store.stage_block(
        0, key_ids=[stored_id], consumer_keys=[bytes(32)], pool_material=b"", ledger_mark_bits=0
    )
    store.commit_block(0)
    # the peer opens a block under an id the store already holds (dropped), or a fresh one
    block_id = 1
    if reused == "block_id":
        store.drop_block(block_id)
    bob = _machine(Role.BOB, store)
    bob.receive(SessionStarted(mode=SessionMode.PSK))
    bob.receive(PeerMessage(message=Sync(staged=(), last_block_id=0)))
    bob.receive(PeerMessage(message=SyncDone(committed=())))
    bob.receive(PeerOpenedBlock(block_id=block_id))
    bob.receive(
        PeerBlockData(block_id=block_id, message=BlockInfo(first_pulse_index=0, pulse_count=9))
    )
    bob.receive(RecordsTaken(block_id=block_id, first_pulse_index=0, pulse_count=9))
    bits = np.random.default_rng(3).integers(0, 2, 24_000, dtype=np.uint8)
    key = BlockKey(key=bits, statistics=_statistics(bits.shape[0]))
    bob.receive(RoleAdvanced(block_id=block_id, messages=(), outcome=key))
    bob.receive(
        BlockAuthenticated(
            block_id=block_id,
            mode=SessionMode.PSK,
            ledger_mark_bits=0,
            auth_bits_spent=0,
            frames_sent=3,
            frames_received=3,
            forgery_bound_total=0.0,
        )
    )
    pool, consumer = split_block_key(bob.ledger, key, mark_bits=0, key_size_bits=256)
    assert len(consumer) >= 2
    key_ids = [uuid.UUID(int=100 + i) for i in range(len(consumer))]
    if reused == "key_ids":
        key_ids[-1] = stored_id  # one id of an earlier block, the rest fresh
    stage = Stage(block_id=block_id, key_ids=tuple(key_ids), pool_bytes=len(pool))
    with pytest.raises(ProtocolError, match="already stored") as refused:
        bob.receive(PeerMessage(message=stage))
    assert refused.value.field == reused and bob.ended
    assert store.block_state(block_id) == ("dropped" if reused == "block_id" else None)
    assert store.committed_keys(0) == ((stored_id, bytes(32)),)


@pytest.mark.parametrize("mode", [SessionMode.PSK, SessionMode.KEY_DERIVED])
def test_a_peers_ledger_reset_is_refused_without_the_operators_permit(mode: SessionMode) -> None:
    """After the first commit only an operator reopens bootstrap: a LedgerReset from the peer,
    in any session this node did not open under a re-bootstrap permit, ends the session and
    leaves the active ledger as it was."""
    bob = _machine(Role.BOB)
    bob.ledger.deposit(bytes(range(256)) * 8, mark_consumed_bits=0)
    bob.ledger.close_bootstrap_window()
    before = bob.ledger.state
    bob.receive(SessionStarted(mode=mode))
    with pytest.raises(ProtocolError, match="ledger reset refused"):
        bob.receive(PeerMessage(message=LedgerReset()))
    assert bob.ended and bob.ledger.state == before and bob.ledger.active


def test_with_the_operators_permit_a_reset_starts_a_new_ledger() -> None:
    bob = Coordinator(
        Role.BOB,
        config=CoordinatorConfig(key_size_bits=256, rotation_pool_bits=MIN_ROTATION_POOL_BITS),
        ledger=AuthKeyLedger(target_bits=8192, reserve_bits=1024),
        store=StoreModel(),
        planner=AuthPlanner(Role.BOB, operator_rebootstrap=True),
        random_bytes=np.random.default_rng(5).bytes,
    )
    bob.ledger.deposit(bytes(range(256)) * 8, mark_consumed_bits=0)
    bob.ledger.close_bootstrap_window()
    bob.receive(SessionStarted(mode=SessionMode.PSK))
    bob.receive(PeerMessage(message=LedgerReset()))
    state = bob.ledger.state
    assert not state.active and state.pool == b"" and state.handshake_deposited == 0
