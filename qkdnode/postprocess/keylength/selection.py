"""Dispatch from a FiniteKeyAnalysis to its decoy-state bound."""

from __future__ import annotations

from qkdnode.postprocess.keylength.common import (
    DecoyKeyBound,
    DecoyObservation,
    DecoySettings,
    FiniteKeyAnalysis,
    SecurityParameters,
)
from qkdnode.postprocess.keylength.decoy import Deviation, decoy_key_length
from qkdnode.postprocess.keylength.lim2014 import hoeffding_deviation
from qkdnode.postprocess.keylength.lim2014_chernoff import chernoff_deviation
from qkdnode.postprocess.keylength.lim2014_kl import relative_entropy_deviation

_DEVIATIONS: dict[FiniteKeyAnalysis, Deviation] = {
    FiniteKeyAnalysis.LIM2014: hoeffding_deviation,
    FiniteKeyAnalysis.LIM2014_CHERNOFF: chernoff_deviation,
    FiniteKeyAnalysis.LIM2014_KL: relative_entropy_deviation,
}


def deviation_for(analysis: FiniteKeyAnalysis) -> Deviation:
    """The expected-count deviation of ``analysis``; ValueError for an unknown one."""
    try:
        return _DEVIATIONS[FiniteKeyAnalysis(analysis)]
    except (KeyError, ValueError):
        raise ValueError(f"finite_key: unknown analysis {analysis!r}") from None


def decoy_key_length_for(
    analysis: FiniteKeyAnalysis,
    observation: DecoyObservation,
    settings: DecoySettings,
    *,
    leak_ec_bits: int,
    security: SecurityParameters,
    error_positions_disclosed: bool = True,
) -> DecoyKeyBound:
    """Key length of one block under the selected analysis (see ``lim_key_length``)."""
    return decoy_key_length(
        observation,
        settings,
        leak_ec_bits=leak_ec_bits,
        security=security,
        deviation=deviation_for(analysis),
        error_positions_disclosed=error_positions_disclosed,
    )
