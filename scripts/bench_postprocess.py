#!/usr/bin/env python3
"""Benchmark of the post-processing core: Cascade reconciliation and Toeplitz privacy amplification.

Usage::

    .venv/bin/python scripts/bench_postprocess.py [--quick] [--n LIST] [--qber LIST]
        [--variant LIST] [--frames-10k N] [--frames N] [--cache cold,warm] [--no-jit-row]
        [--no-pa] [--pa-sizes LIST] [--pa-family LIST] [--json OUT.json]

Prints a table and writes a JSON list of rows ``{"stage", "variant", "qber", "n", "f", "f_se",
"fer", "fer_upper95", "frames", "round_trips", "mbit_s", "alice_ms", "bob_ms", "peak_mb", ...}``.

- ``stage "cascade"``: frames of n uniformly random bits; Bob's copy passes a binary symmetric
  channel of error rate Q, and Bob's ``qber_estimate`` is Q itself. f = parity bits disclosed / (n
  h(Q_actual)) with Q_actual the realised error fraction of each frame, averaged over frames
  (Martinez-Mateo et al., arXiv:1407.3257, Eq. 1); fer = frames with any residual error / frames;
  f_se = standard error of that mean (sample std / sqrt(frames)); fer_upper95 = one-sided 95 %
  Clopper-Pearson upper bound on the FER from (failures, frames) (0 failures in N frames gives 1 -
  0.05**(1/N) ~ 3/N); round_trips = mean per frame; alice_ms / bob_ms = mean per frame of the CPU
  time of this thread spent inside the responder / the reconciler (constructor and every call;
  thread CPU time: other processes' CPU time does not count, their cache and memory traffic
  still does); ``mbit_s`` = n / max(alice, bob)
  per frame, averaged as frames * n / sum of the per-frame maxima: one role per core, as deployed;
  ``mbit_s_median`` = n / the median frame's max(alice, bob) (less sensitive to other processes on
  the machine); ``mbit_s_one_thread`` = n * frames / wall seconds of the whole exchange, both roles
  in this single thread. ``permutation_cache``: ``cold`` = every frame with a fresh seed and an
  empty permutation cache (the first frame of a session: permutations drawn); ``warm`` = every frame
  with the session's seed after one untimed frame (Alice reuses the seed, so the permutations of
  every pass are cached). The compiled kernels are loaded (or compiled) by an untimed small frame of
  every variant before the first row. ``--implementation numpy`` runs the numpy roles kept in the
  tests as the reference (``implementation`` column), for a before/after ratio in the same run.
  ``--frames-10k N`` runs N frames at every n <= 10^4 (FER evidence), ``--frames N`` everywhere
  else.
- ``stage "pa"``: privacy amplification of n input bits to n/2, one row per family and size
  (default 10^6, 10^7, 10^8; ``--pa-sizes``, ``--pa-family``): ``toeplitz-fft-v1``
  (``amplification.toeplitz_hash``) and ``mersenne-gmp-v1``
  (``amplification_mersenne.mersenne_hash``). Each row runs in a fresh subprocess: input and seed
  drawn, one untimed call, then ``repeats`` timed calls (5 / 3 / 1 at <= 10^6 / <= 10^7 / more);
  mbit_s = n / median seconds of a call. ``peak_mb`` = the subprocess's VmHWM (peak resident
  memory; GMP's and FFT buffers included, which tracemalloc misses), ``base_mb`` = its VmRSS
  before the first call (interpreter, numpy, the input of n bytes and the seed), ``maxrss_mb`` =
  ru_maxrss. ``check``: bit-exact against a dense GF(2) product (Toeplitz) or against Python
  integers (Mersenne) on small sizes, in the parent. ``load_1min`` = the 1-minute load average
  when the row started.
- ``stage "jit"``: seconds a fresh interpreter takes to run ``cascade.warmup.compile_kernels`` (one
  small Cascade frame of every variant), with an empty numba cache (``numba_cache "empty"``: every
  kernel compiled) and then with the cache it left (``"filled"``: kernels loaded from disk),
  interpreter start and imports included; ``--no-jit-row`` skips it.
- ``stage "baseline"``: ``numpy.sort`` of 10^6 random uint32, as Mbit/s of 10^6 "bits", to
  quote speed ratios against this machine in this run.

peak_mb of Cascade rows: ``tracemalloc`` peak of traced allocations (numpy buffers are traced)
during one extra frame run alone, after the timed frames; Python interpreter baseline excluded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
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
from qkdnode.postprocess.cascade.permutation import clear_permutation_cache
from qkdnode.postprocess.cascade.warmup import compile_kernels

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
    implementation: str = "compiled",
) -> tuple[Any, Any]:
    """Both roles to the end; adds [responder seconds, reconciler seconds] to ``role_s``.

    ``implementation`` "numpy": the numpy roles the tests keep as the reference.
    """
    responder_class: Any = CascadeResponder
    reconciler_class: Any = CascadeReconciler
    if implementation == "numpy":
        from tests.helpers_cascade_reference import ReferenceReconciler, ReferenceResponder

        responder_class, reconciler_class = ReferenceResponder, ReferenceReconciler
    clock = time.thread_time
    t0 = clock()
    responder = responder_class(alice, seed=seed, variant=variant)
    t1 = clock()
    reconciler = reconciler_class(bob, seed=seed, variant=variant, qber_estimate=qber)
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


def bench_cascade(
    variant: CascadeVariant,
    qber: float,
    n: int,
    frames: int,
    seed: int,
    cache: str,
    implementation: str = "compiled",
) -> Row:
    rng = np.random.default_rng(seed)
    efficiencies: list[float] = []
    residual = 0
    rounds = 0
    wall_s = 0.0
    deployed_s = 0.0
    frame_max_s: list[float] = []
    role_s = [0.0, 0.0]
    session_seed = b""
    if cache == "warm":  # one untimed frame fills the permutation cache for the session's seed
        session_seed = rng.bytes(32)
        alice = rng.integers(0, 2, n, dtype=np.uint8)
        bob = alice ^ (rng.random(n) < qber).astype(np.uint8)
        run_cascade_frame(alice, bob, session_seed, variant, qber, None, implementation)
    for _ in range(frames):
        alice = rng.integers(0, 2, n, dtype=np.uint8)
        bob = alice ^ (rng.random(n) < qber).astype(np.uint8)
        if cache == "warm":
            frame_seed = session_seed
        else:
            frame_seed = rng.bytes(32)
            clear_permutation_cache()
        frame_role_s = [0.0, 0.0]
        start = time.perf_counter()
        reconciler, responder = run_cascade_frame(
            alice, bob, frame_seed, variant, qber, frame_role_s, implementation
        )
        wall_s += time.perf_counter() - start
        deployed_s += max(frame_role_s)
        frame_max_s.append(max(frame_role_s))
        role_s[0] += frame_role_s[0]
        role_s[1] += frame_role_s[1]
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
    run_cascade_frame(alice, bob, rng.bytes(32), variant, qber, implementation=implementation)
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
        "mbit_s": round(n * frames / deployed_s / 1e6, 3),
        "mbit_s_median": round(n / statistics.median(frame_max_s) / 1e6, 3),
        "mbit_s_one_thread": round(n * frames / wall_s / 1e6, 3),
        "alice_ms": round(role_s[0] / frames * 1e3, 2),
        "bob_ms": round(role_s[1] / frames * 1e3, 2),
        "peak_mb": round(peak / 1e6, 1),
        "permutation_cache": cache,
        "implementation": implementation,
        "load_1min": round(os.getloadavg()[0], 2),
    }


def warm_up_kernels() -> None:
    """Load (or compile) every Cascade kernel: one small frame of every variant, untimed."""
    compile_kernels()


def bench_jit() -> list[Row]:
    """Fresh interpreters running ``warm_up_kernels``: empty numba cache, then the one it left."""
    rows = []
    with tempfile.TemporaryDirectory() as cache_dir:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
        for state in ("empty", "filled"):
            start = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--warm-up-only"], env=env, check=True)
            rows.append(
                {
                    "stage": "jit",
                    "variant": "all-cascade-kernels",
                    "n": 40_000,
                    "numba_cache": state,
                    "seconds": round(time.perf_counter() - start, 2),
                    "load_1min": round(os.getloadavg()[0], 2),
                }
            )
    return rows


PA_FAMILIES = ("toeplitz-fft-v1", "mersenne-gmp-v1")


def _dense_check() -> str:
    """Toeplitz: compare with a dense GF(2) product, T[i, j] = s[i - j + n - 1], on a small size."""
    from qkdnode.postprocess.amplification import toeplitz_hash

    rng = np.random.default_rng(77)
    n, m = 300, 120
    bits = rng.integers(0, 2, n, dtype=np.uint8)
    seed_bits = rng.integers(0, 2, n + m - 1, dtype=np.uint8)
    got = np.asarray(toeplitz_hash(bits, seed_bits, m)).astype(np.int64)
    index = np.arange(m)[:, None] - np.arange(n)[None, :] + n - 1
    dense = seed_bits[index].astype(np.int64)
    if np.array_equal((dense @ bits.astype(np.int64)) % 2, got):
        return "bit-exact vs dense product"
    return "NOT equal to the dense product"


def _integer_check() -> str:
    """Mersenne: compare with ((a x + b) mod p) mod 2^m in Python integers on a few sizes."""
    from qkdnode.postprocess import amplification_mersenne as mers

    rng = np.random.default_rng(78)
    for n in (1, 606, 607, 3_000, 20_000):
        m = n // 2
        bits = rng.integers(0, 2, n, dtype=np.uint8)
        seed = mers.draw_mersenne_seed(n, rng)
        size = mers.seed_part_bytes(n)
        a, b = int.from_bytes(seed[:size], "little"), int.from_bytes(seed[size:], "little")
        x = int("".join(str(int(v)) for v in bits[::-1]), 2)
        y = ((a * x + b) % ((1 << mers.mersenne_exponent(n)) - 1)) % (1 << m)
        if mers.mersenne_hash(bits, seed, m).tolist() != [(y >> i) & 1 for i in range(m)]:
            return f"NOT equal to Python integers at n={n}"
    return "bit-exact vs Python integers"


def _status_mb(key: str) -> float:
    """VmHWM / VmRSS of this process from /proc/self/status, in MB (10^6 bytes)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"{key} not in /proc/self/status")


def pa_row(family: str, n: int) -> Row:
    """One PA row, in this process (run it in a fresh subprocess: the peak is the process's)."""
    rng = np.random.default_rng(99)
    out = n // 2
    bits = rng.integers(0, 2, n, dtype=np.uint8)
    hash_once: Callable[[], np.ndarray]
    if family == "toeplitz-fft-v1":
        from qkdnode.postprocess.amplification import draw_toeplitz_seed, toeplitz_hash

        seed_bits = draw_toeplitz_seed(n, out, rng)
        seed_bytes = (seed_bits.size + 7) // 8

        def hash_once() -> np.ndarray:
            return toeplitz_hash(bits, seed_bits, out)
    else:
        from qkdnode.postprocess.amplification_mersenne import draw_mersenne_seed, mersenne_hash

        seed = draw_mersenne_seed(n, rng)
        seed_bytes = len(seed)

        def hash_once() -> np.ndarray:
            return mersenne_hash(bits, seed, out)

    load_1min = os.getloadavg()[0]
    base_mb = _status_mb("VmRSS")
    hash_once()  # untimed: imports, first-touch of buffers
    repeats = 5 if n <= 10**6 else 3 if n <= 10**7 else 1
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        hash_once()
        times.append(time.perf_counter() - start)
    wall_s = statistics.median(times)
    return {
        "stage": "pa",
        "variant": family,
        "qber": None,
        "n": n,
        "output_bits": out,
        "seed_bytes": seed_bytes,
        "f": None,
        "fer": None,
        "frames": repeats,
        "round_trips": 0,
        "seconds": round(wall_s, 4),
        "mbit_s": round(n / wall_s / 1e6, 3),
        "peak_mb": round(_status_mb("VmHWM"), 1),
        "base_mb": round(base_mb, 1),
        "maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6, 1),
        "load_1min": round(load_1min, 2),
    }


def bench_pa(sizes: list[int], families: list[str]) -> list[Row]:
    """One row per (family, size), each measured in a fresh subprocess (see ``pa_row``)."""
    checks = {"toeplitz-fft-v1": _dense_check(), "mersenne-gmp-v1": _integer_check()}
    rows = []
    for n in sizes:
        for family in families:
            command = [sys.executable, __file__, "--pa-row", f"{family}:{n}"]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
                rows.append(
                    {"stage": "pa", "variant": family, "n": n, "skipped": f"failed: {tail}"}
                )
                continue
            row: Row = json.loads(done.stdout.strip().splitlines()[-1])
            row["check"] = checks[family]
            rows.append(row)
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
            f"rt={row['round_trips']:<7} {row['mbit_s']:7.3f} Mbit/s (median "
            f"{row['mbit_s_median']:.3f}) "
            f"(alice {row['alice_ms']} ms, bob {row['bob_ms']} ms /frame; one thread "
            f"{row['mbit_s_one_thread']:.3f}) {row['implementation']} {row['permutation_cache']} "
            f"peak {row['peak_mb']} MB load {row['load_1min']}",
            flush=True,
        )
    elif row["stage"] == "jit":
        print(
            f"{row['stage']:9} {row['variant']:15} numba cache {row['numba_cache']:6} "
            f"{row['seconds']:6.2f} s (load {row['load_1min']})",
            flush=True,
        )
    elif "skipped" in row:
        print(f"{row['stage']:9} {row['variant']:15} n={row['n']:<8} SKIPPED: {row['skipped']}")
    else:
        extra = (
            f"  peak {row.get('peak_mb')} MB (before the call {row.get('base_mb')} MB)"
            f"  load {row.get('load_1min')}  {row.get('check', '')}"
        )
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
    parser.add_argument(
        "--cache", default="cold,warm", help="permutation cache states (default cold,warm)"
    )
    parser.add_argument("--no-jit-row", action="store_true", help="skip the numba compile rows")
    parser.add_argument(
        "--implementation",
        default="compiled",
        help="Cascade roles: compiled (default), numpy (the tests' reference), or both",
    )
    parser.add_argument("--warm-up-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-pa", action="store_true", help="skip privacy amplification rows")
    parser.add_argument("--no-cascade", action="store_true", help="skip the Cascade rows")
    parser.add_argument("--pa-sizes", help="comma-separated PA input sizes (default 1e6,1e7,1e8)")
    parser.add_argument(
        "--pa-family", help=f"comma-separated PA families (default {','.join(PA_FAMILIES)})"
    )
    parser.add_argument("--pa-row", help=argparse.SUPPRESS)  # FAMILY:N, one row (subprocess)
    parser.add_argument("--json", type=Path, help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.warm_up_only:
        warm_up_kernels()
        return 0
    if args.pa_row:
        family, n = args.pa_row.split(":")
        print(json.dumps(pa_row(family, int(float(n)))))
        return 0

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
    if not args.no_cascade and not args.no_jit_row:
        for row in bench_jit():
            rows.append(row)
            print_row(row)
    if not args.no_cascade:
        warm_up_kernels()
    for n in [] if args.no_cascade else sizes:
        for qber in qbers:
            for index, variant in enumerate(variants):
                frames = frames_for(n, args.quick)
                if n <= 10**4 and args.frames_10k:
                    frames = args.frames_10k
                elif n > 10**4 and args.frames:
                    frames = args.frames
                for implementation in args.implementation.split(","):
                    for cache in args.cache.split(","):
                        row = bench_cascade(
                            variant,
                            qber,
                            n,
                            frames,
                            seed=n + int(qber * 1e4) + index,
                            cache=cache,
                            implementation=implementation,
                        )
                        rows.append(row)
                        print_row(row)
    if not args.no_pa:
        if args.pa_sizes:
            pa_sizes = [int(float(x)) for x in args.pa_sizes.split(",")]
        else:
            pa_sizes = [10**6] if args.quick else [10**6, 10**7, 10**8]
        families = args.pa_family.split(",") if args.pa_family else list(PA_FAMILIES)
        for row in bench_pa(pa_sizes, families):
            rows.append(row)
            print_row(row)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"wrote {len(rows)} rows to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
