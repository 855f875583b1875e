#!/usr/bin/env python3
"""Benchmark of the simulated decoy-state BB84 link, both ends in this process on one core.

Usage::

    .venv/bin/python scripts/bench_link.py [--quick] [--km LIST] [--blocks N]
        [--block-pulses N] [--json OUT.json]

Prints a table and writes a JSON list of rows ``{"stage", "distance_km", "pulses",
"pulses_per_s", "detections_per_s", "peak_mb", ...}``.

- ``stage "link"``: ``SimulatedAliceLink`` -> in-process memory fibre -> ``SimulatedBobLink``
  under trio, ``blocks`` blocks of ``block_pulses`` pulses, default link parameters
  (``SimulatedLinkConfig()``) at each distance. Everything is in this single thread: Alice's
  source, the fibre encoding and decoding, Bob's receiver and the records of both sides.
  ``pulses_per_s`` = pulses / wall seconds; ``pulses_per_cpu_s`` = pulses / process CPU seconds
  (robust when other jobs share the machine).
- ``stage "physics"``: ``Source.emit`` + ``Receiver.detect`` alone on the same pulses (no trio,
  no encoding), to show where the time goes.
- ``stage "baseline"``: ``numpy.sort`` of 10^6 random uint32, to quote ratios against this
  machine in this run.

peak_mb: ``tracemalloc`` peak of traced allocations (numpy buffers are traced) during a second,
untimed run of the same blocks: it depends on the block size, not on the number of blocks
(``peak_mb_one_block`` is the same measurement with one block, to show it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qkdnode.config.link import SimulatedLinkConfig
from qkdnode.link.physics import AfterpulseCarry, Receiver, Source
from qkdnode.link.simulated import SimulatedAliceLink, SimulatedBobLink, memory_fibre

Row = dict[str, Any]


async def _run_link(config: SimulatedLinkConfig, blocks: int, block_pulses: int, seed: int) -> int:
    alice_seed, bob_seed = np.random.SeedSequence(seed).spawn(2)
    send, receive = memory_fibre()
    alice = SimulatedAliceLink(config, fibre=send, rng=np.random.default_rng(alice_seed))
    bob = SimulatedBobLink(config, fibre=receive, rng=np.random.default_rng(bob_seed))
    await alice.open()
    await bob.open()
    detections = 0
    for _ in range(blocks):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(alice.next_block, block_pulses)
            records = await bob.next_block(block_pulses)
        detections += records.detection_count
    await alice.aclose()
    await bob.aclose()
    return detections


def run_link(config: SimulatedLinkConfig, blocks: int, block_pulses: int, seed: int) -> int:
    return trio.run(_run_link, config, blocks, block_pulses, seed)


def peak_mb(config: SimulatedLinkConfig, blocks: int, block_pulses: int) -> float:
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        run_link(config, blocks, block_pulses, seed=99)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak / 1e6


def link_row(km: float, blocks: int, block_pulses: int) -> Row:
    config = SimulatedLinkConfig(fiber_km=km)
    pulses = blocks * block_pulses
    wall, cpu = time.perf_counter(), time.process_time()
    detections = run_link(config, blocks, block_pulses, seed=int(km * 1000) + 1)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "stage": "link",
        "distance_km": km,
        "pulses": pulses,
        "blocks": blocks,
        "block_pulses": block_pulses,
        "chunk_pulses": config.chunk_pulses,
        "detections": detections,
        "seconds": round(wall, 3),
        "pulses_per_s": round(pulses / wall),
        "pulses_per_cpu_s": round(pulses / cpu),
        "detections_per_s": round(detections / wall),
        "peak_mb": round(peak_mb(config, blocks, block_pulses), 1),
        "peak_mb_one_block": round(peak_mb(config, 1, block_pulses), 1),
    }


def physics_row(km: float, pulses: int) -> Row:
    params = SimulatedLinkConfig(fiber_km=km).nominal_parameters()
    source, receiver = Source(params), Receiver(params)
    rng = np.random.default_rng(5)
    chunk = SimulatedLinkConfig().chunk_pulses
    emit_s = detect_s = 0.0
    detections = 0
    carry = AfterpulseCarry()
    for start in range(0, pulses, chunk):
        size = min(chunk, pulses - start)
        t0 = time.perf_counter()
        emission = source.emit(size, rng)
        t1 = time.perf_counter()
        found, carry = receiver.detect(emission.pulses, params.fibre_transmittance, rng, carry)
        t2 = time.perf_counter()
        emit_s += t1 - t0
        detect_s += t2 - t1
        detections += found.offset.shape[0]
    total = emit_s + detect_s
    return {
        "stage": "physics",
        "distance_km": km,
        "pulses": pulses,
        "detections": detections,
        "seconds": round(total, 3),
        "pulses_per_s": round(pulses / total),
        "detections_per_s": round(detections / total),
        "emit_ns_per_pulse": round(emit_s / pulses * 1e9, 2),
        "detect_ns_per_pulse": round(detect_s / pulses * 1e9, 2),
        "peak_mb": None,
    }


def baseline_row() -> Row:
    values = np.random.default_rng(0).integers(0, 2**32, 10**6, dtype=np.uint32)
    np.sort(values)
    start = time.perf_counter()
    repeats = 20
    for _ in range(repeats):
        np.sort(values)
    seconds = (time.perf_counter() - start) / repeats
    return {
        "stage": "baseline",
        "what": "numpy.sort of 1e6 uint32",
        "seconds": round(seconds, 5),
        "distance_km": None,
        "pulses": None,
        "pulses_per_s": None,
        "detections_per_s": None,
        "peak_mb": None,
    }


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3e}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 blocks of 2^20 pulses")
    parser.add_argument("--km", default="0,25,50,100,150", help="comma-separated distances")
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--block-pulses", type=int, default=1 << 22)
    parser.add_argument("--json", type=Path, help="write the rows to this file")
    args = parser.parse_args()
    blocks, block_pulses = (2, 1 << 20) if args.quick else (args.blocks, args.block_pulses)
    distances = [float(x) for x in args.km.split(",") if x.strip()]
    rows: list[Row] = [baseline_row()]
    for km in distances:
        rows.append(link_row(km, blocks, block_pulses))
        rows.append(physics_row(km, blocks * block_pulses))
    header = (
        f"{'stage':<9}{'km':>6}{'pulses':>12}{'pulses/s':>14}{'pulses/cpu-s':>14}"
        f"{'detections/s':>14}{'peak MB':>9}{'1-block MB':>11}"
    )
    print(header)
    for row in rows:
        if row["stage"] == "baseline":
            print(f"baseline: {row['what']} in {row['seconds'] * 1e3:.2f} ms")
            continue
        print(
            f"{row['stage']:<9}{row['distance_km']:>6g}{row['pulses']:>12}"
            f"{row['pulses_per_s']:>14.3e}{_fmt(row.get('pulses_per_cpu_s')):>14}"
            f"{row['detections_per_s']:>14.3e}"
            f"{row['peak_mb'] if row['peak_mb'] is not None else '-':>9}"
            f"{row.get('peak_mb_one_block', '-'):>11}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
