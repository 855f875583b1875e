"""Peak memory of each post-processing role over one large block, each role in its own process.

    python scripts/bench_block_memory.py [--detections 11800000] [--pulses 601340272]
                                         [--cascade-frame-bits N] [--json OUT]

A synthetic decoy block (the detections of ``--pulses`` pulses at 25 km: detected offsets,
intensity classes in proportion to their gains, QBER 0.5 % and 50 % for the vacuum class) is
made in both processes; Alice holds her records of the detected pulses only
(``DetectedEmissionRecords``), Bob his ``DetectionRecords``. Each process then resets its
VmHWM (/proc/self/clear_refs), runs its role (``AliceBlock`` / ``BobBlock``, privacy
amplification by mersenne-gmp-v1) against the other over a pipe, and reports its resident
memory (VmRSS) and peak (VmHWM) after every turn that raised the peak, above the process's base
(Python, numpy, the compiled kernels). The link and the daemon are left out: this is the
post-processing's own memory.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import multiprocessing as mp
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from qkdnode.postprocess.amplification_family import AmplificationFamily
from qkdnode.postprocess.cascade import CascadeVariant
from qkdnode.postprocess.finitekey import DecoySettings, SecurityParameters
from qkdnode.postprocess.pipeline import AliceBlock, BobBlock, PipelineParameters
from qkdnode.postprocess.records import DetectedEmissionRecords, DetectionRecords

DECOY = DecoySettings(
    mu_signal=0.47,
    mu_decoy=0.1,
    mu_vacuum=0.0002,
    p_signal=0.85,
    p_decoy=0.1,
    p_vacuum=0.05,
    p_key_basis=0.95,
)
TRANSMITTANCE = 0.0316  # 25 km, 0.2 dB/km, detector efficiency 10 %


def _status_mb(name: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {name} in /proc/self/status")


def _block(
    seed: int, detections: int, pulses: int
) -> tuple[DetectedEmissionRecords, DetectionRecords]:
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, pulses, int(detections * 1.001))
    offsets = np.unique(drawn)[:detections].astype(np.int64)
    n = offsets.shape[0]
    gain = np.array(
        [1 - np.exp(-TRANSMITTANCE * mu) + 1.2e-6 for mu in (DECOY.mu_signal, DECOY.mu_decoy)]
        + [1 - np.exp(-TRANSMITTANCE * DECOY.mu_vacuum) + 1.2e-6]
    )
    weight = np.array([DECOY.p_signal, DECOY.p_decoy, DECOY.p_vacuum]) * gain
    intensity = np.asarray(rng.choice(3, size=n, p=weight / weight.sum()), dtype=np.uint8)
    alice_basis = np.asarray(rng.random(n) >= DECOY.p_key_basis, dtype=np.uint8)
    bob_basis = np.asarray(rng.random(n) >= DECOY.p_key_basis, dtype=np.uint8)
    alice_bit = np.asarray(rng.integers(0, 2, n, dtype=np.uint8), dtype=np.uint8)
    flips = rng.random(n) < np.where(intensity == 2, 0.5, 0.005)
    bob_bit = alice_bit ^ flips.astype(np.uint8)
    mismatched = alice_basis != bob_basis
    bob_bit[mismatched] = rng.integers(0, 2, int(mismatched.sum()), dtype=np.uint8)
    alice = DetectedEmissionRecords(
        first_pulse_index=0,
        pulse_count=pulses,
        offset=offsets,
        bit=alice_bit,
        basis=alice_basis,
        intensity=intensity,
    )
    bob = DetectionRecords(
        first_pulse_index=0, pulse_count=pulses, pulse_index=offsets, basis=bob_basis, bit=bob_bit
    )
    return alice, bob


def _role(
    role: str, conn: Connection, detections: int, pulses: int, frame_bits: int, out: Any
) -> None:
    params = PipelineParameters(
        cascade_variant=CascadeVariant.SUBBLOCK_REUSE,
        security=SecurityParameters(eps_sec=1e-10, eps_cor=1e-12),
        decoy=DECOY,
        pa_family=AmplificationFamily("mersenne-gmp-v1"),
        cascade_frame_bits=frame_bits,
    )
    alice, bob = _block(7, detections, pulses)
    records: DetectedEmissionRecords | DetectionRecords = alice if role == "alice" else bob
    del alice, bob
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # the synthetic block's temporaries
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = _status_mb("VmRSS:")
    turns: list[dict[str, Any]] = []
    started = time.perf_counter()
    if isinstance(records, DetectedEmissionRecords):
        node: AliceBlock | BobBlock = AliceBlock(records, params, np.random.default_rng(3))
    else:
        node = BobBlock(records, params)
        conn.send(node.start())
        turns.append({"turn": "start", "hwm_mb": round(_status_mb("VmHWM:") - base, 1)})
    del records
    turn = 0
    while (messages := conn.recv()) is not None:
        before = _status_mb("VmHWM:")
        reply = node.receive(messages)
        after = _status_mb("VmHWM:")
        if after > before + 5:
            turns.append(
                {
                    "turn": turn,
                    "messages": [type(m).__name__ for m in messages],
                    "hwm_mb": round(after - base, 1),
                    "rss_mb": round(_status_mb("VmRSS:") - base, 1),
                }
            )
        turn += 1
        if node.finished and not reply:
            conn.send(None)
            break
        conn.send(reply)
    out.put(
        {
            "role": role,
            "base_mb": round(base, 1),
            "peak_above_base_mb": round(_status_mb("VmHWM:") - base, 1),
            "seconds": round(time.perf_counter() - started, 2),
            "outcome": type(node.outcome).__name__,
            "turns": turns,
        }
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--detections", type=int, default=11_800_000)
    parser.add_argument("--pulses", type=int, default=601_340_272)
    parser.add_argument("--cascade-frame-bits", type=int, default=0)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    context = mp.get_context("spawn")
    alice_end, bob_end = context.Pipe()
    results = context.Queue()
    processes = [
        context.Process(
            target=_role,
            args=(role, end, args.detections, args.pulses, args.cascade_frame_bits, results),
        )
        for role, end in (("alice", alice_end), ("bob", bob_end))
    ]
    for process in processes:
        process.start()
    rows = [results.get() for _ in processes]
    for process in processes:
        process.join()
    for row in sorted(rows, key=lambda r: str(r["role"])):
        print(
            f"{row['role']:>5}: base {row['base_mb']} MB, peak {row['peak_above_base_mb']} MB "
            f"above it, {row['seconds']} s, {row['outcome']}"
        )
        for entry in row["turns"]:
            print(f"       {entry}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
