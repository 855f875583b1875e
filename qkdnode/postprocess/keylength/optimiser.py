"""Decoy-setting optimiser: maximise the expected key rate of a selected analysis.

Deterministic (fixed starting points, Nelder-Mead); pure ``math``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from qkdnode.postprocess.keylength.common import (
    DEFAULT_FINITE_KEY_ANALYSIS,
    DecoySettings,
    FiniteKeyAnalysis,
    SecurityParameters,
    check_nonneg_finite,
)
from qkdnode.postprocess.keylength.theory import make_model, theory_point


@dataclass(frozen=True, slots=True, kw_only=True)
class DecoyOptimum:
    """Best settings found by optimise_decoy_settings and the expected key they give."""

    settings: DecoySettings
    bits_per_pulse: float  # floor(l) / N, 0.0 when no key
    length_bits: int  # floor(l), >= 0
    pulses: float  # N (expected, for a fixed key block)
    eps_sec: float  # the secrecy actually used (kappa * l when secrecy_per_key_bit is set)


def _settings_from_vector(x: Sequence[float], mu_vacuum: float) -> DecoySettings | None:
    """Unconstrained 5-vector -> valid DecoySettings (logit, softmax, exp keep every constraint)."""
    try:
        q = 1.0 / (1.0 + math.exp(-x[0]))
        e1, e2 = math.exp(x[1]), math.exp(x[2])
        total = e1 + e2 + 1.0
        mu_decoy = mu_vacuum + math.exp(x[3])
        mu_signal = mu_decoy + mu_vacuum + math.exp(x[4])
        return DecoySettings(
            mu_signal=mu_signal,
            mu_decoy=mu_decoy,
            mu_vacuum=mu_vacuum,
            p_signal=e1 / total,
            p_decoy=e2 / total,
            p_vacuum=1.0 - e1 / total - e2 / total,
            p_key_basis=q,
        )
    except (OverflowError, ValueError):
        return None


def _vector_from_settings(settings: DecoySettings) -> list[float]:
    q = settings.p_key_basis
    return [
        math.log(q / (1.0 - q)),
        math.log(settings.p_signal / settings.p_vacuum),
        math.log(settings.p_decoy / settings.p_vacuum),
        math.log(settings.mu_decoy - settings.mu_vacuum),
        math.log(settings.mu_signal - settings.mu_decoy - settings.mu_vacuum),
    ]


def nelder_mead_max(
    objective: Callable[[list[float]], float], start: list[float], step: float, max_evals: int
) -> tuple[list[float], float]:
    """Deterministic Nelder-Mead maximisation (standard coefficients 1, 2, 1/2, 1/2)."""
    dim = len(start)
    simplex = [list(start)]
    for i in range(dim):
        vertex = list(start)
        vertex[i] += step
        simplex.append(vertex)
    values = [objective(v) for v in simplex]
    evals = len(simplex)
    while evals < max_evals:
        order = sorted(range(dim + 1), key=lambda i: values[i], reverse=True)
        simplex = [simplex[i] for i in order]
        values = [values[i] for i in order]
        best, worst = values[0], values[-1]
        size = max(abs(a - b) for v in simplex[1:] for a, b in zip(v, simplex[0], strict=True))
        if size < 1e-6 or (math.isfinite(worst) and abs(best - worst) <= 1e-12 * abs(best)):
            break
        centroid = [sum(v[i] for v in simplex[:-1]) / dim for i in range(dim)]
        worst_vertex = simplex[-1]

        def along(
            t: float, cen: list[float] = centroid, w: list[float] = worst_vertex
        ) -> list[float]:
            return [c + t * (x - c) for c, x in zip(cen, w, strict=True)]

        reflected = along(-1.0)
        f_reflected = objective(reflected)
        evals += 1
        if f_reflected > values[0]:
            expanded = along(-2.0)
            f_expanded = objective(expanded)
            evals += 1
            if f_expanded > f_reflected:
                simplex[-1], values[-1] = expanded, f_expanded
            else:
                simplex[-1], values[-1] = reflected, f_reflected
            continue
        if f_reflected > values[-2]:
            simplex[-1], values[-1] = reflected, f_reflected
            continue
        contracted = along(-0.5) if f_reflected > values[-1] else along(0.5)
        f_contracted = objective(contracted)
        evals += 1
        if f_contracted > max(f_reflected, values[-1]):
            simplex[-1], values[-1] = contracted, f_contracted
            continue
        for i in range(1, dim + 1):
            simplex[i] = [b + 0.5 * (v - b) for b, v in zip(simplex[0], simplex[i], strict=True)]
            values[i] = objective(simplex[i])
            evals += 1
    index = max(range(dim + 1), key=lambda i: values[i])
    return simplex[index], values[index]


_DEFAULT_START: Final = DecoySettings(
    mu_signal=0.5,
    mu_decoy=0.15,
    mu_vacuum=2e-4,
    p_signal=0.7,
    p_decoy=0.2,
    p_vacuum=0.1,
    p_key_basis=0.8,
)


def optimise_decoy_settings(
    *,
    transmittance: float,
    dark_count_probability: float,
    misalignment_error: float,
    reconciliation_efficiency: float,
    security: SecurityParameters,
    key_block_bits: int | None = None,
    pulses: int | None = None,
    mu_vacuum: float = 2e-4,
    afterpulse_probability: float = 0.0,
    secrecy_per_key_bit: float | None = None,
    initial: DecoySettings | None = None,
    max_evaluations: int = 1500,
    analysis: FiniteKeyAnalysis = DEFAULT_FINITE_KEY_ANALYSIS,
    error_positions_disclosed: bool = True,
) -> DecoyOptimum:
    """Maximise the expected key rate l/N of ``analysis`` over {q_x, p_mu1, p_mu2, mu1, mu2}.

    ``analysis`` and ``error_positions_disclosed`` as in ``decoy_secret_bits_per_pulse``.

    mu3 = mu_vacuum is fixed (2e-4 in the paper). Give exactly one of key_block_bits (the
    paper's n_X; N follows) or pulses (N fixed). Deterministic: the best of 25 fixed starting
    points (plus ``initial``, for warm starts along a curve), then two Nelder-Mead runs on the
    real-valued length (l/N above zero, l/n_X below), so the search also climbs out of regions
    without key. Returns the start with length 0 when no setting gives a bound at all.
    About 1500 bound evaluations: 30-100 ms with lim2014, 0.5-1.5 s with lim2014-kl here.
    """
    model = make_model(
        transmittance=transmittance,
        dark_count_probability=dark_count_probability,
        misalignment_error=misalignment_error,
        afterpulse_probability=afterpulse_probability,
        reconciliation_efficiency=reconciliation_efficiency,
        security=security,
        secrecy_per_key_bit=secrecy_per_key_bit,
        key_block_bits=key_block_bits,
        pulses=pulses,
        analysis=analysis,
        error_positions_disclosed=error_positions_disclosed,
    )
    vacuum = check_nonneg_finite("mu_vacuum", mu_vacuum)
    start_settings = initial if initial is not None else _DEFAULT_START
    if start_settings.mu_vacuum != vacuum:
        start_settings = _replace_vacuum(start_settings, vacuum)

    reference_scale = float(key_block_bits if key_block_bits is not None else pulses or 1)

    def objective(x: list[float]) -> float:
        settings = _settings_from_vector(x, vacuum)
        if settings is None:
            return -math.inf
        point = theory_point(model, settings)
        if not math.isfinite(point.real_length):
            return -math.inf
        if point.real_length > 0.0:
            return point.real_length / point.pulses
        # Below zero, l/N would reward sending more pulses (N -> inf, l/N -> 0-) and drive the
        # search to a vanishing key basis; a fixed scale keeps it continuous at 0 without that.
        return point.real_length / reference_scale

    # Deterministic multi-start: small blocks need a balanced basis choice and a large decoy
    # share before any bound is finite; keep the best finite start (or the warm start).
    starts = [_vector_from_settings(start_settings)]
    for q_key in (0.5, 0.7, 0.9):
        for p_signal, p_decoy in ((0.1, 0.5), (0.5, 0.3), (0.7, 0.2), (0.85, 0.1)):
            for mu_signal, mu_decoy in ((0.4, 0.1), (0.6, 0.2)):
                starts.append(
                    [
                        math.log(q_key / (1.0 - q_key)),
                        math.log(p_signal / (1.0 - p_signal - p_decoy)),
                        math.log(p_decoy / (1.0 - p_signal - p_decoy)),
                        math.log(max(mu_decoy - vacuum, 1e-6)),
                        math.log(max(mu_signal - mu_decoy - vacuum, 1e-6)),
                    ]
                )
    scored = [(objective(v), i) for i, v in enumerate(starts)]
    best_value, best_index = max(scored)
    x = starts[best_index]
    if math.isfinite(best_value):
        per_run = max(50, (max_evaluations - len(starts)) // 2)
        x, _ = nelder_mead_max(objective, x, 0.3, per_run)
        x, _ = nelder_mead_max(objective, x, 0.1, per_run)
    best = _settings_from_vector(x, vacuum)
    assert best is not None  # x came from finite objective values or the valid start
    point = theory_point(model, best)
    length = max(0, math.floor(point.real_length)) if math.isfinite(point.real_length) else 0
    return DecoyOptimum(
        settings=best,
        bits_per_pulse=length / point.pulses if length > 0 else 0.0,
        length_bits=length,
        pulses=point.pulses,
        eps_sec=point.eps_sec,
    )


def _replace_vacuum(settings: DecoySettings, mu_vacuum: float) -> DecoySettings:
    mu_decoy = max(settings.mu_decoy, 2.0 * mu_vacuum + 1e-6)
    mu_signal = max(settings.mu_signal, mu_decoy + 2.0 * mu_vacuum + 1e-6)
    return DecoySettings(
        mu_signal=mu_signal,
        mu_decoy=mu_decoy,
        mu_vacuum=mu_vacuum,
        p_signal=settings.p_signal,
        p_decoy=settings.p_decoy,
        p_vacuum=settings.p_vacuum,
        p_key_basis=settings.p_key_basis,
    )
