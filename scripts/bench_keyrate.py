#!/usr/bin/env python3
"""Finite-key rate of each decoy analysis against the asymptotic rate, 0-100 km, N = 10^7-10^11.

Usage::

    .venv/bin/python scripts/bench_keyrate.py --json OUT [--quick]

Channel: the example of Lim et al., PRA 89, 022307 (2014), Sec. IV (0.2 dB/km, eta_Bob = 10 %,
p_dc = 6e-7, e_mis = 0.5 %, f = 1.16), eps_sec = 1e-10, eps_cor = 1e-15, expected counts.
Every row has decoy settings optimised for its analysis, distance and N
(``finitekey.optimise_decoy_settings``); key lengths account for two-way Cascade (error
positions disclosed: vacuum term dropped). Rows "one-decoy" and "one-decoy-kl" are one-decoy
BB84 (``keylength.one_decoy``, settings from ``optimise_one_decoy_settings``) with the
statistics of ``lim2014`` and ``lim2014-kl``. The asymptotic reference is
``finitekey.asymptotic_decoy_bits_per_pulse`` (infinitely many decoys, same channel, same f).

JSON: {"rows": [{"analysis", "distance_km", "pulses", "bits_per_pulse",
"asymptotic_bits_per_pulse", "fraction_of_asymptotic"}...],
"ratios": [{"distance_km", "pulses", "<analysis>_over_lim2014", "one-decoy_over_lim2014",
"one-decoy-kl_over_lim2014-kl"}...],
"reach_km": [{"analysis", "pulses", "reach_km"}...],
"two_way_cost": [{"analysis", "distance_km", "pulses", "bits_per_pulse_one_way",
"bits_per_pulse_two_way", "cost_fraction"}...]}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qkdnode.postprocess.finitekey import (
    FiniteKeyAnalysis,
    SecurityParameters,
    asymptotic_decoy_bits_per_pulse,
    channel_transmittance,
    optimise_decoy_settings,
)
from qkdnode.postprocess.keylength.one_decoy import optimise_one_decoy_settings

SECURITY = SecurityParameters(eps_sec=1e-10, eps_cor=1e-15)
DARK_COUNT_PROBABILITY = 6e-7
MISALIGNMENT_ERROR = 0.005
RECONCILIATION_EFFICIENCY = 1.16


def _eta(distance_km: float) -> float:
    return channel_transmittance(
        fiber_km=distance_km, attenuation_db_per_km=0.2, detector_efficiency=0.1
    )


def finite_rate(
    analysis: FiniteKeyAnalysis, distance_km: float, pulses: int, *, two_way: bool = True
) -> float:
    return optimise_decoy_settings(
        transmittance=_eta(distance_km),
        security=SECURITY,
        pulses=pulses,
        analysis=analysis,
        error_positions_disclosed=two_way,
        dark_count_probability=DARK_COUNT_PROBABILITY,
        misalignment_error=MISALIGNMENT_ERROR,
        reconciliation_efficiency=RECONCILIATION_EFFICIENCY,
    ).bits_per_pulse


# one-decoy BB84 (keylength.one_decoy) with the statistics of a two-decoy analysis
ONE_DECOY = {
    "one-decoy": FiniteKeyAnalysis.LIM2014,
    "one-decoy-kl": FiniteKeyAnalysis.LIM2014_KL,
}


def one_decoy_rate(name: str, distance_km: float, pulses: int) -> float:
    return optimise_one_decoy_settings(
        transmittance=_eta(distance_km),
        security=SECURITY,
        pulses=pulses,
        statistics=ONE_DECOY[name],
        dark_count_probability=DARK_COUNT_PROBABILITY,
        misalignment_error=MISALIGNMENT_ERROR,
        reconciliation_efficiency=RECONCILIATION_EFFICIENCY,
    ).bits_per_pulse


def rate_of(name: str, distance_km: float, pulses: int) -> float:
    if name in ONE_DECOY:
        return one_decoy_rate(name, distance_km, pulses)
    return finite_rate(FiniteKeyAnalysis(name), distance_km, pulses)


def asymptotic_rate(distance_km: float, *, two_way: bool = True) -> float:
    return asymptotic_decoy_bits_per_pulse(
        transmittance=_eta(distance_km),
        error_positions_disclosed=two_way,
        dark_count_probability=DARK_COUNT_PROBABILITY,
        misalignment_error=MISALIGNMENT_ERROR,
        reconciliation_efficiency=RECONCILIATION_EFFICIENCY,
    )


def reach_km(name: str, pulses: int) -> float:
    """Largest distance with key, by bisection to 0.25 km."""
    low, high = 0.0, 300.0
    if rate_of(name, low, pulses) <= 0.0:
        return 0.0
    while high - low > 0.25:
        mid = (low + high) / 2
        if rate_of(name, mid, pulses) > 0.0:
            low = mid
        else:
            high = mid
    return low


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", type=Path, required=True, help="write the rows here")
    parser.add_argument("--quick", action="store_true", help="25 km, N = 10^8 and 10^10 only")
    args = parser.parse_args()
    distances = [25.0] if args.quick else [0.0, 25.0, 50.0, 100.0]
    exponents = [8, 10] if args.quick else [7, 8, 9, 10, 11]
    analyses = list(FiniteKeyAnalysis)
    names = [a.value for a in analyses] + list(ONE_DECOY)
    started = time.perf_counter()

    rows: list[dict[str, Any]] = []
    ratios: list[dict[str, Any]] = []
    print(f"{'analysis':>12}{'km':>6}{'N':>8}{'bits/pulse':>13}{'asymptotic':>13}{'fraction':>10}")
    for distance in distances:
        asymptotic = asymptotic_rate(distance)
        for exponent in exponents:
            pulses = 10**exponent
            by_analysis: dict[str, float] = {}
            for name in names:
                rate = rate_of(name, distance, pulses)
                by_analysis[name] = rate
                fraction = rate / asymptotic if asymptotic > 0 else 0.0
                rows.append(
                    {
                        "analysis": name,
                        "distance_km": distance,
                        "pulses": pulses,
                        "bits_per_pulse": rate,
                        "asymptotic_bits_per_pulse": asymptotic,
                        "fraction_of_asymptotic": fraction,
                    }
                )
                print(
                    f"{name:>12}{distance:>6g}{f'1e{exponent}':>8}{rate:>13.4e}"
                    f"{asymptotic:>13.4e}{fraction:>10.3f}"
                )
            lim = by_analysis[FiniteKeyAnalysis.LIM2014.value]
            ratio_row: dict[str, Any] = {"distance_km": distance, "pulses": pulses}
            for name, rate in by_analysis.items():
                if name != FiniteKeyAnalysis.LIM2014.value:
                    ratio_row[f"{name}_over_lim2014"] = rate / lim if lim > 0 else None
            # one decoy against two decoys with the same statistics
            for name, statistics in ONE_DECOY.items():
                two = by_analysis[statistics.value]
                ratio_row[f"{name}_over_{statistics.value}"] = (
                    by_analysis[name] / two if two > 0 else None
                )
            ratios.append(ratio_row)

    print("\nratio to lim2014 (same distance, N, settings optimised per analysis)")
    for ratio_row in ratios:
        print(ratio_row)

    reach = []
    for exponent in [8] if args.quick else [8, 10]:
        for name in names:
            km = reach_km(name, 10**exponent)
            reach.append({"analysis": name, "pulses": 10**exponent, "reach_km": km})
            print(f"reach {name} N=1e{exponent}: {km:.2f} km")

    cost = []
    for analysis, exponent in [(a, e) for e in (8, 10) for a in analyses]:
        for distance in [0.0, 25.0, 50.0, 75.0, 100.0]:
            pulses = 10**exponent
            one_way = finite_rate(analysis, distance, pulses, two_way=False)
            two_way = finite_rate(analysis, distance, pulses, two_way=True)
            fraction = 1.0 - two_way / one_way if one_way > 0 else 0.0
            cost.append(
                {
                    "analysis": analysis.value,
                    "distance_km": distance,
                    "pulses": pulses,
                    "bits_per_pulse_one_way": one_way,
                    "bits_per_pulse_two_way": two_way,
                    "cost_fraction": fraction,
                }
            )
            print(
                f"two-way cost {analysis.value} {distance:g} km N=1e{exponent}: "
                f"{one_way:.4e} -> {two_way:.4e} ({100 * fraction:.3f} %)"
            )
    for distance in [0.0, 25.0, 50.0, 75.0, 100.0]:
        one_way = asymptotic_rate(distance, two_way=False)
        two_way = asymptotic_rate(distance, two_way=True)
        print(
            f"two-way cost asymptotic {distance:g} km: {one_way:.4e} -> {two_way:.4e} "
            f"({100 * (1 - two_way / one_way):.3f} %)"
        )

    args.json.write_text(
        json.dumps(
            {"rows": rows, "ratios": ratios, "reach_km": reach, "two_way_cost": cost}, indent=2
        )
        + "\n"
    )
    print(f"wrote {args.json} in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
