"""Configuration of the simulated link and of Eve: frozen dataclasses with units in every name.

``from_mapping`` takes the dict of a TOML table (``[link]``, ``[link.eve]``), rejects unknown keys
and wrong types, and validates ranges, naming the dotted key in ``ConfigError``. Direct
construction runs the same validation (with the default path).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Self

from qkdnode.errors import ConfigError
from qkdnode.link.interface import LinkParameters

# Photon numbers above this are clipped by the fibre encoding (6 bits per pulse). With
# mu <= MAX_MU the clipped tail has probability < 1e-25 per pulse.
MAX_MU = 10.0
_PROBABILITY_SUM_TOLERANCE = 1e-9


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    result = float(value)
    return result if math.isfinite(result) else None


def _check_range(
    values: Mapping[str, Any],
    path: str,
    name: str,
    expected: str,
    ok: Callable[[float], bool],
) -> None:
    value = values[name]
    number = _number(value)
    if number is None or not ok(number):
        raise ConfigError(key=f"{path}.{name}", expected=expected)


def _parse(cls: type[Any], data: Mapping[str, object], path: str) -> dict[str, Any]:
    """Type-check a mapping against a dataclass's fields; unknown keys are errors."""
    if not isinstance(data, Mapping):
        raise ConfigError(key=path, expected="a table")
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{path}.{key}"
        if not isinstance(key, str) or key not in known:
            raise ConfigError(key=dotted, expected=f"one of the known keys {sorted(known)}")
        ftype = str(known[key].type)
        if ftype == "bool":
            if not isinstance(value, bool):
                raise ConfigError(key=dotted, expected="true or false")
            kwargs[key] = value
        elif ftype == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(key=dotted, expected="an integer")
            kwargs[key] = value
        elif ftype == "str":
            if not isinstance(value, str):
                raise ConfigError(key=dotted, expected="a string")
            kwargs[key] = value
        else:
            number = _number(value)
            if number is None:
                raise ConfigError(key=dotted, expected="a finite number")
            kwargs[key] = number
    return kwargs


def _is_probability(x: float) -> bool:
    return 0.0 <= x <= 1.0


def _check_link(values: Mapping[str, Any], path: str) -> None:
    nonneg = "a number >= 0"
    for name in ("fiber_km", "attenuation_db_per_km", "insertion_loss_db"):
        _check_range(values, path, name, nonneg, lambda x: x >= 0.0)
    _check_range(
        values, path, "detector_efficiency", "a number in (0, 1]", lambda x: 0.0 < x <= 1.0
    )
    for name in (
        "dark_count_probability_per_gate",
        "p_signal",
        "p_decoy",
        "p_vacuum",
        "p_key_basis",
    ):
        _check_range(values, path, name, "a probability in [0, 1]", _is_probability)
    _check_range(
        values, path, "afterpulse_probability", "a probability in [0, 1)", lambda x: 0 <= x < 1
    )
    _check_range(
        values, path, "misalignment_error", "a probability in [0, 0.5]", lambda x: 0 <= x <= 0.5
    )
    _check_range(values, path, "pulse_rate_hz", "a number > 0", lambda x: x > 0.0)
    for name in ("fibre_timeout_s", "connect_timeout_s"):
        _check_range(values, path, name, "a number > 0", lambda x: x > 0.0)
    total = values["p_signal"] + values["p_decoy"] + values["p_vacuum"]
    if abs(total - 1.0) > _PROBABILITY_SUM_TOLERANCE:
        raise ConfigError(
            key=f"{path}.p_vacuum",
            expected=f"p_signal + p_decoy + p_vacuum = 1 (the sum is {total!r})",
        )
    # Decoy ordering of Lim et al., PRA 89, 022307 (2014): mu1 > mu2 + mu3, mu2 > mu3 >= 0.
    for name in ("mu_signal", "mu_decoy", "mu_vacuum"):
        _check_range(values, path, name, "a number >= 0", lambda x: x >= 0.0)
    mu1, mu2, mu3 = values["mu_signal"], values["mu_decoy"], values["mu_vacuum"]
    if not mu2 > mu3:
        raise ConfigError(key=f"{path}.mu_decoy", expected=f"a number > mu_vacuum ({mu3})")
    if not mu1 > mu2 + mu3:
        raise ConfigError(
            key=f"{path}.mu_signal", expected=f"a number > mu_decoy + mu_vacuum ({mu2 + mu3})"
        )
    _check_range(values, path, "mu_signal", f"a number <= {MAX_MU}", lambda x: x <= MAX_MU)
    chunk = values["chunk_pulses"]
    if isinstance(chunk, bool) or not isinstance(chunk, int) or not 1 <= chunk <= 1 << 24:
        raise ConfigError(key=f"{path}.chunk_pulses", expected="an integer in [1, 2^24]")
    port = values["fibre_port"]
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(key=f"{path}.fibre_port", expected="an integer in [0, 65535]")
    if not isinstance(values["fibre_host"], str) or not values["fibre_host"]:
        raise ConfigError(key=f"{path}.fibre_host", expected="a non-empty host name")


@dataclass(frozen=True, slots=True, kw_only=True)
class SimulatedLinkConfig:
    """Physics and transport of the simulated decoy-state BB84 link.

    Defaults follow the example of Lim et al., PRA 89, 022307 (2014) (0.2 dB/km, η_Bob = 10 %,
    p_dc = 6e-7, e_mis = 0.5 %). Over TCP, Alice listens on ``fibre_host:fibre_port`` and Bob
    connects.
    """

    fiber_km: float = 25.0
    attenuation_db_per_km: float = 0.2
    insertion_loss_db: float = 0.0
    detector_efficiency: float = 0.10
    dark_count_probability_per_gate: float = 6e-7
    afterpulse_probability: float = 0.0
    misalignment_error: float = 0.005
    pulse_rate_hz: float = 1e9
    mu_signal: float = 0.5
    mu_decoy: float = 0.1
    mu_vacuum: float = 2e-4
    p_signal: float = 0.7
    p_decoy: float = 0.2
    p_vacuum: float = 0.1
    p_key_basis: float = 0.9
    chunk_pulses: int = 1 << 18
    fibre_host: str = "127.0.0.1"
    fibre_port: int = 7330
    fibre_timeout_s: float = 10.0
    connect_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        _check_link({f.name: getattr(self, f.name) for f in fields(self)}, "link")

    @classmethod
    def from_mapping(cls, data: Mapping[str, object], *, path: str = "link") -> Self:
        """Build from a TOML table; ``ConfigError`` names the dotted key that is wrong."""
        kwargs = _parse(cls, data, path)
        values = {f.name: f.default for f in fields(cls)} | kwargs
        _check_link(values, path)
        return cls(**kwargs)

    @property
    def receiver_transmittance(self) -> float:
        """η_Bob = 10^(−insertion_loss/10) · detector efficiency."""
        return float(10.0 ** (-self.insertion_loss_db / 10.0)) * self.detector_efficiency

    def nominal_parameters(self) -> LinkParameters:
        return LinkParameters(
            mu_signal=self.mu_signal,
            mu_decoy=self.mu_decoy,
            mu_vacuum=self.mu_vacuum,
            p_signal=self.p_signal,
            p_decoy=self.p_decoy,
            p_vacuum=self.p_vacuum,
            p_key_basis=self.p_key_basis,
            pulse_rate_hz=self.pulse_rate_hz,
            fiber_km=self.fiber_km,
            attenuation_db_per_km=self.attenuation_db_per_km,
            receiver_transmittance=self.receiver_transmittance,
            dark_count_probability_per_gate=self.dark_count_probability_per_gate,
            afterpulse_probability=self.afterpulse_probability,
            misalignment_error=self.misalignment_error,
        )


def _check_eve(values: Mapping[str, Any], path: str) -> None:
    _check_range(
        values, path, "intercept_resend_fraction", "a probability in [0, 1]", _is_probability
    )
    block = values["pns_single_photon_block_fraction"]
    if block is not None and (_number(block) is None or not _is_probability(float(block))):
        raise ConfigError(
            key=f"{path}.pns_single_photon_block_fraction", expected="a probability in [0, 1]"
        )
    if not isinstance(values["photon_number_splitting"], bool):
        raise ConfigError(key=f"{path}.photon_number_splitting", expected="true or false")
    if values["photon_number_splitting"] and values["intercept_resend_fraction"] > 0:
        raise ConfigError(
            key=f"{path}.intercept_resend_fraction",
            expected="0 when photon_number_splitting is on (one attack at a time)",
        )
    if block is not None and not values["photon_number_splitting"]:
        raise ConfigError(
            key=f"{path}.pns_single_photon_block_fraction",
            expected="unset unless photon_number_splitting is on",
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class EveConfig:
    """An eavesdropper on the fibre (for demos and tests of the security checks).

    - ``intercept_resend_fraction``: fraction of pulses Eve measures in a random basis and
      resends as one photon in her basis and result;
    - ``photon_number_splitting``: Eve replaces the fibre by a lossless channel, keeps one
      photon of every multi-photon pulse, forwards the rest and blocks single-photon pulses;
    - ``pns_single_photon_block_fraction``: the fraction of single-photon pulses she blocks;
      unset means "chosen so that the signal gain looks like the nominal one".
    """

    intercept_resend_fraction: float = 0.0
    photon_number_splitting: bool = False
    pns_single_photon_block_fraction: float | None = None

    def __post_init__(self) -> None:
        _check_eve({f.name: getattr(self, f.name) for f in fields(self)}, "link.eve")

    @classmethod
    def from_mapping(cls, data: Mapping[str, object], *, path: str = "link.eve") -> Self:
        """Build from a TOML table; ``ConfigError`` names the dotted key that is wrong."""
        kwargs = _parse(cls, data, path)
        values = {f.name: f.default for f in fields(cls)} | kwargs
        _check_eve(values, path)
        return cls(**kwargs)
