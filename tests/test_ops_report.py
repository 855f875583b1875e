"""qkdnode report: PNGs from a synthetic store and log, and the key rate versus distance."""

from __future__ import annotations

import json
import math
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from qkdnode.ops import report
from qkdnode.store import KeyStore, StagedBlock
from qkdnode.store.keystore import DATABASE_NAME

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
T0 = 1_800_000_000.0


def h(x: float) -> float:
    return -x * math.log2(x) - (1 - x) * math.log2(1 - x)


def make_store(directory: Path, rng: np.random.Generator) -> list[dict[str, object]]:
    """Four committed blocks and one staged one; returns the committed blocks' stats."""
    store = KeyStore.open(directory, node_name="alice")
    written = []
    try:
        for block_id in range(1, 6):
            stats = {
                "qber": 0.01 + 0.002 * block_id,
                "sifted_key_bits": 200_000 + 1000 * block_id,
                "final_key_bits": 60_000,
                "reconciliation_bits": 12_000 + 100 * block_id,
                "verification_bits": 64,
                "mode": "key_derived",
                "time_s": T0 + 10.0 * block_id,
            }
            keys = [(uuid.UUID(int=block_id * 1000 + i), rng.bytes(32)) for i in range(block_id)]
            store.stage_block(
                StagedBlock(
                    block_id=block_id,
                    first_pulse_index=block_id * 1_000_000,
                    pulse_count=1_000_000,
                    consumer_keys=keys,
                    key_size_bits=256,
                    auth_pool_material=rng.bytes(16),
                    stats_json=json.dumps(stats),
                )
            )
            if block_id < 5:
                store.commit_block(block_id)
                written.append(stats)
    finally:
        store.close()
    return written


def log_lines() -> list[str]:
    def stamp(seconds: float) -> str:
        return datetime.fromtimestamp(T0 + seconds, UTC).isoformat().replace("+00:00", "Z")

    events = [
        {"event": "daemon.ready", "timestamp": stamp(0)},
        *(
            {
                "event": "block.committed",
                "block": block,
                "qber": 0.01 + 0.002 * block,
                "sifted_bits": 200_000 + 1000 * block,
                "secret_bits": 256 * block,
                "reconciliation_efficiency": 1.05 + 0.01 * block,
                "pool_level_bits": 32768 - 1024 * block,
                "timestamp": stamp(10.0 * block),
            }
            for block in (1, 2, 4)
        ),
        {
            "event": "block.aborted",
            "block": 3,
            "reason": "qber_above_threshold",
            "timestamp": stamp(30.0),
        },
    ]
    # one line as journald gets it, one that is not JSON at all
    lines = [json.dumps(e) for e in events]
    lines[1] = "<6>" + lines[1]
    return [*lines, "Traceback (most recent call last):"]


def test_store_history_matches_the_blocks_table(tmp_path: Path) -> None:
    written = make_store(tmp_path / "store", np.random.default_rng(5))
    points = report.read_store_history(tmp_path / "store")
    assert [p.block_id for p in points] == [1, 2, 3, 4]  # the staged block 5 is left out
    for point, stats in zip(points, written, strict=True):
        assert point.qber == stats["qber"]
        assert point.secret_bits == 256 * point.block_id
        n, q, leak = stats["sifted_key_bits"], stats["qber"], stats["reconciliation_bits"]
        assert isinstance(n, int) and isinstance(q, float) and isinstance(leak, int)
        assert point.reconciliation_efficiency == pytest.approx(leak / (n * h(q)))
        assert not point.efficiency_exact


def test_log_history_and_merge(tmp_path: Path) -> None:
    make_store(tmp_path / "store", np.random.default_rng(6))
    log = report.read_log_history(log_lines())
    assert [(p.block_id, p.committed) for p in log] == [(1, True), (2, True), (4, True), (3, False)]
    assert log[0].time_s == pytest.approx(T0 + 10.0)
    assert log[3].abort_reason == "qber_above_threshold"
    merged = report.merge_history(report.read_store_history(tmp_path / "store"), log)
    by_id = {p.block_id: p for p in merged}
    assert by_id[2].reconciliation_efficiency == pytest.approx(1.07) and by_id[2].efficiency_exact
    assert by_id[2].pool_level_bits == 32768 - 2048
    assert by_id[3].committed and not by_id[3].efficiency_exact  # store knows it committed
    # rates: each block's secret bits over the 10 s since the previous block
    rates = report.key_rates(merged)
    assert rates == [(T0 + 10.0 * b, 256 * b / 10.0) for b in (2, 3, 4)]


def test_log_history_of_one_link_of_a_node_with_several_peers() -> None:
    def tagged(peer: str, line: str) -> str:
        return json.dumps(json.loads(line.removeprefix("<6>")) | {"peer": peer})

    events = [line for line in log_lines() if line.lstrip("<6>").startswith("{")]
    lines = [tagged("a", line) for line in events[1:3]] + [tagged("c", line) for line in events]
    assert [p.block_id for p in report.read_log_history(lines, peer="a")] == [1, 2]
    assert [p.block_id for p in report.read_log_history(lines, peer="c")] == [1, 2, 4, 3]
    assert len(report.read_log_history(lines)) == 6


def _is_png(path: Path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data.startswith(PNG_SIGNATURE)


@pytest.mark.slow  # runs long
def test_report_writes_history_pngs(tmp_path: Path) -> None:
    make_store(tmp_path / "store", np.random.default_rng(7))
    log_file = tmp_path / "node.log"
    log_file.write_text("\n".join(log_lines()) + "\n")
    out = tmp_path / "out"
    code = report.main(
        [
            "--store",
            str(tmp_path / "store"),
            "--log",
            str(log_file),
            "--out",
            str(out),
            "--no-distance",
        ]
    )
    assert code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["auth_pool.png", "key_rate_qber.png", "reconciliation_efficiency.png"]
    assert all(_is_png(out / name) for name in names)


def test_report_from_the_store_alone_has_no_pool_plot(tmp_path: Path) -> None:
    make_store(tmp_path / "store", np.random.default_rng(8))
    out = tmp_path / "out"
    assert (
        report.main(["--store", str(tmp_path / "store"), "--out", str(out), "--no-distance"]) == 0
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "key_rate_qber.png",
        "reconciliation_efficiency.png",
    ]


def test_report_refuses_a_missing_store(tmp_path: Path) -> None:
    assert not (tmp_path / DATABASE_NAME).exists()
    code = report.main(["--store", str(tmp_path), "--out", str(tmp_path / "o"), "--no-distance"])
    assert code == 2


@pytest.mark.slow  # runs long
def test_keyrate_versus_distance_png_and_plob_curve(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = report.main(
        ["--out", str(out), "--pulses", str(1 << 20), "--max-km", "20", "--step-km", "20"]
    )
    assert code == 0
    assert _is_png(out / "keyrate_distance.png")
    data = json.loads((out / "keyrate_distance.json").read_text())
    assert [p["distance_km"] for p in data["points"]] == [0.0, 20.0]
    for c in data["curve"][1:]:
        # PLOB repeaterless bound (Pirandola et al. 2017): -log2(1 - eta), eta = 10^(-0.2 L / 10)
        eta = 10 ** (-0.2 * c["distance_km"] / 10)
        assert c["plob"] == pytest.approx(-math.log2(1 - eta))
        assert c["theory"] < c["plob"]
    for point in data["points"]:
        assert point["key_basis_sifted"] > 0
        assert 0.0 < point["key_basis_qber"] < 0.05
