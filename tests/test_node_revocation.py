"""CRLs reread on SIGHUP by running daemons (real `qkdnode run` processes on loopback, the demo's
PKI): a certificate is accepted while the CRL in force does not list it, also after the file
changed, and refused once SIGHUP made the daemon reread the file; the daemon never restarts.
"""

from __future__ import annotations

import http.client
import signal
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qkdnode.demo.progress import LogFollower
from qkdnode.demo.run import DemoLayout, prepare_workdir, start_node, stop_nodes
from qkdnode.ops import issuance
from qkdnode.store.audit import read_trail

BLOCK_PULSES = 40_000_000


@pytest.fixture
def layout(tmp_path: Path) -> DemoLayout:
    workdir = tmp_path / "pair"
    workdir.mkdir(mode=0o700)
    # a pool this large needs far more blocks than a test lasts before the channel rotates to
    # key-derived authentication: every session here is authenticated by certificates
    return prepare_workdir(
        workdir, distance_km=25.0, block_pulses=BLOCK_PULSES, pool_target_bits=1 << 24
    )


def wait_for(
    layout: DemoLayout,
    node: str,
    process: subprocess.Popen[bytes],
    follower: LogFollower,
    wanted: Callable[[dict[str, Any]], bool],
    timeout_s: float = 120.0,
) -> dict[str, Any]:
    """The first new log event of ``node`` that is ``wanted`` (fails if the node exits)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for event in follower.new_events():
            if wanted(event):
                return event
        if process.poll() is not None:
            stderr = (layout.workdir / f"{node}.stderr").read_text()
            pytest.fail(f"{node} exited with {process.returncode}: {stderr[-2000:]}")
        time.sleep(0.05)
    pytest.fail(f"{node}: no such log event within {timeout_s} s")


def event(name: str, **fields: object) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("event") == name and all(e.get(k) == v for k, v in fields.items())


def status_at_bob(layout: DemoLayout, sae_files: Path) -> int:
    """Bob's Get status (slave sae-a) as the SAE whose certificate is ``sae_files``.pem."""
    context = ssl.create_default_context(cafile=str(layout.node_ca_dir / issuance.CA_CERT))
    context.load_cert_chain(sae_files.with_suffix(".pem"), sae_files.with_suffix(".key"))
    connection = http.client.HTTPSConnection(
        "localhost", layout.kme_ports["bob"], context=context, timeout=30
    )
    try:
        connection.request("GET", "/api/v1/keys/sae-a/status")
        return connection.getresponse().status
    finally:
        connection.close()


def trail_entries(layout: DemoLayout, node: str, kind: str) -> list[dict[str, Any]]:
    entries = [record.entry() for record in read_trail(layout.store(node)).records]
    return [dict(e.fields) for e in entries if e.kind == kind]


def test_a_revoked_sae_is_refused_after_sighup_and_served_before(layout: DemoLayout) -> None:
    pki = layout.pki_dir
    same_sae_new_serial = issuance.issue_certificate(
        layout.sae_ca_dir, "sae-b", pki / "sae-b-reissued", purpose="sae"
    )
    bob = start_node(layout, "bob")
    follower = LogFollower(layout.log("bob"))
    try:
        wait_for(layout, "bob", bob, follower, event("daemon.ready"))
        assert status_at_bob(layout, pki / "sae-b") == 200
        issuance.issue_crl(layout.sae_ca_dir, (pki / "sae-b.pem",))
        # the file lists it now, but the daemon has not reread it
        assert status_at_bob(layout, pki / "sae-b") == 200
        bob.send_signal(signal.SIGHUP)
        reloaded = wait_for(
            layout, "bob", bob, follower, event("pki.crl_reloaded", setting="delivery.sae_crl")
        )
        assert reloaded["revoked"] == 1
        # refused in the handshake: the client sees the alert or a closed connection
        with pytest.raises((ssl.SSLError, ConnectionError)):
            status_at_bob(layout, pki / "sae-b")
        assert status_at_bob(layout, same_sae_new_serial.certificate.with_suffix("")) == 200
        # a CRL file that does not load on SIGHUP leaves the lists in force as they were
        (layout.sae_ca_dir / "crl.pem").write_text("not a CRL\n")
        bob.send_signal(signal.SIGHUP)
        wait_for(
            layout, "bob", bob, follower, event("pki.crl_reload_failed", setting="delivery.sae_crl")
        )
        with pytest.raises((ssl.SSLError, ConnectionError)):
            status_at_bob(layout, pki / "sae-b")
        assert status_at_bob(layout, same_sae_new_serial.certificate.with_suffix("")) == 200
        assert bob.poll() is None  # the same process throughout
    finally:
        assert stop_nodes([bob]) == [0]
    reloads = [
        (entry["outcome"], entry.get("revoked"))
        for entry in trail_entries(layout, "bob", "revocation_lists_loaded")
        if entry["setting"] == "delivery.sae_crl"
    ]
    assert reloads == [("loaded", 1), ("refused", None)]
    refused = trail_entries(layout, "bob", "sae_certificate_refused")
    assert [entry["reason"] for entry in refused] == ["certificate revoked"] * 2


def test_a_revoked_peer_node_is_refused_after_sighup_and_accepted_before(
    layout: DemoLayout,
) -> None:
    pki = layout.pki_dir
    bob = start_node(layout, "bob")
    alice = start_node(layout, "alice")
    follower = LogFollower(layout.log("bob"))
    try:
        wait_for(layout, "bob", bob, follower, event("channel.session_established"))
        issuance.issue_crl(layout.node_ca_dir, (pki / "alice.pem",))
        bob.send_signal(signal.SIGHUP)
        reloaded = wait_for(
            layout, "bob", bob, follower, event("pki.crl_reloaded", setting="auth.crl_file")
        )
        assert reloaded["revoked"] == 1
        # the session already authenticated carries on; Alice's next one is refused
        assert stop_nodes([alice]) == [0]
        alice = start_node(layout, "alice")
        wait_for(
            layout, "bob", bob, follower, lambda e: "CertificateRevoked" in str(e.get("errors"))
        )
        assert bob.poll() is None
    finally:
        stop_nodes([alice, bob])
    rejected = trail_entries(layout, "bob", "certificate_rejected")
    assert rejected and all(entry["error"] == "CertificateRevoked" for entry in rejected)
    assert "CN=alice" in str(rejected[0]["reason"])
