#!/usr/bin/env python3
"""Benchmark of the post-processing core: Cascade reconciliation and Toeplitz privacy amplification.

Usage::

    .venv/bin/python scripts/bench_postprocess.py [--quick] [--n LIST] [--qber LIST]
        [--variant LIST] [--frames-10k N] [--frames N] [--json OUT.json]

Prints a table and writes a JSON list of rows ``{"stage", "variant", "qber", "n", "f", "f_se",
"fer", "fer_upper95", "frames", "round_trips", "mbit_s", "alice_ms", "bob_ms", "peak_mb", ...}``.

- ``stage "cascade"``: frames of n uniformly random bits; Bob's copy passes a binary symmetric
  channel of error rate Q, and Bob's ``qber_estimate`` is Q itself. f = parity bits disclosed /
  (n h(Q_actual)) with Q_actual the realised error fraction of each frame, averaged over frames
  (Martinez-Mateo et al., arXiv:1407.3257, Eq. 1); fer = frames with any residual error / frames;
  f_se = standard error of that mean (sample std / sqrt(frames)); fer_upper95 = one-sided 95 %
  Clopper-Pearson upper bound on the FER from (failures, frames) (0 failures in N frames gives
  1 - 0.05**(1/N) ~ 3/N); round_trips = mean per frame; mbit_s = n * frames / wall seconds of the
  whole exchange, both roles in this single thread, constructors included; alice_ms / bob_ms =
  mean per frame of the time spent inside the responder / the reconciler (constructor and every
  call); permutations are computed fresh by each role for each frame (no cache: cold).
  ``--frames-10k N`` runs N frames at every n <= 10^4 (FER evidence), ``--frames N`` everywhere
  else.
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


def fer_upper95(failures: int, frames: int) -> float:
    """One-sided 95 % Clopper-Pearson upper bound p with P(X <= failures | frames, p) = 0.05."""
    if failures >= frames:
        return 1.0

    def cdf(p: float) -> float:
        return sum(
            math.comb(frames, k) * p**k * (1.0 - p) ** (frames - k) for k in range(failures + 1)
        )

    low, high = failures / frames, 1.0
    for _ in range(60):  # bisection: cdf decreases in p
        middle = (low + high) / 2
        low, high = (middle, high) if cdf(middle) > 0.05 else (low, middle)
    return high


def run_cascade_frame(
    alice: np.ndarray,
    bob: np.ndarray,
    seed: bytes,
    variant: CascadeVariant,
    qber: float,
    role_s: list[float] | None = None,
) -> tuple[CascadeReconciler, CascadeResponder]:
    """Both roles to the end; adds [responder seconds, reconciler seconds] to ``role_s``."""
    clock = time.perf_counter
    t0 = clock()
    responder = CascadeResponder(alice, seed=seed, variant=variant)
    t1 = clock()
    reconciler = CascadeReconciler(bob, seed=seed, variant=variant, qber_estimate=qber)
    t2 = clock()
    alice_s, bob_s = t1 - t0, t2 - t1
    while True:
        t0 = clock()
        query = reconciler.next_query()
        t1 = clock()
        bob_s += t1 - t0
        if query is None:
            break
        answer = responder.answer(query)
        t2 = clock()
        reconciler.receive_answer(answer)
        t3 = clock()
        alice_s += t2 - t1
        bob_s += t3 - t2
    if role_s is not None:
        role_s[0] += alice_s
        role_s[1] += bob_s
    return reconciler, responder


def bench_cascade(variant: CascadeVariant, qber: float, n: int, frames: int, seed: int) -> Row:
    rng = np.random.default_rng(seed)
    efficiencies: list[float] = []
    residual = 0
    rounds = 0
    wall_s = 0.0
    role_s = [0.0, 0.0]
    for _ in range(frames):
        alice = rng.integers(0, 2, n, dtype=np.uint8)
        bob = alice ^ (rng.random(n) < qber).astype(np.uint8)
        frame_seed = rng.bytes(32)
        start = time.perf_counter()
        reconciler, responder = run_cascade_frame(alice, bob, frame_seed, variant, qber, role_s)
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
        "f_se": (
            round(float(np.std(efficiencies, ddof=1) / math.sqrt(len(efficiencies))), 4)
            if len(efficiencies) > 1
            else None
        ),
        "fer": residual / frames,
        "fer_upper95": round(fer_upper95(residual, frames), 6),
        "frames": frames,
        "round_trips": round(rounds / frames, 1),
        "mbit_s": round(n * frames / wall_s / 1e6, 3),
        "alice_ms": round(role_s[0] / frames * 1e3, 2),
        "bob_ms": round(role_s[1] / frames * 1e3, 2),
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
            f"f={row['f']!s:7}±{row['f_se']!s:7} FER={row['fer']:<7.4f} "
            f"(<{row['fer_upper95']:.1e} @95%, {row['frames']:>4} frames) "
            f"rt={row['round_trips']:<7} {row['mbit_s']:7.3f} Mbit/s "
            f"(alice {row['alice_ms']} ms, bob {row['bob_ms']} ms /frame) "
            f"peak {row['peak_mb']} MB",
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
    parser.add_argument("--frames-10k", type=int, help="frames per row at n <= 10^4 (FER runs)")
    parser.add_argument("--frames", type=int, help="frames per row at n > 10^4")
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
                if n <= 10**4 and args.frames_10k:
                    frames = args.frames_10k
                elif n > 10**4 and args.frames:
                    frames = args.frames
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
