"""End to end: two real `qkdnode run` processes on loopback, as an operator runs them.

Each test starts Alice and Bob with the simulated link, follows Alice's JSON log, and checks the
stores afterwards (read-only). Blocks are small (few seconds each) to keep the default run short.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from etsi_qkd_014_client import QKD014Client

from qkdnode.config import SimulatedLinkConfig, load_config
from qkdnode.demo.progress import LogFollower, Progress
from qkdnode.demo.run import (
    DemoLayout,
    compare_stores,
    prepare_workdir,
    prove_keys_through_api,
    read_keys,
    start_node,
    stop_nodes,
)
from qkdnode.postprocess.finitekey import (
    FiniteKeyAnalysis,
    OneDecoyObservation,
    OneDecoySettings,
    SecurityParameters,
    one_decoy_key_length,
)
from tests.reliability.harness import scan, windows

pytestmark = pytest.mark.slow  # starts daemon processes

BLOCK_PULSES = 40_000_000
GRACE_S = 15.0


@pytest.fixture
def layout(tmp_path: Path) -> DemoLayout:
    workdir = tmp_path / "pair"
    workdir.mkdir(mode=0o700)
    return prepare_workdir(workdir, distance_km=25.0, block_pulses=BLOCK_PULSES)


@pytest.fixture
def nodes(layout: DemoLayout) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    running = {"bob": start_node(layout, "bob"), "alice": start_node(layout, "alice")}
    yield running
    stop_nodes(list(running.values()))


def wait_for(
    layout: DemoLayout,
    progress: Progress,
    follower: LogFollower,
    done: Callable[[Progress], bool],
    processes: dict[str, subprocess.Popen[bytes]],
    timeout_s: float = 120.0,
) -> None:
    deadline = time.monotonic() + timeout_s
    while not done(progress):
        for event in follower.new_events():
            progress.feed(event)
        for name, process in processes.items():
            if process.poll() is not None:
                stderr = (layout.workdir / f"{name}.stderr").read_text()
                pytest.fail(f"{name} exited with {process.returncode}: {stderr[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out: {progress}")
        time.sleep(0.1)


def committed_blocks(layout: DemoLayout) -> list[dict[str, Any]]:
    """Alice's ``block.committed`` log events, in order."""
    events = map(json.loads, layout.log("alice").read_text().splitlines())
    return [event for event in events if event.get("event") == "block.committed"]


def scrape(layout: DemoLayout, node: str) -> dict[str, float]:
    """The node's /metrics as {sample name with labels: value}."""
    with urllib.request.urlopen(layout.metrics_url(node), timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def qkdnode_status(layout: DemoLayout, node: str) -> int:
    url = layout.metrics_url(node).replace("/metrics", "/status")
    result = subprocess.run(
        [sys.executable, "-m", "qkdnode", "status", "--url", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.returncode


def real_client_gets_the_same_key_at_both_daemons(layout: DemoLayout) -> None:
    """The third-party ETSI 014 client: status and a key as master at Alice, the same key by
    its ID as slave at Bob."""
    pki_dir = layout.pki_dir

    def client(node: str, sae: str) -> QKD014Client:
        return QKD014Client(
            f"localhost:{layout.kme_ports[node]}",
            str(pki_dir / f"{sae}.pem"),
            str(pki_dir / f"{sae}.key"),
            str(layout.node_ca_dir / "ca.pem"),
        )

    master, slave = client("alice", "sae-a"), client("bob", "sae-b")
    code, status = master.get_status("sae-b")
    assert code == 200 and status.stored_key_count > 0
    assert (status.master_sae_id, status.slave_sae_id) == ("sae-a", "sae-b")
    code, container = master.get_key("sae-b", number=2, size=512)
    assert code == 200 and len(container.keys) == 2
    for key in container.keys:
        code, fetched = slave.get_key_with_key_IDs("sae-a", [key.key_id])
        assert code == 200 and fetched.keys[0].key == key.key


def test_two_daemons_distil_identical_keys_and_rotate_to_key_derived_auth(
    layout: DemoLayout, nodes: dict[str, subprocess.Popen[bytes]]
) -> None:
    progress, follower = Progress(), LogFollower(layout.log("alice"))
    wait_for(layout, progress, follower, lambda p: p.committed >= 2, nodes)
    early = {node: scrape(layout, node) for node in ("alice", "bob")}
    wait_for(layout, progress, follower, lambda p: p.committed >= 5, nodes)
    late = {node: scrape(layout, node) for node in ("alice", "bob")}
    committed = 'qkdnode_blocks_total{outcome="committed"}'
    for node in ("alice", "bob"):  # the counters move as blocks complete, on both nodes
        assert late[node][committed] > early[node][committed] >= 1
        assert late[node]["qkdnode_secret_bits_total"] > early[node]["qkdnode_secret_bits_total"]
        assert late[node]['qkdnode_auth_mode{mode="key_derived"}'] == 1
        assert late[node]["qkdnode_peer_connected"] == 1
    assert qkdnode_status(layout, "alice") == 0
    assert "key_derived" in progress.modes_seen, progress.modes_seen
    assert progress.modes_seen[0] == "certificate"
    api_match, delivered = prove_keys_through_api(layout)
    assert api_match and delivered == 8
    real_client_gets_the_same_key_at_both_daemons(layout)

    started = time.monotonic()
    codes = stop_nodes([nodes["alice"], nodes["bob"]], timeout_s=GRACE_S + 5)
    assert codes == [0, 0], codes  # SIGTERM: clean exit
    assert time.monotonic() - started < GRACE_S + 5
    assert qkdnode_status(layout, "alice") == 3  # a stopped node does not answer
    match, compared = compare_stores(layout, exact=True)
    assert match and compared > 100
    # the log carries node, peer and block on block events; no key material
    text = layout.log("alice").read_text()
    # every committed block states its keys' security: key-derived ones sum the tag terms,
    # which only grow along the chain that starts at the certificate bootstrap
    derived = [e for e in committed_blocks(layout) if e["authentication"] == "key_derived"]
    assert derived and all(e["chain_root"] == "pki" and e["computational_root"] for e in derived)
    assert all(e["epsilon_total"] > e["epsilon_block"] for e in derived)
    totals = [e["epsilon_total"] for e in derived]
    assert totals == sorted(totals) and totals[-1] < 1e-6
    assert late["alice"]["qkdnode_key_security_epsilon"] > 0
    for key in list(read_keys(layout.store("alice")).values())[:50]:
        assert key.hex() not in text
    audit_trails_verify_and_an_altered_entry_is_named(layout)


def test_a_one_decoy_pair_distils_identical_keys_sized_by_rusca(tmp_path: Path) -> None:
    workdir = tmp_path / "one-decoy"
    workdir.mkdir(mode=0o700)
    layout = prepare_workdir(workdir, distance_km=25.0, block_pulses=BLOCK_PULSES, decoys=1)
    config = load_config(layout.config("alice"))
    assert config.postprocess.security_model == "one_decoy"
    assert isinstance(config.link, SimulatedLinkConfig) and config.link.p_vacuum == 0.0
    settings = OneDecoySettings(
        mu_signal=config.link.mu_signal,
        mu_decoy=config.link.mu_decoy,
        p_signal=config.link.p_signal,
        p_key_basis=config.link.p_key_basis,
    )
    running = {"bob": start_node(layout, "bob"), "alice": start_node(layout, "alice")}
    try:
        progress, follower = Progress(), LogFollower(layout.log("alice"))
        wait_for(layout, progress, follower, lambda p: p.committed >= 2, running)
    finally:
        assert stop_nodes(list(running.values()), timeout_s=GRACE_S + 5) == [0, 0]
    match, compared = compare_stores(layout, exact=True)
    assert match and compared > 100
    committed = committed_blocks(layout)
    assert len(committed) >= 2
    for event in committed:
        # no third class was sent, and the key is (A25) of the block's own logged counts
        assert event["key_counts"][2] == event["test_counts"][2] == event["key_errors"][2] == 0
        assert sum(event["key_errors"]) == event["errors_corrected"] > 0
        bound = one_decoy_key_length(
            OneDecoyObservation(
                key_basis_counts=(event["key_counts"][0], event["key_counts"][1]),
                key_basis_errors=(event["key_errors"][0], event["key_errors"][1]),
                test_basis_counts=(event["test_counts"][0], event["test_counts"][1]),
                test_basis_errors=(event["test_errors"][0], event["test_errors"][1]),
            ),
            settings,
            leak_ec_bits=event["leak_bits"],
            security=SecurityParameters(
                eps_sec=config.postprocess.eps_sec, eps_cor=config.postprocess.eps_cor
            ),
            statistics=FiniteKeyAnalysis(config.postprocess.finite_key),
        )
        assert event["final_key_bits"] == bound.length_bits > 0


def test_with_two_blocks_in_flight_the_next_block_opens_before_this_one_commits(
    layout: DemoLayout,
) -> None:
    for node in ("alice", "bob"):
        path = layout.config(node)
        path.write_text(
            path.read_text().replace("[postprocess]\n", "[postprocess]\nblocks_in_flight = 2\n")
        )
    nodes = {"bob": start_node(layout, "bob"), "alice": start_node(layout, "alice")}
    try:
        progress, follower = Progress(), LogFollower(layout.log("alice"))
        wait_for(layout, progress, follower, lambda p: p.committed >= 6, nodes)
    finally:
        codes = stop_nodes(list(nodes.values()), timeout_s=GRACE_S + 5)
    assert codes == [0, 0], codes
    assert progress.aborted == 0
    match, compared = compare_stores(layout, exact=True)
    assert match and compared > 100
    committed = committed_blocks(layout)
    assert [e["block"] for e in committed] == sorted(e["block"] for e in committed)

    def seconds(event: dict[str, Any]) -> float:
        return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()

    # a block opened (its link time and post-processing before its commit) while the one
    # before it was still open; before rotation blocks go one at a time
    opened_early = [
        later["block"]
        for earlier, later in itertools.pairwise(committed)
        if seconds(later) - later["link_s"] - later["postprocess_s"] < seconds(earlier)
    ]
    assert opened_early, [(e["block"], e["timestamp"], e["link_s"]) for e in committed]


def audit_verify(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qkdnode", "audit", "verify", *arguments],
        capture_output=True,
        text=True,
        timeout=60,
    )


def audit_trails_verify_and_an_altered_entry_is_named(layout: DemoLayout) -> None:
    """Both stores' audit trails verify, each against the head its peer received; one entry
    altered afterwards is named."""
    for node, peer in (("alice", "bob"), ("bob", "alice")):
        store, peer_store = str(layout.store(node)), str(layout.store(peer))
        result = audit_verify("--store", store, "--peer-store", peer_store)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "the head the peer received" in result.stdout
    shown = subprocess.run(
        [sys.executable, "-m", "qkdnode", "audit", "show", "--store", str(layout.store("alice"))],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    for kind in ("daemon_started", "session_established", "rotated", "block_committed"):
        assert kind in shown
    assert "keys_delivered" in shown  # the API calls above
    db = sqlite3.connect(layout.store("alice") / "keys.db", isolation_level=None)
    db.execute(
        "UPDATE audit_log SET body = CAST(replace(CAST(body AS TEXT), 'sae-b', 'sae-x') AS BLOB)"
        " WHERE seq = (SELECT MIN(seq) FROM audit_log WHERE CAST(body AS TEXT) LIKE"
        " '%keys_delivered%')"
    )
    (altered,) = db.execute(
        "SELECT MIN(seq) FROM audit_log WHERE CAST(body AS TEXT) LIKE '%keys_delivered%'"
    ).fetchone()
    db.close()
    result = audit_verify("--store", str(layout.store("alice")))
    assert result.returncode == 1
    assert f"BROKEN at entry {altered}: tag does not verify" in result.stdout


def test_intercept_resend_eve_aborts_every_block_and_stores_no_key(tmp_path: Path) -> None:
    workdir = tmp_path / "eve"
    workdir.mkdir(mode=0o700)
    layout = prepare_workdir(workdir, distance_km=25.0, block_pulses=BLOCK_PULSES, eve=1.0)
    running = {"bob": start_node(layout, "bob"), "alice": start_node(layout, "alice")}
    try:
        progress, follower = Progress(), LogFollower(layout.log("alice"))
        wait_for(layout, progress, follower, lambda p: p.attempts >= 3, running)
    finally:
        codes = stop_nodes(list(running.values()))
    assert codes == [0, 0]
    assert progress.committed == 0
    assert set(progress.abort_reasons) == {"qber_above_threshold"}, progress.abort_reasons
    assert read_keys(layout.store("alice")) == {} and read_keys(layout.store("bob")) == {}


def test_kill_9_of_bob_mid_block_then_restart_loses_no_committed_key(
    layout: DemoLayout, nodes: dict[str, subprocess.Popen[bytes]]
) -> None:
    progress, follower = Progress(), LogFollower(layout.log("alice"))
    wait_for(layout, progress, follower, lambda p: p.committed >= 2, nodes)
    time.sleep(0.7)  # well inside the next block
    committed_before = read_keys(layout.store("alice"))
    os.kill(nodes["bob"].pid, signal.SIGKILL)
    nodes["bob"].wait(timeout=10)
    nodes["bob"] = start_node(layout, "bob")
    target = progress.committed + 2
    wait_for(layout, progress, follower, lambda p: p.committed >= target, nodes)
    codes = stop_nodes([nodes["alice"], nodes["bob"]], timeout_s=GRACE_S + 5)
    assert codes == [0, 0], codes
    match, _ = compare_stores(layout, exact=True)
    assert match
    alice_after = read_keys(layout.store("alice"))
    for key_id, material in committed_before.items():
        assert alice_after.get(key_id) == material  # no committed key lost


def test_sigterm_during_start_up_stops_the_node_cleanly(layout: DemoLayout) -> None:
    # a SIGTERM that lands before the event loop's signal receiver exists (here: right after the
    # self-tests, before trio runs) must stop the node cleanly, not kill it with status -15
    bob = start_node(layout, "bob")
    follower = LogFollower(layout.log("bob"))
    events: list[str] = []
    try:
        deadline = time.monotonic() + 20.0
        while "daemon.self_tests" not in events:
            assert bob.poll() is None and time.monotonic() < deadline, events
            events += [str(e["event"]) for e in follower.new_events()]
            time.sleep(0.001)
        bob.send_signal(signal.SIGTERM)
        assert bob.wait(timeout=GRACE_S) == 0
    finally:
        stop_nodes([bob])
    events += [str(e["event"]) for e in follower.new_events()]
    assert "daemon.stopping" in events and events[-1] == "daemon.stopped", events


def test_hybrid_pair_between_two_daemons_gets_identical_keys_with_the_real_client(
    layout: DemoLayout,
) -> None:
    """Both configs make (sae-a master, sae-b slave) hybrid; (sae-b, sae-a) stays plain. The
    ML-KEM exchange runs over the daemons' authenticated channel, reserving ahead included."""
    pairs = '[[delivery.pairs]]\nmaster_sae_id = "sae-a"\nslave_sae_id = "sae-b"\nkind = "hybrid"\n'
    for node in ("alice", "bob"):
        path = layout.config(node)
        path.write_text(path.read_text().replace("\n[metrics]", f"\n{pairs}\n[metrics]", 1))
    running = {"bob": start_node(layout, "bob"), "alice": start_node(layout, "alice")}
    try:
        progress, follower = Progress(), LogFollower(layout.log("alice"))
        wait_for(layout, progress, follower, lambda p: p.committed >= 2, running)
        stored = set(read_keys(layout.store("alice")).values())

        def client(node: str, sae: str) -> QKD014Client:
            pki = layout.pki_dir
            return QKD014Client(
                f"localhost:{layout.kme_ports[node]}",
                str(pki / f"{sae}.pem"),
                str(pki / f"{sae}.key"),
                str(layout.node_ca_dir / "ca.pem"),
            )

        delivered: list[bytes] = []
        for master, slave, hybrid in (("alice", "bob", True), ("bob", "alice", False)):
            sae_m, sae_s = f"sae-{master[0]}", f"sae-{slave[0]}"
            code, container = client(master, sae_m).get_key(sae_s, number=3)
            assert code == 200 and len(container.keys) == 3, container
            for key in container.keys:
                delivered.append(base64.b64decode(key.key))
                assert (delivered[-1] in stored) is not hybrid
                code, fetched = client(slave, sae_s).get_key_with_key_IDs(sae_m, [key.key_id])
                assert code == 200 and fetched.keys[0].key == key.key
    finally:
        codes = stop_nodes(list(running.values()), timeout_s=GRACE_S + 5)
    assert codes == [0, 0], codes
    # the per-key ML-KEM secrets of keys still reserved ahead are in the stores, nowhere else
    secrets = list(delivered)
    for node in ("alice", "bob"):
        db = sqlite3.connect(f"file:{layout.store(node) / 'keys.db'}?mode=ro", uri=True)
        rows = db.execute("SELECT mlkem_secret FROM deliveries WHERE mlkem_secret IS NOT NULL")
        held = [bytes(secret) for (secret,) in rows.fetchall()]
        db.close()
        assert held, f"{node} holds no hybrid key reserved ahead"
        secrets += held
    needles = windows(secrets)
    assert scan(b"planted " + secrets[-1].hex().encode(), needles) > 0  # the scan finds one
    for node in ("alice", "bob"):
        for text in (layout.log(node), layout.workdir / f"{node}.stderr"):
            assert scan(text.read_bytes(), needles) == 0, text
