"""Configuration of the simulated link and of Eve: unknown keys, types and ranges rejected with
the dotted key."""

from __future__ import annotations

import math

import pytest

from qkdnode.config.link import EveConfig, SimulatedLinkConfig
from qkdnode.errors import ConfigError


def test_defaults_are_valid_and_map_to_nominal_parameters() -> None:
    config = SimulatedLinkConfig()
    params = config.nominal_parameters()
    assert params.fiber_km == 25.0
    assert params.receiver_transmittance == pytest.approx(0.10)
    assert params.channel_transmittance == pytest.approx(0.10 * 10 ** (-0.5))
    assert params.intensity_probabilities == (0.7, 0.2, 0.1)


def test_from_mapping_reads_every_field() -> None:
    config = SimulatedLinkConfig.from_mapping(
        {
            "fiber_km": 50,
            "attenuation_db_per_km": 0.18,
            "insertion_loss_db": 2.0,
            "detector_efficiency": 0.25,
            "mu_signal": 0.6,
            "fibre_port": 9000,
            "fibre_host": "::1",
        }
    )
    assert config.fiber_km == 50.0 and isinstance(config.fiber_km, float)
    assert config.fibre_port == 9000 and config.fibre_host == "::1"
    assert config.receiver_transmittance == pytest.approx(0.25 * 10 ** (-0.2))


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"fibre_km": 3.0}, "link.fibre_km"),
        ({"fiber_km": "10"}, "link.fiber_km"),
        ({"fiber_km": True}, "link.fiber_km"),
        ({"fiber_km": math.nan}, "link.fiber_km"),
        ({"fiber_km": -1.0}, "link.fiber_km"),
        ({"attenuation_db_per_km": -0.2}, "link.attenuation_db_per_km"),
        ({"insertion_loss_db": -3}, "link.insertion_loss_db"),
        ({"detector_efficiency": 0.0}, "link.detector_efficiency"),
        ({"detector_efficiency": 1.2}, "link.detector_efficiency"),
        ({"dark_count_probability_per_gate": -1e-6}, "link.dark_count_probability_per_gate"),
        ({"afterpulse_probability": 1.0}, "link.afterpulse_probability"),
        ({"misalignment_error": 0.6}, "link.misalignment_error"),
        ({"pulse_rate_hz": 0}, "link.pulse_rate_hz"),
        ({"p_key_basis": 1.5}, "link.p_key_basis"),
        ({"p_signal": 0.8}, "link.p_vacuum"),  # 0.8 + 0.2 + 0.1 != 1
        ({"p_decoy": -0.1, "p_signal": 1.0}, "link.p_decoy"),
        ({"mu_decoy": 0.0001}, "link.mu_decoy"),  # mu2 > mu3 violated
        ({"mu_signal": 0.1}, "link.mu_signal"),  # mu1 > mu2 + mu3 violated
        ({"mu_vacuum": -0.01}, "link.mu_vacuum"),
        ({"mu_signal": 11.0}, "link.mu_signal"),
        ({"chunk_pulses": 0}, "link.chunk_pulses"),
        ({"chunk_pulses": 2.5}, "link.chunk_pulses"),
        ({"fibre_port": 70000}, "link.fibre_port"),
        ({"fibre_host": 5}, "link.fibre_host"),
        ({"fibre_timeout_s": 0}, "link.fibre_timeout_s"),
    ],
)
def test_bad_link_values_name_the_key(data: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        SimulatedLinkConfig.from_mapping(data)
    assert info.value.key == key
    assert key in str(info.value)


def test_path_prefix_and_direct_construction() -> None:
    with pytest.raises(ConfigError) as info:
        SimulatedLinkConfig.from_mapping({"fiber_km": -5}, path="nodes.alice.link")
    assert info.value.key == "nodes.alice.link.fiber_km"
    with pytest.raises(ConfigError) as direct:
        SimulatedLinkConfig(fiber_km=-5.0)
    assert direct.value.key == "link.fiber_km"
    with pytest.raises(ConfigError):
        SimulatedLinkConfig.from_mapping([("fiber_km", 1.0)])  # type: ignore[arg-type]


def test_eve_config() -> None:
    assert EveConfig.from_mapping({"intercept_resend_fraction": 1}).intercept_resend_fraction == 1.0
    pns = EveConfig.from_mapping(
        {"photon_number_splitting": True, "pns_single_photon_block_fraction": 0.5}
    )
    assert pns.pns_single_photon_block_fraction == 0.5
    cases: list[tuple[dict[str, object], str]] = [
        ({"intercept_resend_fraction": 1.5}, "link.eve.intercept_resend_fraction"),
        ({"photon_number_splitting": 1}, "link.eve.photon_number_splitting"),
        (
            {"photon_number_splitting": True, "intercept_resend_fraction": 0.5},
            "link.eve.intercept_resend_fraction",
        ),
        ({"pns_single_photon_block_fraction": 0.5}, "link.eve.pns_single_photon_block_fraction"),
        (
            {"photon_number_splitting": True, "pns_single_photon_block_fraction": 2.0},
            "link.eve.pns_single_photon_block_fraction",
        ),
        ({"mode": "pns"}, "link.eve.mode"),
    ]
    for data, key in cases:
        with pytest.raises(ConfigError) as info:
            EveConfig.from_mapping(data)
        assert info.value.key == key, data
