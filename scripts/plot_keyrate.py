#!/usr/bin/env python3
"""Secret-key rate versus distance: the simulated link fed into the finite-key bound, against
the analytic curve and the PLOB bound, 0-150 km.

Usage::

    .venv/bin/python scripts/plot_keyrate.py --out keyrate.png [--json points.json]
        [--pulses N] [--step-km 10] [--max-km 150]

Channel: the default ``SimulatedLinkConfig`` (the example of Lim et al., PRA 89, 022307 (2014):
0.2 dB/km, eta_Bob = 10 %, p_dc = 6e-7, e_mis = 0.5 %). At each distance the intensities,
probabilities and basis bias are those ``finitekey.optimise_decoy_settings`` finds for N pulses
(mu3 = 2e-4, as in the paper); the simulated link (``SimulatedAliceLink`` -> memory fibre ->
``SimulatedBobLink``) runs N pulses with them, and the sifted counts per intensity and basis go
into ``finitekey.lim_key_length`` ([LCWXZ14] Eqs. 1-5) with leak_EC = f n_X h(E_key), f = 1.16,
eps_sec = 1e-10, eps_cor = 1e-15. The theory line is ``finitekey.decoy_secret_bits_per_pulse``
for the same N, optimised settings and channel (expected counts); the PLOB line is
-log2(1 - eta_fibre) (Pirandola et al., Nat. Commun. 8, 15043 (2017)), eta_fibre =
10^(-alpha L/10). Points with no key are drawn at the bottom edge. With N = 2^28 pulses per point
(about 5 s each here) the finite-key rate reaches about 115 km; ``--pulses`` larger reaches
further (the key needs N ~ 10^11 at 150 km).

The plot needs matplotlib (the optional extra ``plot``: ``pip install -e '.[plot]'``); without
it the script still computes and writes ``--json``, then says what is missing and exits 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qkdnode.link.config import SimulatedLinkConfig
from qkdnode.link.simulated import SimulatedAliceLink, SimulatedBobLink, memory_fibre
from qkdnode.postprocess.finitekey import (
    DecoyObservation,
    DecoySettings,
    SecurityParameters,
    binary_entropy,
    channel_transmittance,
    decoy_secret_bits_per_pulse,
    lim_key_length,
    optimise_decoy_settings,
    plob_bound_bits_per_pulse,
)
from qkdnode.postprocess.records import EmissionRecords

RECONCILIATION_EFFICIENCY = 1.16
SECURITY = SecurityParameters(eps_sec=1e-10, eps_cor=1e-15)
BLOCK_PULSES = 1 << 22
MISSING_MATPLOTLIB = (
    "plot_keyrate.py: matplotlib is not installed in this environment; install the optional "
    "extra 'plot' (e.g. .venv/bin/pip install -e '.[plot]') to write the PNG"
)


def optimised(
    base: SimulatedLinkConfig, km: float, pulses: int, initial: DecoySettings | None
) -> DecoySettings:
    eta = channel_transmittance(
        fiber_km=km,
        attenuation_db_per_km=base.attenuation_db_per_km,
        detector_efficiency=base.detector_efficiency,
        insertion_loss_db=base.insertion_loss_db,
    )
    return optimise_decoy_settings(
        transmittance=eta,
        dark_count_probability=base.dark_count_probability_per_gate,
        misalignment_error=base.misalignment_error,
        reconciliation_efficiency=RECONCILIATION_EFFICIENCY,
        security=SECURITY,
        pulses=pulses,
        mu_vacuum=2e-4,
        afterpulse_probability=base.afterpulse_probability,
        initial=initial,
    ).settings


def config_for(
    base: SimulatedLinkConfig, km: float, settings: DecoySettings
) -> SimulatedLinkConfig:
    return replace(
        base,
        fiber_km=km,
        mu_signal=settings.mu_signal,
        mu_decoy=settings.mu_decoy,
        mu_vacuum=settings.mu_vacuum,
        p_signal=settings.p_signal,
        p_decoy=settings.p_decoy,
        p_vacuum=settings.p_vacuum,
        p_key_basis=settings.p_key_basis,
    )


def settings_of(config: SimulatedLinkConfig) -> DecoySettings:
    return DecoySettings(
        mu_signal=config.mu_signal,
        mu_decoy=config.mu_decoy,
        mu_vacuum=config.mu_vacuum,
        p_signal=config.p_signal,
        p_decoy=config.p_decoy,
        p_vacuum=config.p_vacuum,
        p_key_basis=config.p_key_basis,
    )


async def simulate_counts(config: SimulatedLinkConfig, pulses: int, seed: int) -> np.ndarray:
    """Rows per class: key-basis sifted, key-basis errors, test-basis sifted, test errors."""
    alice_seed, bob_seed = np.random.SeedSequence(seed).spawn(2)
    send, receive = memory_fibre()
    alice = SimulatedAliceLink(config, fibre=send, rng=np.random.default_rng(alice_seed))
    bob = SimulatedBobLink(config, fibre=receive, rng=np.random.default_rng(bob_seed))
    await alice.open()
    await bob.open()
    counts = np.zeros((3, 4), dtype=np.int64)
    remaining = pulses
    while remaining:
        size = min(BLOCK_PULSES, remaining)
        sent: list[EmissionRecords] = []

        async def emit(size: int = size, sent: list[EmissionRecords] = sent) -> None:
            sent.append(await alice.next_block(size))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(emit)
            bob_block = await bob.next_block(size)
        alice_block = sent[0]
        offset = bob_block.pulse_index - alice_block.first_pulse_index
        cls = alice_block.intensity[offset]
        sifted = alice_block.basis[offset] == bob_block.basis
        error = alice_block.bit[offset] != bob_block.bit
        for basis, column in ((0, 0), (1, 2)):
            mine = sifted & (bob_block.basis == basis)
            counts[:, column] += np.bincount(cls[mine], minlength=3)
            counts[:, column + 1] += np.bincount(cls[mine & error], minlength=3)
        remaining -= size
    await alice.aclose()
    await bob.aclose()
    return counts


def simulated_rate(config: SimulatedLinkConfig, counts: np.ndarray, pulses: int) -> dict[str, Any]:
    key_sifted = int(counts[:, 0].sum())
    key_errors = int(counts[:, 1].sum())
    observation = DecoyObservation(
        key_basis_counts=(int(counts[0, 0]), int(counts[1, 0]), int(counts[2, 0])),
        test_basis_counts=(int(counts[0, 2]), int(counts[1, 2]), int(counts[2, 2])),
        test_basis_errors=(int(counts[0, 3]), int(counts[1, 3]), int(counts[2, 3])),
    )
    qber = key_errors / key_sifted if key_sifted else 0.5
    leak = math.ceil(RECONCILIATION_EFFICIENCY * key_sifted * binary_entropy(min(qber, 0.5)))
    bound = lim_key_length(observation, settings_of(config), leak_ec_bits=leak, security=SECURITY)
    return {
        "key_basis_sifted": key_sifted,
        "key_basis_qber": qber,
        "test_basis_counts": list(observation.test_basis_counts),
        "test_basis_errors": list(observation.test_basis_errors),
        "key_bits": bound.length_bits,
        "bits_per_pulse": bound.length_bits / pulses,
    }


def theory_rate(config: SimulatedLinkConfig, km: float, pulses: int) -> float:
    return decoy_secret_bits_per_pulse(
        settings=settings_of(config),
        fiber_km=km,
        attenuation_db_per_km=config.attenuation_db_per_km,
        detector_efficiency=config.detector_efficiency,
        dark_count_probability=config.dark_count_probability_per_gate,
        misalignment_error=config.misalignment_error,
        pulses=pulses,
        reconciliation_efficiency=RECONCILIATION_EFFICIENCY,
        security=SECURITY,
        afterpulse_probability=config.afterpulse_probability,
        insertion_loss_db=config.insertion_loss_db,
    )


def plot(
    points: list[dict[str, Any]], curve: list[dict[str, float]], pulses: int, out: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    km_line = [c["distance_km"] for c in curve]
    ax.semilogy(km_line, [c["plob"] for c in curve], "k--", label="PLOB bound −log2(1−η_fibre)")
    theory = [(c["distance_km"], c["theory"]) for c in curve if c["theory"] > 0]
    if theory:
        ax.semilogy(*zip(*theory, strict=True), "C0-", label=f"finite-key theory, N = {pulses:.2e}")
    positive = [(p["distance_km"], p["bits_per_pulse"]) for p in points if p["bits_per_pulse"] > 0]
    if positive:
        ax.semilogy(*zip(*positive, strict=True), "C3o", label="simulated link → Lim et al. bound")
    floor = min([v for _, v in positive + theory] or [1e-8]) / 10
    zero = [p["distance_km"] for p in points if p["bits_per_pulse"] <= 0]
    if zero:
        ax.plot(zero, [floor] * len(zero), "C3x", label="simulated: no key")
    ax.set_ylim(bottom=floor / 2)
    ax.set_xlim(0, max(km_line))
    ax.set_xlabel("fibre length (km), 0.2 dB/km")
    ax.set_ylabel("secret bits per pulse")
    ax.set_title("Decoy-state BB84, simulated link vs finite-key theory")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="PNG to write")
    parser.add_argument("--json", type=Path, help="write the points and curves to this file")
    parser.add_argument("--pulses", type=int, default=1 << 28, help="pulses per distance")
    parser.add_argument("--step-km", type=float, default=10.0)
    parser.add_argument("--max-km", type=float, default=150.0)
    args = parser.parse_args()
    have_matplotlib = importlib.util.find_spec("matplotlib") is not None
    if args.out is None and args.json is None:
        parser.error("give --out FILE.png and/or --json FILE.json")
    if args.out is not None and not have_matplotlib and args.json is None:
        print(MISSING_MATPLOTLIB, file=sys.stderr)
        return 2
    base = SimulatedLinkConfig()
    distances = list(np.arange(0.0, args.max_km + 1e-9, args.step_km))
    points: list[dict[str, Any]] = []
    print(f"{'km':>6}{'n_X':>10}{'QBER':>8}{'sim bits/pulse':>16}{'theory':>12}{'s':>7}")
    settings: DecoySettings | None = None
    for i, km in enumerate(distances):
        settings = optimised(base, float(km), args.pulses, settings)
        config = config_for(base, float(km), settings)
        start = time.perf_counter()
        counts = trio.run(simulate_counts, config, args.pulses, 1000 + i)
        point: dict[str, Any] = {"distance_km": float(km), "pulses": args.pulses}
        point |= simulated_rate(config, counts, args.pulses)
        point["theory_bits_per_pulse"] = theory_rate(config, float(km), args.pulses)
        point["settings"] = {
            "mu": list(settings.intensities),
            "p": list(settings.probabilities),
            "p_key_basis": settings.p_key_basis,
        }
        points.append(point)
        print(
            f"{km:>6g}{point['key_basis_sifted']:>10}{point['key_basis_qber']:>8.4f}"
            f"{point['bits_per_pulse']:>16.3e}{point['theory_bits_per_pulse']:>12.3e}"
            f"{time.perf_counter() - start:>7.1f}"
        )
    curve = []
    settings = None
    for km in np.arange(0.0, args.max_km + 1e-9, 1.0):
        settings = optimised(base, float(km), args.pulses, settings)
        fibre = 10 ** (-base.attenuation_db_per_km * km / 10)
        curve.append(
            {
                "distance_km": float(km),
                "theory": theory_rate(
                    config_for(base, float(km), settings), float(km), args.pulses
                ),
                "plob": plob_bound_bits_per_pulse(fibre),
            }
        )
    if args.json is not None:
        args.json.write_text(json.dumps({"points": points, "curve": curve}, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.out is not None:
        if not have_matplotlib:
            print(MISSING_MATPLOTLIB, file=sys.stderr)
            return 2
        plot(points, curve, args.pulses, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
