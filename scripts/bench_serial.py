#!/usr/bin/env python3
"""Benchmark of the serial device backend: detection records per second through a real pty.

Usage::

    .venv/bin/python scripts/bench_serial.py [--quick] [--records N] [--json OUT.json]

Prints a table and writes a JSON list of rows ``{"stage", "records", "seconds",
"records_per_s", "records_per_cpu_s", "bytes_per_record", ...}``. Target: >= 10^5
detection records per second through the pty.

- ``stage "driver"``: a replay device in a child process (this script with ``--replay-device``)
  opens a pty, answers the driver's IDENTIFY / GET_PARAMETERS / START like a device, then writes
  pre-encoded DETECTIONS frames (SLIP + CRC-32, 2 bytes per detection, detection probability
  ``--density`` per pulse) as fast as the pty takes them. ``SerialLink`` (role bob) in this
  process reads them and returns blocks of 2^20 pulses. ``records_per_s`` = detections in the
  returned blocks / wall seconds from the first ``next_block`` call to the last block;
  ``records_per_cpu_s`` uses this process's CPU seconds (the device runs in another process).
- ``stage "end_to_end"``: both device emulators (Alice's source and Bob's detector, physics of
  ``qkdnode.link.physics``) and both drivers in this one process and thread, over two ptys and a
  socketpair fibre: Bob's detection records per wall second, with everything on one core.
- ``stage "decode"``: the same frames as ``driver`` through ``FrameDecoder`` and
  ``BlockAssembler`` from memory (no pty), to show the parsing cost alone.
- ``stage "baseline"``: ``numpy.sort`` of 10^6 random uint32, to quote ratios against this
  machine in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qkdnode.config.link import SerialLinkConfig, SimulatedLinkConfig
from qkdnode.link.emulator import DeviceEmulator
from qkdnode.link.serial import SerialLink, set_raw_mode
from qkdnode.link.serialproto import (
    PARAMETER_NAMES,
    PROTOCOL_VERSION,
    Ack,
    Command,
    FrameDecoder,
    Identity,
    MessageType,
    Parameters,
    Received,
    encode_frame,
)
from qkdnode.link.serialrecords import BlockAssembler, DetectionChunk, split_detections
from qkdnode.postprocess.records import DetectionRecords

Row = dict[str, Any]
BLOCK_PULSES = 1 << 20


def detection_frames(records: int, density: float, seed: int) -> tuple[bytes, int, int]:
    """Pre-encoded DETECTIONS frames: (bytes, detections, pulses covered)."""
    rng = np.random.default_rng(seed)
    pulses = int(records / density)
    pulses -= pulses % BLOCK_PULSES
    index = np.flatnonzero(rng.random(pulses) < density).astype(np.int64)
    basis = rng.integers(0, 2, index.size, dtype=np.uint8)
    bit = rng.integers(0, 2, index.size, dtype=np.uint8)
    frames: list[bytes] = []
    chunk = 1 << 16
    for first in range(0, pulses, chunk):
        lo, hi = np.searchsorted(index, (first, first + chunk))
        for part in split_detections(first, chunk, index[lo:hi], basis[lo:hi], bit[lo:hi]):
            frames.append(encode_frame(part, len(frames) & 0xFFFF))
    return b"".join(frames), int(index.size), pulses


# ---- the replay device (child process) -------------------------------------------------------


def replay_device(records: int, density: float, seed: int) -> int:
    stream, _, _ = detection_frames(records, density, seed)
    parameters = SimulatedLinkConfig().nominal_parameters()
    master, slave = os.openpty()
    set_raw_mode(slave, 3_000_000)
    print(os.ttyname(slave), flush=True)
    decoder = FrameDecoder()
    seq = 60000  # replies continue the sequence numbers of the frames after the stream
    while True:
        data = os.read(master, 4096)
        decoder.receive_data(data)
        while (event := decoder.next_event()) is not None:
            if not isinstance(event, Received) or not isinstance(event.message, Command):
                continue
            kind = event.message.kind
            reply: Identity | Parameters | Ack
            if kind is MessageType.IDENTIFY:
                reply = Identity(
                    ack_seq=event.seq,
                    protocol_version=PROTOCOL_VERSION,
                    role="bob",
                    model="qkdnode-emulator",
                    firmware="replay",
                    serial_number="BENCH",
                )
            elif kind is MessageType.GET_PARAMETERS:
                values = tuple(float(getattr(parameters, n)) for n in PARAMETER_NAMES)
                reply = Parameters(ack_seq=event.seq, values=values)
            else:
                reply = Ack(ack_seq=event.seq, command=int(kind))
            os.write(master, encode_frame(reply, seq))
            seq += 1
            if kind is MessageType.START:
                view = memoryview(stream)
                while view:
                    written = os.write(master, view[: 1 << 16])
                    view = view[written:]
                # Keep the line open until the host has read everything.
                time.sleep(30)
                return 0


# ---- stages ----------------------------------------------------------------------------------


async def driver_stage(records: int, density: float, seed: int) -> Row:
    _, detections, pulses = detection_frames(records, density, seed)
    child = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--replay-device",
            str(records),
            "--density",
            str(density),
            "--seed",
            str(seed),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        path = child.stdout.readline().decode().strip()
        link = SerialLink(SerialLinkConfig(device_path=path, read_timeout_s=20.0), "bob")
        await link.open()
        received = 0
        blocks = pulses // BLOCK_PULSES
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(blocks):
            block = await link.next_block(BLOCK_PULSES)
            assert isinstance(block, DetectionRecords)
            received += block.detection_count
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        counters = link.counters()
        await link.aclose()
    finally:
        child.kill()
        child.wait()
    assert received == detections, (received, detections)
    assert counters.crc_errors == 0 and counters.gaps == 0
    stream_bytes = len(detection_frames(records, density, seed)[0])
    return {
        "stage": "driver",
        "records": received,
        "pulses": pulses,
        "seconds": wall,
        "records_per_s": received / wall,
        "records_per_cpu_s": received / cpu if cpu > 0 else None,
        "bytes_per_record": stream_bytes / detections,
        "line_mbyte_per_s": stream_bytes / wall / 1e6,
    }


async def end_to_end_stage(blocks: int, seed: int) -> Row:
    physics = SimulatedLinkConfig(fiber_km=0.0, detector_efficiency=0.5)
    seeds = np.random.SeedSequence(seed).spawn(2)
    a_sock, b_sock = trio.socket.socketpair()
    alice_fibre, bob_fibre = trio.SocketStream(a_sock), trio.SocketStream(b_sock)
    alice_device = DeviceEmulator("alice", physics, rng=np.random.default_rng(seeds[0]))
    bob_device = DeviceEmulator("bob", physics, rng=np.random.default_rng(seeds[1]))
    detections = 0
    async with alice_fibre, bob_fibre, trio.open_nursery() as nursery:
        alice_path = await nursery.start(alice_device.run, alice_fibre)
        bob_path = await nursery.start(bob_device.run, bob_fibre)
        alice = SerialLink(SerialLinkConfig(device_path=alice_path), "alice")
        bob = SerialLink(SerialLinkConfig(device_path=bob_path), "bob")
        await alice.open()
        await bob.open()

        async def drain_alice() -> None:
            while True:
                await alice.next_block(BLOCK_PULSES)

        nursery.start_soon(drain_alice)
        await bob.next_block(BLOCK_PULSES)  # warm-up: the first aligned block
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(blocks):
            block = await bob.next_block(BLOCK_PULSES)
            assert isinstance(block, DetectionRecords)
            detections += block.detection_count
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        nursery.cancel_scope.cancel()
        await alice.aclose()
        await bob.aclose()
        alice_device.close()
        bob_device.close()
        nursery.cancel_scope.cancel()
    return {
        "stage": "end_to_end",
        "records": detections,
        "pulses": blocks * BLOCK_PULSES,
        "seconds": wall,
        "records_per_s": detections / wall,
        "records_per_cpu_s": detections / cpu if cpu > 0 else None,
        "bytes_per_record": None,
    }


def decode_stage(records: int, density: float, seed: int) -> Row:
    stream, detections, pulses = detection_frames(records, density, seed)
    wall = time.perf_counter()
    decoder = FrameDecoder()
    assembler = BlockAssembler()
    assembler.set_block_size(BLOCK_PULSES)
    decoder.receive_data(b"\xc0")
    received = 0
    for start in range(0, len(stream), 1 << 16):
        decoder.receive_data(stream[start : start + (1 << 16)])
        while (event := decoder.next_event()) is not None:
            if isinstance(event, Received) and isinstance(event.message, DetectionChunk):
                assembler.feed(event.message)
        while (block := assembler.pop_block()) is not None:
            assert isinstance(block, DetectionRecords)
            received += block.detection_count
    wall = time.perf_counter() - wall
    assert received == detections
    return {
        "stage": "decode",
        "records": received,
        "pulses": pulses,
        "seconds": wall,
        "records_per_s": received / wall,
        "records_per_cpu_s": None,
        "bytes_per_record": len(stream) / detections,
    }


def baseline_stage() -> Row:
    values = np.random.default_rng(0).integers(0, 1 << 32, 10**6, dtype=np.uint32)
    wall = time.perf_counter()
    np.sort(values)
    wall = time.perf_counter() - wall
    return {"stage": "baseline", "records": 10**6, "seconds": wall, "records_per_s": 1e6 / wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer records")
    parser.add_argument("--records", type=int, default=2_000_000)
    parser.add_argument("--density", type=float, default=0.05, help="detections per pulse")
    parser.add_argument("--blocks", type=int, default=8, help="end-to-end blocks of 2^20 pulses")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the rows to this file")
    parser.add_argument("--replay-device", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.replay_device is not None:
        return replay_device(args.replay_device, args.density, args.seed)
    records = 300_000 if args.quick else args.records
    blocks = 2 if args.quick else args.blocks
    rows = [
        baseline_stage(),
        decode_stage(records, args.density, args.seed),
        trio.run(driver_stage, records, args.density, args.seed),
        trio.run(end_to_end_stage, blocks, args.seed),
    ]
    print(
        f"{'stage':<12}{'records':>12}{'seconds':>10}{'records/s':>14}{'rec/cpu-s':>14}{'B/rec':>8}"
    )
    for row in rows:
        per_cpu = row.get("records_per_cpu_s")
        size = row.get("bytes_per_record")
        per_cpu_text = "" if per_cpu is None else f"{per_cpu:.3g}"
        size_text = "" if size is None else f"{size:.2f}"
        print(
            f"{row['stage']:<12}{row['records']:>12}{row['seconds']:>10.3f}"
            f"{row['records_per_s']:>14.3g}{per_cpu_text:>14}{size_text:>8}"
        )
    target = next(r for r in rows if r["stage"] == "driver")["records_per_s"]
    print(f"driver through the pty: {target:.3g} detection records/s (target >= 1e5)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
