"""``python -m qkdnode.simulation.relay_cli``: many seeded runs of the three-node relay simulation.

    scripts/simulate_relay --runs N --seed S [--jobs J] [--json OUT] [--trace]
    scripts/simulate_relay --boundaries [--json OUT]

Runs seeds S .. S+N-1 and prints one row: {"runs", "steps", "requests", "relays_started",
"relays_committed", "relays_aborted", "tag_mismatch_aborts", "refused_at_request",
"keys_handed_out", "messages_delivered", "faults_injected", "crashes",
"crashes_between_effects", "hop_allocations", "pad_bits_allocated", "payload_bits_relayed",
"pad_bits_per_relayed_bit", "delivered_twice", "lost", "half_relayed", "pad_reused",
"pad_misaccounted", "protocol_errors", "seconds"}, then
the first failing seed of each kind with the command that replays it (``--runs 1 --trace``
prints the run step by step; a seed replays exactly). ``--boundaries`` instead crashes each
node of a two-hop relay at every event boundary, once for a committed and once for an aborted
relay, and prints one row per kind. Exit status 1 when any run broke an invariant.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from collections.abc import Sequence
from typing import Any, Final

from qkdnode.simulation.relay_settings import RelayRunReport, RelaySimSettings
from qkdnode.simulation.relay_world import crash_at_every_boundary, simulate_relay_run

COUNTERS: Final = (
    "steps",
    "requests",
    "relays_started",
    "relays_committed",
    "relays_aborted",
    "tag_mismatch_aborts",
    "refused_at_request",
    "keys_handed_out",
    "messages_delivered",
    "faults_injected",
    "crashes",
    "crashes_between_effects",
    "hop_allocations",
    "pad_bits_allocated",
    "payload_bits_relayed",
    "delivered_twice",
    "lost",
    "half_relayed",
    "pad_reused",
    "pad_misaccounted",
    "protocol_errors",
)


def _run(job: tuple[int, bool]) -> RelayRunReport:
    seed, trace = job
    return simulate_relay_run(seed, RelaySimSettings(), trace=trace)


def relay_row(reports: Sequence[RelayRunReport], seconds: float) -> dict[str, Any]:
    """The summed counters of ``reports``."""
    row: dict[str, Any] = {"runs": len(reports)}
    for name in COUNTERS:
        row[name] = sum(getattr(r, name) for r in reports)
    relayed = row["payload_bits_relayed"]
    row["pad_bits_per_relayed_bit"] = row["pad_bits_allocated"] / relayed if relayed else 0.0
    row["seconds"] = round(seconds, 2)
    return row


def _first_failures(reports: Sequence[RelayRunReport]) -> dict[str, tuple[RelayRunReport, str]]:
    first: dict[str, tuple[RelayRunReport, str]] = {}
    for report in reports:
        for violation in report.violations:
            first.setdefault(violation.split(":")[0], (report, violation))
    return first


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/simulate_relay", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument("--trace", action="store_true", help="print each run step by step")
    parser.add_argument(
        "--boundaries", action="store_true", help="crash at every event boundary of one relay"
    )
    parser.add_argument("--json", metavar="OUT", help="write the rows as JSON to OUT")
    args = parser.parse_args(argv)
    rows = []
    failed = False
    if args.boundaries:
        for abort in (False, True):
            started = time.perf_counter()
            reports = crash_at_every_boundary(abort=abort, seed=args.seed)
            row = {"relay": "aborted" if abort else "committed"}
            row |= relay_row(reports, time.perf_counter() - started)
            rows.append(row)
            print(json.dumps(row))
            for kind, (_, violation) in sorted(_first_failures(reports).items()):
                failed = True
                print(f"first {kind}: {violation}")
    else:
        jobs = [(seed, args.trace) for seed in range(args.seed, args.seed + args.runs)]
        started = time.perf_counter()
        if args.jobs > 1:
            with multiprocessing.Pool(args.jobs) as pool:
                reports = pool.map(_run, jobs, chunksize=8)
        else:
            reports = [_run(job) for job in jobs]
        row = relay_row(reports, time.perf_counter() - started)
        rows.append(row)
        print(json.dumps(row))
        if args.trace:
            for report in reports:
                print("\n".join(report.trace))
        for kind, (report, violation) in sorted(_first_failures(reports).items()):
            failed = True
            print(f"first {kind} at seed {report.seed}: {violation}")
            print(f"  replay: scripts/simulate_relay --runs 1 --seed {report.seed} --trace")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(rows, out, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
