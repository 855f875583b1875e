"""``qkdnode report``: PNG pictures of a node's history and of the simulated link.

Usage::

    qkdnode report --store DIR [--log FILE [--peer NAME]] --out DIR [--no-distance] [--pulses N]
        [--finite-key lim2014-kl|lim2014-chernoff|lim2014]

From the store's ``blocks`` table (committed blocks and their ``stats``) and/or the node's JSON
log (``block.committed`` / ``block.aborted`` events; journald's ``<6>`` prefix is accepted):

- ``key_rate_qber.png``: secret key rate (secret bits of each block over the time since the
  previous block) and QBER over time;
- ``reconciliation_efficiency.png``: f per block (from the log: exact, disclosed parity bits /
  (n h(Q)) with n the reconciled bits; from the store alone: n = sifted bits, a slight
  underestimate, labelled as such);
- ``auth_pool.png``: authentication-key pool level after each block (needs the log);
- ``keyrate_distance.png``: the simulated link's finite-key rate versus distance (``--finite-key``
  selects the analysis, default the pipeline's) next to the analytic curves of that analysis and
  of Lim et al. 2014, and the PLOB bound (see ``qkdnode.ops.keyrate``).

Plots need matplotlib (the optional extra ``plot``); without it ``main`` says so and returns 2.
Nothing secret is read: only the public ``stats`` columns and log fields.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sqlite3
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import numpy as np

from qkdnode.config.link import SimulatedLinkConfig
from qkdnode.ops.keyrate import simulate_keyrate_versus_distance
from qkdnode.postprocess.finitekey import (
    DEFAULT_FINITE_KEY_ANALYSIS,
    FiniteKeyAnalysis,
    binary_entropy,
)

MISSING_MATPLOTLIB: Final = (
    "qkdnode report: matplotlib is not installed; install the optional extra 'plot' "
    "(pip install 'qkdnode[plot]') to draw the PNGs"
)


# ---- the node's history ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockPoint:
    """One block of a node's history (public figures only; None where unknown)."""

    block_id: int
    time_s: float | None
    committed: bool
    qber: float | None = None
    sifted_bits: int | None = None
    secret_bits: int | None = None
    reconciliation_efficiency: float | None = None
    efficiency_exact: bool = False
    pool_level_bits: int | None = None
    abort_reason: str | None = None


def read_store_history(store_dir: Path) -> list[BlockPoint]:
    """Committed blocks from the store's ``blocks`` table, opened read-only."""
    path = store_dir / "keys.db"
    if not path.exists():
        raise FileNotFoundError(f"no key store in {store_dir} (expected {path})")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT block_id, secret_bits, stats FROM blocks WHERE state = 'committed'"
            " ORDER BY block_id"
        ).fetchall()
    finally:
        db.close()
    points = []
    for block_id, secret_bits, stats_text in rows:
        stats = json.loads(stats_text)
        qber = _float(stats.get("qber"))
        sifted = _int(stats.get("sifted_key_bits"))
        leak = _int(stats.get("reconciliation_bits"))
        efficiency = None
        if qber is not None and sifted and leak is not None and 0.0 < qber < 0.5:
            # f = leak / (n h(Q)) (Martinez-Mateo et al., arXiv:1407.3257) with n = sifted
            # bits: the store does not keep the reconciled length, a few per cent shorter
            efficiency = leak / (sifted * binary_entropy(qber))
        points.append(
            BlockPoint(
                block_id=int(block_id),
                time_s=_float(stats.get("time_s")),
                committed=True,
                qber=qber,
                sifted_bits=sifted,
                secret_bits=int(secret_bits),
                reconciliation_efficiency=efficiency,
            )
        )
    return points


def read_log_history(lines: Iterable[str], *, peer: str | None = None) -> list[BlockPoint]:
    """Blocks from JSON log lines (``block.committed`` and ``block.aborted``); other lines and
    lines that are not JSON are skipped. A journald priority prefix (``<6>``) is removed. With
    ``peer``, only the blocks of the link to that peer (a node with several peers logs them all
    in one file, each line with its ``peer``)."""
    points = []
    for line in lines:
        text = line.strip()
        if text.startswith("<") and ">" in text[:4]:
            text = text[text.index(">") + 1 :]
        try:
            event = json.loads(text)
        except json.JSONDecodeError:
            continue
        if not isinstance(event, dict) or event.get("event") not in (
            "block.committed",
            "block.aborted",
        ):
            continue
        block_id = _int(event.get("block"))
        if block_id is None or (peer is not None and event.get("peer") != peer):
            continue
        committed = event["event"] == "block.committed"
        efficiency = _float(event.get("reconciliation_efficiency"))
        points.append(
            BlockPoint(
                block_id=block_id,
                time_s=_timestamp(event.get("timestamp")),
                committed=committed,
                qber=_float(event.get("qber")) if committed else None,
                sifted_bits=_int(event.get("sifted_bits")),
                secret_bits=_int(event.get("secret_bits")),
                reconciliation_efficiency=efficiency,
                efficiency_exact=efficiency is not None,
                pool_level_bits=_int(event.get("pool_level_bits")),
                abort_reason=None if committed else str(event.get("reason")),
            )
        )
    return points


def merge_history(store: Sequence[BlockPoint], log: Sequence[BlockPoint]) -> list[BlockPoint]:
    """One point per block: the log's figures where it has them (exact f, pool level), the
    store's otherwise; sorted by block ID."""
    merged = {point.block_id: point for point in store}
    for point in log:
        known = merged.get(point.block_id)
        if known is None or not point.committed:
            merged[point.block_id] = point if known is None else known
            continue
        merged[point.block_id] = replace(
            known,
            pool_level_bits=point.pool_level_bits,
            reconciliation_efficiency=(
                point.reconciliation_efficiency
                if point.efficiency_exact
                else known.reconciliation_efficiency
            ),
            efficiency_exact=point.efficiency_exact,
            time_s=known.time_s if known.time_s is not None else point.time_s,
        )
    return [merged[block_id] for block_id in sorted(merged)]


def key_rates(points: Sequence[BlockPoint]) -> list[tuple[float, float]]:
    """(time, secret bits/s) per committed block after the first timed one: the block's
    secret bits over the time since the previous block (committed or aborted) ended."""
    timed = sorted((p for p in points if p.time_s is not None), key=lambda p: p.time_s or 0.0)
    rates = []
    for previous, point in itertools.pairwise(timed):
        assert point.time_s is not None and previous.time_s is not None
        elapsed = point.time_s - previous.time_s
        if point.committed and point.secret_bits is not None and elapsed > 0:
            rates.append((point.time_s, point.secret_bits / elapsed))
    return rates


def _float(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return None if math.isnan(value) else float(value)


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _timestamp(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


# ---- drawing ----------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_keyrate_versus_distance(
    points: Sequence[dict[str, Any]],
    curve: Sequence[dict[str, float]],
    pulses: int,
    out: Path,
    analysis: FiniteKeyAnalysis = DEFAULT_FINITE_KEY_ANALYSIS,
) -> list[str]:
    """Write the key rate versus distance to ``out``: the PLOB bound, the theory line of
    ``analysis`` with two decoys and with one, the Lim et al. 2014 theory line beside them
    (unless ``analysis`` is Lim's) and the simulated points. Returns the legend labels drawn."""
    name = FiniteKeyAnalysis(analysis).value
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    km_line = [c["distance_km"] for c in curve]
    ax.semilogy(km_line, [c["plob"] for c in curve], "k--", label="PLOB bound −log2(1−η_fibre)")
    theory = [(c["distance_km"], c["theory"]) for c in curve if c["theory"] > 0]
    if theory:
        ax.semilogy(*zip(*theory, strict=True), "C0-", label=f"{name} theory, N = {pulses:.2e}")
    one_decoy = [
        (c["distance_km"], c["theory_one_decoy"]) for c in curve if c.get("theory_one_decoy", 0) > 0
    ]
    if one_decoy:
        ax.semilogy(*zip(*one_decoy, strict=True), "C1-.", label=f"{name} one decoy, same N")
    lim_theory = [
        (c["distance_km"], c["theory_lim2014"]) for c in curve if c.get("theory_lim2014", 0) > 0
    ]
    if lim_theory and name != FiniteKeyAnalysis.LIM2014.value:
        ax.semilogy(*zip(*lim_theory, strict=True), "C2:", label="lim2014 theory, same N")
    positive = [(p["distance_km"], p["bits_per_pulse"]) for p in points if p["bits_per_pulse"] > 0]
    if positive:
        ax.semilogy(*zip(*positive, strict=True), "C3o", label=f"simulated link → {name} bound")
    floor = min([v for _, v in positive + theory] or [1e-8]) / 10
    zero = [p["distance_km"] for p in points if p["bits_per_pulse"] <= 0]
    if zero:
        ax.plot(zero, [floor] * len(zero), "C3x", label="simulated: no key")
    ax.set_ylim(bottom=floor / 2)
    ax.set_xlim(0, max(km_line))
    ax.set_xlabel("fibre length (km)")
    ax.set_ylabel("secret bits per pulse")
    ax.set_title("Decoy-state BB84, simulated link vs finite-key theory")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    labels = [str(line.get_label()) for line in ax.get_lines()]
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return labels


def _minutes(points: Sequence[tuple[float, float]], start_s: float) -> list[float]:
    return [(t - start_s) / 60 for t, _ in points]


def plot_history(points: Sequence[BlockPoint], out_dir: Path) -> list[Path]:
    """Write the history PNGs that the data allows; return their paths."""
    plt = _pyplot()
    written: list[Path] = []
    timed = [p for p in points if p.time_s is not None]
    start_s = min((p.time_s for p in timed if p.time_s is not None), default=0.0)

    rates = key_rates(points)
    qbers = [
        (p.time_s, p.qber)
        for p in timed
        if p.committed and p.qber is not None and p.time_s is not None
    ]
    aborted = [p.time_s for p in timed if not p.committed and p.time_s is not None]
    if rates or qbers:
        fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(7.5, 6.0))
        if rates:
            top.plot(_minutes(rates, start_s), [r for _, r in rates], "C2o-", ms=4)
        top.set_ylabel("secret key rate (bit/s)")
        top.set_title("Secret key rate and QBER per block")
        top.grid(True, alpha=0.3)
        if qbers:
            bottom.plot(
                [(t - start_s) / 60 for t, _ in qbers],
                [100 * q for _, q in qbers],
                "C3o-",
                ms=4,
                label="QBER",
            )
        if aborted:
            for t in aborted:
                bottom.axvline((t - start_s) / 60, color="k", alpha=0.3, lw=0.8)
            bottom.plot([], [], "k-", alpha=0.3, label="aborted block")
        bottom.set_ylabel("QBER (%)")
        bottom.set_xlabel("time since first block (min)")
        bottom.grid(True, alpha=0.3)
        bottom.legend(fontsize=8)
        fig.tight_layout()
        written.append(out_dir / "key_rate_qber.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)

    efficiency = [p for p in points if p.committed and p.reconciliation_efficiency is not None]
    if efficiency:
        fig, ax = plt.subplots(figsize=(7.5, 4.0))
        for exact, style, label in (
            (True, "C0o", "f (log: n = reconciled bits)"),
            (False, "C1s", "f (store: n = sifted bits, slightly low)"),
        ):
            chosen = [p for p in efficiency if p.efficiency_exact is exact]
            if chosen:
                ax.plot(
                    [p.block_id for p in chosen],
                    [p.reconciliation_efficiency for p in chosen],
                    style,
                    label=label,
                )
        ax.axhline(1.0, color="k", ls="--", lw=1, label="Slepian–Wolf limit f = 1")
        ax.set_xlabel("block")
        ax.set_ylabel("reconciliation efficiency f")
        ax.set_title("Reconciliation efficiency per block")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(out_dir / "reconciliation_efficiency.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)

    pool = [p for p in points if p.pool_level_bits is not None]
    if pool:
        fig, ax = plt.subplots(figsize=(7.5, 4.0))
        ax.step([p.block_id for p in pool], [p.pool_level_bits for p in pool], "C4-", where="post")
        ax.plot([p.block_id for p in pool], [p.pool_level_bits for p in pool], "C4o", ms=4)
        ax.set_xlabel("block")
        ax.set_ylabel("pool level (bits)")
        ax.set_title("Authentication-key pool level after each block")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        written.append(out_dir / "auth_pool.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


# ---- the command ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qkdnode report", description="PNG plots of a node's history and of the link."
    )
    parser.add_argument("--store", type=Path, help="the node's store directory")
    parser.add_argument("--log", type=Path, help="the node's JSON log file")
    parser.add_argument(
        "--peer", help="the blocks of the link to this peer only (a node with several peers)"
    )
    parser.add_argument("--out", type=Path, required=True, help="directory for the PNGs")
    parser.add_argument(
        "--no-distance", action="store_true", help="skip the key rate versus distance plot"
    )
    parser.add_argument(
        "--pulses", type=int, default=1 << 24, help="simulated pulses per distance (2^24)"
    )
    parser.add_argument("--max-km", type=float, default=150.0)
    parser.add_argument(
        "--finite-key",
        choices=[a.value for a in FiniteKeyAnalysis],
        default=DEFAULT_FINITE_KEY_ANALYSIS.value,
        help="decoy analysis to size the key with (Lim 2014 is drawn beside it)",
    )
    parser.add_argument("--step-km", type=float, default=10.0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``qkdnode report``: 0 on success, 2 on a usage error or missing matplotlib."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.store is None and args.log is None and args.no_distance:
        parser.error("nothing to plot: give --store and/or --log, or drop --no-distance")
    if args.pulses <= 0 or args.step_km <= 0 or args.max_km < 0:
        parser.error("--pulses and --step-km must be positive, --max-km not negative")
    try:
        _pyplot()
    except ImportError:
        print(MISSING_MATPLOTLIB, file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        store = read_store_history(args.store) if args.store is not None else []
        log: list[BlockPoint] = []
        if args.log is not None:
            with args.log.open(encoding="utf-8", errors="replace") as handle:
                log = read_log_history(handle, peer=args.peer)
    except (OSError, sqlite3.Error, json.JSONDecodeError) as exc:
        print(f"qkdnode report: cannot read the history: {exc}", file=sys.stderr)
        return 2
    written: list[Path] = []
    if args.store is not None or args.log is not None:
        points = merge_history(store, log)
        if not points:
            print("qkdnode report: no blocks in the history yet", file=sys.stderr)
        written += plot_history(points, args.out)
    if not args.no_distance:
        distances = list(np.arange(0.0, args.max_km + 1e-9, args.step_km))
        curve_km = list(np.arange(0.0, args.max_km + 1e-9, min(1.0, args.step_km)))
        analysis = FiniteKeyAnalysis(args.finite_key)
        points_km, curve = simulate_keyrate_versus_distance(
            SimulatedLinkConfig(),
            distances_km=distances,
            curve_km=curve_km,
            pulses=args.pulses,
            analysis=analysis,
        )
        written.append(args.out / "keyrate_distance.png")
        plot_keyrate_versus_distance(points_km, curve, args.pulses, written[-1], analysis)
        (args.out / "keyrate_distance.json").write_text(
            json.dumps({"points": points_km, "curve": curve}, indent=2) + "\n"
        )
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
