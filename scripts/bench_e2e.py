"""End-to-end benchmark: two `qkdnode run` daemons on loopback with the simulated link, or
replaying a recording of it.

    python scripts/bench_e2e.py [--quick] [--km 10,25,50] [--blocks N] [--seconds S]
                                [--sifted-bits N] [--in-flight K]
                                [--link simulated,replay] [--replay-blocks B]
                                [--large-blocks] [--alice-records R] [--pa-family F]
                                [--cascade-frame-bits N] [--decoys 1|2] --json OUT

``--large-blocks``: blocks of 10^7 sifted bits with the settings that bound memory (Alice's
simulated link keeps her source's state, not her records of every pulse; Cascade in frames of
at most 2^22 bits; privacy amplification by ``mersenne-gmp-v1``); ``peak_mb`` then shows each
daemon's peak resident memory against the 1 GB per process it must stay within.

``--link replay`` first records ``--replay-blocks`` blocks (20 by default) of the simulated link
with the same config (``qkdnode link record``, before the daemons start), then both daemons
replay them from disk in a loop (``[link] backend = "replay"``, no ``[delivery]``): the link
costs a file read instead of the simulator's CPU, and a steady state longer than the recording
reuses its raw data (right for throughput; ``replay_laps`` says how often it was reused).

For each distance the block size is chosen for about ``--sifted-bits`` sifted key bits per block
(10^6 by default) with two-decoy settings; then the decoy settings are optimised for that
distance and block size, with two decoys or, ``--decoys 1``, with one (the same block size, so
the two rows compare per pulse). A distance runs
until ``--blocks`` blocks are done and ``--seconds`` (120 by default) have passed since the first
committed block. Each row reports secret bits per second and per pulse (counted after the
authentication-key pool took its share), the finite-key bound (the daemons' default statistics,
two decoys or one, vacuum term dropped for two-way Cascade) for the *same observed counts* with
reconciliation at the Shannon limit (f = 1, leak = n h(Q)), their ratio, the mean QBER, each
daemon's CPU seconds, and the seconds to the first committed block. Measured in the same run,
over the steady state (from the first committed block to the last block):

- ``sifted_bits_per_s``: committed sifted bits after the first block / that wall time;
- ``round_trip_ms_p50`` / ``_p99``: Bob's round trips inside a block (his reply queued to
  Alice's answer handed to his role, from his ``block.turns`` log), pooled over the blocks;
- ``cpu_util_alice`` / ``_bob``: CPU seconds of each daemon / wall seconds (1.0 = one core);
- ``peak_mb``: each daemon's peak resident memory (VmHWM) at the end;
- ``runqueue_wait_alice`` / ``_bob``: seconds the daemon's threads were runnable but waited for
  a CPU / wall seconds (threads that ended meanwhile are missed): what a shared machine costs;
- ``link_s_per_block`` / ``postprocess_s_per_block`` / ``round_trips_per_block``: Alice's wait
  for the link's records, the post-processing exchange after it, and Cascade's round trips, mean
  over the steady blocks; ``role_s_per_block``: each node's time inside its post-processing role
  (worker-thread hand-offs included), mean over the same blocks;
- ``event_loop_lag_max_ms``: the largest ``qkdnode_event_loop_lag_seconds`` (the metric keeps the
  largest lag of the last 60 s) read every 2 s from 60 s after the first committed block on
  (from the first block on in a shorter run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from qkdnode.config.link import SimulatedLinkConfig
from qkdnode.demo.progress import LogFollower
from qkdnode.demo.run import (
    decoy_settings_for,
    one_decoy_settings_for,
    prepare_workdir,
    start_node,
    stop_nodes,
)
from qkdnode.postprocess.finitekey import (
    DEFAULT_FINITE_KEY_ANALYSIS,
    DecoyObservation,
    DecoySettings,
    OneDecoyObservation,
    OneDecoySettings,
    SecurityParameters,
    binary_entropy,
    channel_transmittance,
    decoy_key_length_for,
    expected_decoy_observation,
    one_decoy_key_length,
)

SECURITY = SecurityParameters(eps_sec=1e-10, eps_cor=1e-12)


def pulses_for_sifted_bits(distance_km: float, sifted_bits: int) -> int:
    """Pulses per block that give about ``sifted_bits`` key-basis detections (two iterations)."""
    link = SimulatedLinkConfig(fiber_km=distance_km)
    transmittance = channel_transmittance(
        fiber_km=distance_km,
        attenuation_db_per_km=link.attenuation_db_per_km,
        detector_efficiency=link.detector_efficiency,
        insertion_loss_db=link.insertion_loss_db,
    )
    pulses = 40_000_000
    for _ in range(2):
        settings = decoy_settings_for(distance_km, pulses)
        expected = expected_decoy_observation(
            settings=settings,
            transmittance=transmittance,
            dark_count_probability=link.dark_count_probability_per_gate,
            misalignment_error=link.misalignment_error,
            pulses=pulses,
        )
        per_pulse = sum(expected.key_basis_counts) / pulses
        pulses = int(sifted_bits / per_pulse)
    return pulses


def bound_bits_of(event: dict[str, Any], settings: DecoySettings | OneDecoySettings) -> int:
    """The daemons' bound for a committed block's logged counts, with the leak at the Shannon
    limit (f = 1) for the QBER the block corrected."""
    n = int(event["reconciled_bits"])
    qber = int(event["errors_corrected"]) / n
    shannon_leak = math.ceil(n * binary_entropy(qber)) if 0 < qber < 1 else 0
    key, errors = event["key_counts"], event["key_errors"]
    test, test_errors = event["test_counts"], event["test_errors"]
    if isinstance(settings, OneDecoySettings):
        observation = OneDecoyObservation(
            key_basis_counts=(key[0], key[1]),
            key_basis_errors=(errors[0], errors[1]),
            test_basis_counts=(test[0], test[1]),
            test_basis_errors=(test_errors[0], test_errors[1]),
        )
        return one_decoy_key_length(
            observation,
            settings,
            leak_ec_bits=shannon_leak,
            security=SECURITY,
            statistics=DEFAULT_FINITE_KEY_ANALYSIS,
        ).length_bits
    # the daemons' analysis (the pipeline default) and their two-way Cascade
    return decoy_key_length_for(
        DEFAULT_FINITE_KEY_ANALYSIS,
        DecoyObservation(
            key_basis_counts=(key[0], key[1], key[2]),
            test_basis_counts=(test[0], test[1], test[2]),
            test_basis_errors=(test_errors[0], test_errors[1], test_errors[2]),
        ),
        settings,
        leak_ec_bits=shannon_leak,
        security=SECURITY,
    ).length_bits


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def runqueue_wait_s(pid: int) -> dict[int, float]:
    """Seconds each thread of a live process spent runnable but waiting for a CPU
    (/proc/PID/task/TID/schedstat, Linux): high on a machine whose cores are taken by others."""
    waits: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            waits[int(task.name)] = int((task / "schedstat").read_text().split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            continue  # the thread ended meanwhile
    return waits


def peak_resident_mb(pid: int) -> float:
    """VmHWM of a live process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/PID/status")


def event_loop_lag_s(url: str) -> float | None:
    """The node's ``qkdnode_event_loop_lag_seconds`` (None if the metrics do not answer)."""
    try:
        with urllib.request.urlopen(url, timeout=2.0) as response:
            text = response.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("qkdnode_event_loop_lag_seconds"):
            return float(line.rsplit(" ", 1)[1])
    return None


def nearest_rank(sorted_values: list[float], fraction: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[max(1, math.ceil(fraction * len(sorted_values))) - 1]


NODES = ("alice", "bob")
RECORDING = "recording"


def record_and_use_replay(workdir: Path, configs: list[Path], blocks: int) -> float:
    """Record ``blocks`` blocks of the simulated link of Alice's config (seconds taken), then
    point both configs at the recording, looped, without ``[delivery]`` (a replay refuses it)."""
    started = time.monotonic()
    record = ["link", "record", "--config", str(configs[0]), "--blocks", str(blocks)]
    subprocess.run(
        [sys.executable, "-m", "qkdnode", *record, "--out", RECORDING, "--seed", "20261204"],
        cwd=workdir,
        check=True,
    )
    recording_s = time.monotonic() - started
    link = f'[link]\nbackend = "replay"\ndirectory = "{RECORDING}"\nloop = true\n\n'
    for path in configs:
        text = re.sub(r"\[link\]\n.*?\n(?=\[postprocess\])", link, path.read_text(), flags=re.S)
        path.write_text(re.sub(r"\[delivery\]\n.*?\n(?=\[metrics\])", "", text, flags=re.S))
    return recording_s


def mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def run_distance(
    distance_km: float,
    blocks: int,
    sifted_bits: int,
    steady_s: float,
    in_flight: int,
    link: str = "simulated",
    replay_blocks: int = 20,
    alice_records: str | None = None,
    pa_family: str | None = None,
    cascade_frame_bits: int | None = None,
    decoys: int = 2,
) -> dict[str, Any]:
    block_pulses = pulses_for_sifted_bits(distance_km, sifted_bits)
    settings: DecoySettings | OneDecoySettings = (
        one_decoy_settings_for(distance_km, block_pulses)
        if decoys == 1
        else decoy_settings_for(distance_km, block_pulses)
    )
    with tempfile.TemporaryDirectory(prefix="qkdnode-bench-") as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o700)
        layout = prepare_workdir(
            workdir,
            distance_km=distance_km,
            block_pulses=block_pulses,
            pool_target_bits=65536,
            decoys=decoys,
        )
        recording_s = None
        if link == "replay":
            configs = [layout.config(node) for node in NODES]
            recording_s = round(record_and_use_replay(workdir, configs, replay_blocks), 1)
        postprocess_lines = f"blocks_in_flight = {in_flight}\n" if in_flight > 1 else ""
        if pa_family is not None:
            postprocess_lines += f'pa_family = "{pa_family}"\n'
        if cascade_frame_bits is not None:
            postprocess_lines += f"cascade_frame_bits = {cascade_frame_bits}\n"
        link_lines = (
            f'alice_records = "{alice_records}"\n'
            if link == "simulated" and alice_records is not None
            else ""
        )
        for node in NODES:
            path = layout.config(node)
            path.write_text(
                path.read_text()
                .replace("[postprocess]\n", f"[postprocess]\n{postprocess_lines}", 1)
                .replace("[link]\n", f"[link]\n{link_lines}", 1)
            )
        processes = {"bob": start_node(layout, "bob"), "alice": start_node(layout, "alice")}
        followers = {node: LogFollower(layout.log(node)) for node in NODES}
        events: list[dict[str, Any]] = []
        # each node's round trips (ms) and time in its role (s) by block, from block.turns
        turns: dict[str, dict[int, list[float]]] = {node: {} for node in NODES}
        role_s: dict[str, dict[int, float]] = {node: {} for node in NODES}
        lags_s: dict[str, list[float]] = {node: [] for node in NODES}
        started = time.monotonic()
        # a minute per block of up to 10^6 sifted bits, proportionally more for larger ones
        deadline = started + 120 + 60 * blocks * max(1.0, sifted_bits / 1e6) + steady_s
        cpu_first: dict[str, float] = {}
        wait_first: dict[str, dict[int, float]] = {}
        first_s = 0.0
        next_scrape_s = 0.0
        try:
            while len(events) < blocks or not cpu_first or time.monotonic() - first_s < steady_s:
                for node, follower in followers.items():
                    for event in follower.new_events():
                        name = event.get("event")
                        if name == "block.turns":
                            turns[node][int(event["block"])] = list(event["round_trip_ms"])
                            role_s[node][int(event["block"])] = float(event["role_s"])
                        elif node == "alice" and name in ("block.committed", "block.aborted"):
                            events.append(event | {"t_s": time.monotonic() - started})
                            if name == "block.committed" and not cpu_first:
                                first_s = time.monotonic()
                                cpu_first = {n: cpu_seconds(p.pid) for n, p in processes.items()}
                                wait_first = {
                                    n: runqueue_wait_s(p.pid) for n, p in processes.items()
                                }
                if any(p.poll() is not None for p in processes.values()):
                    raise RuntimeError(f"a daemon exited; see {workdir}")
                now = time.monotonic()
                if now > deadline:
                    raise RuntimeError(f"timed out after {len(events)} blocks")
                if cpu_first and now >= next_scrape_s:
                    next_scrape_s = now + 2.0
                    # the metric is a maximum over 60 s: from then on it covers steady state only
                    if now - first_s >= min(60.0, steady_s):
                        for node in NODES:
                            lag = event_loop_lag_s(layout.metrics_url(node))
                            if lag is not None:
                                lags_s[node].append(lag)
                time.sleep(0.1)
            wall_s = time.monotonic() - first_s
            cpu_end = {name: cpu_seconds(p.pid) for name, p in processes.items()}
            wait_end = {name: runqueue_wait_s(p.pid) for name, p in processes.items()}
            peak_mb = {name: round(peak_resident_mb(p.pid), 1) for name, p in processes.items()}
            time.sleep(1.0)  # Bob's entry for the last block follows Alice's commit
            for node, follower in followers.items():
                for event in follower.new_events():
                    if event.get("event") == "block.turns":
                        turns[node][int(event["block"])] = list(event["round_trip_ms"])
                        role_s[node][int(event["block"])] = float(event["role_s"])
        finally:
            stop_nodes(list(processes.values()))
    cpu = cpu_end
    committed = [e for e in events if e["event"] == "block.committed"]
    steady_blocks = [int(e["block"]) for e in events[1:]]
    round_trips_ms = sorted(
        value for block in steady_blocks for value in turns["bob"].get(block, [])
    )
    secret_bits = sum(int(e["secret_bits"]) for e in committed)
    bound_bits = sum(bound_bits_of(event, settings) for event in committed)
    # rate over the steady state: from the first block's end to the last block's end
    span_s = events[-1]["t_s"] - events[0]["t_s"]
    steady_secret = secret_bits - (int(committed[0]["secret_bits"]) if committed else 0)
    steady_sifted = sum(int(e["sifted_bits"]) for e in committed[1:])
    sifted_per_s = round(steady_sifted / span_s, 1) if span_s > 0 else None
    block_sifted = round(sum(int(e["sifted_bits"]) for e in committed) / max(len(committed), 1))
    # post-processing throughput of a node: sifted bits over the wall time of the block's
    # exchange after the link delivered its records (Alice's log; Bob's is the same span)
    pp_sifted_per_s = round(
        sum(int(e["sifted_bits"]) for e in committed)
        / max(sum(float(e["postprocess_s"]) for e in committed), 1e-9)
    )
    pulses = block_pulses * len(committed)
    steady = events[1:]
    return {
        "link": link,
        "decoys": decoys,
        "distance_km": distance_km,
        "blocks_in_flight": in_flight,
        "alice_records": alice_records,
        "pa_family": pa_family,
        "cascade_frame_bits": cascade_frame_bits,
        "blocks": len(committed),
        "blocks_aborted": len(events) - len(committed),
        "block_pulses": block_pulses,
        "sifted_bits_per_block": block_sifted,
        "block_sifted_bits": block_sifted,
        "steady_s": round(span_s, 1),
        "sifted_bits_per_s": sifted_per_s,
        "secret_bits_per_s": round(steady_secret / span_s, 1) if span_s > 0 else None,
        "secret_bits_per_pulse": secret_bits / pulses if pulses else 0.0,
        "bound_bits_per_pulse": bound_bits / pulses if pulses else 0.0,
        "ratio_to_bound": round(secret_bits / bound_bits, 4) if bound_bits else None,
        "qber": round(sum(float(e["qber"]) for e in committed) / max(len(committed), 1), 5),
        "reconciliation_efficiency": round(
            sum(float(e["reconciliation_efficiency"]) for e in committed) / max(len(committed), 1),
            4,
        ),
        "sifted_bits_per_s_per_node": sifted_per_s,
        "postprocess_sifted_bits_per_s": pp_sifted_per_s,
        "pp_sifted_bits_per_s": pp_sifted_per_s,
        "round_trip_ms_p50": nearest_rank(round_trips_ms, 0.5),
        "round_trip_ms_p99": nearest_rank(round_trips_ms, 0.99),
        "round_trips_timed": len(round_trips_ms),
        "cpu_util_alice": round((cpu_end["alice"] - cpu_first["alice"]) / wall_s, 3),
        "cpu_util_bob": round((cpu_end["bob"] - cpu_first["bob"]) / wall_s, 3),
        **{
            f"runqueue_wait_{node}": round(
                sum(w - wait_first[node].get(tid, 0.0) for tid, w in wait_end[node].items())
                / wall_s,
                3,
            )
            for node in NODES
        },
        "peak_mb": peak_mb,
        "event_loop_lag_max_ms": {
            node: round(1000 * max(values), 1) if values else None
            for node, values in lags_s.items()
        },
        "cpu_s_per_node": {name: round(value, 2) for name, value in cpu.items()},
        "first_block_s": round(events[0]["t_s"], 2),
        "link_s_per_block": mean([float(e["link_s"]) for e in steady]),
        "postprocess_s_per_block": mean([float(e["postprocess_s"]) for e in steady]),
        "round_trips_per_block": mean(
            [float(e["round_trips"]) for e in steady if e["event"] == "block.committed"]
        ),
        "role_s_per_block": {
            node: mean([role_s[node][b] for b in steady_blocks if b in role_s[node]])
            for node in NODES
        },
        **(
            {
                "replay_recorded_blocks": replay_blocks,
                "replay_laps": round(len(events) / replay_blocks, 2),
                "recording_s": recording_s,
            }
            if link == "replay"
            else {}
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--km", default="10,25,50", help="comma-separated distances")
    parser.add_argument("--blocks", type=int, default=5, help="blocks per distance, at least")
    parser.add_argument(
        "--seconds",
        type=float,
        default=120.0,
        help="seconds after the first committed block per distance, at least",
    )
    parser.add_argument("--sifted-bits", type=int, default=1_000_000)
    parser.add_argument(
        "--in-flight", type=int, default=1, help="[postprocess] blocks_in_flight of both daemons"
    )
    parser.add_argument(
        "--link",
        default="simulated",
        help="comma-separated: simulated (the simulator runs in the daemons), replay (a "
        "recording of it read from disk)",
    )
    parser.add_argument(
        "--replay-blocks", type=int, default=20, help="blocks recorded for --link replay"
    )
    parser.add_argument(
        "--alice-records",
        choices=("every_pulse", "detected_pulses"),
        help="[link] alice_records of the simulated link (default: the config's default)",
    )
    parser.add_argument(
        "--pa-family",
        help="[postprocess] pa_family of both daemons (default: the config's default)",
    )
    parser.add_argument(
        "--cascade-frame-bits",
        type=int,
        help="[postprocess] cascade_frame_bits of both daemons (default: the config's default)",
    )
    parser.add_argument(
        "--decoys",
        type=int,
        choices=(1, 2),
        default=2,
        help='decoy intensities: 2 (security_model = "decoy") or 1 ("one_decoy")',
    )
    parser.add_argument(
        "--large-blocks",
        action="store_true",
        help="10^7 sifted bits per block, Alice keeping only her source's state "
        '(alice_records = "detected_pulses"), privacy amplification by mersenne-gmp-v1, '
        "Cascade in frames of at most 2^22 bits",
    )
    parser.add_argument("--quick", action="store_true", help="25 km, 3 blocks of 2.5e5 bits")
    parser.add_argument("--json", required=True, help="write the rows here")
    args = parser.parse_args()
    distances = [float(x) for x in args.km.split(",")]
    links = args.link.split(",")
    if not set(links) <= {"simulated", "replay"} or args.replay_blocks < 1:
        parser.error("--link takes simulated and/or replay; --replay-blocks at least 1")
    blocks, sifted_bits, steady_s = args.blocks, args.sifted_bits, args.seconds
    if args.quick:
        distances, blocks, sifted_bits, steady_s = [25.0], 3, 250_000, 0.0
    alice_records, pa_family = args.alice_records, args.pa_family
    cascade_frame_bits = args.cascade_frame_bits
    if args.large_blocks:
        sifted_bits = 10_000_000
        alice_records = alice_records or "detected_pulses"
        pa_family = pa_family or "mersenne-gmp-v1"
        cascade_frame_bits = 1 << 22 if cascade_frame_bits is None else cascade_frame_bits
    rows = []
    print(
        f"{'link':>9} {'km':>5} {'blocks':>6} {'secret b/s':>11} {'b/pulse':>10} {'bound':>10} "
        f"{'ratio':>6} {'QBER':>7} {'f':>6} {'sifted b/s':>11} {'pp b/s':>10} {'cpu A/B s':>12} "
        f"{'first s':>7} {'rt p50/p99 ms':>14} {'util A/B':>11} {'peak MB A/B':>12} "
        f"{'lag ms A/B':>11} {'rq wait A/B':>11}"
    )
    for link, distance in [(link, km) for km in distances for link in links]:
        row = run_distance(
            distance,
            blocks,
            sifted_bits,
            steady_s,
            args.in_flight,
            link,
            args.replay_blocks,
            alice_records=alice_records,
            pa_family=pa_family,
            cascade_frame_bits=cascade_frame_bits,
            decoys=args.decoys,
        )
        rows.append(row)
        print(
            f"{row['link']:>9} {row['distance_km']:>5.0f} {row['blocks']:>6} "
            f"{row['secret_bits_per_s']!s:>11} "
            f"{row['secret_bits_per_pulse']:>10.3e} {row['bound_bits_per_pulse']:>10.3e} "
            f"{row['ratio_to_bound']!s:>6} {row['qber']:>7.4f} "
            f"{row['reconciliation_efficiency']:>6} {row['sifted_bits_per_s_per_node']!s:>11} "
            f"{row['postprocess_sifted_bits_per_s']:>10} "
            f"{row['cpu_s_per_node']['alice']:>5}/{row['cpu_s_per_node']['bob']:<6} "
            f"{row['first_block_s']:>7} "
            f"{row['round_trip_ms_p50']!s:>6}/{row['round_trip_ms_p99']!s:<7} "
            f"{row['cpu_util_alice']:>5}/{row['cpu_util_bob']:<5} "
            f"{row['peak_mb']['alice']:>6}/{row['peak_mb']['bob']:<5} "
            f"{row['event_loop_lag_max_ms']['alice']!s:>5}/"
            f"{row['event_loop_lag_max_ms']['bob']!s:<5} "
            f"{row['runqueue_wait_alice']:>5}/{row['runqueue_wait_bob']:<5}",
            flush=True,
        )
    Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
