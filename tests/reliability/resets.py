"""Scenarios 19 and 21 between two daemon processes: TCP resets at every boundary after rotation.

    scripts/soak_resets [--resets N] [--boundaries hello,stage,...] [--crash alice|bob|both]
                        [--json OUT]

The pair runs behind the MITM proxy (``tests/reliability/proxy.py``). It bootstraps and rotates
to key-derived authentication first (the bootstrap window closes at the first committed block
that can pay for it). Then, one boundary after the other, the proxy forwards the frame that ends
the boundary and resets both TCP connections (RST), ``N`` times; the resets stop and the run waits
for key-derived blocks to commit again on both nodes. Boundaries (frame, direction):

- ``hello``: Alice's key-derived Hello reached Bob, his reply never reaches her;
- ``hello_reply``: Bob's HelloReply reached Alice, her Finish never reaches him;
- ``finish``: the handshake completed (Alice's Finish reached Bob), nothing after it passes;
- ``sync``: Alice's limbo ``sync`` control frame, the first frame after the handshake;
- ``mid_block``: the ``MID_BLOCK_DATA_FRAME``-th data frame Alice sends in a block;
- ``stage``, ``staged``, ``commit``, ``committed``: the two-phase commit of a block, each the
  control frame of that kind (Alice sends ``stage`` and ``commit``, Bob ``staged`` and
  ``committed``); the proxy reads the kind from the control frame's payload (authenticated, not
  encrypted).

With ``--crash``, each reset also kills that node (``both``: Alice and Bob in turn) with
SIGKILL at the boundary, and the run starts it again: a crash or restart at any boundary.

Every connection uses up one handshake key; a slot seeds 2^16 of them and a committed block
deposits up to 8 slots (``docs/authentication.md``). The proxy still counts them: it resets only
while the keys both nodes hold (sampled from the stores every 0.2 s) minus the connections
opened since stay at or above ``SLOT_MARGIN``, which with 2^16 keys a slot never stops a run,
so the resets at a boundary are consecutive. At a handshake boundary the connection open at
arming is reset at its next frame, and one that ran clean after its first commit (neither is
counted).

Checked from the wire, both daemons' structured logs and stores, from rotation on: no Hello
from Alice in another mode than key-derived (the proxy reads the Hello's ``mode``), no session
established in bootstrap mode (``channel.session_established`` ``mode``), no block committed in
bootstrap mode (``block.committed`` ``mode``/``auth_mode``), no ledger reset
(``auth.ledger_reset`` in the log; in the stored ledger, sampled while the resets run: ``active``
stays true and ``consumed_bits``, ``deposited_bits`` and ``handshake_first`` never go back),
blocks commit again on both nodes once the resets stop, both stores agree at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from qkdnode.channel.auth import BLOCK_DRAW_BITS
from qkdnode.channel.framing import HEADER_BYTES, LENGTH_BYTES
from qkdnode.channel.ledger import (
    HANDSHAKE_KEYS_PER_SLOT,
    LedgerState,
    ledger_state_from_bytes,
)
from tests.reliability.harness import Pair, StoreView, stores_agree
from tests.reliability.proxy import CODES, Direction, Frame, ProxyThread, Rule

KEY_DERIVED = "key_derived"
MID_BLOCK_DATA_FRAME = 5
SLOT_MARGIN = 3
# a short fibre and blocks of 4 Mpulses: ~16 kbit per block, ~2.5 s each on loopback; the
# bootstrap session commits until the pool holds its reserve and the rotation pool
# (``auth.rotation_pool_bits``), about 13 blocks with POOL_TARGET_BITS, then rotates
BLOCK_PULSES = 4_000_000
DISTANCE_KM = 5.0

# boundary -> (direction, frame code, control kind or None)
BOUNDARIES: dict[str, tuple[Direction, int, str | None]] = {
    "hello": ("a2b", CODES["hello"], None),
    "hello_reply": ("b2a", CODES["hello_reply"], None),
    "finish": ("a2b", CODES["finish"], None),
    "sync": ("a2b", CODES["control"], "sync"),
    "mid_block": ("a2b", CODES["data"], None),
    "stage": ("a2b", CODES["control"], "stage"),
    "staged": ("b2a", CODES["control"], "staged"),
    "commit": ("a2b", CODES["control"], "commit"),
    "committed": ("b2a", CODES["control"], "committed"),
}
HANDSHAKE_BOUNDARIES = frozenset({"hello", "hello_reply", "finish", "sync"})
# a reset at these costs the block's draws (1,024 pool bits) and commits nothing; the run has
# the daemons' default pool (the demo's is 32 kbit) and starts such a series only once the pool
# can pay every block of it above the reserve, as it can after a few commits
DRAWING_BOUNDARIES = frozenset(BOUNDARIES) - HANDSHAKE_BOUNDARIES
POOL_TARGET_BITS = 1 << 20


@dataclass
class BoundaryResult:
    boundary: str
    resets: int
    crashes: int
    bootstrap_sessions: int
    bootstrap_blocks: int
    ledger_resets: int
    commits_after: int
    seconds: float
    connections: int
    hellos: int = 0
    bootstrap_hellos: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.bootstrap_sessions == 0
            and self.bootstrap_hellos == 0
            and self.bootstrap_blocks == 0
            and self.ledger_resets == 0
            and self.commits_after > 0
            and not self.problems
        )


class SlotGate:
    """Decides, frame by frame in the proxy thread, whether a boundary may be reset now.

    ``credit`` estimates the handshake slots left on both nodes: the fewer either held at the
    last sample, minus the connections opened since."""

    def __init__(self, boundary: str, held_slots: int, opened_before: int) -> None:
        self.boundary = boundary
        self.opened_before = opened_before  # connections opened before arming
        self.direction, self.code, self.kind = BOUNDARIES[boundary]
        self.lock = threading.Lock()
        self.held_slots = held_slots
        self.connections: set[int] = set()
        self.since_sample: set[int] = set()
        self.commits = 0
        self.committed_on: set[int] = set()  # connections that committed a block
        self.data_frames: dict[tuple[int, int], int] = {}
        self.clean: set[int] = set()  # connections let through because of low credit
        self.hellos = 0
        self.bootstrap_hellos = 0  # Hellos Alice sent in another mode than key-derived

    def sampled(self, held_slots: int) -> None:
        with self.lock:
            self.held_slots = held_slots
            self.since_sample.clear()

    def credit(self) -> int:
        return self.held_slots - len(self.since_sample)

    def observe(self, frame: Frame) -> None:
        """Called for every frame while the reset rule is armed (its predicate)."""
        with self.lock:
            if frame.connection not in self.connections:
                self.connections.add(frame.connection)
                self.since_sample.add(frame.connection)
            if frame.code == CODES["hello"] and frame.direction == "a2b":
                self.hellos += 1
                if hello_mode(frame) != KEY_DERIVED:
                    self.bootstrap_hellos += 1
            control = frame.control()
            if frame.direction == "b2a" and control is not None and control[0] == "committed":
                self.commits += 1
                self.committed_on.add(frame.connection)

    def at_boundary(self, frame: Frame) -> bool:
        if frame.direction != self.direction or frame.code != self.code:
            return False
        if self.kind is not None:
            control = frame.control()
            return control is not None and control[0] == self.kind
        if self.boundary == "mid_block":
            key = (frame.connection, frame.block)
            count = self.data_frames.get(key, 0) + 1
            self.data_frames[key] = count
            return count == MID_BLOCK_DATA_FRAME
        return True

    def reset_here(self, frame: Frame) -> bool:
        self.observe(frame)
        with self.lock:
            if not self.at_boundary(frame):
                return False
            if self.credit() < SLOT_MARGIN:
                self.clean.add(frame.connection)
                return False
            # a connection let through runs until it commits a block; after that its next
            # boundary may be reset again
            return frame.connection not in self.clean or frame.connection in self.committed_on

    def recycle_here(self, frame: Frame) -> bool:
        """At a handshake boundary, end the connections that cannot reach it any more: the one
        open at arming, and one let through once it committed a block."""
        with self.lock:
            return self.boundary in HANDSHAKE_BOUNDARIES and (
                frame.connection <= self.opened_before
                or (frame.connection in self.clean and frame.connection in self.committed_on)
            )


def stored_ledger(path: Path) -> bytes | None:
    """The ledger state a store holds (only that row: the sampler reads it every 0.2 s)."""
    if not path.exists():
        return None
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        row = db.execute("SELECT state FROM auth_ledger WHERE singleton = 1").fetchone()
    finally:
        db.close()
    return None if row is None else bytes(row[0])


def hello_mode(frame: Frame) -> str | None:
    """The ``mode`` field of a Hello frame's payload (a msgpack map; any tag after it is
    ignored), or None if it cannot be read."""
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(frame.raw[LENGTH_BYTES + HEADER_BYTES :])
    try:
        value = next(unpacker)
    except (StopIteration, ValueError):
        return None
    return str(value.get("mode")) if isinstance(value, dict) else None


def held_slots(state: LedgerState) -> int:
    """The unused handshake keys a ledger holds (the name is the gate's unit of credit)."""
    first = state.handshake_first * HANDSHAKE_KEYS_PER_SLOT + state.handshake_next_key
    return max(0, state.handshake_deposited * HANDSHAKE_KEYS_PER_SLOT - first)


@dataclass
class LedgerWatch:
    """Samples both stored ledgers; a reset shows as a counter that went back or ``active``
    turning false."""

    last: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    samples: int = 0

    def sample(self, pair: Pair) -> dict[str, LedgerState]:
        states = {}
        for node in ("alice", "bob"):
            blob = stored_ledger(pair.layout.store(node) / "keys.db")
            if blob is None:
                continue
            state = ledger_state_from_bytes(blob)
            states[node] = state
            self.check(node, state)
        self.samples += 1
        return states

    def check(self, node: str, state: LedgerState) -> None:
        counters = (state.consumed_bits, state.deposited_bits, state.handshake_first)
        previous = self.last.get(node)
        if not state.active:
            self.problems.append(f"{node}: ledger inactive ({state!r})")
        if previous is not None and any(
            now < before for now, before in zip(counters, previous, strict=True)
        ):
            self.problems.append(f"{node}: ledger went back {previous} -> {counters}")
        self.last[node] = counters


def _after(pair: Pair, node: str, start: int, event: str) -> list[dict[str, Any]]:
    return [e for e in pair.events[node][start:] if e.get("event") == event]


def _violations(pair: Pair, marks: dict[str, int]) -> tuple[int, int, int, list[str]]:
    """(bootstrap sessions, bootstrap blocks, ledger resets, details) since ``marks``; the
    details also name every exhausted pool."""
    sessions = blocks = resets = 0
    details = []
    for node in ("alice", "bob"):
        for event in _after(pair, node, marks[node], "channel.session_established"):
            if event.get("mode") != KEY_DERIVED:
                sessions += 1
                details.append(f"{node} session {event.get('mode')} at {event.get('timestamp')}")
        for event in _after(pair, node, marks[node], "block.committed"):
            modes = {event.get("mode"), event.get("auth_mode")}
            if modes != {KEY_DERIVED}:
                blocks += 1
                details.append(f"{node} block {event.get('block')} committed in {modes}")
        for event in _after(pair, node, marks[node], "auth.mode"):
            if event.get("mode") != KEY_DERIVED:
                details.append(f"{node} auth.mode {event.get('mode')}")
        found = _after(pair, node, marks[node], "auth.ledger_reset")
        resets += len(found)
        details.extend(f"{node} auth.ledger_reset at {e.get('timestamp')}" for e in found)
        # normal operation, resets included, never runs the pool dry
        for event in _after(pair, node, marks[node], "auth.pool_exhausted"):
            details.append(f"{node} auth.pool_exhausted at {event.get('timestamp')}")
    return sessions, blocks, resets, details


def _commits(pair: Pair, node: str, start: int) -> int:
    return len(_after(pair, node, start, "block.committed"))


def rotate(pair: Pair, *, timeout_s: float) -> None:
    """Wait until both nodes committed a block in key-derived mode (the window is closed)."""

    def rotated(p: Pair) -> bool:
        return all(
            any(e.get("auth_mode") == KEY_DERIVED for e in p.named(node, "block.committed"))
            for node in ("alice", "bob")
        )

    pair.wait(rotated, timeout_s=timeout_s, what="rotation to key-derived")


def wait_for_pool(
    pair: Pair, watch: LedgerWatch, above_reserve_bits: int, *, timeout_s: float
) -> None:
    """Wait until both stored ledgers hold ``above_reserve_bits`` above their reserve."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = watch.sample(pair)
        levels = [s.deposited_bits - s.consumed_bits - s.reserve_bits for s in states.values()]
        if len(levels) == 2 and min(levels) >= above_reserve_bits:
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"the pools hold {levels} bits above the reserve, not {above_reserve_bits}"
            )
        pair.poll()
        time.sleep(0.5)


def restart_killed(pair: Pair, crash: tuple[str, ...]) -> None:
    """Start again a node this run killed (``crash``); any other exit is a failure."""
    for node, process in pair.processes.items():
        code = process.poll()
        if code is None:
            continue
        if node in crash and code == -signal.SIGKILL:
            pair.start(node)
            continue
        raise AssertionError(f"{node} exited with {code}: {pair.stderr(node)[-1500:]}")


def run_boundary(
    pair: Pair,
    thread: ProxyThread,
    watch: LedgerWatch,
    boundary: str,
    resets: int,
    *,
    timeout_s: float,
    recover_blocks: int = 2,
    crash: tuple[str, ...] = (),
    log: Callable[[str], None] = lambda line: None,
) -> BoundaryResult:
    """Reset ``resets`` times at ``boundary`` (with ``crash``, also kill -9 those nodes in
    turn at each reset and start them again), stop, wait for ``recover_blocks`` key-derived
    commits on both nodes; check the logs and ledgers of the whole phase."""
    proxy = thread.proxy
    if boundary in DRAWING_BOUNDARIES:
        wait_for_pool(pair, watch, (resets + 4) * BLOCK_DRAW_BITS, timeout_s=timeout_s / 2)
    pair.poll()
    marks = {node: len(pair.events[node]) for node in ("alice", "bob")}
    states = watch.sample(pair)
    slots = min((held_slots(s) for s in states.values()), default=0)
    gate = SlotGate(boundary, slots, proxy.journal.connections)
    started = time.monotonic()
    fired_before = len(proxy.tamperings())
    crashes = {"count": 0}
    killed: list[subprocess.Popen[bytes]] = []

    def reset_or_crash_here(frame: Frame) -> bool:
        hit = gate.reset_here(frame)
        if hit and crash:
            # kill -9 in the proxy thread, before the frame's successor can pass: the node
            # dies exactly at the boundary (its store holds what it wrote before the frame)
            node = crash[crashes["count"] % len(crash)]
            crashes["count"] += 1
            process = pair.processes[node]
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
                killed.append(process)
        return hit

    reset_rule = Rule(action="reset", times=resets, predicate=reset_or_crash_here)
    recycle_rule = Rule(action="reset", times=10**6, predicate=gate.recycle_here)
    proxy.add(reset_rule, recycle_rule)
    problems: list[str] = []
    deadline = started + timeout_s
    last_log = started
    try:
        while reset_rule.times > 0:
            pair.poll()
            states = watch.sample(pair)
            gate.sampled(min((held_slots(s) for s in states.values()), default=0))
            restart_killed(pair, crash)
            now = time.monotonic()
            if now > deadline:
                problems.append(
                    f"only {resets - reset_rule.times}/{resets} resets in {timeout_s} s"
                )
                break
            if now - last_log > 30:
                last_log = now
                log(
                    f"  {boundary}: {resets - reset_rule.times}/{resets} resets, "
                    f"{len(gate.connections)} connections, {gate.commits} commits, "
                    f"credit {gate.credit()}"
                )
            time.sleep(0.2)
    finally:
        proxy.clear()
    done = resets - reset_rule.times
    fired = [t for t in proxy.tamperings()[fired_before:] if t.action == "reset"]
    if len(fired) < done:
        problems.append(f"journal shows {len(fired)} resets for {done} fired")
    stopped = {node: len(pair.events[node]) for node in ("alice", "bob")}
    try:
        if crash:
            for process in killed:  # a kill sent as the last reset fired may not have landed
                process.wait(timeout=10)
            restart_killed(pair, crash)
        pair.wait(
            lambda p: all(
                sum(
                    1
                    for e in p.events[n][stopped[n] :]
                    if e.get("event") == "block.committed" and e.get("auth_mode") == KEY_DERIVED
                )
                >= recover_blocks
                for n in ("alice", "bob")
            ),
            timeout_s=max(60.0, timeout_s / 4),
            what=f"key-derived commits after the {boundary} resets",
        )
    except AssertionError as error:
        problems.append(str(error)[:300])
    pair.poll()
    watch.sample(pair)
    sessions, blocks, ledger_resets, details = _violations(pair, marks)
    problems.extend(details)
    commits_after = min(_commits(pair, n, stopped[n]) for n in ("alice", "bob"))
    return BoundaryResult(
        boundary=boundary,
        resets=done,
        crashes=crashes["count"],
        bootstrap_sessions=sessions,
        bootstrap_blocks=blocks,
        ledger_resets=ledger_resets,
        commits_after=commits_after,
        seconds=round(time.monotonic() - started, 1),
        connections=len(gate.connections),
        hellos=gate.hellos,
        bootstrap_hellos=gate.bootstrap_hellos,
        problems=problems,
    )


@dataclass
class ResetsReport:
    results: list[BoundaryResult]
    rotation_s: float
    total_s: float
    ledger_samples: int
    ledger_problems: list[str]
    store_problems: list[str]
    exit_codes: dict[str, int | None]

    @property
    def ok(self) -> bool:
        return (
            all(r.ok for r in self.results)
            and not self.ledger_problems
            and not self.store_problems
            and all(code == 0 for code in self.exit_codes.values())
        )

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        return out


def run_resets(
    workdir: Path,
    resets: int,
    boundaries: list[str],
    *,
    boundary_timeout_s: float = 900.0,
    recover_blocks: int = 2,
    block_pulses: int = BLOCK_PULSES,
    pool_target_bits: int = POOL_TARGET_BITS,
    crash: tuple[str, ...] = (),
    log: Callable[[str], None] = lambda line: None,
) -> ResetsReport:
    started = time.monotonic()
    pair = Pair.create(
        workdir,
        block_pulses=block_pulses,
        distance_km=DISTANCE_KM,
        pool_target_bits=pool_target_bits,
    )
    thread = ProxyThread(pair.layout.peer_port)
    pair.route_alice_to(thread.start())
    watch = LedgerWatch()
    results: list[BoundaryResult] = []
    codes: dict[str, int | None] = {}
    try:
        pair.start_both()
        rotate(pair, timeout_s=180)
        rotation_s = time.monotonic() - started
        log(f"rotated to key-derived after {rotation_s:.1f} s")
        for boundary in boundaries:
            result = run_boundary(
                pair,
                thread,
                watch,
                boundary,
                resets,
                timeout_s=boundary_timeout_s,
                recover_blocks=recover_blocks,
                crash=crash,
                log=log,
            )
            results.append(result)
            log(format_row(result))
    finally:
        codes = pair.stop()
        thread.stop()
    store_problems = stores_agree(
        StoreView.read(pair.layout.store("alice") / "keys.db"),
        StoreView.read(pair.layout.store("bob") / "keys.db"),
    )
    return ResetsReport(
        results=results,
        rotation_s=round(rotation_s, 1),
        total_s=round(time.monotonic() - started, 1),
        ledger_samples=watch.samples,
        ledger_problems=watch.problems[:20],
        store_problems=store_problems[:20],
        exit_codes=codes,
    )


HEADER = (
    f"{'boundary':<12} {'resets':>6} {'kills':>5} {'conns':>6} {'hellos':>6} {'boot hello':>10} "
    f"{'boot sess':>9} {'boot blk':>8} "
    f"{'ledger rst':>10} {'commits after':>13} {'seconds':>8}  result"
)


def format_row(r: BoundaryResult) -> str:
    return (
        f"{r.boundary:<12} {r.resets:>6} {r.crashes:>5} {r.connections:>6} {r.hellos:>6} "
        f"{r.bootstrap_hellos:>10} {r.bootstrap_sessions:>9} "
        f"{r.bootstrap_blocks:>8} {r.ledger_resets:>10} {r.commits_after:>13} {r.seconds:>8.1f}  "
        f"{'PASS' if r.ok else 'FAIL ' + '; '.join(r.problems)[:300]}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--resets", type=int, default=100, help="resets per boundary")
    parser.add_argument("--boundaries", default=",".join(BOUNDARIES))
    parser.add_argument("--boundary-timeout-s", type=float, default=900.0)
    parser.add_argument("--block-pulses", type=int, default=BLOCK_PULSES)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--crash",
        choices=("alice", "bob", "both"),
        default=None,
        help="also kill -9 this node (both: each in turn) at every reset, then start it again",
    )
    args = parser.parse_args(argv)
    crash = {None: (), "alice": ("alice",), "bob": ("bob",), "both": ("alice", "bob")}[args.crash]
    boundaries = [b for b in args.boundaries.split(",") if b]
    unknown = [b for b in boundaries if b not in BOUNDARIES]
    if unknown:
        parser.error(f"unknown boundaries {unknown}; known: {', '.join(BOUNDARIES)}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="qkdnode-resets-"))
    print(f"workdir {workdir}", flush=True)
    print(HEADER, flush=True)
    report = run_resets(
        workdir,
        args.resets,
        boundaries,
        boundary_timeout_s=args.boundary_timeout_s,
        block_pulses=args.block_pulses,
        crash=crash,
        log=lambda line: print(line, flush=True),
    )
    print(f"\n{HEADER}")
    for result in report.results:
        print(format_row(result))
    print(
        f"rotation {report.rotation_s} s, total {report.total_s} s; ledger samples "
        f"{report.ledger_samples}, ledger problems {len(report.ledger_problems)}; "
        f"store disagreements {len(report.store_problems)}; exit codes {report.exit_codes}"
    )
    for problem in report.ledger_problems + report.store_problems:
        print(f"  {problem}")
    if args.json:
        args.json.write_text(json.dumps(report.to_json(), indent=2))
    print("PASS" if report.ok else "FAIL")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
