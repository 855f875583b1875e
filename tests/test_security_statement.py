"""Every committed key's security statement: the ledger's sums, the statement, its alerts."""

from __future__ import annotations

import numpy as np
import pytest
import structlog.testing

from qkdnode.channel.auth import Role
from qkdnode.channel.ledger import (
    AuthKeyLedger,
    LedgerState,
    ledger_state_from_bytes,
    ledger_state_to_bytes,
)
from qkdnode.channel.messages import SessionMode
from qkdnode.config.auth import MIN_ROTATION_POOL_BITS
from qkdnode.coordination.events import CommitBlock, CoordinatorConfig, PeerMessage, SessionStarted
from qkdnode.coordination.machine import Coordinator
from qkdnode.coordination.planner import AuthPlanner
from qkdnode.coordination.security import key_security_statement
from qkdnode.coordination.wire import SyncReply
from qkdnode.node.reporting import BlockReporter
from qkdnode.ops.status import health_problems
from qkdnode.ops.systemd import SystemdNotifier
from qkdnode.postprocess.pipeline import BlockKey
from qkdnode.simulation.store_model import StoreModel
from qkdnode.simulation.stub import _statistics
from tests.helpers_metrics import commit, key_derived_authentication, make_metrics, value

BLOCK_EPSILON = 1.01e-10


def _ledger() -> AuthKeyLedger:
    return AuthKeyLedger(target_bits=8192, reserve_bits=1024)


def test_a_deposit_charges_its_key_epsilon_only_when_it_takes_bits() -> None:
    ledger = _ledger()
    ledger.deposit(bytes(2048), mark_consumed_bits=0, key_epsilon=BLOCK_EPSILON)
    assert ledger.tag_key_epsilon == pytest.approx(BLOCK_EPSILON)
    ledger.deposit(bytes(2048), mark_consumed_bits=0, key_epsilon=BLOCK_EPSILON)
    assert ledger.tag_key_epsilon == pytest.approx(2 * BLOCK_EPSILON)  # slots were taken
    # nothing taken (a key too short for a slot, the pool full): nothing charged
    ledger.deposit(bytes(16), mark_consumed_bits=0, key_epsilon=0.5)
    assert ledger.tag_key_epsilon == pytest.approx(2 * BLOCK_EPSILON)


def test_the_sums_survive_the_store_and_an_older_state_loads_with_zero() -> None:
    ledger = _ledger()
    ledger.deposit(bytes(2048), mark_consumed_bits=0, key_epsilon=BLOCK_EPSILON)
    ledger.record_tags(2, 1e-30)
    restored = ledger_state_from_bytes(ledger_state_to_bytes(ledger.state))
    assert restored.tag_key_epsilon == ledger.tag_key_epsilon
    assert restored.forgery_bound == ledger.forgery_bound
    old = ledger_state_to_bytes(ledger.state).replace(b"tag_key_epsilon", b"tag_key_epsilox")
    with pytest.raises(Exception, match="corrupt"):
        ledger_state_from_bytes(old)  # an unknown field is refused, not ignored
    import msgpack

    values = msgpack.unpackb(ledger_state_to_bytes(ledger.state), raw=False)
    del values["tag_key_epsilon"]
    assert ledger_state_from_bytes(msgpack.packb(values)).tag_key_epsilon == 0.0
    assert "e-" in repr(restored) and "pool=" not in repr(restored)


def test_a_key_derived_statement_sums_block_forgeries_and_tag_keys() -> None:
    state = LedgerState(
        target_bits=8192, reserve_bits=1024, forgery_bound=4e-31, tag_key_epsilon=3e-10
    )
    statement = key_security_statement(
        mode=SessionMode.KEY_DERIVED, ledger=state, block_epsilon=BLOCK_EPSILON, chain_root="pki"
    )
    assert statement.epsilon_total == pytest.approx(BLOCK_EPSILON + 4e-31 + 3e-10)
    assert (statement.epsilon_tag_forgery, statement.epsilon_tag_keys) == (4e-31, 3e-10)
    fields = statement.fields()
    assert fields["authentication"] == "key_derived" and fields["chain_root"] == "pki"
    assert fields["computational_root"] is True


def test_a_bootstrap_statement_has_no_information_theoretic_tag_terms() -> None:
    state = LedgerState(target_bits=8192, reserve_bits=1024, forgery_bound=1e-3)
    for mode in (SessionMode.CERTIFICATE, SessionMode.PSK):
        statement = key_security_statement(
            mode=mode, ledger=state, block_epsilon=BLOCK_EPSILON, chain_root="psk"
        )
        assert statement.epsilon_total == BLOCK_EPSILON
        assert statement.epsilon_tag_forgery == statement.epsilon_tag_keys == 0.0
    with pytest.raises(ValueError, match="block_epsilon"):
        key_security_statement(
            mode=SessionMode.PSK, ledger=state, block_epsilon=1.0, chain_root="psk"
        )


def test_the_machine_charges_each_committed_block_to_the_tag_keys() -> None:
    store = StoreModel()
    store.stage_block(
        5, key_ids=[], consumer_keys=[], pool_material=bytes(range(256)) * 4, ledger_mark_bits=0
    )
    alice = Coordinator(
        Role.ALICE,
        config=CoordinatorConfig(
            key_size_bits=256,
            block_epsilon=BLOCK_EPSILON,
            rotation_pool_bits=MIN_ROTATION_POOL_BITS,
        ),
        ledger=_ledger(),
        store=store,
        planner=AuthPlanner(Role.ALICE),
        random_bytes=np.random.default_rng(5).bytes,
    )
    alice.receive(SessionStarted(mode=SessionMode.PSK))
    effects = alice.receive(
        PeerMessage(message=SyncReply(staged=(), committed=(5,), last_block_id=5))
    )
    (commit,) = [e for e in effects if isinstance(e, CommitBlock)]
    assert commit.ledger_state.tag_key_epsilon == pytest.approx(BLOCK_EPSILON)


def _reporter(budget: float) -> BlockReporter:
    return BlockReporter(
        metrics=make_metrics(),
        notifier=SystemdNotifier(),
        ledger=_ledger(),
        key_size_bits=256,
        security_budget_epsilon=budget,
    )


def _report(reporter: BlockReporter, block_id: int, tag_keys: float) -> None:
    state = LedgerState(target_bits=8192, reserve_bits=1024, tag_key_epsilon=tag_keys)
    statement = key_security_statement(
        mode=SessionMode.KEY_DERIVED, ledger=state, block_epsilon=BLOCK_EPSILON, chain_root="pki"
    )
    auth = key_derived_authentication(block_id)
    key = BlockKey(key=np.zeros(512, dtype=np.uint8), statistics=_statistics(512))
    reporter.block_done(block_id, key, auth, keys=2, pool_bytes=0, statement=statement)


def test_the_block_log_and_metrics_report_the_statement_and_alert_past_the_budget() -> None:
    reporter = _reporter(budget=1e-9)
    with structlog.testing.capture_logs() as logs:
        _report(reporter, 1, tag_keys=5e-10)
        _report(reporter, 2, tag_keys=2e-9)  # past the budget: one warning
        _report(reporter, 3, tag_keys=3e-9)  # still past it: no second warning
        _report(reporter, 4, tag_keys=0.0)  # back under it (a new chain)
        _report(reporter, 5, tag_keys=4e-9)  # past it again: warned again
    committed = [entry for entry in logs if entry["event"] == "block.committed"]
    assert [entry["epsilon_total"] for entry in committed] == pytest.approx(
        [BLOCK_EPSILON + t for t in (5e-10, 2e-9, 3e-9, 0.0, 4e-9)]
    )
    assert all(entry["chain_root"] == "pki" for entry in committed)
    warnings = [entry for entry in logs if entry["event"] == "security.budget_exceeded"]
    assert [entry["block"] for entry in warnings] == [2, 5]
    assert all(entry["log_level"] == "warning" for entry in warnings)
    metrics = reporter.metrics
    assert value(metrics, "qkdnode_key_security_epsilon") == pytest.approx(BLOCK_EPSILON + 4e-9)
    assert value(metrics, "qkdnode_key_security_budget_epsilon") == 1e-6  # make_metrics' default
    summary = metrics.summary()
    assert summary["key_epsilon"] == pytest.approx(BLOCK_EPSILON + 4e-9)


def test_status_is_unhealthy_past_the_budget_and_while_the_pool_is_exhausted() -> None:
    metrics = make_metrics()
    commit(metrics)
    metrics.set_peer_connected(True)
    metrics.key_security(5e-7)
    assert metrics.summary()["problems"] == []
    metrics.key_security(2e-6)
    assert any("security budget" in p for p in metrics.summary()["problems"])
    metrics.key_security(1e-7)
    metrics.set_pool_exhausted(True)
    problems = metrics.summary()["problems"]
    assert any("exhausted" in p and "qkdnode auth rebootstrap" in p for p in problems)
    assert value(metrics, "qkdnode_auth_pool_exhausted") == 1
    # a committed block means a block opened again
    commit(metrics)
    assert value(metrics, "qkdnode_auth_pool_exhausted") == 0
    assert health_problems(metrics.summary(), max_commit_age_s=600.0) == []


def test_a_key_derived_pool_under_half_its_rotation_margin_warns_once_per_crossing() -> None:
    ledger = AuthKeyLedger(target_bits=65_536, reserve_bits=1024)
    reporter = BlockReporter(
        metrics=make_metrics(),
        notifier=SystemdNotifier(),
        ledger=ledger,
        key_size_bits=256,
        security_budget_epsilon=1e-6,
        rotation_pool_bits=8192,  # low below 4,096 bits above the reserve
    )
    key = BlockKey(key=np.zeros(512, dtype=np.uint8), statistics=_statistics(512))

    def commit_with_headroom(block_id: int, headroom_bits: int) -> None:
        level = ledger.level_bits - ledger.state.reserve_bits
        if level > headroom_bits:
            ledger.draw(level - headroom_bits, "test")
        elif level < headroom_bits:
            ledger.deposit(bytes(4096), mark_consumed_bits=ledger.consumed_bits)
            ledger.draw(ledger.level_bits - ledger.state.reserve_bits - headroom_bits, "test")
        reporter.block_done(
            block_id, key, key_derived_authentication(block_id), keys=2, pool_bytes=0
        )

    with structlog.testing.capture_logs() as logs:
        reporter.mode_changed("certificate", "session established")
        ledger.close_bootstrap_window()
        commit_with_headroom(1, 2048)  # low, but the session has not rotated: no warning
        reporter.mode_changed("key_derived", "rotated")
        commit_with_headroom(2, 8192)
        commit_with_headroom(3, 4096)  # exactly half: not low
        commit_with_headroom(4, 4088)  # low: warned
        commit_with_headroom(5, 1024)  # still low: no second warning
        commit_with_headroom(6, 16384)  # refilled
        commit_with_headroom(7, 0)  # low again: warned again
    warnings = [entry for entry in logs if entry["event"] == "auth.pool_low"]
    assert [entry["block"] for entry in warnings] == [4, 7]
    assert warnings[-1]["pool_level_bits"] == 1024 and warnings[-1]["log_level"] == "warning"
    assert "postprocess.block_pulses" in warnings[0]["detail"]
