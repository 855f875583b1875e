"""`qkdnode demo --bootstrap pki|psk|web-of-trust`: the configs each trust anchor writes load,
and the web-of-trust demo commits blocks and rotates to key-derived authentication, or, with one
vouch fewer than the threshold, refuses the peer and opens no block."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from qkdnode.config import load_config
from qkdnode.demo.bootstrap import WEB_OF_TRUST_INTRODUCERS, WEB_OF_TRUST_THRESHOLD, Bootstrap
from qkdnode.demo.run import prepare_workdir
from qkdnode.node.session import load_psk_file
from qkdnode.node.weboftrust_files import load_web_of_trust_credentials


def run_demo(workdir: Path, *args: str, timeout_s: float) -> tuple[int, dict[str, Any], str]:
    """``qkdnode demo --json`` in a subprocess: exit code, the JSON summary, stderr."""
    result = subprocess.run(
        [sys.executable, "-m", "qkdnode", "demo", "--json", "--workdir", str(workdir), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s + 60,
    )
    summary = json.loads(result.stdout) if result.stdout.strip() else {}
    return result.returncode, summary, result.stderr


@pytest.mark.parametrize("bootstrap", ["psk", "web-of-trust"])
def test_each_bootstrap_writes_configs_whose_credentials_load(
    tmp_path: Path, bootstrap: Bootstrap
) -> None:
    layout = prepare_workdir(tmp_path, distance_km=10.0, block_pulses=1 << 20, bootstrap=bootstrap)
    for node, peer in (("alice", "bob"), ("bob", "alice")):
        config = load_config(layout.config(node))
        assert config.auth.mode == bootstrap
        if bootstrap == "psk":
            assert config.auth.psk_file is not None
            load_psk_file(config.auth.psk_file)
            continue
        credentials = load_web_of_trust_credentials(config.auth, peer_name=config.peer.name)
        assert credentials.threshold == WEB_OF_TRUST_THRESHOLD
        assert len(credentials.introducers) == WEB_OF_TRUST_INTRODUCERS
        assert credentials.peer_user_id == f"qkdnode node {peer}"


def test_web_of_trust_demo_with_k_minus_one_vouches_refuses_the_peer_and_opens_no_block(
    tmp_path: Path,
) -> None:
    code, summary, stderr = run_demo(
        tmp_path / "demo",
        "--bootstrap",
        "web-of-trust",
        "--vouches",
        str(WEB_OF_TRUST_THRESHOLD - 1),
        "--timeout-s",
        "120",
        timeout_s=120,
    )
    assert code == 1, stderr[-2000:]
    assert "the peer was refused" in stderr
    assert summary["bootstrap"] == "web-of-trust"
    assert summary["peer_refusals"], summary
    assert "too_few_certifications" in summary["peer_refusals"][0]
    assert summary["auth_mode"] == "none" and summary["auth_modes_seen"] == []
    assert summary["blocks_committed"] == 0 and summary["blocks_aborted"] == 0
    assert summary["blocks_recorded"] == {"alice": 0, "bob": 0}
    assert summary["keys_match"] is False and summary["keys_compared"] == 0


@pytest.mark.slow  # runs two daemons for about a minute
def test_web_of_trust_demo_commits_blocks_rotates_and_keys_match(tmp_path: Path) -> None:
    code, summary, stderr = run_demo(
        tmp_path / "demo",
        "--bootstrap",
        "web-of-trust",
        "--blocks",
        "3",
        "--timeout-s",
        "240",
        timeout_s=240,
    )
    assert code == 0, stderr[-2000:]
    assert summary["keys_match"] is True
    assert summary["blocks_committed"] >= 3
    assert summary["auth_modes_seen"][0] == "web_of_trust"
    assert summary["auth_mode"] == "key_derived"
    assert summary["peer_refusals"] == []
    assert summary["exit_codes"] == {"alice": 0, "bob": 0}
    log = (tmp_path / "demo" / "alice.log").read_text()
    assert '"chain_root": "web-of-trust"' in log
