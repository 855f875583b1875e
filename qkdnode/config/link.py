"""The ``[link]`` section: the simulated link and its eavesdropper, a serial-attached device, or
a replayed recording.

Frozen dataclasses with units in every name. ``from_table`` reads a TOML table strictly (unknown
keys and wrong types are refused, naming the dotted key in ``ConfigError``); ranges are checked
on construction, so a config built in code is held to the same rules.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, Final, Literal, Self

from qkdnode.config.table import REQUIRED, Table, resolve_path
from qkdnode.errors import ConfigError

LinkBackend = Literal["simulated", "serial", "replay"]

# Photon numbers above this are clipped by the fibre encoding (6 bits per pulse). With
# mu <= MAX_MU the clipped tail has probability < 1e-25 per pulse.
MAX_MU = 10.0
_PROBABILITY_SUM_TOLERANCE = 1e-9
# what Alice's end of the simulated link keeps of a block (SimulatedLinkConfig.alice_records)
ALICE_RECORDS: Final = ("every_pulse", "detected_pulses")

SERIAL_PROTOCOL_VERSION: Final = 1  # the device protocol this release speaks (device-protocol.md)
DEFAULT_MODEL: Final = "qkdnode-emulator"
# The rates Linux termios names (B9600 ... B4000000); a serial device must run at one of them.
BAUD_RATES: Final = (
    9600,
    19200,
    38400,
    57600,
    115200,
    230400,
    460800,
    500000,
    921600,
    1000000,
    1500000,
    2000000,
    3000000,
    4000000,
)

Key = Callable[[str], str]


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkParameters:
    """Nominal, public parameters of a link, as the key-length bound and Eve may know them.

    Intensities are mean photon numbers per pulse of the three classes (signal, decoy, vacuum
    or weakest decoy); ``p_*`` their probabilities; ``p_key_basis`` the probability of basis 0
    (Z, the key basis) at both ends. ``receiver_transmittance`` is η_Bob: receiver insertion
    loss times detector efficiency.
    """

    mu_signal: float
    mu_decoy: float
    mu_vacuum: float
    p_signal: float
    p_decoy: float
    p_vacuum: float
    p_key_basis: float
    pulse_rate_hz: float
    fiber_km: float
    attenuation_db_per_km: float
    receiver_transmittance: float
    dark_count_probability_per_gate: float
    afterpulse_probability: float
    misalignment_error: float

    @property
    def fibre_transmittance(self) -> float:
        """10^(−αL/10): transmittance of the fibre span alone."""
        return float(10.0 ** (-self.attenuation_db_per_km * self.fiber_km / 10.0))

    @property
    def channel_transmittance(self) -> float:
        """η = η_Bob · 10^(−αL/10) (Lo, Ma, Chen, PRL 94, 230504 (2005); Ma et al., PRA 72,
        012326 (2005), eq. 2), including receiver insertion loss and detector efficiency."""
        return self.receiver_transmittance * self.fibre_transmittance

    @property
    def intensities(self) -> tuple[float, float, float]:
        return (self.mu_signal, self.mu_decoy, self.mu_vacuum)

    @property
    def intensity_probabilities(self) -> tuple[float, float, float]:
        return (self.p_signal, self.p_decoy, self.p_vacuum)


def _require(ok: bool, key: str, expected: str) -> None:
    if not ok:
        raise ConfigError(key=key, expected=expected)


def _read_fields(cls: type[_LinkSection], table: Table) -> dict[str, Any]:
    """Each field of ``cls`` read from ``table`` by its type and default; unknown keys refused."""
    values: dict[str, Any] = {}
    for f in fields(cls):
        default = f.default if f.default is not MISSING else REQUIRED
        kind = str(f.type)
        if kind == "float | None":
            values[f.name] = table.optional_number(f.name)
        elif kind == "float":
            values[f.name] = table.number(f.name, default)
        elif kind == "int":
            values[f.name] = table.integer(f.name, default)
        elif kind == "bool":
            values[f.name] = table.boolean(f.name, default)
        elif kind == "str":
            values[f.name] = table.string(f.name, default)
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no reader for {kind}")
    table.finish()
    return values


def _check_link(v: Mapping[str, Any], key: Key) -> None:
    for name in ("fiber_km", "attenuation_db_per_km", "insertion_loss_db"):
        _require(v[name] >= 0.0, key(name), "a number >= 0")
    _require(
        0.0 < v["detector_efficiency"] <= 1.0, key("detector_efficiency"), "a number in (0, 1]"
    )
    for name in (
        "dark_count_probability_per_gate",
        "p_signal",
        "p_decoy",
        "p_vacuum",
        "p_key_basis",
    ):
        _require(0.0 <= v[name] <= 1.0, key(name), "a probability in [0, 1]")
    _require(
        0.0 <= v["afterpulse_probability"] < 1.0,
        key("afterpulse_probability"),
        "a probability in [0, 1)",
    )
    _require(
        0.0 <= v["misalignment_error"] <= 0.5,
        key("misalignment_error"),
        "a probability in [0, 0.5]",
    )
    for name in ("pulse_rate_hz", "fibre_timeout_s", "connect_timeout_s"):
        _require(v[name] > 0.0, key(name), "a number > 0")
    total = v["p_signal"] + v["p_decoy"] + v["p_vacuum"]
    _require(
        abs(total - 1.0) <= _PROBABILITY_SUM_TOLERANCE,
        key("p_vacuum"),
        f"p_signal + p_decoy + p_vacuum = 1 (the sum is {total!r})",
    )
    # Decoy ordering of Lim et al., PRA 89, 022307 (2014): mu1 > mu2 + mu3, mu2 > mu3 >= 0.
    for name in ("mu_signal", "mu_decoy", "mu_vacuum"):
        _require(v[name] >= 0.0, key(name), "a number >= 0")
    mu1, mu2, mu3 = v["mu_signal"], v["mu_decoy"], v["mu_vacuum"]
    _require(mu2 > mu3, key("mu_decoy"), f"a number > mu_vacuum ({mu3})")
    _require(mu1 > mu2 + mu3, key("mu_signal"), f"a number > mu_decoy + mu_vacuum ({mu2 + mu3})")
    _require(mu1 <= MAX_MU, key("mu_signal"), f"a number <= {MAX_MU}")
    _require(1 <= v["chunk_pulses"] <= 1 << 24, key("chunk_pulses"), "an integer in [1, 2^24]")
    _require(
        v["alice_records"] in ALICE_RECORDS,
        key("alice_records"),
        " or ".join(f'"{choice}"' for choice in ALICE_RECORDS),
    )
    _require(0 <= v["fibre_port"] <= 65535, key("fibre_port"), "an integer in [0, 65535]")
    _require(bool(v["fibre_host"]), key("fibre_host"), "a non-empty host name")


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
    # What Alice's end keeps of each block: "every_pulse", dense records (3 bytes per pulse,
    # fastest), or "detected_pulses", her source's state only, the records of the pulses Bob
    # announces drawn again at sifting (large blocks: 10^9 pulses in bounded memory)
    alice_records: str = "every_pulse"

    def __post_init__(self) -> None:
        _check_link(_values(self), "link.{}".format)

    @classmethod
    def from_table(cls, table: Table) -> Self:
        """Read ``[link]`` (but ``backend`` and ``eve``); ConfigError names the dotted key."""
        values = _read_fields(cls, table)
        _check_link(values, table.key)
        return cls(**values)

    @classmethod
    def from_mapping(cls, data: Mapping[str, object], *, path: str = "link") -> Self:
        """Build from the dict of a TOML table found at ``path``."""
        return cls.from_table(Table(data, path))

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


def _check_eve(v: Mapping[str, Any], key: Key) -> None:
    fraction = v["intercept_resend_fraction"]
    _require(0.0 <= fraction <= 1.0, key("intercept_resend_fraction"), "a probability in [0, 1]")
    block = v["pns_single_photon_block_fraction"]
    name = "pns_single_photon_block_fraction"
    _require(block is None or 0.0 <= block <= 1.0, key(name), "a probability in [0, 1]")
    pns = v["photon_number_splitting"]
    _require(isinstance(pns, bool), key("photon_number_splitting"), "true or false")
    _require(
        not (pns and fraction > 0),
        key("intercept_resend_fraction"),
        "0 when photon_number_splitting is on (one attack at a time)",
    )
    _require(block is None or pns, key(name), "unset unless photon_number_splitting is on")


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
        _check_eve(_values(self), "link.eve.{}".format)

    @classmethod
    def from_table(cls, table: Table) -> Self:
        """Read ``[link.eve]``; ConfigError names the dotted key."""
        values = _read_fields(cls, table)
        _check_eve(values, table.key)
        return cls(**values)

    @classmethod
    def from_mapping(cls, data: Mapping[str, object], *, path: str = "link.eve") -> Self:
        """Build from the dict of a TOML table found at ``path``."""
        return cls.from_table(Table(data, path))


@dataclass(frozen=True, slots=True, kw_only=True)
class SerialLinkConfig:
    """``[link] backend = "serial"``: where the device is and what it must be.

    ``read_timeout_s`` bounds the wait for any frame (and for a command's reply);
    ``reconnect_interval_s`` is the polling period for a device path that went away.
    """

    device_path: str
    baud_rate: int = 3_000_000
    read_timeout_s: float = 5.0
    reconnect_interval_s: float = 0.5
    expected_model: str = DEFAULT_MODEL
    expected_protocol_version: int = SERIAL_PROTOCOL_VERSION

    def __post_init__(self) -> None:
        _check_serial(_values(self), "link.{}".format)

    @classmethod
    def from_table(cls, table: Table) -> Self:
        """Read the serial keys of ``[link]`` (the caller reads ``backend`` first)."""
        values = _read_fields(cls, table)
        _check_serial(values, table.key)
        return cls(**values)


def _check_serial(v: Mapping[str, Any], key: Key) -> None:
    path = v["device_path"]
    _require(
        isinstance(path, str) and bool(path), key("device_path"), "a non-empty path of a tty or pty"
    )
    rates = "one of " + ", ".join(map(str, BAUD_RATES))
    _require(v["baud_rate"] in BAUD_RATES, key("baud_rate"), rates)
    for name in ("read_timeout_s", "reconnect_interval_s"):
        value = v[name]
        ok = not isinstance(value, bool) and isinstance(value, int | float) and value > 0
        _require(ok, key(name), "a number > 0")
    _require(bool(v["expected_model"]), key("expected_model"), "a non-empty model name")
    version = v["expected_protocol_version"]
    _require(1 <= version <= 255, key("expected_protocol_version"), "an integer in [1, 255]")


# A replay node writes this file into its store directory: keys distilled from a recording are
# known to whoever holds its files, so such a store must never serve keys (``qkdnode.config.load``)
REPLAY_STORE_MARKER: Final = "REPLAY-KEYS-NOT-SECRET"
MAX_READ_AHEAD_BLOCKS: Final = 8


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplayLinkConfig:
    """``[link] backend = "replay"``: blocks read from a recording (``qkdnode link record``).

    ``directory`` holds the recording (``manifest.json``, ``alice/``, ``bob/``; relative to the
    config file); each node reads its own role's files. ``loop``: after the last block start
    again from the first (raw data reused: for throughput measurements only); without it the
    node makes no block after the last one. ``read_ahead_blocks``: blocks read from disk ahead
    of the one asked for (each held in memory; Alice's about 3 bytes per pulse).

    Test only: keys distilled from a recording are not secret (its files hold both sides' raw
    bits), so a replay node refuses ``[delivery]`` and marks its store (``REPLAY_STORE_MARKER``).
    """

    directory: Path
    loop: bool = False
    read_ahead_blocks: int = 1

    def __post_init__(self) -> None:
        _require(
            0 <= self.read_ahead_blocks <= MAX_READ_AHEAD_BLOCKS,
            "link.read_ahead_blocks",
            f"an integer in [0, {MAX_READ_AHEAD_BLOCKS}]",
        )

    @classmethod
    def from_table(cls, table: Table, base: Path) -> Self:
        """Read the replay keys of ``[link]`` (the caller reads ``backend`` first)."""
        text = table.string("directory")
        _require(bool(text), table.key("directory"), "a non-empty path of a recording")
        read_ahead = table.integer("read_ahead_blocks", 1, minimum=0, maximum=MAX_READ_AHEAD_BLOCKS)
        section = cls(
            directory=resolve_path(text, base),
            loop=table.boolean("loop", False),
            read_ahead_blocks=read_ahead,
        )
        table.finish()
        return section


LinkConfig = SimulatedLinkConfig | SerialLinkConfig | ReplayLinkConfig
# the dataclasses of the [link] section, read and checked by the helpers above
_LinkSection = SimulatedLinkConfig | EveConfig | SerialLinkConfig


def _values(config: _LinkSection) -> dict[str, Any]:
    """The fields of a config built in code, to check them as if read from a table."""
    return {f.name: getattr(config, f.name) for f in fields(config)}


def read_link(table: Table, base: Path = Path()) -> tuple[LinkBackend, LinkConfig, EveConfig]:
    """The ``[link]`` table: the backend's config and Eve's (inactive unless configured).

    ``base``: the config file's directory (a replay directory is relative to it)."""
    backend = table.string("backend", "simulated", choices=("simulated", "serial", "replay"))
    if backend == "serial":
        if table.has("eve"):
            raise ConfigError(table.key("eve"), "no eavesdropper with a serial device")
        return "serial", SerialLinkConfig.from_table(table), EveConfig()
    if backend == "replay":
        if table.has("eve"):
            raise ConfigError(table.key("eve"), "no eavesdropper with a replayed recording")
        return "replay", ReplayLinkConfig.from_table(table, base), EveConfig()
    eve = EveConfig.from_table(table.table("eve", required=False))
    return "simulated", SimulatedLinkConfig.from_table(table), eve
