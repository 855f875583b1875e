#!/usr/bin/env python3
"""Benchmark of the post-processing core: Cascade reconciliation and Toeplitz privacy amplification.

Usage::

    .venv/bin/python scripts/bench_postprocess.py [--quick] [--n LIST] [--qber LIST]
        [--variant LIST] [--json OUT.json]

Prints a table and writes a JSON list of rows ``{"stage", "variant", "qber", "n", "f", "fer",
"frames", "round_trips", "mbit_s", "peak_mb", ...}``.

- ``stage "cascade"``: frames of n uniformly random bits; Bob's copy passes a binary symmetric
  channel of error rate Q, and Bob's ``qber_estimate`` is Q itself. f = parity bits disclosed /
  (n h(Q_actual)) with Q_actual the realised error fraction of each frame, averaged over frames
  (Martinez-Mateo et al., arXiv:1407.3257, Eq. 1); fer = frames with any residual error / frames;
  round_trips = mean per frame; mbit_s = n * frames / wall seconds of the whole exchange, both
  roles in this single thread, constructors included; permutations are computed fresh by each
  role for each frame (no cache: cold).
- ``stage "pa"``: ``qkdnode.postprocess.amplification.toeplitz_hash`` on 10^6 and 10^7 input
  bits (output n/2); mbit_s is of input bits. Skipped with a note if the module is missing.
- ``stage "baseline"``: ``numpy.sort`` of 10^6 random uint32, as Mbit/s of 10^6 "bits", to
  quote speed ratios against this machine in this run.

peak_mb: ``tracemalloc`` peak of traced allocations (numpy buffers are traced) during one extra
frame run alone, after the timed frames; Python interpreter baseline excluded.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qkdnode.postprocess.cascade import (
    CascadeReconciler,
    CascadeResponder,
    CascadeVariant,
)

Row = dict[str, Any]


def binary_entropy(x: float) -> float:
    if x <= 0.0 or x >= 1.0:
        return 0.0
    return -x * math.log2(x) - (1 - x) * math.log2(1 - x)


def frames_for(n: int, quick: bool) -> int:
    if quick:
        return {10**4: 20, 10**5: 4}.get(n, 1)
    if n <= 10**4:
        return 200
    if n <= 10**5:
        return 50
    return 20


def run_cascade_frame(
    alice: np.ndarray, bob: np.ndarray, seed: bytes, variant: CascadeVariant, qber: float
) -> tuple[CascadeReconciler, CascadeResponder]:
    responder = CascadeResponder(alice, seed=seed, variant=variant)
    reconciler = CascadeReconciler(bob, seed=seed, variant=variant, qber_estimate=qber)
    while (query := reconciler.next_query()) is not None:
        reconciler.receive_answer(responder.answer(query))
    return reconciler, responder


def bench_cascade(variant: CascadeVariant, qber: float, n: int, frames: int, seed: int) -> Row:
    rng = np.random.default_rng(seed)
    efficiencies: list[float] = []
    residual = 0
    rounds = 0
    wall_s = 0.0
    for _ in range(frames):
        alice = rng.integers(0, 2, n, dtype=np.uint8)
        bob = alice ^ (rng.random(n) < qber).astype(np.uint8)
        frame_seed = rng.bytes(32)
        start = time.perf_counter()
        reconciler, responder = run_cascade_frame(alice, bob, frame_seed, variant, qber)
        wall_s += time.perf_counter() - start
        assert reconciler.parity_bits_received == responder.parity_bits_sent
        q_actual = float(np.count_nonzero(alice ^ bob)) / n
        if q_actual > 0:
            efficiencies.append(reconciler.parity_bits_received / (n * binary_entropy(q_actual)))
        residual += int(not np.array_equal(reconciler.corrected_bits, alice))
        rounds += reconciler.round_trips
    # Peak memory of one more frame, alone under tracemalloc (it slows the run: not timed).
    alice = rng.integers(0, 2, n, dtype=np.uint8)
    bob = alice ^ (rng.random(n) < qber).astype(np.uint8)
    tracemalloc.start()
    run_cascade_frame(alice, bob, rng.bytes(32), variant, qber)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "stage": "cascade",
        "variant": variant.value,
        "qber": qber,
        "n": n,
        "f": round(float(np.mean(efficiencies)), 4) if efficiencies else None,
        "fer": residual / frames,
        "frames": frames,
        "round_trips": round(rounds / frames, 1),
        "mbit_s": round(n * frames / wall_s / 1e6, 3),
        "peak_mb": round(peak / 1e6, 1),
        "permutation_cache": "cold",
    }


def _load_toeplitz() -> Callable[..., np.ndarray] | None:
    try:
        from qkdnode.postprocess.amplification import toeplitz_hash
    except ImportError:
        return None
    return toeplitz_hash


def _dense_check(toeplitz_hash: Callable[..., np.ndarray]) -> str:
    """Compare with a dense GF(2) product on a small size under the two usual conventions."""
    rng = np.random.default_rng(77)
    n, m = 300, 120
    bits = rng.integers(0, 2, n, dtype=np.uint8)
    seed_bits = rng.integers(0, 2, n + m - 1, dtype=np.uint8)
    got = np.asarray(toeplitz_hash(bits, seed_bits, m)).astype(np.int64)
    i = np.arange(m)[:, None]
    j = np.arange(n)[None, :]
    for name, index in (("T[i,j]=s[i-j+n-1]", i - j + n - 1), ("T[i,j]=s[j-i+m-1]", j - i + m - 1)):
        dense = seed_bits[index].astype(np.int64)
        if np.array_equal((dense @ bits.astype(np.int64)) % 2, got):
            return f"bit-exact vs dense ({name})"
    return "NOT equal to a dense product under either usual convention: check the convention"


def bench_pa(sizes: list[int]) -> list[Row]:
    toeplitz_hash = _load_toeplitz()
    if toeplitz_hash is None:
        return [
            {
                "stage": "pa",
                "variant": "toeplitz-fft",
                "n": n,
                "skipped": "qkdnode.postprocess.amplification.toeplitz_hash not available",
            }
            for n in sizes
        ]
    check = _dense_check(toeplitz_hash)
    rows = []
    rng = np.random.default_rng(99)
    for n in sizes:
        out = n // 2
        bits = rng.integers(0, 2, n, dtype=np.uint8)
        seed_bits = rng.integers(0, 2, n + out - 1, dtype=np.uint8)
        start = time.perf_counter()
        toeplitz_hash(bits, seed_bits, out)
        wall_s = time.perf_counter() - start
        tracemalloc.start()
        toeplitz_hash(bits, seed_bits, out)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rows.append(
            {
                "stage": "pa",
                "variant": "toeplitz-fft",
                "qber": None,
                "n": n,
                "output_bits": out,
                "f": None,
                "fer": None,
                "frames": 1,
                "round_trips": 0,
                "mbit_s": round(n / wall_s / 1e6, 3),
                "peak_mb": round(peak / 1e6, 1),
                "check": check,
            }
        )
    return rows


def bench_baseline() -> Row:
    values = np.random.default_rng(5).integers(0, 2**32, 10**6, dtype=np.uint32)
    start = time.perf_counter()
    np.sort(values)
    wall_s = time.perf_counter() - start
    return {
        "stage": "baseline",
        "variant": "numpy-sort-1e6-uint32",
        "n": 10**6,
        "mbit_s": round(1.0 / wall_s, 3),
    }


def print_row(row: Row) -> None:
    if row["stage"] == "cascade":
        print(
            f"{row['stage']:9} {row['variant']:15} Q={row['qber']:<5} n={row['n']:<8} "
            f"f={row['f']!s:7} FER={row['fer']:<7.4f} ({row['frames']:>3} frames) "
            f"rt={row['round_trips']:<6} {row['mbit_s']:7.3f} Mbit/s  peak {row['peak_mb']} MB",
            flush=True,
        )
    elif "skipped" in row:
        print(f"{row['stage']:9} {row['variant']:15} n={row['n']:<8} SKIPPED: {row['skipped']}")
    else:
        extra = f"  peak {row.get('peak_mb')} MB  {row.get('check', '')}"
        print(
            f"{row['stage']:9} {row['variant']:15} n={row['n']:<8} {row['mbit_s']:7.3f} Mbit/s"
            + (extra if row["stage"] == "pa" else ""),
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small grid, under a minute")
    parser.add_argument("--n", help="comma-separated frame sizes (default 1e4,1e5,1e6)")
    parser.add_argument("--qber", help="comma-separated error rates (default 0.01,0.02,0.05,0.08)")
    parser.add_argument("--variant", help="comma-separated Cascade variants (default all)")
    parser.add_argument("--no-pa", action="store_true", help="skip privacy amplification rows")
    parser.add_argument("--json", type=Path, help="write the rows to this JSON file")
    args = parser.parse_args(argv)

    if args.n:
        sizes = [int(float(x)) for x in args.n.split(",")]
    else:
        sizes = [10**4, 10**5] if args.quick else [10**4, 10**5, 10**6]
    if args.qber:
        qbers = [float(x) for x in args.qber.split(",")]
    else:
        qbers = [0.02, 0.05] if args.quick else [0.01, 0.02, 0.05, 0.08]
    variants = (
        [CascadeVariant.from_name(x) for x in args.variant.split(",")]
        if args.variant
        else list(CascadeVariant)
    )

    rows: list[Row] = [bench_baseline()]
    print_row(rows[0])
    for n in sizes:
        for qber in qbers:
            for index, variant in enumerate(variants):
                frames = frames_for(n, args.quick)
                row = bench_cascade(variant, qber, n, frames, seed=n + int(qber * 1e4) + index)
                rows.append(row)
                print_row(row)
    if not args.no_pa:
        for row in bench_pa([10**6] if args.quick else [10**6, 10**7]):
            rows.append(row)
            print_row(row)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"wrote {len(rows)} rows to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
