"""The simulated link versus distance: counts from the simulated link fed into the selected
finite-key analysis, the analytic curves of that analysis (two decoys and one decoy) and of Lim
et al. 2014, PLOB.

Used by ``qkdnode report`` and ``scripts/plot_keyrate.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Final

import numpy as np
import trio

from qkdnode.config.link import SimulatedLinkConfig
from qkdnode.postprocess.finitekey import (
    DEFAULT_FINITE_KEY_ANALYSIS,
    DecoyObservation,
    DecoySettings,
    FiniteKeyAnalysis,
    SecurityParameters,
    binary_entropy,
    channel_transmittance,
    decoy_key_length_for,
    decoy_secret_bits_per_pulse,
    optimise_decoy_settings,
    plob_bound_bits_per_pulse,
)
from qkdnode.postprocess.keylength.one_decoy import optimise_one_decoy_settings

RECONCILIATION_EFFICIENCY: Final = 1.16
SECURITY: Final = SecurityParameters(eps_sec=1e-10, eps_cor=1e-15)
SIMULATION_BLOCK_PULSES: Final = 1 << 22


def _transmittance(base: SimulatedLinkConfig, km: float) -> float:
    """eta of ``base``'s fibre, receiver and detector at ``km``."""
    return channel_transmittance(
        fiber_km=km,
        attenuation_db_per_km=base.attenuation_db_per_km,
        detector_efficiency=base.detector_efficiency,
        insertion_loss_db=base.insertion_loss_db,
    )


def optimised_settings(
    base: SimulatedLinkConfig,
    km: float,
    pulses: int,
    initial: DecoySettings | None,
    analysis: FiniteKeyAnalysis = DEFAULT_FINITE_KEY_ANALYSIS,
) -> DecoySettings:
    """Decoy settings maximising the expected rate of ``analysis`` at ``km`` for ``pulses``."""
    eta = _transmittance(base, km)
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
        analysis=analysis,
    ).settings


def link_config_for(
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


def _settings_of(config: SimulatedLinkConfig) -> DecoySettings:
    return DecoySettings(
        mu_signal=config.mu_signal,
        mu_decoy=config.mu_decoy,
        mu_vacuum=config.mu_vacuum,
        p_signal=config.p_signal,
        p_decoy=config.p_decoy,
        p_vacuum=config.p_vacuum,
        p_key_basis=config.p_key_basis,
    )


async def simulate_counts(
    config: SimulatedLinkConfig, pulses: int, seed: int
) -> np.ndarray[Any, np.dtype[np.int64]]:
    """Run the simulated link (Alice -> memory fibre -> Bob) for ``pulses``; rows per intensity
    class, columns: key-basis sifted, key-basis errors, test-basis sifted, test-basis errors."""
    from qkdnode.link.simulated import SimulatedAliceLink, SimulatedBobLink, memory_fibre
    from qkdnode.postprocess.records import AliceRecords

    alice_seed, bob_seed = np.random.SeedSequence(seed).spawn(2)
    send, receive = memory_fibre()
    alice = SimulatedAliceLink(config, fibre=send, rng=np.random.default_rng(alice_seed))
    bob = SimulatedBobLink(config, fibre=receive, rng=np.random.default_rng(bob_seed))
    await alice.open()
    await bob.open()
    counts = np.zeros((3, 4), dtype=np.int64)
    remaining = pulses
    try:
        while remaining:
            size = min(SIMULATION_BLOCK_PULSES, remaining)
            sent: list[AliceRecords] = []

            async def emit(size: int = size, sent: list[AliceRecords] = sent) -> None:
                sent.append(await alice.next_block(size))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(emit)
                bob_block = await bob.next_block(size)
            alice_block = sent[0]
            offset = bob_block.pulse_index - alice_block.first_pulse_index
            alice_bit, alice_basis, cls = alice_block.records_at(offset)
            sifted = alice_basis == bob_block.basis
            error = alice_bit != bob_block.bit
            for basis, column in ((0, 0), (1, 2)):
                mine = sifted & (bob_block.basis == basis)
                counts[:, column] += np.bincount(cls[mine], minlength=3)
                counts[:, column + 1] += np.bincount(cls[mine & error], minlength=3)
            remaining -= size
    finally:
        await alice.aclose()
        await bob.aclose()
    return counts


def finite_key_from_counts(
    config: SimulatedLinkConfig,
    counts: np.ndarray[Any, np.dtype[np.int64]],
    pulses: int,
    analysis: FiniteKeyAnalysis = DEFAULT_FINITE_KEY_ANALYSIS,
) -> dict[str, Any]:
    """The key length of ``analysis`` (``finitekey.decoy_key_length_for``, two-way Cascade) for
    observed counts, with leak_EC = f n_X h(E_X), f = 1.16."""
    key_sifted = int(counts[:, 0].sum())
    key_errors = int(counts[:, 1].sum())
    observation = DecoyObservation(
        key_basis_counts=(int(counts[0, 0]), int(counts[1, 0]), int(counts[2, 0])),
        test_basis_counts=(int(counts[0, 2]), int(counts[1, 2]), int(counts[2, 2])),
        test_basis_errors=(int(counts[0, 3]), int(counts[1, 3]), int(counts[2, 3])),
    )
    qber = key_errors / key_sifted if key_sifted else 0.5
    leak = math.ceil(RECONCILIATION_EFFICIENCY * key_sifted * binary_entropy(min(qber, 0.5)))
    settings = _settings_of(config)
    bound = decoy_key_length_for(
        analysis, observation, settings, leak_ec_bits=leak, security=SECURITY
    )
    return {
        "analysis": FiniteKeyAnalysis(analysis).value,
        "key_basis_sifted": key_sifted,
        "key_basis_qber": qber,
        "key_bits": bound.length_bits,
        "bits_per_pulse": bound.length_bits / pulses,
    }


def theory_bits_per_pulse(
    config: SimulatedLinkConfig,
    km: float,
    pulses: int,
    analysis: FiniteKeyAnalysis = DEFAULT_FINITE_KEY_ANALYSIS,
) -> float:
    """Expected finite-key rate of the channel model (``decoy_secret_bits_per_pulse``)."""
    return decoy_secret_bits_per_pulse(
        settings=_settings_of(config),
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
        analysis=analysis,
    )


def one_decoy_theory_bits_per_pulse(
    base: SimulatedLinkConfig,
    km: float,
    pulses: int,
    analysis: FiniteKeyAnalysis = DEFAULT_FINITE_KEY_ANALYSIS,
) -> float:
    """Expected finite-key rate of one-decoy BB84 (Rusca et al. 2018) on the same channel with
    the statistics of ``analysis``, its settings optimised for ``km`` and ``pulses`` (its
    channel model has no after-pulses: ``one_decoy.expected_one_decoy_counts``)."""
    eta = _transmittance(base, km)
    return optimise_one_decoy_settings(
        transmittance=eta,
        dark_count_probability=base.dark_count_probability_per_gate,
        misalignment_error=base.misalignment_error,
        reconciliation_efficiency=RECONCILIATION_EFFICIENCY,
        security=SECURITY,
        pulses=pulses,
        statistics=analysis,
    ).bits_per_pulse


def simulate_keyrate_versus_distance(
    base: SimulatedLinkConfig,
    *,
    distances_km: Sequence[float],
    curve_km: Sequence[float],
    pulses: int,
    seed: int = 1000,
    analysis: FiniteKeyAnalysis = DEFAULT_FINITE_KEY_ANALYSIS,
) -> tuple[list[dict[str, Any]], list[dict[str, float]]]:
    """(points, curve): at each of ``distances_km`` the simulated link runs ``pulses`` with the
    decoy settings optimised for ``analysis`` and its counts go into that bound; along
    ``curve_km`` the analytic rate of ``analysis`` ("theory"), of one-decoy BB84 with the same
    statistics ("theory_one_decoy", ``one_decoy_theory_bits_per_pulse``), of Lim et al. 2014
    with its own optimised settings ("theory_lim2014") and the PLOB bound -log2(1 - eta_fibre)
    (Pirandola et al., Nat. Commun. 8, 15043 (2017)), eta_fibre = 10^(-alpha L / 10).
    Deterministic given ``seed``.
    """
    points: list[dict[str, Any]] = []
    settings: DecoySettings | None = None
    for i, km in enumerate(distances_km):
        settings = optimised_settings(base, float(km), pulses, settings, analysis)
        config = link_config_for(base, float(km), settings)
        counts = trio.run(simulate_counts, config, pulses, seed + i)
        point: dict[str, Any] = {"distance_km": float(km), "pulses": pulses}
        point |= finite_key_from_counts(config, counts, pulses, analysis)
        point["theory_bits_per_pulse"] = theory_bits_per_pulse(config, float(km), pulses, analysis)
        points.append(point)
    curve: list[dict[str, float]] = []
    settings = None
    lim_settings: DecoySettings | None = None
    lim = FiniteKeyAnalysis.LIM2014
    for km in curve_km:
        settings = optimised_settings(base, float(km), pulses, settings, analysis)
        lim_settings = optimised_settings(base, float(km), pulses, lim_settings, lim)
        fibre = 10 ** (-base.attenuation_db_per_km * float(km) / 10)
        curve.append(
            {
                "distance_km": float(km),
                "theory": theory_bits_per_pulse(
                    link_config_for(base, float(km), settings), float(km), pulses, analysis
                ),
                "theory_one_decoy": one_decoy_theory_bits_per_pulse(
                    base, float(km), pulses, analysis
                ),
                "theory_lim2014": theory_bits_per_pulse(
                    link_config_for(base, float(km), lim_settings), float(km), pulses, lim
                ),
                "plob": plob_bound_bits_per_pulse(fibre),
            }
        )
    return points, curve
