"""A node's metrics with a fake clock, and readers of its exposition (shared by the metrics,
status, security-statement and block-log tests)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from qkdnode.channel.connection import BlockAuthenticated
from qkdnode.channel.messages import SessionMode
from qkdnode.ops.metrics import NodeMetrics


def key_derived_authentication(block_id: int) -> BlockAuthenticated:
    """A block's authentication as the channel reports it (key-derived, one frame each way)."""
    return BlockAuthenticated(
        block_id=block_id,
        mode=SessionMode.KEY_DERIVED,
        ledger_mark_bits=0,
        auth_bits_spent=0,
        frames_sent=1,
        frames_received=1,
        forgery_bound_total=0.0,
    )


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_metrics(clock: FakeClock | None = None) -> NodeMetrics:
    clock = clock or FakeClock()
    return NodeMetrics(
        node="alice",
        peer="bob",
        role="alice",
        pool_target_bits=32768,
        pool_reserve_bits=4096,
        saes=("sae-a", "sae-b"),
        rate_window_s=100.0,
        max_commit_age_s=600.0,
        clock=clock,
        wall_clock=lambda: 1.7e9 + clock.now,
    )


def samples(metrics: NodeMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition, parsed by prometheus_client's own text parser."""
    text = metrics.exposition().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(metrics: NodeMetrics, name: str, **labels: str) -> float:
    return samples(metrics)[(name, tuple(sorted(labels.items())))]


def commit(metrics: NodeMetrics, **overrides: object) -> None:
    args: dict[str, object] = {
        "qber": 0.02,
        "sifted_bits": 200_000,
        "leak_bits": 12_000,
        "reconciliation_efficiency": 1.08,
        "secret_bits": 50_000,
        "pool_level_bits": 32768,
        "mode": SessionMode.KEY_DERIVED,
    }
    args.update(overrides)
    metrics.block_committed(**args)  # type: ignore[arg-type]
