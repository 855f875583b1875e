"""The block log's timing: round trips inside a block and the time in the node's own role."""

from __future__ import annotations

import pytest
import structlog

from qkdnode.channel.ledger import AuthKeyLedger
from qkdnode.node.reporting import BlockReporter, nearest_rank
from qkdnode.ops.systemd import SystemdNotifier
from qkdnode.postprocess.events import AbortReason, BlockAborted
from tests.helpers_metrics import FakeClock, key_derived_authentication, make_metrics


def test_a_round_trip_runs_from_a_reply_to_the_peers_next_turn() -> None:
    clock = FakeClock()
    reporter = BlockReporter(
        metrics=make_metrics(),
        notifier=SystemdNotifier(),
        ledger=AuthKeyLedger(target_bits=4096, reserve_bits=512),
        key_size_bits=256,
        security_budget_epsilon=1e-6,
        clock=clock,
    )
    # (time, call): Bob starts, asks twice, then a turn ends without a reply
    steps = [
        (0.000, "called"),
        (0.010, "replied"),
        (0.013, "called"),  # 3 ms after his reply: one round trip
        (0.014, "replied"),
        (0.020, "called"),  # 6 ms
        (0.021, "silent"),
        (0.500, "called"),  # no reply was waiting: not a round trip
        (0.600, "replied"),
    ]
    for at_s, call in steps:
        clock.now = 1000.0 + at_s
        if call == "called":
            reporter.role_called(7)
        else:
            reporter.role_returned(7, replied=call == "replied")
    with structlog.testing.capture_logs() as logs:
        reporter.block_done(
            7,
            BlockAborted(reason=AbortReason.PEER_ABORTED),
            key_derived_authentication(7),
            keys=0,
            pool_bytes=0,
        )
    (turns,) = [entry for entry in logs if entry["event"] == "block.turns"]
    assert turns["round_trip_ms"] == pytest.approx([3.0, 6.0])
    assert turns["role_s"] == pytest.approx(0.010 + 0.001 + 0.001 + 0.100)
    (aborted,) = [entry for entry in logs if entry["event"] == "block.aborted"]
    assert aborted["round_trip_ms_p50"] == pytest.approx(3.0)
    assert aborted["round_trip_ms_p99"] == pytest.approx(6.0)


def test_nearest_rank_percentiles() -> None:
    values = [float(v) for v in range(1, 101)]
    assert nearest_rank(values, 0.5) == 50.0
    assert nearest_rank(values, 0.99) == 99.0
    assert nearest_rank(values[:1], 0.99) == 1.0
    assert nearest_rank([], 0.5) != nearest_rank([], 0.5)  # nan
