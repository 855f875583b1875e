"""Issue #19's acceptance run: kill -9 of each node of a real three-node chain while a
third-party ETSI 014 client takes relayed keys at both ends.

    scripts/soak_relay_kills [--kills-per-node 20] [--seed N] [--json OUT] [--workdir DIR]

The chain A–R–C of ``qkdnode demo --topology chain`` (``qkdnode.demo.chain.prepare_chain``) runs
as three ``qkdnode run`` processes of this checkout. Once every link commits key-derived blocks,
two client threads use the third-party client ``etsi_qkd_014_client.QKD014Client``: one is
``sae-a`` at A, master for ``sae-b`` (C's SAE; C's KME is the demo PKI's "bob"), and fetches
the keys it got as ``sae-b`` at C by their IDs; the other is the reverse. A slave fetch that
fails (503, 400 while the terminal still waits for the origin's decision, connection errors
while a node is down) is retried until it succeeds or the final deadline. Slave fetches go one
key ID per call: a call for a key whose relay is still prepared at the terminal waits up to
``[relay] timeout_s`` (5 s) there, and several such keys in one call could outlast the client's
fixed 10 s timeout, after which the KME may hand out keys whose answer nobody reads.

A seeded killer (one ``random.Random(seed)`` for every choice) kills each node
``--kills-per-node`` times with SIGKILL of its process group, the nodes interleaved at random:
each kill comes 0.5–4 s after the previous restarted node's links were up again, the node stays
down 0.2–2 s, then starts again, and the run waits until it logs a session established on each
of its links. Then a quiet phase: no kills, the clients keep running ``QUIET_S``, the masters
stop, and the run waits (up to ``DRAIN_S``) until every key a master got was fetched at the
slave; a sample of fetched key IDs is asked for a second time (it must be refused). The run
waits until no relay is unfinished in any store, stops the nodes with SIGTERM and opens the
three relay stores.

Counted (the JSON summary; all three must be 0):

- ``delivered_twice``: a key ID handed to a master twice, a key ID fetched twice at a slave
  (the second-fetch sample included), the same key bytes under two key IDs;
- ``lost``: a key a master got that the slave never got, or got with other bytes; a relay
  finished committed at one end and aborted or absent at the other; a key handed to a master
  whose relay is not committed at its origin;
- ``half_relayed``: a relay unfinished in any store after quiet; a relay aborted at its origin
  whose key is still deliverable at its terminal (or a middle node's decision that differs
  from the origin's).

A key the slave's KME handed out (its relay store erased it, its audit trail records the
delivery) whose HTTP answer never reached the client, because the node was killed between the
durable hand-out and the answer, is counted apart as ``answers_lost``, with the kill that cut it
off and the client's last attempts: ETSI 014 has no acknowledgement of a delivery, so a KME
cannot tell an answer lost on the way from one received, and handing the key out again would
break "once". It is not a fault of the relay (the same holds for a direct key) but the slave
SAE never got the key: the issue's client-side "lost" is ``lost + answers_lost``.

Reported beside them: kills per node, keys taken and fetched each way, client errors by kind,
``orphans`` (committed keys handed out at the origin that no master received, still
deliverable at the terminal: an ETSI 014 answer lost to a kill; not a loss of the protocol,
nobody holds the key), relay counts per node, wall times, exit codes.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from etsi_qkd_014_client import QKD014Client

from qkdnode.demo.chain import SAE_OF_KME, ChainLayout, ChainProgress, prepare_chain
from qkdnode.demo.progress import LogFollower
from qkdnode.demo.run import start_process, stop_nodes
from qkdnode.relay.events import Position, RelayRecord, RelayState
from qkdnode.store.relaystore import RelayStore
from tests.reliability.harness import REPO, wait_until_catches_sigterm

# blocks of 20 Mpulses (half the demo's): each link commits about twice as often, and every
# block still distils key at the demo's 25 km
BLOCK_PULSES: Final = 20_000_000
KEYS_PER_REQUEST: Final = 2
CLIENT_PAUSE_S: Final = 0.2  # between two rounds of a client (master request + fetches)
FETCH_BATCH: Final = 16  # slave fetches per round at most (one key ID per call)
UP_DELAY_S: Final = (0.5, 4.0)  # a kill comes this long after the previous node came back
DOWN_S: Final = (0.2, 2.0)
QUIET_S: Final = 20.0
DRAIN_S: Final = 120.0
READY_TIMEOUT_S: Final = 300.0
LINKS_UP_TIMEOUT_S: Final = 90.0
SETTLE_TIMEOUT_S: Final = 60.0
SECOND_FETCH_SAMPLE: Final = 40  # per direction
FAILURES_PER_ROUND: Final = 2  # a fetch round stops after this many failed calls
ATTEMPTS_KEPT: Final = 12
STUCK_REFUSALS: Final = 10  # the drain ends early when every key left met this many 400s


@dataclass
class Ledger:
    """What one direction's client saw; the lock guards every field."""

    name: str
    issued: dict[str, bytes] = field(default_factory=dict)  # key ID -> bytes, from the master
    fetched: dict[str, bytes] = field(default_factory=dict)  # key ID -> bytes, at the slave
    pending: list[str] = field(default_factory=list)  # issued, not fetched yet
    issued_twice: list[str] = field(default_factory=list)
    fetched_twice: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # fetched with other bytes
    master_requests_ok: int = 0
    # per key not fetched yet: the outcomes of its slave fetches (the last ATTEMPTS_KEPT), and
    # how many 400s in a row it met since the last other outcome
    attempts: dict[str, list[str]] = field(default_factory=dict)
    refused_in_a_row: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class Direction:
    name: str  # "A->C"
    master: QKD014Client
    slave: QKD014Client
    master_sae: str
    slave_sae: str


def _client(layout: ChainLayout, kme: str) -> QKD014Client:
    pki = layout.kmes.pki_dir
    sae = SAE_OF_KME[kme]
    return QKD014Client(
        f"localhost:{layout.kmes.kme_ports[kme]}",
        str(pki / f"{sae}.pem"),
        str(pki / f"{sae}.key"),
        str(layout.kmes.node_ca_dir / "ca.pem"),
    )


def directions(layout: ChainLayout) -> list[Direction]:
    a, c = _client(layout, "alice"), _client(layout, "bob")
    return [
        Direction("A->C", a, c, SAE_OF_KME["alice"], SAE_OF_KME["bob"]),
        Direction("C->A", c, a, SAE_OF_KME["bob"], SAE_OF_KME["alice"]),
    ]


def _error_kind(role: str, exc: BaseException) -> str:
    return f"{role}_{type(exc).__name__}"


def master_round(direction: Direction, ledger: Ledger) -> None:
    """One request for KEYS_PER_REQUEST keys as master; every key recorded."""
    try:
        code, data = direction.master.get_key(direction.slave_sae, number=KEYS_PER_REQUEST)
    except Exception as exc:  # connection refused/reset, timeout, a body that is not JSON
        with ledger.lock:
            ledger.errors[_error_kind("master", exc)] += 1
        return
    with ledger.lock:
        if code != 200:
            ledger.errors[f"master_http_{code}"] += 1
            return
        ledger.master_requests_ok += 1
        for key in data.keys:
            key_id, key_bytes = str(key.key_id), base64.b64decode(key.key)
            if key_id in ledger.issued:
                ledger.issued_twice.append(key_id)
                continue
            ledger.issued[key_id] = key_bytes
            ledger.pending.append(key_id)


def fetch_one(direction: Direction, key_id: str) -> tuple[int | str, bytes | None]:
    """(HTTP status or error kind, the key's bytes on 200) of one slave fetch."""
    try:
        code, data = direction.slave.get_key_with_key_IDs(direction.master_sae, [key_id])
    except Exception as exc:
        return _error_kind("slave", exc), None
    if code != 200:
        return code, None
    keys = list(data.keys)
    if len(keys) != 1 or str(keys[0].key_id) != key_id:
        return "slave_wrong_keys", None
    return 200, base64.b64decode(keys[0].key)


def fetch_round(direction: Direction, ledger: Ledger) -> None:
    """Fetch pending keys at the slave, oldest first, one per call. A key that fails goes to
    the back of the queue (a key refused for good blocks none behind it); the round stops
    after FAILURES_PER_ROUND failures (the node is down or the keys not decided there yet:
    the next round retries)."""
    with ledger.lock:
        batch = ledger.pending[:FETCH_BATCH]
    failures = 0
    for key_id in batch:
        outcome, key_bytes = fetch_one(direction, key_id)
        with ledger.lock:
            if outcome != 200 or key_bytes is None:
                kind = f"slave_http_{outcome}" if isinstance(outcome, int) else outcome
                ledger.errors[kind] += 1
                seen = ledger.attempts.setdefault(key_id, [])
                seen.append(f"{time.time():.3f} {kind}")
                if len(seen) > ATTEMPTS_KEPT:  # the first ones and the last
                    del seen[ATTEMPTS_KEPT - 1 : -1]
                if outcome == 400:
                    ledger.refused_in_a_row[key_id] += 1
                else:
                    ledger.refused_in_a_row.pop(key_id, None)
                ledger.pending.remove(key_id)
                ledger.pending.append(key_id)
                failures += 1
                if failures >= FAILURES_PER_ROUND:
                    return
                continue
            ledger.attempts.pop(key_id, None)
            ledger.refused_in_a_row.pop(key_id, None)
            if key_id in ledger.fetched:
                ledger.fetched_twice.append(key_id)
            ledger.fetched[key_id] = key_bytes
            if key_bytes != ledger.issued.get(key_id):
                ledger.mismatched.append(key_id)
            ledger.pending.remove(key_id)


def client_loop(
    direction: Direction, ledger: Ledger, masters_stop: threading.Event, stop: threading.Event
) -> None:
    while not stop.is_set():
        if not masters_stop.is_set():
            master_round(direction, ledger)
        fetch_round(direction, ledger)
        stop.wait(CLIENT_PAUSE_S)


def second_fetches(direction: Direction, ledger: Ledger, rng: random.Random) -> tuple[int, int]:
    """Ask again for a sample of fetched key IDs: (asked, delivered again); a key delivered
    again is recorded as fetched twice."""
    with ledger.lock:
        fetched = sorted(ledger.fetched)
    sample = rng.sample(fetched, min(SECOND_FETCH_SAMPLE, len(fetched)))
    again = 0
    for key_id in sample:
        outcome, _bytes = fetch_one(direction, key_id)
        if outcome == 200:
            again += 1
            with ledger.lock:
                ledger.fetched_twice.append(key_id)
    return len(sample), again


class Chain:
    """The three processes, their logs followed."""

    def __init__(self, layout: ChainLayout) -> None:
        self.layout = layout
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.followers = {name: LogFollower(layout.log(name)) for name in layout.names}
        self.events: dict[str, list[dict[str, Any]]] = {name: [] for name in layout.names}
        self.progress = ChainProgress(layout)
        self.neighbours = {
            name: [n for pair in layout.links if name in pair for n in pair if n != name]
            for name in layout.names
        }

    def start(self, name: str) -> None:
        self.processes[name] = start_process(self.layout.workdir, self.layout.config(name), name)
        wait_until_catches_sigterm(self.processes[name])

    def kill(self, name: str) -> None:
        process = self.processes[name]
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def drain(self) -> None:
        for name, follower in self.followers.items():
            for event in follower.new_events():
                self.events[name].append(event)
                self.progress.feed(name, event)

    def exited(self) -> dict[str, int]:
        return {n: code for n, p in self.processes.items() if (code := p.poll()) is not None}

    def links_up(self, name: str, since: int) -> bool:
        """``name`` logged a session established on each of its links since event ``since``."""
        found = [
            e for e in self.events[name][since:] if e.get("event") == "channel.session_established"
        ]
        peers = {str(e["peer"]) for e in found if e.get("peer")}
        wanted = self.neighbours[name]
        return len(found) >= len(wanted) and (not peers or peers >= set(wanted))


def unfinished_counts(layout: ChainLayout) -> dict[str, int]:
    """Unfinished relays per node, read from the running daemons' stores (read-only)."""
    counts = {}
    for name in layout.names:
        path = layout.store(name) / "relay" / "relay.db"
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            row = db.execute("SELECT COUNT(*) FROM relays WHERE finished = 0").fetchone()
            counts[name] = int(row[0])
        except sqlite3.Error:
            counts[name] = -1
        finally:
            db.close()
    return counts


@dataclass
class StoreCheck:
    lost: list[str] = field(default_factory=list)
    half_relayed: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    relays: dict[str, dict[str, int]] = field(default_factory=dict)
    deliverable: dict[str, set[str]] = field(default_factory=dict)  # node -> key IDs


def check_stores(layout: ChainLayout, ledgers: dict[str, Ledger]) -> StoreCheck:
    """The relay stores after the stop (module docstring)."""
    check = StoreCheck()
    names = layout.names
    stores = {n: RelayStore.open(layout.store(n) / "relay", node_name=n) for n in names}
    try:
        records = {n: s.records() for n, s in stores.items()}
        deliverable = {n: {str(k) for k in s.deliverable_ids()} for n, s in stores.items()}
        check.deliverable = deliverable
        for name, store in stores.items():
            check.half_relayed += [
                f"{r.key_id} unfinished at {name} ({r.position.value} {r.state.value})"
                for r in store.unfinished_relays()
            ]
            check.relays[name] = dict(
                Counter(f"{r.position.value}_{r.state.value}" for r in records[name].values())
            )
    finally:
        for store in stores.values():
            store.close()
    issued = {k for ledger in ledgers.values() for k in ledger.issued}
    for origin in (names[0], names[-1]):
        for key_id, record in records[origin].items():
            if record.position is not Position.ORIGIN:
                continue
            terminal = record.route[-1]
            other = records[terminal].get(key_id)
            ok_terminal = _check_relay(check, key_id, record, other, deliverable[terminal])
            for middle in record.route[1:-1]:
                seen = records[middle].get(key_id)
                if (
                    seen is not None
                    and seen.state.finished
                    and ok_terminal
                    and seen.state is not record.state
                ):
                    check.half_relayed.append(
                        f"{key_id}: {record.state.value} at {origin}, "
                        f"{seen.state.value} at {middle}"
                    )
            handed_out_at_origin = record.state is RelayState.COMMITTED and (
                str(key_id) not in deliverable[origin]
            )
            if (
                handed_out_at_origin
                and str(key_id) not in issued
                and str(key_id) in deliverable[terminal]
            ):
                check.orphans.append(f"{key_id} ({origin}->{terminal})")
        # the terminal's side: a relay committed there must be committed at the origin
        terminal = names[-1] if origin == names[0] else names[0]
        for key_id, record in records[terminal].items():
            if record.position is Position.TERMINAL and record.route[0] == origin:
                at_origin = records[origin].get(key_id)
                if record.state is RelayState.COMMITTED and (
                    at_origin is None or at_origin.state is not RelayState.COMMITTED
                ):
                    check.lost.append(
                        f"{key_id}: committed at {terminal}, "
                        f"{'absent' if at_origin is None else at_origin.state.value} at {origin}"
                    )
    for ledger in ledgers.values():
        origin = ledger.name.split("->")[0]
        for issued_id in ledger.issued:
            held = records[origin].get(uuid.UUID(issued_id))
            if held is None or held.state is not RelayState.COMMITTED:
                state = "absent" if held is None else held.state.value
                check.lost.append(f"{issued_id}: handed to the master, {state} at {origin}")
    return check


def _check_relay(
    check: StoreCheck,
    key_id: Any,
    record: RelayRecord,
    other: RelayRecord | None,
    deliverable_at_terminal: set[str],
) -> bool:
    origin, terminal = record.route[0], record.route[-1]
    if record.state is RelayState.COMMITTED:
        if other is None or other.state is not RelayState.COMMITTED:
            state = "absent" if other is None else other.state.value
            check.lost.append(f"{key_id}: committed at {origin}, {state} at {terminal}")
            return False
    elif record.state is RelayState.ABORTED:
        if other is not None and other.state is RelayState.COMMITTED:
            check.lost.append(f"{key_id}: aborted at {origin}, committed at {terminal}")
            return False
        if str(key_id) in deliverable_at_terminal:
            check.half_relayed.append(
                f"{key_id}: aborted at {origin}, still deliverable at {terminal}"
            )
            return False
    return True


@dataclass
class KillsReport:
    seed: int
    kills_per_node: int
    kills: dict[str, int]
    keys_taken: dict[str, int]
    keys_fetched: dict[str, int]
    delivered_twice: int
    lost: int
    half_relayed: int
    second_fetch: dict[str, list[int]]  # direction -> [asked, delivered again]
    client_errors: dict[str, dict[str, int]]
    orphans: int
    answers_lost: int
    relays: dict[str, dict[str, int]]
    details: dict[str, list[str]]
    problems: list[str]
    kill_log: list[dict[str, Any]]
    startup_s: float
    kill_phase_s: float
    wall_s: float
    exit_codes: dict[str, int | None]
    workdir: str

    @property
    def ok(self) -> bool:
        return (
            self.delivered_twice == 0
            and self.lost == 0
            and self.half_relayed == 0
            and not self.problems
            and all(code == 0 for code in self.exit_codes.values())
            and all(n > 0 for n in self.keys_taken.values())
        )

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items()}
        out["ok"] = self.ok
        return out


def stuck(ledger: Ledger) -> bool:
    """Every key the slave has not got was refused STUCK_REFUSALS times in a row."""
    with ledger.lock:
        return all(ledger.refused_in_a_row[k] >= STUCK_REFUSALS for k in ledger.pending)


def slave_deliveries(layout: ChainLayout, node: str) -> dict[str, float]:
    """Key ID -> time (Unix s) of every relayed key ``node``'s KME handed to a slave SAE, from
    its audit trail (the store of its link)."""
    path = layout.store(node) / "keys.db"
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute("SELECT body FROM audit_log").fetchall()
    finally:
        db.close()
    found: dict[str, float] = {}
    for (body,) in rows:
        try:
            entry = json.loads(bytes(body))
        except ValueError:
            continue
        fields = entry.get("fields", {})
        if entry.get("kind") == "keys_delivered" and fields.get("role") == "slave":
            for key_id in fields.get("key_ids", []):
                found[str(key_id)] = float(entry.get("time_s", 0.0))
    return found


def answer_lost(
    key_id: str,
    delivered_s: float,
    terminal: str,
    kill_log: list[dict[str, Any]],
    attempts: list[str],
) -> str:
    """Why a key the terminal's KME handed out never reached the slave: the kill of the
    terminal that followed the hand-out, and the client's last attempts."""
    after = [k for k in kill_log if k["node"] == terminal and k["killed_at_unix"] >= delivered_s]
    kill = (
        f"{terminal} killed {after[0]['killed_at_unix'] - delivered_s:.3f} s after"
        if after
        else f"no kill of {terminal} after it"
    )
    return (
        f"{key_id}: handed out at {terminal} at {delivered_s:.3f} (audit trail), {kill}; "
        f"the client's fetches: {', '.join([*attempts[:3], '...', *attempts[-1:]])}"
    )


def wait_ready(chain: Chain, problems: list[str], *, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        chain.drain()
        if chain.progress.ready(1):
            return True
        if chain.exited():
            problems.append(f"a node exited before the links were ready: {chain.exited()}")
            return False
        if time.monotonic() > deadline:
            problems.append(
                f"links not key-derived after {timeout_s} s: {chain.progress.summary()}"
            )
            return False
        time.sleep(0.2)


def kill_phase(
    chain: Chain,
    rng: random.Random,
    kills_per_node: int,
    kills: Counter[str],
    kill_log: list[dict[str, Any]],
    problems: list[str],
    started: float,
    log: Callable[[str], None],
) -> None:
    plan = [name for name in chain.layout.names for _ in range(kills_per_node)]
    rng.shuffle(plan)
    for number, name in enumerate(plan, 1):
        time.sleep(rng.uniform(*UP_DELAY_S))
        chain.drain()
        for other, code in chain.exited().items():  # an exit nobody asked for
            problems.append(f"{other} exited on its own with {code}; started again")
            chain.start(other)
        chain.kill(name)
        kills[name] += 1
        killed_at = round(time.monotonic() - started, 2)
        killed_unix = time.time()
        down_s = rng.uniform(*DOWN_S)
        time.sleep(down_s)
        chain.drain()
        mark = len(chain.events[name])
        chain.start(name)
        deadline = time.monotonic() + LINKS_UP_TIMEOUT_S
        while not chain.links_up(name, mark):
            if time.monotonic() > deadline:
                problems.append(f"kill {number} ({name}): links not up {LINKS_UP_TIMEOUT_S} s")
                break
            if chain.processes[name].poll() is not None:
                problems.append(f"kill {number} ({name}): exited after restart")
                chain.start(name)
            time.sleep(0.1)
            chain.drain()
        up_s = round(time.monotonic() - started, 2)
        kill_log.append(
            {
                "node": name,
                "killed_at_s": killed_at,
                "killed_at_unix": round(killed_unix, 3),
                "down_s": round(down_s, 2),
                "links_up_at_s": up_s,
            }
        )
        log(f"kill {number}/{len(plan)}: {name} at {killed_at} s, links up at {up_s} s")


def run_relay_kills(
    workdir: Path,
    *,
    kills_per_node: int = 20,
    seed: int = 1,
    quiet_s: float = QUIET_S,
    drain_s: float = DRAIN_S,
    block_pulses: int = BLOCK_PULSES,
    log: Callable[[str], None] = lambda line: None,
) -> KillsReport:
    started = time.monotonic()
    rng = random.Random(seed)
    # the daemons run this checkout, whatever the interpreter has installed
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
    )
    layout = prepare_chain(workdir, nodes=3, block_pulses=block_pulses)
    chain = Chain(layout)
    ledgers = {d.name: Ledger(d.name) for d in directions(layout)}
    problems: list[str] = []
    kills: Counter[str] = Counter()
    kill_log: list[dict[str, Any]] = []
    second: dict[str, list[int]] = {}
    masters_stop, stop = threading.Event(), threading.Event()
    threads: list[threading.Thread] = []
    codes: list[int | None] = []
    startup_s = kill_phase_s = 0.0
    check = StoreCheck()
    try:
        for name in reversed(layout.names):
            chain.start(name)
        if wait_ready(chain, problems, timeout_s=READY_TIMEOUT_S):
            startup_s = time.monotonic() - started
            log(f"every link key-derived after {startup_s:.1f} s")
            for direction in directions(layout):
                thread = threading.Thread(
                    target=client_loop,
                    args=(direction, ledgers[direction.name], masters_stop, stop),
                    name=f"client {direction.name}",
                    daemon=True,
                )
                thread.start()
                threads.append(thread)
            time.sleep(rng.uniform(*UP_DELAY_S))
            phase = time.monotonic()
            kill_phase(chain, rng, kills_per_node, kills, kill_log, problems, started, log)
            kill_phase_s = time.monotonic() - phase
            log(f"kills done after {kill_phase_s:.1f} s; quiet {quiet_s} s")
            time.sleep(quiet_s)
            masters_stop.set()
            deadline = time.monotonic() + drain_s
            while any(ledger.pending for ledger in ledgers.values()):
                if time.monotonic() > deadline or all(stuck(ledger) for ledger in ledgers.values()):
                    break
                time.sleep(0.5)
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
            for direction in directions(layout):
                asked, again = second_fetches(direction, ledgers[direction.name], rng)
                second[direction.name] = [asked, again]
            # relays in flight (the pools refilled ahead) finish before the stop
            deadline = time.monotonic() + SETTLE_TIMEOUT_S
            while any(unfinished_counts(layout).values()) and time.monotonic() < deadline:
                time.sleep(0.5)
            chain.drain()
            for name, code in chain.exited().items():
                problems.append(f"{name} exited on its own with {code}")
    finally:
        stop.set()
        masters_stop.set()
        for thread in threads:
            thread.join(timeout=60)
        codes = stop_nodes([chain.processes[n] for n in layout.names if n in chain.processes])
    if kills:
        check = check_stores(layout, ledgers)
    twice: list[str] = []
    lost = list(check.lost)
    seen_bytes: dict[bytes, str] = {}
    answers: list[str] = []
    for ledger in ledgers.values():
        twice += [f"{k} handed to the master twice ({ledger.name})" for k in ledger.issued_twice]
        twice += [f"{k} fetched twice at the slave ({ledger.name})" for k in ledger.fetched_twice]
        lost += [f"{k} fetched with other bytes ({ledger.name})" for k in ledger.mismatched]
        terminal = ledger.name.split("->")[1]
        handed = slave_deliveries(layout, terminal) if ledger.pending else {}
        for key_id in ledger.pending:
            if key_id in handed:
                attempts = ledger.attempts.get(key_id, [])
                answers.append(answer_lost(key_id, handed[key_id], terminal, kill_log, attempts))
            else:
                where = (
                    "still deliverable there"
                    if key_id in check.deliverable.get(terminal, set())
                    else "handed out there without an audit entry"
                )
                lost.append(f"{key_id} never fetched at the slave {terminal}, {where}")
        for key_id, key_bytes in ledger.issued.items():
            if key_bytes in seen_bytes:
                twice.append(f"{key_id}: the bytes of {seen_bytes[key_bytes]}")
            seen_bytes[key_bytes] = key_id
    names = layout.names
    return KillsReport(
        seed=seed,
        kills_per_node=kills_per_node,
        kills={n: kills[n] for n in names},
        keys_taken={k: len(v.issued) for k, v in ledgers.items()},
        keys_fetched={k: len(v.fetched) for k, v in ledgers.items()},
        delivered_twice=len(twice),
        lost=len(lost),
        half_relayed=len(check.half_relayed),
        second_fetch=second,
        client_errors={k: dict(sorted(v.errors.items())) for k, v in ledgers.items()},
        orphans=len(check.orphans),
        answers_lost=len(answers),
        relays=check.relays,
        details={
            "delivered_twice": twice[:50],
            "lost": lost[:50],
            "half_relayed": check.half_relayed[:50],
            "orphans": check.orphans[:50],
            "answers_lost": answers[:50],
        },
        problems=problems[:50],
        kill_log=kill_log,
        startup_s=round(startup_s, 1),
        kill_phase_s=round(kill_phase_s, 1),
        wall_s=round(time.monotonic() - started, 1),
        exit_codes=dict(zip([n for n in names if n in chain.processes], codes, strict=True)),
        workdir=str(workdir),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills-per-node", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quiet-s", type=float, default=QUIET_S)
    parser.add_argument("--block-pulses", type=int, default=BLOCK_PULSES)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.workdir:
        workdir = args.workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="qkdnode-relay-kills-"))
    os.chmod(workdir, 0o700)
    print(f"workdir {workdir}", flush=True)
    report = run_relay_kills(
        workdir,
        kills_per_node=args.kills_per_node,
        seed=args.seed,
        quiet_s=args.quiet_s,
        block_pulses=args.block_pulses,
        log=lambda line: print(line, flush=True),
    )
    summary = report.to_json()
    shown = {k: v for k, v in summary.items() if k != "kill_log"}
    print(json.dumps(shown, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    print("PASS" if report.ok else "FAIL")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
