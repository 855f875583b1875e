"""The long versions of the reliability scenarios, with a summary table (``scripts/soak``).

    scripts/soak [--offsets N] [--kills N] [--fuzz-execs N] [--zeroise-rounds N]
                 [--ledger-blocks N]

Each row: scenario, figure, pass/fail, seconds. Exit status 1 if any row fails.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from qkdnode.ops.selftest import run_self_tests
from tests.helpers_store import reserve, take
from tests.reliability.fuzz_targets import TARGETS
from tests.reliability.harness import DeliveryAudit, Pair, scan, stores_agree, windows
from tests.reliability.helpers_ledger import (
    ledgers_through_key_derived_connections,
    naive_forgery_bound,
)
from tests.reliability.memory import tamper_session_frames

Row = tuple[str, str, bool, float]


def tampering(offsets: int) -> Row:
    tampered = rejected = changed = 0
    for mode in ("ed25519", "mldsa65", "psk", "key_derived"):
        report = tamper_session_frames(mode, offsets_per_frame=offsets)
        tampered += report.tampered
        rejected += report.rejected
        changed += report.state_changed
    ok = tampered >= 1000 and rejected == tampered and changed == 0
    return (
        "1 tamper (in memory, 4 modes)",
        f"{rejected}/{tampered} rejected, {changed} state changes",
        ok,
        0.0,
    )


def fuzzing(executions: int) -> Row:
    rng = np.random.default_rng(16)
    crashes = 0
    for name, target in TARGETS.items():
        for _ in range(executions):
            data = rng.bytes(int(rng.integers(0, 600)))
            try:
                target(data)
            except Exception as exc:  # a finding
                crashes += 1
                print(f"fuzz {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
    total = executions * len(TARGETS)
    return (
        "16 fuzz (random bytes, 4 targets)",
        f"{total} executions, {crashes} crashes",
        crashes == 0,
        0.0,
    )


def zeroisation(rounds: int) -> Row:
    from qkdnode.store import KeyStore, StagedBlock

    rng = np.random.default_rng(15)
    open_hits = closed_hits = 0
    for round_index in range(rounds):
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp) / "store"
            store = KeyStore.open(directory, node_name="alice")
            keys = [(uuid.uuid4(), rng.bytes(32)) for _ in range(8)]
            store.stage_block(
                StagedBlock(
                    block_id=round_index,
                    first_pulse_index=0,
                    pulse_count=1,
                    consumer_keys=keys,
                    key_size_bits=256,
                    auth_pool_material=rng.bytes(32),
                )
            )
            store.commit_block(round_index)
            for parity in (0, 1):
                ids = [uuid.uuid4() for _ in range(4)]
                reserve(
                    store,
                    parity=parity,
                    delivery_ids=ids,
                    size_bits=256,
                    master_sae="sae-a",
                    slave_sae="sae-b",
                )
                take(store, ids, role="master", master_sae="sae-a", slave_sae="sae-b")
            needles = windows([m for _, m in keys])
            open_hits += sum(scan(p.read_bytes(), needles) for p in directory.iterdir())
            store.close()
            closed_hits += sum(scan(p.read_bytes(), needles) for p in directory.iterdir())
    return (
        "15 zeroisation (store)",
        f"{rounds} rounds: {open_hits} hits while open, {closed_hits} after close",
        open_hits == 0 and closed_hits == 0,
        0.0,
    )


def kill_points(kills: int, workdir: Path) -> Row:
    """kill -9 of a random node at a random time (0-3 s into its work), restart, repeat; keys
    are delivered through the ETSI 014 API between kills (none twice, no ID offered again)."""
    rng = random.Random(9)
    pair = Pair.create(workdir / "kill")
    pair.start_both()
    audit = DeliveryAudit()
    done = 0
    lost = 0
    crashed = 0
    deaths: list[str] = []
    try:
        pair.wait(lambda p: p.committed("alice") >= 1, timeout_s=120, what="first commit")
        for _ in range(kills):
            audit.deliver(pair)
            before = pair.store("alice").deliverable()
            time.sleep(rng.uniform(0.0, 3.0))
            for name, process in pair.processes.items():
                if process.poll() is not None:  # died on its own: a finding, restart it
                    crashed += 1
                    deaths.append(f"{name} pid {process.pid} exited {process.returncode}")
                    pair.start(name)
            node = rng.choice(["alice", "bob"])
            pair.kill9(node)
            pair.start(node)
            done += 1
            after = pair.store("alice").deliverable()
            lost += sum(1 for k, m in before.items() if after.get(k) not in (None, m))
        pair.wait(lambda p: p.master_keys("alice") >= 2, timeout_s=120, what="keys to deliver")
    finally:
        codes = pair.stop()
    alice, bob = pair.store("alice"), pair.store("bob")
    problems = stores_agree(alice, bob)
    for name, code in codes.items():
        if code != 0:  # None: did not stop within the grace period and was killed
            crashed += 1
            pid = pair.processes[name].pid
            deaths.append(
                f"{name} pid {pid} {'hung' if code is None else f'exited {code}'} at stop"
            )
    reused = audit.reused(alice, bob)
    twice = audit.duplicates + audit.mismatches
    ok = not problems and lost == 0 and crashed == 0 and twice == 0 and reused == 0
    detail = (
        f"{done} kill points, {len(problems)} disagreements, {lost} changed keys, "
        f"{len(audit.issued)} keys delivered via API ({audit.refused} attempts refused), "
        f"{twice} delivered twice or differing, "
        f"{reused} delivered IDs offered again, {crashed} daemon deaths not caused by the harness"
        + (f" ({'; '.join(deaths)})" if deaths else "")
    )
    return ("9 kill -9 (daemons)", detail, ok, 0.0)


def ledger_tags(blocks: int) -> Row:
    """Scenario 5 through key-derived connections: ``blocks`` blocks = 2 * blocks tags."""
    ledgers_through_key_derived_connections(blocks)
    tags = 2 * blocks
    return (
        "5 ledger (connections)",
        f"{tags} tags, 0 bits drawn twice, ledgers equal, 512 bits per tag, "
        f"forgery bound {naive_forgery_bound(tags, 1 << 26):.2e}",
        True,
        0.0,
    )


def selftests() -> Row:
    names = run_self_tests()
    return ("17 self-tests", f"{len(names)} known-answer tests pass", True, 0.0)


def timed(label: str, step: Callable[[], Row]) -> Row:
    started = time.monotonic()
    try:
        name, figure, ok, _ = step()
    except Exception as exc:  # a crashed step is a failed row, the others still run
        return (
            label,
            f"error: {type(exc).__name__}: {exc}"[:200],
            False,
            time.monotonic() - started,
        )
    return (name, figure, ok, time.monotonic() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--offsets", type=int, default=40)
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--fuzz-execs", type=int, default=20000)
    parser.add_argument("--zeroise-rounds", type=int, default=50)
    parser.add_argument("--ledger-blocks", type=int, default=50_000)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="qkdnode-soak-"))
    steps: list[tuple[str, Callable[[], Row]]] = [
        ("17 self-tests", selftests),
        ("1 tamper (in memory, 4 modes)", lambda: tampering(args.offsets)),
        ("16 fuzz (random bytes, 4 targets)", lambda: fuzzing(args.fuzz_execs)),
        ("15 zeroisation (store)", lambda: zeroisation(args.zeroise_rounds)),
    ]
    if args.ledger_blocks:
        steps.append(("5 ledger tags", lambda: ledger_tags(args.ledger_blocks)))
    if args.kills:
        steps.append(("9 kill -9 (daemons)", lambda: kill_points(args.kills, workdir)))
    rows = []
    for label, step in steps:
        row = timed(label, step)
        rows.append(row)
        print(f"{row[0]:<36} {'PASS' if row[2] else 'FAIL'}  {row[3]:7.1f} s  {row[1]}", flush=True)
    print(f"\n{'scenario':<36} {'result':<6} {'time':>9}  figure")
    for name, figure, ok, seconds in rows:
        print(f"{name:<36} {'PASS' if ok else 'FAIL':<6} {seconds:7.1f} s  {figure}")
    return 0 if all(ok for _, _, ok, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
