"""Finite-key secret-key length: the public names of ``qkdnode.postprocess.keylength``.

One module per analysis lives in ``keylength``: ``tomamichel2012`` (single-photon BB84),
``lim2014``, ``lim2014_chernoff`` and ``lim2014_kl`` (decoy-state BB84 in the same framework,
``decoy``, with Hoeffding, per-class Chernoff and per-class relative-entropy deviations),
``theory`` (channel model, curves, PLOB) and ``optimiser``.
``FiniteKeyAnalysis`` selects the decoy analysis (config ``[postprocess] finite_key``);
``DEFAULT_FINITE_KEY_ANALYSIS`` is ``lim2014-kl``, the tightest of the three (why it is sound:
``keylength.common.FiniteKeyAnalysis``). ``keylength.one_decoy`` is one-decoy BB84 (Rusca et
al. 2018) with the same three choices of statistics (config ``security_model = "one_decoy"``).

Pure: ``math`` only; no I/O, no clock, no randomness.
"""

from __future__ import annotations

from qkdnode.postprocess.keylength.common import (
    DEFAULT_FINITE_KEY_ANALYSIS,
    DecoyKeyBound,
    DecoyObservation,
    DecoySettings,
    FiniteKeyAnalysis,
    SecurityParameters,
    asymptotic_bb84_rate,
    binary_entropy,
)
from qkdnode.postprocess.keylength.decoy import asymptotic_decoy_length
from qkdnode.postprocess.keylength.lim2014 import lim_key_length
from qkdnode.postprocess.keylength.one_decoy import (
    OneDecoyObservation,
    OneDecoySettings,
    one_decoy_key_length,
)
from qkdnode.postprocess.keylength.optimiser import DecoyOptimum, optimise_decoy_settings
from qkdnode.postprocess.keylength.selection import decoy_key_length_for
from qkdnode.postprocess.keylength.theory import (
    asymptotic_decoy_bits_per_pulse,
    channel_transmittance,
    decoy_secret_bits_per_pulse,
    expected_decoy_observation,
    expected_error_gain,
    expected_gain,
    plob_bound_bits_per_pulse,
    pulses_for_key_block,
    vacuum_yield,
)
from qkdnode.postprocess.keylength.tomamichel2012 import (
    optimal_sample_bits,
    tomamichel_key_length,
    tomamichel_statistical_deviation,
)

__all__ = [
    "DEFAULT_FINITE_KEY_ANALYSIS",
    "DecoyKeyBound",
    "DecoyObservation",
    "DecoyOptimum",
    "DecoySettings",
    "FiniteKeyAnalysis",
    "OneDecoyObservation",
    "OneDecoySettings",
    "SecurityParameters",
    "asymptotic_bb84_rate",
    "asymptotic_decoy_bits_per_pulse",
    "asymptotic_decoy_length",
    "binary_entropy",
    "channel_transmittance",
    "decoy_key_length_for",
    "decoy_secret_bits_per_pulse",
    "expected_decoy_observation",
    "expected_error_gain",
    "expected_gain",
    "lim_key_length",
    "one_decoy_key_length",
    "optimal_sample_bits",
    "optimise_decoy_settings",
    "plob_bound_bits_per_pulse",
    "pulses_for_key_block",
    "tomamichel_key_length",
    "tomamichel_statistical_deviation",
    "vacuum_yield",
]
