"""The photon-number model that decoy-estimate tests draw counts from (two test modules)."""

from __future__ import annotations

import math

import numpy as np

from qkdnode.postprocess.finitekey import DecoySettings
from qkdnode.postprocess.keylength.decoy import Deviation, decoy_bound

MC_SETTINGS = DecoySettings(
    mu_signal=0.3,
    mu_decoy=0.08,
    mu_vacuum=0.002,
    p_signal=0.5,
    p_decoy=0.3,
    p_vacuum=0.2,
    p_key_basis=0.5,
)
MC_MAX_PHOTONS = 12


def mc_model(misalignment: float = 0.02) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    transmittance, vacuum_yield = 0.05, 2e-3
    photons = np.arange(MC_MAX_PHOTONS + 1)
    yields = 1.0 - (1.0 - vacuum_yield) * (1.0 - transmittance) ** photons
    errors = (vacuum_yield / 2 + misalignment * (1.0 - (1.0 - transmittance) ** photons)) / yields
    errors[0] = 0.5
    cells = np.array(
        [
            [p * math.exp(-mu) * mu**n / math.factorial(n) for n in photons]
            for mu, p in zip(MC_SETTINGS.intensities, MC_SETTINGS.probabilities, strict=True)
        ]
    )
    return cells / cells.sum(), yields, errors


def mc_failures(deviation: Deviation, eps_sec: float, draws: int, pulses: int) -> np.ndarray:
    cells, yields, errors = mc_model()
    rng = np.random.default_rng(2024)
    failures = np.zeros(3, dtype=int)
    for _ in range(draws):
        key = rng.binomial(rng.multinomial(pulses, cells.ravel()).reshape(cells.shape), yields)
        test = rng.binomial(rng.multinomial(pulses, cells.ravel()).reshape(cells.shape), yields)
        test_errors = rng.binomial(test, errors)
        bound = decoy_bound(
            key.sum(axis=1).tolist(),
            test.sum(axis=1).tolist(),
            test_errors.sum(axis=1).tolist(),
            MC_SETTINGS,
            0.0,
            eps_sec,
            1e-15,
            deviation=deviation,
            count_vacuum=True,
        )
        failures += [
            bound.s_x0 > key[:, 0].sum(),
            bound.s_x1 > key[:, 1].sum(),
            bound.v_z1 < test_errors[:, 1].sum(),
        ]
    return failures
