#!/usr/bin/env python3
"""Secret-key rate versus distance: the simulated link fed into the finite-key bound, against
the analytic curves (selected analysis and Lim et al. 2014) and the PLOB bound, 0-150 km.

Usage::

    .venv/bin/python scripts/plot_keyrate.py --out keyrate.png [--json points.json]
        [--pulses N] [--step-km 10] [--max-km 150]
        [--finite-key lim2014-kl|lim2014-chernoff|lim2014]

Channel: the default ``SimulatedLinkConfig`` (the example of Lim et al., PRA 89, 022307 (2014):
0.2 dB/km, eta_Bob = 10 %, p_dc = 6e-7, e_mis = 0.5 %). At each distance the decoy settings are
those ``finitekey.optimise_decoy_settings`` finds for N pulses and the selected analysis (default:
the pipeline's, ``finitekey.DEFAULT_FINITE_KEY_ANALYSIS``); the simulated link runs N pulses with
them and its counts go into that bound (two-way Cascade: vacuum term dropped). One-decoy BB84
with the same statistics and Lim et al. 2014 are drawn beside it, each with its own optimised
settings. The computation and the drawing are
``qkdnode.ops.keyrate.simulate_keyrate_versus_distance`` and
``qkdnode.ops.report.plot_keyrate_versus_distance`` (also used by ``qkdnode report``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qkdnode.config.link import SimulatedLinkConfig
from qkdnode.ops.keyrate import simulate_keyrate_versus_distance
from qkdnode.ops.report import plot_keyrate_versus_distance
from qkdnode.postprocess.finitekey import DEFAULT_FINITE_KEY_ANALYSIS, FiniteKeyAnalysis


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, help="PNG to write")
    parser.add_argument("--json", type=Path, help="write the points and curves to this file")
    parser.add_argument("--pulses", type=int, default=1 << 28, help="pulses per distance")
    parser.add_argument("--step-km", type=float, default=10.0)
    parser.add_argument("--max-km", type=float, default=150.0)
    parser.add_argument(
        "--finite-key",
        choices=[a.value for a in FiniteKeyAnalysis],
        default=DEFAULT_FINITE_KEY_ANALYSIS.value,
    )
    args = parser.parse_args()
    analysis = FiniteKeyAnalysis(args.finite_key)
    if args.out is None and args.json is None:
        parser.error("give --out FILE.png and/or --json FILE.json")
    if args.out is not None and importlib.util.find_spec("matplotlib") is None:
        print("the plot needs matplotlib: pip install -e '.[plot]'", file=sys.stderr)
        return 2
    points, curve = simulate_keyrate_versus_distance(
        SimulatedLinkConfig(),
        distances_km=list(np.arange(0.0, args.max_km + 1e-9, args.step_km)),
        curve_km=list(np.arange(0.0, args.max_km + 1e-9, 1.0)),
        pulses=args.pulses,
        analysis=analysis,
    )
    by_km = {c["distance_km"]: c for c in curve}
    print(f"{'km':>6}{'sim bits/pulse':>16}{'theory':>12}{'one decoy':>12}{'lim2014 theory':>16}")
    for point in points:
        line = by_km.get(point["distance_km"], {})
        print(
            f"{point['distance_km']:>6g}{point['bits_per_pulse']:>16.3e}"
            f"{point['theory_bits_per_pulse']:>12.3e}"
            f"{line.get('theory_one_decoy', float('nan')):>12.3e}"
            f"{line.get('theory_lim2014', float('nan')):>16.3e}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps({"points": points, "curve": curve}, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.out is not None:
        plot_keyrate_versus_distance(points, curve, args.pulses, args.out, analysis)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
