"""Node configuration: the examples load, and every kind of mistake names file, key and fix."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from qkdnode.config import FiniteKey, SimulatedLinkConfig, load_config
from qkdnode.errors import ConfigError
from qkdnode.ops import issuance
from qkdnode.postprocess.finitekey import DEFAULT_FINITE_KEY_ANALYSIS, FiniteKeyAnalysis

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def example_dir(tmp_path: Path) -> Path:
    """config/alice.toml and bob.toml with their absolute paths moved into tmp_path."""
    issuance.init_ca(tmp_path / "pki")
    for node in ("alice", "bob"):
        issuance.issue_certificate(tmp_path / "pki", node, tmp_path / "pki" / node, purpose="node")
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


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize(
    ("old", "new", "key", "expected"),
    [
        ("[postprocess]\n", "[postprocess]\nblock_size = 3\n", "postprocess.block_size", "unknown"),
        ("block_pulses = 40000000", 'block_pulses = "many"', "postprocess.block_pulses", "integer"),
        ("fiber_km = 25.0", "fiber_km = -1.0", "link.fiber_km", ">= 0"),
        ("qber_threshold = 0.11", "qber_threshold = 0.6", "postprocess.qber_threshold", "< 0.5"),
        ('finite_key = "lim2014-kl"', 'finite_key = "gauss"', "postprocess.finite_key", "lim2014"),
        ('mode = "pki"', 'mode = "kerberos"', "auth.mode", "'pki', 'psk'"),
        (
            "security_budget_epsilon = 1e-6",
            "security_budget_epsilon = 0.0",
            "auth.security_budget_epsilon",
            "> 0",
        ),
        ("pki/alice.pem", "pki/nobody.pem", "auth.certificate_file", "does not exist"),
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
