"""The ``[postprocess]`` section: block size, Cascade variant, security model, finite-key
analysis, privacy-amplification family and the epsilons."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from qkdnode.config.table import Table
from qkdnode.errors import ConfigError

# "decoy": two decoys (signal, decoy, vacuum or weakest decoy); "one_decoy": signal and one decoy
# (the link's p_vacuum is 0); "single_photon": no decoy states
SecurityModel = Literal["decoy", "one_decoy", "single_photon"]
SECURITY_MODELS: tuple[SecurityModel, ...] = ("decoy", "one_decoy", "single_photon")
# the decoy finite-key analyses (qkdnode.postprocess.finitekey.FiniteKeyAnalysis values)
FiniteKey = Literal["lim2014", "lim2014-chernoff", "lim2014-kl"]
FINITE_KEY_ANALYSES: tuple[FiniteKey, ...] = ("lim2014", "lim2014-chernoff", "lim2014-kl")
# former names, refused with the new one named: the analysis is unchanged, only its name
RENAMED_FINITE_KEY_ANALYSES: dict[str, FiniteKey] = {"zhang2017": "lim2014-chernoff"}
# the privacy-amplification families (qkdnode.postprocess.amplification_family values); both
# nodes must name the same one
PA_FAMILIES: tuple[str, ...] = ("toeplitz-fft-v1", "mersenne-gmp-v1")
MAX_BLOCKS_IN_FLIGHT = 4


@dataclass(frozen=True, slots=True, kw_only=True)
class PostprocessSection:
    block_pulses: int
    cascade_variant: str
    security_model: SecurityModel
    finite_key: FiniteKey
    eps_sec: float
    eps_cor: float
    qber_threshold: float
    sample_bits: int
    pa_family: str
    # Alice opens up to this many blocks at once once the session is key-derived (Bob follows)
    blocks_in_flight: int
    # Cascade reconciles the key in frames of at most this many bits, one after another (0: one
    # frame); both nodes must agree. Bounds Cascade's memory (about 90 bytes per frame bit)
    cascade_frame_bits: int = 0


def read_postprocess(table: Table) -> PostprocessSection:
    def open_interval(name: str, default: float, maximum: float) -> float:
        return table.number(
            name,
            default,
            minimum=0,
            maximum=maximum,
            exclusive_minimum=True,
            exclusive_maximum=True,
        )

    model = table.string("security_model", "decoy", choices=SECURITY_MODELS)
    section = PostprocessSection(
        block_pulses=table.integer("block_pulses", 50_000_000, minimum=1000),
        cascade_variant=table.string(
            "cascade_variant", "subblock-reuse", choices=("original", "yan", "subblock-reuse")
        ),
        security_model=next(choice for choice in SECURITY_MODELS if choice == model),
        finite_key=_finite_key(table),
        eps_sec=open_interval("eps_sec", 1e-10, 1),
        eps_cor=open_interval("eps_cor", 1e-12, 1),
        qber_threshold=open_interval("qber_threshold", 0.11, 0.5),
        sample_bits=table.integer("sample_bits", 1024, minimum=0),
        pa_family=table.string("pa_family", "mersenne-gmp-v1", choices=PA_FAMILIES),
        # at most the channel's limit on open blocks (qkdnode.channel.rules.ChannelConfig)
        blocks_in_flight=table.integer(
            "blocks_in_flight", 1, minimum=1, maximum=MAX_BLOCKS_IN_FLIGHT
        ),
        cascade_frame_bits=table.integer("cascade_frame_bits", 0, minimum=0),
    )
    table.finish()
    return section


def _finite_key(table: Table) -> FiniteKey:
    name = table.string("finite_key", "lim2014-kl")
    renamed = RENAMED_FINITE_KEY_ANALYSES.get(name)
    if renamed is not None:
        raise ConfigError(
            table.key("finite_key"),
            f"{renamed!r}: {name!r} is that analysis's former name (Lim 2014 with per-class"
            " Chernoff bounds, not the key-rate formula of Zhang et al. 2017)",
        )
    name = table.string("finite_key", "lim2014-kl", choices=FINITE_KEY_ANALYSES)
    for analysis in FINITE_KEY_ANALYSES:
        if analysis == name:
            return analysis
    raise AssertionError(name)  # the table reader refused anything else


def security_model_mismatch(model: SecurityModel, p_vacuum: float) -> str | None:
    """What ``model`` needs of the link's ``p_vacuum`` (the probability of the third intensity
    class), as a ConfigError's "expected" text, or None when they fit: two decoys need that
    class, one decoy sends none."""
    if model == "one_decoy" and p_vacuum != 0.0:
        return (
            f'0 with [postprocess] security_model = "one_decoy" (one decoy sends two '
            f"intensities), got {p_vacuum!r}"
        )
    if model == "decoy" and p_vacuum == 0.0:
        return (
            '> 0 with [postprocess] security_model = "decoy" (two decoys need the third, '
            'weakest class; a source of two intensities needs security_model = "one_decoy")'
        )
    return None
