"""Scenario 22 between real daemons: resource exhaustion before authentication.

    python scripts/bench_preauth.py --json OUT [--phase-s 15] [--idle-connections 500]

Starts a daemon pair (the demo layout: certificates, ETSI 014 over mutual TLS, simulated link on
a 5 km fibre), waits for stored keys, then runs three phases of ``--phase-s`` seconds each:

- ``baseline``: no attack;
- ``frames``: attackers on Bob's peer listener, back to back: (a) a frame announcing 64 MiB
  whose bytes are then streamed, (b1) a Hello whose msgpack body is an array of 8 Mi nils with
  its honest length (8 MiB + headers) and the body streamed, (b2) the same array header inside a
  frame of exactly ``MIN_MAX_FRAME_BYTES`` (the body truncated to what the pre-auth limit lets
  through), (b3) the same frame filled with nested one-item arrays;
- ``idle``: ``--idle-connections`` TCP connections to Bob's peer listener opened and held
  silent, with the frame attackers still running.

Meanwhile, in every phase: Bob's RSS (``/proc/PID/status`` VmRSS, every 20 ms); a stall probe
(a tight loop of ``GET /metrics`` on Bob's metrics listener, one keep-alive connection: the
largest gap between two answers is the longest the daemon's trio loop stopped answering, plus
the client's own scheduling); key delivery (``enc_keys`` for one key at Alice as sae-a, then
``dec_keys`` of that ID at Bob as sae-b, paced at ``--pairs-per-s``): p50 / p99 / max of the pair
and of Bob's ``dec_keys`` alone.

Bob's ``qkdnode_event_loop_step_seconds`` histogram is read at each phase boundary: per phase
and task, the bucket bound every task step fits under. The steps of connections that have not
authenticated (``task="unauthenticated_connection"``) are the stall the attack itself causes;
the probe gap also holds the steps of Bob's own work (the simulated link, blocks).

Figures: RSS growth (largest RSS during an attack phase minus the largest in the baseline), the
attack's stall (the longest unauthenticated step in an attack phase), the probe gaps per phase,
key-delivery percentiles per phase, what the attackers got through (bytes Bob read before
closing, how many idle connections Bob closed at once). Acceptance: RSS growth <= 16 MiB,
stall <= 10 ms.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import multiprocessing
import re
import socket
import ssl
import struct
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qkdnode.channel.connection import MIN_MAX_FRAME_BYTES
from qkdnode.channel.framing import HEADER_BYTES
from qkdnode.demo.progress import LogFollower
from qkdnode.demo.run import DemoLayout, prepare_workdir, start_node, stop_nodes
from qkdnode.node.loopsteps import UNAUTHENTICATED_TASK

HELLO_CODE = 1
NO_BLOCK = 2**64 - 1
BIG_FRAME_BYTES = 64 << 20
NIL_COUNT = 8 << 20
CHUNK_BYTES = 64 << 10
DISTANCE_KM = 5.0
BLOCK_PULSES = 4_000_000
RSS_LIMIT_MIB = 16.0
STALL_LIMIT_MS = 10.0


def _header(code: int) -> bytes:
    return struct.pack(">BQQ", code, 0, NO_BLOCK)


def attack_payloads() -> dict[str, tuple[bytes, int]]:
    """name -> (bytes sent first, bytes streamed after them, zeros or nils)."""
    array_header = b"\xdd" + struct.pack(">I", NIL_COUNT)
    within = MIN_MAX_FRAME_BYTES - HEADER_BYTES
    honest_length = HEADER_BYTES + len(array_header) + NIL_COUNT
    return {
        "frame_64mib": (struct.pack(">I", BIG_FRAME_BYTES) + _header(HELLO_CODE), BIG_FRAME_BYTES),
        "nils_8mi_honest_length": (
            struct.pack(">I", honest_length) + _header(HELLO_CODE) + array_header,
            NIL_COUNT,
        ),
        "nils_8mi_at_limit": (
            struct.pack(">I", MIN_MAX_FRAME_BYTES)
            + _header(HELLO_CODE)
            + array_header
            + b"\xc0" * (within - len(array_header)),
            0,
        ),
        "nested_at_limit": (
            struct.pack(">I", MIN_MAX_FRAME_BYTES) + _header(HELLO_CODE) + b"\x91" * within,
            0,
        ),
    }


@dataclass
class AttackStats:
    attempts: int = 0
    bytes_sent: int = 0
    max_bytes_accepted: int = 0  # most bytes one connection took before Bob closed it
    closed_by_bob: int = 0
    answer_bytes: int = 0  # what Bob sent back before closing (a Close frame)
    seconds_to_close: list[float] = field(default_factory=list)


def run_attack(
    port: int,
    name: str,
    first: bytes,
    streamed: int,
    stats: AttackStats,
    stop: Any,
    interval_s: float,
    attempts: int | None = None,
) -> None:
    """Connect, send ``first``, stream ``streamed`` filler bytes, wait for Bob to close; again
    every ``interval_s`` until ``stop`` is set (or ``attempts`` were made)."""
    filler = (b"\xc0" if "nils" in name else b"\x00") * CHUNK_BYTES
    while not stop.is_set() and (attempts is None or stats.attempts < attempts):
        time.sleep(interval_s)
        stats.attempts += 1
        sent = 0
        started = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(first)
                sent = len(first)
                left = streamed
                while left > 0 and not stop.is_set():
                    piece = filler[: min(left, CHUNK_BYTES)]
                    sock.sendall(piece)
                    sent += len(piece)
                    left -= len(piece)
                sock.settimeout(20)
                while data := sock.recv(1 << 16):  # Bob may answer with a Close frame first
                    stats.answer_bytes += len(data)
                stats.closed_by_bob += 1
        except (ConnectionResetError, BrokenPipeError):
            stats.closed_by_bob += 1
        except OSError:
            pass
        stats.seconds_to_close.append(time.monotonic() - started)
        stats.bytes_sent += sent
        stats.max_bytes_accepted = max(stats.max_bytes_accepted, sent)


@dataclass
class IdleStats:
    opened: int = 0
    failed_to_open: int = 0
    closed_by_bob_within_1s: int = 0
    still_open_at_end: int = 0


def hold_idle(port: int, count: int, stats: IdleStats, stop: Any) -> None:
    sockets: list[tuple[socket.socket, float]] = []
    for _ in range(count):
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError:
            stats.failed_to_open += 1
            continue
        sock.setblocking(False)
        sockets.append((sock, time.monotonic()))
        stats.opened += 1
    closed: set[int] = set()
    while not stop.is_set():
        for index, (sock, opened_s) in enumerate(sockets):
            if index in closed:
                continue
            try:
                data = sock.recv(1 << 12)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data == b"":
                closed.add(index)
                if time.monotonic() - opened_s <= 1.0:
                    stats.closed_by_bob_within_1s += 1
        time.sleep(0.05)
    stats.still_open_at_end = len(sockets) - len(closed)
    for sock, _ in sockets:
        sock.close()


def attacker_process(
    port: int,
    idle_connections: int,
    interval_s: float,
    frames_go: Any,
    idle_go: Any,
    stop: Any,
    results: Any,
) -> None:
    """The attackers, in a process of their own (their loops never share a GIL with the
    probes): the frame attacks from ``frames_go``, the idle connections from ``idle_go``."""
    frames_go.wait()
    attacks = {name: AttackStats() for name in attack_payloads()}
    threads = [
        threading.Thread(
            target=run_attack,
            args=(port, name, first, streamed, attacks[name], stop, interval_s),
            daemon=True,
        )
        for name, (first, streamed) in attack_payloads().items()
    ]
    for thread in threads:
        thread.start()
    idle = IdleStats()
    idle_go.wait()
    holder = threading.Thread(
        target=hold_idle, args=(port, idle_connections, idle, stop), daemon=True
    )
    holder.start()
    stop.wait()
    for thread in [*threads, holder]:
        thread.join(timeout=30)
    results.put(
        {
            "attacks": {
                name: {
                    "attempts": s.attempts,
                    "closed_by_bob": s.closed_by_bob,
                    "answer_bytes": s.answer_bytes,
                    "max_bytes_sent": s.max_bytes_accepted,
                    "median_s_to_close": round(float(np.median(s.seconds_to_close)), 4)
                    if s.seconds_to_close
                    else None,
                }
                for name, s in attacks.items()
            },
            "idle": dict(idle.__dict__),
        }
    )


# ---- measurements ------------------------------------------------------------------------------


@dataclass
class Series:
    values: list[float] = field(default_factory=list)
    errors: int = 0


class Sampler:
    """Bob's RSS, the stall probe and the key-delivery loop, tagged with the current phase."""

    def __init__(self, layout: DemoLayout, bob_pid: int, pairs_per_s: float) -> None:
        self.layout = layout
        self.bob_pid = bob_pid
        self.pairs_interval_s = 1.0 / pairs_per_s
        self.phase = "warmup"
        self.stop = threading.Event()
        self.rss_kib: dict[str, Series] = {}
        self.gaps_ms: dict[str, Series] = {}
        self.pair_ms: dict[str, Series] = {}
        self.dec_ms: dict[str, Series] = {}

    def _series(self, table: dict[str, Series]) -> Series:
        return table.setdefault(self.phase, Series())

    def rss(self) -> None:
        path = Path(f"/proc/{self.bob_pid}/status")
        while not self.stop.is_set():
            for line in path.read_text().splitlines():
                if line.startswith("VmRSS:"):
                    self._series(self.rss_kib).values.append(float(line.split()[1]))
            time.sleep(0.02)

    def probe(self) -> None:
        port = self.layout.metrics_ports["bob"]
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        last = time.monotonic()
        phase = self.phase
        while not self.stop.is_set():
            try:
                connection.request("GET", "/metrics")
                connection.getresponse().read()
            except (OSError, http.client.HTTPException):
                self._series(self.gaps_ms).errors += 1
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                last = time.monotonic()
                continue
            now = time.monotonic()
            if self.phase == phase:
                self._series(self.gaps_ms).values.append((now - last) * 1000)
            phase = self.phase
            last = now

    def _tls(self, node: str, sae: str) -> http.client.HTTPSConnection:
        pki = self.layout.pki_dir
        context = ssl.create_default_context(cafile=str(self.layout.node_ca_dir / "ca.pem"))
        context.load_cert_chain(str(pki / f"{sae}.pem"), str(pki / f"{sae}.key"))
        return http.client.HTTPSConnection(
            "localhost", self.layout.kme_ports[node], context=context, timeout=15
        )

    def delivery(self) -> None:
        master = self._tls("alice", "sae-a")
        slave = self._tls("bob", "sae-b")
        headers = {"Content-Type": "application/json"}
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                body = json.dumps({"number": 1})
                master.request("POST", "/api/v1/keys/sae-b/enc_keys", body, headers)
                response = master.getresponse()
                issued = json.loads(response.read() or b"null")
                if response.status != 200:
                    raise RuntimeError(f"enc_keys {response.status} {issued}")
                ids = {"key_IDs": [{"key_ID": k["key_ID"]} for k in issued["keys"]]}
                dec_started = time.monotonic()
                slave.request("POST", "/api/v1/keys/sae-a/dec_keys", json.dumps(ids), headers)
                response = slave.getresponse()
                fetched = json.loads(response.read() or b"null")
                if response.status != 200 or fetched["keys"][0]["key"] != issued["keys"][0]["key"]:
                    raise RuntimeError(f"dec_keys {response.status}")
                done = time.monotonic()
                self._series(self.pair_ms).values.append((done - started) * 1000)
                self._series(self.dec_ms).values.append((done - dec_started) * 1000)
            except (OSError, http.client.HTTPException, RuntimeError, KeyError, ValueError) as exc:
                self._series(self.pair_ms).errors += 1
                print(f"delivery error in {self.phase}: {exc}"[:200], file=sys.stderr)
                master.close()
                slave.close()
                master = self._tls("alice", "sae-a")
                slave = self._tls("bob", "sae-b")
            time.sleep(max(0.0, self.pairs_interval_s - (time.monotonic() - started)))


_STEP_BUCKET = re.compile(
    r'^qkdnode_event_loop_step_seconds_bucket\{le="([^"]+)",task="([^"]*)"\} ([0-9.e+]+)$'
)


def step_buckets(port: int) -> dict[str, dict[float, float]]:
    """Bob's ``qkdnode_event_loop_step_seconds`` histogram now: task -> le -> cumulative count."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    connection.close()
    buckets: dict[str, dict[float, float]] = {}
    for line in text.splitlines():
        if match := _STEP_BUCKET.match(line):
            le, task, count = match.groups()
            buckets.setdefault(task, {})[float(le)] = float(count)
    return buckets


def longest_steps_ms(
    before: dict[str, dict[float, float]], after: dict[str, dict[float, float]]
) -> dict[str, float]:
    """Per task, the bucket bound that every step between the two snapshots fits under (ms;
    inf when one went past the largest bound); tasks without a step of 1 ms or more are left
    out."""
    longest: dict[str, float] = {}
    for task, counts in after.items():
        old = before.get(task, {})
        delta = {le: count - old.get(le, 0.0) for le, count in counts.items()}
        if not delta.get(math.inf):
            continue
        bound = min(le for le, count in delta.items() if count == delta[math.inf])
        longest[task] = bound * 1000
    return longest


def percentiles(series: Series | None) -> dict[str, Any]:
    if series is None or not series.values:
        return {"n": 0, "errors": 0 if series is None else series.errors}
    values = np.array(series.values)
    return {
        "n": int(values.size),
        "errors": series.errors,
        "p50_ms": round(float(np.percentile(values, 50)), 2),
        "p99_ms": round(float(np.percentile(values, 99)), 2),
        "max_ms": round(float(values.max()), 2),
    }


def wait_for_keys(layout: DemoLayout, keys: int, timeout_s: float) -> None:
    import sqlite3

    path = layout.store("alice") / "keys.db"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
            try:
                query = "SELECT count(*) FROM keys WHERE state = 'available' AND position % 2 = 0"
                if int(db.execute(query).fetchone()[0]) >= keys:
                    return
            except sqlite3.OperationalError:
                pass  # the daemon has not created its schema yet
            finally:
                db.close()
        time.sleep(0.5)
    raise RuntimeError(f"fewer than {keys} keys at Alice after {timeout_s} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--phase-s", type=float, default=15.0)
    parser.add_argument("--idle-connections", type=int, default=500)
    parser.add_argument("--pairs-per-s", type=float, default=5.0)
    parser.add_argument(
        "--attack-interval-s",
        type=float,
        default=0.2,
        help="pause between two attempts of one kind",
    )
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="qkdnode-preauth-"))
    layout = prepare_workdir(workdir, distance_km=DISTANCE_KM, block_pulses=BLOCK_PULSES)
    processes = {"bob": start_node(layout, "bob"), "alice": start_node(layout, "alice")}
    sampler = Sampler(layout, processes["bob"].pid, args.pairs_per_s)
    context = multiprocessing.get_context("spawn")
    frames_go, idle_go, stop_attacks = context.Event(), context.Event(), context.Event()
    results = context.Queue()
    attacker = context.Process(
        target=attacker_process,
        args=(
            layout.peer_port,
            args.idle_connections,
            args.attack_interval_s,
            frames_go,
            idle_go,
            stop_attacks,
            results,
        ),
        daemon=True,
    )
    attacker.start()
    threads: list[threading.Thread] = []
    attacked: dict[str, Any] = {}
    try:
        keys_needed = int(args.pairs_per_s * args.phase_s * 3 * 1.2) // 2
        wait_for_keys(layout, min(keys_needed, 200), timeout_s=180)
        for target in (sampler.rss, sampler.probe, sampler.delivery):
            threads.append(threading.Thread(target=target, daemon=True))
            threads[-1].start()
        time.sleep(2.0)  # connections open, first answers in
        metrics_port = layout.metrics_ports["bob"]
        snapshots = [step_buckets(metrics_port)]
        sampler.phase = "baseline"
        time.sleep(args.phase_s)
        snapshots.append(step_buckets(metrics_port))
        sampler.phase = "frames"
        frames_go.set()
        time.sleep(args.phase_s)
        snapshots.append(step_buckets(metrics_port))
        sampler.phase = "idle"
        idle_go.set()
        time.sleep(args.phase_s)
        snapshots.append(step_buckets(metrics_port))
        sampler.phase = "after"
        stop_attacks.set()
        attacked = results.get(timeout=60)
        attacker.join(timeout=10)
        time.sleep(2.0)
    finally:
        frames_go.set()
        idle_go.set()
        stop_attacks.set()
        sampler.stop.set()
        for thread in threads:
            thread.join(timeout=20)
        codes = stop_nodes([processes["alice"], processes["bob"]])
    bob_events = LogFollower(layout.log("bob")).new_events()
    refused = sum(1 for e in bob_events if e.get("event") == "channel.connection_refused")
    ended = sum(1 for e in bob_events if e.get("event") == "channel.session_ended")
    rss_base = max(sampler.rss_kib["baseline"].values)
    rss_attack = max(max(sampler.rss_kib[phase].values) for phase in ("frames", "idle"))
    growth_mib = (rss_attack - rss_base) / 1024
    phases = ("baseline", "frames", "idle", "after")
    stall = {phase: percentiles(sampler.gaps_ms.get(phase)) for phase in phases}
    stall_attack_ms = max(stall[p].get("max_ms", 0.0) for p in ("frames", "idle"))
    stall_baseline_ms = stall["baseline"].get("max_ms", 0.0)
    steps = {
        phase: longest_steps_ms(snapshots[n], snapshots[n + 1])
        for n, phase in enumerate(("baseline", "frames", "idle"))
    }
    # the stall an attacker causes: the longest step of any connection not yet authenticated
    # (the loop runs nothing else during a step); below 1 ms no step is recorded
    attack_step_ms = max(
        (steps[p].get(UNAUTHENTICATED_TASK, 1.0) for p in ("frames", "idle")), default=1.0
    )
    result = {
        "command": "python scripts/bench_preauth.py " + " ".join(argv or sys.argv[1:]),
        "phase_s": args.phase_s,
        "bob_rss_baseline_max_mib": round(rss_base / 1024, 1),
        "bob_rss_attack_max_mib": round(rss_attack / 1024, 1),
        "bob_rss_growth_mib": round(growth_mib, 1),
        "stall_probe_gap_ms": stall,
        "stall_attack_max_ms": stall_attack_ms,
        "stall_baseline_max_ms": stall_baseline_ms,
        "stall_excess_ms": round(stall_attack_ms - stall_baseline_ms, 2),
        "longest_task_step_ms_at_most": steps,
        "unauthenticated_step_ms_at_most": attack_step_ms,
        "stall_ok": attack_step_ms <= STALL_LIMIT_MS,
        "key_pair_latency": {p: percentiles(sampler.pair_ms.get(p)) for p in phases},
        "bob_dec_keys_latency": {p: percentiles(sampler.dec_ms.get(p)) for p in phases},
        **attacked,
        "bob_connection_refused_events": refused,
        "bob_session_ended_events": ended,
        "exit_codes": dict(zip(("alice", "bob"), codes, strict=True)),
        "rss_ok": growth_mib <= RSS_LIMIT_MIB,
        "stall_excess_ok": stall_attack_ms - stall_baseline_ms <= STALL_LIMIT_MS,
    }
    args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
