"""``python -m qkdnode.simulation``: many seeded runs of the two-node simulation.

    scripts/simulate --runs N --seed S [--in-flight K] [--jobs J] [--json OUT]

Runs seeds S .. S+N-1 with K blocks in flight (both 1 and 4 when ``--in-flight`` is not
given) and prints one row per K: {"in_flight", "runs", "steps", "sessions",
"committing_fraction", "faults_injected", "downgrades", "auth_bits_reused",
"store_disagreements", "liveness_failures", "seconds"}, then the first failing seed of each
kind with the command that replays it (``--runs 1 --trace`` prints the run step by step; a seed
replays exactly). Exit status 1 when any run broke an invariant.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from collections.abc import Sequence
from typing import Any

from qkdnode.simulation.settings import RunReport, SimSettings
from qkdnode.simulation.world import simulate_run


def _run(job: tuple[int, SimSettings, bool]) -> RunReport:
    seed, settings, trace = job
    return simulate_run(seed, settings, trace=trace)


def _row(in_flight: int, reports: Sequence[RunReport], seconds: float) -> dict[str, Any]:
    sessions = sum(r.sessions for r in reports)
    committing = sum(r.committing_sessions for r in reports)
    return {
        "in_flight": in_flight,
        "runs": len(reports),
        "steps": sum(r.steps for r in reports),
        "sessions": sessions,
        "committing_fraction": round(committing / sessions, 4) if sessions else 0.0,
        "faults_injected": sum(r.faults_injected for r in reports),
        "downgrades": sum(r.downgrades for r in reports),
        "auth_bits_reused": sum(r.auth_bits_reused for r in reports),
        "store_disagreements": sum(r.store_disagreements for r in reports),
        "liveness_failures": sum(r.liveness_failures for r in reports),
        "seconds": round(seconds, 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/simulate", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--in-flight", type=int, choices=(1, 2, 3, 4), default=None)
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument("--trace", action="store_true", help="print each run step by step")
    parser.add_argument("--json", metavar="OUT", help="write the rows as JSON to OUT")
    args = parser.parse_args(argv)
    rows = []
    failed = False
    for in_flight in (args.in_flight,) if args.in_flight else (1, 4):
        settings = SimSettings(in_flight=in_flight)
        jobs = [(seed, settings, args.trace) for seed in range(args.seed, args.seed + args.runs)]
        started = time.perf_counter()
        if args.jobs > 1:
            with multiprocessing.Pool(args.jobs) as pool:
                reports = pool.map(_run, jobs, chunksize=8)
        else:
            reports = [_run(job) for job in jobs]
        row = _row(in_flight, reports, time.perf_counter() - started)
        rows.append(row)
        print(json.dumps(row))
        first: dict[str, RunReport] = {}
        for report in reports:
            if args.trace:
                print("\n".join(report.trace))
            for violation in report.violations:
                first.setdefault(violation.split(":")[0], report)
        for kind, report in sorted(first.items()):
            failed = True
            violation = next(v for v in report.violations if v.startswith(kind))
            print(f"first {kind} at seed {report.seed}: {violation}")
            print(
                f"  replay: scripts/simulate --runs 1 --seed {report.seed} "
                f"--in-flight {in_flight} --trace"
            )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(rows, out, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
