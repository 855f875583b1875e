"""Node configuration: the examples load, and every kind of mistake names file, key and fix."""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path
from typing import cast

import pytest

from qkdnode.channel.rules import ChannelConfig
from qkdnode.config import FiniteKey, SimulatedLinkConfig, load_config
from qkdnode.config.delivery import KeyKind
from qkdnode.config.link import LinkParameters
from qkdnode.config.postprocess import MAX_BLOCKS_IN_FLIGHT, PA_FAMILIES
from qkdnode.errors import ConfigError
from qkdnode.link.interface import QuantumLink
from qkdnode.node.state import _pipeline_parameters
from qkdnode.node.weboftrust_files import load_web_of_trust_credentials
from qkdnode.ops import issuance, pgp
from qkdnode.postprocess.amplification_family import AmplificationFamily
from qkdnode.postprocess.block_parameters import PipelineParameters
from qkdnode.postprocess.cascade import CascadeVariant
from qkdnode.postprocess.finitekey import (
    DEFAULT_FINITE_KEY_ANALYSIS,
    FiniteKeyAnalysis,
    OneDecoySettings,
)
from tests.helpers_blocks import SECURITY

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def example_dir(tmp_path: Path) -> Path:
    """config/alice.toml and bob.toml with their absolute paths moved into tmp_path, and the
    files they name laid out as docs/operations.md does (two CAs, each with its CRL)."""
    pki = tmp_path / "pki"
    pki.mkdir()
    for ca in ("node-ca", "sae-ca"):
        issuance.init_ca(tmp_path / ca)
        shutil.copy(tmp_path / ca / issuance.CA_CERT, pki / f"{ca}.pem")
        issuance.issue_crl(tmp_path / ca, out=pki / f"{ca}.crl.pem")
    for node in ("alice", "bob"):
        issuance.issue_certificate(tmp_path / "node-ca", node, pki / node, purpose="node")
        text = (REPO / "config" / f"{node}.toml").read_text()
        text = text.replace("/etc/qkdnode/pki/", f"{tmp_path}/pki/")
        text = text.replace("/var/lib/qkdnode/", f"{tmp_path}/state/")
        (tmp_path / f"{node}.toml").write_text(text)
    return tmp_path


def test_example_configs_load(example_dir: Path) -> None:
    alice = load_config(example_dir / "alice.toml")
    bob = load_config(example_dir / "bob.toml")
    assert alice.node.role == "alice" and bob.node.role == "bob"
    assert alice.peer.connect is not None and bob.peer.listen is not None
    assert alice.delivery is not None and bob.delivery is not None
    assert alice.delivery.master_parity == 0 and bob.delivery.master_parity == 1
    assert isinstance(alice.link, SimulatedLinkConfig)
    assert alice.link.fiber_km == 25.0 and alice.postprocess.block_pulses == 40_000_000
    # the config names the pipeline's decoy analyses, and defaults to the pipeline's default
    assert set(typing.get_args(FiniteKey)) == {a.value for a in FiniteKeyAnalysis}
    assert alice.postprocess.finite_key == DEFAULT_FINITE_KEY_ANALYSIS.value
    # the config names exactly the pipeline's privacy-amplification families
    assert set(PA_FAMILIES) == {family.value for family in AmplificationFamily}
    assert alice.postprocess.pa_family == bob.postprocess.pa_family == "mersenne-gmp-v1"
    # one block at a time unless configured; never more than the channel lets open at once
    assert alice.postprocess.blocks_in_flight == 1
    assert ChannelConfig().max_open_blocks == MAX_BLOCKS_IN_FLIGHT


def test_an_unnamed_pa_family_is_the_pipelines_default(example_dir: Path) -> None:
    path = example_dir / "alice.toml"
    text = path.read_text()
    path.write_text(re.sub(r"(?m)^pa_family = .*\n", "", text))
    assert "pa_family" not in path.read_text().split("[postprocess]")[1].split("\n[")[0]
    default = PipelineParameters(cascade_variant=CascadeVariant.ORIGINAL, security=SECURITY)
    assert load_config(path).postprocess.pa_family == default.pa_family.value


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


class _OpenLink:
    """What ``_pipeline_parameters`` asks of an open link: its nominal parameters."""

    def __init__(self, parameters: LinkParameters) -> None:
        self._parameters = parameters

    def nominal_parameters(self) -> LinkParameters:
        return self._parameters


def test_one_decoy_takes_a_two_intensity_link_and_a_device_must_fit_it(example_dir: Path) -> None:
    path = example_dir / "alice.toml"
    _edit(path, 'security_model = "decoy"', 'security_model = "one_decoy"')
    _edit(path, "p_decoy = 0.489\np_vacuum = 0.256", "p_decoy = 0.745\np_vacuum = 0.0")
    config = load_config(path)
    assert config.postprocess.security_model == "one_decoy"
    assert isinstance(config.link, SimulatedLinkConfig)
    nominal = config.link.nominal_parameters()
    params = _pipeline_parameters(config, cast(QuantumLink, _OpenLink(nominal)))
    assert params.decoy == OneDecoySettings(
        mu_signal=0.667, mu_decoy=0.284, p_signal=0.255, p_key_basis=0.762
    )
    assert params.finite_key == DEFAULT_FINITE_KEY_ANALYSIS
    # a device (or recording) known only once open must fit the model too
    three = dataclasses.replace(nominal, p_decoy=0.489, p_vacuum=0.256)
    with pytest.raises(ConfigError) as info:
        _pipeline_parameters(config, cast(QuantumLink, _OpenLink(three)))
    assert "link.p_vacuum (as the simulated link reports it)" in str(info.value)
    assert 'security_model = "one_decoy"' in str(info.value) and "got 0.256" in str(info.value)


@pytest.mark.parametrize(
    ("old", "new", "key", "expected"),
    [
        ("[postprocess]\n", "[postprocess]\nblock_size = 3\n", "postprocess.block_size", "unknown"),
        ("block_pulses = 40000000", 'block_pulses = "many"', "postprocess.block_pulses", "integer"),
        ("fiber_km = 25.0", "fiber_km = -1.0", "link.fiber_km", ">= 0"),
        ("blocks_in_flight = 1", "blocks_in_flight = 5", "postprocess.blocks_in_flight", "<= 4"),
        ("blocks_in_flight = 1", "blocks_in_flight = 0", "postprocess.blocks_in_flight", ">= 1"),
        ("qber_threshold = 0.11", "qber_threshold = 0.6", "postprocess.qber_threshold", "< 0.5"),
        ('finite_key = "lim2014-kl"', 'finite_key = "gauss"', "postprocess.finite_key", "lim2014"),
        (
            'finite_key = "lim2014-kl"',
            'finite_key = "zhang2017"',
            "postprocess.finite_key",
            "'lim2014-chernoff': 'zhang2017' is that analysis's former name",
        ),
        (
            'pa_family = "mersenne-gmp-v1"',
            'pa_family = "mersenne-gmp-v2"',
            "postprocess.pa_family",
            "mersenne-gmp-v1",
        ),
        (
            'security_model = "decoy"',
            'security_model = "one_decoy"',
            "link.p_vacuum",
            '0 with [postprocess] security_model = "one_decoy" (one decoy sends two intensities)',
        ),
        (
            "p_decoy = 0.489\np_vacuum = 0.256",
            "p_decoy = 0.745\np_vacuum = 0.0",
            "link.p_vacuum",
            '> 0 with [postprocess] security_model = "decoy"',
        ),
        ('mode = "pki"', 'mode = "kerberos"', "auth.mode", "'pki', 'psk'"),
        (
            "security_budget_epsilon = 1e-6",
            "security_budget_epsilon = 0.0",
            "auth.security_budget_epsilon",
            "> 0",
        ),
        (
            "rotation_pool_bits = 65792",
            "rotation_pool_bits = 1040385",
            "auth.rotation_pool_bits",
            "at most auth.pool_target_bits - auth.pool_reserve_bits (1040384)",
        ),
        ("rotation_pool_bits = 65792", "rotation_pool_bits = 2303", "auth.rotation", ">= 2304"),
        ("pki/alice.pem", "pki/nobody.pem", "auth.certificate_file", "does not exist"),
        ("node-ca.crl.pem", "nowhere.crl.pem", "auth.crl_file", "does not exist"),
        ("sae-ca.crl.pem", "nowhere.crl.pem", "delivery.sae_crl", "does not exist"),
        ('mode = "pki"', 'mode = "psk"\npsk_file = "bob.toml"', "auth.crl_file", "pki only"),
        ('connect = "192.0.2.20:7000"', 'connect = "nowhere"', "peer.connect", "host:port"),
        ("key_size_bits = 256            # must", "key_size_bits = 512 # must", "delivery", "256"),
        ("[node]\n", "[nodes]\nname = 1\n[node]\n", "nodes", "unknown"),
    ],
)
def test_mistakes_are_refused_with_file_key_and_expectation(
    example_dir: Path, old: str, new: str, key: str, expected: str
) -> None:
    path = example_dir / "alice.toml"
    _edit(path, old, new)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert key in message and expected in message, message


def test_the_example_hybrid_pair_loads_and_an_unknown_kind_names_file_and_key(
    example_dir: Path,
) -> None:
    path = example_dir / "alice.toml"
    commented = '# [[delivery.pairs]]\n# master_sae_id = "sae-a"\n# slave_sae_id = "sae-b"\n'
    _edit(path, commented, commented.replace("# ", ""))
    _edit(path, '# kind = "hybrid"', 'kind = "hybrid"')
    config = load_config(path).delivery
    assert config is not None and config.key_kind("sae-a", "sae-b") is KeyKind.HYBRID
    assert config.key_kind("sae-b", "sae-a") is KeyKind.QKD
    _edit(path, 'kind = "hybrid"', 'kind = "post-quantum"')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and "delivery.pairs[0].kind" in message, message
    assert "'qkd', 'hybrid'" in message


def test_private_key_readable_by_others_is_refused(example_dir: Path) -> None:
    os.chmod(example_dir / "pki" / "alice.key", 0o644)
    with pytest.raises(ConfigError, match=re.escape("auth.private_key_file")) as info:
        load_config(example_dir / "alice.toml")
    assert "chmod 600" in str(info.value)


def test_both_listen_and_connect_is_refused(example_dir: Path) -> None:
    _edit(example_dir / "alice.toml", "[peer]\n", '[peer]\nlisten = "127.0.0.1:1"\n')
    with pytest.raises(ConfigError, match="exactly one of listen"):
        load_config(example_dir / "alice.toml")


def test_qkdnode_run_reports_config_errors_with_exit_status_2(example_dir: Path) -> None:
    _edit(example_dir / "alice.toml", "fiber_km = 25.0", "fiber_kms = 25.0")
    result = subprocess.run(
        [sys.executable, "-m", "qkdnode", "run", "--config", str(example_dir / "alice.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "link.fiber_kms" in result.stderr and "alice.toml" in result.stderr


def test_example_configs_name_two_cas_each_with_its_crl(example_dir: Path) -> None:
    config = load_config(example_dir / "alice.toml")
    assert config.delivery is not None
    assert config.auth.ca_file != config.delivery.sae_ca
    assert config.auth.crl_file == example_dir / "pki" / "node-ca.crl.pem"
    assert config.delivery.sae_crl == example_dir / "pki" / "sae-ca.crl.pem"


@pytest.mark.parametrize("setting", ["auth.crl_file", "delivery.sae_crl"])
def test_qkdnode_run_refuses_a_stale_crl_with_exit_status_2_naming_the_setting(
    example_dir: Path, setting: str
) -> None:
    """A CRL past its nextUpdate stops the start: the daemon would refuse every certificate of
    that CA anyway, and says why before it serves anything."""
    ca = "node-ca" if setting == "auth.crl_file" else "sae-ca"
    issuance.issue_crl(
        example_dir / ca,
        out=example_dir / "pki" / f"{ca}.crl.pem",
        this_update=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10),
        validity_days=1.0,
    )
    result = subprocess.run(
        [sys.executable, "-m", "qkdnode", "run", "--config", str(example_dir / "bob.toml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert f"bob.toml: {setting}: expected" in result.stderr and "is not current" in result.stderr


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (REPO / "config" / "qkdnode@.service").read_text()
    # verify needs the executable to exist: point it at this environment's entry point
    unit = unit.replace(
        "/opt/qkdnode/venv/bin/qkdnode", str(Path(sys.executable).parent / "qkdnode")
    )
    target = tmp_path / "qkdnode@alice.service"
    target.write_text(unit)
    result = subprocess.run([analyze, "verify", str(target)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for setting in (
        "Type=notify",
        "WatchdogSec=",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=\n",
    ):
        assert setting in unit


# ---- [auth] mode = "web-of-trust" --------------------------------------------------------------

WEB_OF_TRUST_AUTH = """[auth]
mode = "web-of-trust"
certificate_file = "pgp/alice.asc"
private_key_file = "pgp/alice.secret.asc"
introducer_files = ["pgp/so1.asc", "pgp/so2.asc"]
introducer_threshold = 2
peer_certificate_files = ["pgp/bob.asc"]
"""


@pytest.fixture
def web_of_trust_config(example_dir: Path) -> Path:
    """alice.toml bootstrapping from a web of trust, keys made by `qkdnode pgp init`."""
    keys = example_dir / "pgp"
    for node in ("alice", "bob"):
        pgp.init_node_key(keys, name=node)
    for officer in ("so1", "so2"):
        pgp.init_node_key(keys, name=officer, user_id=f"Officer <{officer}@x.test>")
    path = example_dir / "alice.toml"
    text = path.read_text()
    start, end = text.index("[auth]\n"), text.index("pool_target_bits")
    path.write_text(text[:start] + WEB_OF_TRUST_AUTH + text[end:])
    return path


def test_web_of_trust_auth_loads_and_its_credentials_load(web_of_trust_config: Path) -> None:
    config = load_config(web_of_trust_config)
    auth = config.auth
    keys = web_of_trust_config.parent / "pgp"
    assert auth.mode == "web-of-trust" and auth.ca_file is None and auth.psk_file is None
    assert auth.introducer_files == (keys / "so1.asc", keys / "so2.asc")
    assert auth.introducer_threshold == 2
    assert auth.peer_certificate_files == (keys / "bob.asc",)
    credentials = load_web_of_trust_credentials(auth, peer_name=config.peer.name)
    assert credentials.threshold == 2 and len(credentials.introducers) == 2
    assert credentials.peer_user_id == "qkdnode node bob"
    assert len(credentials.peer_certificate_copies) == 1
    assert b"-----BEGIN" not in credentials.own_certificate  # binary, as sent on the wire


@pytest.mark.parametrize(
    ("old", "new", "key", "expected"),
    [
        ("introducer_threshold = 2", "introducer_threshold = 3", "auth.introducer_threshold", "2"),
        ("introducer_threshold = 2", "introducer_threshold = 0", "auth.introducer_threshold", "1"),
        ("introducer_threshold = 2\n", "", "auth.introducer_threshold", "required"),
        (
            'introducer_files = ["pgp/so1.asc", "pgp/so2.asc"]',
            "introducer_files = []",
            "auth.introducer_files",
            "at least one",
        ),
        ('"pgp/so2.asc"]', '"pgp/so9.asc"]', "auth.introducer_files[1]", "does not exist"),
        ('"pgp/so2.asc"]', '"pgp/so1.asc"]', "auth.introducer_files", "duplicate"),
        ('["pgp/bob.asc"]', '["pgp/carol.asc"]', "auth.peer_certificate_files[0]", "not exist"),
        ('private_key_file = "pgp/alice.secret.asc"\n', "", "auth.private_key_file", "required"),
        ('mode = "web-of-trust"', 'mode = "psk"', "auth.introducer_files", "web-of-trust only"),
        ('mode = "web-of-trust"', 'mode = "wot"', "auth.mode", "'web-of-trust'"),
    ],
)
def test_web_of_trust_mistakes_are_refused_naming_the_key(
    web_of_trust_config: Path, old: str, new: str, key: str, expected: str
) -> None:
    _edit(web_of_trust_config, old, new)
    with pytest.raises(ConfigError) as info:
        load_config(web_of_trust_config)
    message = str(info.value)
    assert key in message and expected in message, message


def test_web_of_trust_secret_key_readable_by_others_is_refused(web_of_trust_config: Path) -> None:
    os.chmod(web_of_trust_config.parent / "pgp" / "alice.secret.asc", 0o644)
    with pytest.raises(ConfigError, match=re.escape("auth.private_key_file")) as info:
        load_config(web_of_trust_config)
    assert "chmod 600" in str(info.value)


@pytest.mark.parametrize(
    ("old", "new", "key", "expected"),
    [
        ('"pgp/alice.asc"', '"pgp/bob.asc"', "auth.certificate_file", "private_key_file"),
        ('"pgp/alice.secret.asc"', '"pgp/bob.asc"', "auth.private_key_file", "secret key"),
        ('["pgp/so1.asc",', '["pgp/so1.secret.asc",', "auth.introducer_files[0]", "secret"),
        ('["pgp/so1.asc",', '["pgp/so1.copy.asc",', "auth.introducer_threshold", "distinct"),
        ('["pgp/bob.asc"]', '["alice.toml"]', "auth.peer_certificate_files[0]", "OpenPGP"),
    ],
)
def test_web_of_trust_files_that_do_not_hold_what_they_should_are_refused_at_load(
    web_of_trust_config: Path, old: str, new: str, key: str, expected: str
) -> None:
    keys = web_of_trust_config.parent / "pgp"
    shutil.copy(keys / "so2.asc", keys / "so1.copy.asc")  # the same key as so2 in another file
    os.chmod(keys / "bob.asc", 0o600)  # a (wrong) private key file passes the mode check
    _edit(web_of_trust_config, old, new)
    config = load_config(web_of_trust_config)
    with pytest.raises(ConfigError) as info:
        load_web_of_trust_credentials(config.auth, peer_name=config.peer.name)
    message = str(info.value)
    assert key in message and expected in message, message


def test_web_of_trust_peer_user_id_replaces_the_node_name_form(web_of_trust_config: Path) -> None:
    _edit(
        web_of_trust_config,
        "introducer_threshold = 2\n",
        'introducer_threshold = 2\npeer_user_id = "QKD site B <qkd@b.example>"\n',
    )
    config = load_config(web_of_trust_config)
    credentials = load_web_of_trust_credentials(config.auth, peer_name=config.peer.name)
    assert credentials.peer_user_id == "QKD site B <qkd@b.example>"
